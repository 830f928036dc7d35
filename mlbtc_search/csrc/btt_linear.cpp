// Fused CPU kernel for the two-core BTT matrix (linear_cpu.py), forward and backward.
//
// x (N, k*C*D) rows, cores R (k, C, D, B, S) and L (k, B, C, S, A), y (N, k*A*B):
//   z[n, k, c, s, b] = sum_d x[n, k, c, d] R[k, c, d, b, s]
//   y[n, k, a, b]    = sum_{c, s} z[n, k, c, s, b] L[k, b, c, s, a]
// With b as the SIMD lane axis neither step needs a transpose: the first is a "broadcast GEMM"
// (a scalar of x times contiguous vectors of R over b), the second a "Hadamard GEMM" (for each
// lane b its own GEMM over (c, s) -> a, done elementwise on vectors of b), which writes y in its
// own (a, b) order. The backward is four more products of the same two kinds:
//   gz = gy . L (Hadamard), gL = z^T gy (Hadamard over rows), gR = x^T gz (broadcast over rows),
//   gx = gz . R^T (broadcast). Exactly the six GEMMs of the bmm path: the same FLOPs.
//
// Rows run in chunks of `chunk` per thread; threads own contiguous ranges of chunks and their
// own partial weight gradients, summed at the end in a fixed order (deterministic). A chunk's
// inputs are first copied into cache-resident panels (sequential reads of its rows: x as
// (c, row, d), gy as (lane block, row, a, lane)); z and gz live per chunk as (lane block, row,
// (c, s), lane) with a one-vector pad per row (rows do not alias in the L1 sets). The weights are
// packed once per call into the panels the register tiles read. y, gx and the saved z are
// written with non-temporal stores (no read-for-ownership of lines that are overwritten whole).
// z is saved for the backward in the chunk layout (an opaque buffer to Python).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

template <typename T>
struct Vec {  // 64-byte vectors: zmm registers under -march=native with AVX-512
  typedef T type __attribute__((vector_size(64)));
  static constexpr int L = 64 / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, 64);
    return v;
  }
  static void store(T* p, const type& v, bool nt) {
#ifdef __AVX512F__
    if (nt) return _mm512_stream_si512(reinterpret_cast<__m512i*>(p), (__m512i)v);
#endif
    std::memcpy(p, &v, 64);
  }
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned64(const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; }

inline void fence() {
#ifdef __AVX512F__
  _mm_sfence();  // non-temporal stores drained before other threads read
#endif
}

// copy n elements (a multiple of the lane count) with non-temporal stores when dst is aligned
template <typename T>
void stream_copy(T* dst, const T* src, int64_t n) {
  constexpr int L = Vec<T>::L;
  const bool nt = aligned64(dst);
  for (int64_t i = 0; i < n; i += L) Vec<T>::store(dst + i, Vec<T>::load(src + i), nt);
}

// ---- profile: seconds per phase summed over threads (btt_stats) ----------------------------
enum Phase { kPack, kXIn, kZ, kY, kZSave, kGradIn, kGL, kGZ, kGR, kGX, kReduce, kPhases };
std::atomic<int64_t> phase_ns[kPhases];

struct Clock {
  int64_t acc[kPhases] = {};
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(Phase p) {
    const auto now = std::chrono::steady_clock::now();
    acc[p] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count();
    t = now;
  }
  ~Clock() {
    for (int p = 0; p < kPhases; ++p) phase_ns[p].fetch_add(acc[p], std::memory_order_relaxed);
  }
};

// Prefetches (into L2) the rows the next work item reads, a few lines after every register
// tile of the current one, so that its DRAM reads overlap this item's arithmetic.
struct Prefetch {
  struct Range {
    const char* p;
    int64_t rows, row_lines, stride;  // rows of row_lines cache lines, stride bytes apart
  };
  Range r[3];
  int nr = 0, cur = 0;
  int64_t row = 0, line = 0, per_step = 0;
  template <typename T>
  void add(const T* p, int64_t rows, int64_t row_elems, int64_t stride_elems) {
    if (rows > 0 && row_elems > 0)
      r[nr++] = {reinterpret_cast<const char*>(p), rows,
                 (int64_t)((row_elems * sizeof(T) + 63) / 64), (int64_t)(stride_elems * sizeof(T))};
  }
  void plan(int64_t steps) {  // spread over this many steps (tiles of the current item)
    int64_t lines = 0;
    for (int i = 0; i < nr; ++i) lines += r[i].rows * r[i].row_lines;
    per_step = getenv("BTT_NOPF") ? 0 : (lines + steps - 1) / std::max<int64_t>(steps, 1);
  }
  void step() {
    for (int64_t q = 0; q < per_step && cur < nr; ++q) {
      const Range& g = r[cur];
      __builtin_prefetch(g.p + row * g.stride + line * 64, 0, 2);
      if (++line == g.row_lines) {
        line = 0;
        if (++row == g.rows) row = 0, ++cur;
      }
    }
  }
};

constexpr int BM = 6, BV = 4;  // broadcast tile: 6 rows x 4 vectors (24 accumulators)
constexpr int HM = 4, HJ = 6;  // Hadamard tile: 4 x 6 vectors (24 accumulators)

// Broadcast GEMM operands: C[i][v] (+)= sum_p A(i, p) B[p * bps + v * bvs] (vectors), with
// A(i, p) = A[i * ars + (p / run) * apb + p % run] (runs of contiguous scalars).
template <typename T>
struct BOp {
  const T* A;
  int64_t ars, apb, run;
  const T* B;
  int64_t bps, bvs;
  T* C;
  int64_t crs, cvs;
  bool nt;  // non-temporal stores of C
  T* C2 = nullptr;  // also (non-temporal) stores C here, at the same offsets
};

template <typename T, int MR, int NV>
void bkern(const BOp<T>& o, int64_t K, bool acc) {
  using W = Vec<T>;
  typename W::type c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = acc ? W::load(o.C + i * o.crs + v * o.cvs) : typename W::type{};
  const T* b = o.B;
  for (int64_t pb = 0; pb < K / o.run; ++pb) {
    const T* a = o.A + pb * o.apb;
    for (int64_t q = 0; q < o.run; ++q, b += o.bps) {
      typename W::type bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = W::load(b + v * o.bvs);
      for (int i = 0; i < MR; ++i) {
        const T ai = a[i * o.ars + q];
        for (int v = 0; v < NV; ++v) c[i][v] += bv[v] * ai;
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) W::store(o.C + i * o.crs + v * o.cvs, c[i][v], o.nt);
  if (o.C2)
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) W::store(o.C2 + i * o.crs + v * o.cvs, c[i][v], true);
}

template <typename T, int MR>
void bdisp(int nv, const BOp<T>& o, int64_t K, bool acc) {
  switch (nv) {
    case 1: return bkern<T, MR, 1>(o, K, acc);
    case 2: return bkern<T, MR, 2>(o, K, acc);
    case 3: return bkern<T, MR, 3>(o, K, acc);
    default: return bkern<T, MR, 4>(o, K, acc);
  }
}

// C (M x NV vectors) (+)= A (M x K) B (K x NV vectors); B's K x 4-vector panel stays in L1.
template <typename T>
void bgemm(const BOp<T>& o, int64_t M, int64_t NV, int64_t K, bool acc, Prefetch* pf) {
  for (int64_t v0 = 0; v0 < NV; v0 += BV) {
    const int nv = (int)std::min<int64_t>(BV, NV - v0);
    for (int64_t i0 = 0; i0 < M; i0 += BM) {
      BOp<T> s = o;
      s.A += i0 * o.ars;
      s.B += v0 * o.bvs;
      s.C += i0 * o.crs + v0 * o.cvs;
      if (o.C2) s.C2 += i0 * o.crs + v0 * o.cvs;
      if (acc && i0 + BM < M)  // the next tile's accumulators (weight gradients: L3) into L1
        for (int i = 0; i < BM && i0 + BM + i < M; ++i)
          for (int v = 0; v < nv; ++v) __builtin_prefetch(s.C + (BM + i) * o.crs + v * o.cvs, 1, 3);
      switch (std::min<int64_t>(BM, M - i0)) {
        case 1: bdisp<T, 1>(nv, s, K, acc); break;
        case 2: bdisp<T, 2>(nv, s, K, acc); break;
        case 3: bdisp<T, 3>(nv, s, K, acc); break;
        case 4: bdisp<T, 4>(nv, s, K, acc); break;
        case 5: bdisp<T, 5>(nv, s, K, acc); break;
        default: bdisp<T, 6>(nv, s, K, acc); break;
      }
      if (pf) pf->step();
    }
  }
}

// Hadamard GEMM operands (all vectors, elementwise in the lanes):
// C[i][j] (+)= sum_p A[i * ars + p * aps] B(p, j). B is either strided (B[p * bps + j * bjs])
// or packed in panels of HJ columns (panel j0 at B + j0 * K * L, then (p, j) row-major).
template <typename T>
struct HOp {
  const T* A;
  int64_t ars, aps;
  const T* B;
  int64_t bps, bjs;
  bool packed;
  T* C;
  int64_t crs, cjs;
  bool nt;
};

template <typename T, int MR, int NJ>
void hkern(const HOp<T>& o, int64_t K, bool acc) {
  using W = Vec<T>;
  typename W::type c[MR][NJ];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NJ; ++j)
      c[i][j] = acc ? W::load(o.C + i * o.crs + j * o.cjs) : typename W::type{};
  const T* a = o.A;
  const T* b = o.B;
  for (int64_t p = 0; p < K; ++p, a += o.aps, b += o.bps) {
    typename W::type av[MR];
    for (int i = 0; i < MR; ++i) av[i] = W::load(a + i * o.ars);
    for (int j = 0; j < NJ; ++j) {
      auto bj = W::load(b + j * o.bjs);
      asm("" : "+v"(bj));  // one load into a register: gcc otherwise reloads it as a memory
      for (int i = 0; i < MR; ++i) c[i][j] += av[i] * bj;  // operand of every FMA (load-bound)
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NJ; ++j) W::store(o.C + i * o.crs + j * o.cjs, c[i][j], o.nt);
}

template <typename T, int MR>
void hdisp(int nj, const HOp<T>& o, int64_t K, bool acc) {
  switch (nj) {
    case 1: return hkern<T, MR, 1>(o, K, acc);
    case 2: return hkern<T, MR, 2>(o, K, acc);
    case 3: return hkern<T, MR, 3>(o, K, acc);
    case 4: return hkern<T, MR, 4>(o, K, acc);
    case 5: return hkern<T, MR, 5>(o, K, acc);
    default: return hkern<T, MR, 6>(o, K, acc);
  }
}

// C (M x N vectors) (+)= A (M x K) * B (K x N), elementwise in the lanes; B's K x HJ panel
// stays in L1 while the rows of A stream past.
template <typename T>
void hgemm(const HOp<T>& o, int64_t M, int64_t N, int64_t K, bool acc, Prefetch* pf) {
  constexpr int L = Vec<T>::L;
  for (int64_t j0 = 0; j0 < N; j0 += HJ) {
    const int nj = (int)std::min<int64_t>(HJ, N - j0);
    HOp<T> s = o;
    if (o.packed) {
      s.B = o.B + j0 * K * L;
      s.bps = nj * L;
      s.bjs = L;
    } else {
      s.B = o.B + j0 * o.bjs;
    }
    s.C = o.C + j0 * o.cjs;
    for (int64_t i0 = 0; i0 < M; i0 += HM) {
      HOp<T> t = s;
      t.A = o.A + i0 * o.ars;
      t.C = s.C + i0 * o.crs;
      if (acc && i0 + HM < M)  // the next tile's accumulators (weight gradients: L3) into L1
        for (int i = 0; i < HM && i0 + HM + i < M; ++i)
          for (int j = 0; j < nj; ++j) __builtin_prefetch(t.C + (HM + i) * o.crs + j * o.cjs, 1, 3);
      switch (std::min<int64_t>(HM, M - i0)) {
        case 1: hdisp<T, 1>(nj, t, K, acc); break;
        case 2: hdisp<T, 2>(nj, t, K, acc); break;
        case 3: hdisp<T, 3>(nj, t, K, acc); break;
        default: hdisp<T, 4>(nj, t, K, acc); break;
      }
      if (pf) pf->step();
    }
  }
}

struct Dims {
  int64_t k, C, D, B, S, A, N, n;  // n: rows per chunk
  int64_t L, NB, CS, RZ, Dx, Dy;   // lanes, lane blocks, C*S, z row stride (padded), x/y rows
  int64_t chunks() const { return (N + n - 1) / n; }
  int64_t zchunk() const { return NB * n * RZ; }  // one chunk of z for one block k
  int64_t P;  // parts: contiguous ranges of chunks, one per thread (at most)
  int64_t start(int64_t p) const { return p * chunks() / P; }  // part p's first chunk
};

Dims dims(const at::Tensor& x, const at::Tensor& r, const at::Tensor& l, int64_t chunk) {
  Dims m;
  m.k = r.size(0), m.C = r.size(1), m.D = r.size(2), m.B = r.size(3), m.S = r.size(4);
  m.A = l.size(4), m.N = x.size(0), m.n = std::max<int64_t>(1, chunk);
  m.L = 64 / x.element_size(), m.NB = m.B / m.L, m.CS = m.C * m.S, m.RZ = (m.CS + 1) * m.L;
  m.Dx = m.k * m.C * m.D, m.Dy = m.k * m.A * m.B;
  m.P = std::max<int64_t>(1, std::min<int64_t>(m.chunks(), at::get_num_threads()));
  TORCH_CHECK(x.dim() == 2 && x.size(1) == m.Dx && l.size(0) == m.k && l.size(1) == m.B &&
                  l.size(2) == m.C && l.size(3) == m.S,
              "btt: shapes x (N, k*C*D), R (k, C, D, B, S), L (k, B, C, S, A) do not match");
  TORCH_CHECK(m.B % m.L == 0 && m.D % m.L == 0, "btt: B and D must be multiples of ", m.L);
  TORCH_CHECK(x.is_contiguous() && r.is_contiguous() && l.is_contiguous() &&
                  r.scalar_type() == x.scalar_type() && l.scalar_type() == x.scalar_type(),
              "btt: x, R, L must be contiguous and of one dtype");
  return m;
}

// L (k, B, C, S, A) -> per (k, lane block): panels of HJ columns of the (p, j) matrix of lane
// vectors, where (p, j) = ((c, s), a) for the forward (by_a) and (a, (c, s)) for gz.
template <typename T>
at::Tensor pack_l(const at::Tensor& l, const Dims& m, bool by_a) {
  at::Tensor out = at::empty({m.k * m.NB * m.CS * m.A * m.L}, l.options());
  const T* src = l.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  const int64_t P = by_a ? m.CS : m.A, J = by_a ? m.A : m.CS, row = m.CS * m.A;
  at::parallel_for(0, m.k * m.NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t kb = b0; kb < b1; ++kb) {
      const T* s = src + kb * m.L * row;  // rows b = bv * L + e of block k: (lane e, cs, a)
      T* o = dst + kb * P * J * m.L;
      for (int64_t j0 = 0; j0 < J; j0 += HJ) {
        const int64_t nj = std::min<int64_t>(HJ, J - j0);
        for (int64_t p = 0; p < P; ++p)
          for (int64_t j = j0; j < j0 + nj; ++j) {
            const T* e0 = s + (by_a ? p * m.A + j : j * m.A + p);
            for (int64_t e = 0; e < m.L; ++e) *o++ = e0[e * row];
          }
      }
    }
  });
  return out;
}

// R (k, C, D, B, S) -> (k, C, D, S, B) (forward; R itself when S = 1) or (k, C, S, B, D) (gx)
template <typename T>
at::Tensor pack_r(const at::Tensor& r, const Dims& m, bool forward) {
  if (forward && m.S == 1) return r;
  at::Tensor out = at::empty_like(r);
  const T* src = r.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, m.k * m.C, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t kc = b0; kc < b1; ++kc) {
      const T* s = src + kc * m.D * m.B * m.S;
      T* o = dst + kc * m.D * m.B * m.S;
      if (forward) {
        for (int64_t d = 0; d < m.D; ++d)
          for (int64_t si = 0; si < m.S; ++si)
            for (int64_t b = 0; b < m.B; ++b) *o++ = s[(d * m.B + b) * m.S + si];
      } else {
        for (int64_t si = 0; si < m.S; ++si)
          for (int64_t b = 0; b < m.B; ++b)
            for (int64_t d = 0; d < m.D; ++d) *o++ = s[(d * m.B + b) * m.S + si];
      }
    }
  });
  return out;
}

// x[r0 + i, k, c, :] -> xc[c][i][:] for the chunk's rows (sequential reads of each row)
template <typename T>
void load_x(T* xc, const T* X, const Dims& m, int64_t r0, int64_t nr, int64_t kk) {
  for (int64_t i = 0; i < nr; ++i)
    for (int64_t c = 0; c < m.C; ++c)
      std::memcpy(xc + (c * m.n + i) * m.D, X + (r0 + i) * m.Dx + (kk * m.C + c) * m.D,
                  m.D * sizeof(T));
}

template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& l, const Dims& m,
                  at::Tensor& y, at::Tensor& z, bool save) {
  Clock clock;
  const at::Tensor rp = pack_r<T>(r, m, true), lf = pack_l<T>(l, m, true);
  clock.lap(kPack);
  const T* X = x.data_ptr<T>();
  const T* Rp = rp.data_ptr<T>();
  const T* Lf = lf.data_ptr<T>();
  T* Y = y.data_ptr<T>();
  T* Z = save ? z.data_ptr<T>() : nullptr;
  const bool nt = aligned64(Y), direct = save && aligned64(Z);
  at::parallel_for(0, m.P, 1, [&](int64_t p0, int64_t p1) {
    Clock ck;
    std::vector<T> zs(m.zchunk() + Vec<T>::L), xs(m.C * m.n * m.D);
    T* zc = zs.data() + (Vec<T>::L - reinterpret_cast<uintptr_t>(zs.data()) % 64 / sizeof(T));
    T* xc = xs.data();
    const int64_t first = m.start(p0), last = m.start(p1);
    for (int64_t it = first * m.k; it < last * m.k; ++it) {  // items (chunk, block k)
      const int64_t ch = it / m.k, kk = it % m.k, r0 = ch * m.n, nr = std::min(m.n, m.N - r0);
      Prefetch pf;
      if (it + 1 < last * m.k) {  // the next item's rows of x
        const int64_t c1 = (it + 1) / m.k, k1 = (it + 1) % m.k, n1 = std::min(m.n, m.N - c1 * m.n);
        pf.add(X + c1 * m.n * m.Dx + k1 * m.C * m.D, n1, m.C * m.D, m.Dx);
      }
      pf.plan(m.C * m.S * ceil_div(m.NB, BV) * ceil_div(nr, BM) +
              m.NB * ceil_div(m.A, HJ) * ceil_div(nr, HM));
      load_x(xc, X, m, r0, nr, kk);
      ck.lap(kXIn);
      T* zsave = save ? Z + it * m.zchunk() : nullptr;
      for (int64_t c = 0; c < m.C; ++c)  // z[n, c, s, :] = x[n, c, :] R[c, :, s, :]
        for (int64_t s = 0; s < m.S; ++s) {
          BOp<T> o{xc + c * m.n * m.D, m.D, 0, m.D,
                   Rp + (kk * m.C + c) * m.D * m.S * m.B + s * m.B, m.S * m.B, m.L,
                   zc + (c * m.S + s) * m.L, m.RZ, m.n * m.RZ, false,
                   direct ? zsave + (c * m.S + s) * m.L : nullptr};
          bgemm(o, nr, m.NB, m.D, false, &pf);
        }
      ck.lap(kZ);
      for (int64_t bv = 0; bv < m.NB; ++bv) {  // y[n, a, b] = sum_cs z[n, cs, b] L[cs, a, b]
        HOp<T> o{zc + bv * m.n * m.RZ, m.RZ, m.L, Lf + (kk * m.NB + bv) * m.CS * m.A * m.L,
                 0, 0, true, Y + r0 * m.Dy + kk * m.A * m.B + bv * m.L, m.Dy, m.B, nt};
        hgemm(o, nr, m.A, m.CS, false, &pf);
      }
      ck.lap(kY);
      if (save && !direct) {
        for (int64_t bv = 0; bv < m.NB; ++bv)
          stream_copy(zsave + bv * m.n * m.RZ, zc + bv * m.n * m.RZ, nr * m.RZ);
        ck.lap(kZSave);
      }
    }
    fence();
  });
}

template <typename T>
void backward_impl(const at::Tensor& gy, const at::Tensor& x, const at::Tensor& z,
                   const at::Tensor& r, const at::Tensor& l, const Dims& m, at::Tensor& gx,
                   at::Tensor& gr, at::Tensor& gl, bool need_x, bool need_r, bool need_l) {
  Clock clock;
  const bool need_z = need_x || need_r;
  const at::Tensor lb = need_z ? pack_l<T>(l, m, false) : at::Tensor();
  const at::Tensor rt = need_x ? pack_r<T>(r, m, false) : at::Tensor();
  const int64_t P = m.P, RA = (m.A + 1) * m.L;  // RA: packed gy row stride (padded)
  const int64_t glsize = m.k * m.NB * m.CS * m.A * m.L, grsize = r.numel();
  at::Tensor glp = need_l ? at::zeros({P, glsize}, x.options()) : at::Tensor();
  at::Tensor grp = need_r ? at::zeros({P, grsize}, x.options()) : at::Tensor();
  clock.lap(kPack);
  const T* GY = gy.data_ptr<T>();
  const T* X = x.data_ptr<T>();
  const T* Z = z.data_ptr<T>();
  const T* Lb = need_z ? lb.data_ptr<T>() : nullptr;
  const T* Rt = need_x ? rt.data_ptr<T>() : nullptr;
  T* GX = need_x ? gx.data_ptr<T>() : nullptr;
  const bool nt = need_x && aligned64(GX);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    Clock ck;
    std::vector<T> gyc(m.NB * m.n * RA), gzc(need_z ? m.zchunk() : 0);
    std::vector<T> xc(need_r ? m.C * m.n * m.D : 0), zs(need_l ? m.zchunk() : 0);
    for (int64_t p = p0; p < p1; ++p) {
      T* GL = need_l ? glp.data_ptr<T>() + p * glsize : nullptr;
      T* GR = need_r ? grp.data_ptr<T>() + p * grsize : nullptr;
      const int64_t last = m.start(p + 1) * m.k;
      for (int64_t it = m.start(p) * m.k; it < last; ++it) {  // items (chunk, block k)
        const int64_t ch = it / m.k, kk = it % m.k, r0 = ch * m.n, nr = std::min(m.n, m.N - r0);
        Prefetch pf;
        if (it + 1 < last) {  // the next item's rows of gy, z and x
          const int64_t c1 = (it + 1) / m.k, k1 = (it + 1) % m.k;
          const int64_t n1 = std::min(m.n, m.N - c1 * m.n);
          pf.add(GY + c1 * m.n * m.Dy + k1 * m.A * m.B, n1, m.A * m.B, m.Dy);
          if (need_l) pf.add(Z + (it + 1) * m.zchunk(), m.NB, n1 * m.RZ, m.n * m.RZ);
          if (need_r) pf.add(X + c1 * m.n * m.Dx + k1 * m.C * m.D, n1, m.C * m.D, m.Dx);
        }
        pf.plan(m.NB * (need_l ? ceil_div(m.A, HJ) * ceil_div(m.CS, HM) : 0) +
                m.NB * (need_z ? ceil_div(m.CS, HJ) * ceil_div(nr, HM) : 0) +
                m.C * m.S * (need_r ? ceil_div(m.NB, BV) * ceil_div(m.D, BM) : 0) +
                m.C * m.S * (need_x ? ceil_div(m.D / m.L, BV) * ceil_div(nr, BM) : 0));
        for (int64_t i = 0; i < nr; ++i)  // gy[n, a, b] -> gyc[lane block][n][a][lane]
          for (int64_t a = 0; a < m.A; ++a)
            for (int64_t bv = 0; bv < m.NB; ++bv)
              std::memcpy(gyc.data() + (bv * m.n + i) * RA + a * m.L,
                          GY + (r0 + i) * m.Dy + (kk * m.A + a) * m.B + bv * m.L, 64);
        if (need_l) {  // the saved z of this item, sequentially into cache
          const T* src = Z + it * m.zchunk();
          for (int64_t bv = 0; bv < m.NB; ++bv)
            std::memcpy(zs.data() + bv * m.n * m.RZ, src + bv * m.n * m.RZ,
                        nr * m.RZ * sizeof(T));
        }
        ck.lap(kGradIn);
        for (int64_t bv = 0; bv < m.NB; ++bv) {
          const T* g = gyc.data() + bv * m.n * RA;
          if (need_l) {  // gL[cs, a, b] += sum_n z[n, cs, b] gy[n, a, b]
            HOp<T> o{zs.data() + bv * m.n * m.RZ, m.L, m.RZ, g, RA, m.L, false,
                     GL + (kk * m.NB + bv) * m.CS * m.A * m.L, m.A * m.L, m.L, false};
            hgemm(o, m.CS, m.A, nr, true, &pf);
            ck.lap(kGL);
          }
          if (need_z) {  // gz[n, cs, b] = sum_a gy[n, a, b] L[cs, a, b]
            HOp<T> o{g, RA, m.L, Lb + (kk * m.NB + bv) * m.CS * m.A * m.L, 0, 0, true,
                     gzc.data() + bv * m.n * m.RZ, m.RZ, m.L, false};
            hgemm(o, nr, m.CS, m.A, false, &pf);
            ck.lap(kGZ);
          }
        }
        if (need_r) {
          load_x(xc.data(), X, m, r0, nr, kk);
          ck.lap(kGradIn);
          for (int64_t c = 0; c < m.C; ++c)  // gR[c, d, s, :] += sum_n x[n, c, d] gz[n, c, s, :]
            for (int64_t s = 0; s < m.S; ++s) {
              BOp<T> o{xc.data() + c * m.n * m.D, 1, m.D, 1,
                       gzc.data() + (c * m.S + s) * m.L, m.RZ, m.n * m.RZ,
                       GR + (kk * m.C + c) * m.D * m.S * m.B + s * m.B, m.S * m.B, m.L, false};
              bgemm(o, m.D, m.NB, nr, true, &pf);
            }
          ck.lap(kGR);
        }
        if (need_x) {
          for (int64_t c = 0; c < m.C; ++c)  // gx[n, c, :] = sum_{s,b} gz[n, c, s, b] R[c, :, b, s]
            for (int64_t s = 0; s < m.S; ++s) {
              BOp<T> o{gzc.data() + (c * m.S + s) * m.L, m.RZ, m.n * m.RZ, m.L,
                       Rt + ((kk * m.C + c) * m.S + s) * m.B * m.D, m.D, m.L,
                       GX + r0 * m.Dx + (kk * m.C + c) * m.D, m.Dx, m.L, nt && s == m.S - 1};
              bgemm(o, nr, m.D / m.L, m.B, s > 0, &pf);
            }
          ck.lap(kGX);
        }
      }
    }
    fence();
  });
  clock.t = std::chrono::steady_clock::now();
  if (need_l) {  // sum the parts; (k, lane block, cs, a, lane) -> L's (k, B, C, S, A)
    const T* src = glp.data_ptr<T>();
    T* dst = gl.data_ptr<T>();
    at::parallel_for(0, m.k * m.NB * m.CS, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t w = b0; w < b1; ++w) {
        const int64_t kb = w / m.CS, cs = w % m.CS;  // kb = k * NB + lane block
        for (int64_t a = 0; a < m.A; ++a)
          for (int64_t e = 0; e < m.L; ++e) {
            const int64_t i = (w * m.A + a) * m.L + e;
            T s = 0;
            for (int64_t p = 0; p < P; ++p) s += src[p * glsize + i];
            dst[((kb * m.L + e) * m.CS + cs) * m.A + a] = s;
          }
      }
    });
  }
  if (need_r) {  // sum the parts; (k, C, D, S, B) -> R's (k, C, D, B, S)
    const T* src = grp.data_ptr<T>();
    T* dst = gr.data_ptr<T>();
    at::parallel_for(0, m.k * m.C * m.D, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t kcd = b0; kcd < b1; ++kcd)
        for (int64_t s = 0; s < m.S; ++s)
          for (int64_t b = 0; b < m.B; ++b) {
            const int64_t i = (kcd * m.S + s) * m.B + b;
            T v = 0;
            for (int64_t p = 0; p < P; ++p) v += src[p * grsize + i];
            dst[(kcd * m.B + b) * m.S + s] = v;
          }
    });
  }
  clock.lap(kReduce);
}

std::tuple<at::Tensor, at::Tensor> btt_forward(const at::Tensor& x, const at::Tensor& r,
                                               const at::Tensor& l, int64_t chunk, bool save) {
  const Dims m = dims(x, r, l, chunk);
  at::Tensor y = at::empty({m.N, m.Dy}, x.options());
  at::Tensor z = at::empty({save ? m.chunks() * m.k * m.zchunk() : 0}, x.options());
  if (m.N == 0) return {y, z};
  if (x.scalar_type() == at::kFloat)
    forward_impl<float>(x, r, l, m, y, z, save);
  else if (x.scalar_type() == at::kDouble)
    forward_impl<double>(x, r, l, m, y, z, save);
  else
    TORCH_CHECK(false, "btt_forward supports float32 and float64, got ", x.scalar_type());
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> btt_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& z, const at::Tensor& r,
    const at::Tensor& l, int64_t chunk, bool need_x, bool need_r, bool need_l) {
  const Dims m = dims(x, r, l, chunk);
  TORCH_CHECK(gy.is_contiguous() && gy.size(0) == m.N && gy.size(1) == m.Dy &&
                  gy.scalar_type() == x.scalar_type() &&
                  z.numel() == m.chunks() * m.k * m.zchunk(),
              "btt_backward: grad (N, k*A*B) contiguous and the saved z of this chunk size");
  at::Tensor gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  at::Tensor gr = need_r ? at::empty_like(r) : at::empty({0}, x.options());
  at::Tensor gl = need_l ? at::empty_like(l) : at::empty({0}, x.options());
  if (m.N == 0) {
    if (need_r) gr.zero_();
    if (need_l) gl.zero_();
  } else if (x.scalar_type() == at::kFloat) {
    backward_impl<float>(gy, x, z, r, l, m, gx, gr, gl, need_x, need_r, need_l);
  } else if (x.scalar_type() == at::kDouble) {
    backward_impl<double>(gy, x, z, r, l, m, gx, gr, gl, need_x, need_r, need_l);
  } else {
    TORCH_CHECK(false, "btt_backward supports float32 and float64, got ", x.scalar_type());
  }
  return {gx, gr, gl};
}

// seconds per phase, summed over threads, since the last reset (for benchmarks)
std::vector<double> btt_stats(bool reset) {
  std::vector<double> out(kPhases);
  for (int p = 0; p < kPhases; ++p)
    out[p] = (reset ? phase_ns[p].exchange(0) : phase_ns[p].load()) * 1e-9;
  return out;
}

}  // namespace

TORCH_LIBRARY(mlbtc_btt, m) {
  m.def("btt_forward(Tensor x, Tensor r, Tensor l, int chunk, bool save) -> (Tensor, Tensor)");
  m.def("btt_backward(Tensor grad_y, Tensor x, Tensor z, Tensor r, Tensor l, int chunk, "
        "bool need_x, bool need_r, bool need_l) -> (Tensor, Tensor, Tensor)");
  m.def("btt_stats(bool reset) -> float[]", &btt_stats);
}

TORCH_LIBRARY_IMPL(mlbtc_btt, CPU, m) {
  m.impl("btt_forward", &btt_forward);
  m.impl("btt_backward", &btt_backward);
}

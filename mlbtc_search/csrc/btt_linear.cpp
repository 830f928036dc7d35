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
// Each thread owns a part (a range of rows) and its own partial weight gradients, summed at the
// end in a fixed order (deterministic). A part runs in phases, each of which keeps one core (and
// its gradient) in L2 while all of the part's rows stream past in chunks: at D = 4096 the cores
// are 1 MB each, so re-reading them per chunk of rows (the first version) ran at the speed of
// L3. The weights are packed once per call into the panels the register tiles read; z is saved
// for the backward as (lane block, row, (c, s), lane) per super-chunk of rows, with a one-vector
// pad per row (rows do not alias in the L1 sets); gz lives in a per-thread scratch per
// super-chunk. y, gx and the saved z are written with non-temporal stores (no read for
// ownership of lines that are overwritten whole). Measured per phase by btt_stats.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

inline bool aligned64(const void* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; }

// A thread's scratch, 64-byte aligned: vectors that straddle two cache lines load at half speed
// (with std::vector's 16-byte alignment the Hadamard GEMMs ran 12-17% slower in cache).
template <typename T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(int64_t n) {
    if (n > 0) p = static_cast<T*>(std::aligned_alloc(64, ceil_div(n * sizeof(T), 64) * 64));
    TORCH_CHECK(n == 0 || p, "btt: out of memory for a scratch of ", n, " elements");
  }
  ~Scratch() { std::free(p); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* data() const { return p; }
};

inline void fence() {
#ifdef __AVX512F__
  _mm_sfence();  // non-temporal stores drained before other threads read
#endif
}

// ---- profile: seconds per phase summed over threads (btt_stats) ----------------------------
enum Phase { kPack, kZ, kY, kGradIn, kGL, kGZ, kGR, kGX, kReduce, kPhases };
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

constexpr int BM = 6, BV = 4;  // broadcast tile: 6 rows x 4 vectors (24 accumulators)
constexpr int HM = 4, HJ = 6;  // Hadamard tile: 4 x 6 vectors (24 accumulators; 3 x 8 was slower)

// Broadcast GEMM operands: C[i][v] (+)= sum_p A[i * ars + p * aps] B[p * bps + v * bvs]
// (scalars of A times vectors of B).
template <typename T>
struct BOp {
  const T* A;
  int64_t ars, aps;
  const T* B;
  int64_t bps, bvs;
  T* C;
  int64_t crs, cvs;
  bool nt;  // non-temporal stores of C
};

template <typename T, int MR, int NV>
void bkern(const BOp<T>& o, int64_t K, bool acc) {
  using W = Vec<T>;
  typename W::type c[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      c[i][v] = acc ? W::load(o.C + i * o.crs + v * o.cvs) : typename W::type{};
  const T* a = o.A;
  const T* b = o.B;
  for (int64_t p = 0; p < K; ++p, a += o.aps, b += o.bps) {
    typename W::type bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = W::load(b + v * o.bvs);
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i * o.ars];
      for (int v = 0; v < NV; ++v) c[i][v] += bv[v] * ai;
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) W::store(o.C + i * o.crs + v * o.cvs, c[i][v], o.nt);
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
void bgemm(const BOp<T>& o, int64_t M, int64_t NV, int64_t K, bool acc) {
  for (int64_t v0 = 0; v0 < NV; v0 += BV) {
    const int nv = (int)std::min<int64_t>(BV, NV - v0);
    for (int64_t i0 = 0; i0 < M; i0 += BM) {
      BOp<T> s = o;
      s.A += i0 * o.ars;
      s.B += v0 * o.bvs;
      s.C += i0 * o.crs + v0 * o.cvs;
      switch (std::min<int64_t>(BM, M - i0)) {
        case 1: bdisp<T, 1>(nv, s, K, acc); break;
        case 2: bdisp<T, 2>(nv, s, K, acc); break;
        case 3: bdisp<T, 3>(nv, s, K, acc); break;
        case 4: bdisp<T, 4>(nv, s, K, acc); break;
        case 5: bdisp<T, 5>(nv, s, K, acc); break;
        default: bdisp<T, 6>(nv, s, K, acc); break;
      }
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
  int64_t kfull = 0, koff = 0;  // packed B: the panels' K, and this call's first row of them
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
    case 6: return hkern<T, MR, 6>(o, K, acc);
    case 7: return hkern<T, MR, 7>(o, K, acc);
    default: return hkern<T, MR, HJ>(o, K, acc);
  }
}

// C (M x N vectors) (+)= A (M x K) * B (K x N), elementwise in the lanes; B's K x HJ panel
// stays in L1 while the rows of A stream past.
template <typename T>
void hgemm(const HOp<T>& o, int64_t M, int64_t N, int64_t K, bool acc) {
  constexpr int L = Vec<T>::L;
  for (int64_t j0 = 0; j0 < N; j0 += HJ) {
    const int nj = (int)std::min<int64_t>(HJ, N - j0);
    HOp<T> s = o;
    if (o.packed) {
      s.B = o.B + (j0 * (o.kfull ? o.kfull : K) + o.koff * nj) * L;
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
      switch (std::min<int64_t>(HM, M - i0)) {
        case 1: hdisp<T, 1>(nj, t, K, acc); break;
        case 2: hdisp<T, 2>(nj, t, K, acc); break;
        case 3: hdisp<T, 3>(nj, t, K, acc); break;
        default: hdisp<T, HM>(nj, t, K, acc); break;
      }
    }
  }
}

struct Dims {
  int64_t k, C, D, B, S, A, N, n, P;  // n: rows per chunk; P: parts (ranges of rows)
  int64_t L, NB, CS, RZ, Dx, Dy;      // lanes, lane blocks, C*S, z row stride (padded), x/y rows
  int64_t SC;  // rows per super-chunk (a multiple of n): the saved z's layout block, the
               // backward's unit (its gz stays in L2 between the two phases)
  int64_t row0(int64_t p) const { return p * N / P; }  // part p's first row
  int64_t zsize() const { return N * k * NB * RZ; }
};

Dims dims(const at::Tensor& x, const at::Tensor& r, const at::Tensor& l, int64_t chunk,
          int64_t super, int64_t parts) {
  Dims m;
  m.k = r.size(0), m.C = r.size(1), m.D = r.size(2), m.B = r.size(3), m.S = r.size(4);
  m.A = l.size(4), m.N = x.size(0), m.n = std::max<int64_t>(1, chunk);
  m.P = std::max<int64_t>(1, std::min(parts, m.N));
  m.L = 64 / x.element_size(), m.NB = m.B / m.L, m.CS = m.C * m.S, m.RZ = (m.CS + 1) * m.L;
  m.Dx = m.k * m.C * m.D, m.Dy = m.k * m.A * m.B;
  m.SC = std::max<int64_t>(1, super / m.n) * m.n;
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

// R (k, C, D, B, S) -> (k, C, S, D, B) (forward; R itself when S = 1) or (k, C, S, B, D) (gx)
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
        for (int64_t si = 0; si < m.S; ++si)
          for (int64_t d = 0; d < m.D; ++d)
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

// Forward, per part (a range of rows, one thread), block k and super-chunk of rows (64 at
// D = 4096), in two phases, each of which streams one core (1 MB at D = 4096, from L3) past the
// super-chunk's rows in chunks (32):
//   1. z = x R, channel by channel (R: 16 KB per channel), into the saved z (non-temporal
//      stores; regular stores into a scratch that stays in cache ran this phase 3x slower).
//   2. y = z L, lane block by lane block (L: 256 KB per block), reading z back.
template <typename T>
void forward_impl(const at::Tensor& x, const at::Tensor& r, const at::Tensor& l, const Dims& m,
                  at::Tensor& y, at::Tensor& z) {
  Clock clock;
  const at::Tensor rp = pack_r<T>(r, m, true), lf = pack_l<T>(l, m, true);
  clock.lap(kPack);
  const T* X = x.data_ptr<T>();
  const T* Rp = rp.data_ptr<T>();
  const T* Lf = lf.data_ptr<T>();
  T* Y = y.data_ptr<T>();
  T* Z = z.data_ptr<T>();
  const bool nty = aligned64(Y), ntz = aligned64(Z);
  const int64_t KC = std::max<int64_t>(8, 24 * 1024 / (HJ * 64));  // K block of stage 2
  at::parallel_for(0, m.P, 1, [&](int64_t p0, int64_t p1) {
    Clock ck;
    Scratch<T> ys(m.CS > KC ? m.n * m.A * m.L : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t R0 = m.row0(p), Np = m.row0(p + 1) - R0;
      for (int64_t kk = 0; kk < m.k; ++kk)
        for (int64_t s0 = 0; s0 < Np; s0 += m.SC) {
          const int64_t ns = std::min(m.SC, Np - s0);
          T* zp = Z + ((R0 * m.k + kk * Np) + s0) * m.NB * m.RZ;  // saved: (lane block, row, RZ)
          for (int64_t r0 = 0; r0 < ns; r0 += m.n) {  // z[n, c, s, :] = x[n, c, :] R[c, :, s, :]
            const int64_t nr = std::min(m.n, ns - r0);
            const T* xr = X + (R0 + s0 + r0) * m.Dx + kk * m.C * m.D;
            for (int64_t c = 0; c < m.C; ++c)
              for (int64_t s = 0; s < m.S; ++s) {
                BOp<T> o{xr + c * m.D, m.Dx, 1, Rp + ((kk * m.C + c) * m.S + s) * m.D * m.B, m.B,
                         m.L, zp + r0 * m.RZ + (c * m.S + s) * m.L, m.RZ, ns * m.RZ, ntz};
                bgemm(o, nr, m.NB, m.D, false);
              }
          }
          fence();
          ck.lap(kZ);
          for (int64_t bv = 0; bv < m.NB; ++bv) {  // y[n, a, b] = sum_cs z[n, cs, b] L[cs, a, b]
            const T* Lk = Lf + (kk * m.NB + bv) * m.CS * m.A * m.L;
            for (int64_t r0 = 0; r0 < ns; r0 += m.n) {
              const int64_t nr = std::min(m.n, ns - r0);
              const T* zr = zp + (bv * ns + r0) * m.RZ;
              T* yr = Y + (R0 + s0 + r0) * m.Dy + kk * m.A * m.B + bv * m.L;
              if (m.CS <= KC) {
                HOp<T> o{zr, m.RZ, m.L, Lk, 0, 0, true, yr, m.Dy, m.B, nty};
                hgemm(o, nr, m.A, m.CS, false);
                continue;
              }
              // K = C*S in blocks of KC (the packed panels' K x HJ block stays in L1), summed in
              // a cache-resident scratch, then streamed to y
              for (int64_t k0 = 0; k0 < m.CS; k0 += KC) {
                HOp<T> o{zr + k0 * m.L, m.RZ, m.L, Lk, 0, 0, true, ys.data(), m.A * m.L, m.L,
                         false, m.CS, k0};
                hgemm(o, nr, m.A, std::min(KC, m.CS - k0), k0 > 0);
              }
              for (int64_t i = 0; i < nr; ++i)
                for (int64_t a = 0; a < m.A; ++a)
                  Vec<T>::store(yr + i * m.Dy + a * m.B,
                                Vec<T>::load(ys.data() + (i * m.A + a) * m.L), nty);
            }
          }
          ck.lap(kY);
        }
    }
    fence();
  });
}

// Backward, per part, block k and super-chunk of rows (SC: 64 at D = 4096), in two phases:
//   H. lane block by lane block: gy packed (lane block, row, a, lane); gL += z^T gy; gz = gy L
//      into a scratch laid out ((c, s), row, b) that stays in L2.
//   B. channel by channel: gR += x^T gz; gx = gz R^T (non-temporal stores).
// The cores and the part's partial weight gradients are re-read per super-chunk, from L3 (in
// one process, interleaved: super-chunks of 1 MB of gz ran faster than 2, 4, 8, 32 MB ones).
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
  const bool ntx = need_x && aligned64(GX);
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    Clock ck;
    const int64_t sc = std::min(m.SC, m.row0(p1) - m.row0(p0));  // rows of a super-chunk, at most
    Scratch<T> gyc(m.NB * sc * RA), gzs(need_z ? m.CS * sc * m.B : 0);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t R0 = m.row0(p), Np = m.row0(p + 1) - R0;
      T* GL = need_l ? glp.data_ptr<T>() + p * glsize : nullptr;
      T* GR = need_r ? grp.data_ptr<T>() + p * grsize : nullptr;
      for (int64_t kk = 0; kk < m.k; ++kk)
        for (int64_t s0 = 0; s0 < Np; s0 += m.SC) {
          const int64_t ns = std::min(m.SC, Np - s0);
          const T* zp = Z + ((R0 * m.k + kk * Np) + s0) * m.NB * m.RZ;  // (lane block, row, RZ)
          const T* gyr = GY + (R0 + s0) * m.Dy + kk * m.A * m.B;
          const T* xr = X + (R0 + s0) * m.Dx + kk * m.C * m.D;
          T* gzp = gzs.data();  // ((c, s), row, b)
          for (int64_t i = 0; i < ns; ++i)  // gy[n, a, b] -> gyc[lane block][n][a][lane]
            for (int64_t a = 0; a < m.A; ++a)
              for (int64_t bv = 0; bv < m.NB; ++bv)
                std::memcpy(gyc.data() + (bv * sc + i) * RA + a * m.L,
                            gyr + i * m.Dy + a * m.B + bv * m.L, 64);
          ck.lap(kGradIn);
          for (int64_t bv = 0; bv < m.NB; ++bv) {  // phase H
            const T* g = gyc.data() + bv * sc * RA;
            if (need_l) {  // gL[cs, a, b] += sum_n z[n, cs, b] gy[n, a, b]
              HOp<T> o{zp + bv * ns * m.RZ, m.L, m.RZ, g, RA, m.L, false,
                       GL + (kk * m.NB + bv) * m.CS * m.A * m.L, m.A * m.L, m.L, false};
              hgemm(o, m.CS, m.A, ns, true);
              ck.lap(kGL);
            }
            if (need_z) {  // gz[n, cs, b] = sum_a gy[n, a, b] L[cs, a, b]
              HOp<T> o{g, RA, m.L, Lb + (kk * m.NB + bv) * m.CS * m.A * m.L, 0, 0, true,
                       gzp + bv * m.L, m.B, ns * m.B, false};
              hgemm(o, ns, m.CS, m.A, false);
              ck.lap(kGZ);
            }
          }
          for (int64_t c = 0; c < m.C && need_z; ++c) {  // phase B
            if (need_r) {  // gR[c, d, s, :] += sum_n x[n, c, d] gz[n, c, s, :]
              for (int64_t s = 0; s < m.S; ++s) {
                BOp<T> o{xr + c * m.D, 1, m.Dx, gzp + (c * m.S + s) * ns * m.B, m.B, m.L,
                         GR + (kk * m.C + c) * m.D * m.S * m.B + s * m.B, m.S * m.B, m.L, false};
                bgemm(o, m.D, m.NB, ns, true);
              }
              ck.lap(kGR);
            }
            if (need_x) {  // gx[n, c, :] = sum_{s, b} gz[n, c, s, b] R[c, :, b, s]
              for (int64_t s = 0; s < m.S; ++s) {
                BOp<T> o{gzp + (c * m.S + s) * ns * m.B, m.B, 1,
                         Rt + ((kk * m.C + c) * m.S + s) * m.B * m.D, m.D, m.L,
                         GX + (R0 + s0) * m.Dx + (kk * m.C + c) * m.D, m.Dx, m.L,
                         ntx && s == m.S - 1};
                bgemm(o, ns, m.D / m.L, m.B, s > 0);
              }
              ck.lap(kGX);
            }
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
                                               const at::Tensor& l, int64_t chunk,
                                               int64_t super, int64_t parts, bool save) {
  const Dims m = dims(x, r, l, chunk, super, parts);
  at::Tensor y = at::empty({m.N, m.Dy}, x.options());
  at::Tensor z = at::empty({m.zsize()}, x.options());
  if (m.N > 0) {
    if (x.scalar_type() == at::kFloat)
      forward_impl<float>(x, r, l, m, y, z);
    else if (x.scalar_type() == at::kDouble)
      forward_impl<double>(x, r, l, m, y, z);
    else
      TORCH_CHECK(false, "btt_forward supports float32 and float64, got ", x.scalar_type());
  }
  return {y, save ? z : at::empty({0}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> btt_backward(
    const at::Tensor& gy, const at::Tensor& x, const at::Tensor& z, const at::Tensor& r,
    const at::Tensor& l, int64_t chunk, int64_t super, int64_t parts, bool need_x, bool need_r,
    bool need_l) {
  const Dims m = dims(x, r, l, chunk, super, parts);
  TORCH_CHECK(gy.is_contiguous() && gy.size(0) == m.N && gy.size(1) == m.Dy &&
                  gy.scalar_type() == x.scalar_type() && z.numel() == m.zsize(),
              "btt_backward: grad (N, k*A*B) contiguous and the z btt_forward saved");
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

// GFLOP/s of the two register tiles (broadcast 6 x 4, Hadamard 4 x 6; float32, inner size 64)
// on operands in L1, one thread: the ceiling the GEMM phases approach (for benchmarks)
std::vector<double> btt_tile_peak() {
  constexpr int L = Vec<float>::L, K = 64, REPS = 20000;
  Scratch<float> a(K * 64), b(K * HJ * L), c(BM * BV * L);
  for (int64_t i = 0; i < K * 64; ++i) a.data()[i] = 1e-3f;
  for (int64_t i = 0; i < K * HJ * L; ++i) b.data()[i] = 1e-3f;
  for (int64_t i = 0; i < BM * BV * L; ++i) c.data()[i] = 0.f;
  const BOp<float> bo{a.data(), K, 1, b.data(), BV * L, L, c.data(), BV * L, L, false};
  const HOp<float> ho{a.data(), K * L / 4, L, b.data(), HJ * L, L, false, c.data(), HJ * L, L,
                      false};
  auto rate = [&](auto&& tile, int64_t fmas) {
    tile();
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < REPS; ++r) tile();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return 2.0 * fmas * L * K * REPS / s * 1e-9;
  };
  return {rate([&] { bkern<float, BM, BV>(bo, K, true); }, BM * BV),
          rate([&] { hkern<float, HM, HJ>(ho, K, true); }, HM * HJ)};
}

}  // namespace

TORCH_LIBRARY(mlbtc_btt, m) {
  m.def("btt_forward(Tensor x, Tensor r, Tensor l, int chunk, int super, int parts, bool save) "
        "-> (Tensor, Tensor)");
  m.def("btt_backward(Tensor grad_y, Tensor x, Tensor z, Tensor r, Tensor l, int chunk, "
        "int super, int parts, bool need_x, bool need_r, bool need_l) -> (Tensor, Tensor, Tensor)");
  m.def("btt_stats(bool reset) -> float[]", &btt_stats);
  m.def("btt_tile_peak() -> float[]", &btt_tile_peak);
}

TORCH_LIBRARY_IMPL(mlbtc_btt, CPU, m) {
  m.impl("btt_forward", &btt_forward);
  m.impl("btt_backward", &btt_backward);
}

// Fused CPU kernel: one batched attention rectangle at its own widths (attention_cpu.py).
//
// q, k: (B, H, N, Lq|Lk, E), v: (B, H, N, Lk, Ev) (N blocks per head); any strides with unit
// stride on the last dim, so the region views of attention_kernels (rows of blocks, prefix
// features) need no copy. Flash style:
// tiles of BQ queries x BK keys, scores in a cache-sized buffer, online softmax, P V accumulated
// into a tile accumulator; nothing T x T. The rectangle is computed whole (a causal rectangle is
// masked, not skipped: attention_regions charges the unfused path the whole rectangle).
//
// forward: merges the rectangle's (output, log-sum-exp) into out (B, H, N, Lq, Ev) and
//   lse (B, H, N, Lq) in place (first: writes them), i.e. attention_kernels.merge_into fused.
// backward: with the merged out and lse of the query rows, this rectangle's share of dQ, dK, dV,
//   written (first) or added into dq, dk, dv (strided views of the full gradients).
//
// GEMMs go to the BLAS torch links (sgemm_/dgemm_, MKL on x86 wheels), small ones to plain loops.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
}

namespace {

constexpr int64_t BQ = 256;  // query rows per tile
constexpr int64_t BK = 512;  // keys per tile
constexpr int64_t SMALL = 32 * 32 * 32;  // below this many multiply-adds: plain loops

inline void blas(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
inline void blas(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

// Vectors of B bytes (GCC/Clang vector extension: 64 = zmm with AVX-512, two ymm with AVX2):
// gcc does not vectorize the small loops below on its own (it unrolled them to scalar FMAs).
template <typename T, int B = 64>
struct Vec {
  typedef T type __attribute__((vector_size(B)));
  static constexpr int lanes = B / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, B);
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, B); }
};

// C[r, 0..W) += alpha sum_p A(r, p) B[p, 0..W) for R rows r at once, A(r, p) = a[r * ar + p * ap]:
// R x W/lanes accumulators stay in vector registers over p (B's vectors loaded once per p for
// all R rows; R independent FMA chains instead of one). W * sizeof(T) is a multiple of 16 bytes.
template <typename T, int W, int R>
inline void micro(int64_t K, const T* a, int64_t ar, int64_t ap, T alpha, const T* B, int64_t ldb,
                  T* C, int64_t ldc) {
  constexpr int bytes = W * (int)sizeof(T) >= 64 ? 64 : W * (int)sizeof(T);
  using V = Vec<T, bytes>;
  constexpr int L = V::lanes, NV = W / L;
  typename V::type acc[R][NV] = {};
  for (int64_t p = 0; p < K; ++p) {
    const T* b = B + p * ldb;
    typename V::type bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * L);
    for (int r = 0; r < R; ++r) {
      const T ar_p = a[r * ar + p * ap];
      for (int v = 0; v < NV; ++v) acc[r][v] += bv[v] * ar_p;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      T* c = C + r * ldc + v * L;
      V::store(c, V::load(c) + acc[r][v] * alpha);
    }
}

// C[0..M, 0..W) += alpha A B for one column block of width W: rows four at a time.
template <typename T, int W>
inline void micro_rows(int64_t M, int64_t K, const T* a, int64_t ar, int64_t ap, T alpha,
                       const T* B, int64_t ldb, T* C, int64_t ldc) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) micro<T, W, 4>(K, a + i * ar, ar, ap, alpha, B, ldb, C + i * ldc, ldc);
  for (; i < M; ++i) micro<T, W, 1>(K, a + i * ar, ar, ap, alpha, B, ldb, C + i * ldc, ldc);
}

#ifdef __AVX512F__
// The 16 lane sums of a[0..16) as one vector (lane i = sum of a[i]): a transpose-and-add tree of
// two-source permutes, 15 adds for 16 sums instead of 16 separate horizontal reductions.
inline __m512 sum16(__m512* a) {
  const __m512i l1a = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
  const __m512i l1b = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30,
                                        31);
  const __m512i l2a = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27);
  const __m512i l2b = _mm512_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30,
                                        31);
  const __m512i l3a = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29);
  const __m512i l3b = _mm512_setr_epi32(2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30,
                                        31);
  const __m512i l4a = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i l4b = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                                        31);
  auto pair = [](__m512 x, __m512 y, __m512i lo, __m512i hi) {
    return _mm512_add_ps(_mm512_permutex2var_ps(x, lo, y), _mm512_permutex2var_ps(x, hi, y));
  };
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k) b[k] = pair(a[2 * k], a[2 * k + 1], l1a, l1b);
  for (int k = 0; k < 4; ++k) c[k] = pair(b[2 * k], b[2 * k + 1], l2a, l2b);
  for (int k = 0; k < 2; ++k) d[k] = pair(c[2 * k], c[2 * k + 1], l3a, l3b);
  return pair(d[0], d[1], l4a, l4b);
}

// Small float C (M x N) += alpha A B^T with A (M x K) and B (N x K) row-major: 4 x 4 blocks of
// dot products along K (masked loads for K's tail), no transposed copy of B. Edge blocks read a
// repeated last row and drop its results.
inline void gemm_nt_dots(int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                         int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc) {
  alignas(64) float out[16];
  for (int64_t i = 0; i < M; i += 4) {
    const float* a[4];
    for (int r = 0; r < 4; ++r) a[r] = A + std::min<int64_t>(i + r, M - 1) * lda;
    for (int64_t j = 0; j < N; j += 4) {
      const float* b[4];
      for (int c = 0; c < 4; ++c) b[c] = B + std::min<int64_t>(j + c, N - 1) * ldb;
      __m512 acc[16];
      for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t p = 0; p < K; p += 16) {
        const __mmask16 m = K - p >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - p)) - 1);
        __m512 av[4], bv[4];
        for (int r = 0; r < 4; ++r) av[r] = _mm512_maskz_loadu_ps(m, a[r] + p);
        for (int c = 0; c < 4; ++c) bv[c] = _mm512_maskz_loadu_ps(m, b[c] + p);
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) acc[4 * r + c] = _mm512_fmadd_ps(av[r], bv[c], acc[4 * r + c]);
      }
      _mm512_store_ps(out, _mm512_mul_ps(sum16(acc), _mm512_set1_ps(alpha)));
      for (int r = 0; r < 4 && i + r < M; ++r)
        for (int c = 0; c < 4 && j + c < N; ++c) C[(i + r) * ldc + j + c] += out[4 * r + c];
    }
  }
}
#endif

// Row-major C (M x N, ldc) = alpha op(A) op(B) + beta C, op by ta/tb ('N' or 'T'); A is M x K
// (or K x M when 'T'), B is K x N (or N x K). beta is 0 or 1.
template <typename T>
void gemm(char ta, char tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  TORCH_CHECK(ta == 'N' || tb == 'N', "gemm: op(A) op(B) with both transposed is not used");
  if (K > 0 && M * N * K >= SMALL) {
    // row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T
    blas(tb, ta, (int)N, (int)M, (int)K, alpha, B, (int)std::max<int64_t>(ldb, 1), A,
         (int)std::max<int64_t>(lda, 1), beta, C, (int)std::max<int64_t>(ldc, 1));
    return;
  }
  if (beta == T(0))
    for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, T(0));
  if (K == 0) return;
  // Small: C += alpha sum_p A(:, p) B[p, :], vectors along C's rows. B given as N x K ('T': the
  // scores Q K^T and dO V^T of a small rectangle): in float with AVX-512, blocks of dot products
  // summed by one permute tree (gemm_nt_dots); else B is first transposed into a K x N buffer
  // (one horizontal sum per output would cost more than the FMAs at 8-32 keys). Measured, one
  // thread, interleaved, 8 x 8 rectangles at q.k width 56: 15 -> 10 ns per pair forward, 33 -> 19
  // backward (with the register-blocked axpy rows above, against one row and dot4 sums).
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, float>)
    if (tb == 'T') return gemm_nt_dots(M, N, K, alpha, A, lda, B, ldb, C, ldc);
#endif
  if (tb == 'T') {
    thread_local std::vector<T> bt;  // (here only: every access is a __tls_get_addr call)
    bt.resize(K * N);
    for (int64_t p = 0; p < K; ++p)  // (contiguous stores; the N <= 32 rows read stay in L1)
      for (int64_t j = 0; j < N; ++j) bt[p * N + j] = B[j * ldb + p];
    B = bt.data();
    ldb = N;
  }
  const int64_t ar = ta == 'N' ? lda : 1, ap = ta == 'N' ? 1 : lda;
  int64_t j = 0;
  if constexpr (sizeof(T) == 4)  // (4 x 8 zmm of doubles would not fit the registers)
    for (; j + 64 <= N; j += 64)
      micro_rows<T, 64>(M, K, A, ar, ap, alpha, B + j, ldb, C + j, ldc);
  for (; j + 32 <= N; j += 32) micro_rows<T, 32>(M, K, A, ar, ap, alpha, B + j, ldb, C + j, ldc);
  for (; j + 16 <= N; j += 16) micro_rows<T, 16>(M, K, A, ar, ap, alpha, B + j, ldb, C + j, ldc);
  for (; j + 8 <= N; j += 8) micro_rows<T, 8>(M, K, A, ar, ap, alpha, B + j, ldb, C + j, ldc);
  for (; j + 4 <= N; j += 4) micro_rows<T, 4>(M, K, A, ar, ap, alpha, B + j, ldb, C + j, ldc);
  for (; j < N; ++j)
    for (int64_t i = 0; i < M; ++i) {
      T acc = 0;
      for (int64_t p = 0; p < K; ++p) acc += A[i * ar + p * ap] * B[p * ldb + j];
      C[i * ldc + j] += alpha * acc;
    }
}

struct Item {  // batch item m = (b * H + h) * N + n, split once (not per operand)
  int64_t b, h, n;
  Item(int64_t m, int64_t H, int64_t N) : b(m / (N * H)), h((m / N) % H), n(m % N) {}
};

struct View {  // a (B, H, N, L, C) view, unit stride on C
  int64_t H, N, sb, sh, sn, sl;
  template <typename T>
  T* at(T* base, const Item& it, int64_t l) const {
    return base + it.b * sb + it.h * sh + it.n * sn + l * sl;
  }
};

View view(const at::Tensor& t) {  // also (B, H, N, L) for the log-sum-exp
  return {t.size(1), t.size(2), t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse, bool causal, double scale_d, bool first) {
  const int64_t items = q.size(0) * q.size(1) * q.size(2), Lq = q.size(3), E = q.size(4);
  const int64_t Lk = k.size(3), Ev = v.size(4);
  const View vq = view(q), vk = view(k), vv = view(v), vo = view(out), vl = view(lse);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  const int64_t qtiles = (Lq + BQ - 1) / BQ;
  const T ninf = std::numeric_limits<T>::lowest();  // finite: built with -ffast-math
  at::parallel_for(0, items * qtiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t bq = std::min(BQ, Lq);
    std::vector<T> s(bq * std::min(BK, Lk)), acc(bq * Ev), mx(bq), sum(bq), alpha(bq);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i0 = (w % qtiles) * BQ;
      const int64_t nq = std::min(BQ, Lq - i0);
      const Item m(w / qtiles, vq.H, vq.N);
      const T* Q = vq.at(qp, m, i0);
      const T* K0 = vk.at(kp, m, 0);
      const T* V0 = vv.at(vp, m, 0);
      T* O = vo.at(op, m, i0);
      T* Lse = vl.at(lp, m, i0);
      std::fill(mx.begin(), mx.begin() + nq, ninf);
      std::fill(sum.begin(), sum.begin() + nq, T(0));
      std::fill(acc.begin(), acc.begin() + nq * Ev, T(0));
      for (int64_t j0 = 0; j0 < Lk; j0 += BK) {
        const int64_t nk = std::min(BK, Lk - j0);
        const T* Kt = K0 + j0 * vk.sl;
        gemm<T>('N', 'T', nq, nk, E, scale, Q, vq.sl, Kt, vk.sl, T(0), s.data(), nk);
        // online softmax: per-row max and shift, then one exp over the whole tile (vectorized
        // also when rows are short), then per-row sums and rescales of the accumulator
        // online softmax, one pass per row after its max: masked entries give exp(0), then 0
        // (the vector exp takes a slow scalar path for huge negative inputs)
        for (int64_t i = 0; i < nq; ++i) {
          T* row = s.data() + i * nk;
          const int64_t lim = causal ? std::clamp<int64_t>(i0 + i + 1 - j0, 0, nk) : nk;
          T rmax = mx[i];
          for (int64_t j = 0; j < lim; ++j) rmax = std::max(rmax, row[j]);
          alpha[i] = rmax == ninf || mx[i] == ninf ? T(rmax == ninf) : std::exp(mx[i] - rmax);
          mx[i] = rmax;
          T rs = 0;
          for (int64_t j = 0; j < nk; ++j) {
            const T e = std::exp(j < lim ? row[j] - rmax : T(0));
            row[j] = j < lim ? e : T(0);
            rs += row[j];
          }
          sum[i] = sum[i] * alpha[i] + rs;
          if (j0 > 0 && alpha[i] != T(1)) {
            T* a = acc.data() + i * Ev;
            for (int64_t e = 0; e < Ev; ++e) a[e] *= alpha[i];
          }
        }
        gemm<T>('N', 'N', nq, Ev, nk, T(1), s.data(), nk, V0 + j0 * vv.sl, vv.sl, T(1),
                acc.data(), Ev);
      }
      for (int64_t i = 0; i < nq; ++i) {
        T* o = O + i * vo.sl;
        T* l = Lse + i * vl.sl;
        const T* a = acc.data() + i * Ev;
        const T lr = mx[i] + std::log(sum[i]);
        if (first) {
          const T inv = T(1) / sum[i];
          for (int64_t e = 0; e < Ev; ++e) o[e] = a[e] * inv;
          *l = lr;
        } else {  // exact merge over disjoint keys: new = logaddexp(l, lr)
          const T hi = std::max(*l, lr);
          const T nw = hi + std::log(std::exp(*l - hi) + std::exp(lr - hi));
          const T keep = std::exp(*l - nw), add = std::exp(lr - nw) / sum[i];
          for (int64_t e = 0; e < Ev; ++e) o[e] = o[e] * keep + a[e] * add;
          *l = nw;
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, bool causal, double scale_d,
                   bool first) {
  const int64_t items = q.size(0) * q.size(1) * q.size(2), Lq = q.size(3), E = q.size(4);
  const int64_t Lk = k.size(3), Ev = v.size(4);
  const View vq = view(q), vk = view(k), vv = view(v), vo = view(out), vg = view(go);
  const View vdq = view(dq), vdk = view(dk), vdv = view(dv), vl = view(lse);
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const T *op = out.data_ptr<T>(), *gp = go.data_ptr<T>(), *lp = lse.data_ptr<T>();
  T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
  const T scale = static_cast<T>(scale_d);
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t bk = std::min(BK, Lk);
    const int64_t bq = std::min(BQ, Lq);
    std::vector<T> p(bq * bk), ds(bq * bk), delta(bq);
    for (int64_t w = begin; w < end; ++w) {
      const Item m(w, vq.H, vq.N);
      T* DQ = vdq.at(dqp, m, 0);
      T* DK = vdk.at(dkp, m, 0);
      T* DV = vdv.at(dvp, m, 0);
      const T *Q0 = vq.at(qp, m, 0), *G0 = vg.at(gp, m, 0), *O0 = vo.at(op, m, 0);
      const T *K0 = vk.at(kp, m, 0), *V0 = vv.at(vp, m, 0), *L0 = vl.at(lp, m, 0);
      for (int64_t i0 = 0; i0 < Lq; i0 += BQ) {
        const int64_t nq = std::min(BQ, Lq - i0);
        const T* Q = Q0 + i0 * vq.sl;
        const T* GO = G0 + i0 * vg.sl;
        for (int64_t i = 0; i < nq; ++i) {
          const T* g = GO + i * vg.sl;
          const T* o = O0 + (i0 + i) * vo.sl;
          T d = 0;
          for (int64_t e = 0; e < Ev; ++e) d += g[e] * o[e];
          delta[i] = d;
        }
        for (int64_t j0 = 0; j0 < Lk; j0 += BK) {
          const int64_t nk = std::min(BK, Lk - j0);
          const T* Kt = K0 + j0 * vk.sl;
          const T* Vt = V0 + j0 * vv.sl;
          gemm<T>('N', 'T', nq, nk, E, scale, Q, vq.sl, Kt, vk.sl, T(0), p.data(), nk);
          for (int64_t i = 0; i < nq; ++i) {  // P = exp(S - lse): this rectangle's share
            T* row = p.data() + i * nk;
            const T l = L0[(i0 + i) * vl.sl];
            const int64_t lim = causal ? std::clamp<int64_t>(i0 + i + 1 - j0, 0, nk) : nk;
            for (int64_t j = 0; j < lim; ++j) row[j] -= l;
            std::fill(row + lim, row + nk, T(0));  // (no huge negative exp inputs, see forward)
          }
          T* pp = p.data();
          for (int64_t t = 0; t < nq * nk; ++t) pp[t] = std::exp(pp[t]);  // one vectorized pass
          if (causal)
            for (int64_t i = 0; i < nq; ++i)
              std::fill(pp + i * nk + std::clamp<int64_t>(i0 + i + 1 - j0, 0, nk), pp + (i + 1) * nk,
                        T(0));
          // dV += P^T dO;  dP = dO V^T;  dS = P (dP - delta) scale;  dQ += dS K;  dK += dS^T Q
          // first: the first q tile writes dK, dV rows and the first kv tile dQ rows (beta 0)
          const T bkv = first && i0 == 0 ? T(0) : T(1), bq_ = first && j0 == 0 ? T(0) : T(1);
          gemm<T>('T', 'N', nk, Ev, nq, T(1), p.data(), nk, GO, vg.sl, bkv,
                  DV + j0 * vdv.sl, vdv.sl);
          gemm<T>('N', 'T', nq, nk, Ev, T(1), GO, vg.sl, Vt, vv.sl, T(0), ds.data(), nk);
          for (int64_t i = 0; i < nq; ++i) {
            T* d = ds.data() + i * nk;
            const T* pr = p.data() + i * nk;
            for (int64_t j = 0; j < nk; ++j) d[j] = pr[j] * (d[j] - delta[i]) * scale;
          }
          gemm<T>('N', 'N', nq, E, nk, T(1), ds.data(), nk, Kt, vk.sl, bq_,
                  DQ + i0 * vdq.sl, vdq.sl);
          gemm<T>('T', 'N', nk, E, nq, T(1), ds.data(), nk, Q, vq.sl, bkv,
                  DK + j0 * vdk.sl, vdk.sl);
        }
      }
    }
  });
}

void check(const at::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim());
  TORCH_CHECK(dims < 5 || t.size(4) <= 1 || t.stride(4) == 1, name,
              " needs unit stride on its last dim");
}

void attend_merge(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor out,
                  at::Tensor lse, bool causal, double scale, bool first) {
  check(q, "q", 5); check(k, "k", 5); check(v, "v", 5); check(out, "out", 5); check(lse, "lse", 4);
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
              q.scalar_type() == out.scalar_type() && q.scalar_type() == lse.scalar_type(),
              "q, k, v, out, lse must share one dtype");
  TORCH_CHECK(!causal || q.size(3) == k.size(3), "causal needs as many queries as keys");
  if (q.scalar_type() == at::kFloat)
    forward_impl<float>(q, k, v, out, lse, causal, scale, first);
  else if (q.scalar_type() == at::kDouble)
    forward_impl<double>(q, k, v, out, lse, causal, scale, first);
  else
    TORCH_CHECK(false, "attend_merge supports float32 and float64, got ", q.scalar_type());
}

void attend_backward(const at::Tensor& go, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                     at::Tensor dq, at::Tensor dk, at::Tensor dv, bool causal, double scale,
                     bool first) {
  check(go, "grad_out", 5); check(q, "q", 5); check(k, "k", 5); check(v, "v", 5);
  check(out, "out", 5); check(lse, "lse", 4);
  check(dq, "dq", 5); check(dk, "dk", 5); check(dv, "dv", 5);
  TORCH_CHECK(!causal || q.size(3) == k.size(3), "causal needs as many queries as keys");
  if (q.scalar_type() == at::kFloat)
    backward_impl<float>(go, q, k, v, out, lse, dq, dk, dv, causal, scale, first);
  else if (q.scalar_type() == at::kDouble)
    backward_impl<double>(go, q, k, v, out, lse, dq, dk, dv, causal, scale, first);
  else
    TORCH_CHECK(false, "attend_backward supports float32 and float64, got ", q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(mlbtc, m) {
  m.def("attend_merge(Tensor q, Tensor k, Tensor v, Tensor(a!) out, Tensor(b!) lse, bool causal, "
        "float scale, bool first) -> ()");
  m.def("attend_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, bool causal, float scale, bool first) -> ()");
}

TORCH_LIBRARY_IMPL(mlbtc, CPU, m) {
  m.impl("attend_merge", &attend_merge);
  m.impl("attend_backward", &attend_backward);
}

// Fused GroupNorm(+SiLU) forward and backward on CPU: vectorized with ATen's Vectorized<float>
// (AVX-512 or AVX2 as the build machine supports, see CMakeLists.txt), parallel with at::parallel_for.
//
// Notation: x is (N, C, HW) with G groups of D = C / G channels; a group is L = D * HW elements.
// xhat = (x - mean) * rstd, z = w * xhat + b, y = silu(z) = z * sigmoid(z) (or y = z).
//
// Forward, per (sample, group): sum -> mean, sum of squared deviations -> rstd (two passes, so no
// E[x^2] - E[x]^2 cancellation), then y. The group (e.g. 10 channels x 64x64 fp32 = 160 KiB at
// SD1.5's first level) stays in L2 across the three reads, so x is read from memory once.
//
// Backward. With dz = dy * sigmoid(z) * (1 + z * (1 - sigmoid(z))) (= dy without activation),
// A[n, c] = sum_hw dz and B[n, c] = sum_hw dz * xhat:
//   db[c] = sum_n A[n, c],  dw[c] = sum_n B[n, c],
//   dx = rstd * (w dz - c1 - xhat * c2),  c1 = sum_{c in g} w_c A[n, c] / L,  c2 = sum_{c in g} w_c B[n, c] / L.
// Channels-first: one pass per group computes dz (kept in a per-thread scratch buffer, so the
// exponential is evaluated once per element), A and B; a second pass writes dx.
//
// Channels-last (x stored as (N, HW, C)): the channels of a position are contiguous, so the
// loops vectorize over C and parallelize over positions; per-channel partial sums live in
// per-thread buffers and are combined per group after each pass. The backward recomputes dz in
// its second pass (a full-size scratch would cost what the fused op saves).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <list>
#include <mutex>
#include <type_traits>
#include <vector>

#include "group_norm.h"

namespace refl {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

inline Vec load_full(const float* p) { return Vec::loadu(p); }
inline Vec load_full(const at::BFloat16* p) {
  Vec v;
  at::vec::load_fp32_from_bf16(p, v);
  return v;
}
inline Vec load_full(const at::Half* p) {
  Vec v;
  at::vec::load_fp32_from_fp16(p, v);
  return v;
}
inline void store_full(float* p, const Vec& v) { v.store(p); }
// One float vector to 16-bit floats (round to nearest even), stored as a half-width register.
#if defined(CPU_CAPABILITY_AVX512)
inline void store_full(at::BFloat16* p, const Vec& v) {
#if defined(__AVX512BF16__)  // one instruction (vcvtneps2bf16) instead of ATen's ~6-op rounding sequence
  const __m256bh h = _mm512_cvtneps_pbh(__m512(v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<const __m256i&>(h));
#else
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));
#endif
}
inline void store_full(at::Half* p, const Vec& v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_fp16(__m512(v)));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline void store_full(at::BFloat16* p, const Vec& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_bf16(__m256(v)));
}
inline void store_full(at::Half* p, const Vec& v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), at::vec::cvtfp32_fp16(__m256(v)));
}
#else
template <typename T>
inline void store_full(T* p, const Vec& v) {
  float tmp[kV];
  v.store(tmp);
  for (int64_t i = 0; i < kV; ++i) p[i] = static_cast<T>(tmp[i]);
}
#endif

// Two vectors to 2 * kV consecutive elements. bf16 under AVX2 (no one-instruction conversion):
// one pack and one lane permute for both, where two single stores take one each; measured on
// Zen 3, the SiLU forward's output pass ran 1.1 -> 0.92 ns per element.
template <typename T>
inline void store_pair(T* p, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m256(a), __m256(b)));
    return;
  }
#endif
  store_full(p, a);
  store_full(p + kV, b);
}

// The first n <= kV elements; lanes past n load as 0 and are not stored.
template <typename T>
inline Vec load(const T* p, int64_t n) {
  if (n == kV) return load_full(p);
  float tmp[kV] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return Vec::loadu(tmp);
}

template <typename T>
inline void store(T* p, const Vec& v, int64_t n) {
  if (n == kV) return store_full(p, v);
  float tmp[kV];
  v.store(tmp);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
}

#if defined(CPU_CAPABILITY_AVX512)
inline float hsum(const Vec& v) { return _mm512_reduce_add_ps(__m512(v)); }  // in-register shuffles

// 1 / d for 1 <= d < 2^127: rcp14 (14 bits) and one Newton step, r (2 - d r) (~1 ulp): three cheap
// instructions where a 16-lane divide has a throughput of one per several cycles
inline Vec reciprocal(const Vec& d) {
  const __m512 r = _mm512_rcp14_ps(__m512(d));
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(__m512(d), r, _mm512_set1_ps(2.f)));
}
#elif defined(CPU_CAPABILITY_AVX2)
inline float hsum(const Vec& v) {  // in-register: 8 -> 4 -> 2 -> 1 lanes
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(__m256(v)), _mm256_extractf128_ps(__m256(v), 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// a divide: measured on Zen 3 (AMD EPYC, AVX2), rcp + one Newton step made the SiLU forward ~3%
// slower, as the divider runs beside the FMA pipes the rest of the loop keeps busy
inline Vec reciprocal(const Vec& d) { return Vec(1.f) / d; }
#else
inline float hsum(const Vec& v) {
  float tmp[kV];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kV; ++i) s += tmp[i];
  return s;
}

inline Vec reciprocal(const Vec& d) { return Vec(1.f) / d; }
#endif

// -z is capped at 80 so 1 + exp(-z) stays finite (exp_u20 gives inf near 88.7, and the Newton
// step would turn inf * 0 into NaN); below z = -80 sigmoid is < 2e-35, far under any tolerance
inline Vec sigmoid(const Vec& z) { return reciprocal(Vec(1.f) + at::vec::minimum(z.neg(), Vec(80.f)).exp_u20()); }

// dz from dy and z (z = w * xhat + b)
template <bool SILU>
inline Vec grad_pre_activation(const Vec& dy, const Vec& z) {
  if constexpr (SILU) {
    const Vec s = sigmoid(z);
    return dy * s * (Vec(1.f) + z * (Vec(1.f) - s));
  } else {
    return dy;
  }
}

template <bool SILU>
inline Vec activation(const Vec& z) {
  if constexpr (SILU) return z * sigmoid(z);
  else return z;
}

// Positions per parallel chunk for the channels-last loops: about GRAIN_SIZE elements.
constexpr int64_t kGrain = 32768;  // elements per parallel chunk, as ATen's own kernels use
inline int64_t rows_grain(int64_t C) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)); }

// Row kernels. Each runs whole vectors in its main loop and the remainder (< kV elements) once
// after it, with all state in locals: the compiler keeps it in registers (a shared loop with a
// per-iteration min() and partial loads kept the accumulators on the stack, at ~2x the time).

// -------------------------------------------------------------------------- channels-first rows

template <typename T>
float row_sum(const T* p, int64_t n) {
  Vec a0(0.f), a1(0.f);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    a0 += load_full(p + i);
    a1 += load_full(p + i + kV);
  }
  for (; i + kV <= n; i += kV) a0 += load_full(p + i);
  if (i < n) a1 += load(p + i, n - i);  // lanes past the end load as 0
  return hsum(a0 + a1);
}

template <typename T>
float row_sq_dev(const T* p, int64_t n, float mean) {
  const Vec m(mean);
  Vec a0(0.f), a1(0.f);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    const Vec d0 = load_full(p + i) - m, d1 = load_full(p + i + kV) - m;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
  }
  for (; i + kV <= n; i += kV) {
    const Vec d = load_full(p + i) - m;
    a0 = at::vec::fmadd(d, d, a0);
  }
  if (i < n) {
    const Vec d = Vec::set(Vec(0.f), load(p + i, n - i) - m, n - i);  // lanes past the end are not data
    a1 = at::vec::fmadd(d, d, a1);
  }
  return hsum(a0 + a1);
}

// y = act((x - mean) * scale + shift); (x - mean) first: folding mean into the shift cancels
// when |mean| >> std
template <typename T, bool SILU>
void row_apply(const T* x, T* y, int64_t n, float mean, float scale, float shift) {
  const Vec m(mean), s(scale), b(shift);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV)
    store_pair(y + i, activation<SILU>(at::vec::fmadd(load_full(x + i) - m, s, b)),
               activation<SILU>(at::vec::fmadd(load_full(x + i + kV) - m, s, b)));
  for (; i + kV <= n; i += kV) store_full(y + i, activation<SILU>(at::vec::fmadd(load_full(x + i) - m, s, b)));
  if (i < n) store(y + i, activation<SILU>(at::vec::fmadd(load(x + i, n - i) - m, s, b)), n - i);
}

// dz of the row into dz_out (with SiLU; without, dz is dy itself); returns (sum dz, sum dz * xhat)
template <typename T, bool SILU>
std::pair<float, float> row_grad_sums(const T* x, const T* dy, float* dz_out, int64_t n, float mean, float rstd,
                                      float weight, float bias) {
  const Vec m(mean), r(rstd), w(weight), b(bias);
  Vec acc_a(0.f), acc_b(0.f), acc_a2(0.f), acc_b2(0.f);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {  // two independent chains (the exponential's latency)
    const Vec xa = (load_full(x + i) - m) * r, xb = (load_full(x + i + kV) - m) * r;
    const Vec da = grad_pre_activation<SILU>(load_full(dy + i), at::vec::fmadd(xa, w, b));
    const Vec db = grad_pre_activation<SILU>(load_full(dy + i + kV), at::vec::fmadd(xb, w, b));
    if constexpr (SILU) {
      da.store(dz_out + i);
      db.store(dz_out + i + kV);
    }
    acc_a += da;
    acc_b = at::vec::fmadd(da, xa, acc_b);
    acc_a2 += db;
    acc_b2 = at::vec::fmadd(db, xb, acc_b2);
  }
  acc_a += acc_a2;
  acc_b += acc_b2;
  for (; i + kV <= n; i += kV) {
    const Vec xh = (load_full(x + i) - m) * r;
    const Vec dz = grad_pre_activation<SILU>(load_full(dy + i), at::vec::fmadd(xh, w, b));
    if constexpr (SILU) dz.store(dz_out + i);
    acc_a += dz;
    acc_b = at::vec::fmadd(dz, xh, acc_b);
  }
  if (i < n) {  // lanes past the end have dy = 0, hence dz = 0: they add nothing
    const Vec xh = (load(x + i, n - i) - m) * r;
    const Vec dz = grad_pre_activation<SILU>(load(dy + i, n - i), at::vec::fmadd(xh, w, b));
    if constexpr (SILU) dz.store(dz_out + i, static_cast<int>(n - i));
    acc_a += dz;
    acc_b = at::vec::fmadd(dz, xh, acc_b);
  }
  return {hsum(acc_a), hsum(acc_b)};
}

// dx = r (w dz - c1 - xhat c2), in this order: with one element per group w dz == c1 and
// xhat == 0, so dx is exactly 0 (a folded r w dz - r c1 would leave rounding times rstd)
// dz is the float scratch (with SiLU) or dy itself (without)
template <typename T, typename DZ>
void row_dx(const T* x, const DZ* dz, T* dx, int64_t n, float mean, float rstd, float weight, float c1, float c2) {
  const Vec m(mean), r(rstd), w(weight), c1v(c1), c2v(c2);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    const Vec xa = (load_full(x + i) - m) * r, xb = (load_full(x + i + kV) - m) * r;
    store_pair(dx + i, r * (w * load_full(dz + i) - c1v - xa * c2v), r * (w * load_full(dz + i + kV) - c1v - xb * c2v));
  }
  for (; i + kV <= n; i += kV) {
    const Vec xh = (load_full(x + i) - m) * r;
    store_full(dx + i, r * (w * load_full(dz + i) - c1v - xh * c2v));
  }
  if (i < n) {
    const Vec xh = (load(x + i, n - i) - m) * r;
    store(dx + i, r * (w * load(dz + i, n - i) - c1v - xh * c2v), n - i);
  }
}

template <typename T, bool SILU>
void forward_nchw(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t N, int64_t C,
                  int64_t HW, int64_t G, float eps) {
  const int64_t D = C / G, L = D * HW;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t g = ng % G;
      const T* xg = x + ng * L;
      double s = 0;
      for (int64_t c = 0; c < D; ++c) s += row_sum(xg + c * HW, HW);
      const float m = static_cast<float>(s / static_cast<double>(L));
      double q = 0;
      for (int64_t c = 0; c < D; ++c) q += row_sq_dev(xg + c * HW, HW, m);
      const float r = 1.f / std::sqrt(static_cast<float>(q / static_cast<double>(L)) + eps);
      mean[ng] = m;
      rstd[ng] = r;
      for (int64_t c = 0; c < D; ++c)
        row_apply<T, SILU>(xg + c * HW, y + ng * L + c * HW, HW, m, r * w[g * D + c], b[g * D + c]);
    }
  });
}

template <typename T, bool SILU>
void backward_nchw(const T* dy, const T* x, const float* w, const float* b, const float* mean, const float* rstd,
                   T* dx, float* sum_dz, float* sum_dz_xhat, int64_t N, int64_t C, int64_t HW, int64_t G) {
  const int64_t D = C / G, L = D * HW;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    // with SiLU, this group's dz (the exponential once per element), reused by the dx pass; kept
    // per thread across calls (no page faults per call). Without, the dx pass reads dy.
    thread_local std::vector<float> dz_buf;
    if (SILU && static_cast<int64_t>(dz_buf.size()) < L) dz_buf.resize(L);
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      const float m = mean[ng], r = rstd[ng];
      double c1 = 0, c2 = 0;
      for (int64_t c = 0; c < D; ++c) {
        const int64_t cc = g * D + c, off = ng * L + c * HW;
        const auto [a, bb] = row_grad_sums<T, SILU>(x + off, dy + off, dz_buf.data() + c * HW, HW, m, r, w[cc], b[cc]);
        sum_dz[n * C + cc] = a;
        sum_dz_xhat[n * C + cc] = bb;
        c1 += static_cast<double>(w[cc]) * a;
        c2 += static_cast<double>(w[cc]) * bb;
      }
      const float c1f = static_cast<float>(c1 / static_cast<double>(L));
      const float c2f = static_cast<float>(c2 / static_cast<double>(L));
      for (int64_t c = 0; c < D; ++c) {
        const int64_t off = ng * L + c * HW;
        if constexpr (SILU) row_dx(x + off, dz_buf.data() + c * HW, dx + off, HW, m, r, w[g * D + c], c1f, c2f);
        else row_dx(x + off, dy + off, dx + off, HW, m, r, w[g * D + c], c1f, c2f);
      }
    }
  });
}

// -------------------------------------------------------------------------- channels-last rows
// One position's C channels; per-channel parameters and statistics are (C,) float arrays.

template <typename T>
void nhwc_row_sum(const T* x, float* acc, int64_t C) {
  int64_t c = 0;
  for (; c + kV <= C; c += kV) (Vec::loadu(acc + c) + load_full(x + c)).store(acc + c);
  if (c < C) (Vec::loadu(acc + c, static_cast<int>(C - c)) + load(x + c, C - c)).store(acc + c, static_cast<int>(C - c));
}

template <typename T>
void nhwc_row_sq_dev(const T* x, const float* mean_c, float* acc, int64_t C) {
  int64_t c = 0;
  for (; c + kV <= C; c += kV) {
    const Vec d = load_full(x + c) - Vec::loadu(mean_c + c);
    at::vec::fmadd(d, d, Vec::loadu(acc + c)).store(acc + c);
  }
  if (c < C) {
    const int k = static_cast<int>(C - c);
    const Vec d = load(x + c, k) - Vec::loadu(mean_c + c, k);
    at::vec::fmadd(d, d, Vec::loadu(acc + c, k)).store(acc + c, k);
  }
}

template <typename T, bool SILU>
void nhwc_row_apply(const T* x, T* y, const float* mean_c, const float* scale_c, const float* b, int64_t C) {
  int64_t c = 0;
  auto z_at = [&](int64_t k) {
    return at::vec::fmadd(load_full(x + k) - Vec::loadu(mean_c + k), Vec::loadu(scale_c + k), Vec::loadu(b + k));
  };
  for (; c + 2 * kV <= C; c += 2 * kV) store_pair(y + c, activation<SILU>(z_at(c)), activation<SILU>(z_at(c + kV)));
  for (; c + kV <= C; c += kV) {
    const Vec z = at::vec::fmadd(load_full(x + c) - Vec::loadu(mean_c + c), Vec::loadu(scale_c + c), Vec::loadu(b + c));
    store_full(y + c, activation<SILU>(z));
  }
  if (c < C) {
    const int k = static_cast<int>(C - c);
    const Vec z = at::vec::fmadd(load(x + c, k) - Vec::loadu(mean_c + c, k), Vec::loadu(scale_c + c, k), Vec::loadu(b + c, k));
    store(y + c, activation<SILU>(z), k);
  }
}

template <typename T, bool SILU>
void nhwc_row_grad_sums(const T* x, const T* dy, const float* mean_c, const float* rstd_c, const float* w,
                        const float* b, float* acc_a, float* acc_b, int64_t C) {
  int64_t c = 0;
  for (; c + kV <= C; c += kV) {
    const Vec xh = (load_full(x + c) - Vec::loadu(mean_c + c)) * Vec::loadu(rstd_c + c);
    const Vec dz = grad_pre_activation<SILU>(load_full(dy + c), at::vec::fmadd(xh, Vec::loadu(w + c), Vec::loadu(b + c)));
    (Vec::loadu(acc_a + c) + dz).store(acc_a + c);
    at::vec::fmadd(dz, xh, Vec::loadu(acc_b + c)).store(acc_b + c);
  }
  if (c < C) {
    const int k = static_cast<int>(C - c);
    const Vec xh = (load(x + c, k) - Vec::loadu(mean_c + c, k)) * Vec::loadu(rstd_c + c, k);
    const Vec dz = grad_pre_activation<SILU>(load(dy + c, k), at::vec::fmadd(xh, Vec::loadu(w + c, k), Vec::loadu(b + c, k)));
    (Vec::loadu(acc_a + c, k) + dz).store(acc_a + c, k);
    at::vec::fmadd(dz, xh, Vec::loadu(acc_b + c, k)).store(acc_b + c, k);
  }
}

// dx = r (w dz - c1 - xhat c2), the order of the channels-first row_dx
template <typename T, bool SILU>
void nhwc_row_dx(const T* x, const T* dy, T* dx, const float* mean_c, const float* rstd_c, const float* w,
                 const float* b, const float* c1_c, const float* c2_c, int64_t C) {
  int64_t c = 0;
  auto dx_at = [&](int64_t k) {
    const Vec r = Vec::loadu(rstd_c + k), wv = Vec::loadu(w + k);
    const Vec xh = (load_full(x + k) - Vec::loadu(mean_c + k)) * r;
    const Vec dz = grad_pre_activation<SILU>(load_full(dy + k), at::vec::fmadd(xh, wv, Vec::loadu(b + k)));
    return r * (wv * dz - Vec::loadu(c1_c + k) - xh * Vec::loadu(c2_c + k));
  };
  for (; c + 2 * kV <= C; c += 2 * kV) store_pair(dx + c, dx_at(c), dx_at(c + kV));
  for (; c + kV <= C; c += kV) {
    const Vec r = Vec::loadu(rstd_c + c), wv = Vec::loadu(w + c);
    const Vec xh = (load_full(x + c) - Vec::loadu(mean_c + c)) * r;
    const Vec dz = grad_pre_activation<SILU>(load_full(dy + c), at::vec::fmadd(xh, wv, Vec::loadu(b + c)));
    store_full(dx + c, r * (wv * dz - Vec::loadu(c1_c + c) - xh * Vec::loadu(c2_c + c)));
  }
  if (c < C) {
    const int k = static_cast<int>(C - c);
    const Vec r = Vec::loadu(rstd_c + c, k), wv = Vec::loadu(w + c, k);
    const Vec xh = (load(x + c, k) - Vec::loadu(mean_c + c, k)) * r;
    const Vec dz = grad_pre_activation<SILU>(load(dy + c, k), at::vec::fmadd(xh, wv, Vec::loadu(b + c, k)));
    store(dx + c, r * (wv * dz - Vec::loadu(c1_c + c, k) - xh * Vec::loadu(c2_c + c, k)), k);
  }
}

// part[t * C + c] += f(row) over the rows thread t runs
template <typename RowFn>
void per_thread_channel_sums(std::vector<float>& part, int64_t C, int64_t HW, const RowFn& row_fn) {
  std::fill(part.begin(), part.end(), 0.f);
  at::parallel_for(0, HW, rows_grain(C), [&](int64_t begin, int64_t end) {
    float* acc = part.data() + at::get_thread_num() * C;
    for (int64_t hw = begin; hw < end; ++hw) row_fn(hw, acc);
  });
}

std::vector<double> combine_threads(const std::vector<float>& part, int64_t C) {
  std::vector<double> out(C, 0.0);
  const int64_t T = static_cast<int64_t>(part.size()) / C;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) out[c] += part[t * C + c];
  return out;
}

template <typename T, bool SILU>
void forward_nhwc(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t N, int64_t C,
                  int64_t HW, int64_t G, float eps) {
  const int64_t D = C / G;
  const double L = static_cast<double>(D * HW);
  std::vector<float> part(static_cast<size_t>(at::get_num_threads()) * C);
  std::vector<float> mean_c(C), scale_c(C);
  for (int64_t n = 0; n < N; ++n) {
    const T* xn = x + n * HW * C;
    T* yn = y + n * HW * C;
    per_thread_channel_sums(part, C, HW, [&](int64_t hw, float* acc) { nhwc_row_sum(xn + hw * C, acc, C); });
    auto sums = combine_threads(part, C);
    for (int64_t g = 0; g < G; ++g) {
      double s = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) s += sums[c];
      mean[n * G + g] = static_cast<float>(s / L);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) mean_c[c] = mean[n * G + g];
    }
    per_thread_channel_sums(part, C, HW,
                            [&](int64_t hw, float* acc) { nhwc_row_sq_dev(xn + hw * C, mean_c.data(), acc, C); });
    sums = combine_threads(part, C);
    for (int64_t g = 0; g < G; ++g) {
      double q = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) q += sums[c];
      const float r = 1.f / std::sqrt(static_cast<float>(q / L) + eps);
      rstd[n * G + g] = r;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) scale_c[c] = r * w[c];
    }
    at::parallel_for(0, HW, rows_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t hw = begin; hw < end; ++hw)
        nhwc_row_apply<T, SILU>(xn + hw * C, yn + hw * C, mean_c.data(), scale_c.data(), b, C);
    });
  }
}

template <typename T, bool SILU>
void backward_nhwc(const T* dy, const T* x, const float* w, const float* b, const float* mean, const float* rstd,
                   T* dx, float* sum_dz, float* sum_dz_xhat, int64_t N, int64_t C, int64_t HW, int64_t G) {
  const int64_t D = C / G;
  const double L = static_cast<double>(D * HW);
  const int64_t T_ = at::get_num_threads();
  std::vector<float> part_a(T_ * C), part_b(T_ * C);
  std::vector<float> mean_c(C), rstd_c(C), c1_c(C), c2_c(C);
  for (int64_t n = 0; n < N; ++n) {
    const T* xn = x + n * HW * C;
    const T* dyn = dy + n * HW * C;
    T* dxn = dx + n * HW * C;
    for (int64_t c = 0; c < C; ++c) {
      mean_c[c] = mean[n * G + c / D];
      rstd_c[c] = rstd[n * G + c / D];
    }
    std::fill(part_a.begin(), part_a.end(), 0.f);
    std::fill(part_b.begin(), part_b.end(), 0.f);
    at::parallel_for(0, HW, rows_grain(C), [&](int64_t begin, int64_t end) {
      float* acc_a = part_a.data() + at::get_thread_num() * C;
      float* acc_b = part_b.data() + at::get_thread_num() * C;
      for (int64_t hw = begin; hw < end; ++hw)
        nhwc_row_grad_sums<T, SILU>(xn + hw * C, dyn + hw * C, mean_c.data(), rstd_c.data(), w, b, acc_a, acc_b, C);
    });
    const auto a = combine_threads(part_a, C), bsum = combine_threads(part_b, C);
    for (int64_t g = 0; g < G; ++g) {
      double c1 = 0, c2 = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        sum_dz[n * C + c] = static_cast<float>(a[c]);
        sum_dz_xhat[n * C + c] = static_cast<float>(bsum[c]);
        c1 += w[c] * a[c];
        c2 += w[c] * bsum[c];
      }
      for (int64_t c = g * D; c < (g + 1) * D; ++c) {
        c1_c[c] = static_cast<float>(c1 / L);
        c2_c[c] = static_cast<float>(c2 / L);
      }
    }
    at::parallel_for(0, HW, rows_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t hw = begin; hw < end; ++hw)
        nhwc_row_dx<T, SILU>(xn + hw * C, dyn + hw * C, dxn + hw * C, mean_c.data(), rstd_c.data(), w, b, c1_c.data(),
                             c2_c.data(), C);
    });
  }
}

// -------------------------------------------------------------------------- output cache
// The outputs the ops write (y, dx) of 1 MiB or more come from a cache of blocks freed by earlier
// outputs of the same byte size. A fresh large block from glibc is newly mapped memory (after
// heap trimming or munmap), and every 4 KiB page of it faults on first write and is zeroed by the
// kernel: measured here at ~2000 faults and ~6 ms of kernel time per fp32 batch-2 320x64x64
// forward+backward, half of the call. A training loop asks for the same sizes every step, so
// reuse is the rule (the idea of CUDA's caching allocator). The blocks are mapped with mmap, not
// taken from glibc, so they leave malloc's heap (and the page faults of torch's own ops in the
// same process) as they would be without them. Idle blocks are bounded, least recently freed
// evicted first: $REFL_NATIVE_CACHE_MB (default 256; 0 turns the cache off: outputs come from
// torch's CPU allocator) or refl::output_cache_limit. Idle blocks are not tensors, so they never
// count as live tensor bytes.
constexpr size_t kCacheMinBytes = size_t(1) << 20;  // smaller blocks: glibc's heap reuses them without faults

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& get() {
    static auto* cache = new OutputCache();  // never destroyed: tensors may be freed after static destructors ran
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (n < kCacheMinBytes || max_idle_ == 0) p = MAP_FAILED;  // not cached: torch's allocator below
      else if (auto it = std::find_if(idle_.begin(), idle_.end(), [n](const auto& e) { return e.first == n; });
               it != idle_.end()) {  // the most recently freed block of this size (a few hundred at most)
        p = it->second;
        idle_.erase(it);
        idle_bytes_ -= n;
      }
    }
    if (p == MAP_FAILED) return c10::GetCPUAllocator()->allocate(n);
    if (p == nullptr) {
      p = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);  // page-aligned
      TORCH_CHECK(p != MAP_FAILED, "group_norm_silu: out of memory allocating ", n, " bytes");
    }
    return {p, new Block{p, n}, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // sets the bound on idle bytes (freeing blocks past it) when bytes >= 0; returns the previous bound
  int64_t limit(int64_t bytes) {
    std::vector<std::pair<void*, size_t>> drop;
    int64_t before;
    {
      std::lock_guard<std::mutex> lock(mu_);
      before = static_cast<int64_t>(max_idle_);
      if (bytes < 0) return before;
      max_idle_ = static_cast<size_t>(bytes);
      evict_until(max_idle_, drop);
    }
    for (auto [p, n] : drop) munmap(p, n);
    return before;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(idle_bytes_);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };

  OutputCache() {
    const char* env = std::getenv("REFL_NATIVE_CACHE_MB");
    max_idle_ = (env != nullptr && *env != '\0' ? std::strtoull(env, nullptr, 10) : 256) << 20;
  }

  // Keeps the freed block, evicting the least recently freed ones past the bound: a finished
  // shape's blocks make room for the current one (dropping the new block instead would map and
  // fault a fresh one on every call once the bound is reached).
  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    OutputCache& cache = get();
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(cache.mu_);
      if (block->size <= cache.max_idle_) {
        cache.evict_until(cache.max_idle_ - block->size, drop);
        cache.idle_.emplace_front(block->size, block->ptr);
        cache.idle_bytes_ += block->size;
      } else {
        drop.emplace_back(block->ptr, block->size);
      }
    }
    for (auto [p, n] : drop) munmap(p, n);
    delete block;
  }

  // Idle blocks past `bytes`, least recently freed first, into `drop` (unmapped outside the lock).
  void evict_until(size_t bytes, std::vector<std::pair<void*, size_t>>& drop) {
    while (idle_bytes_ > bytes) {
      const auto [n, p] = idle_.back();
      idle_.pop_back();
      idle_bytes_ -= n;
      drop.emplace_back(p, n);
    }
  }

  std::mutex mu_;
  std::list<std::pair<size_t, void*>> idle_;  // (byte size, block), most recently freed first
  size_t idle_bytes_ = 0;
  size_t max_idle_ = 0;
};

// An output in the layout the kernels write (that of empty_output_like), from the cache.
at::Tensor empty_output_cached(const at::Tensor& x) {
  return at::detail::empty_generic(x.sizes(), &OutputCache::get(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   x.scalar_type(), layout_of(x));
}

int64_t output_cache_limit(int64_t bytes) { return OutputCache::get().limit(bytes); }
int64_t output_cache_idle_bytes() { return OutputCache::get().idle_bytes(); }

// -------------------------------------------------------------------------- ops

template <typename Fn>
void dispatch_dtype(at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kBFloat16: return fn(at::BFloat16{});
    case at::kHalf: return fn(at::Half{});
    default: TORCH_CHECK(false, "group_norm_silu: unsupported dtype ", t);
  }
}

// weight or bias as fp32: the tensor's own data when it is fp32 and contiguous (the usual case),
// else converted into `buf` in a plain loop (at the UNet's small shapes each extra ATen op costs a
// few microseconds, as much as the kernel at 8x8)
const float* as_float(const at::Tensor& t, std::vector<float>& buf) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t.const_data_ptr<float>();
  const int64_t n = t.numel();
  buf.resize(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "group_norm_silu_params", [&] {
    const auto acc = t.accessor<scalar_t, 1>();
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(acc[i]);
  });
  return buf.data();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                           const at::Tensor& bias, int64_t groups, double eps,
                                                           bool silu) {
  check_forward(x_in, weight, bias, groups);
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const int64_t N = x.size(0), C = x.size(1), HW = N * C > 0 ? x.numel() / (N * C) : 0;
  at::Tensor y = empty_output_cached(x);
  auto stats = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({N, groups}, stats), rstd = at::empty({N, groups}, stats);
  if (x.numel() == 0) return {y, mean.fill_(NAN), rstd.fill_(NAN)};
  std::vector<float> w_buf, b_buf;
  const float *w = as_float(weight, w_buf), *b = as_float(bias, b_buf);
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto kernel) {
      kernel(x.const_data_ptr<T>(), w, b, y.mutable_data_ptr<T>(), mean.mutable_data_ptr<float>(),
             rstd.mutable_data_ptr<float>(), N, C, HW, groups, static_cast<float>(eps));
    };
    if (nhwc) silu ? run(forward_nhwc<T, true>) : run(forward_nhwc<T, false>);
    else silu ? run(forward_nchw<T, true>) : run(forward_nchw<T, false>);
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                            const at::Tensor& weight, const at::Tensor& bias,
                                                            const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                            bool silu) {
  check_backward(dy_in, x_in, weight, mean_in, rstd_in);
  const bool nhwc = is_channels_last(x_in);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = (dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type())).contiguous(fmt);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), G = mean.size(1), HW = N * C > 0 ? x.numel() / (N * C) : 0;
  at::Tensor dx = empty_output_cached(x);
  // (N, C) channel sums of dz and dz * xhat: the kernels write every element; zeros when there
  // are no elements to sum
  std::vector<float> sum_dz(N * C, 0.f), sum_dz_xhat(N * C, 0.f);
  if (x.numel() > 0) {
    std::vector<float> w_buf, b_buf;
    const float *w = as_float(weight, w_buf), *b = as_float(bias, b_buf);
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      auto run = [&](auto kernel) {
        kernel(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w, b, mean.const_data_ptr<float>(),
               rstd.const_data_ptr<float>(), dx.mutable_data_ptr<T>(), sum_dz.data(), sum_dz_xhat.data(), N, C, HW, G);
      };
      if (nhwc) silu ? run(backward_nhwc<T, true>) : run(backward_nhwc<T, false>);
      else silu ? run(backward_nchw<T, true>) : run(backward_nchw<T, false>);
    });
  }
  // dweight, dbias: sums over the batch, in a plain loop written in the parameters' dtype (two
  // ATen reductions and casts cost more at the UNet's small shapes than the kernels themselves)
  auto sum_over_batch = [&](const std::vector<float>& per_sample, const at::Tensor& like) {
    at::Tensor out = at::empty({C}, like.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, like.scalar_type(), "group_norm_silu_dparams", [&] {
      scalar_t* p = out.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        float s = 0.f;
        for (int64_t n = 0; n < N; ++n) s += per_sample[n * C + c];
        p[c] = static_cast<scalar_t>(s);
      }
    });
    return out;
  };
  at::Tensor dw = sum_over_batch(sum_dz_xhat, weight), db = sum_over_batch(sum_dz, bias);
  return {dx, dw, db};
}

}  // namespace
}  // namespace refl

// The output cache's controls (no tensor arguments: catch-all kernels, callable from Python as
// torch.ops.refl.output_cache_limit(bytes) -> previous bound, -1 only reads it)
TORCH_LIBRARY_FRAGMENT(refl, m) {
  m.def("output_cache_limit(int bytes) -> int", &refl::output_cache_limit);
  m.def("output_cache_idle_bytes() -> int", &refl::output_cache_idle_bytes);
}

TORCH_LIBRARY_IMPL(refl, CPU, m) {
  m.impl("group_norm_silu", &refl::forward_cpu);
  m.impl("group_norm_silu_backward", &refl::backward_cpu);
}

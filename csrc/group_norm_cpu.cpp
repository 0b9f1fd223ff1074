// Fused GroupNorm(+SiLU) forward and backward on CPU: vectorized with ATen's Vectorized<float>
// (AVX2 or AVX-512 when the build enables it, see CMakeLists.txt), parallel with at::parallel_for.
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
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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
inline void store_full(at::BFloat16* p, const Vec& v) { at::vec::convert_float_bfloat16(v, v).store(p, kV); }
inline void store_full(at::Half* p, const Vec& v) { at::vec::convert_float_half(v, v).store(p, kV); }

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

inline float hsum(const Vec& v) {
  float tmp[kV];
  v.store(tmp);
  float s = 0.f;
  for (int64_t i = 0; i < kV; ++i) s += tmp[i];
  return s;
}

inline Vec sigmoid(const Vec& z) { return Vec(1.f) / (Vec(1.f) + z.neg().exp_u20()); }

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

// -------------------------------------------------------------------------- channels-first

template <typename T>
float row_sum(const T* p, int64_t n) {
  Vec a0(0.f), a1(0.f);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    a0 += load_full(p + i);
    a1 += load_full(p + i + kV);
  }
  for (; i < n; i += kV) a0 += load(p + i, std::min(kV, n - i));
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
  for (; i < n; i += kV) {
    const int64_t k = std::min(kV, n - i);
    const Vec d = Vec::set(Vec(0.f), load(p + i, k) - m, k);  // lanes past k are not data
    a0 = at::vec::fmadd(d, d, a0);
  }
  return hsum(a0 + a1);
}

template <typename T, bool SILU>
void forward_nchw(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, int64_t N, int64_t C,
                  int64_t HW, int64_t G, float eps) {
  const int64_t D = C / G, L = D * HW;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t g = ng % G;
      const T* xg = x + ng * L;
      T* yg = y + ng * L;
      double s = 0;
      for (int64_t c = 0; c < D; ++c) s += row_sum(xg + c * HW, HW);
      const float m = static_cast<float>(s / static_cast<double>(L));
      double q = 0;
      for (int64_t c = 0; c < D; ++c) q += row_sq_dev(xg + c * HW, HW, m);
      const float r = 1.f / std::sqrt(static_cast<float>(q / static_cast<double>(L)) + eps);
      mean[ng] = m;
      rstd[ng] = r;
      const Vec mv(m);
      for (int64_t c = 0; c < D; ++c) {
        // (x - mean) first: folding mean into a shift cancels when |mean| >> std
        const Vec sv(r * w[g * D + c]), bv(b[g * D + c]);
        const T* xr = xg + c * HW;
        T* yr = yg + c * HW;
        for (int64_t i = 0; i < HW; i += kV) {
          const int64_t k = std::min(kV, HW - i);
          store(yr + i, activation<SILU>(at::vec::fmadd(load(xr + i, k) - mv, sv, bv)), k);
        }
      }
    }
  });
}

template <typename T, bool SILU>
void backward_nchw(const T* dy, const T* x, const float* w, const float* b, const float* mean, const float* rstd,
                   T* dx, float* sum_dz, float* sum_dz_xhat, int64_t N, int64_t C, int64_t HW, int64_t G) {
  const int64_t D = C / G, L = D * HW;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dz_buf(L);  // this group's dz, reused by the dx pass
    for (int64_t ng = begin; ng < end; ++ng) {
      const int64_t n = ng / G, g = ng % G;
      const float m = mean[ng], r = rstd[ng];
      const Vec mv(m), rv(r);
      double c1 = 0, c2 = 0;
      for (int64_t c = 0; c < D; ++c) {
        const int64_t cc = g * D + c, off = ng * L + c * HW;
        const Vec wv(w[cc]), bv(b[cc]);
        float* dzr = dz_buf.data() + c * HW;
        Vec acc_a(0.f), acc_b(0.f);
        for (int64_t i = 0; i < HW; i += kV) {
          const int64_t k = std::min(kV, HW - i);
          const Vec xh = (load(x + off + i, k) - mv) * rv;
          // lanes past k have dy = 0, hence dz = 0: they add nothing to the sums
          const Vec dz = grad_pre_activation<SILU>(load(dy + off + i, k), at::vec::fmadd(xh, wv, bv));
          dz.store(dzr + i, static_cast<int>(k));
          acc_a += dz;
          acc_b = at::vec::fmadd(dz, xh, acc_b);
        }
        const float a = hsum(acc_a), bb = hsum(acc_b);
        sum_dz[n * C + cc] = a;
        sum_dz_xhat[n * C + cc] = bb;
        c1 += static_cast<double>(w[cc]) * a;
        c2 += static_cast<double>(w[cc]) * bb;
      }
      const Vec c1v(static_cast<float>(c1 / static_cast<double>(L)));
      const Vec c2v(static_cast<float>(c2 / static_cast<double>(L)));
      // dx = r (w dz - c1 - xhat c2), in this order: with one element per group w dz == c1 and
      // xhat == 0, so dx is exactly 0 (a folded r w dz - r c1 would leave rounding times rstd)
      for (int64_t c = 0; c < D; ++c) {
        const int64_t cc = g * D + c, off = ng * L + c * HW;
        const Vec wv(w[cc]);
        const float* dzr = dz_buf.data() + c * HW;
        for (int64_t i = 0; i < HW; i += kV) {
          const int64_t k = std::min(kV, HW - i);
          const Vec dz = Vec::loadu(dzr + i, static_cast<int>(k));
          const Vec xh = (load(x + off + i, k) - mv) * rv;
          store(dx + off + i, rv * (wv * dz - c1v - xh * c2v), k);
        }
      }
    }
  });
}

// -------------------------------------------------------------------------- channels-last

// part[t * C + c] += f(row) over this thread's rows; rows of one sample: x + hw * C.
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
    per_thread_channel_sums(part, C, HW, [&](int64_t hw, float* acc) {
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t k = std::min(kV, C - c);
        store(acc + c, Vec::loadu(acc + c, static_cast<int>(k)) + load(xn + hw * C + c, k), k);
      }
    });
    auto sums = combine_threads(part, C);
    for (int64_t g = 0; g < G; ++g) {
      double s = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) s += sums[c];
      mean[n * G + g] = static_cast<float>(s / L);
      for (int64_t c = g * D; c < (g + 1) * D; ++c) mean_c[c] = mean[n * G + g];
    }
    per_thread_channel_sums(part, C, HW, [&](int64_t hw, float* acc) {
      for (int64_t c = 0; c < C; c += kV) {
        const int64_t k = std::min(kV, C - c);
        const Vec d = load(xn + hw * C + c, k) - Vec::loadu(mean_c.data() + c, static_cast<int>(k));
        store(acc + c, at::vec::fmadd(d, d, Vec::loadu(acc + c, static_cast<int>(k))), k);
      }
    });
    sums = combine_threads(part, C);
    for (int64_t g = 0; g < G; ++g) {
      double q = 0;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) q += sums[c];
      const float r = 1.f / std::sqrt(static_cast<float>(q / L) + eps);
      rstd[n * G + g] = r;
      for (int64_t c = g * D; c < (g + 1) * D; ++c) scale_c[c] = r * w[c];
    }
    at::parallel_for(0, HW, rows_grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t hw = begin; hw < end; ++hw) {
        for (int64_t c = 0; c < C; c += kV) {
          const int64_t k = std::min(kV, C - c);
          const int ki = static_cast<int>(k);
          const Vec z = at::vec::fmadd(load(xn + hw * C + c, k) - Vec::loadu(mean_c.data() + c, ki),
                                       Vec::loadu(scale_c.data() + c, ki), Vec::loadu(b + c, ki));
          store(yn + hw * C + c, activation<SILU>(z), k);
        }
      }
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
    // dz and xhat of one row's channels [c, c + k)
    auto dz_xhat = [&](int64_t hw, int64_t c, int64_t k, Vec& dz, Vec& xh) {
      const int ki = static_cast<int>(k);
      xh = (load(xn + hw * C + c, k) - Vec::loadu(mean_c.data() + c, ki)) * Vec::loadu(rstd_c.data() + c, ki);
      dz = grad_pre_activation<SILU>(load(dyn + hw * C + c, k),
                                     at::vec::fmadd(xh, Vec::loadu(w + c, ki), Vec::loadu(b + c, ki)));
    };
    std::fill(part_a.begin(), part_a.end(), 0.f);
    std::fill(part_b.begin(), part_b.end(), 0.f);
    at::parallel_for(0, HW, rows_grain(C), [&](int64_t begin, int64_t end) {
      float* acc_a = part_a.data() + at::get_thread_num() * C;
      float* acc_b = part_b.data() + at::get_thread_num() * C;
      for (int64_t hw = begin; hw < end; ++hw) {
        for (int64_t c = 0; c < C; c += kV) {
          const int64_t k = std::min(kV, C - c);
          const int ki = static_cast<int>(k);
          Vec dz, xh;
          dz_xhat(hw, c, k, dz, xh);
          store(acc_a + c, Vec::loadu(acc_a + c, ki) + dz, k);
          store(acc_b + c, at::vec::fmadd(dz, xh, Vec::loadu(acc_b + c, ki)), k);
        }
      }
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
      for (int64_t hw = begin; hw < end; ++hw) {
        for (int64_t c = 0; c < C; c += kV) {
          const int64_t k = std::min(kV, C - c);
          const int ki = static_cast<int>(k);
          Vec dz, xh;
          dz_xhat(hw, c, k, dz, xh);
          // dx = r (w dz - c1 - xhat c2), the order of the channels-first loop
          const Vec out = Vec::loadu(rstd_c.data() + c, ki) *
                          (Vec::loadu(w + c, ki) * dz - Vec::loadu(c1_c.data() + c, ki) - xh * Vec::loadu(c2_c.data() + c, ki));
          store(dxn + hw * C + c, out, k);
        }
      }
    });
  }
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                           const at::Tensor& bias, int64_t groups, double eps,
                                                           bool silu) {
  check_forward(x_in, weight, bias, groups);
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const int64_t N = x.size(0), C = x.size(1), HW = N * C > 0 ? x.numel() / (N * C) : 0;
  at::Tensor y = empty_output_like(x);
  auto stats = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({N, groups}, stats), rstd = at::empty({N, groups}, stats);
  if (x.numel() == 0) return {y, mean.fill_(NAN), rstd.fill_(NAN)};
  const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    auto run = [&](auto kernel) {
      kernel(x.const_data_ptr<T>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(), y.mutable_data_ptr<T>(),
             mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), N, C, HW, groups, static_cast<float>(eps));
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
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), G = mean.size(1), HW = N * C > 0 ? x.numel() / (N * C) : 0;
  at::Tensor dx = empty_output_like(x);
  at::Tensor sum_dz = at::zeros({N, C}, x.options().dtype(at::kFloat)), sum_dz_xhat = at::zeros_like(sum_dz);
  if (x.numel() > 0) {
    const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      auto run = [&](auto kernel) {
        kernel(dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
               mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), dx.mutable_data_ptr<T>(),
               sum_dz.mutable_data_ptr<float>(), sum_dz_xhat.mutable_data_ptr<float>(), N, C, HW, G);
      };
      if (nhwc) silu ? run(backward_nhwc<T, true>) : run(backward_nhwc<T, false>);
      else silu ? run(backward_nchw<T, true>) : run(backward_nchw<T, false>);
    });
  }
  return {dx, sum_dz_xhat.sum(0).to(weight.scalar_type()), sum_dz.sum(0).to(bias.scalar_type())};
}

}  // namespace
}  // namespace refl

TORCH_LIBRARY_IMPL(refl, CPU, m) {
  m.impl("group_norm_silu", &refl::forward_cpu);
  m.impl("group_norm_silu_backward", &refl::backward_cpu);
}

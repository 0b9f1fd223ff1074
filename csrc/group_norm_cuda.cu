// Fused GroupNorm(+SiLU) forward and backward on CUDA: the same op and math as the CPU kernels
// (group_norm_cpu.cpp), in a direct form - one block per (sample, group) for the statistics, one
// block per (sample, channel) for the backward's channel sums, elementwise grid-stride kernels
// for y and dx. Channels-first and channels-last are both addressed in place.
//
// Not tuned: one block per (sample, group) leaves most SMs idle at batch 1 (SD1.5: 32 blocks),
// which the Triton kernels avoid by splitting rows; the UNet on GPU keeps the Triton path. This
// file is compiled (sm_80, sm_90) but has never run on this project's CPU machines.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "group_norm.h"

namespace refl {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float2 warp_sum(float2 v) {
  for (int o = 16; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  return v;
}

// Sum over the block (blockDim.x == kThreads), returned to every thread.
__device__ float2 block_sum(float2 v) {
  __shared__ float2 partial[kThreads / 32];
  __syncthreads();  // the previous call's readers are done with `partial`
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? partial[threadIdx.x] : make_float2(0.f, 0.f);
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) partial[0] = v;
  __syncthreads();
  return partial[0];
}

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + __expf(-z)); }

// Memory offset of element j of group (n, g), j in [0, D * HW) in (channel, position) order.
template <bool NHWC>
__device__ __forceinline__ int64_t group_offset(int64_t n, int64_t g, int64_t j, int64_t C, int64_t HW, int64_t D) {
  return NHWC ? (n * HW + j / D) * C + g * D + j % D : (n * C + g * D) * HW + j;
}

template <bool NHWC>
__device__ __forceinline__ int64_t channel_of(int64_t i, int64_t C, int64_t HW) {
  return NHWC ? i % C : (i / HW) % C;
}

template <typename T, bool NHWC>
__global__ void stats_kernel(const T* __restrict__ x, float* __restrict__ mean, float* __restrict__ rstd, int64_t C,
                             int64_t HW, int64_t G, float eps) {
  const int64_t ng = blockIdx.x, n = ng / G, g = ng % G, D = C / G, L = D * HW;
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) s += static_cast<float>(x[group_offset<NHWC>(n, g, j, C, HW, D)]);
  const float m = block_sum(make_float2(s, 0.f)).x / static_cast<float>(L);
  float q = 0.f;  // second pass: squared deviations, no E[x^2] - E[x]^2 cancellation
  for (int64_t j = threadIdx.x; j < L; j += blockDim.x) {
    const float d = static_cast<float>(x[group_offset<NHWC>(n, g, j, C, HW, D)]) - m;
    q += d * d;
  }
  const float var = block_sum(make_float2(q, 0.f)).x / static_cast<float>(L);
  if (threadIdx.x == 0) {
    mean[ng] = m;
    rstd[ng] = rsqrtf(var + eps);
  }
}

template <typename T, bool NHWC, bool SILU>
__global__ void apply_kernel(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                             const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ y,
                             int64_t numel, int64_t C, int64_t HW, int64_t G) {
  const int64_t D = C / G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of<NHWC>(i, C, HW), ng = (i / (C * HW)) * G + c / D;
    float z = (static_cast<float>(x[i]) - mean[ng]) * rstd[ng] * w[c] + b[c];
    if constexpr (SILU) z = z * sigmoid(z);
    y[i] = static_cast<T>(z);
  }
}

template <bool SILU>
__device__ __forceinline__ float grad_pre_activation(float dy, float z) {
  if constexpr (SILU) {
    const float s = sigmoid(z);
    return dy * s * (1.f + z * (1.f - s));
  } else {
    return dy;
  }
}

// Per (sample, channel): A = sum dz, B = sum dz * xhat.
template <typename T, bool NHWC, bool SILU>
__global__ void channel_sums_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                                    const float* __restrict__ b, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, float* __restrict__ sum_dz,
                                    float* __restrict__ sum_dz_xhat, int64_t C, int64_t HW, int64_t G) {
  const int64_t nc = blockIdx.x, n = nc / C, c = nc % C, ng = n * G + c / (C / G);
  const float m = mean[ng], r = rstd[ng], wc = w[c], bc = b[c];
  float2 acc = make_float2(0.f, 0.f);
  for (int64_t p = threadIdx.x; p < HW; p += blockDim.x) {
    const int64_t off = NHWC ? (n * HW + p) * C + c : nc * HW + p;
    const float xh = (static_cast<float>(x[off]) - m) * r;
    const float dz = grad_pre_activation<SILU>(static_cast<float>(dy[off]), xh * wc + bc);
    acc.x += dz;
    acc.y += dz * xh;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    sum_dz[nc] = acc.x;
    sum_dz_xhat[nc] = acc.y;
  }
}

// Per (sample, group): c1 = sum_c w A / L, c2 = sum_c w B / L.
__global__ void group_coef_kernel(const float* __restrict__ w, const float* __restrict__ sum_dz,
                                  const float* __restrict__ sum_dz_xhat, float* __restrict__ c1,
                                  float* __restrict__ c2, int64_t NG, int64_t C, int64_t HW, int64_t G) {
  const int64_t ng = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (ng >= NG) return;
  const int64_t n = ng / G, g = ng % G, D = C / G;
  float s1 = 0.f, s2 = 0.f;
  for (int64_t c = g * D; c < (g + 1) * D; ++c) {
    s1 += w[c] * sum_dz[n * C + c];
    s2 += w[c] * sum_dz_xhat[n * C + c];
  }
  const float inv = 1.f / static_cast<float>(D * HW);
  c1[ng] = s1 * inv;
  c2[ng] = s2 * inv;
}

template <typename T, bool NHWC, bool SILU>
__global__ void dx_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ w,
                          const float* __restrict__ b, const float* __restrict__ mean, const float* __restrict__ rstd,
                          const float* __restrict__ c1, const float* __restrict__ c2, T* __restrict__ dx, int64_t numel,
                          int64_t C, int64_t HW, int64_t G) {
  const int64_t D = C / G;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = channel_of<NHWC>(i, C, HW), ng = (i / (C * HW)) * G + c / D;
    const float r = rstd[ng], xh = (static_cast<float>(x[i]) - mean[ng]) * r;
    const float dz = grad_pre_activation<SILU>(static_cast<float>(dy[i]), xh * w[c] + b[c]);
    dx[i] = static_cast<T>(r * (w[c] * dz - c1[ng] - xh * c2[ng]));
  }
}

inline unsigned elementwise_blocks(int64_t numel) {
  return static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, 65536));
}

template <typename Fn>
void dispatch(at::ScalarType t, bool nhwc, bool silu, const Fn& fn) {
  auto with_flags = [&](auto tag) {
    using T = decltype(tag);
    if (nhwc) {
      silu ? fn(T{}, std::true_type{}, std::true_type{}) : fn(T{}, std::true_type{}, std::false_type{});
    } else {
      silu ? fn(T{}, std::false_type{}, std::true_type{}) : fn(T{}, std::false_type{}, std::false_type{});
    }
  };
  switch (t) {
    case at::kFloat: return with_flags(float{});
    case at::kBFloat16: return with_flags(at::BFloat16{});
    case at::kHalf: return with_flags(at::Half{});
    default: TORCH_CHECK(false, "group_norm_silu: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda(const at::Tensor& x_in, const at::Tensor& weight,
                                                            const at::Tensor& bias, int64_t groups, double eps,
                                                            bool silu) {
  check_forward(x_in, weight, bias, groups);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_channels_last(x_in);
  const at::Tensor x = x_in.contiguous(layout_of(x_in));
  const int64_t N = x.size(0), C = x.size(1), HW = N * C > 0 ? x.numel() / (N * C) : 0;
  at::Tensor y = empty_output_like(x);
  auto stats = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({N, groups}, stats), rstd = at::empty({N, groups}, stats);
  if (x.numel() == 0) return {y, mean.fill_(NAN), rstd.fill_(NAN)};
  const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch(x.scalar_type(), nhwc, silu, [&](auto tag, auto nhwc_t, auto silu_t) {
    using T = decltype(tag);
    constexpr bool NHWC = decltype(nhwc_t)::value, SILU = decltype(silu_t)::value;
    stats_kernel<T, NHWC><<<static_cast<unsigned>(N * groups), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), C, HW, groups,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    apply_kernel<T, NHWC, SILU><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<T>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(), mean.const_data_ptr<float>(),
        rstd.const_data_ptr<float>(), y.mutable_data_ptr<T>(), x.numel(), C, HW, groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                             const at::Tensor& weight, const at::Tensor& bias,
                                                             const at::Tensor& mean_in, const at::Tensor& rstd_in,
                                                             bool silu) {
  check_backward(dy_in, x_in, weight, mean_in, rstd_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool nhwc = is_channels_last(x_in);
  const auto fmt = layout_of(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor dy = dy_in.to(x.scalar_type()).contiguous(fmt);
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1), G = mean.size(1), HW = N * C > 0 ? x.numel() / (N * C) : 0;
  at::Tensor dx = empty_output_like(x);
  auto f32 = x.options().dtype(at::kFloat);
  at::Tensor sum_dz = at::zeros({N, C}, f32), sum_dz_xhat = at::zeros({N, C}, f32);
  if (x.numel() > 0) {
    const at::Tensor w = weight.to(at::kFloat).contiguous(), b = bias.to(at::kFloat).contiguous();
    at::Tensor c1 = at::empty({N, G}, f32), c2 = at::empty({N, G}, f32);
    auto stream = c10::cuda::getCurrentCUDAStream();
    dispatch(x.scalar_type(), nhwc, silu, [&](auto tag, auto nhwc_t, auto silu_t) {
      using T = decltype(tag);
      constexpr bool NHWC = decltype(nhwc_t)::value, SILU = decltype(silu_t)::value;
      channel_sums_kernel<T, NHWC, SILU><<<static_cast<unsigned>(N * C), kThreads, 0, stream>>>(
          dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
          mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), sum_dz.mutable_data_ptr<float>(),
          sum_dz_xhat.mutable_data_ptr<float>(), C, HW, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      group_coef_kernel<<<static_cast<unsigned>((N * G + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
          w.const_data_ptr<float>(), sum_dz.const_data_ptr<float>(), sum_dz_xhat.const_data_ptr<float>(),
          c1.mutable_data_ptr<float>(), c2.mutable_data_ptr<float>(), N * G, C, HW, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dx_kernel<T, NHWC, SILU><<<elementwise_blocks(x.numel()), kThreads, 0, stream>>>(
          dy.const_data_ptr<T>(), x.const_data_ptr<T>(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
          mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), c1.const_data_ptr<float>(),
          c2.const_data_ptr<float>(), dx.mutable_data_ptr<T>(), x.numel(), C, HW, G);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, sum_dz_xhat.sum(0).to(weight.scalar_type()), sum_dz.sum(0).to(bias.scalar_type())};
}

}  // namespace
}  // namespace refl

TORCH_LIBRARY_IMPL(refl, CUDA, m) {
  m.impl("group_norm_silu", &refl::forward_cuda);
  m.impl("group_norm_silu_backward", &refl::backward_cuda);
}

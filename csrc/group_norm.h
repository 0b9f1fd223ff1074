// Fused GroupNorm(+SiLU): the op schema shared by the CPU, CUDA and Meta kernels.
//
//   refl::group_norm_silu(x, weight, bias, groups, eps, silu) -> (y, mean, rstd)
//   refl::group_norm_silu_backward(dy, x, weight, bias, mean, rstd, silu) -> (dx, dweight, dbias)
//
// x is (N, C, *spatial), channels-first contiguous or channels-last (4-D ChannelsLast, 5-D
// ChannelsLast3d); any other layout is made contiguous first. weight and bias are (C,) in any float
// dtype (the autograd wrapper passes ones/zeros when the module has none). mean and rstd are
// (N, groups) fp32: with x they are all the backward needs, so the normalised tensor and the
// pre-activation are never stored. Statistics and all arithmetic are fp32 whatever x's dtype.
#pragma once

#include <ATen/ATen.h>

namespace refl {

// Validates the arguments (shared by every backend, Meta included).
void check_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups);
void check_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                    const at::Tensor& rstd);

// The layout a kernel works in: channels-last if x is stored that way (and not also plain
// contiguous, as happens when C == 1 or the spatial size is 1), else channels-first contiguous.
bool is_channels_last(const at::Tensor& x);
at::MemoryFormat layout_of(const at::Tensor& x);

// Outputs allocated in the layout the kernels write (shared with the Meta kernels, so traced
// shapes and strides match the real ones).
at::Tensor empty_output_like(const at::Tensor& x);

}  // namespace refl

// Op registration (schemas), argument checks, the Meta kernels and the autograd formula. The CPU
// and CUDA kernels register their implementations in their own files.
#include <torch/autograd.h>
#include <torch/library.h>

#include "group_norm.h"

namespace refl {

bool is_channels_last(const at::Tensor& x) {
  if (x.is_contiguous()) return false;
  if (x.dim() == 4) return x.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (x.dim() == 5) return x.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  return false;
}

at::MemoryFormat layout_of(const at::Tensor& x) {
  if (!is_channels_last(x)) return at::MemoryFormat::Contiguous;
  return x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

at::Tensor empty_output_like(const at::Tensor& x) {
  return at::empty(x.sizes(), x.options().memory_format(layout_of(x)));
}

void check_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "group_norm_silu: x must be (N, C, *spatial), got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "group_norm_silu: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK(groups >= 1 && C % groups == 0, "group_norm_silu: groups=", groups, " must divide the ", C, " channels");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C && bias.dim() == 1 && bias.size(0) == C,
              "group_norm_silu: weight and bias must be (", C, ",)");
  TORCH_CHECK(weight.is_floating_point() && bias.is_floating_point(), "group_norm_silu: weight and bias must be floating point");
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(),
              "group_norm_silu: x, weight and bias must be on one device, got ", x.device(), ", ", weight.device(),
              ", ", bias.device());
}

void check_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
                    const at::Tensor& rstd) {
  TORCH_CHECK(dy.sizes() == x.sizes(), "group_norm_silu_backward: dy ", dy.sizes(), " and x ", x.sizes(), " differ");
  TORCH_CHECK(dy.device() == x.device() && mean.device() == x.device() && rstd.device() == x.device(),
              "group_norm_silu_backward: all tensors must be on one device");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat,
              "group_norm_silu_backward: mean and rstd must be the float32 statistics of the forward");
  TORCH_CHECK(mean.dim() == 2 && mean.size(0) == x.size(0) && mean.sizes() == rstd.sizes() && x.size(1) % mean.size(1) == 0,
              "group_norm_silu_backward: mean and rstd must be (N, groups), got ", mean.sizes());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), "group_norm_silu_backward: weight must be (C,)");
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_meta(const at::Tensor& x, const at::Tensor& weight,
                                                            const at::Tensor& bias, int64_t groups, double eps,
                                                            bool silu) {
  check_forward(x, weight, bias, groups);
  auto stats = x.options().dtype(at::kFloat);
  return {empty_output_like(x), at::empty({x.size(0), groups}, stats), at::empty({x.size(0), groups}, stats)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_meta(const at::Tensor& dy, const at::Tensor& x,
                                                             const at::Tensor& weight, const at::Tensor& bias,
                                                             const at::Tensor& mean, const at::Tensor& rstd, bool silu) {
  check_backward(dy, x, weight, mean, rstd);
  return {empty_output_like(x), at::empty_like(weight), at::empty_like(bias)};
}

// The autograd formula of group_norm_silu, in C++: y's gradient through group_norm_silu_backward
// from the saved x and the forward's fp32 mean/rstd (the normalised tensor is never stored). A
// Python autograd.Function cost ~0.1 ms a call here, as much as the kernels at the UNet's 8x8
// shapes. mean and rstd are outputs without gradient. Backward is not itself differentiable
// (no double backward), as a once_differentiable Python Function.
class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const at::Tensor& bias, int64_t groups,
                                                double eps, bool silu) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("refl::group_norm_silu", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, bool)>();
    at::AutoDispatchBelowADInplaceOrView guard;  // the backend kernel below, not this one again
    auto [y, mean, rstd] = op.call(x, weight, bias, groups, eps, silu);
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    ctx->saved_data["silu"] = silu;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("refl::group_norm_silu_backward", "")
                               .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                   const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const at::Tensor&, bool)>();
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "refl::group_norm_silu: double backward (create_graph=True) is not supported");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dy = grads[0];
    torch::autograd::variable_list out(6);
    if (!dy.defined()) return out;  // y not used: no gradient
    auto [dx, dw, db] = op.call(dy, saved[0], saved[1], saved[2], saved[3], saved[4], ctx->saved_data["silu"].toBool());
    if (ctx->needs_input_grad(0)) out[0] = dx;
    if (ctx->needs_input_grad(1)) out[1] = dw;
    if (ctx->needs_input_grad(2)) out[2] = db;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, int64_t groups, double eps,
                                                                bool silu) {
  auto out = GroupNormSiLUFunction::apply(x, weight, bias, groups, eps, silu);
  return {out[0], out[1], out[2]};
}

}  // namespace
}  // namespace refl

TORCH_LIBRARY(refl, m) {
  m.def("group_norm_silu(Tensor x, Tensor weight, Tensor bias, int groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  m.def("group_norm_silu_backward(Tensor dy, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd, bool silu)"
        " -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(refl, Meta, m) {
  m.impl("group_norm_silu", &refl::forward_meta);
  m.impl("group_norm_silu_backward", &refl::backward_meta);
}

TORCH_LIBRARY_IMPL(refl, Autograd, m) { m.impl("group_norm_silu", &refl::forward_autograd); }

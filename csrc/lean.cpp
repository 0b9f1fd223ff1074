// The lean recompute's autograd Functions (engine/memory/lean.py) in C++: the same computations and
// the same saved tensors as its Python Functions, without their per-call cost: on the tiny UNet at
// 32 px a lean UNet call runs 37 of them, and their Python glue was most of `lean`'s time over
// `none` (benchmarks/call_overhead.py --python_functions).
//
//   refl::norm_act_project(x, norm_w, norm_b, proj_w, proj_b?, groups, eps, silu, linear, stride,
//                          padding, dilation, conv_groups, fused) -> out
//       proj(act(group_norm(x))), proj a conv2d or (linear) a linear on the (N, H*W, C) tokens.
//       Saves x (and, fused, the fp32 (N, groups) mean and rstd); backward recomputes the norm
//       (and SiLU) and runs the projection's and the norm's backward ops directly. fused: the
//       norm is refl::group_norm_silu (this library's kernel) instead of aten's native_group_norm.
//   refl::frozen_conv(x, weight, bias?, stride, padding, dilation, groups) -> out
//       conv2d saving only the weight: the input gradient needs no input.
//   refl::geglu_gate(h) -> a * gelu(g) for (a, g) = h.chunk(2, -1), saving h only.
//
// The ops are composed of aten ops (and refl::group_norm_silu), so they run on any device those
// run on, the meta device included (CompositeExplicitAutograd); the Autograd kernels are the
// Functions below. The caller (lean.py) routes here only plain cases: no autocast, one dtype, x
// contiguous; anything else keeps the Python Functions. Gradients are not themselves
// differentiable (no double backward), as the Python Functions'.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace refl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

void no_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "refl::", op, ": double backward (create_graph=True) is not supported");
}

// refl::group_norm_silu below autograd: (y, mean, rstd)
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                                                          int64_t groups, double eps, bool silu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("refl::group_norm_silu", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, w, b, groups, eps, silu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_norm_backward(const at::Tensor& dy, const at::Tensor& x,
                                                                   const at::Tensor& w, const at::Tensor& b,
                                                                   const at::Tensor& mean, const at::Tensor& rstd,
                                                                   bool silu) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("refl::group_norm_silu_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, bool)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(dy, x, w, b, mean, rstd, silu);
}

int64_t spatial_size(const at::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1);
  return n * c == 0 ? 0 : x.numel() / (n * c);
}

// (N, C, H, W) -> (N, H*W, C)
at::Tensor tokens(const at::Tensor& a) {
  return a.permute({0, 2, 3, 1}).reshape({a.size(0), a.size(2) * a.size(3), a.size(1)});
}

at::Tensor project(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& b, bool linear,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t conv_groups) {
  if (linear) return at::linear(tokens(a), w, b);
  return at::conv2d(a, w, b, stride, padding, dilation, conv_groups);
}

void check_norm_act_project(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "refl::norm_act_project: x must be (N, C, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(x.is_contiguous(), "refl::norm_act_project: x must be contiguous (lean.py keeps other layouts on its "
              "Python Function)");
}

// (a, mean, rstd): the norm (+ SiLU) of x and its statistics; with aten's norm also the
// pre-activation y (undefined when fused), which SiLU's backward needs
struct Normed {
  at::Tensor a, y, mean, rstd;
};

Normed normed(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, int64_t groups, double eps, bool silu,
              bool fused) {
  if (fused) {
    auto [a, mean, rstd] = fused_norm(x, w, b, groups, eps, silu);
    return {a, at::Tensor(), mean, rstd};
  }
  auto [y, mean, rstd] = at::native_group_norm(x, w, b, x.size(0), x.size(1), spatial_size(x), groups, eps);
  return {silu ? at::silu(y) : y, y, mean, rstd};
}

at::Tensor norm_act_project_math(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                                 const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups,
                                 double eps, bool silu, bool linear, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t conv_groups, bool fused) {
  check_norm_act_project(x);
  const Normed n = normed(x, norm_w, norm_b, groups, eps, silu, fused);
  return project(n.a, proj_w, proj_b, linear, stride, padding, dilation, conv_groups);
}

class NormActProject : public torch::autograd::Function<NormActProject> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& norm_w,
                            const at::Tensor& norm_b, const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b,
                            int64_t groups, double eps, bool silu, bool linear, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t conv_groups, bool fused) {
    check_norm_act_project(x);
    Normed n = normed(x, norm_w, norm_b, groups, eps, silu, fused);
    at::Tensor out = project(n.a, proj_w, proj_b, linear, stride, padding, dilation, conv_groups);
    const at::Tensor bias = proj_b.has_value() ? *proj_b : at::Tensor();
    // fused: the statistics are kept (8 bytes a group) and the backward's norm reuses them
    if (fused) {
      ctx->save_for_backward({x, norm_w, norm_b, proj_w, bias, n.mean, n.rstd});
    } else {
      ctx->save_for_backward({x, norm_w, norm_b, proj_w, bias});
    }
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["silu"] = silu;
    ctx->saved_data["linear"] = linear;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["conv_groups"] = conv_groups;
    ctx->saved_data["fused"] = fused;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    no_double_backward("norm_act_project");
    variable_list out(14);
    const at::Tensor& g = grads[0];
    if (!g.defined()) return out;
    auto saved = ctx->get_saved_variables();
    const at::Tensor x = saved[0], norm_w = saved[1], norm_b = saved[2], proj_w = saved[3], proj_b = saved[4];
    const int64_t groups = ctx->saved_data["groups"].toInt();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool silu = ctx->saved_data["silu"].toBool(), linear = ctx->saved_data["linear"].toBool();
    const bool fused = ctx->saved_data["fused"].toBool();
    const bool need_pw = ctx->needs_input_grad(3), need_pb = proj_b.defined() && ctx->needs_input_grad(4);

    // the activation again (fused: from the kernel; else aten's norm, keeping its statistics)
    Normed n;
    if (fused) {
      n.a = std::get<0>(fused_norm(x, norm_w, norm_b, groups, eps, silu));
      n.mean = saved[5];
      n.rstd = saved[6];
    } else {
      n = normed(x, norm_w, norm_b, groups, eps, silu, false);
    }
    // the projection's backward
    at::Tensor grad_a;
    if (linear) {
      const int64_t N = n.a.size(0), C = n.a.size(1), H = n.a.size(2), W = n.a.size(3);
      at::Tensor t = tokens(n.a);
      grad_a = at::matmul(g, proj_w).reshape({N, H, W, C}).permute({0, 3, 1, 2});
      const at::Tensor g2 = g.reshape({-1, g.size(-1)});
      if (need_pw) out[3] = g2.t().mm(t.reshape({-1, C}));
      if (need_pb) out[4] = g2.sum(0);
    } else {
      const auto stride = ctx->saved_data["stride"].toIntVector();
      const auto padding = ctx->saved_data["padding"].toIntVector();
      const auto dilation = ctx->saved_data["dilation"].toIntVector();
      const std::vector<int64_t> bias_shape = proj_b.defined() ? proj_b.sizes().vec() : std::vector<int64_t>();
      const at::OptionalIntArrayRef bias_sizes =
          proj_b.defined() ? at::OptionalIntArrayRef(bias_shape) : at::OptionalIntArrayRef();
      auto [ga, gw, gb] = at::convolution_backward(g, n.a, proj_w, bias_sizes, stride, padding, dilation, false,
                                                   {0, 0}, ctx->saved_data["conv_groups"].toInt(),
                                                   {true, need_pw, need_pb});
      grad_a = ga;
      if (need_pw) out[3] = gw;
      if (need_pb) out[4] = gb;
    }
    // the activation is not needed past this point (autograd frees a node's saved tensors as it runs)
    n.a.reset();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    at::Tensor dx, dw, db;
    if (fused) {
      std::tie(dx, dw, db) = fused_norm_backward(grad_a.contiguous(), x, norm_w, norm_b, n.mean, n.rstd, silu);
      dw = dw.to(norm_w.scalar_type());
      db = db.to(norm_b.scalar_type());
    } else {
      at::Tensor grad_y = silu ? at::silu_backward(grad_a, n.y) : grad_a;
      grad_a.reset();
      n.y.reset();
      std::tie(dx, dw, db) = at::native_group_norm_backward(grad_y.contiguous(), x, n.mean, n.rstd, norm_w, x.size(0),
                                                            x.size(1), spatial_size(x), groups, mask);
    }
    if (mask[0]) out[0] = dx;
    if (mask[1]) out[1] = dw;
    if (mask[2]) out[2] = db;
    return out;
  }
};

at::Tensor norm_act_project_autograd(const at::Tensor& x, const at::Tensor& norm_w, const at::Tensor& norm_b,
                                     const at::Tensor& proj_w, const std::optional<at::Tensor>& proj_b, int64_t groups,
                                     double eps, bool silu, bool linear, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t conv_groups,
                                     bool fused) {
  return NormActProject::apply(x, norm_w, norm_b, proj_w, proj_b, groups, eps, silu, linear, stride, padding, dilation,
                               conv_groups, fused);
}

// ---------------------------------------------------------------------------------------- frozen conv

at::Tensor frozen_conv_math(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
}

class FrozenConv : public torch::autograd::Function<FrozenConv> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, int64_t groups) {
    TORCH_CHECK(!weight.requires_grad() && !(bias.has_value() && bias->defined() && bias->requires_grad()),
                "refl::frozen_conv: the weight and bias must not require grad (their gradients are not computed)");
    ctx->save_for_backward({weight});
    ctx->saved_data["x_shape"] = x.sizes().vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["groups"] = groups;
    return at::conv2d(x, weight, bias, stride, padding, dilation, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    no_double_backward("frozen_conv");
    variable_list out(7);
    const at::Tensor& g = grads[0];
    if (!g.defined() || !ctx->needs_input_grad(0)) return out;
    const at::Tensor weight = ctx->get_saved_variables()[0];
    // the input gradient reads only the input's shape: an expanded one-element stand-in
    const at::Tensor x = at::empty({1}, g.options()).expand(ctx->saved_data["x_shape"].toIntVector());
    out[0] = std::get<0>(at::convolution_backward(
        g, x, weight, std::nullopt, ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
        ctx->saved_data["dilation"].toIntVector(), false, {0, 0}, ctx->saved_data["groups"].toInt(),
        {true, false, false}));
    return out;
  }
};

at::Tensor frozen_conv_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  return FrozenConv::apply(x, weight, bias, stride, padding, dilation, groups);
}

// ---------------------------------------------------------------------------------------- GEGLU gate

at::Tensor geglu_gate_math(const at::Tensor& h) {
  auto parts = h.chunk(2, -1);
  return parts[0] * at::gelu(parts[1]);
}

class GegluGate : public torch::autograd::Function<GegluGate> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h) {
    ctx->save_for_backward({h});
    return geglu_gate_math(h);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    no_double_backward("geglu_gate");
    const at::Tensor& g = grads[0];
    if (!g.defined()) return {at::Tensor()};
    const at::Tensor h = ctx->get_saved_variables()[0];
    auto parts = h.chunk(2, -1);
    const std::vector<at::Tensor> halves = {g * at::gelu(parts[1]), at::gelu_backward(g * parts[0], parts[1])};
    return {at::cat(halves, -1)};
  }
};

at::Tensor geglu_gate_autograd(const at::Tensor& h) { return GegluGate::apply(h); }

}  // namespace
}  // namespace refl

TORCH_LIBRARY_FRAGMENT(refl, m) {
  m.def("norm_act_project(Tensor x, Tensor norm_w, Tensor norm_b, Tensor proj_w, Tensor? proj_b, int groups, "
        "float eps, bool silu, bool linear, int[] stride, int[] padding, int[] dilation, int conv_groups, bool fused)"
        " -> Tensor");
  m.def("frozen_conv(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups)"
        " -> Tensor");
  m.def("geglu_gate(Tensor h) -> Tensor");
}

TORCH_LIBRARY_IMPL(refl, CompositeExplicitAutograd, m) {
  m.impl("norm_act_project", &refl::norm_act_project_math);
  m.impl("frozen_conv", &refl::frozen_conv_math);
  m.impl("geglu_gate", &refl::geglu_gate_math);
}

TORCH_LIBRARY_IMPL(refl, Autograd, m) {
  m.impl("norm_act_project", &refl::norm_act_project_autograd);
  m.impl("frozen_conv", &refl::frozen_conv_autograd);
  m.impl("geglu_gate", &refl::geglu_gate_autograd);
}

"""Lean recomputation: drop the cheap-but-large tensors a UNet or VAE call would save for backward
and recompute them locally, inside the backward of the op that needs them.

What a stock diffusers UNet saves for backward, by producer (tiny-sd @ 64 px, LoRA r=4, CFG):
the outputs of GroupNorm (saved by the SiLU or 1x1 projection after it, 13%), of SiLU (saved by
the convolution after it, 11%) and of GELU inside GEGLU (saved by the gating product, 10%). Each
is a pure function of a tensor that stays saved anyway (the norm's input, the GEGLU projection's
output). Three autograd Functions save only those inputs:

    norm -> [SiLU] -> projection     (ResnetBlock2D norm1 -> act -> conv1 and norm2 -> act -> conv2,
                                      Transformer2DModel norm -> proj_in, conv or linear)
        forward keeps the norm's input; backward recomputes norm and activation (elementwise plus a
        per-group reduction) and runs the projection's backward on them directly
        (`aten.convolution_backward`, or two matmuls for a linear) — the projection's forward is
        never recomputed.
    GEGLU gating  h -> a * gelu(g)    forward keeps the projection output h; backward recomputes
                                      gelu(g).

The outputs of convolutions, linears and attention are kept as before, so the recompute costs
elementwise work only (no matmul, no convolution forward), and no region is rematerialised as a
whole: the backward peak drops with the saved bytes. A fourth Function, for frozen convolutions,
saves nothing (below). On tiny-sd this keeps 0.63 of what the stock UNet saves.

The GroupNorm(+SiLU) inside the first Function runs on the GroupNorm backend `--kernels` chose for
the model (engine/models/patch.py records it on each module): "triton", the fused Triton kernel of
refl_kernels; "native", its C++ op; "torch", torch's GroupNorm and SiLU. The first two hand out
their per-(sample, group) fp32 mean and rstd (8 bytes a group), which the Function keeps beside x;
its backward recomputes the activation from them (Triton: the kernel's apply pass alone) and runs
the kernel's own backward. Where the chosen backend cannot take the tensor (float64, a device it
does not run on) the torch ops run.

The mode is on only inside `lean_mode()`: recompute.py's `lean` call kind runs a window step in it
(kept for every step, so not flat in K), its `selective` kind runs a checkpointed step in it,
forward and recompute alike (flat in K), and the VAE decode runs in it (`--lean_decode`). This file
holds the mode and the computations; which forward a module runs is decided in one place,
engine/models/patch.py, whose module classes call the functions here when the mode is on and the
module fits the pattern (`*_eligible`), and otherwise run their kernel or stock forward. Outside
the pattern: a LoRA-wrapped conv, dropout > 0, scale-shift time norm, an up/down-sampling resnet,
DeepSpeed ZeRO-3 partitioned parameters.

The three Functions run as the native library's C++ ops when it is built (csrc/lean.cpp,
`native_functions()`): the same aten ops in the same order, so bit-identical results and the same
saved tensors, without a Python autograd.Function's per-call cost (on the tiny UNet at 32 px, LoRA,
a `lean` call took 1.16x `none`'s with the Python Functions and 1.09x with the C++ ones, and a
`selective` call 1.65x against 1.57x: benchmarks/call_overhead.py --python_functions). They take
the plain case (autocast off, one dtype, x contiguous); autocast, other layouts and the Triton
backend keep the Python Functions below.

The same applies to a VAE: its ResnetBlock2Ds and its frozen convolutions. A frozen convolution's
backward needs only its weight, yet torch's convolution saves its input regardless; `_FrozenConv`
saves nothing (the 2x-upsampled input of every upsampler conv is the largest such tensor).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import refl_kernels

_state = threading.local()


def is_active() -> bool:
    return getattr(_state, "active", False) and torch.is_grad_enabled()


@contextlib.contextmanager
def lean_mode(enabled: bool = True):
    """Run the patched modules (engine/models/patch.py) in lean mode inside this block."""
    prev = getattr(_state, "active", False)
    _state.active = enabled
    try:
        yield
    finally:
        _state.active = prev


def in_lean_mode(fn):
    """fn, run in lean mode (so a checkpoint's forward and recompute of it both are)."""
    def run(*args):
        with lean_mode():
            return fn(*args)

    return run


# ---------------------------------------------------------------------- autocast state

def _autocast_state(device: torch.device):
    kind = device.type if device.type in ("cuda", "cpu", "xpu") else "cpu"
    return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)


def _autocast(state):
    kind, enabled, dtype = state
    return torch.autocast(kind, dtype=dtype, enabled=enabled)


# ---------------------------------------------------------------------- the Functions in C++

_native: bool | None = None  # None: ask the native library once


def native_functions() -> bool:
    """Whether the Functions below run as the native library's C++ ops (csrc/lean.cpp): the same
    computations, the same saved tensors, without a Python autograd.Function's per-call cost (on
    the tiny UNet at 32 px a large share of `lean`'s time over `none`). On when the library
    is loaded with them; $REFL_LEAN_NATIVE=0 or `use_native_functions(False)` keeps the Python
    Functions. Either way only the plain case goes native (`_native_takes`)."""
    global _native
    if _native is None:
        _native = os.environ.get("REFL_LEAN_NATIVE", "1") != "0" and refl_kernels.native.lean_ops_available()
    return _native


@contextlib.contextmanager
def use_native_functions(enabled: bool):
    """Inside: the C++ Functions where they take the call (`enabled`, and the library has them),
    else the Python ones (A/B benchmarks, tests)."""
    global _native
    prev = native_functions()
    _native = enabled and refl_kernels.native.lean_ops_available()
    try:
        yield
    finally:
        _native = prev


def _native_takes(x: torch.Tensor, *others) -> bool:
    """The C++ Functions take the plain case: autocast off (its casts only the Python Functions'
    graph path reproduces), one floating dtype throughout, x contiguous."""
    if not native_functions():
        return False
    kind = x.device.type if x.device.type in ("cuda", "xpu") else "cpu"
    return (not torch.is_autocast_enabled(kind) and x.is_floating_point() and x.is_contiguous()
            and all(t is None or t.dtype == x.dtype for t in others))


# ---------------------------------------------------------------------- norm -> act -> projection

@dataclass(frozen=True)
class _Spec:
    groups: int
    eps: float
    act: str | None  # "silu" or None
    kind: str  # "conv" or "linear" (on tokens: (B, C, H, W) -> (B, H*W, C) before the linear)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    conv_groups: int = 1
    norm: str = "torch"  # the GroupNorm backend: "torch", "triton" or "native"


def _norm_act(x, weight, bias, spec: _Spec):
    a = F.group_norm(x, spec.groups, weight, bias, spec.eps)
    return F.silu(a) if spec.act == "silu" else a


def _tokens(a: torch.Tensor) -> torch.Tensor:
    b, c, h, w = a.shape
    return a.permute(0, 2, 3, 1).reshape(b, h * w, c)


def _project(a, weight, bias, spec: _Spec):
    if spec.kind == "conv":
        return F.conv2d(a, weight, bias, spec.stride, spec.padding, spec.dilation, spec.conv_groups)
    return F.linear(_tokens(a), weight, bias)


def _norm_backend(x, weight, bias, spec: _Spec) -> str:
    """The spec's GroupNorm backend when it takes x here, else "torch"."""
    if spec.norm == "torch" or weight is None or bias is None:
        return "torch"
    return spec.norm if refl_kernels.group_norm_runs(spec.norm, x) else "torch"


class _NormActProject(torch.autograd.Function):
    """proj(act(group_norm(x))) saving x only (parameters are referenced, not copied; with a
    kernel backend also its per-(sample, group) fp32 mean and rstd, 8 bytes per group)."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, proj_w, proj_b, spec: _Spec):
        backend = _norm_backend(x, norm_w, norm_b, spec)
        stats = ()
        if backend == "torch":
            a = _norm_act(x, norm_w, norm_b, spec)
        else:
            a, *stats = refl_kernels.group_norm_with_stats(x, spec.groups, norm_w, norm_b, spec.eps,
                                                           spec.act == "silu", backend)
        out = _project(a, proj_w, proj_b, spec)
        ctx.save_for_backward(x, norm_w, norm_b, proj_w, proj_b, *stats)
        ctx.spec, ctx.backend = spec, backend
        ctx.autocast = _autocast_state(x.device)
        ctx.out_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_w, norm_b, proj_w, proj_b, *stats = ctx.saved_tensors
        spec, needs, backend = ctx.spec, ctx.needs_input_grad, ctx.backend
        silu = spec.act == "silu"
        direct = not stats and _aten_norm_ok(x, norm_w, norm_b, ctx.autocast)
        if stats:  # a kernel backend: the activation again from the saved statistics
            a = refl_kernels.group_norm_from_stats(x, norm_w, norm_b, *stats, spec.eps, silu, backend)
        elif direct:  # torch's GroupNorm again, keeping its statistics for its own backward below
            n, c = x.shape[:2]
            y, mean, rstd = torch.ops.aten.native_group_norm(x, norm_w, norm_b, n, c, x.numel() // (n * c),
                                                             spec.groups, spec.eps)
            a = F.silu(y) if silu else y
        else:
            with torch.enable_grad(), _autocast(ctx.autocast):
                xd = x.detach().requires_grad_(needs[0])
                nw = None if norm_w is None else norm_w.detach().requires_grad_(needs[1])
                nb = None if norm_b is None else norm_b.detach().requires_grad_(needs[2])
                a = _norm_act(xd, nw, nb, spec)
        # the projection's backward, in the dtype its forward ran in (autocast casts both operands)
        dt = ctx.out_dtype
        a_in = a.detach().to(dt)
        w = proj_w.to(dt)
        g = grad_out.to(dt)
        grad_pw = grad_pb = None
        if spec.kind == "conv":
            grad_a, grad_pw, grad_pb = torch.ops.aten.convolution_backward(
                g, a_in, w, None if proj_b is None else [proj_b.shape[0]], list(spec.stride), list(spec.padding),
                list(spec.dilation), False, [0, 0], spec.conv_groups, [True, needs[3], proj_b is not None and needs[4]])
        else:
            tokens = _tokens(a_in)
            grad_tokens = g @ w
            b, c, h, wd = a_in.shape
            grad_a = grad_tokens.reshape(b, h, wd, c).permute(0, 3, 1, 2)
            if needs[3]:
                grad_pw = g.reshape(-1, g.shape[-1]).t() @ tokens.reshape(-1, c)
            if proj_b is not None and needs[4]:
                grad_pb = g.reshape(-1, g.shape[-1]).sum(0)
        if stats:
            grads = refl_kernels.group_norm_backward(grad_a.to(x.dtype), x, norm_w, norm_b, *stats, silu, backend)
            out = [gr if need else None for gr, need in zip(grads, needs[:3])]
        elif direct:  # the aten backward ops autograd would run for F.group_norm and F.silu, called directly
            grad_a = grad_a.to(y.dtype)
            # drop the activation (and the linear's token copy) before the norm's backward, and the
            # norm's output after SiLU's, as autograd frees a node's saved tensors once it has run
            a = a_in = tokens = grad_tokens = None  # noqa: F841
            grad_y = torch.ops.aten.silu_backward(grad_a, y) if silu else grad_a
            y = grad_a = None  # noqa: F841
            n, c = x.shape[:2]
            mask = [needs[0], norm_w is not None and needs[1], norm_b is not None and needs[2]]
            out = list(torch.ops.aten.native_group_norm_backward(
                grad_y.contiguous(), x, mean, rstd, norm_w, n, c,
                x.numel() // (n * c), spec.groups, mask))
            out = [gr if m else None for gr, m in zip(out, mask)]
        else:
            leaves = [t for t in (xd, nw, nb) if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(a, leaves, grad_a.to(a.dtype)) if leaves else ())
            out = [next(grads) if t is not None and t.requires_grad else None for t in (xd, nw, nb)]
        cast = lambda gr, p: None if gr is None else gr.to(p.dtype)  # noqa: E731
        return out[0], out[1], out[2], cast(grad_pw, proj_w), cast(grad_pb, proj_b), None


def _aten_norm_ok(x, weight, bias, autocast) -> bool:
    """The Function's torch path may call GroupNorm's aten forward and backward directly (no
    autograd graph, no torch.autograd.grad inside a backward): autocast off (under autocast
    F.group_norm casts, which only the graph path reproduces), one dtype throughout, and x
    contiguous (other layouts F.group_norm lays out by rules of its own; they take the graph path)."""
    return (not autocast[1] and x.dim() >= 2 and x.is_floating_point() and x.is_contiguous()
            and all(t is None or t.dtype == x.dtype for t in (weight, bias)))


def norm_act_project(x: torch.Tensor, norm: nn.GroupNorm, act: str | None, proj: nn.Module,
                     backend: str = "torch") -> torch.Tensor:
    """proj(act(norm(x))) for a GroupNorm `norm` and a plain nn.Conv2d or nn.Linear `proj` (a
    linear sees the (B, H*W, C) tokens), saving only x (and, with the GroupNorm `backend`
    "triton" or "native", its statistics) for backward."""
    if backend != "triton" and x.dim() == 4 and _native_takes(x, norm.weight, norm.bias, proj.weight, proj.bias):
        fused = backend == "native" and refl_kernels.group_norm_runs("native", x)
        conv = isinstance(proj, nn.Conv2d)
        geometry = (proj.stride, proj.padding, proj.dilation, proj.groups) if conv else ((1, 1), (0, 0), (1, 1), 1)
        return torch.ops.refl.norm_act_project(x, norm.weight, norm.bias, proj.weight, proj.bias, norm.num_groups,
                                               norm.eps, act == "silu", not conv, *geometry, fused)
    if isinstance(proj, nn.Conv2d):
        spec = _conv_spec(proj, act, "conv", norm.num_groups, norm.eps, backend)
    else:
        spec = _Spec(norm.num_groups, norm.eps, act, "linear", norm=backend)
    return _NormActProject.apply(x, norm.weight, norm.bias, proj.weight, proj.bias, spec)


# ---------------------------------------------------------------------- GEGLU gating

class _GegluGate(torch.autograd.Function):
    """a * gelu(g) for (a, g) = h.chunk(2, -1), saving h only."""

    @staticmethod
    def forward(ctx, h):
        a, g = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        ctx.autocast = _autocast_state(h.device)
        return a * F.gelu(g)

    @staticmethod
    def backward(ctx, grad_out):
        (h,) = ctx.saved_tensors
        if not ctx.autocast[1] and grad_out.dtype == h.dtype:  # the aten backward ops, called directly
            a, g = h.chunk(2, dim=-1)
            return torch.cat([grad_out * F.gelu(g), torch.ops.aten.gelu_backward(grad_out * a, g)], dim=-1)
        with torch.enable_grad(), _autocast(ctx.autocast):
            hd = h.detach().requires_grad_(True)
            a, g = hd.chunk(2, dim=-1)
            out = a * F.gelu(g)
        return torch.autograd.grad(out, hd, grad_out)[0]


def geglu_gate(h: torch.Tensor) -> torch.Tensor:
    if _native_takes(h):
        return torch.ops.refl.geglu_gate(h)
    return _GegluGate.apply(h)


# ---------------------------------------------------------------------- frozen convolutions

class _FrozenConv(torch.autograd.Function):
    """conv2d with a frozen weight: its backward needs the weight only, but torch's convolution
    saves the input regardless (the VAE's, the LoRA UNet's upsampler, proj_out, shortcut convs).
    Saves nothing; backward computes the input gradient from the input's shape."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: _Spec):
        out = F.conv2d(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.conv_groups)
        ctx.save_for_backward(weight)
        ctx.spec, ctx.x_shape, ctx.x_dtype, ctx.out_dtype = spec, x.shape, x.dtype, out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        spec, dt = ctx.spec, ctx.out_dtype
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight.to(dt), grad_out.to(dt), spec.stride, spec.padding,
                                            spec.dilation, spec.conv_groups)
        return grad_x.to(ctx.x_dtype), None, None, None


def _conv_spec(conv: nn.Conv2d, act=None, kind="conv", groups=0, eps=0.0, norm="torch") -> _Spec:
    return _Spec(groups, eps, act, kind, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups,
                 norm)


def frozen_conv_eligible(conv: nn.Conv2d) -> bool:
    frozen = not conv.weight.requires_grad and (conv.bias is None or not conv.bias.requires_grad)
    return frozen and plain_proj(conv) and not partitioned(conv)


def frozen_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if _native_takes(x, conv.weight, conv.bias):
        return torch.ops.refl.frozen_conv(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                          conv.groups)
    return _FrozenConv.apply(x, conv.weight, conv.bias, _conv_spec(conv))


# ---------------------------------------------------------------------- the module patterns

def plain_group_norm(m) -> bool:
    return isinstance(m, nn.GroupNorm) and m.affine


def plain_proj(m) -> bool:
    # exactly the torch classes (or patch.py's subclass that only routes forward): a peft LoRA
    # wrapper, or anything else, keeps the stock path
    cls = getattr(type(m), "refl_stock_class", type(m))
    if cls is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return cls is nn.Linear


def partitioned(module: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 gathers a submodule's parameters in that submodule's own forward hook; the
    Functions here read them directly, so partitioned modules keep the stock path."""
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=True))


def resnet_eligible(m) -> bool:
    dropout_off = (not m.training) or float(getattr(m.dropout, "p", 0.0)) == 0.0
    return (m.time_embedding_norm != "scale_shift" and m.upsample is None and m.downsample is None
            and isinstance(m.nonlinearity, nn.SiLU) and dropout_off
            and plain_group_norm(m.norm1) and plain_group_norm(m.norm2)
            and plain_proj(m.conv1) and plain_proj(m.conv2) and not partitioned(m))


def resnet(block, input_tensor, temb, backend: str = "torch"):
    """The sequence of diffusers' ResnetBlock2D.forward for time_embedding_norm "default" (UNets)
    and "group" (VAEs: the time embedding, if any, is not added), in lean form."""
    hidden = norm_act_project(input_tensor, block.norm1, "silu", block.conv1, backend)
    if block.time_emb_proj is not None:
        if not block.skip_time_act:
            temb = block.nonlinearity(temb)
        temb = block.time_emb_proj(temb)[:, :, None, None]
    if temb is not None and block.time_embedding_norm == "default":
        hidden = hidden + temb
    hidden = norm_act_project(hidden, block.norm2, "silu", block.conv2, backend)
    if block.conv_shortcut is not None:
        input_tensor = block.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / block.output_scale_factor


def geglu_eligible(m) -> bool:
    return not partitioned(m)


def geglu(m, hidden_states):
    return geglu_gate(m.proj(hidden_states))


def continuous_inputs_eligible(m) -> bool:
    return (plain_group_norm(m.norm) and plain_proj(m.proj_in)
            and not partitioned(m.norm) and not partitioned(m.proj_in))


def continuous_inputs(m, hidden_states, backend: str = "torch"):
    """Transformer2DModel._operate_on_continuous_inputs in lean form: norm -> proj_in."""
    batch, _, height, width = hidden_states.shape
    out = norm_act_project(hidden_states, m.norm, None, m.proj_in, backend)
    if not m.use_linear_projection:
        inner_dim = out.shape[1]
        out = out.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim)
    else:
        inner_dim = hidden_states.shape[1]
    return out, inner_dim

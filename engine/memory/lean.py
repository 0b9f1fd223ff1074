"""Lean recomputation: drop the cheap-but-large tensors a UNet call would save
for backward and recompute them locally, inside the backward of the op that needs them.

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

The mode is active only inside `lean_mode()`: recompute.py's `lean` call kind runs a
window step in it (kept for every step, so not flat in K), and its `selective` kind runs a
checkpointed step in it, forward and recompute alike (flat in K). `none` and `full` steps of the
same model run the stock modules. Installed by `install(unet)`: it sets an instance-level
`forward` on eligible modules that falls back to the class's `forward` (stock diffusers, or a
`--kernels triton` subclass) whenever the mode is off or the module does not match the pattern
(a LoRA-wrapped conv, dropout > 0, scale-shift time norm, an up/down-sampling resnet, ZeRO-3
partitioned parameters). In the mode, ResNet blocks use a plain GroupNorm inside the Function
rather than the Triton GroupNorm+SiLU kernel: the Function saves less (one tensor, not two). On
CPU that GroupNorm(+SiLU) is the fused native op of refl_kernels.native when its library is built
(forward and backward in one C++ kernel each; the backward reuses the forward's statistics), else
torch's two ops.

The same applies to a VAE (`MemoryPolicy.lean_decode`): its ResnetBlock2Ds and its frozen
convolutions. A frozen convolution's backward needs only its weight, yet torch's convolution saves
its input regardless; `_FrozenConv` saves nothing (the 2x-upsampled input of every upsampler conv
is the largest such tensor).
"""
from __future__ import annotations

import contextlib
import threading
import types
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from refl_kernels import native

_state = threading.local()


def is_active() -> bool:
    return getattr(_state, "active", False) and torch.is_grad_enabled()


@contextlib.contextmanager
def lean_mode(enabled: bool = True):
    """Run the installed modules in lean mode inside this block."""
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


def _use_native(x: torch.Tensor) -> bool:
    # The fused C++ GroupNorm(+SiLU) of refl_kernels.native, on CPU (on GPU its CUDA build has not
    # been timed against torch's, so GPUs keep torch's GroupNorm here). Not under autocast, where
    # torch runs GroupNorm in fp32 and this mode's forward stays bit-identical to the stock one
    # only with the same ops; the trainer's CPU runs are fp32.
    return (x.device.type == "cpu" and x.dtype in native.DTYPES and not torch.is_autocast_enabled("cpu")
            and native.available("cpu"))


def _native_norm_act(x, weight, bias, spec: _Spec):
    return torch.ops.refl.group_norm_silu(x, weight, bias, spec.groups, spec.eps, spec.act == "silu")


class _NormActProject(torch.autograd.Function):
    """proj(act(group_norm(x))) saving x only (parameters are referenced, not copied; with the
    native op also its per-(sample, group) fp32 mean and rstd, 8 bytes per group)."""

    @staticmethod
    def forward(ctx, x, norm_w, norm_b, proj_w, proj_b, spec: _Spec):
        stats = ()
        if _use_native(x):
            a, *stats = _native_norm_act(x, norm_w, norm_b, spec)
        else:
            a = _norm_act(x, norm_w, norm_b, spec)
        out = _project(a, proj_w, proj_b, spec)
        ctx.save_for_backward(x, norm_w, norm_b, proj_w, proj_b, *stats)
        ctx.spec = spec
        ctx.autocast = _autocast_state(x.device)
        ctx.out_dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, norm_w, norm_b, proj_w, proj_b, *stats = ctx.saved_tensors
        spec, needs = ctx.spec, ctx.needs_input_grad
        if stats:  # native: recompute the activation; its backward (below) uses the saved statistics
            a = _native_norm_act(x, norm_w, norm_b, spec)[0]
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
            grads = torch.ops.refl.group_norm_silu_backward(grad_a, x, norm_w, norm_b, *stats, spec.act == "silu")
            out = [gr if need else None for gr, need in zip(grads, needs[:3])]
        else:
            leaves = [t for t in (xd, nw, nb) if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(a, leaves, grad_a.to(a.dtype)) if leaves else ())
            out = [next(grads) if t is not None and t.requires_grad else None for t in (xd, nw, nb)]
        cast = lambda gr, p: None if gr is None else gr.to(p.dtype)  # noqa: E731
        return out[0], out[1], out[2], cast(grad_pw, proj_w), cast(grad_pb, proj_b), None


def norm_act_project(x: torch.Tensor, norm: nn.GroupNorm, act: str | None, proj: nn.Module) -> torch.Tensor:
    """proj(act(norm(x))) for a GroupNorm `norm` and a plain nn.Conv2d or nn.Linear `proj` (a
    linear sees the (B, H*W, C) tokens), saving only x for backward."""
    if isinstance(proj, nn.Conv2d):
        spec = _conv_spec(proj, act, "conv", norm.num_groups, norm.eps)
    else:
        spec = _Spec(norm.num_groups, norm.eps, act, "linear")
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
        with torch.enable_grad(), _autocast(ctx.autocast):
            hd = h.detach().requires_grad_(True)
            a, g = hd.chunk(2, dim=-1)
            out = a * F.gelu(g)
        return torch.autograd.grad(out, hd, grad_out)[0]


def geglu_gate(h: torch.Tensor) -> torch.Tensor:
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


def _conv_spec(conv: nn.Conv2d, act=None, kind="conv", groups=0, eps=0.0) -> _Spec:
    return _Spec(groups, eps, act, kind, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation), conv.groups)


def _conv_forward(self, x, *args, **kwargs):
    frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
    if not is_active() or not frozen or not _plain_proj(self) or args or kwargs or _partitioned(self):
        return type(self).forward(self, x, *args, **kwargs)
    return _FrozenConv.apply(x, self.weight, self.bias, _conv_spec(self))


# ---------------------------------------------------------------------- installation

def _plain_group_norm(m) -> bool:
    return isinstance(m, nn.GroupNorm) and m.affine


def _plain_proj(m) -> bool:
    # exactly the torch classes: a peft LoRA wrapper (or anything else) keeps the stock path
    if type(m) is nn.Conv2d:
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    return type(m) is nn.Linear


def _partitioned(module: nn.Module) -> bool:
    """DeepSpeed ZeRO-3 gathers a submodule's parameters in that submodule's own forward hook; the
    Functions here read them directly, so partitioned modules keep the stock path."""
    return any(hasattr(p, "ds_id") for p in module.parameters(recurse=True))


def _resnet_eligible(m) -> bool:
    dropout_off = (not m.training) or float(getattr(m.dropout, "p", 0.0)) == 0.0
    return (m.time_embedding_norm != "scale_shift" and m.upsample is None and m.downsample is None
            and isinstance(m.nonlinearity, nn.SiLU) and dropout_off
            and _plain_group_norm(m.norm1) and _plain_group_norm(m.norm2)
            and _plain_proj(m.conv1) and _plain_proj(m.conv2))


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    if not is_active() or not _resnet_eligible(self) or _partitioned(self):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    # the sequence of diffusers' ResnetBlock2D.forward for time_embedding_norm "default" (UNets)
    # and "group" (VAEs: the time embedding, if any, is not added)
    hidden = norm_act_project(input_tensor, self.norm1, "silu", self.conv1)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]
    if temb is not None and self.time_embedding_norm == "default":
        hidden = hidden + temb
    hidden = norm_act_project(hidden, self.norm2, "silu", self.conv2)
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden) / self.output_scale_factor


def _geglu_forward(self, hidden_states, *args, **kwargs):
    if not is_active() or _partitioned(self):
        return type(self).forward(self, hidden_states, *args, **kwargs)
    return geglu_gate(self.proj(hidden_states))


def _continuous_inputs(self, hidden_states):
    if (not is_active() or not (_plain_group_norm(self.norm) and _plain_proj(self.proj_in))
            or _partitioned(self.norm) or _partitioned(self.proj_in)):
        return type(self)._operate_on_continuous_inputs(self, hidden_states)
    batch, _, height, width = hidden_states.shape
    out = norm_act_project(hidden_states, self.norm, None, self.proj_in)
    if not self.use_linear_projection:
        inner_dim = out.shape[1]
        out = out.permute(0, 2, 3, 1).reshape(batch, height * width, inner_dim)
    else:
        inner_dim = hidden_states.shape[1]
    return out, inner_dim


def install(unet: nn.Module) -> int:
    """Give the eligible modules of a UNet or VAE their selective forward (idempotent). Returns
    how many modules have it."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    count = 0
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D):
            name, fn = "forward", _resnet_forward
        elif isinstance(m, GEGLU):
            name, fn = "forward", _geglu_forward
        elif isinstance(m, Transformer2DModel) and getattr(m, "is_input_continuous", False):
            name, fn = "_operate_on_continuous_inputs", _continuous_inputs
        elif type(m) is nn.Conv2d:
            name, fn = "forward", _conv_forward
        else:
            continue
        if name not in m.__dict__:
            setattr(m, name, types.MethodType(fn, m))
        count += 1
    unet._refl_lean_installed = True
    return count


def report_partitioned(unet: nn.Module) -> list[str]:
    """Name, once in the log, the modules whose selective forward falls back to the stock one
    because DeepSpeed ZeRO-3 partitions their weights; returns their names."""
    import logging
    from collections import Counter

    ours = (_resnet_forward, _geglu_forward, _conv_forward, _continuous_inputs)
    names = [n for n, m in unet.named_modules()
             if any(getattr(m.__dict__.get(k), "__func__", None) in ours for k in ("forward", "_operate_on_continuous_inputs"))
             and _partitioned(m)]
    if names:
        kinds = Counter(type(unet.get_submodule(n)).__name__ for n in names)
        logging.getLogger("refl_engine").info(
            "ZeRO-3: %d modules keep the stock forward in lean mode (partitioned weights): %s; e.g. %s",
            len(names), ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())), ", ".join(names[:3]))
    return names


def ensure_installed(unet: nn.Module | None) -> None:
    if unet is not None and not getattr(unet, "_refl_lean_installed", False):
        install(unet)

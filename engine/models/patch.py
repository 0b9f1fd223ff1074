"""How the diffusers modules of a UNet or VAE run: the one place that decides a module's forward.

    patch(model, kernels="torch" | "triton" | "native" | "xformers" | "auto", attention=True)

Each module kind the engine changes gets, once, a subclass of its diffusers (or torch) class that
overrides only the forward, swapped in as the module's class: parameter names, state dicts, LoRA
adapters and checkpoints are untouched. The forward decides per call, in this order:

  1. lean mode on (engine/memory/lean.py: the `lean` and `selective` recompute kinds, the VAE
     decode) and the module fits lean's pattern: lean's autograd Functions, whose GroupNorm(+SiLU)
     runs, forward and backward-time recompute alike, on the model's GroupNorm backend;
  2. else a fused GroupNorm backend ("triton", "native"): the ResNet block's GroupNorm -> SiLU
     pairs as one fused op;
  3. else the stock diffusers forward.

Checkpointing composes with this: a checkpoint (engine/memory/recompute.py) wraps a whole UNet
call, and its recompute runs these same forwards, in lean mode when the call's kind says so.

The kernels (`--kernels`):
- every diffusers `Attention` (self and cross) gets `FusedAttnProcessor(backend)`, which runs the
  same projections as diffusers' AttnProcessor2_0 and calls `refl_kernels.attention` for the
  softmax(QK^T)V core ("triton": the fused kernel that saves only O and the log-sum-exp;
  "xformers": that library). A call with an attention mask falls back to PyTorch SDPA (the fused
  kernel has no mask input; SD/SDXL UNets pass none). `attention=False` (the VAE) keeps them;
- with "triton" the GroupNorm -> SiLU pairs of every ResnetBlock2D (norm1 -> act and, for
  time_embedding_norm="default", norm2 -> act) and the UNet's conv_norm_out -> conv_act run as one
  fused GroupNorm+SiLU, and every other nn.GroupNorm as the fused GroupNorm without activation;
- "native": the same GroupNorms (GroupNorm -> SiLU pairs fused, the others alone) run the C++ op of
  refl_kernels.native (CPU; needs the library `make install` builds); attention keeps PyTorch SDPA.
  The GroupNorms alone measured 0.95-2.5x torch's per SD1.5 shape, and routing them too was as fast
  or faster than leaving them to torch in 12 of 12 quiet-machine runs of benchmarks/kernel_speed.py
  (fp32/bf16, batch 1/2, sum per UNet forward);
- "torch" runs the stock diffusers modules (and lean's torch ops);
- "auto" is what refl_kernels picks for GroupNorm on the model's device: "triton" on CUDA (or
  under Triton's CPU interpreter), "native" on CPU when its library is built, else "torch".
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel

import refl_kernels

from ..memory import lean

KERNELS = ("torch", "triton", "native", "xformers", "auto")
FUSED_NORM = ("triton", "native")  # the GroupNorm backends besides torch's


class FusedAttnProcessor:
    """diffusers attention processor whose attention core is `refl_kernels.attention(backend)`."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, key_len, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        # (B, N, H*D) -> (B, H, N, D) as strided views; the kernels take the strides as they are
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = refl_kernels.attention(query, key, value, scale=attn.scale, backend=self.backend)
        else:
            hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _norm_backend(module: nn.Module) -> str:
    return module.__dict__.get("_refl_norm_backend", "torch")


def _fused_norm(norm: nn.GroupNorm, x: torch.Tensor, activation: str | None, backend: str) -> torch.Tensor:
    return refl_kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                   activation=activation, backend=backend)


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by the fused Triton kernel (no activation)."""

    def forward(self, x):
        return _fused_norm(self, x, None, _norm_backend(self))


class FusedGroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU in one fused kernel; the SiLU module after it becomes Identity."""

    def forward(self, x):
        return _fused_norm(self, x, "silu", _norm_backend(self))


def _fusable(block: ResnetBlock2D) -> bool:
    return isinstance(block.nonlinearity, nn.SiLU) and block.time_embedding_norm in ("default", "scale_shift")


class ReflResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D run lean (in lean mode), with its GroupNorm -> SiLU pairs fused (a fused
    GroupNorm backend), or stock."""

    refl_stock_class = ResnetBlock2D

    def forward(self, input_tensor, temb, *args, **kwargs):
        backend = _norm_backend(self)
        if lean.is_active() and lean.resnet_eligible(self):
            return lean.resnet(self, input_tensor, temb, backend)
        if backend in FUSED_NORM and _fusable(self):
            return self._fused_forward(input_tensor, temb, backend)
        return super().forward(input_tensor, temb, *args, **kwargs)

    def _fused_forward(self, input_tensor, temb, backend):
        # the sequence of operations of diffusers' ResnetBlock2D.forward (deprecated `scale` dropped)
        hidden_states = _fused_norm(self.norm1, input_tensor, "silu", backend)
        if self.upsample is not None:
            if hidden_states.shape[0] >= 64:
                input_tensor = input_tensor.contiguous()
                hidden_states = hidden_states.contiguous()
            input_tensor = self.upsample(input_tensor)
            hidden_states = self.upsample(hidden_states)
        elif self.downsample is not None:
            input_tensor = self.downsample(input_tensor)
            hidden_states = self.downsample(hidden_states)
        hidden_states = self.conv1(hidden_states)

        if self.time_emb_proj is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]

        if self.time_embedding_norm == "default":
            if temb is not None:
                hidden_states = hidden_states + temb
            hidden_states = _fused_norm(self.norm2, hidden_states, "silu", backend)
        else:  # "scale_shift": the modulation sits between the norm and the activation
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = _fused_norm(self.norm2, hidden_states, None, backend)
            hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


class ReflGEGLU(GEGLU):
    """GEGLU whose gating saves only the projection output in lean mode."""

    refl_stock_class = GEGLU

    def forward(self, hidden_states, *args, **kwargs):
        if lean.is_active() and lean.geglu_eligible(self):
            return lean.geglu(self, hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


class ReflTransformer2DModel(Transformer2DModel):
    """Transformer2DModel whose input norm -> proj_in runs lean in lean mode."""

    refl_stock_class = Transformer2DModel

    def _operate_on_continuous_inputs(self, hidden_states):
        if lean.is_active() and lean.continuous_inputs_eligible(self):
            return lean.continuous_inputs(self, hidden_states, _norm_backend(self))
        return super()._operate_on_continuous_inputs(hidden_states)


class ReflConv2d(nn.Conv2d):
    """nn.Conv2d that, frozen and in lean mode, saves nothing for backward."""

    refl_stock_class = nn.Conv2d

    def forward(self, input):
        if lean.is_active() and lean.frozen_conv_eligible(self):
            return lean.frozen_conv(self, input)
        return super().forward(input)


_ROUTED = {cls.refl_stock_class: cls for cls in (ReflResnetBlock2D, ReflGEGLU, ReflTransformer2DModel, ReflConv2d)}
_FUSED_NORMS = (FusedGroupNorm, FusedGroupNormSiLU)


def _unfuse(model: nn.Module) -> None:
    """Back to stock GroupNorms, conv_act and attention processors (the routed classes stay)."""
    for module in model.modules():
        if type(module) in _FUSED_NORMS:
            module.__class__ = nn.GroupNorm
        module.__dict__.pop("_refl_norm_backend", None)
        if isinstance(module, Attention) and isinstance(module.processor, FusedAttnProcessor):
            module.set_processor(getattr(module, "_refl_stock_processor", AttnProcessor2_0()))
    stock_act = model.__dict__.pop("_refl_conv_act", None)
    if stock_act is not None:
        model.conv_act = stock_act


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def patch(model: nn.Module, kernels: str | None = None, *, attention: bool = True) -> str:
    """Give `model`'s modules the engine's forwards (idempotent) with the `kernels` backend; None
    keeps the one it has ("torch" for a model never patched). Returns the backend ("auto"
    resolved). Raises ValueError with a one-line reason and fix if the backend cannot run here."""
    if kernels is None:
        kernels = model.__dict__.get("_refl_kernels", "torch")
    if kernels not in KERNELS:
        raise ValueError(f"--kernels {kernels!r} is not a kernel backend; choose one of {', '.join(KERNELS)}")
    device = _device_of(model)
    if kernels == "auto":
        kernels = refl_kernels.auto_group_norm_backend(device)
    reason = {
        "triton": refl_kernels.triton_unavailable_reason,
        "xformers": refl_kernels.xformers_unavailable_reason,
        "native": refl_kernels.native.unavailable_reason,
    }.get(kernels, lambda d: None)(device)
    if reason is not None:
        raise ValueError(f"--kernels {kernels} is unavailable: {reason}")

    _unfuse(model)
    norm_backend = kernels if kernels in FUSED_NORM else "torch"
    fused_silu = set()  # GroupNorms a fused ResNet block runs itself
    for module in model.modules():
        routed = _ROUTED.get(type(module))
        if routed is not None:
            module.__class__ = routed
        if type(module) in _ROUTED.values():
            module.__dict__["_refl_norm_backend"] = norm_backend
        if isinstance(module, ReflResnetBlock2D) and _fusable(module):
            fused_silu.update({id(module.norm1), id(module.norm2)})
    if attention and kernels in ("triton", "xformers"):
        for module in model.modules():
            if isinstance(module, Attention):
                if not hasattr(module, "_refl_stock_processor"):
                    module._refl_stock_processor = module.processor
                module.set_processor(FusedAttnProcessor(kernels))
    if norm_backend != "torch":
        conv_norm_out = getattr(model, "conv_norm_out", None)
        if isinstance(conv_norm_out, nn.GroupNorm) and isinstance(getattr(model, "conv_act", None), nn.SiLU):
            conv_norm_out.__class__ = FusedGroupNormSiLU
            conv_norm_out.__dict__["_refl_norm_backend"] = norm_backend
            fused_silu.add(id(conv_norm_out))
            model.__dict__["_refl_conv_act"] = model.conv_act  # kept outside _modules: not a submodule
            model.conv_act = nn.Identity()
        for module in model.modules():
            if type(module) is nn.GroupNorm and id(module) not in fused_silu:
                module.__class__ = FusedGroupNorm
                module.__dict__["_refl_norm_backend"] = norm_backend
    model.__dict__["_refl_kernels"] = kernels
    return kernels


def ensure_patched(model: nn.Module | None) -> None:
    """patch(model) unless it already is (the recompute kinds that run a model in lean mode)."""
    if model is not None and "_refl_kernels" not in model.__dict__:
        patch(model)


def report_partitioned(model: nn.Module) -> list[str]:
    """Name, once in the log, the modules that keep the stock forward in lean mode because
    DeepSpeed ZeRO-3 partitions their weights; returns their names."""
    import logging
    from collections import Counter

    routed = tuple(_ROUTED.values())
    names = [n for n, m in model.named_modules() if isinstance(m, routed) and lean.partitioned(m)]
    if names:
        kinds = Counter(type(model.get_submodule(n)).refl_stock_class.__name__ for n in names)
        logging.getLogger("refl_engine").info(
            "ZeRO-3: %d modules keep the stock forward in lean mode (partitioned weights): %s; e.g. %s",
            len(names), ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())), ", ".join(names[:3]))
    return names

"""Swap the fused kernels of refl_kernels into a diffusers UNet (`--kernels`).

    apply_kernels(unet, "triton" | "native" | "torch" | "sdpa" | "xformers")

- every diffusers `Attention` (self and cross) gets `FusedAttnProcessor(backend)`, which runs the
  same projections as diffusers' AttnProcessor2_0 and calls `refl_kernels.attention` for the
  softmax(QK^T)V core ("triton": the fused kernel that saves only O and the log-sum-exp; "sdpa",
  "xformers": those libraries). A call with an attention mask falls back to PyTorch SDPA (the
  fused kernel has no mask input; SD/SDXL UNets pass none);
- with "triton" also the GroupNorm -> SiLU pairs of every ResnetBlock2D (norm1 -> act and, for
  time_embedding_norm="default", norm2 -> act) and the UNet's conv_norm_out -> conv_act run as one
  fused GroupNorm+SiLU, and every other nn.GroupNorm as the fused GroupNorm without activation;
- "native": the GroupNorm -> SiLU pairs fused by the C++ op of refl_kernels.native (CPU; needs the
  library `make install` builds); GroupNorms without SiLU and attention keep the stock modules
  (torch's GroupNorm, PyTorch SDPA), which the native op does not beat;
- "torch" leaves (or restores) the stock diffusers modules.

Modules are patched in place by swapping their class for a subclass that only overrides
`forward`, so parameter names, state dicts, LoRA adapters and checkpoints are untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D

import refl_kernels

BACKENDS = ("torch", "triton", "native", "sdpa", "xformers")


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


def _fused_norm(norm: nn.GroupNorm, x: torch.Tensor, activation: str | None, owner: nn.Module | None = None) -> torch.Tensor:
    # the GroupNorm backend ("triton" or "native") is recorded on the patched module by apply_kernels
    backend = (owner or norm).__dict__.get("_refl_norm_backend", "triton")
    return refl_kernels.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                   activation=activation, backend=backend)


class FusedGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by the fused Triton kernel (no activation)."""

    def forward(self, x):
        return _fused_norm(self, x, None)


class FusedGroupNormSiLU(nn.GroupNorm):
    """nn.GroupNorm followed by SiLU in one fused kernel; the SiLU module after it becomes Identity."""

    def forward(self, x):
        return _fused_norm(self, x, "silu")


class FusedResnetBlock2D(ResnetBlock2D):
    """ResnetBlock2D whose GroupNorm -> SiLU pairs run as fused GroupNorm+SiLU. The sequence of
    operations is that of diffusers' ResnetBlock2D.forward (deprecated `scale` argument dropped)."""

    def forward(self, input_tensor, temb, *args, **kwargs):
        hidden_states = _fused_norm(self.norm1, input_tensor, "silu", self)
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
            hidden_states = _fused_norm(self.norm2, hidden_states, "silu", self)
        else:  # "scale_shift": the modulation sits between the norm and the activation
            if temb is None:
                raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            hidden_states = _fused_norm(self.norm2, hidden_states, None, self)
            hidden_states = self.nonlinearity(hidden_states * (1 + time_scale) + time_shift)

        hidden_states = self.dropout(hidden_states)
        hidden_states = self.conv2(hidden_states)
        if self.conv_shortcut is not None:
            if self.training:
                input_tensor = input_tensor.contiguous()
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + hidden_states) / self.output_scale_factor


_STOCK = {FusedGroupNorm: nn.GroupNorm, FusedGroupNormSiLU: nn.GroupNorm, FusedResnetBlock2D: ResnetBlock2D}


def _restore_stock(unet: nn.Module) -> None:
    for module in unet.modules():
        if type(module) in _STOCK:
            module.__class__ = _STOCK[type(module)]
            module.__dict__.pop("_refl_norm_backend", None)
        if isinstance(module, Attention) and isinstance(module.processor, FusedAttnProcessor):
            module.set_processor(getattr(module, "_refl_stock_processor", AttnProcessor2_0()))
    stock_act = unet.__dict__.pop("_refl_conv_act", None)
    if stock_act is not None:
        unet.conv_act = stock_act


def _device_of(unet: nn.Module) -> torch.device:
    for p in unet.parameters():
        return p.device
    return torch.device("cpu")


def apply_kernels(unet: nn.Module, backend: str) -> None:
    """Route the UNet's attention (and with "triton" or "native" its GroupNorm(+SiLU)) through refl_kernels.

    Raises ValueError with a one-line reason and fix if the backend cannot run here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"--kernels {backend!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    device = _device_of(unet)
    reason = {
        "triton": refl_kernels.triton_unavailable_reason,
        "sdpa": refl_kernels.sdpa_unavailable_reason,
        "xformers": refl_kernels.xformers_unavailable_reason,
        "native": refl_kernels.native.unavailable_reason,
    }.get(backend, lambda d: None)(device)
    if reason is not None:
        raise ValueError(f"--kernels {backend} is unavailable: {reason}")

    _restore_stock(unet)
    if backend == "torch":
        return
    for module in unet.modules():
        if isinstance(module, Attention) and backend != "native":
            if not hasattr(module, "_refl_stock_processor"):
                module._refl_stock_processor = module.processor
            module.set_processor(FusedAttnProcessor(backend))
    if backend not in ("triton", "native"):
        return

    fused_silu = set()
    for module in unet.modules():
        if type(module) is ResnetBlock2D and isinstance(module.nonlinearity, nn.SiLU) \
                and module.time_embedding_norm in ("default", "scale_shift"):
            module.__class__ = FusedResnetBlock2D
            module.__dict__["_refl_norm_backend"] = backend
            fused_silu.update({id(module.norm1), id(module.norm2)})
    conv_norm_out = getattr(unet, "conv_norm_out", None)
    if isinstance(conv_norm_out, nn.GroupNorm) and isinstance(getattr(unet, "conv_act", None), nn.SiLU):
        conv_norm_out.__class__ = FusedGroupNormSiLU
        conv_norm_out.__dict__["_refl_norm_backend"] = backend
        fused_silu.add(id(conv_norm_out))
        unet.__dict__["_refl_conv_act"] = unet.conv_act  # kept outside _modules: not a submodule
        unet.conv_act = nn.Identity()
    for module in unet.modules():
        # native: only where it fuses the SiLU; a GroupNorm alone is as fast in torch and saves the same
        if type(module) is nn.GroupNorm and id(module) not in fused_silu and backend == "triton":
            module.__class__ = FusedGroupNorm
            module.__dict__["_refl_norm_backend"] = backend

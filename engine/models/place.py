"""The loaded models made ready to train: on the run's device, in the run's dtypes, the trained
weights chosen, the kernels patched in (models/patch.py: the one place that decides each module's
forward, kernel backend and lean mode).

    frozen parts   VAE and text encoders: no grad, eval, in the training dtype (a `force_upcast`
                   VAE stays fp32 under fp16, as its pipeline decodes)
    the UNet       LoRA: the frozen base in the training dtype, the adapters in fp32 (the optimizer
                   steps fp32 weights); full fine-tuning: the whole UNet in fp32, autocast computes
                   in the training dtype
"""
from __future__ import annotations

import torch

from ..config import ConfigError, ModelConfig
from .load import Components, vae_dtype
from .lora import add_lora
from .patch import patch


def place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to device, casting only when some parameter is not already `dtype` (diffusers warns on
    every cast through `.to(dtype)`, even a no-op one)."""
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(device, dtype)
    else:
        module.to(device)


def _patch(model, kernels: str, **kwargs) -> None:
    try:
        patch(model, kernels, **kwargs)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def place_frozen(c: Components, device: torch.device, weight_dtype: torch.dtype, kernels: str = "torch") -> None:
    """The VAE and the text encoders: frozen, in eval mode, on `device`; the VAE's GroupNorms on the
    `--kernels` backend (its lean decode included), its attention stock."""
    for module in (c.vae, c.text_encoder, c.text_encoder_2):
        if module is not None:
            dtype = vae_dtype(c.vae.config, weight_dtype) if module is c.vae else weight_dtype
            place(module.requires_grad_(False).eval(), device, dtype)
    _patch(c.vae, kernels, attention=False)


def prepare_unet(unet, m: ModelConfig, device: torch.device, weight_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """LoRA adapters added (`--rank` > 0) or the whole UNet trained, placed, `--kernels` patched
    in; returns the parameters the optimizer steps."""
    params = add_lora(unet, m.rank, m.lora_alpha, m.lora_target_modules)
    if m.rank > 0:  # frozen base in the training dtype, adapters in fp32
        place(unet, device, weight_dtype)
        for p in params:
            p.data = p.data.float()
    else:
        unet.to(device)
    _patch(unet, m.kernels)  # whatever the backend: lean mode acts through the patched forwards
    return params

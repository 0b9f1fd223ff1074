"""Trainable parameters: LoRA adapters through peft on the UNet attention projections, or the
whole UNet (`--rank 0`)."""
from __future__ import annotations

import torch


def add_lora(unet, rank: int, alpha: float = 0.0, target_modules: str = "to_q,to_k,to_v,to_out.0",
             adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze the UNet and add a LoRA adapter; returns the trainable parameters.

    rank 0 means full fine-tuning: every UNet parameter trains."""
    if rank == 0:
        unet.requires_grad_(True)
        return [p for p in unet.parameters()]
    from peft import LoraConfig

    modules = [m.strip() for m in target_modules.split(",") if m.strip()]
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=modules)
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as e:
        from ..config import ConfigError

        raise ConfigError(f"--lora_target_modules {target_modules!r}: {str(e).splitlines()[0]}") from None
    return [p for p in unet.parameters() if p.requires_grad]


def has_lora(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))

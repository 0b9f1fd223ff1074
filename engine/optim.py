"""The optimizers: torch AdamW, bitsandbytes' AdamW8bit, DeepSpeed's CPU Adam under offload.

Where the optimizer state lives decides which one runs:
    adamw       torch.optim.AdamW; with --offload, DeepSpeed builds torch's AdamW itself on the CPU
                copies of the parameters ("torch_adam": true: no extension to compile)
    adamw8bit   bitsandbytes' AdamW8bit: both moments in 8 bits with a per-block scale, about a
                quarter of AdamW's 8 bytes per parameter; its state stays beside the parameters, so
                it cannot run with --offload
    cpu-adam    DeepSpeedCPUAdam, the vectorised CPU Adam that ZeRO-Offload is built around; it
                steps the CPU copies, so it needs --offload (a C++ extension compiled once, cached
                in TORCH_EXTENSIONS_DIR)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import ConfigError, OptimConfig

OPTIMIZERS = ("adamw", "adamw8bit", "cpu-adam")


def adam_kwargs(o: OptimConfig) -> dict:
    return dict(lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_epsilon,
                weight_decay=o.weight_decay)


def build_optimizer(params, o: OptimConfig) -> torch.optim.Optimizer:
    """The client optimizer for a run whose optimizer state sits beside the parameters."""
    kw = adam_kwargs(o)
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes; pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(params, **kw)
    if o.optimizer == "cpu-adam":
        raise ConfigError("--optimizer cpu-adam steps CPU copies of the weights; add --zero 2 --offload optimizer "
                          "(or use --optimizer adamw)")
    return torch.optim.AdamW(params, **kw)


def lr_schedule(o: OptimConfig):
    """The learning-rate schedule of the diffusers examples (--lr_scheduler, --lr_warmup_steps over
    --max_train_steps), as a function of the optimizer: DeepSpeed calls it on the optimizer it builds."""
    from diffusers.optimization import get_scheduler

    def build(optimizer):
        return get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps,
                             num_training_steps=o.max_train_steps)

    return build


def build_optimization(params, o: OptimConfig, mixed_precision: str):
    """Optimizer, LR schedule and (fp16 only) the loss scaler of a run without DeepSpeed."""
    optimizer = build_optimizer(params, o)
    scaler = torch.amp.GradScaler("cuda") if mixed_precision == "fp16" else None
    return optimizer, lr_schedule(o)(optimizer), scaler


def deepspeed_optimizer(o: OptimConfig) -> dict:
    """The `optimizer` section of a DeepSpeed config, for runs whose optimizer DeepSpeed builds
    (the offloaded ones): torch's AdamW for adamw, DeepSpeedCPUAdam for cpu-adam."""
    kw = adam_kwargs(o)
    params = dict(lr=kw["lr"], betas=list(kw["betas"]), eps=kw["eps"], weight_decay=kw["weight_decay"],
                  torch_adam=o.optimizer != "cpu-adam")
    if o.optimizer == "cpu-adam":
        use_persistent_extensions_dir()
    return {"type": "AdamW", "params": params}


def use_persistent_extensions_dir() -> str:
    """Keep JIT-built DeepSpeed ops (cpu_adam: about 70 s to compile) across runs: torch's default
    is a temp-like per-user dir that containers lose; an explicit TORCH_EXTENSIONS_DIR wins."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "refl-engine" / "torch_extensions"
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(default))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of tensors in an optimizer's state (moments, 8-bit codes and their scales)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # a DeepSpeed wrapper holds the torch optimizer
    seen: dict[int, int] = {}  # by storage: bitsandbytes shares one quantization map across parameters
    for state in inner.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                seen[v.data_ptr()] = v.numel() * v.element_size()
    return sum(seen.values())

"""Atomic checkpoints, exact resume, keep-last-N, and LoRA export for stock diffusers pipelines.

A checkpoint is a directory `checkpoint-<step>` holding
    trainable.safetensors   the parameters that train (LoRA weights, or the whole UNet)
    optimizer.pt            optimizer and LR-schedule state (and the fp16 grad scaler's)
    rng.pt                  the trainer's generator, torch's CPU and CUDA RNG states
    state.json              step, config, metrics so far
It is written into a temporary sibling and renamed into place, so a crash never leaves a half
checkpoint under the final name; `latest` is the highest complete step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: str | os.PathLike, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    rng_state: dict, state: dict, keep_last: int = 3) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=root))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(dict(state, step=step), indent=2, default=str))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(spec: str, root: str | os.PathLike) -> Path | None:
    """--resume_from_checkpoint latest|PATH -> a checkpoint directory (None: latest, but none yet)."""
    if spec == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / "state.json").exists():
        raise ConfigError(f"--resume_from_checkpoint {spec!r} is not a checkpoint directory (no state.json); "
                          "use 'latest' or a checkpoint-<step> folder")
    return path


def load_checkpoint(path: Path) -> dict:
    return dict(
        trainable=load_file(path / "trainable.safetensors"),
        optimizer=torch.load(path / "optimizer.pt", weights_only=False),
        rng=torch.load(path / "rng.pt", weights_only=False),
        state=json.loads((path / "state.json").read_text()),
    )


def export_lora(unet, out_dir: str | os.PathLike) -> Path:
    """Write `pytorch_lora_weights.safetensors` in the layout `pipeline.load_lora_weights` reads."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True)
    return out_dir / "pytorch_lora_weights.safetensors"

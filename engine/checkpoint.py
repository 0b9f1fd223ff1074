"""Checkpoints (atomic, exact resume, keep-last-N) and weight exports for stock diffusers.

A checkpoint is a folder `<output_dir>/checkpoints/checkpoint-<step>` holding
    trainable.safetensors             LoRA runs: the adapter weights under the trainer's names
    pytorch_lora_weights.safetensors  LoRA runs: the same adapters in the layout and with the
                                      adapter config (alpha included) `pipe.load_lora_weights` reads
    unet/                             full fine-tuning: the UNet as `save_pretrained` writes it; it is
                                      also what resume reads (the whole UNet is the trainable state)
    optimizer.pt                      optimizer and LR-schedule state (and the fp16 grad scaler's)
    rng.pt                            the trainer's generator, torch's CPU and CUDA RNG states
    state.json                        step, config, when it was written
Everything, exports included, is written into a temporary sibling and moved into place with one
rename; a checkpoint of the same step that is already there is renamed aside first and removed
only after the new one is in place. A crash therefore never leaves a half checkpoint under a
final name. `checkpoints/latest` names the newest checkpoint this output folder's run wrote, and
keep-last-N keeps the N most recently written ones (never the one just written): step numbers
alone would, after a resume from an earlier checkpoint, keep the abandoned continuation instead.
Folders and files get the modes the process umask gives any other output.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

_NAME = re.compile(r"^checkpoint-(\d+)$")
LATEST = "latest"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' loaders look for

log = logging.getLogger("refl_engine")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def finish_tree(path: Path) -> None:
    """Give every file and folder under `path` the mode a plain open()/mkdir() would (some writers,
    safetensors among them, create 0600 files) and flush it all to disk before the rename."""
    mask = _umask()
    for dirpath, _, files in os.walk(path):
        for name in files:
            file = os.path.join(dirpath, name)
            os.chmod(file, 0o666 & ~mask)
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
        os.chmod(dirpath, 0o777 & ~mask)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_sibling(final: Path, kind: str) -> Path:
    """A new hidden folder beside `final`. os.mkdir applies the umask (tempfile.mkdtemp would make
    it 0700, and the rename would carry that mode to the final name)."""
    for attempt in range(100):
        path = final.with_name(f".{final.name}.{kind}-{os.getpid()}-{time.time_ns()}-{attempt}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary folder beside {final}")


def install(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`. An existing `final` is renamed aside first and
    removed only once the new one is in place, so some complete copy is always on disk."""
    aside = None
    if final.exists():
        aside = _temp_sibling(final, "old")
        os.replace(final, aside / final.name)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_atomically(final: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create folder `final` with whatever `fill(folder)` writes into it, as one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "tmp")
    try:
        fill(tmp)
        finish_tree(tmp)
        install(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ------------------------------------------------------------------ checkpoints


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def _written_at(path: Path) -> tuple[int, int]:
    """When a checkpoint was written (ns), then its step: the order keep-last-N and `latest` use."""
    state = path / "state.json"
    try:
        written = int(json.loads(state.read_text()).get("written_at_ns", 0)) or state.stat().st_mtime_ns
    except (OSError, ValueError):
        written = 0
    return written, int(_NAME.match(path.name).group(1))


def save_checkpoint(root: str | os.PathLike, step: int, *, trainable: dict[str, torch.Tensor] | None,
                    optimizer_state: dict, rng_state: dict, state: dict,
                    export: Callable[[Path], None] | None = None, keep_last: int = 3) -> Path:
    """Write `checkpoint-<step>` under `root` atomically and make it `latest`; then keep the
    `keep_last` most recently written checkpoints (0 keeps all). `export(folder)` writes the
    loadable weights into the checkpoint before the rename; `trainable` may be None when that
    export already holds the whole trainable state (full fine-tuning's unet/)."""
    root = Path(root)

    def fill(folder: Path) -> None:
        if trainable is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                      folder / "trainable.safetensors")
        torch.save(optimizer_state, folder / "optimizer.pt")
        torch.save(rng_state, folder / "rng.pt")
        if export is not None:
            export(folder)
        # Last: list_checkpoints takes a folder with state.json as complete.
        record = dict(state, step=step, written_at_ns=time.time_ns())
        (folder / "state.json").write_text(json.dumps(record, indent=2, default=str))

    final = write_atomically(root / f"checkpoint-{step}", fill)
    set_latest(root, final)
    if keep_last > 0:
        prune(root, keep_last, keep=final)
    return final


def set_latest(root: Path, path: Path) -> None:
    """Point `root/latest` at checkpoint `path` (replaced in one rename)."""
    tmp = root / f".{LATEST}.tmp-{os.getpid()}"
    tmp.write_text(path.name + "\n")
    os.replace(tmp, root / LATEST)


def prune(root: str | os.PathLike, keep_last: int, keep: Path) -> list[Path]:
    """Remove all but the `keep_last` most recently written checkpoints; `keep` always stays."""
    others = sorted((p for p in list_checkpoints(root) if p.name != keep.name), key=_written_at)
    removed = others[: max(0, len(others) - (keep_last - 1))]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names; without that file, the most recently written one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        path = root / pointer.read_text().strip()
        if _NAME.match(path.name) and (path / "state.json").exists():
            return path
    found = list_checkpoints(root)
    return max(found, key=_written_at) if found else None


def resolve_checkpoint(spec: str, root: str | os.PathLike) -> Path | None:
    """--resume_from_checkpoint latest|PATH -> a checkpoint directory (None: latest, but none yet)."""
    if spec == LATEST:
        return latest_checkpoint(root)
    path = Path(spec)
    if not (path / "state.json").exists():
        raise ConfigError(f"--resume_from_checkpoint {spec!r} is not a checkpoint directory (no state.json); "
                          "use 'latest' or a checkpoint-<step> folder")
    return path


def load_checkpoint(path: Path) -> dict:
    if (path / "trainable.safetensors").exists():
        trainable = load_file(path / "trainable.safetensors")
    else:  # full fine-tuning: the UNet export is the trainable state (possibly in shards)
        trainable = {}
        for shard in sorted(glob.glob(str(path / "unet" / "*.safetensors"))):
            trainable.update(load_file(shard))
    return dict(
        trainable=trainable,
        optimizer=torch.load(path / "optimizer.pt", weights_only=False),
        rng=torch.load(path / "rng.pt", weights_only=False),
        state=json.loads((path / "state.json").read_text()),
    )


# ------------------------------------------------------------------ exports for stock diffusers


def export_lora(unet, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write `pytorch_lora_weights.safetensors` into `out_dir` in the layout
    `pipeline.load_lora_weights` reads, with the adapter's config as safetensors metadata: the
    loader rebuilds the adapter from it, so it applies alpha/r as training did (without it a
    stock pipeline assumes alpha = r)."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name))
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    metadata = unet.peft_config[adapter_name].to_dict()
    StableDiffusionLoraLoaderMixin.save_lora_weights(out_dir, unet_lora_layers=layers, safe_serialization=True,
                                                     unet_lora_adapter_metadata=metadata)
    return Path(out_dir) / LORA_WEIGHTS


def export_unet(unet, out_dir: str | os.PathLike) -> Path:
    """Write `out_dir/unet/` as `UNet2DConditionModel.from_pretrained` loads it (resume reads its
    safetensors, all shards, back as the trainable state)."""
    path = Path(out_dir) / "unet"
    unet.save_pretrained(path, safe_serialization=True)
    return path


def export_weights(unet, out_dir: str | os.PathLike) -> Path:
    """The trained weights in the diffusers training examples' layout: LoRA as
    `pytorch_lora_weights.safetensors` (`pipe.load_lora_weights(out_dir)`), a fully fine-tuned
    UNet as `unet/` (`UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")`)."""
    if getattr(unet, "peft_config", None):
        return export_lora(unet, out_dir)
    return export_unet(unet, out_dir)


def publish_weights(unet, out_dir: str | os.PathLike) -> Path:
    """`export_weights` into the output folder itself: written beside, then each piece moved into
    place by a rename, so a reader never sees a half-written file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out_dir / "export", "tmp")
    try:
        export_weights(unet, tmp)
        finish_tree(tmp)
        for item in list(tmp.iterdir()):
            if item.is_dir():
                install(item, out_dir / item.name)
            else:
                os.replace(item, out_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir / (LORA_WEIGHTS if getattr(unet, "peft_config", None) else "unet")


# ------------------------------------------------------------------ the run's output folder

# What a run writes into its output folder: a folder holding any of these holds a run.
RUN_OUTPUTS = ("config.json", "metrics.jsonl", "metrics.abandoned.jsonl", "summary.json", "reward_curve.png",
               "tracking.json", LORA_WEIGHTS, "unet", "checkpoints", "samples", "tensorboard", "wandb")


def claim_output_dir(out: Path, resume: bool, overwrite: bool, logging_dir: str = "tensorboard") -> None:
    """A new run does not write into another run's folder unless told to: resuming continues
    that run, --overwrite_output_dir removes its outputs first (other files are left alone)."""
    tb = (out / logging_dir).resolve()  # TensorBoard's folder counts when it is inside `out`
    inside = (logging_dir,) if tb != out.resolve() and tb.is_relative_to(out.resolve()) else ()
    found = [name for name in dict.fromkeys(RUN_OUTPUTS + inside) if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise ConfigError(f"--output_dir {out} already holds a run ({', '.join(found[:3])}); continue it with "
                          "--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose "
                          "another --output_dir")
    log.warning("--overwrite_output_dir: removing the previous run's %s from %s", ", ".join(found), out)
    for name in found:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def history_upto(path: Path, step: int) -> list[dict]:
    """The metrics rows up to `step` (the resumed step). Rows past it are the continuation this
    run replaces: they are moved, with a warning, to metrics.abandoned.jsonl, not thrown away."""
    if not path.exists():
        return []
    kept, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            moved.append(line)
            continue
        if row.get("step", 0) <= step:
            kept.append(row)
        else:
            moved.append(line)
    if moved:
        abandoned = path.with_name("metrics.abandoned.jsonl")
        with open(abandoned, "a") as f:
            f.write("".join(line + "\n" for line in moved))
        log.warning("resuming at step %d: %d rows of %s past it moved to %s", step, len(moved), path.name,
                    abandoned.name)
        _write_history(path, kept)
    return kept


def _write_history(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def reward_before(out: Path):
    summary = out / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text()).get("sample_reward_before")
    grid = out / "samples" / "step-000000.json"
    if grid.exists():
        return json.loads(grid.read_text()).get("mean_reward")
    return None

"""Experiment trackers for `--report_to tensorboard|wandb|all|none`.

`metrics.jsonl` in the output folder is the run's own record and is always written (by the
trainer); a tracker sends the same numbers, the sample images and the run config to TensorBoard
(torch's SummaryWriter; event files in `--logging_dir`, `<output_dir>/tensorboard` by default)
and/or Weights & Biases (the wandb library; the project is `--tracker_project_name`, local files
in `<output_dir>/wandb`).
A resumed run continues the same wandb run (its id is kept in `<output_dir>/tracking.json`) and
drops the TensorBoard events past the step it resumes from. Only the main process tracks.
"""
from __future__ import annotations

import json
import resource
import secrets
from pathlib import Path

import torch

from .config import ConfigError

REPORT_TO = ("tensorboard", "wandb", "all", "none")
_BACKENDS = {"none": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",), "all": ("tensorboard", "wandb")}


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this when the tensorboard package is missing
        raise ConfigError("--report_to tensorboard needs the tensorboard package; pip install tensorboard") from None
    return SummaryWriter


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("--report_to wandb needs the wandb package; pip install wandb") from None
    return wandb


_IMPORTS = {"tensorboard": _summary_writer, "wandb": _wandb}


def backends(report_to: str) -> tuple[str, ...]:
    if report_to not in _BACKENDS:
        raise ConfigError(f"--report_to must be {', '.join(REPORT_TO[:-1])} or none, got {report_to!r}")
    return _BACKENDS[report_to]


def check_report_to(report_to: str) -> None:
    """Fail in one line, before anything heavy loads, when a chosen tracker's library is missing."""
    for name in backends(report_to):
        _IMPORTS[name]()


def _scalars(values: dict) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "step"}


def _flat(config: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update(_flat(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, log_dir: Path, resume_step: int = 0):
        # purge_step: events a crashed run logged past the resumed step are dropped from the view.
        self.writer = _summary_writer()(str(log_dir), purge_step=resume_step + 1 if resume_step else None)

    def log_config(self, config: dict) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)
        # In this run's folder (run_name "."), so the HParams tab shows it beside its scalars.
        self.writer.add_hparams(_flat(config), {}, run_name=".")

    def log(self, values: dict, step: int) -> None:
        for k, v in _scalars(values).items():
            self.writer.add_scalar(k, v, step)

    def log_images(self, tag: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        self.writer.add_images(tag, images.float().clamp(0, 1).cpu(), step, dataformats="NCHW")
        self.writer.add_text(tag, "\n\n".join(f"{i}: {c}" for i, c in enumerate(captions)), step)

    def finish(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, out: Path, project: str, run_id: str):
        self.wandb = _wandb()
        self.run = self.wandb.init(project=project, name=out.name, id=run_id, resume="allow", dir=str(out))

    def log_config(self, config: dict) -> None:
        # A resumed run may change e.g. --max_train_steps: the newest config wins.
        self.run.config.update(config, allow_val_change=True)

    def log(self, values: dict, step: int) -> None:
        self.run.log(_scalars(values), step=step)

    def log_images(self, tag: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        from .viz import to_uint8

        self.run.log({tag: [self.wandb.Image(to_uint8(im), caption=c) for im, c in zip(images, captions)]},
                     step=step)

    def finish(self) -> None:
        self.run.finish()


class Trackers:
    """The chosen trackers behind one interface (none chosen: every call does nothing)."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log_config(self, config: dict) -> None:
        for t in self.trackers:
            t.log_config(config)

    def log(self, values: dict, step: int) -> None:
        for t in self.trackers:
            t.log(values, step)

    def log_images(self, tag: str, images: torch.Tensor, captions: list[str], step: int) -> None:
        for t in self.trackers:
            t.log_images(tag, images, captions, step)

    def finish(self) -> None:
        for t in self.trackers:
            t.finish()
        self.trackers = []


def start_trackers(report_to: str, out: Path, config: dict, project: str = "refl-engine",
                   resume_step: int = 0, logging_dir: str = "tensorboard") -> Trackers:
    """Open the trackers `report_to` names for the run in `out` and log its config. TensorBoard
    writes to `logging_dir`, inside `out` when relative (as the diffusers examples' --logging_dir)."""
    trackers = []
    for name in backends(report_to):
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(out / logging_dir, resume_step))
        else:
            trackers.append(WandbTracker(out, project, _wandb_run_id(out)))
    tracking = Trackers(trackers)
    tracking.log_config(config)
    return tracking


def _wandb_run_id(out: Path) -> str:
    """The wandb run of this output folder: kept across resumes, new for a new run."""
    path = out / "tracking.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if "wandb_run_id" not in record:
        record["wandb_run_id"] = secrets.token_hex(4)  # wandb ids: lowercase letters and digits
        path.write_text(json.dumps(record, indent=2))
    return record["wandb_run_id"]


class DeviceMonitor:
    """The memory numbers of a step: the allocator's peak on a GPU (plus utilization and used
    memory through NVML when present), the process's peak resident size on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            self.nvml = pynvml
        except Exception:  # pynvml.NVMLError or no library: normal without a GPU
            self.handle = None

    def read(self) -> dict:
        if self.device.type != "cuda":
            return {"max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        out = {"max_memory_allocated_bytes": torch.cuda.max_memory_allocated(self.device)}
        if self.handle is not None:
            try:
                mem = self.nvml.nvmlDeviceGetMemoryInfo(self.handle)
                util = self.nvml.nvmlDeviceGetUtilizationRates(self.handle)
                out.update(gpu_util=util.gpu, gpu_mem_used_bytes=mem.used)
            except Exception:  # noqa: BLE001 - a transient NVML error costs one step's numbers only
                pass
        return out

"""Data parallelism through DeepSpeed: process group, DeepSpeed config, the engine, its checkpoints.

One process with no ZeRO/offload option trains in plain torch. Anything else (several processes,
`--zero`, `--offload`, `--optimizer cpu-adam`, `--deepspeed FILE`) runs the UNet through
`deepspeed.initialize`: DeepSpeed averages the gradients (stage 0), shards optimizer state (1),
gradients (2) and parameters (3), and with `--offload` keeps optimizer state (and under ZeRO-3 the
parameters) in CPU memory. Launch forms, all with the same flags:

    python engine/train.py ...                          one process
    torchrun --nproc_per_node N engine/train.py ...     N processes
    deepspeed --num_gpus N engine/train.py ...          N processes (also --num_nodes, --hostfile)

Ranks share one generator for what makes a global batch (prompt indices, initial noise): each
draws the whole batch of N x b and keeps its slice, so N ranks x batch b see exactly the samples
one process of batch N x b sees. What a rank draws for its own samples (windows, eta noise) comes
from its own generator. Both are saved per rank in checkpoints.

A step whose loss or reward is non-finite on any rank is skipped by every rank: the ranks agree
on one flag (an all-reduce) before backward; every rank still runs backward, since ZeRO-2/3
reduce gradients inside it, but on a non-finite loss, so every rank's gradients are non-finite and
DeepSpeed's own overflow check (ZeRO 1-3, fp16, bf16) drops the update on all ranks together.
Stage 0 in fp32 has no such check: there the trainer checks the all-reduced gradients, identical
on every rank, and drops them before the engine's step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .config import OFFLOADS, ConfigError, OptimConfig, TrainConfig, validate_distributed  # noqa: F401
from .config import read_deepspeed_file as _read_file
from .optim import build_optimizer, deepspeed_optimizer, lr_schedule, use_persistent_extensions_dir
from .memory.nested import param_grads_into_grad

log = logging.getLogger("refl_engine")



# ---------------------------------------------------------------------- flags and config file


def uses_deepspeed(cfg: TrainConfig, world_size: int) -> bool:
    d = cfg.distributed
    return (world_size > 1 or d.zero is not None or d.offload != "none" or bool(d.deepspeed)
            or cfg.optim.optimizer == "cpu-adam")


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed config for these flags (the --deepspeed file's other settings kept)."""
    o, d = cfg.optim, cfg.distributed
    stage = d.zero or 0
    base = _read_file(d.deepspeed) if d.deepspeed else {}
    base.pop("optimizer", None)  # cross-checked in validate; the optimizer comes from --optimizer
    zero = dict(base.get("zero_optimization") or {})
    zero["stage"] = stage
    pin = device.type == "cuda"  # page-locked host buffers only help (and only exist) with a GPU
    zero.pop("offload_optimizer", None)
    zero.pop("offload_param", None)
    if d.offload in ("optimizer", "param"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if d.offload == "param":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    micro, accum = o.train_batch_size, o.gradient_accumulation_steps
    if base.get("train_batch_size") not in (None, "auto") and int(base["train_batch_size"]) != micro * accum * world_size:
        raise ConfigError(f"--deepspeed {d.deepspeed}: train_batch_size {base['train_batch_size']} != "
                          f"{micro} (batch) x {accum} (accumulation) x {world_size} (processes); set it to auto")
    conf = dict(base)
    conf.update({
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        # fp32 stage 0 has no ZeRO optimizer to report the norm: the trainer clips there itself
        "gradient_clipping": 0.0 if _plain_stage0(cfg, device) else float(o.max_grad_norm or 0.0),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # bitsandbytes' AdamW8bit on ZeRO's flat partitions
        "steps_per_print": base.get("steps_per_print", 1 << 30),
    })
    mp = o.mixed_precision if device.type == "cuda" else "no"
    conf.pop("fp16", None)
    conf.pop("bf16", None)
    if mp == "fp16":
        conf["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif mp == "bf16":
        conf["bf16"] = {"enabled": True, "check_grad_overflow": True}
    if offloaded(cfg):
        conf["optimizer"] = deepspeed_optimizer(o)
    return conf


def offloaded(cfg: TrainConfig) -> bool:
    """DeepSpeed builds the optimizer itself (on the CPU copies) rather than taking the client's."""
    return cfg.distributed.offload != "none"


def _plain_stage0(cfg: TrainConfig, device: torch.device) -> bool:
    mp = cfg.optim.mixed_precision if device.type == "cuda" else "no"
    return (cfg.distributed.zero or 0) == 0 and mp == "no"


# ---------------------------------------------------------------------- process group


def world_info() -> tuple[int, int, int]:
    """rank, world size, local rank from the launcher's environment (torchrun, deepspeed)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """Join the launcher's process group (nccl on GPUs, gloo on CPUs); a one-process DeepSpeed run
    makes its own. Returns rank, world size, this rank's device, whether DeepSpeed runs."""
    rank, world, local_rank = world_info()
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    use_ds = uses_deepspeed(cfg, world)
    if use_ds:
        use_persistent_extensions_dir()  # DeepSpeed JIT-builds ops (CPU: its shared-memory all-reduce)
        if not cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    if (world > 1 or use_ds) and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise ConfigError("WORLD_SIZE > 1 without MASTER_PORT; launch with torchrun or deepspeed")
            os.environ["MASTER_PORT"] = str(_free_port())
        for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)):
            os.environ.setdefault(key, str(value))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    return rank, world, device, use_ds


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank iff `flag` is True on every rank (one all-reduce)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                     device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------- the engine


def initialize(trainer):
    """deepspeed.initialize on the trainer's UNet; returns (engine, optimizer, lr schedule)."""
    import deepspeed

    if trainer.device.type == "cpu":
        # The CPU accelerator JIT-builds a shared-memory all-reduce at startup that only DeepSpeed's
        # inference all-reduce uses; training collectives go through gloo, so skip the build.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    cfg = trainer.cfg
    conf = deepspeed_config(cfg, trainer.world_size, trainer.device)
    client = None if offloaded(cfg) else build_optimizer(trainer.params, cfg.optim)
    try:
        engine, optimizer, _, schedule = deepspeed.initialize(
            model=trainer.unet, model_parameters=trainer.params, optimizer=client,
            lr_scheduler=lr_schedule(cfg.optim), config=conf, dist_init_required=False)
    except Exception as e:  # DeepSpeed's own config validation: pydantic / assertion messages
        if type(e).__name__ in ("ValidationError", "DeepSpeedConfigError", "AssertionError"):
            raise ConfigError(f"DeepSpeed refused the config: {str(e).splitlines()[0]}") from None
        raise
    if zero_stage(engine) == 3 and cfg.memory.recompute in ("lean", "selective", "auto"):  # lean-mode policies
        from .models.patch import report_partitioned

        if trainer.is_main:  # the trainer patched the UNet before DeepSpeed wrapped it
            report_partitioned(trainer.unet)
    log.info("DeepSpeed ZeRO-%d, offload %s, optimizer %s, %d process(es)", zero_stage(engine),
             cfg.distributed.offload, cfg.optim.optimizer, trainer.world_size)
    return engine, optimizer, schedule


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine is not None else 0


def backward(trainer, loss: torch.Tensor, finite: bool) -> bool:
    """Backward of one micro-batch's loss; returns whether every rank's loss is finite."""
    finite = agree(finite, trainer.device)
    accum = trainer.cfg.optim.gradient_accumulation_steps
    engine = trainer.engine
    # Plain torch and DeepSpeed's stage 0 accumulate into .grad and reduce after backward: nested
    # recompute calls may then hand over their parameter gradients block by block. ZeRO-1/2 reduce
    # each gradient in a hook as it accumulates and refuse a second accumulation in one backward
    # (one per window step would come), so there the calls return them, as any op.
    into_grad = param_grads_into_grad() if engine is None or zero_stage(engine) == 0 else contextlib.nullcontext()
    with into_grad:
        if engine is None:
            if finite:
                scaled = loss / accum
                (trainer.scaler.scale(scaled) if trainer.scaler else scaled).backward()
            return finite
        # Every rank runs backward in step with the others; a non-finite step is made non-finite on
        # all of them, so all drop it together (module docstring).
        engine.backward(loss / accum if finite else loss * float("nan"), scale_wrt_gas=False)
    return finite


def engine_step(trainer, boundary: bool) -> tuple[bool, float]:
    """engine.step() after a micro-batch; at the accumulation boundary returns (applied, grad norm)."""
    engine = trainer.engine
    if not boundary:
        engine.step()  # between boundaries DeepSpeed only counts the micro-batch
        return True, float("nan")
    if _plain_stage0(trainer.cfg, trainer.device):
        # The gradients are all-reduced already, the same on every rank: check and clip them here.
        max_norm = trainer.cfg.optim.max_grad_norm or float("inf")
        grads = [p for p in trainer.params if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else float("nan")
        applied = bool(grads) and torch.isfinite(torch.tensor(norm)).item()
        if not applied:
            engine.zero_grad()  # the optimizer skips parameters without gradients...
            schedule, engine.lr_scheduler = engine.lr_scheduler, None  # ...and the LR stays put
            try:
                engine.step()
            finally:
                engine.lr_scheduler = schedule
            return False, norm
        engine.step()
        return True, norm
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = float(norm) if norm is not None else float("nan")
    return bool(engine.was_step_applied()), norm


# ---------------------------------------------------------------------- weights in full


def full_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The UNet's whole state dict on rank 0 (None elsewhere); every rank must call it (ZeRO-3
    gathers one layer at a time onto rank 0)."""
    engine = trainer.engine
    if zero_stage(engine) == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
        return sd if trainer.is_main else None
    return trainer.unet.state_dict() if trainer.is_main else None


def gathered(trainer, params):
    """A context in which `params` are whole on every rank (ZeRO-3), a no-op otherwise."""
    if zero_stage(trainer.engine) == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


class Zero3Hold:
    """Keeps a module's ZeRO-3 partitioned parameters whole from `acquire()` to `release()`, across
    everything ZeRO-3's module hooks do in between.

    ZeRO-3 gathers a sub-module's parameters in its pre-forward (and pre-backward) hook and
    partitions them again in its post hook once no active sub-module lists them
    (`param.ds_active_sub_modules`). A batch-chunked call (memory/recompute.py `chunked`) runs the
    UNet once per chunk, so each chunk would re-gather every weight, in forward, in the recompute
    and in backward: gathered bytes grow with the number of chunks, and `stage3_max_reuse_distance`
    does not help (measured: benchmarks/zero3_gathers.py). `acquire` gathers the parameters not
    already whole in one coalesced collective and lists a sub-module id no module has (`HOLD_ID`)
    in each parameter's active set: the hooks then find them available and fetch nothing, and
    their releases skip them. `release` removes the id and partitions what `acquire` gathered.
    Parameters already whole at `acquire` (a prefetch) are left to ZeRO-3, whose step partitions
    every parameter in any case (`partition_all_parameters`), so a hold an exception leaves open
    lasts at most to the end of the step. The cost: the whole partitioned UNet is gathered for the
    call, where ZeRO-3 alone keeps at most stage3_max_live_parameters (the planner counts the
    difference: Planner.zero3_held_bytes).
    """

    HOLD_ID = -1  # DeepSpeed numbers its sub-modules from 0

    def __init__(self, params: list):
        self.params = sorted(params, key=lambda p: p.ds_id)  # the same order on every rank
        self.gathered: list = []
        self.held = False

    @classmethod
    def of(cls, module) -> "Zero3Hold | None":
        """A hold on `module`'s ZeRO-3 partitioned parameters, or None when it has none (no ZeRO-3,
        or every parameter persistent: small parameters stay whole under ZeRO-3's
        `stage3_param_persistence_threshold`)."""
        if module is None:
            return None
        params = [p for p in module.parameters() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
        return cls(params) if params else None

    @property
    def nbytes(self) -> int:
        """The held parameters' bytes when whole."""
        return sum(p.ds_numel * p.element_size() for p in self.params)

    def acquire(self) -> None:
        if self.held:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        missing = [p for p in self.params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        # one coalesced collective per kind, as ZeRO-3's own fetch groups them (hpZ secondary
        # partitions or not); `all_gather(param_list=...)` would issue one per parameter
        for group in ([p for p in missing if getattr(p, "ds_secondary_tensor", None) is not None],
                      [p for p in missing if getattr(p, "ds_secondary_tensor", None) is None]):
            if group:
                group[0].all_gather_coalesced(group).wait()
        for p in self.params:
            p.ds_active_sub_modules.add(self.HOLD_ID)
        self.gathered, self.held = missing, True

    def release(self) -> None:
        if not self.held:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        for p in self.params:
            p.ds_active_sub_modules.discard(self.HOLD_ID)
        ours = [p for p in self.gathered if p.ds_status == ZeroParamStatus.AVAILABLE and not p.ds_active_sub_modules]
        if ours:
            ours[0].partition(param_list=ours, has_been_updated=False)
        self.gathered, self.held = [], False


def count_all_gathers() -> dict[str, int]:
    """From now on, count this process's all-gather collectives (torch.distributed's all_gather,
    all_gather_into_tensor and _all_gather_base, which DeepSpeed's communication layer calls) and
    the bytes they gather, into the returned {"calls", "bytes"} (reset them to count a span). Call
    it before DeepSpeed starts: its communication layer binds these functions when it does.
    For benchmarks/zero3_gathers.py and the tests."""
    counts = dict(calls=0, bytes=0)

    def counting(fn):
        def wrapped(*args, **kwargs):
            out = args[0] if args else next(iter(kwargs.values()))
            counts["calls"] += 1
            counts["bytes"] += sum(t.nbytes for t in out) if isinstance(out, (list, tuple)) else out.nbytes
            return fn(*args, **kwargs)
        return wrapped

    for name in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))
    return counts


def trainable_state(trainer) -> dict[str, torch.Tensor]:
    """name -> a full copy of each trainable parameter, on every rank (tests, LoRA export)."""
    named = [(n, p) for n, p in trainer.unet.named_parameters() if p.requires_grad]
    with gathered(trainer, [p for _, p in named]):
        return {n: p.detach().clone().cpu() for n, p in named}


def export_weights(trainer, folder: Path) -> None:
    """The stock-pipeline export (LoRA file or unet/ folder) written by rank 0; every rank calls."""
    from . import checkpoint as ckpt
    from .models.lora import has_lora

    if has_lora(trainer.unet):
        with gathered(trainer, trainer.params):
            if trainer.is_main:
                ckpt.export_lora(trainer.unet, folder)
        return
    sd = full_state_dict(trainer)
    if trainer.is_main:
        from safetensors.torch import save_file

        out = folder / "unet"
        out.mkdir(parents=True, exist_ok=True)
        trainer.unet.save_config(out)  # config.json, as save_pretrained writes it
        save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()},
                  out / "diffusion_pytorch_model.safetensors")


# ---------------------------------------------------------------------- checkpoints


def rng_state(trainer) -> dict:
    state = {"generator": trainer.generator.get_state(), "rank_generator": trainer.rank_generator.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(trainer, state: dict) -> None:
    trainer.generator.set_state(state["generator"])
    if "rank_generator" in state:
        trainer.rank_generator.set_state(state["rank_generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(trainer) -> Path:
    """checkpoint-<step> through DeepSpeed's save_checkpoint (each rank writes its shards), one RNG
    file per rank, the stock-pipeline export and state.json; every rank calls it. Written into a
    temporary sibling that rank 0 renames into place once every rank is done."""
    from . import checkpoint as ckpt

    root = trainer.out / "checkpoints"
    final = root / f"checkpoint-{trainer.step}"
    tmp = root / f".checkpoint-{trainer.step}.partial"
    if trainer.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    # Frozen weights come from --model again on resume: a LoRA checkpoint holds the adapters only.
    trainer.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True,
                                   client_state={"nonfinite_in_a_row": trainer.nonfinite_in_a_row})
    torch.save(rng_state(trainer), tmp / f"rng-rank{trainer.rank}.pt")
    export_weights(trainer, tmp)
    barrier()
    if trainer.is_main:
        state = {"config": trainer.cfg.to_dict(), "nonfinite_in_a_row": trainer.nonfinite_in_a_row,
                 "step": trainer.step, "world_size": trainer.world_size, "deepspeed": True,
                 "written_at_ns": time.time_ns()}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, default=str))  # last: marks it complete
        ckpt.finish_tree(tmp)
        ckpt.install(tmp, final)
        ckpt.set_latest(root, final)
        if trainer.cfg.output.checkpoints_total_limit > 0:
            ckpt.prune(root, trainer.cfg.output.checkpoints_total_limit, keep=final)
    barrier()
    return final


def is_deepspeed_checkpoint(path: Path) -> bool:
    return (path / "deepspeed").is_dir()


def load_checkpoint(trainer, path: Path) -> bool:
    """Resume every rank from a checkpoint save_checkpoint wrote."""
    if not is_deepspeed_checkpoint(path):
        raise ConfigError(f"{path} was written by a single-process run without DeepSpeed; resume it the same way "
                          "(python engine/train.py, no --zero/--offload)")
    state = json.loads((path / "state.json").read_text())
    loaded, client = trainer.engine.load_checkpoint(str(path / "deepspeed"), tag="state", load_optimizer_states=True,
                                                    load_lr_scheduler_states=True, load_module_strict=False)
    if loaded is None:
        raise ConfigError(f"DeepSpeed could not load {path / 'deepspeed'}; resume with the same --zero and number "
                          "of processes it was written with")
    rng_file = path / f"rng-rank{trainer.rank}.pt"
    if rng_file.exists():
        set_rng_state(trainer, torch.load(rng_file, weights_only=False))
    else:  # more ranks than the run that saved: the shared draws continue, this rank's own restart
        shared = torch.load(path / "rng-rank0.pt", weights_only=False)
        trainer.generator.set_state(shared["generator"])
        log.warning("no RNG state for rank %d in %s (saved by %s ranks); its own generator restarts from the seed",
                    trainer.rank, path, state.get("world_size"))
    trainer.step = int(state["step"])
    trainer.nonfinite_in_a_row = int((client or {}).get("nonfinite_in_a_row", state.get("nonfinite_in_a_row", 0)))
    log.info("resumed from %s at step %d", path, trainer.step)
    return True


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` (same shape on all), concatenated in rank order: the global batch's values."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    parts = [torch.empty_like(t, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.to(device))
    return torch.cat(parts).to(t.device)


def publish_weights(trainer, checkpoint: Path, out: Path) -> Path:
    """The final weights into the output folder (rank 0). Under ZeRO-3 no rank holds them whole, so
    the export the final checkpoint gathered is copied; otherwise as a single-process run does."""
    from . import checkpoint as ckpt
    from .models.lora import has_lora

    if zero_stage(trainer.engine) != 3:
        return ckpt.publish_weights(trainer.unet, out)
    name = ckpt.LORA_WEIGHTS if has_lora(trainer.unet) else "unet"
    src, dst = checkpoint / name, out / name
    tmp = out / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp)
    if dst.is_dir():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return dst

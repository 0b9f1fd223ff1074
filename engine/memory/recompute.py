"""Memory policies: how a UNet call inside the gradient window keeps (or drops) its activations.

The gradient window is a context: the method's rollout opens `with policy.window(size):`, where
`size` is the number of grad-carrying UNet calls it will make (the method is the only source of
that number), and every grad-carrying UNet call of the step, DRaFT-LV's re-noised ones included,
is `policy.unet_call(fn, *args)` inside it. A call's window position is the number of calls before
it (0, 1, ...); more calls than declared, fewer at a normal exit, or a call outside a window raise.
The window is closed on every exit path (ReFL's early return, exceptions). Subclasses hook
`begin_window(size)` / `end_window()`. `fn(*args)` is the whole guided model output of one step.
Decode and reward go through `policy.decode_call` / `policy.reward_call`. This is the one
pluggable place for the memory policy.

Policies (`--recompute`), cheapest in recompute first:
    none            keep every activation of every window step (the baseline).
    lean            keep the outputs of convolutions, linears and attention; drop the
                    cheap-but-large tensors a call would save (GroupNorm and SiLU outputs feeding
                    a convolution or projection, GEGLU's GELU output, the inputs of frozen
                    convolutions) and recompute them inside the backward of the op that needs
                    them (lean.py). Elementwise recompute only (1.06-1.07x `none`'s step
                    time at K=full on CPU) and about 0.63 of `none`'s activations per step (tiny-sd, LoRA; 0.66 for
                    SD1.5); kept for every window step, so not flat in K.
    full            checkpoint every UNet call: keep its input latent, recompute the call during
                    backward. Flat in the window size; one extra UNet forward per step; the
                    backward of one call rematerialises everything `none` would keep.
    selective       checkpoint every UNet call like `full`, and inside each recomputed call keep
                    the outputs of convolutions, linears and attention and recompute the cheap
                    ones as `lean` does: flat in K, and one call's backward peaks at `lean`'s
                    level instead of `none`'s, for elementwise work on top of `full`.
    nested          `selective` one level deeper (nested.py): the call's recompute checkpoints
                    each UNet block again, so its backward rematerialises one block at a time
                    (block inputs kept only during that backward, nothing across steps: flat in
                    K). About one UNet forward more than `full`; the lowest backward peak.
    auto            (the default) given a byte budget (`--memory_budget`, else the device's free
                    memory at start: `device_budget`), keep full activations for as many window
                    steps as fit, `lean` ones for the next, and checkpoint the rest (`full`, or
                    `selective` where `full`'s backward would not fit), minimising recompute; the
                    same plan decides whether the VAE decode and the reward are checkpointed. With
                    memory to spare that is `none` everywhere and nothing checkpointed. The plan
                    comes from `window.plan_window` on a measured profile of one call.

`--recompute_chunk c` runs each `full` / `selective` / `nested` call as one checkpoint per c samples
(`chunked`): the backward of a checkpointed call then rematerialises one chunk at a time, so its
peak is one chunk's whatever the batch, for the same gradients and the same recompute FLOPs.

Every call is tagged for `measure.LiveBytesTracker` ("unet", "vae", "reward") so a measured peak
can be broken down by component.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from contextlib import contextmanager
from typing import Callable, Mapping

import torch
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
from . import measure
from .measure import component
from .nested import checkpointed_modules, nested_call, recomputed_call, trimming_backward
from .lean import in_lean_mode, lean_mode
from .window import CallProfile, plan_window

_log = logging.getLogger("refl_engine")


def _checkpointed(fn, *args, **kwargs):
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _ensure_patched(fn) -> None:
    # `fn` is the guided noise prediction of make_eps_fn, which carries its UNet: lean mode acts
    # through the forwards models/patch.py gives its modules
    from ..models.patch import ensure_patched

    ensure_patched(getattr(fn, "unet", None))


def _lean(fn, *args):
    _ensure_patched(fn)
    return in_lean_mode(fn)(*args)


def _full(fn, *args):
    """A checkpoint of the whole call (nested.recomputed_call): keeps its tensor arguments,
    recomputes the call in backward."""
    return recomputed_call(fn, *args)


def _selective(fn, *args):
    """A checkpoint whose recompute runs the UNet in lean mode: the recomputed call saves what
    `lean` saves, so its backward peaks lower than a plain checkpoint's."""
    _ensure_patched(fn)
    return recomputed_call(fn, *args, mode=lean_mode)


def _nested(fn, *args):
    """A block-nested checkpoint (nested.py) whose recomputes run the UNet in lean mode."""
    _ensure_patched(fn)
    return nested_call(fn, *args, mode=lean_mode)


# window_pos -> how that call is run
def checkpointed_layers(layers):
    """For the calls made inside: each of `layers` (a reward's blocks) keeps only its inputs for
    backward and is recomputed there."""
    return checkpointed_modules(layers)


CALL_KINDS: dict[str, Callable] = {
    "none": lambda fn, *args: fn(*args),
    "lean": _lean,
    "full": _full,
    "selective": _selective,
    "nested": _nested,
}
CHUNKABLE = ("full", "selective", "nested")  # the checkpointed kinds, whose backward recomputes the call


def _per_sample(a, batch: int) -> bool:
    """Whether a call argument is per sample (a tensor of `batch` rows, e.g. a per-sample timestep)
    and is cut with the latents when a call runs on part of the batch; others are shared."""
    return isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch


def chunked(kind: str, chunk: int) -> Callable:
    """`kind` run as one checkpoint per `chunk` samples of the batch, outputs concatenated.

    The samples of a UNet call never mix (convolutions, GroupNorm and attention are per sample), so
    each chunk is the same computation on fewer rows. `fn` must say how to restrict itself to rows
    lo..hi-1 (`fn.rows(lo, hi)`, which the guided prediction of make_eps_fn has; it chunks before
    CFG doubles the batch, so a sample's two branches stay together). In backward autograd runs the
    last chunk's nodes first (they were created last) and each chunk's recompute starts only when
    its backward does, so one chunk's recomputed activations are alive at a time: the call's
    backward peak is one chunk's, whatever the batch. Parameter gradients accumulate over chunks;
    the input's chunk gradients meet in `split`'s backward. A call without `rows`, a batch no
    larger than the chunk, or no grad runs as `kind` unchunked.
    """
    run = CALL_KINDS[kind]
    if chunk <= 0:
        return run

    def call(fn, x, *rest):
        batch = x.shape[0]
        rows = getattr(fn, "rows", None)
        if rows is None or batch <= chunk or not torch.is_grad_enabled():
            return run(fn, x, *rest)
        from ..distributed import Zero3Hold

        hold = Zero3Hold.of(getattr(fn, "unet", None))
        if hold is not None:  # ZeRO-3: one gather for all chunks, in forward and again in backward
            hold.acquire()
            x = _ReleaseInBackward.apply(x, torch.zeros((), requires_grad=True), hold)
        try:
            # per-sample tensor arguments (a per-sample timestep) are split with x; others are shared
            splits = [a.split(chunk) if _per_sample(a, batch) else None for a in rest]
            outs = []
            for i, x_part in enumerate(x.split(chunk)):
                lo = i * chunk
                part = [s[i] if s is not None else a for s, a in zip(splits, rest)]
                outs.append(run(rows(lo, lo + x_part.shape[0]), x_part, *part))
            out = torch.cat(outs)
        finally:
            if hold is not None:
                hold.release()
        return _AcquireInBackward.apply(out, hold) if hold is not None else out

    return call


class _AcquireInBackward(torch.autograd.Function):
    """Identity on a chunked call's output whose backward, which runs before any chunk's
    recompute and backward (they all feed it), gathers the held parameters once for all of them."""

    @staticmethod
    def forward(ctx, out, hold):
        ctx.hold = hold
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        ctx.hold.acquire()
        return grad, None


class _ReleaseInBackward(torch.autograd.Function):
    """Identity on a chunked call's input whose backward, which runs after every chunk's backward
    (they all feed it), partitions the held parameters again. The `anchor` (a fresh leaf that
    requires grad) makes autograd run it even when the input needs no gradient of its own."""

    @staticmethod
    def forward(ctx, x, anchor, hold):
        ctx.hold = hold
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.hold.release()
        return grad, None, None


def chunked_profile(chunk_profile: CallProfile, batch: int, chunk: int, out_bytes: int, x_grad_bytes: int,
                    param_grad_bytes: int) -> CallProfile:
    """The profile of a checkpointed call run by `chunked` at `batch` from the profile of one
    unchunked call at `chunk` samples. out_bytes, x_grad_bytes: per sample, the call's output and
    the gradient of its input latent (0 when the latent carries none); param_grad_bytes: the
    trainable parameters' gradients in the compute dtype.

    forward   chunk after chunk: the earlier chunks' outputs wait for the concatenation.
    backward  one chunk's recompute and backward at a time (`chunked`), on top of the whole
              output's gradient, the finished chunks' input gradients (held until `split`'s
              backward joins them) and, from the second chunk on, the parameter gradients summed
              over chunks in autograd's input buffers until the last chunk has run.
    A CPU measurement of the tiny UNet matches this to the byte (tests/memory/test_chunked.py).
    """
    if chunk <= 0 or batch <= chunk:
        return chunk_profile
    rest = batch - chunk
    return CallProfile(chunk_profile.retained * math.ceil(batch / chunk),
                       max(chunk_profile.fwd_peak + rest * out_bytes, 2 * batch * out_bytes),
                       chunk_profile.bwd_peak + rest * (out_bytes + x_grad_bytes) + param_grad_bytes,
                       chunk_profile.saved)


class MemoryPolicy:
    name = "base"

    def __init__(self, checkpoint_decode: bool = True, checkpoint_reward: bool = True, decode_chunk: int = 1,
                 lean_decode: bool = True, recompute_chunk: int = 0):
        self.checkpoint_decode = checkpoint_decode
        self.checkpoint_reward = checkpoint_reward
        # Decode with the VAE's modules in lean mode (lean.py; the trainer patches
        # the VAE): its GroupNorm / SiLU outputs and the inputs of its frozen convolutions are not
        # kept for backward, in the checkpoint's recompute or, unchecked, in the forward.
        self.lean_decode = lean_decode
        # Samples per checkpointed decode chunk (0 = the whole batch in one). The VAE decoder's
        # activations at 512-1024 px rival a UNet call's; decoding the batch sample by sample
        # (each its own checkpoint) makes its recompute peak that of one image, not of the batch.
        self.decode_chunk = int(decode_chunk)
        # Samples per checkpoint of a `full` / `selective` UNet call (0 = the whole batch): the
        # backward of a checkpointed call then rematerialises one chunk at a time (`chunked`).
        self.recompute_chunk = int(recompute_chunk)
        # Trim glibc's heap (measure.trim_heap) at the call boundaries, forward and backward, and
        # inside a checkpointed call's backward (nested.trimming_backward): on a CPU the resident set
        # then stays near the live tensors (AutoRecompute sets it when a budget of resident memory
        # needs it, and then trims only where the RSS would pass its plan's limit: `_trim`).
        self.trim_heap = False
        # With `trim_heap`: the RSS (bytes) the step must stay under, or None to trim at every
        # boundary. When set (AutoRecompute, from its plan), a boundary trims only if the RSS now plus
        # what the next stretch may add (`ahead`) would pass it (`_trim`).
        self.rss_limit: int | None = None
        self.lazy_trim = True  # False: AutoRecompute leaves rss_limit unset (trim at every boundary)
        self.trims = [0, 0]  # heap trims [made, skipped as not needed] since the policy was built

    # [declared size, calls made] while a gradient window is open
    _open: list[int] | None = None

    @contextmanager
    def window(self, size: int):
        """The gradient window of one rollout: exactly `size` grad-carrying UNet calls, closed on
        every exit path."""
        if self._open is not None:
            raise RuntimeError("a gradient window is already open on this policy")
        self._open = [int(size), 0]
        self.begin_window(int(size))
        try:
            yield self
            made = self._open[1]
            if made != size:
                raise RuntimeError(f"the window was opened for {size} grad-carrying UNet calls and {made} were made")
        finally:
            self._open = None
            self.end_window()

    @property
    def in_window(self) -> bool:
        return self._open is not None

    def begin_window(self, window_size: int) -> None:
        """Hook: the window opens with `window_size` grad-carrying UNet calls to come."""

    def end_window(self) -> None:
        """Hook: the window closed (normally or not)."""

    def call_kind(self, window_pos: int) -> str:
        raise NotImplementedError

    def call_chunk(self) -> int:
        """Samples per checkpoint of this window's `full` / `selective` calls (0 = the batch)."""
        return self.recompute_chunk

    def _next_window_pos(self) -> int:
        if self._open is None:
            raise RuntimeError("a grad-carrying UNet call outside a gradient window; open one with policy.window(size)")
        size, pos = self._open
        if pos >= size:
            raise RuntimeError(f"grad-carrying UNet call {pos + 1} in a window opened for {size}: the method's "
                               "window and its rollout disagree")
        self._open[1] = pos + 1
        return pos

    def unet_call(self, fn: Callable, *args):
        """The next grad-carrying UNet call of the open window, run as `call_kind` says."""
        window_pos = self._next_window_pos()
        kind = self.call_kind(window_pos)
        run = chunked(kind, self.call_chunk()) if kind in CHUNKABLE else CALL_KINDS[kind]
        with component("unet"):
            return self._trimmed(run, fn, *args, ahead=self._ahead(kind))

    def _ahead(self, kind: str) -> tuple[int | None, int | None]:
        """(forward, backward): the most resident memory a call of `kind` ("after": the decode or
        the reward) may add between two trim boundaries; None where unknown (then every boundary
        trims)."""
        return None, None

    def _trim(self, ahead: int | None) -> None:
        """Trim glibc's heap, unless `rss_limit` is set and the RSS now plus `ahead` bytes is
        within it: the pages freed and not yet reused then stay resident, and the next stretch
        reuses them instead of faulting new ones in (each trim costs a system call and the page
        faults of what it gave back)."""
        if ahead is not None and self.rss_limit is not None:
            rss = measure.status_kib("VmRSS")
            if rss is not None and rss * 1024 + ahead <= self.rss_limit:
                self.trims[1] += 1
                return
        measure.trim_heap()
        self.trims[0] += 1

    def _trimmed(self, run, *args, ahead: tuple[int | None, int | None] = (None, None)):
        """run(*args), with the heap trimmed before it and, when its output carries gradient, again
        just before its backward begins (a hook on the output), and in a checkpointed call's
        backward after its recompute and around a nested call's blocks, if `trim_heap`; each of
        those boundaries skips the trim when `_trim` finds the RSS far enough under `rss_limit`
        (`ahead`: what the forward and the backward that follow may add)."""
        if not self.trim_heap:
            return run(*args)
        fwd, bwd = ahead
        self._trim(fwd)

        def trim_in_backward(*_):
            self._trim(bwd)

        with trimming_backward(trim_in_backward):  # and inside a checkpointed call's backward
            out = run(*args)
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(trim_in_backward)
        return out

    def decode_call(self, fn: Callable, *args):
        """fn(latents, ...) -> images; must treat samples independently (a VAE decode does)."""
        with component("vae"):
            return self._trimmed(self._decode, fn, *args, ahead=self._ahead("after"))

    def _decode(self, fn: Callable, *args):
        if self.lean_decode:
            fn = in_lean_mode(fn)
        if not self.checkpoint_decode:
            return fn(*args)
        batch = args[0].shape[0]
        if self.decode_chunk <= 0 or batch <= self.decode_chunk or not torch.is_grad_enabled():
            return _checkpointed(fn, *args)
        chunks = []
        for lo in range(0, batch, self.decode_chunk):
            part = [a[lo:lo + self.decode_chunk] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch
                    else a for a in args]
            chunks.append(_checkpointed(fn, *part))
        return torch.cat(chunks)

    def reward_call(self, reward, images: torch.Tensor, prompts) -> torch.Tensor:
        """reward(images, prompts). With `checkpoint_reward` the reward's `recompute_layers` keep
        only their inputs and are recomputed one at a time in backward (a reward exposing no
        layers is checkpointed as one call); nothing else checkpoints inside a reward."""
        with component("reward"):
            return self._trimmed(self._reward, reward, images, prompts, ahead=self._ahead("after"))

    def _reward(self, reward, images: torch.Tensor, prompts) -> torch.Tensor:
        if not (self.checkpoint_reward and torch.is_grad_enabled()):
            return reward(images, prompts)
        layers = getattr(reward, "recompute_layers", ())
        if not layers:
            return _checkpointed(reward, images, prompts)
        with checkpointed_layers(layers):
            return reward(images, prompts)


class NoRecompute(MemoryPolicy):
    name = "none"

    def call_kind(self, window_pos):
        return "none"


class FullRecompute(MemoryPolicy):
    name = "full"

    def call_kind(self, window_pos):
        return "full"


class LeanRecompute(MemoryPolicy):
    name = "lean"

    def call_kind(self, window_pos):
        return "lean"


class SelectiveRecompute(MemoryPolicy):
    name = "selective"

    def call_kind(self, window_pos):
        return "selective"


class NestedRecompute(MemoryPolicy):
    name = "nested"

    def call_kind(self, window_pos):
        return "nested"


# --recompute auto without --memory_budget plans in the device's memory free at start, less a margin
# for what the plan does not see: on GPU the library workspaces (cuBLAS, cuDNN) and the caching
# allocator's fragmentation; on CPU the growth of other processes and the page cache the system needs.
GPU_MARGIN_MIN, GPU_MARGIN_FRACTION = 1 << 30, 0.05  # the larger of 1 GiB and 5% of the device
CPU_MARGIN_FRACTION = 0.10  # of the available RAM

# What checkpointing the VAE decode or the reward costs in the plan's unit, UNet forwards: one more
# forward of it. A decoder at 512-1024 px is of the order of a UNet call; rewards are mostly less,
# so auto checkpoints them only when that saves a window step's recompute or is needed to fit.
AFTER_RECOMPUTE_COST = 1.0

# On the CPU a budget is resident memory (RSS), while the plan counts live tensor bytes; glibc's
# allocator makes the two differ (see measure.py, "the C allocator"). Measured on tiny-sd, K = full,
# batch 2, RSS growth of a step over its planned tensor peak: under glibc's dynamic mmap threshold
# 1.4-2.0x at 128 px and 1.68x / 2.27x / 2.68x at 64 px (plans of 973 / 492 / 376 MB); with the
# threshold fixed at 128 KiB 1.00-1.03x (128 px) and 1.055x (64 px), at 1.08-1.27x (128 px) and
# 1.4-1.6x (64 px) the CPU time; with the heap trimmed at every call boundary (MemoryPolicy.trim_heap)
# 1.07x in a later step and 1.10x in the first (which also profiles the calls; 64 px,
# benchmarks/cpu_rss.py and tests/memory/test_auto.py), at less CPU time than the fixed threshold
# (1.15x `none`'s there against 1.40x): planned at 1.15 for a margin.
# Between two trims the call that runs holds the pages of what it freed: a kept call's forward grew
# the RSS by 1.41-1.52x the tensors it kept (tiny-sd, 64 and 128 px), which a window of one call
# shows (K=1: RSS 1.47-1.61x a plan of tensors). So a trimmed plan counts the running call's peaks,
# and the decode's and the reward's, at the RSS factor its `none` profile measures
# (`measure.profile_call(resident=True)`), and what earlier calls keep at their tensor bytes.
# So `auto` on a CPU (host_rss) runs the fast plan under the default allocator as it is when it
# fits at HEAP_RSS_FACTOR, and any other plan trimmed, at TRIM_RSS_FACTOR (at MMAP_RSS_FACTOR when
# the environment fixed the threshold).
HEAP_RSS_FACTOR = 2.5
TRIM_RSS_FACTOR = 1.15
MMAP_RSS_FACTOR = 1.10


def _host_available() -> tuple[int, int]:
    """(available, total) bytes of host RAM: MemAvailable of /proc/meminfo, capped by the cgroup's
    limit when the process runs in one with a limit (a container); psutil where there is no /proc."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                info[name] = int(value.split()[0]) * 1024
        available, total = info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError):
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)
    try:  # cgroup v2: the limit less what the group uses, its reclaimable page cache counted free
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current").read())
            stat = dict(line.split() for line in open("/sys/fs/cgroup/memory.stat"))
            used -= int(stat.get("inactive_file", 0))
            available, total = min(available, int(limit) - used), min(total, int(limit))
    except (OSError, ValueError):
        pass
    return available, total


def device_budget(device: torch.device | str) -> tuple[int, str]:
    """`--recompute auto`'s budget without `--memory_budget`, in AutoRecompute's terms (bytes the
    step may use, the bytes live now included): live now + free now - a margin. GPU: free memory
    (torch.cuda.mem_get_info, plus the blocks torch's allocator caches unused); CPU: available RAM.
    Returns (bytes, how it was found)."""
    device = torch.device(device)
    live = measure.live_bytes(device) or 0
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        margin, what = max(GPU_MARGIN_MIN, int(GPU_MARGIN_FRACTION * total)), "free GPU memory"
    else:
        free, total = _host_available()
        margin, what = int(CPU_MARGIN_FRACTION * free), "available RAM"
    return live + free - margin, f"{what} {free / 2**30:.2f} GiB less a {margin / 2**30:.2f} GiB margin"


class AutoRecompute(MemoryPolicy):
    """The fastest plan that fits: keep as many window steps' activations as the budget allows.

    At the first call of a window it profiles one call of `fn` on the real inputs' first sample
    (its CFG pair together, `fn.rows`), scaled to the batch as a chunk's profile is, so that the
    profile of an unchecked call cannot itself exhaust the memory at a batch the plan must chunk
    (bytes kept after forward, peak during forward and during backward; one extra
    forward/backward per kind and input shape, its parameter gradients accumulated into scratch
    .grad buffers and discarded, or under DeepSpeed taken with autograd.grad:
    `profile_into_grad`): `none` first, and the other `kinds`
    only when keeping everything does not fit. The gradients the backward will allocate (trainable
    UNet parameters without a .grad now: all of them under full fine-tuning) are added to every
    backward peak. `window.plan_window` then picks per
    window position what to keep, and whether the decode and the reward are checkpointed.

    budget_bytes    total bytes the step may use on the device (alias: memory_budget); None = the
                    device's free memory now (`device_budget` on `device`).
    reserve_bytes   bytes to hold back for what comes after the window (VAE decode and reward
                    forward/backward; the planner's `after_window_bytes` is right here): a number
                    keeps `checkpoint_decode` / `checkpoint_reward` as given; a mapping
                    {(checkpoint_decode, checkpoint_reward): bytes} lets the plan choose among them
                    (each checkpoint costs AFTER_RECOMPUTE_COST).
    When no plan of whole-batch calls fits and `recompute_chunk` is 0, the checkpointed kinds run
    chunked (`chunked`) at the largest chunk whose plan fits (`self.chunk`; bigger chunks run faster).
    When nothing fits, not even every call checkpointed at chunk 1, it raises ConfigError naming
    the budget. The bytes already live when the window begins (parameters, optimizer state, text
    embeddings) are read from `measure.live_bytes` (the CUDA allocator, or the active CPU tracker);
    with neither, the budget applies to the window alone.
    """

    name = "auto"

    def __init__(self, budget_bytes: int | str | None = None, reserve_bytes: int | Mapping = 0,
                 kinds: tuple[str, ...] = ("none", "lean", "full", "selective", "nested"), memory_budget: int | str | None = None,
                 device: torch.device | str = "cpu", host_rss: bool = False, **kwargs):
        super().__init__(**kwargs)
        budget = budget_bytes if budget_bytes is not None else memory_budget
        if budget is None:
            self.memory_budget, how = device_budget(device)
            self.budget_source = f"the device's memory ({how})"
        else:
            self.memory_budget = _parse_bytes(budget)
            self.budget_source = f"--memory_budget {budget}"
        if isinstance(reserve_bytes, Mapping):
            self.reserve_options = {(bool(d), bool(r)): int(v) for (d, r), v in reserve_bytes.items()}
        else:
            self.reserve_options = {(self.checkpoint_decode, self.checkpoint_reward): int(reserve_bytes)}
        self.reserve_bytes = min(self.reserve_options.values())
        self.kinds = kinds
        self.window_size: int | None = None
        self.plan: list[str] | None = None
        self.last_plan = None  # window.WindowPlan of the latest window, for logs and tests
        self.chunk = self.recompute_chunk  # the latest window's chunk (0 = the batch): given, or planned
        self._profiles: dict = {}
        self._rss_measured: set = set()  # input keys whose `none` profile measured its RSS factor
        self._plans: dict = {}  # (inputs, window size, bytes available) -> the choice made
        # the chosen plan's {kind or "after": (forward, backward) bytes a call may add}: MemoryPolicy._ahead
        self._lookahead: dict | None = None
        # Profile backward into scratch .grad buffers (activation peaks as the trainer's backward
        # sees them). The trainer turns it off under DeepSpeed, whose gradient hooks would take the
        # profile's gradients for real ones (ZeRO-1/2 reduce them as they accumulate): there
        # autograd.grad is used, whose peak can under-count by the gradients made before it.
        self.profile_into_grad = True
        # On a CPU the budget is RSS (the trainer sets this there): see HEAP_RSS_FACTOR.
        self.host_rss = bool(host_rss)
        self.allocator: str | None = None  # host_rss: "heap" (as it is), "trim" (trim_heap) or "mmap" (threshold fixed)

    def begin_window(self, window_size: int) -> None:
        self.window_size = int(window_size)
        self.plan = None

    def end_window(self) -> None:
        self.plan = None

    def call_kind(self, window_pos):
        if not torch.is_grad_enabled():  # sampling without gradient: nothing to keep or plan
            return "none"
        if self.plan is None:
            raise RuntimeError("AutoRecompute: no plan; calls must run inside policy.window(size)")
        return self.plan[window_pos]

    def unet_call(self, fn, *args):
        if self.plan is None and torch.is_grad_enabled() and self.in_window:
            self._make_plan(fn, args)  # on the first call's real inputs
        return super().unet_call(fn, *args)

    def _make_plan(self, fn, args):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        key = tuple((tuple(a.shape), a.dtype, a.requires_grad) if isinstance(a, torch.Tensor) else repr(a)
                    for a in args)
        live = measure.live_bytes(device) or 0
        available = self.memory_budget - live
        memo = (key, self.window_size, available)
        if memo not in self._plans:
            if self.host_rss and device.type == "cpu":
                self._plans[memo] = self._choose_host(fn, args, key, available)
            else:
                self._plans[memo] = self._choose(fn, args, key, available)
            plan, chunk, (dec, rew), _, _ = self._plans[memo]
            host = ""
            if self.allocator == "heap":
                host = f"; glibc's default allocator, budget / {HEAP_RSS_FACTOR:g} in tensors"
            elif self.allocator == "trim":
                f = self._profiles.get(key, {}).get("none")
                host = (f"; glibc's heap trimmed at call boundaries where the RSS nears the budget, budget / "
                        f"{TRIM_RSS_FACTOR:g} in tensors"
                        + (f", the running call at {f.rss_factor:.2f}x" if f is not None and f.rss_factor else ""))
            elif self.allocator == "mmap":
                host = (f"; glibc's mmap threshold fixed at {measure.malloc_mmap_threshold()} bytes, "
                        f"budget / {MMAP_RSS_FACTOR:g} in tensors")
            _log.info("--recompute auto: window of %d: %s%s, decode %s, reward %s; planned peak %s of %s "
                      "available (%s%s)", self.window_size, _counts(plan.kinds), f" at chunk {chunk}" if chunk else "",
                      "checkpointed" if dec else "kept", "checkpointed" if rew else "kept", _size(plan.peak),
                      _size(available), self.budget_source, host)
        plan, self.chunk, (self.checkpoint_decode, self.checkpoint_reward), self.reserve_bytes, self._lookahead = \
            self._plans[memo]
        self.last_plan = plan
        self.plan = plan.kinds
        self.rss_limit = None
        if self.trim_heap and self.lazy_trim:
            # The step's resident memory is measured from here (the heap trimmed: what the no-grad
            # sampling steps freed given back): later boundaries trim only when the RSS would pass
            # what the plan was made to fit (`_trim`), in the plan's own terms.
            measure.trim_heap()
            self.trims[0] += 1
            rss = measure.status_kib("VmRSS")
            if rss is not None:
                self.rss_limit = rss * 1024 + int(available / TRIM_RSS_FACTOR)

    def _ahead(self, kind):
        ahead = self._lookahead.get(kind) if self._lookahead else None
        return ahead if ahead is not None else (None, None)

    def _choose_host(self, fn, args, key, available):
        """`_choose` for a budget of resident memory on a CPU, planning `available` over the
        allocator's RSS factor in tensor bytes. The fast plan (nothing recomputed, decode and
        reward kept) runs under glibc's default allocator as it is when it fits at
        HEAP_RSS_FACTOR. Any other plan turns on `trim_heap` and plans at TRIM_RSS_FACTOR: under
        the untrimmed allocator the RSS of a recomputing plan is no fixed multiple of its tensors
        (1.68x at 973 MB, 2.68x at 376 MB, same model and budget), so it cannot be planned to fit;
        trimmed at every call boundary it follows them. With glibc's mmap threshold fixed in the
        environment (MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES) it plans at MMAP_RSS_FACTOR; without
        glibc, at HEAP_RSS_FACTOR."""
        def run(factor, in_flight=False):
            try:
                return self._choose(fn, args, key, int(available / factor), in_flight), None
            except ConfigError as e:
                return None, e

        if measure.malloc_mmap_threshold() is not None:
            self.allocator = "mmap"
            choice, err = run(MMAP_RSS_FACTOR)
            if err is not None:
                raise self._rss_error(err, MMAP_RSS_FACTOR)
            return choice
        heap, err = run(HEAP_RSS_FACTOR)
        fast = heap is not None and heap[0].recompute_cost == 0 and not any(heap[2])
        if fast or not measure.has_glibc_malloc():  # fits as it is, or no glibc to trim
            if heap is None:
                raise self._rss_error(err, HEAP_RSS_FACTOR)
            self.allocator = "heap"
            return heap
        self.allocator, self.trim_heap = "trim", True
        choice, err = run(TRIM_RSS_FACTOR, in_flight=True)
        if err is not None:
            raise self._rss_error(err, TRIM_RSS_FACTOR)
        return choice

    @staticmethod
    def _rss_error(err: ConfigError, factor: float) -> ConfigError:
        return ConfigError(f"{err} (on a CPU the budget is resident memory, which the allocator makes "
                           f"{factor:g}x the tensor bytes the plan counts)")

    def _choose(self, fn, args, key, available, in_flight: bool = False):
        """(WindowPlan, chunk, (checkpoint_decode, checkpoint_reward), reserve, ahead): the cheapest
        plan that fits `available` bytes, counting the decode and reward recompute; `ahead` is what
        a call of each kind (and the decode or reward, "after") may add to the memory, forward and
        backward, as the plan counts it (`_trim`).

        in_flight: a trimmed heap's resident memory (`_choose_host`). Trimming at the call
        boundaries returns the pages of what a call freed, so what the earlier calls keep is
        resident at about its tensor bytes, while the call running now also holds the pages of
        what it freed since the last trim: its peaks (forward, backward, the decode and the reward
        after the window) are counted at the RSS factor its `none` profile measured."""
        latent = sum(a.untyped_storage().nbytes() for a in args[:1] if isinstance(a, torch.Tensor))
        profiles = self._profiles.setdefault(key, {})
        pending = _pending_grad_bytes(fn)
        resident = in_flight and measure.status_kib("VmRSS") is not None

        def profiled(kinds):
            # (`none` again if this plan needs its RSS factor and an earlier one did not measure it)
            again = resident and key not in self._rss_measured
            todo = [k for k in kinds if k not in profiles or (again and k == "none")]
            if todo:
                into = self.profile_into_grad
                # One sample's call (its CFG pair kept together, `fn.rows`), scaled to the batch as a
                # chunk's is: the profile of an unchecked call at the whole batch could itself run out
                # of the memory the plan is for.
                x = args[0]
                batch = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 1
                one = batch > 1 and hasattr(fn, "rows")
                first = [a[:1] if _per_sample(a, batch) else a for a in args]  # as `chunked` splits them
                f, a = (fn.rows(0, 1), first) if one else (fn, args)
                with _scratch_grads(fn) if into else contextlib.nullcontext():
                    got = measure.profile_call(f, a, {k: CALL_KINDS[k] for k in todo}, grad_into_params=into,
                                               resident=resident)
                profiles.update({k: v.scaled(batch) if one else v for k, v in got.items()})
                if resident and "none" in todo:
                    self._rss_measured.add(key)
            return {k: profiles[k] for k in kinds}

        def factor():
            # the `none` profile's RSS factor (profiled first whenever `none` may run; 1 if not measured)
            if not resident:
                return 1.0
            profiled(["none"])
            return max(1.0, profiles["none"].rss_factor)

        def with_grads(profs):
            # the profile's backward peak is the activations' alone (its parameter gradients went
            # into scratch .grad buffers allocated before it, or were returned by autograd.grad and
            # subtracted); the window's backward allocates the gradients on top of them
            f = factor()
            return {k: dataclasses.replace(v, fwd_peak=int(v.fwd_peak * f), bwd_peak=int(v.bwd_peak * f) + pending)
                    for k, v in profs.items()}

        def lookahead(profs, held_after):
            # what a call may add from each trim boundary on: its forward from the call's start; its
            # backward from the start of its backward, where what it keeps is already resident (at
            # the RSS factor its forward paid), so its backward peak less that
            f = factor()
            return {**{k: (v.fwd_peak, max(0, v.bwd_peak - int(f * v.retained))) for k, v in profs.items()},
                    "after": (held_after, held_after)}

        def cheapest(profs):
            best = None
            for after, reserve in self.reserve_options.items():
                held, profs_held = int(reserve * factor()), with_grads(profs)
                p = plan_window(self.window_size, profs_held, available, after=held, latent_bytes=latent)
                cost = p.recompute_cost + AFTER_RECOMPUTE_COST * sum(after)
                if p.fits and (best is None or (cost, p.peak) < best[0]):
                    best = ((cost, p.peak), (p, self.recompute_chunk, after, reserve, lookahead(profs_held, held)))
            return best

        # With memory to spare everything is kept and nothing else needs profiling.
        best = cheapest(profiled(["none"])) if "none" in self.kinds else None
        if best is None or best[0][0] > 0:
            best = cheapest(profiled(self.kinds))
        if best is not None:
            return best[1]
        # Nothing of whole-batch calls fits: decode and reward checkpointed (the least held back),
        # and the checkpointed calls chunked at the largest chunk that fits (bigger chunks run faster):
        # one chunk's profile scaled from the batch's, the rest as `chunked_profile` counts it.
        after, reserve = min(self.reserve_options.items(), key=lambda o: o[1])
        profiles = profiled(self.kinds)
        x = args[0]
        held_after = int(reserve * factor())
        plan = plan_window(self.window_size, with_grads(profiles), available, after=held_after, latent_bytes=latent)
        chunk = self.recompute_chunk
        if not self.recompute_chunk and x.shape[0] > 1 and hasattr(fn, "rows"):
            batch, sample = x.shape[0], x[:1].nbytes
            x_grad = self.window_size > 1  # later window steps' latents carry gradient
            unet = getattr(fn, "unet", None)
            grads = sum(p.numel() for p in unet.parameters() if p.requires_grad) * x.element_size() if unet else 0
            from ..distributed import Zero3Hold

            hold = Zero3Hold.of(unet)
            held = hold.nbytes if hold is not None else 0  # ZeRO-3: the UNet kept whole through a chunked call

            def at(c):
                def one(v):
                    v = chunked_profile(v.scaled(c / batch), batch, c, sample, sample if x_grad else 0, grads)
                    return dataclasses.replace(v, fwd_peak=v.fwd_peak + held, bwd_peak=v.bwd_peak + held)

                return with_grads({k: one(v) if k in CHUNKABLE else v for k, v in profiles.items()})

            lo, hi, found = 1, batch - 1, None
            while lo <= hi:
                mid = (lo + hi) // 2
                profs = at(mid)
                p = plan_window(self.window_size, profs, available, after=held_after, latent_bytes=latent)
                if p.fits:
                    found, lo = (mid, p, profs), mid + 1
                else:
                    hi = mid - 1
            if found:
                return found[1], found[0], after, reserve, lookahead(found[2], held_after)
            chunk, plan = 1, plan_window(self.window_size, at(1), available, after=held_after, latent_bytes=latent)
        raise ConfigError(
            f"--memory_budget: one training step does not fit in {_size(available)} ({self.budget_source}"
            f"{', less the bytes live at the window' if self.memory_budget != available else ''}): its smallest "
            f"plan ({_counts(plan.kinds)}{f' at chunk {chunk}' if chunk else ''}) needs {_size(plan.peak)}; "
            "give a larger --memory_budget or lower --train_batch_size or --resolution")

    def call_chunk(self) -> int:
        return self.chunk


@contextmanager
def _scratch_grads(fn):
    """Zeroed .grad buffers for the trainable UNet parameters while a call is profiled, allocated
    before its tracker starts, so the profile's backward accumulates into them as the trainer's
    does and its peak counts the activations only (under autograd.grad the peak holds whatever
    gradients exist at that moment, and subtracting all of them afterwards under-counts a peak
    that comes early in the backward). The parameters' own .grad are put back afterwards."""
    unet = getattr(fn, "unet", None)
    params = [p for p in unet.parameters() if p.requires_grad] if unet is not None else []
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _pending_grad_bytes(fn) -> int:
    """Bytes of the gradients the backward will allocate: the trainable UNet parameters that have
    no .grad now (the trainer zeroes with set_to_none, so all of them at a window's start; those
    that have one are already in the live bytes). Partitioned ZeRO-3 parameters hold no elements
    here; DeepSpeed keeps their gradients in buffers allocated at initialisation."""
    unet = getattr(fn, "unet", None)
    if unet is None:
        return 0
    return sum(p.numel() * p.element_size() for p in unet.parameters() if p.requires_grad and p.grad is None)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _counts(kinds: list[str]) -> str:
    return ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no UNet call"


def _parse_bytes(value) -> int:
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9,
             "MB": 10**6, "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(float(text))


POLICIES: dict[str, type[MemoryPolicy]] = {
    "none": NoRecompute,
    "lean": LeanRecompute,
    "full": FullRecompute,
    "selective": SelectiveRecompute,
    "nested": NestedRecompute,
    "auto": AutoRecompute,
}


def build_policy(name: str, **kwargs) -> MemoryPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown --recompute {name!r}; choose one of: {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)

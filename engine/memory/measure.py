"""Byte accounting: the exact peak of live tensor bytes on CPU, the allocator peak on GPU, and a
breakdown by component.

On CPU there is no allocator statistic, so `LiveBytesTracker` follows every tensor storage itself:
a TorchDispatchMode sees the outputs of every aten op (forward, backward, optimizer, recompute),
registers each new storage once with its byte size, and attaches a weakref finalizer to the
storage's Python object. torch preserves that object for as long as the C++ storage lives (views
and autograd's saved tensors keep it alive), so the finalizer fires exactly when the memory is
released. Live bytes are the sum over registered storages; the peak is taken at each allocation.
Storages that already exist when tracking starts (parameters, optimizer state) are found through
the garbage collector and counted as the baseline, with finalizers too, so freeing an old gradient
during the step is seen.

What it cannot see: scratch buffers that a single kernel allocates and frees internally (they are
never an op output), and memory not owned by torch storages. On GPU use `torch.cuda` statistics,
which do include those (`measure_peak` picks the right one).

Allocations are attributed to the innermost `component(...)` tag active when they happen; the
memory policies tag UNet calls, VAE decode and reward forward, so the tracker can say which
component's activations were live at the peak.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .nested import param_grads_into_grad
from .window import CallProfile

_local = threading.local()


def _tag_stack() -> list[str]:
    stack = getattr(_local, "tags", None)
    if stack is None:
        stack = _local.tags = []
    return stack


@contextlib.contextmanager
def component(name: str):
    """Attribute allocations made inside this block to `name` (innermost tag wins)."""
    stack = _tag_stack()
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def current_component(default: str = "other") -> str:
    stack = _tag_stack()
    return stack[-1] if stack else default


_active_trackers: list["LiveBytesTracker"] = []


def active_tracker() -> "LiveBytesTracker | None":
    """The innermost LiveBytesTracker currently tracking, if any."""
    return _active_trackers[-1] if _active_trackers else None


def live_bytes(device: torch.device | str | None = None) -> int | None:
    """Bytes of live tensors right now: the CUDA allocator's count on GPU, the active tracker's on
    CPU; None when neither is available (CPU with no tracker running)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    tracker = active_tracker()
    return tracker.live if tracker is not None else None


@dataclass
class _Entry:
    nbytes: int
    tag: str


class LiveBytesTracker(TorchDispatchMode):
    """Exact live-tensor-byte accounting at op granularity (see the module docstring).

    Attributes after (or during) tracking:
        live              bytes live now
        peak              highest `live` seen
        baseline          bytes live at entry (found through gc)
        peak_by_tag       live bytes per component tag at the moment of the peak
        events            number of storages registered
    """

    def __init__(self, include_existing: bool = True, devices: Iterable[str] | None = None):
        """devices: device types to count ("cpu", "cuda", "meta"); None = every tensor."""
        super().__init__()
        self.include_existing = include_existing
        self.devices = set(devices) if devices is not None else None
        self._entries: dict[int, _Entry] = {}
        self._live_by_tag: dict[str, int] = {}
        self.live = 0
        self.peak = 0
        self.baseline = 0
        self.peak_by_tag: dict[str, int] = {}
        self.events = 0
        self._marks: list[list[int]] = []
        self._lock = threading.RLock()

    # -- registration -------------------------------------------------------------------------
    def _counts(self, t: torch.Tensor) -> bool:
        if self.devices is None:
            return True
        return t.device.type in self.devices

    def _register(self, t: torch.Tensor, tag: str) -> None:
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # e.g. sparse or functional wrappers
            return
        key = storage._cdata
        nbytes = storage.nbytes()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                if nbytes != entry.nbytes:  # resize_ on a registered storage
                    self._add(entry.tag, nbytes - entry.nbytes)
                    entry.nbytes = nbytes
                return
            self._entries[key] = _Entry(nbytes, tag)
            self.events += 1
            self._add(tag, nbytes)
        weakref.finalize(storage, self._release, key)

    def _add(self, tag: str, nbytes: int) -> None:
        self.live += nbytes
        self._live_by_tag[tag] = self._live_by_tag.get(tag, 0) + nbytes
        if self.live > self.peak:
            self.peak = self.live
            self.peak_by_tag = dict(self._live_by_tag)
        for mark in self._marks:
            if self.live > mark[0]:
                mark[0] = self.live

    def _release(self, key: int) -> None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return
            self.live -= entry.nbytes
            self._live_by_tag[entry.tag] -= entry.nbytes

    # -- dispatch -----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tag = current_component()
        inputs = None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and self._counts(t):
                key = t.untyped_storage()._cdata
                if key not in self._entries:
                    # A view or in-place result of a tensor that existed before tracking (and was
                    # not counted, include_existing=False) is not an allocation.
                    if inputs is None:
                        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0]
                                  if isinstance(a, torch.Tensor)}
                    if key in inputs:
                        continue
                self._register(t, tag)
        return out

    def __enter__(self):
        if self.include_existing:
            gc.collect()
            with warnings.catch_warnings():  # isinstance() pokes deprecated module attributes
                warnings.simplefilter("ignore")
                for obj in gc.get_objects():
                    if isinstance(obj, torch.Tensor) and self._counts(obj):
                        self._register(obj, "existing")
            self.baseline = self.live
            self.peak = self.live
            self.peak_by_tag = dict(self._live_by_tag)
        _active_trackers.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active_trackers.remove(self)
        return super().__exit__(*exc)

    # -- queries ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def window(self):
        """Track the peak inside a block: yields a dict filled with start/peak/end live bytes."""
        mark = [self.live]
        result = {"start": self.live}
        self._marks.append(mark)
        try:
            yield result
        finally:
            self._marks.remove(mark)
            result["peak"] = mark[0]
            result["end"] = self.live

    def reset_peak(self) -> None:
        self.peak = self.live
        self.peak_by_tag = dict(self._live_by_tag)

    def live_by_tag(self) -> dict[str, int]:
        return {k: v for k, v in self._live_by_tag.items() if v}


# -- persistent state -----------------------------------------------------------------------------
def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views share storage, count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        s = t.untyped_storage()
        seen[s._cdata] = s.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer) -> list[torch.Tensor]:
    out = []
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                out.append(v)
    return out


def state_breakdown(modules: Iterable[torch.nn.Module], optimizer=None) -> dict[str, int]:
    """params / grads / optimizer bytes of the given modules (distinct storages)."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    params += [b for m in modules if m is not None for b in m.buffers()]
    out = {
        "params": unique_bytes(params),
        "grads": unique_bytes(p.grad for p in params if isinstance(p, torch.nn.Parameter)),
        "optimizer": unique_bytes(optimizer_state_tensors(optimizer)) if optimizer is not None else 0,
    }
    return out


@dataclass
class PeakMeasurement:
    peak_bytes: int
    baseline_bytes: int
    seconds: float
    method: str  # "tracker" or "cuda"
    by_component: dict[str, int] = field(default_factory=dict)


def measure_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, PeakMeasurement]:
    """Run `fn()` and measure the peak of live tensor bytes during it (CUDA allocator on GPU,
    `LiveBytesTracker` on CPU). Returns (fn's result, measurement)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        return result, PeakMeasurement(torch.cuda.max_memory_allocated(device), baseline, seconds, "cuda")
    tracker = LiveBytesTracker(devices={device.type})
    t0 = time.perf_counter()
    with tracker:
        result = fn()
    seconds = time.perf_counter() - t0
    return result, PeakMeasurement(tracker.peak, tracker.baseline, seconds, "tracker", dict(tracker.peak_by_tag))


# -- saved-for-backward bytes ---------------------------------------------------------------------
class SavedTensorCounter:
    """Counts the bytes autograd saves for backward inside the block: each storage once, storages
    of `exclude` (parameters) never. Works on real, meta and fake tensors."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._seen: dict[int, int] = {}
        self._keep: list[torch.Tensor] = []  # hold storages so their ids stay unique
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        key = s._cdata
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = s.nbytes()
            self._keep.append(t)
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        self._keep.clear()


# -- grad-carrying calls --------------------------------------------------------------------------
class GradCallCounter:
    """Counts the forwards of `module` that run with grad enabled inside the block: the calls
    that carry gradient (the window), counted on the module itself, not derived from the method.
    Under `--recompute none` a backward runs no forward again, so each call counts once."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.calls = 0
        self._handle = None

    def _hook(self, module, args):
        if torch.is_grad_enabled():
            self.calls += 1

    def __enter__(self):
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


# ---------------------------------------------------------------- one call, profiled

def _graph_leaves(roots: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Leaf tensors (parameters) that receive gradient from `roots`."""
    leaves, seen, stack = [], set(), [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(n for n, _ in node.next_functions)
    return leaves


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def profile_call(fn: Callable, args: Sequence, call_kinds: Mapping[str, Callable | None],
                 grad_into_params: bool = False, inputs_require_grad: bool = True,
                 exclude: Sequence[torch.Tensor] = (), resident: bool = False) -> dict[str, CallProfile]:
    """Profile one call of fn(*args) under each memory kind: `call_kinds` maps a kind's name to
    how it calls (`recompute.CALL_KINDS`), and the name "nograd" (value unused) profiles a call
    under torch.no_grad().

    Works on real tensors (`--recompute auto` calibrating on the device) and on FakeTensors (the
    planner). Floating-point tensor args are made leaves that require grad when
    `inputs_require_grad` (a window step whose latent carries gradient). Backward either takes
    torch.autograd.grad (nothing accumulates into .grad; the parameter gradients it returns are not
    counted, they are the `grads` component) or, with `grad_into_params`, runs .backward() into
    .grad buffers the caller has already allocated (the steady state of training).

    `resident` (real CPU tensors, glibc): the `none` kind's forward also reads the process's RSS,
    with the heap trimmed before it, and records the RSS it added over the tensor bytes it left
    live as `rss_factor`. Measured on tiny-sd (one sample, its CFG pair): 1.44x at 128 px, 1.53-1.58x
    at 64 px. The activations a forward keeps are interleaved with the blocks it frees, whose pages
    stay resident until the heap is trimmed (see "the C allocator" below).
    """
    args = [a.detach().requires_grad_(inputs_require_grad) if isinstance(a, torch.Tensor) and a.is_floating_point()
            else a for a in args]
    out: dict[str, CallProfile] = {}
    for kind, call in call_kinds.items():
        tracker = LiveBytesTracker(include_existing=False)
        with tracker:
            with tracker.window() as fw:
                if kind == "nograd":
                    with torch.no_grad():
                        y = fn(*args)
                else:
                    counter = SavedTensorCounter(exclude=exclude) if kind == "none" else None
                    rss = resident and kind == "none" and trim_heap() and status_kib("VmRSS")
                    with counter or contextlib.nullcontext():
                        y = call(fn, *args)
                    if rss:
                        rss = (status_kib("VmRSS") - rss) * 1024 / max(tracker.live, 1)
            y_bytes = _storage_bytes(y)
            retained = tracker.live - y_bytes
            if kind == "nograd" or y.grad_fn is None:
                out[kind] = CallProfile(0, fw["peak"], 0)
                del y
                continue
            grad_out = torch.ones_like(y)
            inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            params = [p for p in _graph_leaves([y]) if not any(p is a for a in inputs)]
            with tracker.window() as bw:
                if grad_into_params:
                    with param_grads_into_grad():  # as the trainer's backward runs
                        y.backward(grad_out)
                    param_grad_bytes = 0
                else:
                    grads = torch.autograd.grad(y, inputs + params, grad_out, allow_unused=True)
                    param_grad_bytes = sum(_storage_bytes(g) for g in grads[len(inputs):] if g is not None)
                    del grads
            for a in inputs:
                a.grad = None
            out[kind] = CallProfile(retained, fw["peak"], bw["peak"] - y_bytes - param_grad_bytes,
                                    counter.bytes if counter is not None else 0, float(rss or 0.0))
            del y, grad_out
    return out


# ---------------------------------------------------------------------- process memory (Linux)

def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM: the peak RSS), None where unreadable."""
    import re
    from pathlib import Path

    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (VmHWM, which ru_maxrss reads) to the current RSS;
    False where that is not possible."""
    from pathlib import Path

    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------- the C allocator (glibc)

# On the CPU torch takes tensor memory from the C allocator. glibc's malloc serves a block from
# its heap unless it is at least the mmap threshold, which starts at 128 KiB and rises (up to
# 32 MiB) to the size of every mmapped block freed; freed heap blocks stay in the process,
# fragmented. So on CPU the resident set of a training step is not its peak of live tensor bytes:
# on tiny-sd at 64-128 px it measured 1.4-2.7x the planned tensor peak. With the threshold fixed
# at 128 KiB (which also stops it rising) every tensor of 128 KiB or more is mapped on allocation
# and returned to the system when freed, and the resident set follows the live tensors (measured
# 1.03-1.06x the plan), at 8-27% (128 px) to 40-60% (64 px) more CPU time for the page faults of
# fresh mappings. Trimming the heap (malloc_trim) at the boundaries of the step's calls instead
# keeps the default allocator and bounds the RSS as well, for less CPU time (benchmarks/cpu_rss.py).


@functools.lru_cache(maxsize=None)
def _glibc():
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def has_glibc_malloc() -> bool:
    """Whether this process's C allocator is glibc's (whose heap `trim_heap` can trim)."""
    return _glibc() is not None


def trim_heap() -> bool:
    """Give the pages of glibc's free heap blocks back to the system (malloc_trim(0)); False where
    the allocator is not glibc's. Between two calls the resident set grows by at most what was
    freed and not reused in between, so a policy that trims at its call boundaries
    (MemoryPolicy.trim_heap) keeps the RSS near its live tensors under glibc's default allocator,
    without the page faults a fixed mmap threshold pays on every large allocation."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def malloc_mmap_threshold() -> int | None:
    """The fixed glibc mmap threshold the environment set at start (MALLOC_MMAP_THRESHOLD_, or
    glibc.malloc.mmap_threshold in GLIBC_TUNABLES); None when glibc's dynamic default is in effect."""
    import os
    import re

    if _glibc() is None:
        return None
    value = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    m = re.search(r"glibc\.malloc\.mmap_threshold=(\d+)", os.environ.get("GLIBC_TUNABLES", ""))
    value = m.group(1) if m else value
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None

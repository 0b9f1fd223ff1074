"""Native (C++ / CUDA) fused GroupNorm(+SiLU): the ops of csrc/, built by CMakeLists.txt.

    group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None | "silu")

runs `torch.ops.refl.group_norm_silu` (forward: y and the per-(sample, group) fp32 mean and rstd)
and, in backward, `torch.ops.refl.group_norm_silu_backward`. The autograd formula is registered in
C++ (csrc/ops.cpp, the op's Autograd kernel; a Python autograd.Function cost about 0.1 ms a call,
as much as the kernels at small shapes) and saves x, mean and rstd only: torch's GroupNorm followed
by SiLU saves x and the normalised tensor (plus the same statistics), so the fused op keeps one
activation-sized tensor instead of two.
x is (N, C, *spatial), fp32, bf16 or fp16, channels-first or channels-last (kept as it is).

On CPU, outputs (y, dx) of 1 MiB or more come from a cache of the op's freed outputs of the same
size, so a training loop's repeated shapes do not page-fault fresh memory every call (bounded:
$REFL_NATIVE_CACHE_MB idle MiB, default 256, 0 turns it off; torch.ops.refl.output_cache_limit).

The ops have CPU kernels (vectorized, parallel over samples and groups), CUDA kernels when the
library was built against a CUDA torch, and Meta kernels, so they also run on the meta device
(the planner's traces) and under torch.compile (FakeTensor uses the Meta kernels).

Where the library is found: $REFL_NATIVE_LIB if set, else build/native/librefl_native.so next to
the package (the editable install: `make install` builds it there), else librefl_native.so inside
the package directory. When none loads, `available()` is False, the dispatch in refl_kernels and
the recompute modes use the torch path, and a single log line says why.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ENV_VAR = "REFL_NATIVE_LIB"
LIB_NAME = "librefl_native.so"
_PACKAGE_DIR = Path(__file__).resolve().parent

DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernels take (float64 stays on torch)

# None: not tried yet; otherwise (loaded, reason-if-not)
_status: tuple[bool, str | None] | None = None


def library_candidates() -> list[Path]:
    """Where the library is looked for, in order."""
    env = os.environ.get(ENV_VAR)
    if env:
        return [Path(env)]
    return [_PACKAGE_DIR.parent / "build" / "native" / LIB_NAME, _PACKAGE_DIR / LIB_NAME]


def _has_kernel(dispatch_key: str, op: str = "refl::group_norm_silu") -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)
    except RuntimeError:  # the op is not registered in this process
        return False


def missing_cpu_flags(path: Path, cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The vector-instruction flags the library at `path` was built for that this CPU lacks.

    CMake writes them next to the library (librefl_native.cpuflags, /proc/cpuinfo's names). Loading
    a library built for other instructions would kill the process with SIGILL at its first call.
    Empty when there is no such file (a library built elsewhere by hand) or no cpuinfo to read."""
    needed_file = path.with_suffix(".cpuflags")
    try:
        needed = needed_file.read_text().split()
        with open(cpuinfo) as f:
            have = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return []
    if have is None:
        return []
    return [flag for flag in needed if flag not in have]


def load() -> bool:
    """Load the library once per process; log once (at WARNING) when it cannot be loaded."""
    global _status
    if _status is not None:
        return _status[0]
    path = next((p for p in library_candidates() if p.is_file()), None)
    reason = None
    if path is None:
        reason = (f"{LIB_NAME} not found (looked in {', '.join(str(p) for p in library_candidates())}); "
                  "`make install` builds it with cmake, or set $" + ENV_VAR)
    elif missing := missing_cpu_flags(path):
        reason = (f"{path} was built for CPU instructions this CPU lacks ({' '.join(missing)}); "
                  "rebuild it on this machine with `make install`")
    elif not _has_kernel("CPU"):  # a second load would register the ops twice
        try:
            torch.ops.load_library(str(path))
        except (OSError, RuntimeError) as exc:
            reason = f"cannot load {path}: {exc}"
    if reason is None and not _has_kernel("Autograd"):  # built before the op had its C++ autograd formula
        reason = f"{path} is out of date (no autograd formula); rebuild it with `make install`"
    _status = (reason is None, reason)
    if reason is not None:
        log.warning("refl native ops unavailable, GroupNorm(+SiLU) uses the torch path: %s", reason)
    return _status[0]


_reasons: dict = {}  # (load status, device type) -> reason: asked on every call, answered once


@torch.compiler.assume_constant_result  # fixed per process: torch.compile folds it, no graph break
def unavailable_reason(device: torch.device | str = "cpu") -> str | None:
    """None if the native op can run on `device`, else a one-line reason with the fix."""
    if not load():
        return _status[1]
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    cached = _reasons.get((_status, kind), False)
    if cached is not False:
        return cached
    key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(kind)
    reason = None
    if key is None or not _has_kernel(key):
        reason = (f"the native library has no {kind} kernel (CUDA kernels are built only against a CUDA torch "
                  "with nvcc present); use backend 'torch' or 'triton'")
    _reasons[(_status, kind)] = reason
    return reason


def available(device: torch.device | str = "cpu") -> bool:
    return unavailable_reason(device) is None


_lean_ops: bool | None = None


def lean_ops_available() -> bool:
    """Whether the library's lean recompute Functions (csrc/lean.cpp: refl::norm_act_project,
    refl::frozen_conv, refl::geglu_gate) are loaded; a library built before them says so once."""
    global _lean_ops
    if _lean_ops is None:
        _lean_ops = load() and _has_kernel("Autograd", "refl::norm_act_project")
        if load() and not _lean_ops:
            log.warning("the native library predates its lean recompute ops; lean mode uses its Python "
                        "Functions (rebuild it with `make install`)")
    return _lean_ops


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str | None = None) -> torch.Tensor:
    """GroupNorm (+ SiLU) with the native op when it can run on x's device and dtype (fp32, bf16,
    fp16), else torch's two ops."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dtype not in DTYPES or not available(x.device):
        y = F.group_norm(x, num_groups, weight, bias, eps)
        return F.silu(y) if activation == "silu" else y
    C = x.shape[1]
    if weight is None:
        weight = torch.ones(C, device=x.device, dtype=x.dtype)
    if bias is None:
        bias = torch.zeros(C, device=x.device, dtype=x.dtype)
    # differentiable through the op's C++ Autograd kernel; mean and rstd carry no gradient
    return torch.ops.refl.group_norm_silu(x, weight, bias, int(num_groups), float(eps), activation == "silu")[0]

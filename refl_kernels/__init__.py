"""refl_kernels: fused attention and GroupNorm(+SiLU) with a backend dispatch.

Public functions:
    attention(q, k, v, scale=None, backend="auto")           q (B, H, Nq, D), k/v (B, H, Nk, D)
    group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, backend="auto")

Backends ("auto" picks the first that applies):
    "triton"   the Triton kernels of this package: on CUDA tensors, or on CPU when the process
               runs Triton's interpreter (TRITON_INTERPRET=1 set before triton was imported, and
               still set at call time) - how the tests exercise them without a GPU;
    "native"   GroupNorm only: the C++ op of csrc/ (refl_kernels.native; built by `make install`),
               the auto choice on CPU when its library is loaded. On GPU auto keeps Triton: the
               CUDA build of the op has not been timed against it (no GPU here);
    "torch"    plain PyTorch: on CPU the auto choice for attention (and for GroupNorm when the
               native library is absent); for attention this is PyTorch's SDPA, for GroupNorm
               F.group_norm followed by F.silu;
    "sdpa"     torch.nn.functional.scaled_dot_product_attention (attention only);
    "xformers" xformers.ops.memory_efficient_attention (attention only; needs xformers and CUDA);
    "reference" the float64-capable unfused references of refl_kernels.reference.
A backend that cannot run raises ValueError naming what is missing and how to get it.

GroupNorm(+SiLU) also comes in pieces, for an autograd Function that keeps less than the op does
(the engine's lean recompute): group_norm_with_stats -> (y, mean, rstd), group_norm_from_stats
(y again from the saved statistics), group_norm_backward; backends "triton" and "native".
"""
from __future__ import annotations

import importlib.util
import os
import time

import torch
import torch.nn.functional as F

from . import native, reference

try:  # triton is a Linux-only dependency; everything else here works without it
    from . import attention as _attention_mod
    from . import groupnorm as _groupnorm_mod
    _TRITON_IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - exercised only on machines without triton
    _attention_mod = _groupnorm_mod = None
    _TRITON_IMPORT_ERROR = exc

ATTENTION_BACKENDS = ("auto", "triton", "torch", "sdpa", "xformers", "reference")
GROUP_NORM_BACKENDS = ("auto", "triton", "native", "torch", "reference")


def triton_interpreting() -> bool:
    """True when the Triton kernels run in the CPU interpreter in this process right now."""
    return (
        _attention_mod is not None
        and _attention_mod.INTERPRETED
        and os.environ.get("TRITON_INTERPRET", "0") == "1"
    )


def triton_unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    """None if the Triton kernels can run on `device`, else a one-line reason with the fix."""
    device = torch.device(device)
    if _attention_mod is None:
        return f"triton is not importable ({_TRITON_IMPORT_ERROR}); install it with `pip install triton` (Linux)"
    if _attention_mod.INTERPRETER_MISMATCH:
        return ("TRITON_INTERPRET=1 was set after triton was imported but before refl_kernels; "
                "set it before anything imports triton")
    if device.type == "cuda":
        if _attention_mod.INTERPRETED:
            return "triton runs in interpreter mode in this process (TRITON_INTERPRET=1); unset it to use the GPU"
        if not torch.cuda.is_available():
            return "the triton backend needs a CUDA GPU and none is visible; use backend 'torch' or 'sdpa'"
        return None
    if device.type == "cpu":
        if triton_interpreting():
            return None
        return ("the triton backend needs a CUDA GPU; on CPU it runs only under Triton's interpreter "
                "(export TRITON_INTERPRET=1 before starting Python); use backend 'torch' on CPU")
    return f"the triton backend does not run on device {device.type!r}"


def xformers_unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed; `pip install xformers` (matching your torch build) or use backend 'sdpa'"
    if torch.device(device).type != "cuda":
        return "the xformers backend needs CUDA tensors; use backend 'sdpa' or 'torch' on CPU"
    return None


def sdpa_unavailable_reason(device: torch.device | str = "cuda") -> str | None:
    if not hasattr(F, "scaled_dot_product_attention"):
        return "torch.nn.functional.scaled_dot_product_attention needs torch >= 2.0; upgrade torch"
    return None


def _resolve(backend: str, device: torch.device, allowed: tuple[str, ...], op: str) -> str:
    if backend not in allowed:
        raise ValueError(f"unknown {op} backend {backend!r}; choose one of {', '.join(allowed)}")
    if backend == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device) is None:
            return "triton"
        if device.type == "cpu" and triton_interpreting():
            return "triton"
        if op == "group_norm" and device.type == "cpu" and native.available(device):
            return "native"
        return "torch"
    reason = {
        "triton": triton_unavailable_reason,
        "xformers": xformers_unavailable_reason,
        "sdpa": sdpa_unavailable_reason,
        "native": native.unavailable_reason,
    }.get(backend, lambda d: None)(device)
    if reason is not None:
        raise ValueError(f"{op} backend {backend!r} unavailable: {reason}")
    return backend


def auto_group_norm_backend(device: torch.device | str) -> str:
    """The backend group_norm(backend="auto") runs on `device`."""
    return _resolve("auto", torch.device(device), GROUP_NORM_BACKENDS, "group_norm")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
              backend: str = "auto") -> torch.Tensor:
    """softmax(q k^T * scale) v for q (B, H, Nq, D), k and v (B, H, Nk, D); scale defaults to D**-0.5."""
    backend = _resolve(backend, q.device, ATTENTION_BACKENDS, "attention")
    if backend == "triton":
        return _attention_mod.attention(q, k, v, scale)
    if backend in ("torch", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if backend == "xformers":
        import xformers.ops as xops

        # xformers takes (B, N, H, D)
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    return reference.attention(q, k, v, scale)


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str | None = None,
               backend: str = "auto") -> torch.Tensor:
    """GroupNorm over (C/G, *spatial), then the optional activation (None or "silu")."""
    backend = _resolve(backend, x.device, GROUP_NORM_BACKENDS, "group_norm")
    if backend == "triton":
        return _groupnorm_mod.group_norm(x, num_groups, weight, bias, eps, activation)
    if backend == "reference":
        return reference.group_norm(x, num_groups, weight, bias, eps, activation)
    if backend == "native":
        return native.group_norm(x, num_groups, weight, bias, eps, activation)
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if activation == "silu" else y


# ------------------------------------------------------------------------------------------------
# GroupNorm(+SiLU) in pieces, for an autograd Function that saves less than the op's own: the lean
# recompute of refl_engine keeps x and the statistics of a GroupNorm -> SiLU -> convolution, not
# the normalised tensor, and runs these three in its forward and backward. No autograd here.
# ------------------------------------------------------------------------------------------------
STATS_BACKENDS = ("triton", "native")  # the backends whose forward hands out its statistics


def group_norm_runs(backend: str, x: torch.Tensor) -> bool:
    """Whether `backend` ("triton" or "native") takes x, its device and dtype, here and now."""
    if backend == "triton":
        return (x.dtype in (torch.float32, torch.float16, torch.bfloat16)
                and (triton_unavailable_reason(x.device) is None
                     or (x.device.type == "meta" and _groupnorm_mod is not None)))  # shapes only
    if backend == "native":
        return x.dtype in native.DTYPES and native.available(x.device)
    return False


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, HW) contiguous, the layout the Triton kernels read."""
    t3 = t.reshape(t.shape[0], t.shape[1], -1)
    return t3 if t3.is_contiguous() else t3.contiguous()


def _stats_backend(backend: str) -> None:
    if backend not in STATS_BACKENDS:
        raise ValueError(f"GroupNorm in pieces runs on {' or '.join(STATS_BACKENDS)}, not {backend!r}")


def group_norm_with_stats(x: torch.Tensor, num_groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                          silu: bool, backend: str):
    """(y, mean, rstd): act(group_norm(x)) and its per-(sample, group) fp32 statistics, (N, G)."""
    _stats_backend(backend)
    if backend == "triton":
        y, mean, rstd = _groupnorm_mod.group_norm_forward(_rows(x), int(num_groups), weight, bias, float(eps), silu)
        return y.view(x.shape), mean, rstd
    return tuple(torch.ops.refl.group_norm_silu(x, weight, bias, int(num_groups), float(eps), silu))


def group_norm_from_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor, eps: float, silu: bool, backend: str) -> torch.Tensor:
    """y of `group_norm_with_stats` again from the statistics it returned: Triton runs its apply
    pass alone; the native op has no such entry point and runs its forward."""
    _stats_backend(backend)
    if backend == "triton":
        return _groupnorm_mod.group_norm_apply(_rows(x), weight, bias, mean, rstd, silu).view(x.shape)
    return torch.ops.refl.group_norm_silu(x, weight, bias, mean.shape[1], float(eps), silu)[0]


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, silu: bool, backend: str):
    """(dx, dweight, dbias) of `group_norm_with_stats` for the output gradient dy; dweight and
    dbias in the parameters' dtypes."""
    _stats_backend(backend)
    if backend == "triton":
        dx, dw, db = _groupnorm_mod.group_norm_backward(_rows(dy), _rows(x), weight, bias, mean, rstd, silu)
        dx = dx.view(x.shape)
    else:
        dx, dw, db = torch.ops.refl.group_norm_silu_backward(dy, x, weight, bias, mean, rstd, silu)
    return dx, dw.to(weight.dtype), db.to(bias.dtype)


# ------------------------------------------------------------------------------------------------
# GPU readiness without a GPU: compile every launchable configuration to a cubin
# ------------------------------------------------------------------------------------------------

# Shared memory per block an SM can give (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
MAX_SHARED_BYTES = {80: 166912, 90: 232448}


def _resource_usage(cubin: bytes) -> dict:
    """Registers, static shared and local (spill) bytes of the single kernel in a cubin, read with
    the cuobjdump that ships with triton."""
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{out}")
    reg, stack, shared, local = map(int, m.groups())
    return {"n_regs": reg, "stack_bytes": stack, "static_shared_bytes": shared, "local_bytes": local}


def _compile_one(item):
    name, fn, sig, const, num_warps, num_stages, arch = item
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.perf_counter()
    src = ASTSource(fn=fn, signature=sig, constexprs=const)
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    usage = _resource_usage(ck.asm["cubin"])
    usage["shared_bytes"] = int(ck.metadata.shared) + usage["static_shared_bytes"]
    # These kernels have no local arrays or calls, so any stack frame or local memory is register
    # spill space (checked against `ptxas -v`, which reports the same bytes as "spill stores").
    usage["spill_bytes"] = usage["stack_bytes"] + usage["local_bytes"]
    usage["compile_seconds"] = round(time.perf_counter() - t0, 3)
    dtypes = sorted({t for t in sig.values() if t.startswith("*") and t != "*fp32"}) or ["*fp32"]
    return {
        "kernel": name, "arch": f"sm_{arch}", "dtype": dtypes[0].lstrip("*"),
        "constexprs": {k: v for k, v in const.items()}, "num_warps": num_warps, "num_stages": num_stages,
        **usage, "shared_limit_bytes": MAX_SHARED_BYTES[arch],
    }


def gpu_compile_report(archs=(80, 90), kernels: str = "all", workers: int = 1) -> list[dict]:
    """Compile every configuration the CUDA path can launch for each arch; one dict per cubin
    with n_regs, shared_bytes, local/spill bytes. Must run in a process where triton was imported
    *without* TRITON_INTERPRET (the interpreter replaces the compiler)."""
    if _attention_mod is None:
        raise RuntimeError(f"triton is not importable: {_TRITON_IMPORT_ERROR}")
    if _attention_mod.INTERPRETED or _attention_mod.INTERPRETER_MISMATCH:
        raise RuntimeError("gpu_compile_report needs a process without TRITON_INTERPRET=1")
    specs = []
    if kernels in ("all", "attention"):
        specs += list(_attention_mod.gpu_compile_specs())
    if kernels in ("all", "groupnorm"):
        specs += list(_groupnorm_mod.gpu_compile_specs())
    items = [(*spec, arch) for arch in archs for spec in specs]
    if workers <= 1:
        return [_compile_one(it) for it in items]
    from concurrent.futures import ThreadPoolExecutor

    # the expensive parts (LLVM, ptxas) run outside the GIL
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(_compile_one, items))

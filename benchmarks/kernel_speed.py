"""Microbenchmarks of refl_kernels: fused attention and GroupNorm(+SiLU) at the shapes of the
SD1.5 UNet at 512 px and the SDXL UNet at 1024 px.

    python benchmarks/kernel_speed.py [--models sd15,sdxl] [--batch 1] [--dtype bf16] [--reps 20]
    python benchmarks/kernel_speed.py --models sd15 --ops group_norm --threads 2 --reps 15 --batch 2 --dtype bf16

The shapes are not typed in: the real UNet configs (engine/configs/*_unet_config.json) are built
on the meta device and run once, recording every attention call (B, H, Nq, Nk, D) and every
GroupNorm input (N, C, H, W, followed by SiLU or not) with its count per UNet forward.

Per shape:
- forward, backward and forward+backward times (median, p20, p80) of each backend: "triton"
  (this package, CUDA only), "sdpa" (torch SDPA), "xformers" (if installed, CUDA only) and
  "reference" (plain torch: materialised softmax for attention; F.group_norm then F.silu);
- attention TFLOP/s with forward = 4 B H Nq Nk D FLOPs and backward counted as 2.5x forward;
  GroupNorm GB/s against the bytes the op must move (forward: read x, write y = 2 elements;
  backward: read x and dy, write dx = 3 elements; 4 and 6 B/element in bf16); percent of the
  H100 peaks (989 TFLOP/s dense bf16; 3.35 TB/s HBM3) when the device is an H100;
- saved-for-backward bytes per call, fused vs unfused, measured with saved_tensors_hooks on
  meta tensors (so on any machine and at full size); parameters are not counted.

GroupNorm also gets the native op of csrc/ ("native", refl_kernels.native; CPU, and CUDA when
built against a CUDA torch): its times next to "torch" (F.group_norm then F.silu, what stock
diffusers runs), the speedup of its forward+backward over torch's, its saved bytes, and how many
activation-sized tensors each saves per call - alone, and in the UNet's GroupNorm -> SiLU -> conv
pattern (stock modules vs the lean recompute's Function with the native op inside). On CPU the
GroupNorm backends are timed interleaved (one repetition of each in turn), so load from other
processes hits them alike; --threads sets torch's intra-op threads. The closing line sums
count x forward+backward time over one UNet forward's GroupNorm calls, per backend.
Then registers / shared memory / spill bytes of every compiled GPU configuration (compiled for
sm_80 and sm_90 with triton.compile, no GPU needed).

A table goes to stdout and JSON (device, versions, every number) to --json. Numbers that cannot
be measured on this machine are reported as not measured, with the reason; never estimated.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "engine" / "configs"
H100_TFLOPS_BF16 = 989.0
H100_HBM_TBPS = 3.35
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODELS = {"sd15": ("sd15_unet_config.json", 64), "sdxl": ("sdxl_unet_config.json", 128)}  # latent side

import refl_kernels  # noqa: E402
from refl_kernels import native, reference  # noqa: E402

try:
    _attn_mod = importlib.import_module("refl_kernels.attention")
    _gn_mod = importlib.import_module("refl_kernels.groupnorm")
except ImportError:  # no triton: fused saved-bytes columns are then not measured
    _attn_mod = _gn_mod = None


# ------------------------------------------------------------------------------------------------
# Shapes from the real UNet configs
# ------------------------------------------------------------------------------------------------

def unet_call_shapes(model: str, batch: int):
    """(attention calls, GroupNorm calls) of one UNet forward, as Counters of shape tuples."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    cfg_file, side = MODELS[model]
    cfg = json.loads((CONFIGS / cfg_file).read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    silu_norms = set()
    for m in unet.modules():
        if isinstance(m, ResnetBlock2D) and isinstance(m.nonlinearity, nn.SiLU):
            silu_norms.add(id(m.norm1))
            if m.time_embedding_norm == "default":
                silu_norms.add(id(m.norm2))
    if isinstance(getattr(unet, "conv_act", None), nn.SiLU):
        silu_norms.add(id(unet.conv_norm_out))

    attn_calls, gn_calls = Counter(), Counter()
    for m in unet.modules():
        if isinstance(m, nn.GroupNorm):
            act = "silu" if id(m) in silu_norms else None
            m.register_forward_pre_hook(
                lambda mod, args, act=act: gn_calls.update([(*args[0].shape, mod.num_groups, act)]))

    class Recorder:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            n_q = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
            n_k = n_q if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            kind = "self" if encoder_hidden_states is None else "cross"
            attn_calls.update([(hidden_states.shape[0], attn.heads, n_q, n_k, attn.inner_dim // attn.heads, kind)])
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    for m in unet.modules():
        if isinstance(m, Attention):
            m.set_processor(Recorder(m.processor))
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.zeros(batch, cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"], device="meta"),
            "time_ids": torch.zeros(batch, 6, device="meta"),
        }
    with torch.no_grad():
        unet(torch.zeros(batch, cfg["in_channels"], side, side, device="meta"), torch.tensor([10] * batch, device="meta"),
             encoder_hidden_states=torch.zeros(batch, 77, cfg["cross_attention_dim"], device="meta"), **kwargs)
    return attn_calls, gn_calls


# ------------------------------------------------------------------------------------------------
# Saved-for-backward bytes (meta tensors: no data, real autograd bookkeeping)
# ------------------------------------------------------------------------------------------------

def saved_storages(fn, inputs, exclude=()) -> list[int]:
    """Bytes of each distinct storage autograd saves while `fn(*inputs)` runs, minus `exclude`."""
    seen, sizes = {t.untyped_storage()._cdata for t in exclude}, []

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sizes


def saved_bytes(fn, inputs, exclude=()) -> int:
    return sum(saved_storages(fn, inputs, exclude))


def attention_saved(B, H, Nq, Nk, D, dtype):
    q = torch.empty(B, H, Nq, D, device="meta", dtype=dtype, requires_grad=True)
    k = torch.empty(B, H, Nk, D, device="meta", dtype=dtype, requires_grad=True)
    v = torch.empty(B, H, Nk, D, device="meta", dtype=dtype, requires_grad=True)
    unfused = saved_bytes(reference.attention, (q, k, v))
    fused = saved_bytes(_attn_mod.attention, (q, k, v)) if _attn_mod else None
    return fused, unfused


def group_norm_saved(N, C, H, W, G, act, dtype):
    x = torch.empty(N, C, H, W, device="meta", dtype=dtype, requires_grad=True)
    w = torch.empty(C, device="meta", dtype=dtype, requires_grad=True)
    b = torch.empty(C, device="meta", dtype=dtype, requires_grad=True)

    def unfused(x, w, b):  # what stock diffusers runs: nn.GroupNorm then nn.SiLU
        y = F.group_norm(x, G, w, b, 1e-5)
        return F.silu(y) if act else y

    u = saved_bytes(unfused, (x, w, b), exclude=(w, b))
    f = saved_bytes(lambda x, w, b: _gn_mod.group_norm(x, G, w, b, 1e-5, act), (x, w, b), exclude=(w, b)) if _gn_mod else None
    return f, u


def group_norm_native_saved(N, C, H, W, G, act, dtype) -> dict | None:
    """The native op's saved bytes and, for it and for torch's two ops, the number of saved
    activation-sized tensors per call; with SiLU also in the UNet's GroupNorm -> SiLU -> 3x3 conv
    pattern: stock modules vs the lean recompute's Function (lean.py) running the native op.
    Meta tensors through the op's Meta kernels. None when the library is not loaded."""
    if not native.available("meta") or dtype not in native.DTYPES:
        return None
    from refl_engine.memory import lean as lean_mod

    x = torch.empty(N, C, H, W, device="meta", dtype=dtype, requires_grad=True)
    w = torch.empty(C, device="meta", dtype=dtype, requires_grad=True)
    b = torch.empty(C, device="meta", dtype=dtype, requires_grad=True)
    act_bytes = x.numel() * x.element_size()
    n_act = lambda sizes: sum(s >= act_bytes for s in sizes)  # noqa: E731
    fused = saved_storages(lambda: native.group_norm(x, G, w, b, 1e-5, act), (), exclude=(w, b))
    stock = saved_storages(lambda: (F.silu if act else (lambda t: t))(F.group_norm(x, G, w, b, 1e-5)), (), exclude=(w, b))
    out = {"saved_bytes_native": sum(fused), "act_tensors_native": n_act(fused), "act_tensors_torch": n_act(stock)}
    if act:
        norm = nn.GroupNorm(G, C, device="meta", dtype=dtype)
        conv = nn.Conv2d(C, C, 3, padding=1, device="meta", dtype=dtype)
        params = list(norm.parameters()) + list(conv.parameters())
        stock = saved_storages(lambda: conv(F.silu(norm(x))), (), exclude=params)
        with lean_mod.lean_mode():
            lean = saved_storages(lambda: lean_mod.norm_act_project(x, norm, "silu", conv, "native"), (), exclude=params)
        out.update({"pattern_saved_bytes_stock": sum(stock), "pattern_act_tensors_stock": n_act(stock),
                    "pattern_saved_bytes_lean_native": sum(lean), "pattern_act_tensors_lean_native": n_act(lean)})
    return out


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

CLOCK = "wall"  # or "cpu": this thread's CPU time (--clock cpu, one thread), immune to time the
                # scheduler gives to other processes on a shared machine


def _timer(device):
    if device.type == "cpu" and CLOCK == "cpu":
        def run(fn):
            t0 = time.thread_time()
            fn()
            return (time.thread_time() - t0) * 1e3
        return run
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return run


def measure(fn, device, reps: int, warmup: int) -> dict:
    run = _timer(device)
    for _ in range(warmup):
        run(fn)
    times = sorted(run(fn) for _ in range(reps))
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7], "reps": reps}


def time_op(op, inputs, grad_out_like, device, reps, warmup):
    """forward, backward and forward+backward timings of `op(*inputs)`."""
    out = op(*inputs)
    grad = torch.randn_like(out if grad_out_like is None else grad_out_like)
    fwd = measure(lambda: op(*inputs), device, reps, warmup)
    bwd = measure(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True), device, reps, warmup)
    both = measure(lambda: torch.autograd.grad(op(*inputs), inputs, grad), device, reps, warmup)
    del out
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": both}


def time_ops_interleaved(ops: dict, device, reps, warmup) -> dict:
    """time_op for several (op, inputs) at once, one repetition of each in turn."""
    runs = {}
    for name, (op, inputs) in ops.items():
        out = op(*inputs)
        grad = torch.randn_like(out)
        runs[name] = {
            "fwd": lambda op=op, inputs=inputs: op(*inputs),
            "bwd": lambda out=out, inputs=inputs, grad=grad: torch.autograd.grad(out, inputs, grad, retain_graph=True),
            "fwd_bwd": lambda op=op, inputs=inputs, grad=grad: torch.autograd.grad(op(*inputs), inputs, grad),
        }
    run = _timer(device)
    times = {name: {k: [] for k in fns} for name, fns in runs.items()}
    for rep in range(warmup + reps):
        for name, fns in runs.items():
            for k, fn in fns.items():
                t = run(fn)
                if rep >= warmup:
                    times[name][k].append(t)
    result = {}
    for name, per in times.items():
        result[name] = {}
        for k, ts in per.items():
            ts = sorted(ts)
            q = statistics.quantiles(ts, n=10) if len(ts) >= 2 else [ts[0]] * 9
            result[name][k] = {"median_ms": statistics.median(ts), "p20_ms": q[1], "p80_ms": q[7], "reps": reps}
    return result


def native_cache_mib() -> int | None:
    """The bound of the native op's output cache (REFL_NATIVE_CACHE_MB; 0 = off), None without the op."""
    if not native.available("cpu"):
        return None
    return torch.ops.refl.output_cache_limit(-1) >> 20


def backend_reason(backend: str, device: torch.device) -> str | None:
    if backend == "native":
        return native.unavailable_reason(device)
    if backend == "triton":
        if device.type != "cuda":
            return "no CUDA device (the interpreter is for correctness, not timing)"
        return refl_kernels.triton_unavailable_reason(device)
    if backend == "xformers":
        return refl_kernels.xformers_unavailable_reason(device)
    if backend == "sdpa":
        return refl_kernels.sdpa_unavailable_reason(device)
    return None


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "diffusers", "xformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: report as such
            out[name] = None
    return out


def fmt_bytes(n):
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def fmt_t(entry):
    return f"{entry['median_ms']:.3f}" if isinstance(entry, dict) else "-"


def group_norm_summary(result: dict) -> list[str]:
    """Per model, forward+backward of one UNet forward's GroupNorm calls (sum of count x median):
    each backend alone (patch(unet, "native") runs the native column: every GroupNorm), and the native op
    for GroupNorm -> SiLU with torch's GroupNorm for the lone ones (what patch ran before routing them)."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in result["group_norm"]):
        rows = [r for r in result["group_norm"] if r["model"] == model]
        tot = {}
        for r in rows:
            for be, t in r["timings"].items():
                if t is not None:
                    tot[be] = tot.get(be, 0.0) + r["count_per_step"] * t["fwd_bwd"]["median_ms"]
        if not tot:
            continue
        line = (f"{model}: GroupNorm(+SiLU) forward+backward per UNet forward (sum of count x median): "
                + ", ".join(f"{be} {ms:.1f} ms" for be, ms in tot.items()))
        if tot.get("native") and tot.get("torch"):
            mix = sum(r["count_per_step"] * r["timings"]["native" if r["activation"] else "torch"]["fwd_bwd"]["median_ms"]
                      for r in rows)
            line += (f"; native {tot['torch'] / tot['native']:.2f}x torch; lone GroupNorms left to torch (native with "
                     f"SiLU, torch alone) {mix:.1f} ms, {tot['torch'] / mix:.2f}x torch")
            result.setdefault("group_norm_step_ms", {})[model] = {**tot, "kernels_native_mix": mix}
        lines.append(line)
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--batch", type=int, default=None, help="images per UNet call (default 2 on GPU, 1 on CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--backends", default="triton,sdpa,xformers,native,reference")
    p.add_argument("--ops", default="attention,group_norm", help="which ops to benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU timings: wall time, or this thread's CPU time (needs --threads 1; robust to other load)")
    p.add_argument("--no-timing", action="store_true", help="only shapes, saved bytes and the compile report")
    p.add_argument("--no-compile-report", action="store_true")
    p.add_argument("--json", default=None, help="output path (default benchmarks/results/kernels-<device>.json)")
    p.add_argument("--from-json", default=None, help="print the GroupNorm step totals of a saved run and exit")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(f"{args.from_json}: {saved['device']}, {saved['dtype']}, batch {saved['batch']}, "
              f"{saved.get('threads')} threads, clock {saved.get('clock', 'wall')}, "
              f"native output cache {saved.get('native_output_cache_mib')} MiB, load average {saved.get('load_average_at_start')}")
        print("\n".join(group_norm_summary(saved)))
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = args.clock
    if CLOCK == "cpu" and torch.get_num_threads() != 1:
        raise SystemExit("error: --clock cpu measures one thread's CPU time; add --threads 1")
    ops = set(args.ops.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    batch = args.batch or (2 if on_gpu else 1)
    reps = args.reps or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    device_name = torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine()) + " CPU"
    is_h100 = on_gpu and "H100" in device_name
    elsize = torch.empty((), dtype=dtype).element_size()
    backends = [b for b in args.backends.split(",") if b]
    skipped = {b: backend_reason(b, device) for b in backends}
    skipped = {b: r for b, r in skipped.items() if r}

    print(f"device: {device_name}   dtype: {str(dtype).replace('torch.', '')}   batch: {batch}   reps: {reps}   "
          f"threads: {torch.get_num_threads()}   clock: {CLOCK}" + (" (this thread's CPU time)" if CLOCK == "cpu" else "")
          + (f"   native output cache: {native_cache_mib()} MiB" if native_cache_mib() is not None else ""))
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    for b, r in skipped.items():
        print(f"NOT MEASURED: {b} columns: {r}")
    if not is_h100:
        print("NOT MEASURED: % of H100 peak (device is not an H100)")
    if args.no_timing:
        print("NOT MEASURED: all timings (--no-timing)")

    result = {"device": device_name, "device_type": device.type, "dtype": str(dtype), "batch": batch,
              "threads": torch.get_num_threads(), "reps": reps, "ops": sorted(ops), "clock": CLOCK,
              "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
              "versions": versions(), "not_measured": skipped, "native_output_cache_mib": native_cache_mib(), "attention": [], "group_norm": [], "compile_report": None,
              "unet_step_saved_bytes": {}}

    for model in [m for m in args.models.split(",") if m]:
        attn_calls, gn_calls = unet_call_shapes(model, batch)
        step = {"attention_fused": 0, "attention_unfused": 0, "group_norm_fused": 0, "group_norm_unfused": 0}

        if "attention" in ops:
            print(f"\n== {model}: attention (per call; count = calls per UNet forward) ==")
            print(f"{'kind':5} {'B':>2} {'H':>3} {'Nq':>5} {'Nk':>5} {'D':>4} {'cnt':>4} | {'saved fused':>12} {'unfused':>12} | "
                  f"{'backend':9} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'TFLOP/s':>8} {'%H100':>6}")
        for (B, H, Nq, Nk, D, kind), count in sorted(attn_calls.items() if "attention" in ops else (),
                                                      key=lambda kv: (-kv[0][2], kv[0][5])):
            fused, unfused = attention_saved(B, H, Nq, Nk, D, dtype)
            step["attention_fused"] += (fused or 0) * count
            step["attention_unfused"] += unfused * count
            row = {"model": model, "kind": kind, "B": B, "H": H, "Nq": Nq, "Nk": Nk, "D": D, "count_per_step": count,
                   "saved_bytes_fused": fused, "saved_bytes_unfused": unfused, "timings": {}}
            flops_fwd = 4.0 * B * H * Nq * Nk * D
            lines = []
            for backend in backends:
                if backend in skipped or args.no_timing:
                    row["timings"][backend] = None
                    lines.append((backend, None))
                    continue
                gen = torch.Generator(device=device).manual_seed(0)
                q = torch.randn(B, H, Nq, D, device=device, dtype=dtype, generator=gen, requires_grad=True)
                k = torch.randn(B, H, Nk, D, device=device, dtype=dtype, generator=gen, requires_grad=True)
                v = torch.randn(B, H, Nk, D, device=device, dtype=dtype, generator=gen, requires_grad=True)
                op = (lambda a, b, c, be=backend: refl_kernels.attention(a, b, c, backend=be))
                t = time_op(op, (q, k, v), None, device, reps, warmup)
                t["tflops_fwd_bwd"] = 3.5 * flops_fwd / (t["fwd_bwd"]["median_ms"] * 1e-3) / 1e12
                t["tflops_fwd"] = flops_fwd / (t["fwd"]["median_ms"] * 1e-3) / 1e12
                t["tflops_bwd"] = 2.5 * flops_fwd / (t["bwd"]["median_ms"] * 1e-3) / 1e12
                if is_h100:
                    t["pct_h100_fwd_bwd"] = 100 * t["tflops_fwd_bwd"] / H100_TFLOPS_BF16
                row["timings"][backend] = t
                lines.append((backend, t))
                del q, k, v
            result["attention"].append(row)
            for i, (backend, t) in enumerate(lines):
                head = (f"{kind:5} {B:>2} {H:>3} {Nq:>5} {Nk:>5} {D:>4} {count:>4} | {fmt_bytes(fused):>12} {fmt_bytes(unfused):>12} | "
                        if i == 0 else " " * 33 + "| " + " " * 25 + " | ")
                if t is None:
                    print(head + f"{backend:9} {'not measured':>29}")
                else:
                    pct = f"{t['pct_h100_fwd_bwd']:.1f}" if "pct_h100_fwd_bwd" in t else "-"
                    print(head + f"{backend:9} {fmt_t(t['fwd']):>9} {fmt_t(t['bwd']):>9} {fmt_t(t['fwd_bwd']):>9} "
                                 f"{t['tflops_fwd_bwd']:>8.3f} {pct:>6}")

        gn_items = sorted(gn_calls.items(), key=lambda kv: (-kv[0][2], kv[0][1])) if "group_norm" in ops else []
        gn_backends = [b for b in backends if b in ("triton", "native", "reference")] + ["torch"]
        step_ms = {b: 0.0 for b in gn_backends}
        step.update({"group_norm_native": 0, "pattern_stock": 0, "pattern_lean_native": 0})
        if gn_items:
            print(f"\n== {model}: GroupNorm (G={next(iter(gn_calls))[4]}; count = calls per UNet forward) ==")
            print(f"{'N':>2} {'C':>5} {'HxW':>9} {'act':>4} {'cnt':>4} | {'saved fused':>12} {'unfused':>12} | "
                  f"{'backend':9} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'fwd GB/s':>9} {'bwd GB/s':>9} {'%HBM':>5}")
        for (N, C, H, W, G, act), count in gn_items:
            fused, unfused = group_norm_saved(N, C, H, W, G, act, dtype)
            nat = group_norm_native_saved(N, C, H, W, G, act, dtype)
            step["group_norm_fused"] += (fused or 0) * count
            step["group_norm_unfused"] += unfused * count
            row = {"model": model, "N": N, "C": C, "H": H, "W": W, "groups": G, "activation": act, "count_per_step": count,
                   "saved_bytes_fused": fused, "saved_bytes_unfused": unfused, **(nat or {}), "timings": {}}
            if nat:
                step["group_norm_native"] += nat["saved_bytes_native"] * count
                if act:
                    step["pattern_stock"] += nat["pattern_saved_bytes_stock"] * count
                    step["pattern_lean_native"] += nat["pattern_saved_bytes_lean_native"] * count
            numel = N * C * H * W
            timed = {}
            for backend in gn_backends:
                if backend in skipped or args.no_timing:
                    continue
                gen = torch.Generator(device=device).manual_seed(0)
                x = torch.randn(N, C, H, W, device=device, dtype=dtype, generator=gen, requires_grad=True)
                w = torch.randn(C, device=device, dtype=dtype, generator=gen, requires_grad=True)
                b = torch.randn(C, device=device, dtype=dtype, generator=gen, requires_grad=True)
                op = (lambda x, w, b, be=backend: refl_kernels.group_norm(x, G, w, b, 1e-5, act, backend=be))
                timed[backend] = (op, (x, w, b))
            if device.type == "cpu":  # interleaved: other processes' load hits every backend alike
                times = time_ops_interleaved(timed, device, reps, warmup)
            else:
                times = {be: time_op(op, inputs, None, device, reps, warmup) for be, (op, inputs) in timed.items()}
            lines = []
            for backend in gn_backends:
                t = times.get(backend)
                if t is not None:
                    t["gbps_fwd"] = 2 * numel * elsize / (t["fwd"]["median_ms"] * 1e-3) / 1e9
                    t["gbps_bwd"] = 3 * numel * elsize / (t["bwd"]["median_ms"] * 1e-3) / 1e9
                    if is_h100:
                        t["pct_h100_hbm_fwd"] = 100 * t["gbps_fwd"] / (H100_HBM_TBPS * 1e3)
                        t["pct_h100_hbm_bwd"] = 100 * t["gbps_bwd"] / (H100_HBM_TBPS * 1e3)
                    step_ms[backend] += count * t["fwd_bwd"]["median_ms"]
                row["timings"][backend] = t
                lines.append((backend, t))
            if times.get("native") and times.get("torch"):
                row["native_speedup_fwd_bwd"] = times["torch"]["fwd_bwd"]["median_ms"] / times["native"]["fwd_bwd"]["median_ms"]
            result["group_norm"].append(row)
            for i, (backend, t) in enumerate(lines):
                head = (f"{N:>2} {C:>5} {f'{H}x{W}':>9} {act or '-':>4} {count:>4} | {fmt_bytes(fused):>12} {fmt_bytes(unfused):>12} | "
                        if i == 0 else " " * 28 + "| " + " " * 25 + " | ")
                if t is None:
                    print(head + f"{backend:9} {'not measured':>29}")
                else:
                    pct = f"{t['pct_h100_hbm_bwd']:.0f}" if "pct_h100_hbm_bwd" in t else "-"
                    print(head + f"{backend:9} {fmt_t(t['fwd']):>9} {fmt_t(t['bwd']):>9} {fmt_t(t['fwd_bwd']):>9} "
                                 f"{t['gbps_fwd']:>9.1f} {t['gbps_bwd']:>9.1f} {pct:>5}")
            if nat:
                line = (f"{'':28}| native: saved {fmt_bytes(nat['saved_bytes_native'])}, activation tensors saved "
                        f"{nat['act_tensors_torch']} (torch) -> {nat['act_tensors_native']}")
                if act:
                    line += (f"; with the conv after it: {nat['pattern_act_tensors_stock']} "
                             f"({fmt_bytes(nat['pattern_saved_bytes_stock'])}) stock -> {nat['pattern_act_tensors_lean_native']} "
                             f"({fmt_bytes(nat['pattern_saved_bytes_lean_native'])}) lean")
                if "native_speedup_fwd_bwd" in row:
                    line += f"; f+b {row['native_speedup_fwd_bwd']:.2f}x torch"
                print(line)
        if gn_items and any(step_ms.values()):
            print("\n" + "\n".join(ln for ln in group_norm_summary(result) if ln.startswith(model + ":")))

        result["unet_step_saved_bytes"][model] = step
        print(f"\n{model}: saved for backward per UNet forward (batch {batch}, {str(dtype).replace('torch.', '')}): "
              f"attention {fmt_bytes(step['attention_unfused'])} unfused -> {fmt_bytes(step['attention_fused'])} fused; "
              f"GroupNorm(+SiLU) {fmt_bytes(step['group_norm_unfused'])} -> {fmt_bytes(step['group_norm_fused'])}"
              + (f" (triton), {fmt_bytes(step['group_norm_native'])} (native); GroupNorm -> SiLU -> conv "
                 f"{fmt_bytes(step['pattern_stock'])} stock -> {fmt_bytes(step['pattern_lean_native'])} lean with native"
                 if step["group_norm_native"] else ""))

    if args.no_compile_report:
        print("\nNOT MEASURED: compile report (--no-compile-report)")
    elif _attn_mod is None or _attn_mod.INTERPRETED:
        print("\nNOT MEASURED: compile report (triton missing or running in interpreter mode)")
    else:
        print("\n== compiled GPU configurations (triton.compile for sm_80 / sm_90; no GPU needed) ==")
        print(f"{'kernel':15} {'arch':6} {'dtype':5} {'config':44} {'warps':>5} {'stg':>3} {'regs':>5} {'shared B':>9} {'spill B':>8}")
        report = refl_kernels.gpu_compile_report(workers=2)
        for r in report:
            cfg = ",".join(f"{k}={v}" for k, v in r["constexprs"].items())
            print(f"{r['kernel']:15} {r['arch']:6} {r['dtype']:5} {cfg:44} {r['num_warps']:>5} {r['num_stages']:>3} "
                  f"{r['n_regs']:>5} {r['shared_bytes']:>9} {r['spill_bytes']:>8}")
        result["compile_report"] = report

    out = Path(args.json) if args.json else ROOT / "benchmarks" / "results" / (
        "kernels-" + "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower() + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

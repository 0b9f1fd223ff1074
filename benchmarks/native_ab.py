"""The native GroupNorm(+SiLU) op of two builds, timed against each other in one process: the
library in build/native (or --new) and the csrc/ of a git revision (--base, default HEAD), built
here under another op namespace. CPU timings on these machines drift by 10-20% from one run to
the next, more than a kernel change is worth; calls of the two builds alternate (forward and
backward of one, then of the other), so the drift hits both alike.

    python benchmarks/native_ab.py [--base REV] [--new LIB] [--dtypes bf16,fp32] [--batch 1] [--reps 41]

Shapes: every GroupNorm call of one SD1.5 UNet forward (512 px), as `kernel_speed.py` lists them;
per shape the median of the CPU time of one thread, forward and backward (the op and its backward
op, no autograd), then summed over the UNet forward (count x median). Both builds' outputs are
compared on every shape (the JSON gives the largest difference, relative to the output's scale).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASE_NS = "refl_base"  # the base build's op namespace and C++ namespace


def build_base(rev: str, out: Path) -> Path:
    """csrc/ and CMakeLists.txt of `rev`, built with the C++ namespace and the op namespace renamed
    (refl -> refl_base), so both libraries load into one process without sharing a symbol."""
    src = out / "src"
    (src / "csrc").mkdir(parents=True)
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", f"{rev}:csrc"], check=True,
                           capture_output=True, text=True).stdout.split()
    for name in ["CMakeLists.txt"] + [f"csrc/{f}" for f in files]:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], check=True, capture_output=True,
                              text=True).stdout
        (src / name).write_text(re.sub(r'"refl::', f'"{BASE_NS}::', text))  # schema names in strings
    build = out / "build"
    flags = f"-Drefl={BASE_NS}"  # identifiers: namespace refl, TORCH_LIBRARY(refl, ...)
    subprocess.run(["cmake", "-S", str(src), "-B", str(build), "--log-level=WARNING", f"-DPython_EXECUTABLE={sys.executable}",
                    f"-DCMAKE_CXX_FLAGS={flags}"], check=True, capture_output=True, text=True)
    subprocess.run(["cmake", "--build", str(build), "--target", "refl_native", "-j2"], check=True, capture_output=True,
                   text=True)
    lib = build / "librefl_native.so"
    if not lib.exists():
        raise SystemExit(f"building {rev}'s csrc/ gave no {lib}")
    return lib


def gn_shapes(batch: int) -> list[tuple[tuple, int]]:
    from kernel_speed import unet_call_shapes

    _, gn = unet_call_shapes("sd15", batch)
    return sorted(gn.items(), key=lambda kv: (-kv[0][2], kv[0][1], str(kv[0][5])))


def cpu_ms(fn) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="HEAD", help="git revision whose csrc/ is the baseline (default HEAD)")
    ap.add_argument("--new", default=str(ROOT / "build" / "native" / "librefl_native.so"),
                    help="the library to compare (default: build/native's, as `make install` builds it)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=41, help="alternating repetitions per shape (after 3 warm-up)")
    ap.add_argument("--json", help="default benchmarks/results/native-ab-<machine>-b<batch>.json")
    a = ap.parse_args(argv)
    if not Path(a.new).exists():
        raise SystemExit(f"{a.new} does not exist: build it with `make install` or pass --new")
    if shutil.which("cmake") is None:
        raise SystemExit("cmake not found: it builds the base revision's library")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base_lib = build_base(a.base, Path(tmp))
        torch.ops.load_library(str(base_lib))
        torch.ops.load_library(a.new)
        libs = {"base": getattr(torch.ops, BASE_NS), "new": torch.ops.refl}
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.base], capture_output=True,
                             text=True).stdout.strip()
        print(f"native GroupNorm(+SiLU), base {a.base} ({rev}) against {a.new}; SD1.5 shapes, batch {a.batch}, "
              f"1 thread, CPU time, {a.reps} alternating repetitions")
        record = dict(base=a.base, base_commit=rev, new=a.new, batch=a.batch, reps=a.reps,
                      device=f"cpu ({platform.machine()}), 1 thread", load_average_at_start=os.getloadavg(),
                      torch=torch.__version__, rows=[], totals={})
        shapes = gn_shapes(a.batch)
        for dname in [d for d in a.dtypes.split(",") if d]:
            dtype = DTYPES[dname]
            sums = {k: {"fwd": 0.0, "bwd": 0.0} for k in libs}
            for (N, C, H, W, G, act), count in shapes:
                g = torch.Generator().manual_seed(0)
                x = torch.randn(N, C, H, W, generator=g).to(dtype)
                w, b = (1 + 0.1 * torch.randn(C, generator=g)).to(dtype), (0.1 * torch.randn(C, generator=g)).to(dtype)
                dy = torch.randn(N, C, H, W, generator=g).to(dtype)
                silu = act == "silu"
                outs, times = {}, {k: {"fwd": [], "bwd": []} for k in libs}
                for k, ops in libs.items():
                    y, m, r = ops.group_norm_silu(x, w, b, G, 1e-5, silu)
                    outs[k] = (y, *ops.group_norm_silu_backward(dy, x, w, b, m, r, silu))
                for rep in range(3 + a.reps):
                    for k, ops in libs.items():
                        stats = []
                        tf = cpu_ms(lambda: stats.extend(ops.group_norm_silu(x, w, b, G, 1e-5, silu)))
                        tb = cpu_ms(lambda: ops.group_norm_silu_backward(dy, x, w, b, stats[1], stats[2], silu))
                        if rep >= 3:
                            times[k]["fwd"].append(tf)
                            times[k]["bwd"].append(tb)
                diff = max(float((p.float() - q.float()).abs().max() / q.float().abs().max().clamp_min(1e-30))
                           for p, q in zip(outs["new"], outs["base"]))
                med = {k: {p: statistics.median(v) for p, v in t.items()} for k, t in times.items()}
                for k in libs:
                    for p in ("fwd", "bwd"):
                        sums[k][p] += count * med[k][p]
                fb = {k: med[k]["fwd"] + med[k]["bwd"] for k in libs}
                print(f"  {dname} {N}x{C}x{H}x{W} {act or 'none':4s} x{count:<2d} fwd {med['base']['fwd']:.3f} -> "
                      f"{med['new']['fwd']:.3f} ms, bwd {med['base']['bwd']:.3f} -> {med['new']['bwd']:.3f} ms, "
                      f"f+b {fb['base'] / fb['new']:.2f}x; outputs differ by {diff:.1e} of their scale", flush=True)
                record["rows"].append(dict(dtype=dname, shape=[N, C, H, W], groups=G, activation=act, count=count,
                                           median_ms=med, max_rel_diff=diff))
            tot = {k: sums[k]["fwd"] + sums[k]["bwd"] for k in libs}
            record["totals"][dname] = dict(sums, speedup_fwd=sums["base"]["fwd"] / sums["new"]["fwd"],
                                           speedup_bwd=sums["base"]["bwd"] / sums["new"]["bwd"],
                                           speedup_fwd_bwd=tot["base"] / tot["new"])
            print(f"{dname}: per UNet forward, forward {sums['base']['fwd']:.1f} -> {sums['new']['fwd']:.1f} ms "
                  f"({sums['base']['fwd'] / sums['new']['fwd']:.2f}x), backward {sums['base']['bwd']:.1f} -> "
                  f"{sums['new']['bwd']:.1f} ms ({sums['base']['bwd'] / sums['new']['bwd']:.2f}x), forward+backward "
                  f"{tot['base'] / tot['new']:.2f}x", flush=True)
    path = Path(a.json or ROOT / "benchmarks" / "results" / f"native-ab-{platform.machine()}-b{a.batch}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

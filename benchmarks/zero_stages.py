"""CPU seconds per optimizer step of the tiny preset under each DeepSpeed setting, against the
single-process plain-torch run with the same global batch.

    python benchmarks/zero_stages.py [--steps 6] [--out benchmarks/results/distributed-tiny-sd-cpu.json]
    python benchmarks/zero_stages.py --plan    # the planner's per-GPU peak, host memory and largest
                                               # batch for full fine-tuning of SD1.5 / SDXL on 80 GB GPUs

Each row launches its ranks as processes with the environment torchrun sets (gloo on CPU) and
trains DRaFT K=full, N=4, LoRA r=4, global batch 2; the first step (DeepSpeed's setup, ZeRO-3's
parameter trace) is not counted. On a CPU the ranks share the cores, so 2 ranks measure the
engine's overhead, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed_worker.py"
RUN = dict(method="draft", K="full", num_inference_steps=4, learning_rate=1e-3, rank=4, num_sample_images=2)
ROWS = [  # name, processes, flags (global batch 2 in every row)
    ("plain torch", 1, dict(train_batch_size=2)),
    ("ZeRO-0", 1, dict(train_batch_size=2, zero=0)),
    ("ZeRO-2", 1, dict(train_batch_size=2, zero=2)),
    ("ZeRO-3", 1, dict(train_batch_size=2, zero=3)),
    ("ZeRO-2 + optimizer offload", 1, dict(train_batch_size=2, zero=2, offload="optimizer")),
    ("ZeRO-3 + param/optimizer offload", 1, dict(train_batch_size=2, zero=3, offload="param")),
    ("ZeRO-0, 2 ranks x 1", 2, dict(train_batch_size=1, zero=0)),
    ("ZeRO-2, 2 ranks x 1", 2, dict(train_batch_size=1, zero=2)),
    ("ZeRO-3, 2 ranks x 1", 2, dict(train_batch_size=1, zero=3)),
]


def run(n: int, flags: dict, steps: int, tmp: Path) -> list[float]:
    import socket

    out = tmp / f"run-{len(list(tmp.iterdir()))}"
    out.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = dict(config=dict(RUN, **flags), steps=steps, out=str(out), tmp=str(out))
    procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL,
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                       OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
             for r in range(n)]
    for p in procs:
        if p.wait(timeout=1800) != 0:
            raise RuntimeError(f"{flags} on {n} ranks failed")
    metrics = torch.load(out / "rank0.pt", weights_only=False)["metrics"]
    return [m["seconds"] for m in metrics[1:]]


PLAN_ROWS = [  # zero, offload, optimizer, GPUs
    (3, "param", "cpu-adam", 1), (3, "param", "cpu-adam", 8), (3, "none", "adamw", 8), (2, "optimizer", "cpu-adam", 8),
    (2, "none", "adamw", 8), (0, "none", "adamw", 1),
]


def plan_table() -> None:
    """DRaFT K=full, N=50, CFG 7.5, full fine-tuning, bf16, selective recompute, 80 GiB (3 held back)."""
    from refl_engine.memory.planner import Planner, PlanSpec

    print("| model | ZeRO | offload | optimizer | GPUs | per-GPU peak at batch 1 GiB | host per process GiB | largest batch per GPU |")
    print("|---|---|---|---|---|---|---|---|")
    for model in ("sd15", "sdxl"):
        for zero, offload, optimizer, gpus in PLAN_ROWS:
            spec = PlanSpec(model=model, method="draft", K="full", num_inference_steps=50, guidance_scale=7.5, rank=0,
                            mixed_precision="bf16", zero=zero, offload=offload, optimizer=optimizer, num_gpus=gpus,
                            recompute="selective", budget_gb=80, batch_size=1)
            planner = Planner(spec)
            peak = planner.peak(1, "selective")[0]
            print(f"| {model} | {zero} | {offload} | {optimizer} | {gpus} | {peak / 2**30:.1f} | "
                  f"{planner.host_bytes() / 2**30:.1f} | {planner.max_batch('selective')} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "distributed-tiny-sd-cpu.json"))
    ap.add_argument("--plan", action="store_true", help="print the planner's table instead of timing")
    args = ap.parse_args()
    if args.plan:
        return plan_table()
    os.environ.setdefault("REFL_ENGINE_CACHE", str(Path(tempfile.gettempdir()) / "refl-bench-cache"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, n, flags in ROWS:
            t0 = time.perf_counter()
            secs = run(n, flags, args.steps, Path(tmp))
            rows.append(dict(name=name, processes=n, flags=flags, median_s=statistics.median(secs),
                             min_s=min(secs), wall_s=time.perf_counter() - t0))
            print(f"{name:36s} {rows[-1]['median_s']:.3f} s/step", flush=True)
    base = rows[0]["median_s"]
    for r in rows:
        r["ratio"] = r["median_s"] / base
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result = dict(device=f"cpu ({platform.machine()}, {os.cpu_count()} cores)", torch=torch.__version__,
                  deepspeed=__import__("deepspeed").__version__, steps_counted=args.steps - 1,
                  load_average_at_end=load, rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print("\n| setting | processes | s/step (median) | ratio to plain |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['processes']} | {r['median_s']:.3f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()

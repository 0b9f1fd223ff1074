"""Seconds per training step by method on a model (default: the tiny preset), N steps.

Each configuration runs in this process after a warm-up step; the median and p20/p80 of the
timed steps are reported. A table on stdout, JSON with device and versions on disk.

    python benchmarks/step.py [--model tiny-sd|tiny-sdxl|DIR] [--num_inference_steps 20] [--guidance_scale 1]
                              [--steps 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = [("refl", "full"), ("draft", "1"), ("draft", "full"), ("draft-lv", "full"), ("alignprop", "full")]


def measure(model, method, K, n, steps, batch, recompute, threads, guidance_scale=1.0):
    from refl_engine.config import TrainConfig, set_field, validate
    from refl_engine.trainer import ReFLTrainer

    torch.set_num_threads(threads)
    cfg = TrainConfig()
    with tempfile.TemporaryDirectory() as out:
        for k, v in dict(model=model, method=method, K=K, num_inference_steps=n, train_batch_size=batch,
                         recompute=recompute, guidance_scale=guidance_scale, output_dir=out, progress=False).items():
            set_field(cfg, k, v)
        validate(cfg)
        trainer = ReFLTrainer(cfg).setup()
        for _ in range(2):  # warm-up: first calls initialise kernels and caches
            trainer.train_step()
        times, windows = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            m = trainer.train_step()
            times.append(time.perf_counter() - t0)
            windows.append(m["window_size"])
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return dict(method=method, K=K, steps=n, batch=batch, recompute=recompute, median_s=statistics.median(times),
                p20_s=q[0], p80_s=q[3], mean_window=sum(windows) / len(windows))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=1.0, help="> 1 runs CFG (doubles the UNet batch)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per case (after one warm-up)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--recompute", default="full")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="default: benchmarks/results/step-<model>.json")
    args = p.parse_args(argv)
    rows = []
    print(f"{'method':10} {'K':>5} {'N':>3} {'window':>6} {'median s/step':>14} {'p20':>7} {'p80':>7}")
    for method, K in CASES:
        r = measure(args.model, method, K, args.num_inference_steps, args.steps, args.batch, args.recompute,
                    args.threads, args.guidance_scale)
        rows.append(r)
        print(f"{method:10} {K:>5} {r['steps']:>3} {r['mean_window']:>6.1f} {r['median_s']:>14.3f} "
              f"{r['p20_s']:>7.3f} {r['p80_s']:>7.3f}", flush=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"
    import diffusers

    record = dict(device=device, torch=torch.__version__, diffusers=diffusers.__version__, python=sys.version.split()[0],
                  model=args.model, guidance_scale=args.guidance_scale, rows=rows)
    if args.json is None:
        where = "" if torch.cuda.is_available() else "-cpu"
        args.json = f"benchmarks/results/step-{Path(args.model).name}{where}.json"
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

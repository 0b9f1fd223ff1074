"""The planner's window beside the trainer's grad-carrying UNet calls, for every method over a grid of N.

Each row is one set of training flags on the tiny preset (`--model tiny-sd`). The same parsed
config goes to the planner (`refl-plan`'s mapping, `plan.plan_spec`) and to the trainer:

    planner   the window the plan composes: how many UNet calls it stacks kept activations for
              (`Planner.peak(...)`'s window plan, under the run's --recompute)
    trainer   UNet forwards run with grad enabled during one `micro_step`, counted on the UNet
              itself by a forward pre-hook (`measure.GradCallCounter`); `--recompute none`, so
              backward runs no forward again
    reported  the window size the trainer's step reports (`window_size` in metrics.jsonl): the
              rollout's window, without the pretrain loss's call beside it

AlignProp draws its window K from k_min..k_max each step; its row pins k_min = k_max = N, the
largest draw, which is the one the planner plans for. ReFL and ImageReFL stop at a drawn step;
their grad-carrying calls do not depend on which.

    python benchmarks/window_table.py                  # N = 4 8 20 50
    python benchmarks/window_table.py --n 4 8 --json   # the rows as JSON too
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

# (label, training flags); N is the grid's; {N} is replaced by it
METHODS = [
    ("draft K=1", ["--method", "draft", "--K", "1"]),
    ("draft K=2", ["--method", "draft", "--K", "2"]),
    ("draft K=full", ["--method", "draft", "--K", "full"]),
    ("draft-lv n=2", ["--method", "draft-lv", "--lv_inner", "2"]),
    ("alignprop K=N", ["--method", "alignprop", "--alignprop_k_min", "{N}", "--alignprop_k_max", "{N}"]),
    ("refl", ["--method", "refl"]),
    ("imagerefl", ["--method", "imagerefl"]),
    # the diffusion loss on real pairs: one more grad-carrying call beside the rollout's window
    ("draft K=1 + pretrain loss", ["--method", "draft", "--K", "1", "--pretrain_loss_coeff", "0.1"]),
]


def flags_for(method_flags: list[str], n: int, out: Path, data: Path) -> list[str]:
    flags = ["--model", "tiny-sd", "--num_inference_steps", str(n), "--train_batch_size", "1",
             "--guidance_scale", "1", "--recompute", "none", "--max_train_steps", "1", "--no_progress",
             "--output_dir", str(out), *(f.replace("{N}", str(n)) for f in method_flags)]
    if "imagerefl" in method_flags or "--pretrain_loss_coeff" in method_flags:
        flags += ["--train_data_dir", str(data)]
    return flags


def row(label: str, flags: list[str]) -> dict:
    from refl_engine.config import parse_args
    from refl_engine.memory.measure import GradCallCounter
    from refl_engine.memory.planner import Planner
    from refl_engine.plan import plan_spec
    from refl_engine.trainer import ReFLTrainer

    cfg = parse_args(flags)
    spec = plan_spec(cfg)
    _, window_plan, _ = Planner(spec).peak(cfg.optim.train_batch_size, cfg.memory.recompute)
    trainer = ReFLTrainer(cfg).setup()
    t0 = time.perf_counter()
    with GradCallCounter(trainer.unet) as counter:
        result = trainer.micro_step(trainer.sample_prompts_batch(cfg.optim.train_batch_size))
    return dict(method=label, N=cfg.method.num_inference_steps, planner=len(window_plan.kinds),
                trainer=counter.calls, reported=int(result["window_size"]),
                equal=len(window_plan.kinds) == counter.calls,
                seconds=round(time.perf_counter() - t0, 2), flags=" ".join(flags[flags.index("--method"):]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4, 8, 20, 50], help="numbers of DDIM steps N")
    ap.add_argument("--methods", nargs="+", default=None, help="labels of METHODS to run (default: all)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON after the table")
    args = ap.parse_args(argv)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    methods = [m for m in METHODS if args.methods is None or m[0] in args.methods]
    rows = []
    print("| method | N | planner window | trainer grad-carrying UNet calls | reported | planner = trainer |")
    print("|---|---:|---:|---:|---:|:---:|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        from refl_engine.toyworld.make_dataset import make_dataset

        data = Path(tmp) / "data"
        make_dataset(data, 4, seed=0)
        for n in args.n:
            for i, (label, method_flags) in enumerate(methods):
                r = row(label, flags_for(method_flags, n, Path(tmp) / f"run-{n}-{i}", data))
                rows.append(r)
                print(f"| {r['method']} | {n} | {r['planner']} | {r['trainer']} | {r['reported']} | "
                      f"{'yes' if r['equal'] else 'NO'} |", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""CPU time of one grad-carrying UNet call, forward and backward, under each memory policy's call
kind, as a ratio to the uncheckpointed call (`none`) beside the floor a checkpoint cannot go under.

A training step's time mixes the window's calls with the no-grad sampling, the decode, the reward
and the optimizer; this isolates the call. The call is the trainer's own (`make_eps_fn` over the
patched UNet, LoRA or full fine-tuning, the latent and timestep of its first window call), run as
`recompute.CALL_KINDS[kind]` and backpropagated from a scalar of its output, so every kind's
per-call machinery is measured: torch's GroupNorm/SiLU and lean.py's Functions, the checkpoint
Function of `full` / `selective`, the block checkpoints of `nested`. The kinds are timed in turns
(one call of each per round, process CPU time, one thread), the median per kind reported.

Floor: a checkpointed call runs its forward twice and its backward once, so it cannot take less
than `none` + one no-grad forward (`fwd`, timed the same way): the row `fwd` is that forward's
share of `none`, and floor = 1 + fwd / none for `full` and `selective` (`nested` re-runs every
block but the last once more; its floor is not printed). `lean` has `none`'s operator work.

    python benchmarks/call_overhead.py [--resolution 0 (the preset's)] [--rank 4 (0: full FT)]
        [--rounds 41] [--kinds none,lean,full,selective,nested] [--python_functions] [--json FILE]

lean.py's Functions run as the native library's C++ ops when it is built (csrc/lean.cpp);
`--python_functions` adds a row per lean-mode kind run with the Python Functions, in the same
rounds, for the difference the C++ ones make.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


LEAN_KINDS = ("lean", "selective", "nested")  # the kinds that run lean mode's Functions


def first_window_call(model: str, resolution: int, rank: int, guidance_scale: float, batch: int):
    """(trainer, fn, args) of the first grad-carrying UNet call a DRaFT K=1 step makes (the
    trainer as step.py builds it)."""
    from refl_engine.memory import recompute
    from step import make_trainer  # benchmarks/ is first on the path when this runs as a script

    seen = {}
    stock = recompute.MemoryPolicy.unet_call

    def grab(self, fn, *args):
        seen.setdefault("call", (fn, args))
        return stock(self, fn, *args)

    recompute.MemoryPolicy.unet_call = grab
    try:
        with tempfile.TemporaryDirectory(prefix="call_overhead-") as out:
            trainer = make_trainer(model, "draft", "1", 4, batch, "none", guidance_scale, out, rank, "torch",
                                   resolution)
            trainer.train_step()
    finally:
        recompute.MemoryPolicy.unet_call = stock
    fn, args = seen["call"]
    args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
    return trainer, fn, args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels (0: the preset's own)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--kinds", default="none,lean,full,selective,nested")
    p.add_argument("--python_functions", action="store_true",
                   help="also time each lean-mode kind with lean.py's Python Functions instead of the C++ ones "
                        "(rows '<kind>/py', in the same rounds)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="default: benchmarks/results/call_overhead-<model>-cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from refl_engine.memory import lean
    from refl_engine.memory.recompute import CALL_KINDS
    from step import functions_of  # benchmarks/ is first on the path when this runs as a script

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in CALL_KINDS]
    if unknown or "none" not in kinds:
        p.error(f"--kinds: {unknown or 'none is required'}; known: {', '.join(CALL_KINDS)}")
    _, fn, call_args = first_window_call(args.model, args.resolution, args.rank, args.guidance_scale, args.batch)

    def forward_only():
        with torch.no_grad():
            fn(*call_args)

    def one(kind):
        def run():
            out = CALL_KINDS[kind](fn, *call_args)
            out.float().square().mean().backward()
        return run

    def python_functions(kind):
        run = one(kind)

        def py():
            with functions_of(f"{kind}/py"):
                run()
        return py

    runs = {"fwd": forward_only, **{k: one(k) for k in kinds}}
    if args.python_functions:
        if not lean.native_functions():
            p.error("--python_functions: the native library's lean ops are not loaded (make install)")
        runs.update({f"{k}/py": python_functions(k) for k in kinds if k in LEAN_KINDS})
    for run in runs.values():  # warm-up: allocator, lazy patches, first-call paths
        run()
        run()
    times = {k: [] for k in runs}
    load_before = list(os.getloadavg())
    for _ in range(args.rounds):
        for k, run in runs.items():
            t0 = time.process_time()
            run()
            times[k].append(time.process_time() - t0)
    load_after = list(os.getloadavg())
    med = {k: statistics.median(v) for k, v in times.items()}
    none = med["none"]
    floor = 1 + med["fwd"] / none
    rows = []
    tuning = f"LoRA r={args.rank}" if args.rank else "full FT"
    print(f"{args.model}, resolution {args.resolution or 'preset'}, {tuning}, "
          f"batch {args.batch}, CFG {args.guidance_scale:g}, {args.rounds} rounds, {args.threads} thread(s)")
    print(f"lean.py's Functions: {'C++ (csrc/lean.cpp)' if lean.native_functions() else 'Python'}")
    print(f"{'kind':13s} {'ms/call':>9s} {'x none':>7s} {'floor':>6s}")
    for k in runs:
        ratio = med[k] / none
        base = k.split("/")[0]
        f = floor if base in ("full", "selective") else (1.0 if base in ("none", "lean") else None)
        rows.append(dict(kind=k, cpu_ms=med[k] * 1e3, ratio=ratio, floor=f, cpu_times=times[k]))
        print(f"{k:13s} {med[k] * 1e3:9.2f} {ratio:7.3f} {'' if f is None else f'{f:6.2f}'}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    result = dict(device=f"cpu ({platform.machine()}, {args.threads} threads)", torch=torch.__version__,
                  lean_functions="C++" if lean.native_functions() else "Python",
                  python=sys.version.split()[0], model=args.model, resolution=args.resolution, rank=args.rank,
                  guidance_scale=args.guidance_scale, batch=args.batch, rounds=args.rounds,
                  timing="process CPU time of one call's forward + backward, median over rounds",
                  load_before=load_before, load_after=load_after, rows=rows)
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"call_overhead-{args.model}-cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

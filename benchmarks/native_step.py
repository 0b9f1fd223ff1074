"""Seconds per training step of the demo (`--config demo`: DRaFT through all 20 steps) with and
without the native GroupNorm(+SiLU) op.

"on" runs `--kernels native` with the library loaded: every GroupNorm (fused with the SiLU after it
where there is one) runs the op, and so do the lean/selective recompute modes on CPU.
"off" runs `--kernels torch` with the library hidden (REFL_NATIVE_LIB pointing nowhere), so the
same code takes torch's GroupNorm and SiLU everywhere. Everything else is the demo's own config
(its --recompute default included; the JSON records which mode ran). Each run is its own process
(a loaded library cannot be unloaded); runs alternate off, on, off, on, ... so load from other
processes hits both alike. Per run: set-up, 2 warm-up steps, then --steps timed steps.

    python benchmarks/native_step.py [--rounds 2] [--steps 6] [--threads 2] [--clock wall|cpu] [--json FILE]
    python benchmarks/native_step.py --paired 30 --clock cpu [--json FILE]

Separate runs (--rounds) alternate off and on processes; on these machines a step's time drifts by
up to 50% over the minutes such a comparison takes. --paired builds both trainers in one process
and alternates their steps, and reports the per-pair ratio.

Each run also profiles one more step (torch.profiler) and reports the share of its operator CPU time
spent in GroupNorm and SiLU, forward and backward: the most the op could save.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the operators of GroupNorm and SiLU, forward and backward: torch's, and the native op's (refl::)
NORM_OPS = re.compile(r"^(aten::(native_group_norm|group_norm|silu)|refl::group_norm)")


def worker(steps: int, threads: int, clock: str, kernels: str) -> dict:
    import torch

    from refl_engine.config import flat_dict, parse_args, set_field
    from refl_engine.trainer import ReFLTrainer
    from refl_kernels import native

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = parse_args(["--config", "demo", "--output_dir", out, "--kernels", kernels])
        set_field(cfg, "progress", False)
        trainer = ReFLTrainer(cfg).setup()
        for _ in range(2):  # warm-up
            trainer.train_step()
        # wall time, or this process's CPU time (one thread: immune to other processes' load)
        now = time.process_time if clock == "cpu" else time.perf_counter
        times = []
        for _ in range(steps):
            t0 = now()
            trainer.train_step()
            times.append(now() - t0)
        # one more step under torch's profiler: the share of the step's operator CPU time spent in
        # GroupNorm and SiLU, forward and backward (torch's ops, or the native op), which bounds
        # what the op can save
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            trainer.train_step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        norm = sum(e.self_cpu_time_total for e in events if NORM_OPS.search(e.key))
    flat = flat_dict(cfg)
    return {"native_loaded": native.available("cpu"), "recompute": flat["recompute"], "kernels": flat["kernels"],
            "step_s": times, "groupnorm_silu_share": norm / total}


def paired(steps: int, clock: str) -> dict:
    """Both settings in one process: two trainers of the demo ("off": --kernels torch, "on":
    --kernels native), their steps alternating (the order flipped every step), so the machine's
    drift over minutes hits both alike. Returns each side's step times, the per-pair ratios
    off / on, and each side's GroupNorm+SiLU share of one profiled step."""
    import torch

    from refl_engine.config import parse_args, set_field
    from refl_engine.trainer import ReFLTrainer
    from refl_kernels import native

    if not native.available("cpu"):
        raise SystemExit("the native library is not built: run `make install`")
    torch.set_num_threads(1)
    now = time.process_time if clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as out_off, tempfile.TemporaryDirectory() as out_on:
        trainers = {}
        for mode, kernels, out in (("off", "torch", out_off), ("on", "native", out_on)):
            cfg = parse_args(["--config", "demo", "--output_dir", out, "--kernels", kernels])
            set_field(cfg, "progress", False)
            trainers[mode] = ReFLTrainer(cfg).setup()
        for t in trainers.values():  # warm-up
            t.train_step()
            t.train_step()
        times = {"off": [], "on": []}
        for i in range(steps):
            for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):
                t0 = now()
                trainers[mode].train_step()
                times[mode].append(now() - t0)
            print(f"pair {i + 1}: off {times['off'][-1]:.3f} s, on {times['on'][-1]:.3f} s", flush=True)
        shares = {}
        for mode, t in trainers.items():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                t.train_step()
            events = prof.key_averages()
            shares[mode] = sum(e.self_cpu_time_total for e in events if NORM_OPS.search(e.key)) / sum(
                e.self_cpu_time_total for e in events)
    ratios = [a / b for a, b in zip(times["off"], times["on"])]
    return {"off": times["off"], "on": times["on"], "ratios": ratios, "groupnorm_silu_share": shares}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="off/on pairs of runs")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "native-step-demo-cpu.json"))
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or the process's CPU time (needs --threads 1; robust to other load)")
    p.add_argument("--paired", type=int, default=0, metavar="N",
                   help="instead of separate runs: N pairs of steps in one process, the two settings alternating "
                        "(one thread; robust to drift over minutes)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernels", default="native", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT" + json.dumps(worker(args.steps, args.threads, args.clock, args.kernels)))
        return
    if args.clock == "cpu" and args.threads != 1 and not args.paired:
        raise SystemExit("error: --clock cpu measures CPU time of one thread; add --threads 1")
    if args.paired:
        import torch

        load_at_start = os.getloadavg()
        res = paired(args.paired, args.clock)
        r = sorted(res["ratios"])
        faster = sum(x > 1 for x in r)
        print(f"demo {args.clock} seconds per step, {args.paired} alternating pairs in one process, 1 thread: torch "
              f"GroupNorm {statistics.median(res['off']):.3f}, native {statistics.median(res['on']):.3f}; per pair "
              f"off / on: median {statistics.median(r):.3f}, quartiles {r[len(r) // 4]:.3f}-{r[(3 * len(r)) // 4]:.3f}, "
              f"native faster in {faster} of {len(r)}")
        for mode in ("off", "on"):
            print(f"  {mode}: GroupNorm+SiLU ops (forward and backward) {100 * res['groupnorm_silu_share'][mode]:.1f}% "
                  "of a profiled step's operator CPU time")
        record = {"device": f"cpu ({platform.processor() or platform.machine()}, 1 thread)", "torch": torch.__version__,
                  "config": "demo", "paired": args.paired, "clock": args.clock, **res,
                  "speedup_median_of_pairs": statistics.median(r), "native_faster_pairs": faster,
                  "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
        return

    runs, shares, settings = {"off": [], "on": []}, {"off": [], "on": []}, {}
    load_at_start = os.getloadavg()
    for r in range(args.rounds):
        for mode in ("off", "on"):
            env = dict(os.environ)
            if mode == "off":
                env["REFL_NATIVE_LIB"] = str(ROOT / "build" / "no-such-dir" / "librefl_native.so")
            proc = subprocess.run([sys.executable, __file__, "--worker", "--steps", str(args.steps),
                                   "--threads", str(args.threads), "--clock", args.clock,
                                   "--kernels", "native" if mode == "on" else "torch"],
                                  env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"worker ({mode}) failed:\n{proc.stderr[-3000:]}")
            res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))[len("RESULT"):])
            if res["native_loaded"] != (mode == "on"):
                raise SystemExit(f"run '{mode}': native library loaded = {res['native_loaded']}; build it with `make install`")
            runs[mode].append(res["step_s"])
            shares[mode].append(res["groupnorm_silu_share"])
            settings[mode] = {"recompute": res["recompute"], "kernels": res["kernels"]}
            print(f"round {r + 1} native {mode:3}: median {statistics.median(res['step_s']):.3f} s/step "
                  f"({', '.join(f'{t:.2f}' for t in res['step_s'])})", flush=True)
    summary = {}
    for mode, rs in runs.items():
        flat = [t for run in rs for t in run]
        summary[mode] = {"median_s": statistics.median(flat), "min_s": min(flat), "runs": rs,
                         "run_medians_s": [statistics.median(run) for run in rs],
                         "groupnorm_silu_share": statistics.median(shares[mode])}
    ratio = summary["off"]["median_s"] / summary["on"]["median_s"]
    print(f"demo {args.clock} seconds per step (median over {args.rounds} runs x {args.steps} steps, {args.threads} threads): "
          f"torch GroupNorm {summary['off']['median_s']:.3f}, native {summary['on']['median_s']:.3f} ({ratio:.2f}x; "
          f"--recompute {settings['on']['recompute']})")
    for mode in ("off", "on"):
        meds = summary[mode]["run_medians_s"]
        print(f"  {mode}: per-run medians {min(meds):.3f}-{max(meds):.3f} s; GroupNorm+SiLU ops (forward and backward) "
              f"{100 * summary[mode]['groupnorm_silu_share']:.1f}% of a profiled step's operator CPU time")
    import torch

    record = {"device": f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
              "torch": torch.__version__, "config": "demo", "rounds": args.rounds, "steps": args.steps, "clock": args.clock,
              "settings": settings, "off": summary["off"], "on": summary["on"], "speedup": ratio,
              "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

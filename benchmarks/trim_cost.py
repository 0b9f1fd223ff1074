"""What trimming glibc's heap at call boundaries costs a training step on the CPU.

`--recompute auto` on a CPU turns on `MemoryPolicy.trim_heap` (malloc_trim(0) at the boundaries of
every grad-carrying UNet call, the decode and the reward, forward and backward) for any plan but the
fast one, so that its resident memory follows the planned tensors. The pages a trim gives back fault
in again when the heap reuses them. Since its plan knows what each call may add, `auto` trims
lazily: once when the window opens (the step's RSS is measured from there) and then only at a
boundary where the RSS now plus what the next call may add would pass what the plan was made to
fit. This benchmark measures what the trims cost on one trainer in one process: after a warm-up
step it alternates steps in the given modes, in rounds (off, on, then on, off, ...), so the
machine's slow drift hits all alike, and reports per mode the median CPU time per step, the minor page faults per step
(getrusage) and the trims made. Modes: off (no trims: the RSS is not held to the budget), on (every
boundary trims), lazy (auto's default under a budget that trims). Peak RSS is not compared here (one
process holds one peak); `benchmarks/trl_compare.py` and `benchmarks/cpu_rss.py` measure it in
fresh processes.

    python benchmarks/trim_cost.py [--model tiny-sd] [--resolution 128] [--K 1] [--steps 8]
        [--recompute none] [--memory_budget SIZE] [--modes off,on] [--threads 1] [--json FILE]
    python benchmarks/trim_cost.py --recompute auto --memory_budget 596MiB --modes on,lazy,off --steps 9

Defaults are trl_compare.py's K = 1 setting (tiny-sd, 128 px, N = 20, batch 2, CFG 5, eta 1,
AlignProp with LoRA r4, the colorfulness reward), where `auto` given TRL's memory trims.
Benchmarks never assert.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--K", default="1", help="full or an integer: the AlignProp window")
    p.add_argument("--recompute", default="none", help="the policy whose steps are timed with and without trims")
    p.add_argument("--steps", type=int, default=8, help="timed steps, alternating the modes (a multiple of "
                   "their number)")
    p.add_argument("--memory_budget", default="", help="the trainer's --memory_budget (with --recompute auto: a "
                   "budget that makes it trim)")
    p.add_argument("--modes", default="off,on", help="comma-separated, alternated step by step: off (no trims), "
                   "on (every boundary trims), lazy (a boundary trims only when the RSS would pass the plan's "
                   "limit; needs --recompute auto under a --memory_budget that trims)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/trim_cost-tiny-sd-cpu.json")
    args = p.parse_args(argv)

    import tempfile

    import torch

    import trl_compare
    from refl_engine.memory import measure
    from refl_engine.models.load import resolve_model

    if not measure.has_glibc_malloc():
        sys.exit("trim_cost: this process's allocator is not glibc's; there is no heap to trim")
    torch.set_num_threads(args.threads)
    spec = dict(model=resolve_model(args.model), N=args.num_inference_steps, K=args.K, guidance_scale=5.0,
                eta=1.0, batch=2, resolution=args.resolution, kernels="torch", threads=args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"off", "on", "lazy"}:
        sys.exit(f"trim_cost: --modes takes off, on and lazy, not {args.modes!r}")
    trims = [0]
    trim = measure.trim_heap

    def counted_trim():
        trims[0] += 1
        return trim()

    measure.trim_heap = counted_trim  # the policy calls it through the module
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_compare.make_trainer(spec, out, args.recompute, args.memory_budget)
        torch.set_num_threads(args.threads)
        trainer.train_step()  # warm-up: first-touch faults, lazy initialisation (auto: its plan)
        policy = trainer.policy
        if "lazy" in modes and policy.rss_limit is None:
            sys.exit(f"trim_cost: --recompute {args.recompute} {args.memory_budget} did not plan a trimmed heap "
                     "with a limit, so `lazy` would be `on`; use --recompute auto with a --memory_budget that trims")
        n = len(modes)
        for i in range(n * -(-args.steps // n)):
            rnd = i // n  # the modes in order in even rounds, reversed in odd ones: a steady drift cancels
            mode = modes[i % n] if rnd % 2 == 0 else modes[n - 1 - i % n]
            policy.trim_heap, policy.lazy_trim = mode != "off", mode == "lazy"
            trims[0] = 0
            done = policy.trims[:]
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            c0 = time.process_time()
            trainer.train_step()
            cpu = time.process_time() - c0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rows.append(dict(mode=mode, round=rnd + 1, cpu_s=cpu, user_s=r1.ru_utime - r0.ru_utime,
                             sys_s=r1.ru_stime - r0.ru_stime,
                             minor_faults=r1.ru_minflt - r0.ru_minflt, trims=trims[0],
                             skipped=policy.trims[1] - done[1]))
            r = rows[-1]
            print(f"step {i + 1}: {mode:>4} {cpu:7.2f} s CPU (user {r['user_s']:.2f}, sys {r['sys_s']:.2f}), "
                  f"{r['minor_faults']:7d} minor faults, {r['trims']} trims, {r['skipped']} skipped", flush=True)
    measure.trim_heap = trim

    summary = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = dict(cpu_s=statistics.median(r["cpu_s"] for r in mine),
                             sys_s=statistics.median(r["sys_s"] for r in mine),
                             minor_faults=statistics.median(r["minor_faults"] for r in mine),
                             trims=statistics.median(r["trims"] for r in mine))
    # each mode's step over the first mode's step of the same round
    rounds = [{r["mode"]: r["cpu_s"] for r in rows[i:i + n]} for i in range(0, len(rows), n)]
    ratios = {m: [r[m] / r[modes[0]] for r in rounds] for m in modes[1:]}
    ref = summary[modes[0]]
    print(f"\n{args.model} {args.resolution} px, K = {args.K}, --recompute {args.recompute} {args.memory_budget}, "
          f"{args.threads} thread(s); per mode the median per step, and the step's CPU time over the "
          f"{modes[0]} step of its round:")
    for mode in modes:
        s, r = summary[mode], ratios.get(mode)
        vs = f"{statistics.median(r):.3f}x (per round {min(r):.3f}-{max(r):.3f})" if r else ""
        print(f"  {mode:>4}: {s['cpu_s']:6.2f} s CPU, sys {s['sys_s']:.2f} s, {s['minor_faults']:7.0f} minor faults "
              f"({(s['minor_faults'] - ref['minor_faults']) * 4 / 1024:+.0f} MiB of 4 KiB pages), "
              f"{s['trims']:.0f} trims  {vs}")
    record = dict(device=f"cpu ({platform.machine()}, {args.threads} thread(s))", torch=torch.__version__,
                  model=args.model, resolution=args.resolution, N=args.num_inference_steps, K=args.K,
                  recompute=args.recompute, memory_budget=args.memory_budget, modes=modes, load_before=load_before,
                  load_after=os.getloadavg(),
                  timing="process CPU time per step, steps alternating the modes after one warm-up step",
                  summary=summary, ratios=ratios, rows=rows)
    trl_compare.write_record(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

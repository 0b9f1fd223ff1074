"""What trimming glibc's heap at call boundaries costs a training step on the CPU.

`--recompute auto` on a CPU turns on `MemoryPolicy.trim_heap` (malloc_trim(0) before every
grad-carrying UNet call, the decode and the reward, and before each of their backwards) for any plan
but the fast one, so that its resident memory follows the planned tensors. The pages it gives back
fault in again when the heap reuses them. This benchmark measures that cost on one trainer in one
process: after a warm-up step it alternates steps with `trim_heap` off and on (off, on, off, on,
...), so the machine's slow drift hits both alike, and reports per mode the median CPU time per step
and the minor page faults per step (getrusage). Peak RSS is not compared here (one process holds
one peak); `benchmarks/trl_compare.py` and `benchmarks/cpu_rss.py` measure it in fresh processes.

    python benchmarks/trim_cost.py [--model tiny-sd] [--resolution 128] [--K 1] [--steps 8]
        [--recompute none] [--threads 1] [--json FILE]

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
    p.add_argument("--steps", type=int, default=8, help="timed steps, alternating off / on (even)")
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
    trims = [0]
    trim = measure.trim_heap

    def counted_trim():
        trims[0] += 1
        return trim()

    measure.trim_heap = counted_trim  # the policy calls it through the module
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        trainer = trl_compare.make_trainer(spec, out, args.recompute)
        torch.set_num_threads(args.threads)
        trainer.train_step()  # warm-up: first-touch faults, lazy initialisation
        for i in range(2 * ((args.steps + 1) // 2)):
            on = i % 2 == 1
            trainer.policy.trim_heap = on
            trims[0] = 0
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            c0 = time.process_time()
            trainer.train_step()
            cpu = time.process_time() - c0
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            rows.append(dict(trim=on, cpu_s=cpu, user_s=r1.ru_utime - r0.ru_utime, sys_s=r1.ru_stime - r0.ru_stime,
                             minor_faults=r1.ru_minflt - r0.ru_minflt, trims=trims[0]))
            r = rows[-1]
            print(f"step {i + 1}: trim {'on ' if on else 'off'} {cpu:7.2f} s CPU (user {r['user_s']:.2f}, sys "
                  f"{r['sys_s']:.2f}), {r['minor_faults']:7d} minor faults, {r['trims']} trims", flush=True)
    measure.trim_heap = trim

    summary = {}
    for on in (False, True):
        mine = [r for r in rows if r["trim"] == on]
        summary["on" if on else "off"] = dict(cpu_s=statistics.median(r["cpu_s"] for r in mine),
                                              sys_s=statistics.median(r["sys_s"] for r in mine),
                                              minor_faults=statistics.median(r["minor_faults"] for r in mine))
    pairs = [rows[i + 1]["cpu_s"] / rows[i]["cpu_s"] for i in range(0, len(rows) - 1, 2)]
    off, on = summary["off"], summary["on"]
    print(f"\n{args.model} {args.resolution} px, K = {args.K}, --recompute {args.recompute}, {args.threads} thread(s): "
          f"median CPU s/step off {off['cpu_s']:.2f}, on {on['cpu_s']:.2f} ({on['cpu_s'] / off['cpu_s']:.3f}x; "
          f"per pair {min(pairs):.3f}-{max(pairs):.3f}); minor faults/step off {off['minor_faults']:.0f}, on "
          f"{on['minor_faults']:.0f} (+{(on['minor_faults'] - off['minor_faults']) * 4 / 1024:.0f} MiB of 4 KiB pages)")
    record = dict(device=f"cpu ({platform.machine()}, {args.threads} thread(s))", torch=torch.__version__,
                  model=args.model, resolution=args.resolution, N=args.num_inference_steps, K=args.K,
                  recompute=args.recompute, load_before=load_before, load_after=os.getloadavg(),
                  timing="process CPU time per step, steps alternating trim off / on after one warm-up step",
                  summary=summary, pair_ratios=pairs, rows=rows)
    trl_compare.write_record(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())

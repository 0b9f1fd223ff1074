"""Seconds per training step by method and memory policy (default: the tiny preset, N = 20), each
policy's step time as a ratio to `none`'s beside its FLOP-derived floor.

For each method every policy gets its own trainer in this process; after two warm-up steps each
the policies' steps are timed in turns (one step of each per round, so a change in the machine's
load falls on all of them), `--steps` rounds. Time is the process's CPU time (`time.process_time`,
one torch thread by default: other jobs on a shared machine change it little) and wall time; the
ratio to `none` is the median over rounds of the per-round ratio.

The floor: FLOPs of one step under the policy over FLOPs of one step under `none`, both counted
by torch's FlopCounterMode (matmuls, convolutions, attention, forward and backward; the
elementwise work and the optimizer are not counted) on the same prompts and noise. A checkpointed
policy (`full`, `selective`) re-runs the forward of each of the W window calls once more, so its
floor is 1 + W f / F_none, f one UNet forward and F_none the whole `none` step: for the window
alone that is (f + b + f) / (f + b) with b the call's backward, 4/3 where the backward costs two
forwards (full fine-tuning) and more with LoRA, whose frozen weights get no weight gradient; the
no-grad steps, decode and reward dilute it for the whole step. `lean` and `none` count the same
FLOPs (lean recomputes elementwise work only): floor 1. The printed `unet fwd` is f / F_none.

    python benchmarks/step.py [--model tiny-sd|tiny-sdxl|DIR] [--num_inference_steps 20]
        [--guidance_scale 1] [--steps 5] [--policies none,lean,full,selective] [--threads 1] [--json FILE]
        [--rank 4 (0: full fine-tuning)] [--resolution PX] [--kernels torch|native]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = [("refl", "full"), ("draft", "1"), ("draft", "full"), ("draft-lv", "full"), ("alignprop", "full")]


def make_trainer(model, method, K, n, batch, recompute, guidance_scale, out, rank=4, kernels="torch", resolution=0):
    from refl_engine.config import TrainConfig, set_field, validate
    from refl_engine.trainer import ReFLTrainer

    cfg = TrainConfig()
    for k, v in dict(model=model, method=method, K=K, num_inference_steps=n, train_batch_size=batch,
                     recompute=recompute, guidance_scale=guidance_scale, output_dir=out, progress=False,
                     rank=rank, kernels=kernels, resolution=resolution).items():
        set_field(cfg, k, v)
    validate(cfg)
    return ReFLTrainer(cfg).setup()


def step_flops(trainer) -> tuple[int, int]:
    """(FLOPs of one training step, FLOPs of one guided UNet forward at the step's batch). Every
    policy's trainer has the same seed and has taken the same steps, so they draw the same windows."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    total = counter.get_total_flops()
    prompts = trainer.prompts[:trainer.cfg.optim.train_batch_size]
    eps_fn = trainer.sampling_chain(prompts).eps_fn
    x = trainer.initial_noise(len(prompts), torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        eps_fn(x, trainer.schedule.timesteps[0])
    return total, counter.get_total_flops()


def profile_step(trainer) -> dict:
    """One more step under torch's profiler: its self CPU time split into the operators' own work
    (aten::, refl::) and everything else (Python autograd Functions' bodies, the autograd engine,
    module code run by a checkpoint's recompute: per-call overhead), and the top entries. The
    profiler adds its own per-call cost, so these totals exceed the timed steps'."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    ops = sum(e.self_cpu_time_total for e in events if e.key.startswith(("aten::", "refl::"))) / 1e3
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return dict(self_ms=total, op_ms=ops, other_ms=total - ops,
                top=[(e.key, e.self_cpu_time_total / 1e3, e.count) for e in top])


def functions_of(policy: str):
    """The step's context: "<policy>/py" runs lean.py's Python Functions instead of its C++ ones."""
    from refl_engine.memory import lean

    return lean.use_native_functions(False) if policy.endswith("/py") else contextlib.nullcontext()


def measure_case(args, method, K, policies) -> dict:
    with tempfile.TemporaryDirectory() as out:
        trainers = {}
        for p in policies:
            t = make_trainer(args.model, method, K, args.num_inference_steps, args.batch, p.split("/")[0],
                             args.guidance_scale, os.path.join(out, p.replace("/", "-")), args.rank, args.kernels,
                             args.resolution)
            step = t.train_step

            def train_step(step=step, p=p):
                with functions_of(p):
                    return step()

            t.train_step = train_step
            trainers[p] = t
        for t in trainers.values():  # warm-up: first calls initialise kernels, caches, lazy installs
            for _ in range(2):
                t.train_step()
        flops = {p: step_flops(t) for p, t in trainers.items()}
        cpu = {p: [] for p in policies}
        wall = {p: [] for p in policies}
        windows = []
        for _ in range(args.steps):
            for p, t in trainers.items():
                w0, c0 = time.perf_counter(), time.process_time()
                m = t.train_step()
                cpu[p].append(time.process_time() - c0)
                wall[p].append(time.perf_counter() - w0)
                windows.append(m["window_size"])
        profiles = {p: profile_step(t) for p, t in trainers.items()} if args.profile else {}
    base = "none" if "none" in policies else policies[0]
    rows = {}
    for p in policies:
        rows[p] = dict(
            cpu_s=statistics.median(cpu[p]), wall_s=statistics.median(wall[p]),
            ratio=statistics.median(a / b for a, b in zip(cpu[p], cpu[base])),
            ratio_min=min(a / b for a, b in zip(cpu[p], cpu[base])),
            floor=flops[p][0] / flops[base][0], step_flops=flops[p][0], unet_forward_flops=flops[p][1],
            cpu_times=cpu[p], wall_times=wall[p], **({"profile": profiles[p]} if p in profiles else {}))
    return dict(method=method, K=K, steps=args.num_inference_steps, batch=args.batch, base=base,
                mean_window=sum(windows) / len(windows), unet_forward_share=flops[base][1] / flops[base][0],
                policies=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=1.0, help="> 1 runs CFG (doubles the UNet batch)")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step of each policy per round)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--policies", default="none,lean,full,selective",
                   help="comma-separated --recompute values; '<policy>/py' runs lean.py's Python Functions instead "
                        "of the C++ ones (csrc/lean.cpp), for an A/B in the same rounds")
    p.add_argument("--cases", default="", help="comma-separated method:K (default: all five)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank; 0 = full fine-tuning (floor nearer 4/3)")
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels (0: the model's own; larger is "
                   "more compute-bound, nearer a real model's balance of convolutions to per-call overhead)")
    p.add_argument("--kernels", default="torch", help="--kernels of every trainer (native: the C++ GroupNorm+SiLU)")
    p.add_argument("--json", default=None, help="default: benchmarks/results/step-<model>-cpu.json")
    p.add_argument("--profile", action="store_true",
                   help="profile one more step per policy: operator work vs per-call overhead, top entries")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    cases = [tuple(c.split(":")) for c in args.cases.split(",")] if args.cases else CASES
    load_before = os.getloadavg()
    rows = []
    head = "".join(f" {q + ' x (floor)':>20}" for q in policies[1:])
    print(f"{'method':10} {'K':>5} {'window':>6} {'unet fwd':>8} {policies[0] + ' cpu s':>12}{head}")
    for method, K in cases:
        r = measure_case(args, method, K, policies)
        rows.append(r)
        pr = r["policies"]
        cols = "".join(f" {pr[q]['ratio']:>11.2f} ({pr[q]['floor']:.2f})" for q in policies[1:])
        print(f"{method:10} {K:>5} {r['mean_window']:>6.1f} {r['unet_forward_share']:>8.3f} "
              f"{pr[policies[0]]['cpu_s']:>12.3f}{cols}", flush=True)
        for q in policies if args.profile else ():
            prof = pr[q]["profile"]
            print(f"    profiled {q:9}: self CPU {prof['self_ms']:8.1f} ms = operators {prof['op_ms']:8.1f} + outside "
                  f"them {prof['other_ms']:8.1f}; top: " + ", ".join(f"{k} {ms:.0f} ms/{n}" for k, ms, n in prof["top"][:4]))
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else \
        f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)"
    import diffusers

    record = dict(device=device, torch=torch.__version__, diffusers=diffusers.__version__,
                  python=sys.version.split()[0], model=args.model, guidance_scale=args.guidance_scale,
                  rank=args.rank, kernels=args.kernels, resolution=args.resolution, threads=args.threads,
                  timing="process CPU time", load_before=load_before, load_after=load_after, rows=rows)
    if args.json is None:
        where = "" if torch.cuda.is_available() else "-cpu"
        args.json = f"benchmarks/results/step-{Path(args.model).name}{where}.json"
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Resident memory (RSS) of one training step on a CPU against the tensor bytes `--recompute auto`
planned, with auto's CPU budget taken as RSS (the default: the heap trimmed at call boundaries),
as RSS with glibc's mmap threshold fixed, and as tensor bytes (as at first).

    python benchmarks/cpu_rss.py [--budget_mib 1000] [--resolution 64] [--K full] [--json FILE]

Rows, each a fresh process (the C allocator's state is per process): `none` (what keeping
everything costs); `auto` with `--memory_budget` counted in tensor bytes (AutoRecompute's
host_rss off: glibc's default allocator untouched); `auto` with MALLOC_MMAP_THRESHOLD_=131072 in
the environment (every block of 128 KiB or more mapped on allocation and unmapped when freed;
planned at MMAP_RSS_FACTOR); and `auto` as the trainer runs it on a CPU (host_rss: the fast plan
under the default allocator when it fits at HEAP_RSS_FACTOR its tensors, any other plan with the
heap trimmed, planned at TRIM_RSS_FACTOR, the running call's peaks at the RSS factor its profile
measured), the heap trimmed lazily (once as the window opens, then at a call boundary only when the
RSS plus what the next call may add would pass the plan's limit) and, in the row before, at every
call boundary (`lazy_trim` off, as before lazy trimming). Each row: tiny-sd, DRaFT K=full (or
`--K 1`), N = 20, batch 2, CFG 5, LoRA r=4, one thread; two steps, each measured: the RSS growth
over the RSS before it (VmHWM after the peak counter is reset) and the file-backed pages it mapped
in (RssFile: torch's code the first backward runs), the planned peak and the step's CPU time. The
first step is the warm-up (auto profiles in it); the table shows the second, the JSON both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = [("none", "none", ""), ("auto, budget in tensor bytes", "auto", "tensor"),
        ("auto, RSS, mmap threshold fixed", "auto", "mmap"), ("auto, RSS, trim at every boundary", "auto", "eager"),
        ("auto (CPU default: RSS, lazy trim)", "auto", "rss")]

WORKER = r"""
import ctypes, gc, json, sys, tempfile, time
import torch
from refl_engine.config import TrainConfig, set_field, validate
from refl_engine.memory import measure
import refl_engine.memory.recompute as recompute
from refl_engine.trainer import ReFLTrainer

recompute_, budget, mode, res, K = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
if mode == "tensor":
    init = recompute.AutoRecompute.__init__
    def tensor_budget(self, *a, **k):
        k["host_rss"] = False
        init(self, *a, **k)
    recompute.AutoRecompute.__init__ = tensor_budget
with tempfile.TemporaryDirectory() as out:
    cfg = TrainConfig()
    for name, v in dict(model="tiny-sd", method="draft", K=K, num_inference_steps=20, guidance_scale=5.0,
                        train_batch_size=2, resolution=res, rank=4, reward="colorfulness", recompute=recompute_,
                        memory_budget=budget if recompute_ == "auto" else "", seed=0, output_dir=out,
                        progress=False).items():
        set_field(cfg, name, v)
    validate(cfg)
    trainer = ReFLTrainer(cfg).setup()
    trainer.policy.lazy_trim = mode != "eager"
    steps = []
    for _ in range(2):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before, file = measure.status_kib("VmRSS"), measure.status_kib("RssFile")
        measure.reset_peak_rss()
        trims = trainer.policy.trims[:]
        t0 = time.process_time()
        trainer.train_step()
        cpu = time.process_time() - t0
        steps.append(dict(rss_growth_mib=(measure.status_kib("VmHWM") - before) / 1024,
                          file_mib=(measure.status_kib("RssFile") - file) / 1024, cpu_s=cpu,
                          trims=[a - b for a, b in zip(trainer.policy.trims, trims)]))
    p = trainer.policy
    plan = getattr(p, "last_plan", None)
    print("RESULT " + json.dumps(dict(steps[1], first_step=steps[0], planned_mib=plan.peak / 2**20 if plan else None,
                                      plan=plan.counts if plan else None, allocator=getattr(p, "allocator", None),
                                      mmap_threshold=measure.malloc_mmap_threshold())))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget_mib", type=int, default=1000)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--K", default="full", help="DRaFT's window: full, or a number of final steps")
    ap.add_argument("--json", help="default benchmarks/results/cpu_rss-tiny-sd.json (-<R>px added unless 64 px, "
                                   "-k<K> unless K=full)")
    a = ap.parse_args(argv)
    a.json = a.json or str(ROOT / "benchmarks" / "results" / (
        f"cpu_rss-tiny-sd{'' if a.resolution == 64 else f'-{a.resolution}px'}{'' if a.K == 'full' else '-k' + a.K}.json"))
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    env["OMP_NUM_THREADS"] = "1"
    rows = []
    print(f"budget {a.budget_mib} MiB, tiny-sd at {a.resolution} px, DRaFT K={a.K}, N=20, batch 2; the second step "
          "(first step's growth, of it file-backed)")
    print(f"{'row':35s} {'RSS growth MiB':>15s} {'planned MiB':>12s} {'/ budget':>9s} {'CPU s':>7s} "
          f"{'first step MiB':>16s}  plan")
    for name, policy, mode in ROWS:
        row_env = dict(env, MALLOC_MMAP_THRESHOLD_=str(128 << 10)) if mode == "mmap" else env
        out = subprocess.run([sys.executable, "-c", WORKER, policy, str(a.budget_mib * 2**20), mode,
                              str(a.resolution), a.K], capture_output=True, text=True, env=row_env)
        if out.returncode != 0:
            raise SystemExit(f"{name}: the step failed:\n{out.stderr[-3000:]}")
        r = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
        r["row"] = name
        rows.append(r)
        planned = f"{r['planned_mib']:.0f}" if r["planned_mib"] is not None else "-"
        first = f"{r['first_step']['rss_growth_mib']:.0f} ({r['first_step']['file_mib']:.0f})"
        print(f"{name:35s} {r['rss_growth_mib']:15.0f} {planned:>12s} {r['rss_growth_mib'] / a.budget_mib:9.2f} "
              f"{r['cpu_s']:7.2f} {first:>16s}  {r['plan'] or ''} {r['allocator'] or ''}"
              + (f", {r['trims'][0]} of {sum(r['trims'])} boundaries trimmed" if sum(r["trims"]) else ""), flush=True)
    record = dict(device=f"cpu ({platform.machine()}), 1 thread", budget_mib=a.budget_mib, resolution=a.resolution, K=a.K,
                  load_average=os.getloadavg(), rows=rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(record, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Measured peak bytes and step time of one training step per (method, K, recompute policy), next
to the planner's prediction.

Each row runs in a fresh subprocess: build `ReFLTrainer(config)`, run one warm-up step (so the
optimizer state exists, as in every later step), one untimed-overhead step for `step_seconds`,
then one step under `measure.LiveBytesTracker` for `peak_bytes` (exact live tensor bytes on CPU;
`torch.cuda.max_memory_allocated` on GPU). `predicted_bytes` is `refl_engine.memory.planner` for
the same configuration, traced from the architecture configs without weights. AlignProp's window
is random; its row is predicted for the window the measured step actually drew.

    python benchmarks/memory.py                      # tiny-sd @ 64 px, N = 50
    python benchmarks/memory.py --json benchmarks/memory.json
    python benchmarks/memory.py --chunked --steps 4 --guidance_scale 3 --no-timing \
        --json benchmarks/results/memory-chunked-tiny-sd.json
    python benchmarks/memory.py --model /path/to/diffusers/dir --resolution 512 --steps 50

On the tiny preset at 64 px the UNet's activations are several times its weights, so the
ratios below measure the memory policies rather than the fixed bytes. Benchmarks never assert.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROWS = [
    # (method, K, recompute)
    ("draft", "1", "none"), ("draft", "1", "lean"), ("draft", "1", "full"), ("draft", "1", "selective"),
    ("draft", "1", "nested"),
    ("draft", "full", "none"), ("draft", "full", "lean"), ("draft", "full", "full"), ("draft", "full", "selective"),
    ("draft", "full", "nested"),
    ("draft", "full", "auto"),
    ("refl", "-", "none"), ("refl", "-", "selective"),
    ("alignprop", "-", "full"), ("alignprop", "-", "selective"),
]
POLICIES = ("none", "lean", "full", "selective", "nested")
# --chunked: batch-chunked (`policy@chunk`, --recompute_chunk) and block-nested recomputation at
# batch 1, 4 and 8, beside the unchunked checkpoint at the same batch: (method, K, recompute[@chunk], batch)
CHUNKED_ROWS = [("draft", "full", pol, str(b)) for b in (1, 4, 8)
                for pol in ("full", "full@1", "selective@1", "nested", "nested@1")]


def _policy(recompute: str) -> tuple[str, int]:
    """'selective@2' -> ('selective', 2): the policy and its --recompute_chunk."""
    name, _, chunk = recompute.partition("@")
    return name, int(chunk or 0)


def _config(args, method, K, recompute, out_dir, budget=None):
    from refl_engine.config import TrainConfig, set_field, validate

    cfg = TrainConfig()
    recompute, chunk = _policy(recompute)
    fields = dict(model=args.model, resolution=args.resolution, method=method, num_inference_steps=args.steps,
                  guidance_scale=args.guidance_scale, train_batch_size=args.batch_size, rank=args.rank,
                  mixed_precision="no", recompute=recompute, recompute_chunk=chunk, seed=args.seed, max_train_steps=10,
                  output_dir=out_dir, progress=False, reward=args.reward, num_sample_images=1)
    if method == "draft":
        fields["K"] = K
    if budget is not None:
        fields["memory_budget"] = str(int(budget))
    for k, v in fields.items():
        set_field(cfg, k, v)
    validate(cfg)
    return cfg


def _planner(args, method, K, recompute, window_size=None, budget=None):
    from refl_engine.memory.planner import Planner, PlanSpec

    if method == "alignprop" and window_size is not None:
        method, K = "draft", str(window_size)  # the window the measured step drew
    recompute, chunk = _policy(recompute)
    spec = PlanSpec(recompute_chunk=chunk, model=args.model, resolution=args.resolution, batch_size=args.batch_size, method=method,
                    K=K if method == "draft" else "full", num_inference_steps=args.steps,
                    guidance_scale=args.guidance_scale, rank=args.rank, mixed_precision="no", optimizer="adamw",
                    recompute=recompute, reward=args.reward,
                    budget_gb=(budget / 2**30) if budget is not None else None, reserve_gb=0.0)
    return Planner(spec)


def auto_budget(args) -> int:
    """A budget halfway between the planner's `full` and `none` peaks for draft K=full."""
    full = _planner(args, "draft", "full", "full").peak(args.batch_size, "full")[0]
    none = _planner(args, "draft", "full", "none").peak(args.batch_size, "none")[0]
    return int(full + 0.5 * (none - full))


def worker(args) -> dict:
    import torch

    from refl_engine.memory import measure
    from refl_engine.memory.recompute import AutoRecompute
    from refl_engine.trainer import ReFLTrainer

    torch.set_num_threads(args.threads)
    method, K, recompute, *batch = args.row.split(",")
    if batch:
        args.batch_size = int(batch[0])
    budget = auto_budget(args) if recompute == "auto" else None
    with tempfile.TemporaryDirectory() as out:
        trainer = ReFLTrainer(_config(args, method, K, recompute, out, budget)).setup()
        if recompute == "auto":
            # The planner's decode + reward estimate as the policy's reserve (see the report to the
            # trainer: ReFLTrainer should pass it the same way).
            reserve = _planner(args, method, K, "auto", budget=budget).after_window_bytes(args.batch_size)
            trainer.policy = AutoRecompute(budget_bytes=budget, reserve_bytes=reserve,
                                           checkpoint_decode=trainer.policy.checkpoint_decode,
                                           checkpoint_reward=trainer.policy.checkpoint_reward,
                                           lean_decode=trainer.policy.lean_decode)
        trainer.train_step()  # warm-up: optimizer state now exists, as in every later step
        t0 = time.perf_counter()
        timed = trainer.train_step()
        step_seconds = time.perf_counter() - t0
        device = trainer.device
        metrics, peak = measure.measure_peak(trainer.train_step, device)
        window = metrics["window_size"]
        state = measure.state_breakdown([trainer.unet, trainer.components.vae, trainer.components.text_encoder,
                                         trainer.reward], trainer.optimizer)
    predicted = _planner(args, method, K, recompute, window_size=window, budget=budget)
    pplan = predicted.plan()
    rec = dict(method=method, K=K if method == "draft" else ("sampled" if method == "alignprop" else "1"),
               steps=args.steps, recompute=recompute, window_size=window, timed_window_size=timed["window_size"],
               peak_bytes=int(peak.peak_bytes), predicted_bytes=int(pplan.peak_bytes),
               planner_error=(pplan.peak_bytes - peak.peak_bytes) / peak.peak_bytes,
               step_seconds=step_seconds, baseline_bytes=int(peak.baseline_bytes),
               peak_by_component=peak.by_component, state_bytes=state,
               predicted_components={k: v for k, v in pplan.components.items() if isinstance(v, int)},
               predicted_phase=pplan.window["phase"], budget_bytes=budget,
               auto_plan=getattr(trainer.policy, "last_plan", None) and trainer.policy.last_plan.counts,
               measured_with=peak.method, resolution=args.resolution, batch_size=args.batch_size,
               guidance_scale=args.guidance_scale, model=args.model, rank=args.rank,
               recompute_chunk=_policy(recompute)[1], planned_chunk=pplan.window.get("recompute_chunk", 0))
    return rec


def timing_worker(args) -> dict:
    """Step seconds of each fixed policy in ONE process, interleaved, median of `reps`: on a
    shared machine, separate processes at different times see different load; interleaving in one
    process cancels most of it."""
    import statistics

    import torch

    from refl_engine.memory.recompute import build_policy
    from refl_engine.trainer import ReFLTrainer

    torch.set_num_threads(args.threads)
    method, K = args.timing.split(",")
    policies = POLICIES
    times = {p: [] for p in policies}
    with tempfile.TemporaryDirectory() as out:
        trainer = ReFLTrainer(_config(args, method, K, "none", out)).setup()
        trainer.train_step()
        for rep in range(args.reps):
            order = policies[rep % len(policies):] + policies[: rep % len(policies)]
            for pol in order:
                trainer.policy = build_policy(pol)
                t0 = time.perf_counter()
                trainer.train_step()
                times[pol].append(time.perf_counter() - t0)
    med = {p: statistics.median(v) for p, v in times.items()}
    return dict(method=method, K=K, steps=args.steps, reps=args.reps, seconds=times, median_seconds=med)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=50, help="N, the number of inference steps")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=2)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--reward", default="colorfulness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--chunked", action="store_true", help="the batch-chunked and block-nested rows (draft K=full at "
                   "batch 1, 4, 8) instead of the default rows")
    p.add_argument("--rows", default="", help="only these rows: 'draft,full,selective;refl,-,none' ('skip': none)")
    p.add_argument("--json", default="", help="write the records to this file")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--timing", help=argparse.SUPPRESS)
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions for the step-time comparison")
    p.add_argument("--no-timing", dest="do_timing", action="store_false", help="skip the interleaved step-time runs")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--from-json", dest="from_json", default="", help="print the report of a saved --json file")
    args = p.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(render(saved["records"], saved["timing"]))
        return 0

    if args.row:  # inside the subprocess
        print("RESULT " + json.dumps(worker(args)))
        return 0
    if args.timing:
        print("RESULT " + json.dumps(timing_worker(args)))
        return 0

    rows = [tuple(r.split(",")) for r in args.rows.split(";")] if args.rows else (CHUNKED_ROWS if args.chunked else ROWS)
    if args.rows == "skip":
        rows = []
    records = []
    passthrough = [f"--model={args.model}", f"--resolution={args.resolution}", f"--steps={args.steps}",
                   f"--batch-size={args.batch_size}", f"--guidance_scale={args.guidance_scale}",
                   f"--rank={args.rank}", f"--reward={args.reward}", f"--seed={args.seed}",
                   f"--threads={args.threads}"]
    for row in rows:
        cmd = [sys.executable, os.path.abspath(__file__), *passthrough, "--row", ",".join(row)]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(f"{','.join(row)}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rec = json.loads(line[len("RESULT "):])
        rec["wall_seconds"] = time.time() - t0
        records.append(rec)
        print(f"  done {','.join(row)} in {rec['wall_seconds']:.0f}s", file=sys.stderr)

    timings = []
    if args.do_timing:
        for mk in ("draft,1", "draft,full"):
            cmd = [sys.executable, os.path.abspath(__file__), *passthrough, f"--reps={args.reps}", "--timing", mk]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"timing {mk}: failed ({proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            timings.append(json.loads(line[len("RESULT "):]))
            print(f"  done timing {mk}", file=sys.stderr)

    print(render(records, timings))
    if args.json:
        import torch

        meta = dict(device="cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                    torch=torch.__version__, python=platform.python_version(), argv=sys.argv[1:])
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "records": records, "timing": timings}, f, indent=2)
    return 0


def render(records, timings=()) -> str:
    MiB = 2**20
    lines = [f"{'method':10s} {'K':>7s} {'W':>3s} {'B':>3s} {'recompute':12s} {'peak MiB':>9s} {'pred MiB':>9s} "
             f"{'err':>7s} {'step s':>7s}"]
    for r in records:
        lines.append(f"{r['method']:10s} {r['K']:>7s} {r['window_size']:>3d} {r['batch_size']:>3d} {r['recompute']:12s} "
                     f"{r['peak_bytes'] / MiB:9.2f} {r['predicted_bytes'] / MiB:9.2f} {100 * r['planner_error']:+6.1f}% "
                     f"{r['step_seconds']:7.2f}")
    by = {(r["method"], r["K"], r["recompute"]): r for r in records}
    by_batch = {(r["method"], r["K"], r["recompute"], r["batch_size"]): r for r in records}
    lines.append("")
    for pol in POLICIES:
        a, b = by.get(("draft", "full", pol)), by.get(("draft", "1", pol))
        if a and b:
            lines.append(f"flat in K ({pol:9s}): peak(K=full) / peak(K=1) = {a['peak_bytes'] / b['peak_bytes']:.3f}")
    for K in ("1", "full"):
        row = {p: by.get(("draft", K, p)) for p in POLICIES}
        if row["selective"] and row["full"]:
            lines.append(f"draft K={K:4s}: selective / full peak = "
                         f"{row['selective']['peak_bytes'] / row['full']['peak_bytes']:.3f}"
                         + (f"; lean / none peak = {row['lean']['peak_bytes'] / row['none']['peak_bytes']:.3f}"
                            if row["lean"] and row["none"] else ""))
    for t in timings:
        med = t["median_seconds"]
        low = {p: min(v) for p, v in t["seconds"].items()}
        lines.append(f"step time, {t['method']} K={t['K']} (one process, interleaved, {t['reps']} runs each): "
                     + ", ".join(f"{p} median {med[p]:.2f}s ({med[p] / med['none']:.3f}x none), "
                                 f"min {low[p]:.2f}s ({low[p] / low['none']:.3f}x)" for p in med))
    chunked = [r for r in records if r.get("recompute_chunk")]
    for r in chunked:  # the chunked row's peak beside the unchunked one at the same batch, and at batch 1
        whole = by_batch.get((r["method"], r["K"], r["recompute"].split("@")[0], r["batch_size"]))
        one = by_batch.get((r["method"], r["K"], r["recompute"], 1))
        if whole and one:
            lines.append(f"{r['recompute']:12s} batch {r['batch_size']}: peak {r['peak_bytes'] / whole['peak_bytes']:.3f}x "
                         f"the unchunked one, {r['peak_bytes'] / one['peak_bytes']:.3f}x batch 1's")
    for r in records:  # block-nested beside the plain checkpoint at the same batch and chunk
        name, chunk = _policy(r["recompute"])
        full = by_batch.get((r["method"], r["K"], "full" + (f"@{chunk}" if chunk else ""), r["batch_size"]))
        if name == "nested" and full:
            lines.append(f"{r['recompute']:12s} batch {r['batch_size']}: peak {r['peak_bytes'] / full['peak_bytes']:.3f}x "
                         f"{full['recompute']}'s, step time {r['step_seconds'] / full['step_seconds']:.2f}x")
    if records:
        worst = max(records, key=lambda r: abs(r["planner_error"]))
        lines.append(f"planner: worst error {100 * worst['planner_error']:+.1f}% "
                     f"({worst['method']} K={worst['K']} {worst['recompute']})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

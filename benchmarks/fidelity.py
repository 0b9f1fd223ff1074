"""Quality against diversity on the toy world, where the reward's truth is known: ReFL, DRaFT K=1,
DRaFT K=full, DRaFT-LV, AlignProp and ImageReFL fine-tuned from the embedded default on the learned
`toyworld_proxy` reward, each evaluated alone and with combined generation over a hand-over sweep.

Every method trains the same LoRA (rank 4) from the same base for the same optimizer steps, batch
and N DDIM steps (one budget in steps; the CPU seconds each took are reported), through the
trainer's own API (`ReFLTrainer.setup`, `train_step`). Evaluation reuses refl-generate and
refl-evaluate: `generate.combined_generate` (the first h of N steps by the base model with its
guidance, the rest by the fine-tuned one without) and `evaluate.evaluate_images` on P held-out
prompts x M images, every image its own fixed seed, identical for every method:

    proxy    toyworld_proxy, the trained reward (mean over images)
    gold     toyworld_gold, the known preference the proxy was fit to, read by the classifier
    align    caption accuracy: the classifier's shape, color and (when named) cell agree with the
             prompt, averaged over the three (what CLIP score measures in the paper)
    DinoDiv  mean pairwise cosine distance of one prompt's image embeddings (the toy world's
             contrastive encoder, `--eval_embedding toyworld`), averaged over prompts
    FD, CovDist, LogCovDist   Frechet, covariance and log-covariance distances of the generated
             set's embeddings to real world images

Each cell is the mean over --seeds training seeds +- their standard deviation. Also measured:
proxy and gold on fixed prompts during training (over-optimization shows as proxy up, gold flat
or down), and the gradient variance of DRaFT-LV against DRaFT K=1 at the base model: the
relative variance E|g - E g|^2 / |E g|^2 of the LoRA gradient over independent draws, and that
times the seconds per estimate (the variance of an average of estimates at an equal CPU budget).

    .venv/bin/python benchmarks/fidelity.py [--quick] [--json FILE] [--plot FILE]

--quick runs one step of each method with tiny sizes (the test's smoke run). The default budget
(60 steps, N = 8, 12 prompts x 6 images, 3 seeds) takes about 23 minutes of one core on the
3-level embedded model (1381 s with the current weights; 1450 s with the previous ones);
at 20 steps an earlier caption-following embedded model had barely moved from its base (proxy
-0.6 -> 2.5-3.7, diversity unchanged).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

METHODS = {
    "ReFL": ["--method", "refl"],
    "DRaFT K=1": ["--method", "draft", "--K", "1"],
    "DRaFT K=full": ["--method", "draft", "--K", "full"],
    "DRaFT-LV": ["--method", "draft-lv"],
    "AlignProp": ["--method", "alignprop"],
    "ImageReFL": ["--method", "imagerefl"],
}
METRICS = [  # (key, column, higher is better)
    ("proxy", "proxy", True), ("gold", "gold", True), ("align", "align", True), ("dino_diversity", "DinoDiv", True),
    ("frechet_distance", "FD", False), ("covariance_distance", "CovDist", False),
    ("log_covariance_distance", "LogCovDist", False),
]
PROXY, GOLD = "toyworld_proxy", "toyworld_gold"


def budget(args) -> dict:
    """The run's sizes: --quick's tiny ones, else the defaults (each flag overrides)."""
    quick = dict(steps=1, num_inference_steps=4, batch=1, num_prompts=2, images_per_prompt=2, reference=32,
                 seeds="0,1", handovers="0,2", curve_every=1, curve_prompts=2, grad_draws=3, train_prompts=16,
                 dataset=8)
    full = dict(steps=60, num_inference_steps=8, batch=2, num_prompts=12, images_per_prompt=6, reference=256,
                seeds="0,1,2", handovers="0,4,6", curve_every=5, curve_prompts=6, grad_draws=12, train_prompts=256,
                dataset=128)
    sizes = quick if args.quick else full
    return {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in sizes.items()}


# ---------------------------------------------------------------- inputs shared by every run

def make_inputs(work: Path, b: dict) -> dict:
    """Training prompts, ImageReFL's image folder, held-out prompts and the reference set, all
    rendered from the world with seeds none of the shipped models was trained on."""
    from refl_engine.evaluate import build_embedder, embed_all
    from refl_engine.toyworld import world
    from refl_engine.toyworld.make_dataset import make_dataset

    _, train_captions, _ = world.generate(b["train_prompts"], seed=50_000_000)
    prompts_file = work / "train_prompts.txt"
    prompts_file.write_text("\n".join(train_captions) + "\n")
    data_dir = make_dataset(work / "data", b["dataset"], seed=50_100_000)
    _, heldout, _ = world.generate(b["num_prompts"], seed=50_200_000)
    _, curve_prompts, _ = world.generate(b["curve_prompts"], seed=50_300_000)
    reference, _, _ = world.generate(b["reference"], seed=50_400_000)
    embedder = build_embedder("toyworld")
    M = b["images_per_prompt"]
    return dict(prompts_file=str(prompts_file), data_dir=str(data_dir), embedder=embedder,
                reference=embed_all(embedder, reference),
                eval_prompts=[p for p in heldout for _ in range(M)],
                eval_seeds=[7_000 + i for i in range(len(heldout) * M)],
                curve_prompts=curve_prompts)


def train_flags(b: dict, inputs: dict, seed: int, out: Path, lr: float) -> list[str]:
    return ["--reward", PROXY, "--prompts", inputs["prompts_file"], "--train_data_dir", inputs["data_dir"],
            "--num_inference_steps", str(b["num_inference_steps"]), "--train_batch_size", str(b["batch"]),
            "--max_train_steps", str(b["steps"]), "--learning_rate", str(lr), "--rank", "4",
            "--seed", str(seed), "--output_dir", str(out), "--progress", "false", "--recompute", "none"]


# ---------------------------------------------------------------- metrics

def caption_alignment(classifier, images: torch.Tensor, prompts: list[str]) -> dict:
    """How often the classifier reads what the prompt asks: shape, color, and the cell when named."""
    from refl_engine.toyworld.classifier import caption_labels

    with torch.no_grad():
        p = classifier.probs(images)
    asked = caption_labels(prompts)
    out = {}
    for head in ("shape", "color", "cell"):
        target = torch.as_tensor(asked[head])
        keep = target >= 0
        if keep.any():
            out[head] = float((p[head].argmax(-1) == target)[keep].float().mean())
    out["mean"] = sum(out.values()) / len(out)
    return out


def evaluate_at(model, ctx: dict, b: dict, handover: int, base_guidance: float) -> dict:
    from refl_engine.evaluate import evaluate_images
    from refl_engine.generate import combined_generate

    prompts, seeds = ctx["inputs"]["eval_prompts"], ctx["inputs"]["eval_seeds"]
    n = b["num_inference_steps"]
    images = torch.cat([combined_generate(model, prompts[i:i + 64], seeds[i:i + 64], handover, n, base_guidance, 1.0)
                        for i in range(0, len(prompts), 64)])
    r = evaluate_images(images, prompts, b["images_per_prompt"], [ctx["proxy"], ctx["gold"]],
                        ctx["inputs"]["embedder"], ctx["inputs"]["reference"])
    align = caption_alignment(ctx["gold"].classifier, images, prompts)
    return dict(handover=handover, proxy=r[PROXY]["mean"], proxy_se=r[PROXY]["se"], gold=r[GOLD]["mean"],
                gold_se=r[GOLD]["se"], align=align["mean"], align_heads=align,
                **{k: r[k] for k in ("dino_diversity", "frechet_distance", "covariance_distance",
                                     "log_covariance_distance")})


def curve_point(trainer, ctx: dict) -> dict:
    """Proxy and gold of the current model on fixed prompts and seeds (the training sampler)."""
    prompts = ctx["inputs"]["curve_prompts"]
    images = trainer.generate(prompts, seed=4321)
    with torch.no_grad():
        return dict(step=trainer.step, proxy=float(ctx["proxy"](images, prompts).mean()),
                    gold=float(ctx["gold"](images, prompts).mean()))


# ---------------------------------------------------------------- runs

def train_and_evaluate(name: str, seed: int, ctx: dict, b: dict, args) -> dict:
    from refl_engine.config import parse_args
    from refl_engine.generate import CombinedModel
    from refl_engine.trainer import ReFLTrainer

    out = ctx["work"] / f"{name.replace(' ', '_').replace('=', '')}-{seed}"
    trainer = ReFLTrainer(parse_args(train_flags(b, ctx["inputs"], seed, out, args.learning_rate) + METHODS[name]))
    trainer.setup()
    curve = [curve_point(trainer, ctx)]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rewards = []
    for _ in range(b["steps"]):
        m = trainer.train_step()
        rewards.append(m["reward_mean"])
        if trainer.step % b["curve_every"] == 0 or trainer.step == b["steps"]:
            cpu1 = time.process_time()
            curve.append(curve_point(trainer, ctx))
            cpu0 += time.process_time() - cpu1  # the curve's sampling is not training
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    trainer.unet.eval()
    model = CombinedModel(trainer.components, base_unet=None, source=name)  # base = the adapter off
    evals = [evaluate_at(model, ctx, b, h, args.base_guidance_scale) for h in ctx["handovers"]]
    print(f"  {name:13s} seed {seed}: {b['steps']} steps in {wall:.0f} s (CPU {cpu:.0f} s); "
          + "; ".join(f"h={e['handover']}: proxy {e['proxy']:.3f} gold {e['gold']:.3f} div {e['dino_diversity']:.3f}"
                      for e in evals), flush=True)
    return dict(method=name, seed=seed, train_cpu_seconds=cpu, train_wall_seconds=wall, train_reward=rewards,
                curve=curve, evals=evals)


def base_evaluation(ctx: dict, b: dict, args) -> dict:
    """The base model alone (every step base, its guidance): the table's reference row."""
    from refl_engine.generate import CombinedModel
    from refl_engine.models.load import load_pipeline_components

    c = load_pipeline_components(None)
    for m in (c.unet, c.vae, c.text_encoder):
        m.requires_grad_(False).eval()
    n = b["num_inference_steps"]
    return evaluate_at(CombinedModel(c, base_unet=c.unet, source="base"), ctx, b, n, args.base_guidance_scale)


def gradient_variance(ctx: dict, b: dict, args) -> dict:
    """DRaFT-LV vs DRaFT K=1 at the base model: per-draw LoRA gradients (the trainer's micro_step,
    same seed, so both see the same prompts and starting noise), their relative variance and the
    seconds each estimate took."""
    from refl_engine.config import parse_args
    from refl_engine.trainer import ReFLTrainer

    out = {}
    for name in ("DRaFT K=1", "DRaFT-LV"):
        flags = train_flags(b, ctx["inputs"], 0, ctx["work"] / "gradvar", args.learning_rate) + METHODS[name]
        trainer = ReFLTrainer(parse_args(flags)).setup()
        grads, seconds = [], []
        for _ in range(b["grad_draws"]):
            trainer.optimizer.zero_grad(set_to_none=True)
            t0 = time.process_time()
            trainer.micro_step(trainer.sample_prompts_batch(b["batch"]))
            seconds.append(time.process_time() - t0)
            grads.append(torch.cat([p.grad.flatten() for p in trainer.params if p.grad is not None]).double())
        g = torch.stack(grads)
        mean = g.mean(0)
        var = float(((g - mean) ** 2).sum(1).mean()) * len(g) / (len(g) - 1)  # E|g - Eg|^2, unbiased
        # |E g|^2 without the noise the sample mean carries (var / draws)
        signal = max(float((mean ** 2).sum()) - var / len(g), 1e-30)
        sec = sorted(seconds)[len(seconds) // 2]
        out[name] = dict(draws=len(g), variance=var, mean_grad_sq_norm=signal, relative_variance=var / signal,
                         seconds_per_estimate=sec, relative_variance_x_seconds=var / signal * sec)
        del trainer
    out["ratio_at_equal_cost"] = (out["DRaFT-LV"]["relative_variance_x_seconds"]
                                  / out["DRaFT K=1"]["relative_variance_x_seconds"])
    return out


# ---------------------------------------------------------------- the table, the plot, the findings

def aggregate(runs: list[dict], handovers: list[int]) -> list[dict]:
    """One row per (method, hand-over): each metric's mean and std over seeds."""
    rows = []
    for name in METHODS:
        mine = [r for r in runs if r["method"] == name]
        for h in handovers:
            evals = [e for r in mine for e in r["evals"] if e["handover"] == h]
            row = dict(method=name, handover=h, seeds=len(evals),
                       train_cpu_seconds=sum(r["train_cpu_seconds"] for r in mine) / len(mine))
            for key, _, _ in METRICS:
                v = torch.tensor([e[key] for e in evals], dtype=torch.float64)
                row[key] = float(v.mean())
                row[key + "_std"] = float(v.std()) if len(v) > 1 else float("nan")
            rows.append(row)
    return rows


def format_table(base: dict, rows: list[dict], n: int) -> str:
    head = "| method | base steps (of %d) | " % n + " | ".join(
        f"{col} {'↑' if up else '↓'}" for _, col, up in METRICS) + " | train CPU s |"
    lines = [head, "|" + "---|" * (len(METRICS) + 3)]
    lines.append(f"| base model | {n} | " + " | ".join(f"{base[k]:.3f}" for k, _, _ in METRICS) + " | - |")
    for r in rows:
        label = r["method"] if r["handover"] == 0 else f"{r['method']} Comb"
        cells = " | ".join(f"{r[k]:.3f} ± {r[k + '_std']:.3f}" for k, _, _ in METRICS)
        lines.append(f"| {label} | {r['handover']} | {cells} | {r['train_cpu_seconds']:.1f} |")
    return "\n".join(lines)


def plot(base: dict, rows: list[dict], path: Path) -> Path:
    from refl_engine.viz import _atomic_savefig, _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key in zip(axes, ("proxy", "gold")):
        for name in METHODS:
            mine = sorted((r for r in rows if r["method"] == name), key=lambda r: r["handover"])
            ax.errorbar([r["dino_diversity"] for r in mine], [r[key] for r in mine],
                        xerr=[r["dino_diversity_std"] for r in mine], yerr=[r[key + "_std"] for r in mine],
                        fmt="o-", capsize=2, label=name, ms=4)
            for r in mine:
                ax.annotate(str(r["handover"]), (r["dino_diversity"], r[key]), textcoords="offset points",
                            xytext=(3, 3), fontsize=6)
        ax.plot([base["dino_diversity"]], [base[key]], "k*", ms=11, label="base model")
        ax.set_xlabel("DinoDiv (toy-world encoder): diversity within a prompt")
        ax.set_ylabel(f"{key} reward ({PROXY if key == 'proxy' else GOLD})")
        ax.grid(alpha=0.3)
    axes[0].set_title("trained reward vs diversity (labels: base steps before hand-over)", fontsize=9)
    axes[1].set_title("gold (true) preference vs diversity", fontsize=9)
    axes[1].legend(fontsize=7)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def findings(base: dict, rows: list[dict], runs: list[dict], gradvar: dict) -> dict:
    """The papers' orderings, as measured here (numbers, and whether each held). An ordering of
    trained runs holds only if it holds for every training seed (`per_seed`), not just for the
    means: with two seeds a mean can cross a line one seed stays behind."""
    row = {(r["method"], r["handover"]): r for r in rows}
    hs = sorted({r["handover"] for r in rows})
    alone = {m: row[m, 0] for m in METHODS}
    seeds = sorted({r["seed"] for r in runs})
    ev = {(r["method"], r["seed"], e["handover"]): e for r in runs for e in r["evals"]}
    out = {}
    refl_seed = [ev["ReFL", s, 0]["dino_diversity"] for s in seeds]
    out["refl_collapses_diversity"] = dict(base=base["dino_diversity"], refl=alone["ReFL"]["dino_diversity"],
                                           per_seed=refl_seed, held=all(d < base["dino_diversity"] for d in refl_seed))
    # combined generation / ImageReFL keep diversity at a similar reward: compare each point of
    # ReFL's hand-over sweep and ImageReFL's with ReFL alone
    comb = [dict(handover=h, proxy=row["ReFL", h]["proxy"], diversity=row["ReFL", h]["dino_diversity"]) for h in hs]
    ir = [dict(handover=h, proxy=row["ImageReFL", h]["proxy"], diversity=row["ImageReFL", h]["dino_diversity"])
          for h in hs]
    comb_seed = [[ev["ReFL", s, h]["dino_diversity"] for h in hs] for s in seeds]
    out["combined_generation_keeps_diversity"] = dict(
        refl_sweep=comb, per_seed=comb_seed, held=all(d >= c[0] for c in comb_seed for d in c[1:]))
    # above ReFL's trade-off curve: ReFL's sweep interpolated at ImageReFL's diversity
    curve = sorted((c["diversity"], c["proxy"]) for c in comb)
    above = []
    for point in ir:
        d = point["diversity"]
        if curve[0][0] <= d <= curve[-1][0]:
            (d0, q0), (d1, q1) = next((a, b) for a, b in zip(curve, curve[1:]) if a[0] <= d <= b[0])
            above.append(point["proxy"] >= q0 + (q1 - q0) * (d - d0) / max(d1 - d0, 1e-12))
    # ImageReFL alone against ReFL alone, seed by seed: more diversity at a proxy within 10% of
    # ReFL's gain over the base
    pairs = [dict(imagerefl=ev["ImageReFL", s, 0], refl=ev["ReFL", s, 0]) for s in seeds]
    ir_seed = [dict(imagerefl_diversity=p["imagerefl"]["dino_diversity"], refl_diversity=p["refl"]["dino_diversity"],
                    imagerefl_proxy=p["imagerefl"]["proxy"], refl_proxy=p["refl"]["proxy"]) for p in pairs]
    out["imagerefl_vs_refl"] = dict(
        imagerefl_sweep=ir, points_above_refl_tradeoff=above, per_seed=ir_seed,
        held=all(q["imagerefl_diversity"] > q["refl_diversity"] and
                 q["imagerefl_proxy"] >= q["refl_proxy"] - 0.1 * abs(q["refl_proxy"] - base["proxy"]) for q in ir_seed))
    out["draft_lv_lowers_gradient_variance"] = dict(ratio_at_equal_cost=gradvar["ratio_at_equal_cost"],
                                                    held=gradvar["ratio_at_equal_cost"] < 1)
    over = {}
    for m in METHODS:
        curves = [r["curve"] for r in runs if r["method"] == m]
        d_proxy = sum(c[-1]["proxy"] - c[0]["proxy"] for c in curves) / len(curves)
        d_gold = sum(c[-1]["gold"] - c[0]["gold"] for c in curves) / len(curves)
        peak = sum(max(p["gold"] for p in c) - c[-1]["gold"] for c in curves) / len(curves)
        over[m] = dict(proxy_gain=d_proxy, gold_gain=d_gold, gold_below_its_peak=peak)
    gold_share = [o["gold_gain"] / o["proxy_gain"] for o in over.values() if o["proxy_gain"] > 0]
    # held: some method ends with the proxy up and gold down overall, or gold clearly (0.1 of its
    # 2.65 span) below the best it reached on the way while the proxy kept rising
    out["proxy_over_optimization"] = dict(per_method=over, held=any(
        o["proxy_gain"] > 0 and (o["gold_gain"] <= 0 or o["gold_below_its_peak"] > 0.1) for o in over.values()),
        gold_gain_per_proxy_gain=gold_share)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one step of each method at tiny sizes (the tests)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--plot", type=Path, default=None, help="quality-vs-diversity PNG (default: beside --json)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of every run")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seeds", default=None, help="training seeds, comma-separated (at least 2 for the spread)")
    p.add_argument("--handovers", default=None, help="hand-over sweep, comma-separated base steps")
    p.add_argument("--num_prompts", type=int, default=None)
    p.add_argument("--images_per_prompt", type=int, default=None)
    p.add_argument("--reference", type=int, default=None, help="real images of the Frechet reference set")
    p.add_argument("--grad_draws", type=int, default=None, help="gradient draws per method for the variance")
    p.add_argument("--learning_rate", type=float, default=1e-2)
    p.add_argument("--base_guidance_scale", type=float, default=3.0, help="the base model's CFG in its steps")
    p.add_argument("--threads", type=int, default=1)
    for k in ("curve_every", "curve_prompts", "train_prompts", "dataset"):
        p.add_argument(f"--{k}", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    b = budget(args)
    seeds = [int(s) for s in str(b["seeds"]).split(",")]
    handovers = sorted({int(h) for h in str(b["handovers"]).split(",")})
    if any(not 0 <= h < b["num_inference_steps"] for h in handovers) or 0 not in handovers:
        print(f"error: --handovers must include 0 and lie in 0..{b['num_inference_steps'] - 1}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    import logging

    logging.getLogger("refl_engine").setLevel(logging.ERROR)  # the set-distance rank warnings of --quick
    from refl_engine.rewards.base import build_reward

    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        work = Path(tmp)
        ctx = dict(work=work, handovers=handovers, inputs=make_inputs(work, b),
                   proxy=build_reward(PROXY), gold=build_reward(GOLD))
        print(f"fidelity: {len(METHODS)} methods x seeds {seeds}, {b['steps']} steps, N={b['num_inference_steps']}, "
              f"batch {b['batch']}, eval {b['num_prompts']} prompts x {b['images_per_prompt']} images, "
              f"hand-overs {handovers}", flush=True)
        base = base_evaluation(ctx, b, args)
        runs = [train_and_evaluate(name, seed, ctx, b, args) for seed in seeds for name in METHODS]
        gradvar = gradient_variance(ctx, b, args)
    rows = aggregate(runs, handovers)
    result = dict(
        budget=b, seeds=seeds, handovers=handovers, learning_rate=args.learning_rate,
        base_guidance_scale=args.base_guidance_scale, threads=args.threads, reward=PROXY,
        base=base, rows=rows, runs=runs, gradient_variance=gradvar,
        findings=findings(base, rows, runs, gradvar), wall_seconds=time.perf_counter() - t_start,
        machine=dict(platform=platform.platform(), torch=torch.__version__, cpus=os.cpu_count(),
                     load_average=os.getloadavg()))
    print()
    print(format_table(base, rows, b["num_inference_steps"]))
    g = gradvar
    print(f"\ngradient variance at the base model ({g['DRaFT K=1']['draws']} draws): relative variance "
          f"DRaFT K=1 {g['DRaFT K=1']['relative_variance']:.3g} ({g['DRaFT K=1']['seconds_per_estimate']:.2f} s), "
          f"DRaFT-LV {g['DRaFT-LV']['relative_variance']:.3g} ({g['DRaFT-LV']['seconds_per_estimate']:.2f} s); "
          f"at equal cost LV/K1 = {g['ratio_at_equal_cost']:.3g}")
    print("findings: " + "; ".join(f"{k} {'held' if v['held'] else 'did not hold'}"
                                   for k, v in result["findings"].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    plot_path = args.plot or (args.json.with_suffix(".png") if args.json else None)
    if plot_path:
        print(f"wrote {plot(base, rows, plot_path)}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path = [q for q in sys.path if os.path.abspath(q or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.exit(main())

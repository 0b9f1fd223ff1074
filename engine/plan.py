"""`python -m refl_engine.plan` (or `refl-plan`): will this training step fit, and what would?

Predicts the peak bytes of one training step from the model's architecture configs — no weights
are loaded — and prints where the bytes go, whether it fits the budget, the largest batch that
fits and the cheapest recompute policy that fits. See engine/memory/planner.py for the method.

    python -m refl_engine.plan --model sdxl --method draft --K full --batch-size 2
    python -m refl_engine.plan --model sd15 --rank 0 --optimizer adamw8bit --json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from .memory.planner import METHODS, OPTIMIZERS, POLICIES, REWARD_BACKBONES, Planner, PlanSpec

GiB = 2**30


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refl-plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", "--pretrained_model_name_or_path", default="sd15",
                   help="sd15, sdxl, tiny-sd, or a diffusers model directory (only its configs are read)")
    p.add_argument("--resolution", type=int, default=0, help="image side in pixels; 0 = the model's native size")
    p.add_argument("--batch-size", "--batch_size", "--train_batch_size", dest="batch_size", type=int, default=1)
    p.add_argument("--method", choices=METHODS, default="draft")
    p.add_argument("--K", default="full", help="DRaFT window: 'full' or 1..N")
    p.add_argument("--num_inference_steps", "--num-inference-steps", type=int, default=50)
    p.add_argument("--guidance_scale", "--guidance-scale", type=float, default=7.5,
                   help="> 1 runs classifier-free guidance, doubling the UNet batch")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank; 0 = full fine-tuning")
    p.add_argument("--lora_target_modules", default="to_q,to_k,to_v,to_out.0")
    p.add_argument("--mixed_precision", "--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    p.add_argument("--offload", action="store_true", help="DeepSpeed CPU offload (optimizer; and parameters at --zero 3)")
    p.add_argument("--recompute", choices=POLICIES, default="selective")
    p.add_argument("--reward", choices=sorted(REWARD_BACKBONES), default=None,
                   help="which reward backbone the image gradient crosses (default: aesthetic; colorfulness for tiny-sd)")
    p.add_argument("--no-checkpoint-decode", dest="checkpoint_decode", action="store_false")
    p.add_argument("--no-selective-decode", dest="selective_decode", action="store_false",
                   help="keep the VAE decoder's GroupNorm/SiLU outputs and frozen-conv inputs for backward")
    p.add_argument("--no-checkpoint-reward", dest="checkpoint_reward", action="store_false")
    p.add_argument("--budget-gb", "--budget_gb", dest="budget_gb", type=float, default=None,
                   help="device memory in GiB; default: the detected GPU (nvidia-ml-py), else 80")
    p.add_argument("--reserve-gb", dest="reserve_gb", type=float, default=3.0,
                   help="GiB held back for the CUDA context, library workspaces and fragmentation")
    p.add_argument("--no-cache", dest="use_cache", action="store_false", help="re-trace instead of using the cache")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _gib(n: int | float) -> str:
    return f"{n / GiB:8.2f}"


def render(plan) -> str:
    s = plan.spec
    c = plan.components
    lines = [
        f"refl-plan: {s['model']} @ {s['resolution'] or 'native'} px, batch {s['batch_size']}, {s['method']}"
        + (f" K={s['K']}" if s["method"] == "draft" else "")
        + f", N={s['num_inference_steps']}, CFG {s['guidance_scale']:g}, "
        + (f"LoRA r={s['rank']}" if s["rank"] else "full fine-tune")
        + f", {s['mixed_precision']}, {s['optimizer']}"
        + (f", ZeRO-{s['zero']}" if s["zero"] else "") + (" + offload" if s["offload"] else "")
        + f", recompute {s['recompute']}, reward {s['reward']}",
        "",
        f"{'component':34s} {'GiB':>8s}",
        f"{'-' * 34} {'-' * 8}",
    ]
    summed = [k for k in ("params", "grads", "optimizer", "autocast_weight_copy", "zero3_live_params") if k in c]
    for k in summed:
        lines.append(f"{k:34s} {_gib(c[k])}")
    lines.append(f"{'window: kept for backward':34s} {_gib(c['window_kept_activations'])}"
                 f"   ({plan.window['size']} steps: {plan.window['kinds']})")
    lines.append(f"{'peak phase on top':34s} {_gib(c['peak_phase_activations'])}   ({plan.window['phase']})")
    lines.append(f"{'-' * 34} {'-' * 8}")
    lines.append(f"{'peak':34s} {_gib(plan.peak_bytes)}")
    lines.append("")
    lines.append("for reference (not summed):")
    lines.append(f"  {'one UNet call, saved for backward':32s} {_gib(c['unet_step_activations'])}")
    for k, v in c["unet_step_kept"].items():
        lines.append(f"  {'  kept per step under ' + k:32s} {_gib(v)}")
    lines.append(f"  {'VAE decode phase':32s} {_gib(c['vae_decode_activations'])}")
    lines.append(f"  {'reward phase':32s} {_gib(c['reward_activations'])}")
    lines.append("  peak under each policy:       " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in plan.policies.items()))
    lines.append("")
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"{verdict} in {plan.usable_bytes / GiB:.2f} GiB usable of {plan.budget_bytes / GiB:.2f} GiB")
    lines.append(f"largest batch that fits with --recompute {s['recompute']}: {plan.max_batch}")
    lines.append(f"cheapest recompute policy that fits: {plan.recommended_recompute or 'none fits'}")
    if plan.suggestions:
        lines.append("what would make it fit:")
        lines.extend(f"  - {x}" for x in plan.suggestions)
    lines.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(lines)


def main(argv=None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    # peft imports bitsandbytes, which warns that Hugging Face's optional `kernels` package is
    # missing (4-bit CPU GEMMs, never used here): noise in a planner's output (as in train.py)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    fields = vars(args).copy()
    fields["lora_targets"] = fields.pop("lora_target_modules")
    fields.pop("json")
    spec = PlanSpec(**fields)
    try:
        plan = Planner(spec).plan()
    except ValueError as e:
        print(f"refl-plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(plan), indent=2, default=str))
    else:
        print(render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

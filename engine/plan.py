"""`refl-plan` (or `python -m refl_engine.plan`): will this training run fit, and what would?

It takes exactly the training flags — the same parser and validation as `refl-train`, presets
included — plus its own (--budget_gb, --reserve_gb, --json, --no_cache), and plans the run
`refl-train` would execute with those flags: `refl-plan <the flags of refl-train>` answers "will
this fit". It predicts the peak bytes of one training step from the model's architecture configs
(a hub id's configs are fetched, never its weights) and prints where the bytes go, whether it fits
the budget, the largest batch that fits and the cheapest recompute policy that fits. The window
(how many UNet calls keep activations for backward) comes from the method, as the trainer's does.
See engine/memory/planner.py for the method (trace.py and meta.py for the traces).

    refl-plan --config draft-sd15 --budget_gb 24
    refl-plan --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 --method draft --K 1 \\
        --train_batch_size 2 --mixed_precision bf16 --use_8bit_adam --json
"""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import asdict, dataclass

from .config import ConfigError, MethodConfig, TrainConfig, arg, parse_args, parse_memory

GiB = 2**30


@dataclass
class PlanOptions:
    """refl-plan's own flags (everything else is a training flag)."""

    _argument_group_name = "planner (refl-plan only)"
    budget_gb: float | None = arg(None, "device memory in GiB; unset = --memory_budget if given, else the detected "
                                  "GPU (nvidia-ml-py), else 80", valid="(0, inf)")
    reserve_gb: float = arg(3.0, "GiB held back for the CUDA context, library workspaces and fragmentation",
                            valid="[0, inf)")
    num_gpus: int = arg(1, "GPUs (processes) of the run: ZeRO partitions over them", valid="[1, inf)")
    json: bool = arg(False, "print one JSON object instead of the table")
    no_cache: bool = arg(False, "re-trace instead of using the planner's disk cache")


# MethodConfig fields the planner's spec names itself; the others reach the method as they are.
_SPEC_METHOD_FIELDS = ("method", "K", "num_inference_steps", "guidance_scale", "lv_inner")


def plan_spec(cfg: TrainConfig, opts: PlanOptions | None = None):
    """The run `refl-train` executes with `cfg`, as the planner's inputs: the one mapping from the
    training flags to the planner."""
    from .memory.planner import PlanSpec

    opts = opts or PlanOptions()
    mo, m, o, mem, d = cfg.model, cfg.method, cfg.optim, cfg.memory, cfg.distributed
    budget_gb = opts.budget_gb
    if budget_gb is None and mem.memory_budget:
        budget_gb = parse_memory(mem.memory_budget) / GiB
    method_options = {f.name: getattr(m, f.name) for f in dataclasses.fields(MethodConfig)
                      if f.name not in _SPEC_METHOD_FIELDS}
    return PlanSpec(
        model=mo.model, revision=mo.revision, cache_dir=mo.cache_dir,
        resolution=mo.resolution, height=mo.height, width=mo.width,
        batch_size=o.train_batch_size,  # per device and micro-batch: accumulation does not raise the peak
        method=m.method, K=m.K, num_inference_steps=m.num_inference_steps, guidance_scale=m.guidance_scale,
        lv_inner=m.lv_inner, method_options=method_options,
        rank=mo.rank, lora_targets=mo.lora_target_modules, mixed_precision=o.mixed_precision,
        optimizer=o.optimizer, zero=d.zero or 0, offload=d.offload, num_gpus=opts.num_gpus,
        recompute=mem.recompute, recompute_chunk=mem.recompute_chunk, checkpoint_decode=mem.checkpoint_decode,
        lean_decode=mem.lean_decode,
        checkpoint_reward=mem.checkpoint_reward, reward=m.reward,
        budget_gb=budget_gb, reserve_gb=opts.reserve_gb, use_cache=not opts.no_cache,
    )


def _gib(n: int | float) -> str:
    return f"{n / GiB:8.2f}"


def render(plan) -> str:
    s = plan.spec
    c = plan.components
    lines = [
        f"refl-plan: {s['model'] or 'the embedded toy-world model'} @ {s['resolution'] or 'native'} px, "
        f"batch {s['batch_size']}, {s['method']}"
        + (f" K={s['K']}" if s["method"] == "draft" else "")
        + f", N={s['num_inference_steps']}, CFG {s['guidance_scale']:g}, "
        + (f"LoRA r={s['rank']}" if s["rank"] else "full fine-tune")
        + f", {s['mixed_precision']}, {s['optimizer']}"
        + (f", ZeRO-{s['zero']}" if s["zero"] else "")
        + (f" + offload {s['offload']}" if s["offload"] not in (False, "none") else "")
        + f", recompute {s['recompute']}, reward {s['reward']}",
        "",
        f"{'component':34s} {'GiB':>8s}",
        f"{'-' * 34} {'-' * 8}",
    ]
    summed = [k for k in ("params", "grads", "optimizer", "autocast_weight_copy", "zero3_live_params") if k in c]
    for k in summed:
        lines.append(f"{k:34s} {_gib(c[k])}")
    lines.append(f"{'window: kept for backward':34s} {_gib(c['window_kept_activations'])}"
                 f"   ({plan.window['size']} steps: {plan.window['kinds']}"
                 + (f"; --recompute_chunk {plan.window['recompute_chunk']}"
                    if plan.window.get("recompute_chunk") else "") + ")")
    lines.append(f"{'peak phase on top':34s} {_gib(c['peak_phase_activations'])}   ({plan.window['phase']}; decode "
                 f"{'recomputed' if plan.window.get('checkpoint_decode') else 'kept'}, reward "
                 f"{'recomputed' if plan.window.get('checkpoint_reward') else 'kept'} in backward)")
    lines.append(f"{'-' * 34} {'-' * 8}")
    lines.append(f"{'peak':34s} {_gib(plan.peak_bytes)}" + (f"   (per GPU, {s['num_gpus']} GPUs)" if s["num_gpus"] > 1 else ""))
    if plan.host_bytes:
        lines.append(f"{'host memory (offload), per process':34s} {_gib(plan.host_bytes)}"
                     f"   ({plan.host_bytes * s['num_gpus'] / GiB:.2f} GiB for {s['num_gpus']} processes)")
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

    # peft imports bitsandbytes, which warns when it cannot load its 4-bit CPU GEMMs from Hugging
    # Face's `kernels` package (absent, or the hub repository not trusted; never used here): noise
    # in a planner's output (as in train.py)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        cfg, opts = parse_args(argv, prog="refl-plan", extra=(PlanOptions,), description=__doc__.split("\n\n")[0])
        from .memory.planner import Planner
        from .rewards import check_reward_spec

        check_reward_spec(cfg.method.reward, check_files=False)  # the names; planning reads no weights
        plan = Planner(plan_spec(cfg, opts)).plan()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    if opts.json:
        print(json.dumps(asdict(plan), indent=2, default=str))
    else:
        print(render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())

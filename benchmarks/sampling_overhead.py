"""The engine's no-grad sampling loop against a stock diffusers pipeline call: the same model, DDIM
schedule, guidance, steps and starting noise, the decode excluded from both (`output_type="latent"`).

The engine side runs as the trainer runs its no-grad steps and sample grids: a `ReFLTrainer` set
up with `--recompute` (default `selective`, whose modules are installed for its lean mode) after
one training step, the prompts' cached embeddings, `run_trajectory` under no_grad. The stock side
is `StableDiffusionPipeline` (or the XL one) over a second, untouched copy of the same preset
carrying the same LoRA adapter (diffusers' `add_adapter`) with the trainer's weights, given the same prompt embeddings (so neither encodes prompts) and the same latents. The two
outputs are compared (they run the same arithmetic; float32 rounding only).

Time is process CPU time (`time.process_time`) with one torch thread, so other jobs on the
machine slow it little; the two are timed alternately, `--repeats` times each, and the report is
the medians and the median of the per-pair ratios engine / pipeline (target <= 1.02).

    python benchmarks/sampling_overhead.py [--model tiny-sd] [--num_inference_steps 20]
        [--guidance_scale 3] [--batch 2] [--repeats 15] [--recompute selective] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def cpu_seconds(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def build(args, out_dir):
    from refl_engine.config import TrainConfig, set_field, validate
    from refl_engine.models.conditioning import make_eps_fn
    from refl_engine.models.load import load_pipeline_components
    from refl_engine.models.lora import add_lora
    from refl_engine.sampling import Window, run_trajectory
    from refl_engine.trainer import ReFLTrainer

    cfg = TrainConfig()
    for k, v in dict(model=args.model, num_inference_steps=args.num_inference_steps,
                     guidance_scale=args.guidance_scale, train_batch_size=args.batch, recompute=args.recompute,
                     eta=args.eta, output_dir=out_dir, progress=False).items():
        set_field(cfg, k, v)
    validate(cfg)
    trainer = ReFLTrainer(cfg).setup()
    trainer.train_step()  # as in training: whatever the policy installs lazily is installed
    trainer.unet.eval()
    prompts = trainer.prompts[:args.batch]
    g = args.guidance_scale
    cond = trainer.text.conditioning(prompts, cfg=g > 1.0)
    x_T = trainer.initial_noise(args.batch, torch.Generator().manual_seed(0))
    n = len(trainer.schedule)

    def engine():
        eps_fn = make_eps_fn(trainer.unet, cond, g)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad(), trainer._autocast():
            return run_trajectory(eps_fn, trainer.schedule, x_T, Window([n] * args.batch), trainer.policy,
                                  args.eta, generator=gen)

    # a second copy, never patched, with the same LoRA adapter (diffusers' add_adapter) and weights
    stock = load_pipeline_components(args.model)
    add_lora(stock.unet, cfg.model.rank, cfg.model.lora_alpha, cfg.model.lora_target_modules)
    stock.unet.load_state_dict(trainer.unet.state_dict())
    stock.unet.eval()
    pipe = stock.pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=cond.cond, num_inference_steps=args.num_inference_steps, guidance_scale=g,
                  eta=args.eta, output_type="latent", height=trainer.height, width=trainer.width)
    if g > 1.0:
        kwargs["negative_prompt_embeds"] = cond.uncond
    if stock.kind == "sdxl":
        kwargs.update(pooled_prompt_embeds=cond.added["text_embeds"],
                      negative_pooled_prompt_embeds=cond.added_uncond.get("text_embeds"))

    def pipeline():
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return pipe(latents=x_T.clone(), generator=gen, **kwargs).images

    return trainer, engine, pipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd")
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--recompute", default="selective", help="the trainer's policy (selective installs its modules)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the record here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        trainer, engine, pipeline = build(args, out)
        a, b = engine(), pipeline()  # warm-up, and the two agree
        diff = float((a - b).abs().max())
        scale = float(b.abs().max())
        if not diff <= 1e-4 * max(scale, 1.0):
            sys.exit(f"the engine's samples differ from the pipeline's by {diff:.3g} (max |x| {scale:.3g})")
        times = {"engine": [], "pipeline": []}
        for r in range(args.repeats):
            order = ("engine", "pipeline") if r % 2 == 0 else ("pipeline", "engine")
            for name in order:
                times[name].append(cpu_seconds(engine if name == "engine" else pipeline))
    ratios = [e / s for e, s in zip(times["engine"], times["pipeline"])]
    record = dict(model=args.model, num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                  eta=args.eta, batch=args.batch, recompute=args.recompute, threads=args.threads, repeats=args.repeats,
                  engine_cpu_s=statistics.median(times["engine"]), pipeline_cpu_s=statistics.median(times["pipeline"]),
                  ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                  max_abs_diff=diff, torch=torch.__version__, times=times)
    import diffusers

    record["diffusers"] = diffusers.__version__
    print(f"{args.model}, N = {args.num_inference_steps}, CFG {args.guidance_scale:g}, batch {args.batch}, "
          f"--recompute {args.recompute}, {args.threads} thread(s), {args.repeats} repeats (CPU time):")
    print(f"  engine   {record['engine_cpu_s']:.4f} s   pipeline {record['pipeline_cpu_s']:.4f} s   "
          f"engine / pipeline {record['ratio_median']:.4f} (min {record['ratio_min']:.4f}, max "
          f"{record['ratio_max']:.4f}); outputs agree to {diff:.2e}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")
    return record


if __name__ == "__main__":
    main()

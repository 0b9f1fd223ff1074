"""One training step of refl-engine against TRL's AlignProp trainer (`AlignPropTrainer`), on the same
model and settings: CPU time per step and peak RSS, each configuration in its own fresh process.

What is compared. Both sides fine-tune LoRA adapters (rank 4, alpha 4, Gaussian init, on to_q,
to_k, to_v, to_out.0: TRL hard-codes these in `DefaultDDPOStableDiffusionPipeline
.get_trainable_layers`, the engine's defaults are the same) on the UNet of the same pipeline
directory (default: the engine's `tiny-sd` preset, SD1.5-shaped, `refl_engine.models.load`),
with the same reward (the built-in `colorfulness`, which reads images in [0, 1]: the engine
decodes to (x / 2 + 0.5).clamp(0, 1), TRL's `rgb_with_grad(output_type="pt")` post-processes to
the same), DDIM with N steps, eta 1, classifier-free guidance 5 (TRL's defaults), batch 2, at
`--resolution` pixels, AdamW lr 1e-3 without weight decay, gradient-norm clipping at 1. One
step = sample with gradient + VAE decode + reward + backward + clip + AdamW step.

  TRL side: TRL's own `AlignPropTrainer.step` (AlignPropConfig, mixed_precision "no", its
      Accelerator on the CPU), the whole trainer step as TRL runs it. TRL always
      gradient-checkpoints every UNet call (`pipeline_step_with_grad(gradient_checkpoint=True)`,
      which the trainer never overrides) and never checkpoints the decode or the reward. The trainer
      always passes `truncated_backprop=True`; which calls carry gradient is set by
      `truncated_backprop_rand=False` and `truncated_backprop_timestep` (step index i's noise
      prediction is detached when i < timestep):
        K = full: timestep 0, nothing is detached, all N calls carry gradient;
        K = 1:    timestep N - 1, steps 0..N-2 are detached and only the last step's call carries
                  gradient. (TRL still runs every UNet call in grad mode under its checkpoint; the
                  detach makes the N - 1 earlier ones' graphs free at once and the latents before
                  the last step carry no gradient.)
      The pipeline is TRL's `DefaultDDPOStableDiffusionPipeline(model_dir, use_lora=True)`. The
      benchmark changes nothing in TRL's code; around it, it creates accelerate's `PartialState()`
      before building that pipeline (its constructor logs "no LoRA weights found" through
      accelerate's logger, which raises without that state; the trainer's Accelerator creates the
      same state), sets the pipeline's `unet.config.sample_size` to resolution / vae_scale_factor
      (the trainer passes no height/width, so `rgb_with_grad` samples at sample_size x
      vae_scale_factor) and turns off the pipeline's progress bar after the trainer turned it on.
  Engine side: `ReFLTrainer.train_step()` with `--method alignprop --alignprop_k_min K
      --alignprop_k_max K` (K = N: the whole trajectory; K = 1: the last step only, the same
      window as `--method draft --K 1`), `--recompute` each of auto (no --memory_budget: the
      machine's available RAM), selective, lean, full, none, and `auto` with `--memory_budget`
      set to TRL's measured peak-RSS delta for the same K ("auto@trl"). On the CPU the engine's
      planner counts only the step's own tensors (no allocator count of the bytes already live), so
      the budget given is TRL's step delta, not its absolute peak, which includes the loaded
      weights and the Python/torch runtime.

Measures, per configuration in a fresh subprocess: one warm-up step, then `--steps` steps timed
with `time.process_time()` (process CPU time, one torch thread by default); the median is
reported. Peak RSS: VmRSS just before the first step (after gc and malloc_trim), the kernel's
peak-RSS counter reset there (/proc/self/clear_refs; where that is impossible the process
lifetime's ru_maxrss is used), and `resource.getrusage(RUSAGE_SELF).ru_maxrss` after the steps:
"peak dMB" is the peak over the warm-up and timed steps minus the RSS before the first step (the
engine's `auto` profiles its UNet call in the warm-up step, so that peak is included); "timed
dMB" is the same over the timed steps only (counter reset again after the warm-up). Ratios are to
TRL at the same K. "plan MB" is the engine's planner (refl_engine.memory.planner) for the row: the
peak bytes of live tensors it predicts (for auto, of the plan that fits the row's budget).

RSS is not tensor bytes. With glibc's default malloc, blocks under its (dynamic, up to 32 MiB)
mmap threshold come from the heap and freed ones are kept, fragmented: on tiny-sd at 128 px the
measured RSS delta was 1.4-1.9x the engine's planned tensor peak and ~3x TRL's own tensors; with
`--malloc_mmap_threshold 131072` (MALLOC_MMAP_THRESHOLD_ in every worker) RSS follows the tensors
(engine lean 801 MB measured vs 774 MB planned) at ~8-27 % more CPU time. So run the memory
comparison both ways; the allocator setting is in the JSON. Since on the CPU the engine's `auto`
budgets tensor bytes (planner) while this benchmark measures RSS, `auto@trl` can exceed TRL's RSS
under the default allocator.

Memory guard: before each engine configuration the planner's prediction x `--rss_factor` (2.0, or
1.15 with --malloc_mmap_threshold) is compared with `--max_memory` (default 90 % of MemAvailable at
start); a configuration over it is skipped and reported as such, not run into the OOM killer (at
256 px, K = full, `none` plans ~23 GiB, `lean` ~14.6 GiB and `auto` with the machine's memory as
budget ~20 GiB of tensors, too much for a 24 GiB machine under the default allocator).

Before the timings a check process runs both samplers at 64 px (or less) with the same prompts,
starting noise and eta noise and the same LoRA weights (random, non-zero): the no-grad images must
agree, and the LoRA gradients for K = full and K = 1 must agree, within float tolerance.

Differences that remain (part of what is compared): TRL re-encodes the prompts with the (frozen)
text encoder every step, the engine caches the embeddings; TRL runs the N - 1 detached UNet calls
of K = 1 in grad mode under checkpoint, the engine runs them under no_grad; TRL keeps the VAE
decode's activations, the engine's policies may checkpoint or lean-recompute them; TRL's step goes
through accelerate (accumulate / gather / clip wrappers).

TRL: AlignProp was deprecated in July 2025 and removed in 0.24; 0.23.1 is the last release with
`trl/trainer/alignprop_trainer.py` and `trl/models/modeling_sd_base.py`. It installs beside the
project's venv without changing it: what AlignProp imports (torch, diffusers, transformers, peft,
accelerate) is the venv's; of TRL's other requirements `datasets` is never imported on this path and
`pandas` only by `trl.trainer.utils`, which the trainer module imports for its model card: without
pandas this benchmark puts a stub module with the two functions it takes from there in its place,
recorded in the JSON as `trl_import`. Checked with diffusers 0.42.1, transformers 5.24.0, peft
0.21.2, accelerate 1.15.0, torch 2.13.0 (CPU):

    .venv/bin/pip install --no-deps --target /tmp/trl-pkgs trl==0.23.1 pandas
    PYTHONPATH=/tmp/trl-pkgs OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trl_compare.py \\
        [--resolution 256] [--num_inference_steps 20] [--steps 3] [--rounds 1] [--K full,1] [--policies ...]
        [--malloc_mmap_threshold 131072] [--max_memory 20GB] [--json FILE] [--quick]

(or `pip install trl==0.23.1` into a separate venv that also has this project installed).
`--quick` is a smoke test: 64 px, N = 4, one timed step (~3 min). Cost at the defaults (256 px,
N = 20, one thread): one guided UNet call costs ~10.4 s forward and ~36 s forward + backward, so a
K = full step is ~15 min (TRL, engine full/selective) and a K = 1 step ~4 min; with --steps 3
(4 steps per configuration) the whole run is ~6 h, --steps 1 about half, --K full and --K 1 in two
processes about 4 h of wall time. Benchmarks never assert.

Rounds. This machine's speed drifts by up to ~10% over minutes, as much as the differences measured
here (at K = 1 the engine saves TRL's one re-run forward, ~1 call in 22). `--rounds R` runs every
configuration R times, TRL first in odd rounds and last in even ones (auto@trl keeps the first
round's TRL peak as its budget), and prints, per engine configuration, its time and peak RSS over
the same round's TRL: the median, the range, and in how many rounds it was faster.

Paired in one process. `--paired P` builds TRL's trainer and one engine trainer per policy in one
process and alternates their steps, P pairs (TRL first in odd pairs, last in even ones; the engine
policies in order, then reversed), each step's process CPU time (user and system apart) and minor
page faults read with getrusage. Steps minutes apart in separate processes carry the machine's
drift; a pair's steps are seconds apart. It prints per engine policy its step time over the same
pair's TRL: the median, the quartiles and in how many pairs it was faster. auto@trl's budget is
TRL's peak-RSS delta over one step, measured in that process after TRL's warm-up and before any
engine trainer is built. Peak RSS is per process, so `--paired` compares time only; the RSS
comparison is the separate processes'.

    PYTHONPATH=/tmp/trl-pkgs OMP_NUM_THREADS=1 .venv/bin/python benchmarks/trl_compare.py \
        --resolution 128 --paired 24 --K 1 --policies auto@trl,auto --no_check
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

TRL_VERSION = "0.23.1"  # the last release that ships AlignPropTrainer
INSTALL = (f"{sys.executable} -m pip install --no-deps --target /tmp/trl-pkgs trl=={TRL_VERSION} pandas && "
           f"export PYTHONPATH=/tmp/trl-pkgs")
POLICIES = ("auto", "selective", "lean", "full", "none")
LORA_RANK = 4  # TRL's get_trainable_layers hard-codes r=4, lora_alpha=4
REWARD = "colorfulness"
MiB = 2**20


class TRLMissing(RuntimeError):
    pass


# ------------------------------------------------------------------ importing TRL

def import_trl():
    """(AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline, trl version, how the
    trainer module was imported). Raises TRLMissing with a one-line reason."""
    try:
        import trl
    except ImportError as e:
        raise TRLMissing(f"{type(e).__name__}: {e}") from None
    try:
        from trl.models.modeling_sd_base import DefaultDDPOStableDiffusionPipeline
        from trl.trainer.alignprop_config import AlignPropConfig
    except ImportError as e:  # a release without AlignProp (>= 0.24), or a failing dependency
        raise TRLMissing(f"trl {trl.__version__} has no usable AlignProp ({type(e).__name__}: {e})") from None
    how = "trl.trainer.alignprop_trainer imported as is"
    try:
        import trl.trainer.alignprop_trainer as mod
    except ImportError as e:
        # trl.trainer.utils imports pandas (and more) at module level; the trainer module takes only
        # generate_model_card and get_comet_experiment_url from it, both used by create_model_card
        # alone, which this benchmark never calls. Put a stub in its place and import again.
        reason = f"{type(e).__name__}: {e}"
        stub = types.ModuleType("trl.trainer.utils")

        def _unavailable(*args, **kwargs):
            raise RuntimeError(f"trl.trainer.utils is stubbed by benchmarks/trl_compare.py ({reason})")

        stub.generate_model_card = _unavailable
        stub.get_comet_experiment_url = lambda *a, **k: None
        sys.modules.pop("trl.trainer.alignprop_trainer", None)
        sys.modules["trl.trainer.utils"] = stub
        try:
            import trl.trainer.alignprop_trainer as mod
        except ImportError as e2:
            raise TRLMissing(f"trl {trl.__version__}: trl.trainer.alignprop_trainer does not import "
                             f"({type(e2).__name__}: {e2})") from None
        how = (f"trl.trainer.utils replaced by a stub ({reason}); it serves only "
               "AlignPropTrainer.create_model_card, which is never called")
    return AlignPropConfig, mod.AlignPropTrainer, DefaultDDPOStableDiffusionPipeline, trl.__version__, how


# ------------------------------------------------------------------ memory helpers

def release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def run_steps(step, steps: int) -> dict:
    """One warm-up step, then `steps` timed ones: process CPU seconds and peak RSS."""
    import torch

    from refl_engine.memory.measure import reset_peak_rss, status_kib

    release_memory()
    rss_before = status_kib("VmRSS")
    resettable = reset_peak_rss()
    c0, w0 = time.process_time(), time.perf_counter()
    step()
    warm_cpu, warm_wall = time.process_time() - c0, time.perf_counter() - w0
    peak_warm = maxrss_kib()
    if resettable:  # the timed steps' own peak: hand back what the warm-up freed, then reset
        release_memory()
        reset_peak_rss()
    cpu, wall = [], []
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    peak_timed = maxrss_kib()
    peak = max(peak_warm, peak_timed)
    return dict(cpu_s=statistics.median(cpu), wall_s=statistics.median(wall), cpu_times=cpu, wall_times=wall,
                warmup_cpu_s=warm_cpu, warmup_wall_s=warm_wall, threads=torch.get_num_threads(),
                rss_before_mb=rss_before / 1024, peak_mb=peak / 1024, peak_delta_mb=(peak - rss_before) / 1024,
                timed_peak_delta_mb=(peak_timed - rss_before) / 1024 if resettable else None,
                peak_reset=resettable)


# ------------------------------------------------------------------ the two sides

def make_trainer(spec: dict, out: str, recompute: str, budget: str = ""):
    from refl_engine.config import TrainConfig, set_field, validate
    from refl_engine.trainer import ReFLTrainer

    k = spec["N"] if spec["K"] == "full" else int(spec["K"])
    cfg = TrainConfig()
    for name, v in dict(model=spec["model"], method="alignprop", alignprop_k_min=k, alignprop_k_max=k,
                        num_inference_steps=spec["N"], guidance_scale=spec["guidance_scale"], eta=spec["eta"],
                        train_batch_size=spec["batch"], recompute=recompute, memory_budget=budget, rank=LORA_RANK,
                        reward=REWARD, resolution=spec["resolution"], kernels=spec["kernels"],
                        learning_rate=1e-3, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                        output_dir=out, progress=False).items():
        set_field(cfg, name, v)
    validate(cfg)
    return ReFLTrainer(cfg).setup()


def engine_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(spec, out, spec["recompute"], spec.get("budget", ""))
        torch.set_num_threads(spec["threads"])
        windows, rewards = [], []

        def step():
            m = trainer.train_step()
            windows.append(m["window_size"])
            rewards.append(m["reward_mean"])

        rec = run_steps(step, spec["steps"])
        pol = trainer.policy
        rec.update(window_sizes=windows, reward_means=rewards, policy=getattr(pol, "name", type(pol).__name__))
        if getattr(pol, "last_plan", None) is not None:
            rec["auto_plan"] = plan_record(pol)
    return rec


def plan_record(pol) -> dict:
    """What an `auto` policy's latest plan was, for the JSON and the tables."""
    p = pol.last_plan
    return dict(counts=p.counts, planned_peak_mb=p.peak / MiB, chunk=pol.chunk, checkpoint_decode=pol.checkpoint_decode,
                checkpoint_reward=pol.checkpoint_reward, allocator=pol.allocator, trim_heap=pol.trim_heap,
                budget_mb=pol.memory_budget / MiB, budget_source=pol.budget_source)


def trl_pipeline(spec: dict, DefaultPipeline):
    """TRL's default pipeline over the model directory, sampling at `resolution` (the trainer
    passes no height/width: rgb_with_grad takes unet.config.sample_size x vae_scale_factor)."""
    import logging

    from accelerate import PartialState

    # The constructor logs "no LoRA weights found" (expected: we train new ones) through accelerate's
    # logger, which raises unless accelerate's state exists; AlignPropTrainer's Accelerator would
    # create the same state a moment later.
    PartialState()
    logging.getLogger("trl").setLevel(logging.ERROR)
    pipe = DefaultPipeline(spec["model"], use_lora=True)
    sd = pipe.sd_pipeline
    sd.unet.register_to_config(sample_size=spec["resolution"] // sd.vae_scale_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def trl_truncation(spec: dict) -> dict:
    """AlignPropConfig fields giving gradient through the last K steps: pipeline_step_with_grad
    detaches step i's noise prediction when i < truncated_backprop_timestep."""
    return dict(truncated_backprop_rand=False,
                truncated_backprop_timestep=0 if spec["K"] == "full" else spec["N"] - int(spec["K"]))


@contextlib.contextmanager
def trl_session(spec: dict):
    """TRL's AlignPropTrainer over the model directory, built as `trl_worker` runs it; yields
    (step, rewards, info): one trainer step, the reward means so far, what the record names."""
    import torch

    AlignPropConfig, AlignPropTrainer, DefaultPipeline, version, how = import_trl()
    from refl_engine.data import load_prompts
    from refl_engine.rewards import build_reward

    reward = build_reward(REWARD)
    prompts = load_prompts("builtin:toy")
    rng = random.Random(0)
    pipe = trl_pipeline(spec, DefaultPipeline)
    config = AlignPropConfig(
        exp_name="trl_compare", seed=0, log_with=None, mixed_precision="no", sample_num_steps=spec["N"],
        sample_eta=spec["eta"], sample_guidance_scale=spec["guidance_scale"], train_batch_size=spec["batch"],
        train_learning_rate=1e-3, train_adam_weight_decay=0.0, train_max_grad_norm=1.0,
        train_gradient_accumulation_steps=1, **trl_truncation(spec))
    rewards = []

    def reward_fn(images, batch_prompts, metadata):
        r = reward(images, list(batch_prompts))
        rewards.append(float(r.detach().mean()))
        return r, {}

    with tempfile.TemporaryDirectory() as out:
        cwd = os.getcwd()
        os.chdir(out)  # anything accelerate writes stays in the temporary folder
        try:
            trainer = AlignPropTrainer(config, reward_fn, lambda: (rng.choice(prompts), {}), pipe)
            pipe.set_progress_bar_config(disable=True)  # the trainer turned it on
            torch.set_num_threads(spec["threads"])
            state = {"global_step": 0}

            def step():
                state["global_step"] = trainer.step(0, state["global_step"])  # epoch 0: no save_state

            yield step, rewards, dict(trl_version=version, trl_import=how, trl_config=trl_truncation(spec),
                                      device=str(trainer.accelerator.device))
        finally:
            os.chdir(cwd)


def trl_worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    with trl_session(spec) as (step, rewards, info):
        rec = run_steps(step, spec["steps"])
    rec.update(reward_means=rewards, **info)
    return rec


def cpu_times() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime, u.ru_stime, u.ru_minflt


def paired_worker(spec: dict) -> dict:
    """TRL's trainer and one engine trainer per policy in this one process, their steps alternated
    (TRL, engines..., then the reverse order in the next pair), each step timed in process CPU
    time (user and system apart, with its minor page faults). Slow drift of the machine then hits
    every side of a pair alike. auto@trl's budget is TRL's peak-RSS delta over one step, measured
    here after TRL's warm-up and before any engine trainer exists (what `run_steps` measures in a
    TRL-only process). Peak RSS of the sides cannot be told apart in one process: the RSS
    comparison is the separate-process run's."""
    import torch

    from refl_engine.memory.measure import reset_peak_rss, status_kib

    torch.set_num_threads(spec["threads"])
    out = {}
    with trl_session(spec) as (trl_step, trl_rewards, info), tempfile.TemporaryDirectory() as tmp:
        trl_step()  # warm-up
        release_memory()
        before = status_kib("VmRSS")
        if not reset_peak_rss():
            raise RuntimeError("the peak-RSS counter cannot be reset here (/proc/self/clear_refs): auto@trl's "
                               "budget would include the process's earlier peak")
        trl_step()
        trl_delta = (maxrss_kib() - before) * 1024
        steps = {"trl alignprop": trl_step}
        for q in spec["policies"]:
            budget = str(trl_delta) if q == "auto@trl" else ""
            trainer = make_trainer(spec, os.path.join(tmp, q), q.split("@")[0], budget)
            trainer.train_step()  # warm-up (auto profiles and plans here)
            steps[f"engine {q}"] = trainer.train_step
            if getattr(trainer.policy, "last_plan", None) is not None:
                out[f"engine {q}"] = plan_record(trainer.policy)
        torch.set_num_threads(spec["threads"])
        names = list(steps)
        times = {n: [] for n in names}
        for i in range(spec["pairs"]):
            for n in names if i % 2 == 0 else names[::-1]:
                u0, s0, f0 = cpu_times()
                steps[n]()
                u1, s1, f1 = cpu_times()
                times[n].append(dict(user=u1 - u0, sys=s1 - s0, minflt=f1 - f0))
            print(f"  pair {i + 1}/{spec['pairs']}: " + ", ".join(
                f"{n} {times[n][-1]['user'] + times[n][-1]['sys']:.2f} s" for n in names), file=sys.stderr, flush=True)
    return dict(info, trl_budget_mb=trl_delta / MiB, plans=out, steps=times, threads=torch.get_num_threads())


def check_worker(spec: dict) -> dict:
    """Both samplers on the same prompts, x_T, eta noise and LoRA weights: the no-grad images, and
    the LoRA gradients of the reward for K = full and K = 1."""
    import torch

    torch.set_num_threads(spec["threads"])
    _, _, DefaultPipeline, version, how = import_trl()
    from refl_engine.sampling import Window, run_trajectory

    n, g, eta = spec["N"], spec["guidance_scale"], spec["eta"]
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(dict(spec, K="full"), out, "none")
    pipe = trl_pipeline(spec, DefaultPipeline)
    sd = pipe.sd_pipeline
    pipe.get_trainable_layers()  # TRL's LoRA adapter (rank 4, alpha 4), as the trainer adds it
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero LoRA weights (B starts at zero), the same on both sides
        for name, p in trainer.unet.named_parameters():
            if p.requires_grad:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    missing, unexpected = sd.unet.load_state_dict(trainer.unet.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"LoRA state dicts differ: missing {missing[:3]}, unexpected {unexpected[:3]}")
    e_params = [p for p in trainer.unet.parameters() if p.requires_grad]
    t_named = dict(sd.unet.named_parameters())
    t_params = [t_named[nm] for nm, p in trainer.unet.named_parameters() if p.requires_grad]
    prompts = trainer.prompts[:spec["batch"]]
    x_T = trainer.initial_noise(spec["batch"], torch.Generator().manual_seed(0))
    ids = sd.tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True,
                       max_length=sd.tokenizer.model_max_length).input_ids
    neg = sd.tokenizer([""], return_tensors="pt", padding="max_length", truncation=True,
                       max_length=sd.tokenizer.model_max_length).input_ids
    with torch.no_grad():  # as AlignPropTrainer._generate_samples encodes them
        embeds, neg_embeds = sd.text_encoder(ids)[0], sd.text_encoder(neg)[0].repeat(len(prompts), 1, 1)

    def engine(k, grad):
        for p in e_params:
            p.grad = None
        with torch.set_grad_enabled(grad):
            chain = trainer.sampling_chain(prompts)
            x0 = run_trajectory(chain.eps_fn, trainer.schedule, x_T.clone(), Window([n - k] * len(prompts)),
                                trainer.policy, eta, generator=torch.Generator().manual_seed(123))
            images = trainer.decode(x0)
            r = trainer.reward(images, prompts)
        if grad:
            (-r.mean()).backward()
        return images.detach(), r.detach(), [p.grad.clone() for p in e_params] if grad else None

    def trl(k, grad):
        for p in t_params:
            p.grad = None
        torch.manual_seed(123)  # scheduler_step draws its eta noise from the global generator
        with torch.set_grad_enabled(grad):
            out = pipe.rgb_with_grad(
                prompt_embeds=embeds, negative_prompt_embeds=neg_embeds, num_inference_steps=n, guidance_scale=g,
                eta=eta, latents=x_T.clone(), output_type="pt", height=spec["resolution"], width=spec["resolution"],
                **trl_truncation(dict(spec, K="full" if k == n else str(k))))
            r = trainer.reward(out.images, prompts)
        if grad:
            (10.0 - r.mean()).backward()  # AlignPropTrainer.calculate_loss
        return out.images.detach(), r.detach(), [p.grad.clone() for p in t_params] if grad else None

    def rel(a, b):
        a, b = torch.cat([x.flatten() for x in a]), torch.cat([x.flatten() for x in b])
        return float((a - b).norm() / b.norm().clamp_min(1e-30))

    trainer.unet.eval(), sd.unet.eval()
    ei, er, _ = engine(n, False)
    ti, tr, _ = trl(n, False)
    rec = dict(resolution=spec["resolution"], N=n, images_max_abs_diff=float((ei - ti).abs().max()),
               images_range=[float(ti.min()), float(ti.max())], reward_engine=er.tolist(), reward_trl=tr.tolist(),
               trl_version=version, trl_import=how)
    trainer.unet.train(), sd.unet.train()
    grads = {}
    for k, label in ((n, "full"), (1, "1")):
        _, _, eg = engine(k, True)
        _, _, tg = trl(k, True)
        grads[label] = eg
        rec[f"grad_rel_diff_K{label}"] = rel(eg, tg)
        rec[f"grad_norm_K{label}"] = float(torch.cat([x.flatten() for x in tg]).norm())
    rec["grad_rel_diff_Kfull_vs_K1"] = rel(grads["full"], grads["1"])  # the truncation matters
    return rec


WORKERS = {"engine": engine_worker, "trl": trl_worker, "check": check_worker, "paired": paired_worker}


# ------------------------------------------------------------------ the driver

def planned_mb(base: dict, K: str, recompute: str, budget_bytes: int | None) -> float:
    """The engine's planner (refl_engine.memory.planner, traced without weights): peak tensor bytes
    of one step under `recompute` (auto: the plan that fits `budget_bytes`), in MiB."""
    from refl_engine.memory.planner import Planner, PlanSpec

    spec = PlanSpec(model=base["model"], resolution=base["resolution"], batch_size=base["batch"], method="draft",
                    K=K, num_inference_steps=base["N"], guidance_scale=base["guidance_scale"], rank=LORA_RANK,
                    mixed_precision="no", optimizer="adamw", recompute=recompute, reward=REWARD, reserve_gb=0.0,
                    budget_gb=budget_bytes / 2**30 if budget_bytes else None)
    return Planner(spec).plan().peak_bytes / MiB


def mem_available_mb() -> float | None:
    try:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def run_worker(spec: dict, timeout: float, mmap_threshold: int = 0) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f"timed out after {timeout:.0f} s")
    line = next((ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT ")), None)
    if line is None:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
        print(proc.stderr[-3000:], file=sys.stderr)
        return dict(error=tail[0][:300])
    rec = json.loads(line[len("RESULT "):])
    rec["process_wall_s"] = time.perf_counter() - t0
    return rec


def done(rec: dict) -> str:
    return rec["error"] if "error" in rec else f"{rec['process_wall_s']:.0f} s"


def size(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 10240 else f"{mb:.0f} MiB"


def fmt(x, spec=".3f", width=8):
    return f"{'-':>{width}}" if x is None else f"{x:>{width}{spec}}"


def trl_of(rows: list[dict], r: dict) -> dict | None:
    """The TRL row of r's K and round, if it measured."""
    return next((t for t in rows if t["side"] == "trl" and t["K"] == r["K"] and t["round"] == r["round"]
                 and "error" not in t), None)


def paired_ratios(rows: list[dict]) -> list[dict]:
    """Per (engine config, K): its step time and peak RSS delta over TRL's of the same round, for
    every round both measured; the median, and in how many rounds the engine was faster."""
    out = {}
    for r in rows:
        if r["side"] != "engine" or "error" in r:
            continue
        ref = trl_of(rows, r)
        if ref is None or ref["peak_delta_mb"] <= 0:
            continue
        p = out.setdefault((r["config"], r["K"]), dict(config=r["config"], K=r["K"], time=[], rss=[]))
        p["time"].append(r["cpu_s"] / ref["cpu_s"])
        p["rss"].append(r["peak_delta_mb"] / ref["peak_delta_mb"])
    for p in out.values():
        p.update(time_median=statistics.median(p["time"]), rss_median=statistics.median(p["rss"]),
                 faster=sum(t < 1 for t in p["time"]))
    return list(out.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-sd", help="a preset or diffusers SD1.5-type directory (both sides load it)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--num_inference_steps", type=int, default=20)
    p.add_argument("--guidance_scale", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up step)")
    p.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in rounds (TRL "
                   "first in odd rounds, last in even ones), and report each engine row's per-round time ratio to "
                   "that round's TRL: pairs taken minutes apart cancel the machine's slow drift")
    p.add_argument("--paired", type=int, default=0, help="instead of separate processes: TRL and every engine "
                   "policy trained in one process, steps alternated, this many pairs; prints each engine policy's "
                   "per-pair time ratio to TRL (time only: the RSS comparison needs separate processes)")
    p.add_argument("--K", default="full,1", help="comma-separated windows: full and/or integers")
    p.add_argument("--policies", default=",".join(POLICIES) + ",auto@trl",
                   help="engine --recompute values; auto@trl = auto with --memory_budget = TRL's peak delta")
    p.add_argument("--kernels", default="torch", help="the engine's --kernels")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke test: 64 px, N = 4, one timed step")
    p.add_argument("--no_check", action="store_true", help="skip the agreement check")
    p.add_argument("--malloc_mmap_threshold", type=int, default=0,
                   help="bytes: set glibc's MALLOC_MMAP_THRESHOLD_ in every worker, so larger blocks are mmapped "
                   "and returned on free; RSS then follows the live tensors (default 0: the allocator as it is)")
    p.add_argument("--max_memory", default="", help="skip an engine configuration whose planner-predicted peak "
                   "times --rss_factor exceeds this (a size, e.g. 20GB; default: 90%% of MemAvailable at start)")
    p.add_argument("--rss_factor", type=float, default=0.0, help="RSS per planned tensor byte for that guard "
                   "(default 2.0, or 1.15 with --malloc_mmap_threshold: measured on tiny-sd at 64-128 px)")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per configuration")
    p.add_argument("--json", default=None, help="default: benchmarks/results/trl_compare-<model>-cpu.json "
                   "(-quick with --quick)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # inside a subprocess
        spec = json.loads(args.worker)
        print("RESULT " + json.dumps(WORKERS[spec["role"]](spec)), flush=True)
        return 0

    try:
        _, _, _, trl_version, trl_how = import_trl()
    except TRLMissing as e:
        sys.exit(f"trl_compare: TRL's AlignPropTrainer is not importable ({e}); install it beside the venv with: "
                 f"{INSTALL}")
    if args.quick:
        args.resolution, args.num_inference_steps, args.steps = 64, 4, 1
    import torch

    from refl_engine.models.load import resolve_model

    model_dir = resolve_model(args.model)  # builds the preset once, before the workers
    base = dict(model=model_dir, resolution=args.resolution, N=args.num_inference_steps,
                guidance_scale=args.guidance_scale, eta=args.eta, batch=args.batch, steps=args.steps,
                threads=args.threads, kernels=args.kernels)
    Ks = [k.strip() for k in args.K.split(",") if k.strip()]
    policies = [q.strip() for q in args.policies.split(",") if q.strip()]
    load_before = os.getloadavg()
    print(f"{args.model} ({model_dir}), {args.resolution} px, N = {args.num_inference_steps}, batch {args.batch}, "
          f"CFG {args.guidance_scale:g}, eta {args.eta:g}, LoRA rank {LORA_RANK}, reward {REWARD}, "
          f"{args.threads} thread(s), {args.steps} timed step(s) after 1 warm-up; trl {trl_version}", flush=True)

    mmap = args.malloc_mmap_threshold
    rss_factor = args.rss_factor or (1.15 if mmap else 2.0)
    available = mem_available_mb()
    if args.max_memory:
        from refl_engine.config import parse_memory

        max_mb = parse_memory(args.max_memory, "--max_memory") / MiB
    else:
        max_mb = 0.9 * available if available else None
    from refl_engine.memory.recompute import device_budget

    auto_budget = device_budget("cpu")[0]  # what `auto` without --memory_budget takes (in each worker: anew)
    check = None
    if not args.no_check:
        check = run_worker(dict(base, role="check", resolution=min(args.resolution, 64)), args.timeout, mmap)
        if "error" in check:
            print(f"check: failed: {check['error']}")
        else:
            print(f"check at {check['resolution']} px, N = {check['N']}: no-grad images differ by at most "
                  f"{check['images_max_abs_diff']:.2e} (images in [{check['images_range'][0]:.3f}, "
                  f"{check['images_range'][1]:.3f}]); LoRA gradients' relative difference K=full "
                  f"{check['grad_rel_diff_Kfull']:.2e}, K=1 {check['grad_rel_diff_K1']:.2e} (K=full vs K=1 "
                  f"{check['grad_rel_diff_Kfull_vs_K1']:.2f})", flush=True)

    if args.paired:
        return run_paired(args, base, Ks, policies, mmap, check, dict(
            device=f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
            torch=torch.__version__, trl=trl_version, trl_import=trl_how, model=args.model, model_dir=model_dir,
            load_before=load_before))

    rows = []

    def run_engine(K: str, q: str, budget_mb: float | None, rnd: int) -> None:
        spec = dict(base, role="engine", K=K, recompute=q.split("@")[0])
        if q == "auto@trl":
            if budget_mb is None:
                rows.append(dict(side="engine", config=f"engine {q}", K=K, round=rnd, error="no TRL measurement"))
                return
            spec["budget"] = str(int(budget_mb * MiB))
        row = dict(side="engine", config=f"engine {q}", K=K, round=rnd, recompute=spec["recompute"],
                   memory_budget=spec.get("budget", ""))
        try:
            budget = int(spec["budget"]) if spec.get("budget") else auto_budget
            row["planned_mb"] = planned_mb(base, K, spec["recompute"], budget)
        except Exception as e:  # noqa: BLE001 - a prediction only guards; run anyway
            print(f"  planner failed for engine {q} K={K} ({type(e).__name__}: {e}); not guarded",
                  file=sys.stderr)
        if max_mb and row.get("planned_mb") and row["planned_mb"] * rss_factor > max_mb:
            row["error"] = (f"skipped: planned {size(row['planned_mb'])} of tensors x {rss_factor:g} "
                            f"> --max_memory {size(max_mb)} (raise --max_memory to run it)")
            rows.append(row)
            print(f"  engine {q} K={K}: {row['error']}", file=sys.stderr, flush=True)
            return
        rec = run_worker(spec, args.timeout, mmap)
        rows.append(dict(row, **rec))
        print(f"  done engine {q} K={K}, round {rnd} ({done(rec)})", file=sys.stderr, flush=True)

    for K in Ks:
        trl_budget = None  # auto@trl's budget: the first round's TRL peak delta, the same in every round
        for rnd in range(1, args.rounds + 1):
            trl_last = rnd % 2 == 0 and trl_budget is not None
            if trl_last:
                for q in policies:
                    run_engine(K, q, trl_budget, rnd)
            trl = run_worker(dict(base, role="trl", K=K), args.timeout, mmap)
            rows.append(dict(side="trl", config="trl alignprop", K=K, round=rnd, **trl))
            print(f"  done trl K={K}, round {rnd} ({done(trl)})", file=sys.stderr, flush=True)
            if trl_budget is None and "error" not in trl:
                trl_budget = trl["peak_delta_mb"]
            if not trl_last:
                for q in policies:
                    run_engine(K, q, trl_budget, rnd)
    load_after = os.getloadavg()

    print(f"\n{'config':20} {'K':>4} {'rnd':>3} {'step cpu s':>10} {'x TRL':>6} {'peak dMB':>9} {'x TRL':>6} "
          f"{'timed dMB':>9} {'peak MB':>8} {'plan MB':>8}  auto plan")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:20} {r['K']:>4} {r['round']:>3}  error: {r['error']}")
            continue
        ref = trl_of(rows, r)
        rt = r["cpu_s"] / ref["cpu_s"] if ref else None
        rm = r["peak_delta_mb"] / ref["peak_delta_mb"] if ref and ref["peak_delta_mb"] > 0 else None
        plan = r.get("auto_plan")
        plan_s = (f"{plan['counts']} chunk {plan['chunk']} ckpt decode/reward {int(plan['checkpoint_decode'])}/"
                  f"{int(plan['checkpoint_reward'])}, budget {plan['budget_mb']:.0f} MB") if plan else ""
        print(f"{r['config']:20} {r['K']:>4} {r['round']:>3} {r['cpu_s']:>10.3f} {fmt(rt, '.2f', 6)} {r['peak_delta_mb']:>9.1f} "
              f"{fmt(rm, '.2f', 6)} {fmt(r['timed_peak_delta_mb'], '.1f', 9)} {r['peak_mb']:>8.1f} "
              f"{fmt(r.get('planned_mb'), '.1f', 8)}  {plan_s}")
    paired = paired_ratios(rows) if args.rounds > 1 else []
    if paired:
        print(f"\nPaired by round ({args.rounds} rounds): each engine row's step time and peak dMB over the same "
              "round's TRL")
        print(f"{'config':20} {'K':>4} {'time x TRL: median':>19} {'min':>5} {'max':>5} {'faster in':>9}  "
              f"{'RSS x TRL: median':>17} {'max':>5}")
        for p in paired:
            print(f"{p['config']:20} {p['K']:>4} {p['time_median']:>19.3f} {min(p['time']):>5.2f} {max(p['time']):>5.2f} "
                  f"{p['faster']:>4}/{len(p['time']):<4}  {p['rss_median']:>17.2f} {max(p['rss']):>5.2f}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs; "
          f"MALLOC_MMAP_THRESHOLD_ {mmap or os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")

    import accelerate
    import diffusers
    import peft
    import transformers

    record = dict(device=f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads)",
                  torch=torch.__version__, diffusers=diffusers.__version__, transformers=transformers.__version__,
                  peft=peft.__version__, accelerate=accelerate.__version__, trl=trl_version, trl_import=trl_how,
                  python=sys.version.split()[0], model=args.model, model_dir=model_dir, resolution=args.resolution,
                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, eta=args.eta,
                  batch=args.batch, steps=args.steps, rank=LORA_RANK, reward=REWARD, kernels=args.kernels,
                  threads=args.threads, quick=args.quick, timing="process CPU time, median of the timed steps",
                  memory="ru_maxrss after the steps (peak counter reset before the first step) minus VmRSS before it",
                  malloc_mmap_threshold=mmap or os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                  mem_available_mb=available, max_memory_mb=max_mb, rss_factor=rss_factor,
                  auto_budget_mb=auto_budget / MiB, load_before=load_before, load_after=load_after, check=check,
                  rounds=args.rounds, paired=paired, rows=rows)
    if args.json is None:
        args.json = f"benchmarks/results/trl_compare-{Path(args.model).name}-cpu{'-quick' if args.quick else ''}.json"
    write_record(args.json, record)
    return 0


def paired_summary(steps: dict) -> list[dict]:
    """Per engine policy of a paired run: its step time over TRL's in the same pair (user + system
    CPU time, and user time alone), the median and quartiles, and in how many pairs it was faster;
    per side the median system seconds and minor page faults of a step."""
    def total(t):
        return t["user"] + t["sys"]

    def quartiles(xs):
        q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
        return q[0], q[2]

    trl = steps["trl alignprop"]
    out = []
    for name, ts in steps.items():
        row = dict(config=name, cpu_s_median=statistics.median(map(total, ts)),
                   sys_s_median=statistics.median(t["sys"] for t in ts),
                   minflt_median=statistics.median(t["minflt"] for t in ts))
        if name != "trl alignprop":
            ratio = [total(a) / total(b) for a, b in zip(ts, trl)]
            user = [a["user"] / b["user"] for a, b in zip(ts, trl)]
            row.update(ratios=ratio, ratio_median=statistics.median(ratio), ratio_quartiles=quartiles(ratio),
                       faster=sum(r < 1 for r in ratio), user_ratio_median=statistics.median(user))
        out.append(row)
    return out


def run_paired(args, base: dict, Ks: list[str], policies: list[str], mmap: int, check, record: dict) -> int:
    """`--paired`: one process per K, TRL and the engine policies alternated in it (paired_worker)."""
    runs = []
    for K in Ks:
        spec = dict(base, role="paired", K=K, policies=policies, pairs=args.paired)
        rec = run_worker(spec, args.timeout, mmap)
        if "error" in rec:
            print(f"paired K={K}: failed: {rec['error']}")
            runs.append(dict(K=K, error=rec["error"]))
            continue
        summary = paired_summary(rec["steps"])
        runs.append(dict(K=K, summary=summary, **rec))
        print(f"\nK={K}: {args.paired} pairs in one process (TRL first in odd pairs, last in even ones); step CPU "
              f"time (user + system); auto@trl's budget: TRL's step, {rec['trl_budget_mb']:.0f} MiB of RSS")
        print(f"{'config':20} {'cpu s':>7} {'sys s':>6} {'minflt':>8}  {'x TRL: median':>13} {'quartiles':>11} "
              f"{'faster in':>9} {'user x TRL':>10}  plan")
        for r in summary:
            plan = rec["plans"].get(r["config"])
            plan_s = (f"{plan['counts']}, {plan['allocator']} heap, {plan['planned_peak_mb']:.0f} of "
                      f"{plan['budget_mb']:.0f} MiB" if plan else "")
            if "ratios" in r:
                q1, q3 = r["ratio_quartiles"]
                cmp = (f"{r['ratio_median']:>13.3f} {q1:>5.2f}-{q3:<5.2f} {r['faster']:>4}/{len(r['ratios']):<4} "
                       f"{r['user_ratio_median']:>10.3f}")
            else:
                cmp = f"{'':>13} {'':>11} {'':>9} {'':>10}"
            print(f"{r['config']:20} {r['cpu_s_median']:>7.2f} {r['sys_s_median']:>6.2f} "
                  f"{r['minflt_median']:>8.0f}  {cmp}  {plan_s}")
    record.update(resolution=args.resolution, num_inference_steps=args.num_inference_steps,
                  guidance_scale=args.guidance_scale, eta=args.eta, batch=args.batch, rank=LORA_RANK, reward=REWARD,
                  kernels=args.kernels, threads=args.threads, pairs=args.paired, check=check,
                  malloc_mmap_threshold=mmap or os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                  timing="process CPU time (user + system) per step, TRL and the engine alternated in one process",
                  load_after=os.getloadavg(), runs=runs)
    if args.json is None:
        args.json = f"benchmarks/results/trl_compare-{Path(args.model).name}-cpu-paired.json"
    write_record(args.json, record)
    return 0


def write_record(path: str | None, record: dict) -> None:
    """The run's JSON at `path` (none when empty), its directory made."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2))
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())

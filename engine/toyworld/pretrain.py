"""Pretrain the embedded default model on the captioned-shapes world, on CPU.

    python -m refl_engine.toyworld.pretrain --out engine/toyworld/pipeline --checkpoint-dir ckpt

Starts from the tiny-sd preset's VAE (`build_tiny_sd(seed)`: same config, same seeded weights),
a seeded UNet of the toy world's own config (`unet_config()`: the preset's, one level deeper) with
the toy world's schedule (`scheduler_config()`), and the world's tokenizer (the preset's words
plus the position words) with a seeded CLIP text encoder of the preset's config over it, and trains
  (a) the AutoencoderKL: L1 + MSE reconstruction plus a small KL term; afterwards the latent std
      is measured and stored as the VAE's `scaling_factor`, so `latents * scaling_factor` has
      roughly unit std, the convention the trainer relies on (it divides by it before decode);
  (b) the UNet2DConditionModel and the text encoder jointly: v-prediction on SD1.5's scaled
      linear betas rescaled to zero terminal SNR, loss weighted by min-SNR-5 in the clean image
      (floored at SNR 1, so the noisiest steps count), 10% empty-prompt dropout for classifier-free
      guidance, an EMA of both models' weights (the EMA is what is saved). A frozen random text
      encoder carries too little of the caption for the UNet to follow it (an earlier shipped
      model's samples did not depend on the prompt); trained jointly, its states name the shape,
      color, background and position.
Why this UNet and schedule: the caption's position was ignored by a model trained on the
preset's 2-level UNet with epsilon prediction and SD1.5's schedule (cell accuracy at chance).
Two causes, each measured: (1) with a nonzero terminal SNR and "leading" timesteps, every
training x_t still shows where the shape is, so the model learns to place it where the noise
suggests, and at sampling time the first x_t is pure noise; zero terminal SNR with v-prediction
(the x0 target at t = T) and "trailing" timesteps make the first step start from the noise the
model was trained on, where only the caption can tell the position. (2) Given pure noise and the
caption, regressing the clean latent of a one-shape position-only world, the preset's UNet (16x16
and 8x8 levels) stayed at chance cell accuracy for 1500 steps, while the same UNet one level
deeper (a 4x4 level, where the zero padding tells every cell apart) reached 0.89 in 400 steps.
Then writes the pipeline with `save_pipeline_dir` (fp32 safetensors), a `pretrain_log.json`
with the settings, losses, wall and CPU times, and optionally a PNG grid of DDIM samples.
With --checkpoint-dir the VAE and the full UNet-stage state are kept there and a restarted run
resumes from them; --stop-after ends the UNet stage early as the first steps of the full run.
--procs N (default 2) runs the UNet stage data parallel over N one-thread processes (torch DDP
over gloo): every rank draws the same global batch and computes its slice, so the steps are the
one-process steps on the same samples. The shipped model's batch of 32 on both cores is what made
it follow the caption's column (an earlier model at batch 16 on one core, after 4000 steps, did not).
The autoencoder's 1400 steps are what keep the caption's color and shape in the latents: the
reconstructions of the 350-step one shipped before kept the color of 68% and the shape of 84% of
the prompt set's scenes as the classifier reads them (1.0 and 1.0 at 1400 steps).

Everything is seeded. Bitwise reproducibility holds for a fixed thread and process count on the
same machine (oneDNN kernels and the gradient all-reduce may sum in another order with other
counts). The UNet stage runs as two processes of one thread each: on a shared 2-core machine two
OpenMP threads in one process ran each step 2-4x slower than one thread, because each barrier
waits for a descheduled sibling thread, while two processes of one thread each keep both cores
busy (batch 32 split 16 + 16 took about 1.2x the time of one process's batch-16 step). The VAE
stage runs in this process on --threads 2 (210 s for its 1400 steps with the machine to itself).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.load import build_tiny_sd, clip_text_config, save_pipeline_dir, tiny_sd_configs
from . import world


# ---------------------------------------------------------------- the model's configs

def unet_config() -> dict:
    """The toy world's UNet: the tiny-sd preset's, with a third level (16x16, 8x8, 4x4 latents at
    32 px; cross-attention at 16x16 and 8x8 and in the 4x4 middle block)."""
    cfg = dict(tiny_sd_configs()["unet"])
    cfg.update(block_out_channels=(32, 64, 64),
               down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return cfg


def scheduler_config() -> dict:
    """The toy world's schedule: SD1.5's betas rescaled to zero terminal SNR, v-prediction, and
    "trailing" inference timesteps (the first step is t = T, pure noise)."""
    return dict(tiny_sd_configs()["scheduler"], prediction_type="v_prediction", rescale_betas_zero_snr=True,
                timestep_spacing="trailing")


def loss_weights(alphas_cumprod: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Per-timestep weight of the v-prediction MSE: min-SNR-gamma in the clean image, floored at
    SNR 1. The v error is the x0 error times sqrt(SNR + 1), so the weight on the v MSE is
    clamp(SNR, 1, gamma) / (SNR + 1): about 1 (the x0 error as it is) at the noisiest steps, where
    the caption decides the picture, and gamma / (SNR + 1) at the clean end."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, min=1.0, max=snr_gamma) / (snr + 1)


def v_target(z0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x0, what a v-prediction UNet outputs for x_t = sqrt(a) x0 + sqrt(1 - a) eps."""
    return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * z0


# ---------------------------------------------------------------- helpers

@torch.no_grad()
def encode_texts(tokenizer, text_encoder, captions: list[str], batch: int = 256) -> torch.Tensor:
    """(N, 77, D) last hidden states, as the engine's TextEncoderCache computes them."""
    out = []
    for i in range(0, len(captions), batch):
        ids = tokenizer(captions[i:i + batch], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def to_model_range(images01: torch.Tensor) -> torch.Tensor:
    return images01 * 2 - 1


# ---------------------------------------------------------------- (a) the autoencoder

def train_vae(vae, steps: int, batch: int, lr: float, kl_weight: float, seed: int, progress: bool) -> dict:
    from tqdm import tqdm

    # Start the posterior narrow (std ~0.05, not ~1): with a small KL weight the encoder would
    # otherwise spend most of a short run shrinking the noise that drowns its means.
    with torch.no_grad():
        vae.quant_conv.bias[vae.config.latent_channels:] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    gen = torch.Generator().manual_seed(seed)
    log = []
    bar = tqdm(range(steps), desc="vae", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        x = to_model_range(world.generate(batch, seed=seed * 1_000_003 + step)[0])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element
        loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        l1, mse, kl = l1.item(), mse.item(), kl.item()
        log.append(dict(step=step, l1=l1, mse=mse, kl=kl))
        bar.set_postfix(l1=f"{l1:.4f}", mse=f"{mse:.5f}", kl=f"{kl:.2f}")
    vae.eval()
    return dict(log=log)


@torch.no_grad()
def encode_pool(vae, n: int, seed: int, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Render n images and encode them: latent posterior mean and std (unscaled), captions."""
    means, stds, captions = [], [], []
    for i in range(0, n, chunk):
        images, caps, _ = world.generate(min(chunk, n - i), seed=seed * 1_000_003 + 7_919 + i)
        post = vae.encode(to_model_range(images)).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        captions += caps
    return torch.cat(means), torch.cat(stds), captions


# ---------------------------------------------------------------- (b) the UNet and the text encoder

def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """(N, 77) input ids, padded as the pipelines pad them."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_unet(unet, text_encoder, pool_mean, pool_std, pool_text_idx, token_table, empty_idx: int,
               scheduler_cfg: dict, scaling: float, steps: int, batch: int, lr: float, ema_decay: float,
               cfg_dropout: float, snr_gamma: float, high_noise_fraction: float,
               cross_attn_lr_mult: float, text_lr_mult: float, seed: int, progress: bool,
               checkpoint: Path | None = None, checkpoint_every: int = 200, log_file: Path | None = None,
               stop_after: int | None = None, rank: int = 0, world_size: int = 1):
    """v-prediction training of the UNet and, jointly, the text encoder (the caption reaches
    the UNet only through it, so its gradient is what teaches the states to name color, shape and
    position). Returns the EMA weights of both and the loss log. With `checkpoint`, the full state
    (weights, EMA, optimizer, generator, log) is written every `checkpoint_every` steps and a run
    restarts from it bitwise where it stopped. `stop_after` ends the run early at that step (the
    learning-rate schedule still spans `steps`), as the first `stop_after` steps of the full run.

    Data parallel with `world_size` > 1 (called on every rank of an initialized process group):
    every rank draws the same global batch of `batch` from the same generator and computes its
    own `batch // world_size` slice of it, and torch's DistributedDataParallel averages the
    gradients, so each step is the one-process step on the same samples (the sum in another order).
    Only rank 0 writes the checkpoint and the log."""
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    if batch % world_size:
        raise ValueError(f"the UNet batch ({batch}) must split evenly over {world_size} processes")
    lo, hi = rank * batch // world_size, (rank + 1) * batch // world_size
    lead = rank == 0

    sched = DDPMScheduler(**{k: v for k, v in scheduler_cfg.items()
                             if k not in ("set_alpha_to_one", "steps_offset", "timestep_spacing")})
    if sched.config.prediction_type != "v_prediction":
        raise ValueError(f"train_unet trains v-prediction; the schedule says {sched.config.prediction_type!r}")
    abar = sched.alphas_cumprod.float()
    weight = loss_weights(abar, snr_gamma)
    T = len(abar)

    models = dict(unet=unet, text_encoder=text_encoder)
    ema = {m: {k: v.detach().clone() for k, v in mod.state_dict().items()} for m, mod in models.items()}
    # Cross-attention learns to read the caption slowly from a random start (attention is spread
    # evenly over 77 mostly-padding tokens); a larger step size there speeds that up. The text
    # encoder, a transformer, takes a smaller one.
    cross = [p for n, p in unet.named_parameters() if ".attn2." in n]
    rest = [p for n, p in unet.named_parameters() if ".attn2." not in n]
    opt = torch.optim.AdamW([dict(params=rest, mult=1.0), dict(params=cross, mult=cross_attn_lr_mult),
                             dict(params=list(text_encoder.parameters()), mult=text_lr_mult)],
                            lr=lr, weight_decay=0.01, foreach=True)
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(seed + 1)
    log, first, seconds = [], 0, 0.0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        for m, mod in models.items():
            mod.load_state_dict(state[m])
        ema, log, first, seconds = state["ema"], state["log"], state["step"], state["seconds"]
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        print(f"resumed from {checkpoint} at step {first}", flush=True)
    t_run = time.time() - seconds
    last = steps if stop_after is None else min(steps, stop_after)
    unet_step, text_step = unet, text_encoder
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        unet_step, text_step = DDP(unet), DDP(text_encoder)
    bar = tqdm(range(first, last), desc="unet", disable=not (progress and lead), dynamic_ncols=True, initial=first,
               total=last)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = g["mult"] * lr_at(step, steps, lr, warmup=max(1, steps // 20))
        idx = torch.randint(len(pool_mean), (batch,), generator=gen)
        z0 = (pool_mean[idx] + pool_std[idx] * torch.randn(pool_mean[idx].shape, generator=gen)) * scaling
        text = pool_text_idx[idx].clone()
        text[torch.rand(batch, generator=gen) < cfg_dropout] = empty_idx
        # Half the batch from the noisier 60% of the schedule, where the caption decides the picture
        # (colors, layout): it speeds up learning the conditioning in a short run.
        t = torch.randint(T, (batch,), generator=gen)
        high = torch.randint(int(T * 0.4), T, (batch,), generator=gen)
        t = torch.where(torch.rand(batch, generator=gen) < high_noise_fraction, high, t)
        noise = torch.randn(z0.shape, generator=gen)
        if world_size > 1:  # this rank's slice of the global batch
            z0, text, t, noise = z0[lo:hi], text[lo:hi], t[lo:hi], noise[lo:hi]
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        # each distinct caption of the batch through the text encoder once
        unique, inverse = torch.unique(text, return_inverse=True)
        states = text_step(token_table[unique])[0][inverse]
        pred = unet_step(zt, t, encoder_hidden_states=states).sample
        per = (pred - v_target(z0, noise, a)).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: the gradients averaged over the ranks
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, mod in models.items():
                pairs = [(ema[m][k], v) for k, v in mod.state_dict().items()]
                floats = [(e, v) for e, v in pairs if v.dtype.is_floating_point]
                torch._foreach_lerp_([e for e, _ in floats], [v for _, v in floats], 1 - d)
                for e, v in pairs:
                    if not v.dtype.is_floating_point:
                        e.copy_(v)
        stats = torch.stack([loss.detach(), per.detach().mean()])
        if world_size > 1:  # the global batch's loss, as one process would log it
            torch.distributed.all_reduce(stats)
            stats /= world_size
        loss, mse = stats.tolist()
        log.append(dict(step=step, loss=loss, mse=mse))
        bar.set_postfix(loss=f"{loss:.4f}", mse=f"{mse:.4f}")
        done = step + 1
        if not lead:
            continue
        if log_file is not None and (done % 50 == 0 or done == steps):
            tail = log[-50:]
            with open(log_file, "a") as f:
                f.write(f"step {done}/{steps} loss {np.mean([r['loss'] for r in tail]):.4f} "
                        f"mse {np.mean([r['mse'] for r in tail]):.4f} {time.time() - t_run:.0f}s\n")
        if checkpoint is not None and (done % checkpoint_every == 0 or done == last):
            _save_atomic(dict(step=done, seconds=time.time() - t_run, log=log, ema=ema, opt=opt.state_dict(),
                              gen=gen.get_state(), **{m: mod.state_dict() for m, mod in models.items()}),
                         checkpoint)
    unet.eval()
    text_encoder.eval()
    return ema, dict(log=log)


def _children_cpu() -> float:
    """CPU seconds of this process's waited-for child processes (the data-parallel workers)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _unet_worker(rank: int, world_size: int, init_file: str, seed: int, start: dict, kwargs: dict,
                 result: str) -> None:
    """One rank of `train_unet_parallel`: the UNet and text encoder of `build_parts(seed)` with
    the parent's weights `start` loaded, and its slice of every batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        parts = build_parts(seed)
        for m, state in start.items():
            parts[m].load_state_dict(state)
        ema, info = train_unet(parts["unet"], parts["text_encoder"], seed=seed, rank=rank, world_size=world_size,
                               **kwargs)
        if rank == 0:
            _save_atomic(dict(ema=ema, info=info), Path(result))
    finally:
        dist.destroy_process_group()


def train_unet_parallel(procs: int, unet, text_encoder, seed: int, **kwargs):
    """`train_unet(unet, text_encoder, seed=seed, **kwargs)` data parallel over `procs` CPU
    processes (gloo), one thread each, starting from these models' weights: the same steps on the
    same samples as one process, each step's batch split over the processes. Returns what
    `train_unet` returns (rank 0's; the same on every rank). The models passed are not trained."""
    import tempfile

    import torch.multiprocessing as mp

    start = dict(unet=unet.state_dict(), text_encoder=text_encoder.state_dict())
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_unet_worker, args=(procs, os.path.join(tmp, "pg"), seed, start, kwargs, result), nprocs=procs,
                 join=True)
        out = torch.load(result, weights_only=False)
    return out["ema"], out["info"]


# ---------------------------------------------------------------- sampling (for the check grid)

@torch.no_grad()
def ddim_samples(unet, vae, text_table_cond, text_uncond, scheduler_cfg: dict, steps: int = 20,
                 guidance: float = 4.0, seed: int = 0) -> torch.Tensor:
    """Images in [0, 1] from DDIM with classifier-free guidance (diffusers' DDIMScheduler)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**scheduler_cfg)
    sched.set_timesteps(steps)
    n = len(text_table_cond)
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn((n, unet.config.in_channels, size, size), generator=g)
    states = torch.cat([text_uncond.expand(n, -1, -1), text_table_cond])
    for t in sched.timesteps:
        eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=states).sample.chunk(2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def save_png_grid(images: torch.Tensor, path: Path, cols: int, scale: int = 4) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    rows = math.ceil(n / cols)
    grid = torch.ones(rows * (h + 2), cols * (w + 2), 3)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, q * (w + 2) + 1:q * (w + 2) + 1 + w] = images[i].permute(1, 2, 0)
    arr = (grid.numpy() * 255).round().astype(np.uint8)
    Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST).save(path)


SAMPLE_CAPTIONS = [f"{world.article(c)} {c} {s}{w} on {world.article(b)} {b} background" for c, s, w, b in [
    ("red", "circle", "", "blue"), ("yellow", "star", " in the top left", "purple"),
    ("white", "square", " on the right", "black"), ("green", "triangle", " at the bottom", "pink"),
    ("blue", "ring", " in the center", "orange"), ("black", "circle", " in the bottom right", "white"),
    ("orange", "square", "", "green"), ("pink", "star", " at the top", "gray")]] + [
    "a painting of a sky with a red circle", "a painting of a night with a yellow star on the left"]


# ---------------------------------------------------------------- main

def build_parts(seed: int) -> dict:
    """The tiny-sd preset's VAE (`build_tiny_sd(seed)`, same config and seeded weights), a seeded
    UNet of `unet_config()`, a DDIMScheduler of `scheduler_config()`, the world's tokenizer (the
    preset's words plus the position words) and a seeded CLIP text encoder of the preset's config
    over that vocabulary."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    parts = build_tiny_sd(seed)
    tokenizer = world.tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        parts["text_encoder"] = CLIPTextModel(clip_text_config(tiny_sd_configs()["text_encoder"], tokenizer))
        torch.manual_seed(seed + 4)
        parts["unet"] = UNet2DConditionModel(**unet_config())
    parts["scheduler"] = DDIMScheduler(**scheduler_config())
    parts["tokenizer"] = tokenizer
    return parts


def pretrain(out: Path, seed: int = 0, vae_steps: int = 1400, vae_batch: int = 16, vae_lr: float = 3e-3,
             kl_weight: float = 1e-4, pool: int = 8192, unet_steps: int = 3000, unet_batch: int = 32,
             unet_lr: float = 1e-3, ema_decay: float = 0.995, cfg_dropout: float = 0.1, snr_gamma: float = 5.0,
             high_noise_fraction: float = 0.5, cross_attn_lr_mult: float = 3.0,
             text_lr_mult: float = 0.5, threads: int = 2, procs: int = 2, samples: Path | None = None,
             checkpoint_dir: Path | None = None, checkpoint_every: int = 200, log_file: Path | None = None,
             stop_after: int | None = None, progress: bool = True) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    t_start, cpu_start = time.time(), time.process_time()
    children_start = _children_cpu()
    parts = build_parts(seed)
    unet, vae, text_encoder, tokenizer = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
    sched_cfg = scheduler_config()
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)

    def note(msg: str) -> None:
        if log_file is not None:
            with open(log_file, "a") as f:
                f.write(msg + "\n")

    # (a) autoencoder (or its checkpoint)
    t0 = time.time()
    vae_ckpt = None if checkpoint_dir is None else checkpoint_dir / "vae.pt"
    if vae_ckpt is not None and vae_ckpt.is_file():
        state = torch.load(vae_ckpt, weights_only=False)
        vae.load_state_dict(state["vae"])
        vae_info, t_vae = state["info"], state["seconds"]
        vae.eval()
    else:
        vae_info = train_vae(vae, vae_steps, vae_batch, vae_lr, kl_weight, seed, progress)
        t_vae = time.time() - t0
        if vae_ckpt is not None:
            _save_atomic(dict(vae=vae.state_dict(), info=vae_info, seconds=t_vae), vae_ckpt)
    vae.requires_grad_(False)
    note(f"vae done: {t_vae:.0f}s")

    # latent statistics -> scaling factor; the UNet's training pool
    t0 = time.time()
    mean, std, captions = encode_pool(vae, pool, seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 2)
        sampled = mean + std * torch.randn(mean.shape, generator=g)
        scaling = float(1.0 / sampled.std())
        images, _, _ = world.generate(256, seed=seed * 1_000_003 + 999_983)
        x = to_model_range(images)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        heldout_mse = float(F.mse_loss(rec, x))
    vae.register_to_config(scaling_factor=scaling)
    vocab = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(vocab)}
    token_table = tokenize(tokenizer, vocab)
    text_idx = torch.tensor([index[c] for c in captions])
    t_pool = time.time() - t0
    note(f"pool done: {t_pool:.0f}s, {len(vocab) - 1} distinct captions")

    # (b) UNet and text encoder
    t0 = time.time()
    stage = dict(pool_mean=mean, pool_std=std, pool_text_idx=text_idx, token_table=token_table, empty_idx=index[""],
                 scheduler_cfg=sched_cfg, scaling=scaling, steps=unet_steps, batch=unet_batch, lr=unet_lr,
                 ema_decay=ema_decay, cfg_dropout=cfg_dropout, snr_gamma=snr_gamma,
                 high_noise_fraction=high_noise_fraction, cross_attn_lr_mult=cross_attn_lr_mult,
                 text_lr_mult=text_lr_mult, progress=progress,
                 checkpoint=None if checkpoint_dir is None else checkpoint_dir / "unet.pt",
                 checkpoint_every=checkpoint_every, log_file=log_file, stop_after=stop_after)
    if procs > 1:
        ema, unet_info = train_unet_parallel(procs, unet, text_encoder, seed, **stage)
    else:
        ema, unet_info = train_unet(unet, text_encoder, seed=seed, **stage)
    unet.load_state_dict(ema["unet"])
    text_encoder.load_state_dict(ema["text_encoder"])
    t_unet = time.time() - t0

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pipeline_dir(parts, out)
    wall, cpu = time.time() - t_start, time.process_time() - cpu_start
    cpu += _children_cpu() - children_start  # the UNet stage's worker processes, if any

    def tail(log, key, n=50):
        return float(np.mean([r[key] for r in log[-n:]]))

    report = dict(
        seed=seed, threads=threads, procs=procs, wall_seconds=round(wall, 1),
        # this process's CPU time (a resumed run's CPU time since it resumed): on a shared machine
        # the wall time is longer
        cpu_seconds=round(cpu, 1), vae_seconds=round(t_vae, 1),
        pool_seconds=round(t_pool, 1), unet_seconds=round(t_unet, 1),
        settings=dict(vae_steps=vae_steps, vae_batch=vae_batch, vae_lr=vae_lr, kl_weight=kl_weight, pool=pool,
                      unet_steps=unet_steps, stop_after=stop_after, unet_steps_run=len(unet_info["log"]),
                      unet_batch=unet_batch, unet_lr=unet_lr, ema_decay=ema_decay,
                      cfg_dropout=cfg_dropout, snr_gamma=snr_gamma, high_noise_fraction=high_noise_fraction,
                      cross_attn_lr_mult=cross_attn_lr_mult,
                      text_lr_mult=text_lr_mult, text_encoder="trained jointly with the UNet"),
        vae_final=dict(l1=tail(vae_info["log"], "l1"), mse=tail(vae_info["log"], "mse"),
                       kl=tail(vae_info["log"], "kl"), heldout_mse=heldout_mse),
        scaling_factor=scaling,
        unet_final=dict(loss=tail(unet_info["log"], "loss"), mse=tail(unet_info["log"], "mse")),
        unet_first=dict(loss=float(np.mean([r["loss"] for r in unet_info["log"][:20]]))),
    )
    (out / "pretrain_log.json").write_text(json.dumps(report, indent=2))
    note(f"saved {out}: {wall:.0f}s")
    if samples is not None:
        with torch.no_grad():
            cond = text_encoder(tokenize(tokenizer, SAMPLE_CAPTIONS))[0]
            uncond = text_encoder(tokenize(tokenizer, [""]))[0]
        imgs = ddim_samples(unet, vae, cond.repeat_interleave(4, 0), uncond, sched_cfg, steps=20)
        save_png_grid(imgs, Path(samples), cols=8)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="pipeline directory to write (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1400,
                   help="the shipped model: 1400 (3.5 min on 2 threads); at 350 its reconstructions lost a sixth "
                        "of the shapes and a third of the colors the classifier reads on the real images")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--pool", type=int, default=8192, help="images rendered and encoded for the UNet stage")
    p.add_argument("--unet-steps", type=int, default=3000,
                   help="the shipped model: 3000 at batch 32 over 2 processes (24 min of both cores here; "
                        "28 min from scratch with the VAE stage)")
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--high-noise-fraction", type=float, default=0.5)
    p.add_argument("--cross-attn-lr-mult", type=float, default=3.0)
    p.add_argument("--text-lr-mult", type=float, default=0.5, help="text encoder learning rate / UNet's")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads of this process: the VAE stage, the latent pool, and the UNet stage "
                        "when --procs 1")
    p.add_argument("--procs", type=int, default=2,
                   help="run the UNet stage data parallel over this many processes of one thread each (gloo); "
                        "the same steps on the same samples, each batch split over them")
    p.add_argument("--samples", type=Path, default=None, help="also write a PNG grid of 20-step DDIM samples")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="keep the training state here and resume from it (a crash loses at most --checkpoint-every steps)")
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--log-file", type=Path, default=None, help="append progress lines to this file")
    p.add_argument("--stop-after", type=int, default=None,
                   help="end the UNet stage at this step (the schedule still spans --unet-steps)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    report = pretrain(a.out, seed=a.seed, vae_steps=a.vae_steps, vae_batch=a.vae_batch, vae_lr=a.vae_lr,
                      pool=a.pool, unet_steps=a.unet_steps, unet_batch=a.unet_batch, unet_lr=a.unet_lr,
                      ema_decay=a.ema_decay, high_noise_fraction=a.high_noise_fraction,
                      cross_attn_lr_mult=a.cross_attn_lr_mult,
                      text_lr_mult=a.text_lr_mult, threads=a.threads, procs=a.procs, samples=a.samples,
                      checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every, log_file=a.log_file,
                      stop_after=a.stop_after, progress=not a.no_progress)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

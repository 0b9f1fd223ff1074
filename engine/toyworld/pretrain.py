"""Pretrain the embedded default model on the captioned-shapes world, on CPU, in minutes.

    python -m refl_engine.toyworld.pretrain --out engine/toyworld/pipeline

Starts from the tiny-sd preset exactly (`build_tiny_sd(seed)`: same configs, same tokenizer, same
seeded CLIP text encoder, which stays frozen) and trains
  (a) the AutoencoderKL: L1 + MSE reconstruction plus a small KL term; afterwards the latent std
      is measured and stored as the VAE's `scaling_factor`, so `latents * scaling_factor` has
      roughly unit std, the convention the trainer relies on (it divides by it before decode);
  (b) the UNet2DConditionModel: epsilon prediction on the preset's DDPM schedule (SD1.5's scaled
      linear betas), min-SNR-5 loss weighting, 10% empty-prompt dropout for classifier-free
      guidance, an EMA of the weights (the EMA is what is saved).
Then writes the pipeline with `save_pipeline_dir` (fp32 safetensors), a `pretrain_log.json`
with the settings, losses and wall times, and optionally a PNG grid of DDIM samples.

Everything is seeded. Bitwise reproducibility holds for a fixed thread count on the same
machine (oneDNN kernels may sum in another order with other thread counts). The default is one
thread: on the shared 2-core machine the shipped model was trained on, two OpenMP threads ran
each step 2-4x slower than one, because each barrier waits for a descheduled sibling thread.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models.load import build_tiny_sd, save_pipeline_dir, tiny_sd_configs
from . import world


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


# ---------------------------------------------------------------- (b) the UNet

def train_unet(unet, pool_mean, pool_std, pool_text_idx, text_table, empty_idx: int, scheduler_cfg: dict,
               scaling: float, steps: int, batch: int, lr: float, ema_decay: float, cfg_dropout: float,
               snr_gamma: float, high_noise_fraction: float, x0_weight_cap: float, cross_attn_lr_mult: float, seed: int,
               progress: bool):
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    sched = DDPMScheduler(**{k: v for k, v in scheduler_cfg.items() if k not in ("set_alpha_to_one", "steps_offset")})
    abar = sched.alphas_cumprod.float()
    snr = abar / (1 - abar)
    # min-SNR-gamma for epsilon prediction, times 1/alpha_bar capped at `x0_weight_cap`: with
    # epsilon prediction the high-noise steps, where the caption decides colors and layout, cost
    # almost nothing (x_t is nearly the noise); 1/alpha_bar is the v-prediction weighting, which
    # counts their error in the clean image, and the cap keeps the noisiest steps from dominating.
    weight = torch.clamp(snr, max=snr_gamma) / snr * torch.clamp(1 / abar, max=x0_weight_cap)
    T = len(abar)

    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    # Cross-attention learns to read the caption slowly from a random start (attention is spread
    # evenly over 77 mostly-padding tokens); a larger step size there speeds that up.
    cross = [p for n, p in unet.named_parameters() if ".attn2." in n]
    rest = [p for n, p in unet.named_parameters() if ".attn2." not in n]
    opt = torch.optim.AdamW([dict(params=rest, mult=1.0), dict(params=cross, mult=cross_attn_lr_mult)],
                            lr=lr, weight_decay=0.01)
    unet.train()
    gen = torch.Generator().manual_seed(seed + 1)
    log = []
    bar = tqdm(range(steps), desc="unet", disable=not progress, dynamic_ncols=True)
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
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, encoder_hidden_states=text_table[text]).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (weight[t] * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(d).add_(v.detach(), alpha=1 - d)
                else:
                    ema[k].copy_(v)
        loss, mse = loss.item(), per.mean().item()
        log.append(dict(step=step, loss=loss, mse=mse))
        bar.set_postfix(loss=f"{loss:.4f}", mse=f"{mse:.4f}")
    unet.eval()
    return ema, dict(log=log)


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


SAMPLE_CAPTIONS = [f"a {c} {s} on a {b} background" for c, s, b in [
    ("red", "circle", "blue"), ("yellow", "star", "purple"), ("white", "square", "black"), ("green", "triangle", "pink"),
    ("blue", "ring", "orange"), ("black", "circle", "white"), ("orange", "square", "green"),
    ("pink", "star", "gray")]] + ["a painting of a sky with a red circle", "a painting of a night with a yellow star"]


# ---------------------------------------------------------------- main

def pretrain(out: Path, seed: int = 0, vae_steps: int = 350, vae_batch: int = 16, vae_lr: float = 3e-3,
             kl_weight: float = 1e-4, pool: int = 4096, unet_steps: int = 1400, unet_batch: int = 16,
             unet_lr: float = 3e-3, ema_decay: float = 0.99, cfg_dropout: float = 0.1, snr_gamma: float = 5.0,
             high_noise_fraction: float = 0.5, x0_weight_cap: float = 20.0,
             cross_attn_lr_mult: float = 3.0, threads: int = 1, samples: Path | None = None,
             progress: bool = True) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    t_start = time.time()
    parts = build_tiny_sd(seed)
    unet, vae, text_encoder, tokenizer = parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"]
    text_encoder.eval().requires_grad_(False)
    sched_cfg = tiny_sd_configs()["scheduler"]

    # (a) autoencoder
    t0 = time.time()
    vae_info = train_vae(vae, vae_steps, vae_batch, vae_lr, kl_weight, seed, progress)
    vae.requires_grad_(False)
    t_vae = time.time() - t0

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
    vocab = world.all_captions() + [""]
    table = encode_texts(tokenizer, text_encoder, vocab)
    index = {c: i for i, c in enumerate(vocab)}
    text_idx = torch.tensor([index[c] for c in captions])
    t_pool = time.time() - t0

    # (b) UNet
    t0 = time.time()
    ema, unet_info = train_unet(unet, mean, std, text_idx, table, index[""], sched_cfg, scaling, unet_steps,
                                unet_batch, unet_lr, ema_decay, cfg_dropout, snr_gamma, high_noise_fraction,
                                x0_weight_cap, cross_attn_lr_mult, seed, progress)
    unet.load_state_dict(ema)
    t_unet = time.time() - t0

    parts["unet"], parts["vae"] = unet, vae
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_pipeline_dir(parts, out)
    wall = time.time() - t_start

    def tail(log, key, n=50):
        return float(np.mean([r[key] for r in log[-n:]]))

    report = dict(
        seed=seed, threads=threads, wall_seconds=round(wall, 1), vae_seconds=round(t_vae, 1),
        pool_seconds=round(t_pool, 1), unet_seconds=round(t_unet, 1),
        settings=dict(vae_steps=vae_steps, vae_batch=vae_batch, vae_lr=vae_lr, kl_weight=kl_weight, pool=pool,
                      unet_steps=unet_steps, unet_batch=unet_batch, unet_lr=unet_lr, ema_decay=ema_decay,
                      cfg_dropout=cfg_dropout, snr_gamma=snr_gamma, high_noise_fraction=high_noise_fraction,
                      x0_weight_cap=x0_weight_cap, cross_attn_lr_mult=cross_attn_lr_mult),
        vae_final=dict(l1=tail(vae_info["log"], "l1"), mse=tail(vae_info["log"], "mse"),
                       kl=tail(vae_info["log"], "kl"), heldout_mse=heldout_mse),
        scaling_factor=scaling,
        unet_final=dict(loss=tail(unet_info["log"], "loss"), mse=tail(unet_info["log"], "mse")),
        unet_first=dict(loss=float(np.mean([r["loss"] for r in unet_info["log"][:20]]))),
    )
    (out / "pretrain_log.json").write_text(json.dumps(report, indent=2))
    if samples is not None:
        cond = encode_texts(tokenizer, text_encoder, SAMPLE_CAPTIONS)
        imgs = ddim_samples(unet, vae, cond.repeat_interleave(4, 0), table[index[""]][None], sched_cfg, steps=20)
        save_png_grid(imgs, Path(samples), cols=8)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="pipeline directory to write (replaced atomically)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=350)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=3e-3)
    p.add_argument("--pool", type=int, default=4096, help="images rendered and encoded for the UNet stage")
    p.add_argument("--unet-steps", type=int, default=1400)
    p.add_argument("--unet-batch", type=int, default=16)
    p.add_argument("--unet-lr", type=float, default=3e-3)
    p.add_argument("--high-noise-fraction", type=float, default=0.5)
    p.add_argument("--cross-attn-lr-mult", type=float, default=3.0)
    p.add_argument("--x0-weight-cap", type=float, default=20.0, help="cap of the 1/alpha_bar loss weight (1: off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=Path, default=None, help="also write a PNG grid of 20-step DDIM samples")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    report = pretrain(a.out, seed=a.seed, vae_steps=a.vae_steps, vae_batch=a.vae_batch, vae_lr=a.vae_lr,
                      pool=a.pool, unet_steps=a.unet_steps, unet_batch=a.unet_batch, unet_lr=a.unet_lr,
                      high_noise_fraction=a.high_noise_fraction, x0_weight_cap=a.x0_weight_cap,
                      cross_attn_lr_mult=a.cross_attn_lr_mult, threads=a.threads,
                      samples=a.samples, progress=not a.no_progress)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

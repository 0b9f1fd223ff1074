"""Loss terms added to any method's reward loss, through one mechanism: `Method.add_regularizer`.

A regularizer is a callable `fn(context) -> scalar` (context: the trainer, the prompts, the
rollout) that the trainer adds, times its weight, to the loss after the rollout; one that must
see the rollout as it happens also has `watch(chain) -> chain`, which the trainer applies
(`watch_rollout`) before rolling out.

    --kl_coeff c             DRaFT+'s KL-like penalty: c * mean over the window's grad-carrying
                             UNet calls of ||out_theta(x_t) - out_base(x_t)||^2 (mean over
                             elements), with the base output from the same UNet with its LoRA
                             adapter switched off (one copy of the weights); for full fine-tuning
                             (--rank 0) from a frozen copy of the UNet as loaded (`frozen_base`).
    --pretrain_loss_coeff c  the diffusion (pre-training) loss on real image-caption pairs.
    --reward_loss relu       relu(threshold - r) instead of -r (the ImageReward ReFL script).

ImageReFL's own diffusion-loss term goes through the same mechanism (methods/imagerefl.py).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


# ---------------------------------------------------------------- shared pieces

def reward_objective(reward: torch.Tensor, cfg) -> torch.Tensor:
    """What the method's loss maximises: r itself, or -relu(threshold - r), whose loss
    relu(threshold - r) stops pushing a sample once its reward passes the threshold."""
    if cfg.reward_loss == "relu":
        return -torch.relu(cfg.reward_loss_threshold - reward)
    return reward


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str):
    """What the model should output at x_t = sqrt(a) x0 + sqrt(1 - a) noise: eps, v or x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0
    return x0


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def _per_sample(value, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return a.view(-1, *([1] * (like.dim() - 1))) if a.dim() else a


def diffusion_loss(model_fn, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alpha_bar,
                   prediction_type: str = "epsilon") -> torch.Tensor:
    """||target - model_fn(x_t, t)||^2 (mean over elements): the denoising loss the model was
    pretrained with, at timesteps t (per sample) with cumulative alphas alpha_bar."""
    a = _per_sample(alpha_bar, x0)
    x_t = add_noise(x0, noise, a)
    out = model_fn(x_t, t)
    target = diffusion_target(x0, noise, a, prediction_type)
    dtype = torch.promote_types(out.dtype, torch.float32)  # the loss in at least fp32
    return torch.nn.functional.mse_loss(out.to(dtype), target.to(dtype))


@torch.no_grad()
def encode_images(vae, images01: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1] -> scaled VAE latents (a sample of the posterior, as the diffusers
    training examples take)."""
    from .sampling import randn

    p = next(vae.parameters())
    dist = vae.encode((images01 * 2 - 1).to(p.device, p.dtype)).latent_dist
    z = dist.mean + dist.std * randn(dist.mean.shape, generator, dist.mean.device, dist.mean.dtype)
    return z * vae.config.scaling_factor


# ---------------------------------------------------------------- the KL-like penalty

@contextmanager
def adapter_disabled(unet):
    """The base model: the same UNet with its LoRA adapter switched off, for the block's duration."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def frozen_base(unet: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Full fine-tuning's base model for the KL penalty: a copy of the UNet as it is now (before
    any step), frozen (eval, no gradient) in `dtype` on the UNet's device. Each parameter is
    copied straight into `dtype` (deepcopy's memo takes the cast copy), so the weights never
    exist a third time in another precision, not even for a moment."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
            for p in unet.parameters()}
    base = copy.deepcopy(unet, memo)
    for module in base.modules():  # float buffers in the same dtype as the weights
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and dtype is not None:
                module._buffers[name] = buf.to(dtype)
    return base.requires_grad_(False).eval()


class _KLWatch:
    """The chain's memory policy, plus: for each grad-carrying call of the chain's model,
    the base model's output at the same input, kept beside the fine-tuned output."""

    def __init__(self, policy, eps_fn, unet, records: list, base_fn=None):
        self._policy, self._eps_fn, self._unet, self._records = policy, eps_fn, unet, records
        self._base_fn = base_fn

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def unet_call(self, fn, *args):
        out = self._policy.unet_call(fn, *args)
        if fn is self._eps_fn:  # trajectory steps; not ImageReFL's diffusion-loss call
            self._records.append((out, self.base(fn, *args)))
        return out

    @torch.no_grad()
    def base(self, fn, x, t):
        # The base output is a target: no graph, so the penalty's gradient flows through the
        # fine-tuned output only (and the x_t it sees), not through a second network's activations.
        if self._base_fn is not None:
            return self._base_fn(x.detach(), t)
        with adapter_disabled(self._unet):
            return fn(x.detach(), t)


class KLPenalty:
    """coeff * mean_k ||out_theta(x_{t_k}) - out_base(x_{t_k})||^2 over the rollout's window calls.

    The base output: `base_unet` (full fine-tuning's frozen copy) run with the chain's own
    conditioning and guidance; without it the chain's UNet with its LoRA adapter off."""

    def __init__(self, base_fn=None, base_unet: torch.nn.Module | None = None):
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.base_fn = base_fn  # tests: a fixed base output (x, t) -> out instead of the adapter switch
        self.base_unet = base_unet

    def watch(self, chain):
        from .methods.base import SamplingChain
        from .models.lora import has_lora

        self.records.clear()
        unet = getattr(chain.eps_fn, "unet", None)
        base_fn = self.base_fn
        if base_fn is None and self.base_unet is not None:
            base_fn = chain.eps_fn.with_unet(self.base_unet)
        if base_fn is None and not (unet is not None and has_lora(unet)):
            raise ValueError("the KL penalty needs a base model: a LoRA adapter on the chain's eps_fn.unet "
                             "(make_eps_fn sets it) or, for full fine-tuning, KLPenalty(base_unet=frozen_base(unet))")
        policy = _KLWatch(chain.policy, chain.eps_fn, unet, self.records, base_fn)
        return SamplingChain(chain.eps_fn, chain.schedule, policy, chain.eta)

    def __call__(self, context: dict) -> torch.Tensor:
        if not self.records:
            return torch.zeros(())
        dtype = torch.promote_types(self.records[0][0].dtype, torch.float32)  # at least fp32
        terms = [((out.to(dtype) - base.to(dtype)) ** 2).mean() for out, base in self.records]
        self.records.clear()  # drop the references: the graph is freed after backward
        return torch.stack(terms).mean()


# ---------------------------------------------------------------- the pre-training loss

def pretrain_loss(context: dict) -> torch.Tensor:
    """The diffusion loss on a batch of real image-caption pairs at uniform random timesteps
    (ImageReward's ReFL adds it to keep the model a denoiser of real images)."""
    trainer = context["trainer"]
    from .models.conditioning import make_eps_fn

    images, captions = trainer.dataset.sample(len(context["prompts"]), trainer.generator)
    x0 = encode_images(trainer.components.vae, images, trainer.generator).to(trainer.device)
    schedule = trainer.schedule
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=trainer.generator)
    alpha_bar = schedule.alphas_cumprod[t].to(x0.device, x0.dtype)
    from .sampling import randn

    noise = randn(x0.shape, trainer.generator, x0.device, x0.dtype)
    model_fn = make_eps_fn(trainer.unet, trainer.text.conditioning(captions, cfg=False), 1.0)
    policy = getattr(trainer, "policy", None)
    if policy is None:
        return diffusion_loss(model_fn, x0, noise, t.to(x0.device), alpha_bar, schedule.prediction_type)
    # its own one-call gradient window, so the memory policy decides what this UNet call keeps
    with policy.window(1):
        return diffusion_loss(lambda x, tt: policy.unet_call(model_fn, x, tt), x0, noise, t.to(x0.device),
                              alpha_bar, schedule.prediction_type)


# ---------------------------------------------------------------- wiring

def attach_regularizers(method, cfg, unet: torch.nn.Module | None = None, dtype: torch.dtype | None = None) -> None:
    """Register the regularizers the MethodConfig asks for. `unet`: the model to be trained,
    placed and patched but not yet stepped; without LoRA on it (full fine-tuning) the KL penalty
    takes a frozen copy of it in `dtype` (the training dtype) as its base model."""
    if cfg.kl_coeff > 0:
        from .models.lora import has_lora

        base = frozen_base(unet, dtype) if unet is not None and not has_lora(unet) else None
        method.add_regularizer("kl", cfg.kl_coeff, KLPenalty(base_unet=base))
    if cfg.pretrain_loss_coeff > 0:
        method.add_regularizer("pretrain_loss", cfg.pretrain_loss_coeff, pretrain_loss)


def watch_rollout(method, chain):
    """Let the regularizers that must see the rollout wrap the chain."""
    for _, fn in method.regularizers.values():
        if hasattr(fn, "watch"):
            chain = fn.watch(chain)
    return chain

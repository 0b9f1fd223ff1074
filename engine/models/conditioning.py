"""Prompt conditioning and the guided noise prediction.

Prompts are encoded by the diffusers pipeline built around the loaded modules
(`Components.pipeline()`): `encode_prompt` of StableDiffusionPipeline (SD1.5: last hidden states,
negative = the encoded "") or StableDiffusionXLPipeline (SDXL: both encoders' penultimate states
concatenated, the second's pooled projection; negative = zeros when the model's
`force_zeros_for_empty_prompt` says so), and SDXL's time ids come from the pipeline's
`_get_add_time_ids` at the training size. Training therefore conditions the UNet exactly as
sampling with the pipeline does. `Conditioning` carries both shapes so the sampling code does not care.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Conditioning:
    cond: torch.Tensor  # (B, L, D) encoder hidden states of the prompts
    uncond: torch.Tensor | None = None  # (B, L, D) the negative branch of CFG
    added: dict = field(default_factory=dict)  # SDXL: text_embeds (pooled), time_ids for cond
    added_uncond: dict = field(default_factory=dict)

    def rows(self, lo: int, hi: int) -> "Conditioning":
        """The conditioning of samples lo..hi-1 (views, no copy)."""
        sl = lambda d: {k: v[lo:hi] for k, v in d.items()}  # noqa: E731
        return Conditioning(self.cond[lo:hi], None if self.uncond is None else self.uncond[lo:hi],
                            sl(self.added), sl(self.added_uncond))


class TextEncoderCache:
    """Encodes each prompt once (no grad: the text encoders are frozen) and keeps its embeddings;
    the negative branch, the same for every prompt, is encoded once.

    height, width: the training size in pixels, which SDXL's time ids carry (original size = target
    size = (height, width), crop (0, 0), as the pipeline builds them by default); 0 = native.
    """

    def __init__(self, components, device, dtype, height: int = 0, width: int = 0):
        self.c = components
        self.pipe = components.pipeline()
        self.device, self.dtype = device, dtype
        self.size = (height or components.native_resolution, width or components.native_resolution)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._negative: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._time_ids: torch.Tensor | None = None

    @property
    def sdxl(self) -> bool:
        return self.c.kind == "sdxl"

    @torch.no_grad()
    def _encode(self, prompts: list[str], negative: bool):
        """The pipeline's encode_prompt on `prompts`: [(states, pooled)] per prompt, and the
        negative branch's (states, pooled) when `negative`."""
        out = self.pipe.encode_prompt(prompts, device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=negative)
        if self.sdxl:
            states, neg_states, pooled, neg_pooled = out
        else:
            (states, neg_states), pooled, neg_pooled = out, None, None
        cast = lambda t: None if t is None else t.to(self.dtype)  # noqa: E731
        items = [(cast(states[i]), cast(None if pooled is None else pooled[i])) for i in range(len(prompts))]
        neg = (cast(neg_states[0]), cast(None if neg_pooled is None else neg_pooled[0])) if negative else None
        return items, neg

    def time_ids(self) -> torch.Tensor:
        """(6,) SDXL's size/crop conditioning for the training size, by the pipeline's code."""
        if self._time_ids is None:
            te2 = self.pipe.text_encoder_2
            ids = self.pipe._get_add_time_ids(self.size, (0, 0), self.size, dtype=self.dtype,
                                              text_encoder_projection_dim=te2.config.projection_dim)
            self._time_ids = ids[0].to(self.device)
        return self._time_ids

    def _added(self, pooled: list[torch.Tensor | None]) -> dict:
        if not self.sdxl:
            return {}
        return {"text_embeds": torch.stack(pooled), "time_ids": self.time_ids().expand(len(pooled), -1)}

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
            items, _ = self._encode(new, negative=False)
            self._cache.update(zip(new, items))
        items = [self._cache[p] for p in prompts]
        return torch.stack([s for s, _ in items]), self._added([p for _, p in items])

    def negative(self, batch_size: int) -> tuple[torch.Tensor, dict]:
        """CFG's negative branch as the pipeline makes it for a None negative prompt."""
        if self._negative is None:
            _, self._negative = self._encode([""], negative=True)
        states, pooled = self._negative
        return states.expand(batch_size, -1, -1), self._added([pooled] * batch_size)

    def conditioning(self, prompts: Sequence[str], cfg: bool) -> Conditioning:
        cond, added = self.encode(prompts)
        if not cfg:
            return Conditioning(cond, added=added)
        uncond, added_u = self.negative(len(prompts))
        return Conditioning(cond, uncond, added, added_u)


def make_eps_fn(unet, conditioning: Conditioning, guidance_scale: float):
    """(x, t) -> the (classifier-free guided) noise prediction; CFG doubles the UNet batch
    (negative first, as the pipelines do)."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = conditioning
        if c.uncond is None or guidance_scale == 1.0:
            kwargs = {"added_cond_kwargs": c.added} if c.added else {}
            return unet(x, t, encoder_hidden_states=c.cond.to(x.dtype), **kwargs).sample
        x_in = torch.cat([x, x])
        states = torch.cat([c.uncond, c.cond]).to(x.dtype)
        kwargs = {}
        if c.added:
            kwargs["added_cond_kwargs"] = {k: torch.cat([c.added_uncond[k], c.added[k]]) for k in c.added}
        eps_u, eps_c = unet(x_in, t, encoder_hidden_states=states, **kwargs).sample.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    eps_fn.unet = unet  # for memory policies that act on the UNet's modules (memory/lean.py)
    # The same guided prediction for samples lo..hi-1 only: a memory policy runs a batch in chunks
    # (memory/recompute.py); CFG pairs stay together because the chunk is taken before doubling.
    eps_fn.rows = lambda lo, hi: make_eps_fn(unet, conditioning.rows(lo, hi), guidance_scale)
    # The same prediction by another UNet (the KL penalty's frozen base under full fine-tuning).
    eps_fn.with_unet = lambda other: make_eps_fn(other, conditioning, guidance_scale)
    return eps_fn

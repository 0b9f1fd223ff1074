"""Prompt conditioning and the guided noise prediction.

SD1.5 conditions the UNet on one CLIP text encoder's last hidden states. SDXL adds a second
encoder (penultimate hidden states concatenated, pooled output) and size/crop time ids through
`added_cond_kwargs`; `Conditioning` carries both shapes so the sampling code does not care.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..sampling import guided


@dataclass
class Conditioning:
    cond: torch.Tensor  # (B, L, D) encoder hidden states of the prompts
    uncond: torch.Tensor | None = None  # (B, L, D) of the empty prompt, for CFG
    added: dict = field(default_factory=dict)  # SDXL: text_embeds, time_ids for cond
    added_uncond: dict = field(default_factory=dict)

    def select(self, index) -> "Conditioning":
        pick = lambda d: {k: v[index] for k, v in d.items()}  # noqa: E731
        return Conditioning(self.cond[index], None if self.uncond is None else self.uncond[index],
                            pick(self.added), pick(self.added_uncond))


class TextEncoderCache:
    """Encodes prompts once (no grad) and keeps the embeddings: the text encoder is frozen."""

    def __init__(self, components, device, dtype):
        self.c = components
        self.device, self.dtype = device, dtype
        self._cache: dict[str, tuple[torch.Tensor, dict]] = {}

    @torch.no_grad()
    def _encode_one(self, prompt: str):
        c = self.c
        if c.kind == "sd15":
            ids = c.tokenizer([prompt], padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)
            return c.text_encoder(ids)[0].to(self.dtype)[0], {}
        # SDXL: penultimate hidden states of both encoders, pooled output of the second.
        states = []
        pooled = None
        for tok, enc in ((c.tokenizer, c.text_encoder), (c.tokenizer_2, c.text_encoder_2)):
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        h = c.unet.config.sample_size * 8
        time_ids = torch.tensor([h, h, 0, 0, h, h], device=self.device, dtype=self.dtype)
        return torch.cat(states, dim=-1)[0].to(self.dtype), {"text_embeds": pooled[0].to(self.dtype),
                                                             "time_ids": time_ids}

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, dict]:
        items = []
        for p in prompts:
            if p not in self._cache:
                self._cache[p] = self._encode_one(p)
            items.append(self._cache[p])
        cond = torch.stack([h for h, _ in items])
        added = {k: torch.stack([a[k] for _, a in items]) for k in items[0][1]}
        return cond, added

    def conditioning(self, prompts: Sequence[str], cfg: bool) -> Conditioning:
        cond, added = self.encode(prompts)
        if not cfg:
            return Conditioning(cond, added=added)
        uncond, added_u = self.encode([""] * len(prompts))
        return Conditioning(cond, uncond, added, added_u)


def make_eps_fn(unet, conditioning: Conditioning, guidance_scale: float):
    """(x, t) -> the (classifier-free guided) noise prediction; CFG doubles the UNet batch."""

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
        return guided(eps_u, eps_c, guidance_scale)

    eps_fn.unet = unet  # for memory policies that act on the UNet's modules (memory/selective.py)
    return eps_fn

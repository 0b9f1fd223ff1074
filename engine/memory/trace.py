"""Tracing one call of each component of a step on the meta device, and the disk cache of the traces.

The UNet, the VAE decoder and the reward's vision tower (built by `meta.py` from their configs) run
one call forward and backward with `measure.LiveBytesTracker` watching: the same op-level byte
accounting that measures real CPU runs. Attention is counted as the GPU's flash / memory-efficient
kernels keep it (q, k, v, O and an fp32 log-sum-exp, never the N x N matrix): on meta tensors SDPA
would take the math path (about 4x too much for SD1.5), so during tracing it is routed to the
flash-type CPU kernel, which saves that set, as FakeTensorMode on CPU would;
tests/memory/test_planner.py checks meta against FakeTensorMode and both against the tracker on a
real model. Each call is profiled as a `CallProfile` (window.py) at batch 1; activations are
proportional to the batch and the planner scales them. Traces are cached on disk
($REFL_ENGINE_CACHE or ~/.cache/refl-engine/planner), so a repeated plan takes seconds.

Offline code: it imports the runtime (recompute's call kinds, lean mode, the tracker), never the
other way.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import measure
from .meta import REWARD_BACKBONES, dtype_of, meta_unet, meta_vae, meta_vision
from .recompute import CALL_KINDS, checkpointed_layers
from .window import WINDOW_KINDS, CallProfile

CACHE_VERSION = 13  # bump when a trace changes what it counts: older cached traces are then ignored


def profile_call(fn: Callable, args: Sequence, kinds: Sequence[str] = WINDOW_KINDS, **kwargs) -> dict[str, CallProfile]:
    """`measure.profile_call` with the memory kinds named as `--recompute` names them."""
    return measure.profile_call(fn, args, {k: CALL_KINDS.get(k) for k in kinds}, **kwargs)


# ====================================================================== the disk cache

def cache_path(key: dict) -> Path:
    from importlib.metadata import version

    blob = json.dumps([key, CACHE_VERSION, torch.__version__, version("diffusers"), version("transformers")],
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    root = os.environ.get("REFL_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refl-engine")
    return Path(root) / "planner" / f"{digest}.json"


def cached_json(key: dict, compute: Callable[[], dict], use_cache: bool) -> dict:
    """`compute()` (a JSON-able dict), read from the disk cache under `key` if there, else computed
    and written there (atomically: concurrent planners never read half a file)."""
    path = cache_path(key)
    if use_cache and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass
    result = compute()
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result))
            os.replace(tmp, path)
        except OSError:
            pass
    return result


@functools.lru_cache(maxsize=64)
def _memo(kind: str, key_json: str, use_cache: bool) -> dict[str, CallProfile]:
    key = json.loads(key_json)
    compute = {"unet": trace_unet, "vae": trace_vae, "reward": trace_reward}[kind]
    raw = cached_json({"what": kind, **key}, lambda: {k: asdict(v) for k, v in compute(**key).items()}, use_cache)
    try:
        return {k: CallProfile(**v) for k, v in raw.items()}
    except TypeError:  # a cache file of another CallProfile layout
        return compute(**key)


def trace(kind: str, use_cache: bool = True, **key) -> dict[str, CallProfile]:
    """The profiles of one `kind` ("unet", "vae", "reward") call traced with `key`'s arguments:
    remembered in this process, cached on disk across processes."""
    return _memo(kind, json.dumps(key, sort_keys=True, default=str), use_cache)


# ====================================================================== tracing the components

_sdpa = torch.nn.functional.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    """On meta tensors, route SDPA to the flash-type kernel (saves q, k, v, O and an fp32
    logsumexp, like CUDA's flash / memory-efficient kernels) instead of the math path."""
    if query.device.type == "meta" and attn_mask is None and not kwargs.get("enable_gqa", False):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale)[0]
    return _sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                 **kwargs)


@contextlib.contextmanager
def _tracing():
    """Build inputs on the meta device with flash-type SDPA. Same bytes as FakeTensorMode on CPU
    (tests/memory/test_planner.py checks it), three times faster."""
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        with torch.device("meta"):
            yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _sdpa


def _cast(module: torch.nn.Module, dtype: torch.dtype, trainable_dtype: torch.dtype | None = None):
    for p in module.parameters():
        if p.is_floating_point():
            p.data = p.data.to(trainable_dtype if (p.requires_grad and trainable_dtype is not None) else dtype)
    for b in module.buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype)
    return module


def unet_for_trace(spec_unet: dict, rank: int, lora_targets: str):
    unet = meta_unet(spec_unet)
    if rank > 0:
        from ..models.lora import add_lora

        add_lora(unet, rank, target_modules=lora_targets)
    else:
        unet.requires_grad_(True)
    return unet


def trace_unet(unet_cfg: dict, kind_model: str, cross_dims: list, resolution: int, batch: int, cfg: bool,
                dtype: str, rank: int, lora_targets: str, x_grad: bool, kinds: list, seq_len: int = 77):
    from ..models.conditioning import Conditioning, make_eps_fn

    dt = dtype_of(dtype)
    unet = unet_for_trace(unet_cfg, rank, lora_targets)
    with _tracing():
        # LoRA weights trace in the compute dtype, as autocast runs them (their fp32 master copy
        # is in the `params` component)
        _cast(unet, dt)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        for p in trainable:
            p.grad = torch.zeros_like(p)
        latent = resolution // unet_cfg["_latent_factor"]
        x = torch.randn(batch, unet_cfg.get("in_channels", 4), latent, latent, dtype=dt)
        hidden = unet_cfg["cross_attention_dim"]
        hidden = hidden if isinstance(hidden, int) else hidden[0]
        cond = torch.randn(batch, seq_len, hidden, dtype=dt)
        added = {}
        if kind_model == "sdxl":
            pooled_dim = cross_dims[-1]
            added = {"text_embeds": torch.randn(batch, pooled_dim, dtype=dt), "time_ids": torch.randn(batch, 6, dtype=dt)}
        if cfg:
            c = Conditioning(cond, torch.randn_like(cond), added, {k: torch.randn_like(v) for k, v in added.items()})
        else:
            c = Conditioning(cond, added=added)
        eps_fn = make_eps_fn(unet, c, 7.5 if cfg else 1.0)
        t = torch.full((), 500, dtype=torch.long)
        prof = profile_call(eps_fn, [x, t], kinds=kinds, grad_into_params=True, inputs_require_grad=x_grad,
                            exclude=list(unet.parameters()))
    return prof


def _decode_fn(vae):
    scaling = vae.config.scaling_factor

    def decode(latents):  # as ReFLTrainer.decode
        image = vae.decode(latents / scaling).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    return decode


def trace_vae(vae_cfg: dict, resolution: int, batch: int, dtype: str, checkpoint: bool, lean: bool = False):
    from ..models.patch import patch
    from .lean import in_lean_mode

    dt = dtype_of(dtype)
    vae = meta_vae(vae_cfg)
    vae.requires_grad_(False)
    decode = _decode_fn(vae)
    if lean:  # as MemoryPolicy.decode_call with lean_decode
        patch(vae, attention=False)
        decode = in_lean_mode(decode)

    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    with _tracing():
        _cast(vae, dt)
        z = torch.randn(batch, vae_cfg.get("latent_channels", 4), resolution // factor, resolution // factor, dtype=dt)
        kinds = ["full"] if checkpoint else ["none"]
        prof = profile_call(decode, [z], kinds=kinds, exclude=list(vae.parameters()))
    return {"decode": prof[kinds[0]]}


def trace_reward(reward: str, resolution: int, batch: int, dtype: str, checkpoint: bool):
    """One reward call as `MemoryPolicy.reward_call` runs it: with `checkpoint`, the backbone's
    layers recomputed one at a time (a backbone-less reward checkpointed as one call)."""
    config_file = REWARD_BACKBONES.get(reward)
    dt = dtype_of(dtype)
    layers: tuple = ()
    with contextlib.ExitStack() as stack:
        if config_file == "imagereward":
            from ..rewards.imagereward import MAX_PROMPT_TOKENS, ImageRewardConfig, ImageRewardModel
            from ..rewards.preprocess import ImagePreprocess

            cfg = ImageRewardConfig()
            with torch.device("meta"):
                model = ImageRewardModel(cfg)
            model.requires_grad_(False)
            layers = (*model.blip.visual_encoder.blocks, *model.blip.text_encoder.encoder.layer)  # as ImageReward
            pre = ImagePreprocess(size=cfg.image_size, crop_rounding="round")
            stack.enter_context(_tracing())
            _cast(model, dt)
            ids = torch.ones(batch, MAX_PROMPT_TOKENS, dtype=torch.long)

            def fn(images):
                return model(pre(images.float()).to(dt), ids, torch.ones_like(ids)).float()

            images = torch.rand(batch, 3, resolution, resolution, dtype=dt)
            params = list(model.parameters())
        elif config_file is None:
            from ..rewards.toy import Colorfulness

            model = Colorfulness()
            fn = lambda images: model.score(images, [""] * images.shape[0])  # noqa: E731
            stack.enter_context(_tracing())
            images = torch.rand(batch, 3, resolution, resolution, dtype=dt)
            params = []
        else:
            from ..rewards.preprocess import ImagePreprocess

            vision = meta_vision(config_file)
            vision.requires_grad_(False)
            layers = tuple(vision.vision_model.encoder.layers)
            pre = ImagePreprocess(size=vision.config.image_size)
            stack.enter_context(_tracing())
            _cast(vision, dt)

            def fn(images):
                pixels = pre(images.float()).to(dt)
                return vision(pixel_values=pixels).image_embeds.float().sum(-1)

            images = torch.rand(batch, 3, resolution, resolution, dtype=dt)
            params = list(vision.parameters())
        kind = "full" if checkpoint and not layers else "none"
        if checkpoint and layers:
            stack.enter_context(checkpointed_layers(layers))
        prof = profile_call(fn, [images], kinds=[kind], exclude=params)
    return {"reward": prof[kind]}

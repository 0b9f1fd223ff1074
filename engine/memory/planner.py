"""The memory-budget planner: predict the peak bytes of one training step without weights.

How: the UNet, the VAE decoder and the reward's vision tower are instantiated from their configs on
the meta device (shapes and dtypes, no data) and one call of each runs forward and backward with
`measure.LiveBytesTracker` watching — the same op-level byte accounting that measures real CPU
runs. Attention is counted as the GPU's flash / memory-efficient kernels keep it (q, k, v, O and an
fp32 log-sum-exp, never the N x N matrix): on meta tensors SDPA would take the math path (about 4x
too much for SD1.5), so during tracing it is routed to the flash-type CPU kernel, which saves that
set — exactly what FakeTensorMode on CPU would pick; tests/memory/test_planner.py checks meta
against FakeTensorMode and both against the tracker on a real model. Each call is profiled as a
`CallProfile`:

    retained   bytes the call leaves alive for backward (its output excluded)
    fwd_peak   peak above the bytes live before the call, during its forward
    bwd_peak   peak above the bytes live before the call, during its backward (recompute included)

at batch 1 (activations are proportional to the batch; the planner scales). `full` is derived
from the `none` and no-grad traces. A step is then composed: parameters, gradients and optimizer
state, plus the largest of the phase peaks of the window (each window position's retained bytes
stacked, then the backward of the last one), the VAE decode and the reward. `window.plan_window`
is the shared optimiser that `--recompute auto` uses too (runtime code: this module imports the
runtime, never the other way). Traces are cached on disk
($REFL_ENGINE_CACHE or ~/.cache/refl-engine/planner), so a repeated plan takes seconds.

Precision model (stated, not measured on GPU here): with --mixed_precision bf16/fp16 activations
and frozen weights are half precision; trainable LoRA weights, master weights of a full fine-tune,
their gradients and AdamW moments are fp32; 8-bit AdamW keeps two uint8 moments plus one fp32
absmax per 2048 values; a full fine-tune under autocast also holds one half copy of the UNet's
weights. ZeRO-3 with CPU offload keeps parameters, gradients and optimizer state of the UNet on
the host and holds on the GPU the half working copy of the parameters being gathered
(stage3_max_live_parameters = 1e9) and one reduce bucket (5e8 elements).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import measure
from .recompute import CALL_KINDS, CHUNKABLE, chunked_profile, checkpointed_layers
from .window import (RECOMPUTE_COST, WINDOW_KINDS, CallProfile, WindowPlan, _window_peak,  # noqa: F401
                     plan_window)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
PLANNER_VERSION = 10

GiB = 2**30


# ====================================================================== call profiles

def profile_call(fn: Callable, args: Sequence, kinds: Sequence[str] = WINDOW_KINDS, **kwargs) -> dict[str, CallProfile]:
    """`measure.profile_call` with the memory kinds named as `--recompute` names them."""
    return measure.profile_call(fn, args, {k: CALL_KINDS.get(k) for k in kinds}, **kwargs)


# ====================================================================== model specs

@dataclass
class ModelSpec:
    name: str
    kind: str  # sd15 | sdxl
    unet: dict
    vae: dict
    text_encoders: list[dict]  # transformers CLIPTextConfig dicts (with "with_projection")
    native_resolution: int


def _read(name: str) -> dict:
    return json.loads((CONFIG_DIR / name).read_text())


def _te(cfg: dict, with_projection: bool) -> dict:
    cfg = dict(cfg)
    cfg["with_projection"] = with_projection
    return cfg


# Hub ids whose architecture configs ship in engine/configs (planned offline).
KNOWN_HUB_IDS = {"runwayml/stable-diffusion-v1-5": "sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
                 "stabilityai/stable-diffusion-xl-base-1.0": "sdxl"}
_COMPONENT_CONFIGS = ("unet/config.json", "vae/config.json", "text_encoder/config.json")


def _hub_configs(repo_id: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """The configs of a hub model (never its weights) in the local hub cache; their folder."""
    from ..config import ConfigError

    try:
        from huggingface_hub import hf_hub_download

        files = [hf_hub_download(repo_id, "model_index.json", revision=revision, cache_dir=cache_dir)]
        index = json.loads(Path(files[0]).read_text())
        for name in _COMPONENT_CONFIGS + (("text_encoder_2/config.json",) if "text_encoder_2" in index else ()):
            files.append(hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir))
    except Exception as err:  # noqa: BLE001 - offline, no such repo, not a diffusers pipeline
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"--model {repo_id}: cannot read its configs from the hub ({type(err).__name__}: {first}); "
                          "connect once (only the config files are fetched), or give a local diffusers directory"
                          ) from None
    return Path(files[0]).parent


def model_spec(model: str | None, revision: str | None = None, cache_dir: str | None = None) -> ModelSpec:
    """sd15, sdxl, tiny-sd, tiny-sdxl, a diffusers directory or a hub id (their unet/vae/text_encoder
    configs; a hub id's configs are fetched, never its weights); unset = the embedded toy-world
    model the trainer runs without --model."""
    from ..config import ConfigError

    model = KNOWN_HUB_IDS.get(model, model)
    if model in (None, ""):
        from ..toyworld import PIPELINE_DIR

        if (PIPELINE_DIR / "unet" / "config.json").is_file():
            spec = model_spec(str(PIPELINE_DIR))
            spec.name = "toy-world (default)"
            return spec
    if model in ("sd15", "sd1.5", "stable-diffusion-v1-5"):
        return ModelSpec("sd15", "sd15", _read("sd15_unet_config.json"), _read("sd15_vae_config.json"),
                         [_te(_read("sd15_text_encoder_config.json"), False)], 512)
    if model in ("sdxl", "sdxl-base"):
        return ModelSpec("sdxl", "sdxl", _read("sdxl_unet_config.json"), _read("sdxl_vae_config.json"),
                         [_te(_read("sdxl_text_encoder_config.json"), False),
                          _te(_read("sdxl_text_encoder_2_config.json"), True)], 1024)
    if model == "tiny-sdxl":
        from ..models.load import TINY_SDXL_RESOLUTION, build_tiny_tokenizer, tiny_sdxl_configs

        cfgs = tiny_sdxl_configs()
        tok = build_tiny_tokenizer()
        ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        tes = [_te(dict(cfgs["text_encoder"], **ids, pad_token_id=tok.pad_token_id), False),
               _te(dict(cfgs["text_encoder_2"], **ids, pad_token_id=tok.convert_tokens_to_ids("!")), True)]
        return ModelSpec("tiny-sdxl", "sdxl", dict(cfgs["unet"]), dict(cfgs["vae"]), tes, TINY_SDXL_RESOLUTION)
    if model in (None, "", "tiny-sd"):
        from ..models.load import TINY_SD_RESOLUTION, build_tiny_tokenizer, tiny_sd_configs

        cfgs = tiny_sd_configs()
        tok = build_tiny_tokenizer()
        te = dict(cfgs["text_encoder"], vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        name = "tiny-sd" if model else "tiny-sd (default)"
        return ModelSpec(name, "sd15", dict(cfgs["unet"]), dict(cfgs["vae"]), [_te(te, False)], TINY_SD_RESOLUTION)
    root = Path(model).expanduser()
    if not root.exists() and model.count("/") == 1 and not model.startswith((".", "/", "~")):
        root = _hub_configs(model, revision, cache_dir)
    if not (root / "unet" / "config.json").is_file():
        raise ConfigError(f"--model {model!r}: give a diffusers directory with unet/config.json, a hub id, or sd15, "
                          "sdxl, tiny-sd")
    unet = json.loads((root / "unet" / "config.json").read_text())
    vae = json.loads((root / "vae" / "config.json").read_text())
    tes = [_te(json.loads((root / "text_encoder" / "config.json").read_text()), False)]
    if (root / "text_encoder_2" / "config.json").is_file():
        tes.append(_te(json.loads((root / "text_encoder_2" / "config.json").read_text()), True))
    kind = "sdxl" if unet.get("addition_embed_type") == "text_time" else "sd15"
    native = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)
    return ModelSpec(str(root), kind, unet, vae, tes, int(native))


REWARD_BACKBONES = {
    # reward name -> vision tower config file (None: pixel statistics, no network)
    "aesthetic": "clip_vit_l14_vision_config.json",
    "pickscore": "clip_vit_h14_vision_config.json",
    "hps": "clip_vit_h14_vision_config.json",
    "imagereward": "imagereward",  # BLIP ViT-L + BERT cross-attention (ImageRewardConfig), built from its code
    "colorfulness": None, "brightness": None, "contrast": None, "none": None,
}


def reward_terms(reward: str) -> list[str]:
    """The reward names of a --reward spec ('aesthetic', 'aesthetic=1,hps:PATH=0.5', ...)."""
    from ..rewards.base import parse_reward_spec

    return list(dict.fromkeys(name for _, name, _ in parse_reward_spec(reward)))


def _meta_reward_params(name: str) -> int:
    backbone = REWARD_BACKBONES.get(name)
    if backbone is None:
        return 0
    if backbone == "imagereward":
        from ..rewards.imagereward import ImageRewardConfig, ImageRewardModel

        with torch.device("meta"):
            return count_params(ImageRewardModel(ImageRewardConfig()))
    return count_params(_meta_vision(backbone))


# ====================================================================== building fake models

def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _meta_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(_strip(cfg))


def _meta_vae(cfg: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(_strip(cfg))


def _meta_text_encoder(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(cfg)
    proj = cfg.pop("with_projection", False)
    config = CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if proj else CLIPTextModel)(config)


def _meta_vision(config_file: str):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = _read(config_file)
    config = CLIPVisionConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        return CLIPVisionModelWithProjection(config)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def lora_param_count(unet, rank: int, targets: str = "to_q,to_k,to_v,to_out.0") -> int:
    """Parameters peft's LoRA adds on the Linear modules named by `targets` (name suffixes)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    total = 0
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in names):
            total += rank * (mod.in_features + mod.out_features)
    return total


def _fakeify(module: torch.nn.Module, dtype: torch.dtype, trainable_dtype: torch.dtype | None = None):
    """Replace every (meta) parameter and buffer by a FakeTensor of the same shape on CPU; call
    inside a FakeTensorMode. Trainable parameters (requires_grad) get `trainable_dtype`."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            dt = trainable_dtype if (p.requires_grad and trainable_dtype is not None) else dtype
            dt = dt if p.is_floating_point() else p.dtype
            mod._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = torch.zeros(b.shape, dtype=b.dtype if not b.is_floating_point() else dtype)
    return module


# ====================================================================== tracing the components

def _dtype(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def _cache_path(key: dict) -> Path:
    from importlib.metadata import version

    blob = json.dumps([key, PLANNER_VERSION, torch.__version__, version("diffusers"), version("transformers")],
                      sort_keys=True, default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    root = os.environ.get("REFL_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refl-engine")
    return Path(root) / "planner" / f"{digest}.json"


def _cached(kind: str, key: dict, compute: Callable[[], dict[str, CallProfile]], use_cache: bool):
    path = _cache_path({"what": kind, **key})
    if use_cache and path.is_file():
        try:
            return {k: CallProfile(**v) for k, v in json.loads(path.read_text()).items()}
        except (ValueError, TypeError):
            pass
    result = compute()
    if use_cache:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({k: asdict(v) for k, v in result.items()}))
            os.replace(tmp, path)
        except OSError:
            pass
    return result


@functools.lru_cache(maxsize=64)
def _memo(kind: str, key_json: str, use_cache: bool):
    key = json.loads(key_json)
    compute = {"unet": _trace_unet, "vae": _trace_vae, "reward": _trace_reward}[kind]
    return _cached(kind, key, lambda: compute(**key), use_cache)


def _trace(kind: str, use_cache: bool = True, **key):
    return _memo(kind, json.dumps(key, sort_keys=True, default=str), use_cache)


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


def _unet_for_trace(spec_unet: dict, rank: int, lora_targets: str):
    unet = _meta_unet(spec_unet)
    if rank > 0:
        from ..models.lora import add_lora

        add_lora(unet, rank, target_modules=lora_targets)
    else:
        unet.requires_grad_(True)
    return unet


def _trace_unet(unet_cfg: dict, kind_model: str, cross_dims: list, resolution: int, batch: int, cfg: bool,
                dtype: str, rank: int, lora_targets: str, x_grad: bool, kinds: list, seq_len: int = 77):
    from ..models.conditioning import Conditioning, make_eps_fn

    dt = _dtype(dtype)
    unet = _unet_for_trace(unet_cfg, rank, lora_targets)
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


def _trace_vae(vae_cfg: dict, resolution: int, batch: int, dtype: str, checkpoint: bool, selective: bool = False):
    from .selective import in_selective_mode, install

    dt = _dtype(dtype)
    vae = _meta_vae(vae_cfg)
    vae.requires_grad_(False)
    decode = _decode_fn(vae)
    if selective:  # as MemoryPolicy.decode_call with selective_decode
        install(vae)
        decode = in_selective_mode(decode)

    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    with _tracing():
        _cast(vae, dt)
        z = torch.randn(batch, vae_cfg.get("latent_channels", 4), resolution // factor, resolution // factor, dtype=dt)
        kinds = ["full"] if checkpoint else ["none"]
        prof = profile_call(decode, [z], kinds=kinds, exclude=list(vae.parameters()))
    return {"decode": prof[kinds[0]]}


def _trace_reward(reward: str, resolution: int, batch: int, dtype: str, checkpoint: bool):
    """One reward call as `MemoryPolicy.reward_call` runs it: with `checkpoint`, the backbone's
    layers recomputed one at a time (a backbone-less reward checkpointed as one call)."""
    config_file = REWARD_BACKBONES.get(reward)
    dt = _dtype(dtype)
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

            vision = _meta_vision(config_file)
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


# ====================================================================== the plan

OPTIMIZERS = ("adamw", "adamw8bit", "cpu-adam")
POLICIES = ("none", "lean", "full", "selective", "auto")


@dataclass
class PlanSpec:
    model: str | None = "sd15"
    resolution: int = 0  # 0 = native
    height: int = 0  # non-square: 0 = --resolution; the activations are planned for the larger side, squared
    width: int = 0
    revision: str | None = None  # of a hub --model (its configs are read)
    cache_dir: str | None = None
    batch_size: int = 1
    method: str = "draft"
    K: str = "full"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    rank: int = 8
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    mixed_precision: str = "bf16"
    optimizer: str = "adamw"
    zero: int = 0
    offload: bool | str = False  # "none" | "optimizer" | "param" (--offload); True = the most the stage offloads
    num_gpus: int = 1  # data-parallel processes: ZeRO partitions optimizer state (1+), gradients (2+), weights (3)
    recompute: str = "selective"
    budget_gb: float | None = None  # GiB; None = detected GPU or 80
    reserve_gb: float = 3.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
    reward: str | None = None  # None: aesthetic (CLIP ViT-L/14) for sd15/sdxl, colorfulness for tiny-sd
    checkpoint_decode: bool = True
    selective_decode: bool = True  # MemoryPolicy.selective_decode
    checkpoint_reward: bool = True
    decode_chunk: int = 1  # samples per checkpointed decode chunk (MemoryPolicy.decode_chunk); 0 = whole batch
    recompute_chunk: int = 0  # samples per checkpoint of a full/selective UNet call; 0 = whole batch (auto: chosen)
    lv_inner: int = 2
    use_cache: bool = True
    method_options: dict = field(default_factory=dict)  # other MethodConfig fields (alignprop_k_max, ...)

    def method_config(self):
        from ..config import MethodConfig

        return MethodConfig(method=self.method, K=str(self.K), num_inference_steps=self.num_inference_steps,
                            guidance_scale=self.guidance_scale, lv_inner=self.lv_inner, **self.method_options)

    def window_size(self) -> int:
        """Grad-carrying UNet calls of one rollout, as the method makes them (its largest draw:
        AlignProp's k_max, DRaFT-LV's 1 + n): the method is the only source of the window."""
        from ..methods import build_method

        mc = self.method_config()
        # --pretrain_loss_coeff: one more grad-carrying UNet call (its own one-call window), kept
        # beside the rollout's until the joint backward; counted as a guided call (an upper bound:
        # it runs unguided). --kl_coeff's base calls run without grad and keep only their output.
        return build_method(mc).grad_calls(self.num_inference_steps) + (mc.pretrain_loss_coeff > 0)


@dataclass
class Plan:
    spec: dict
    peak_bytes: int
    fits: bool
    budget_bytes: int
    usable_bytes: int
    max_batch: int
    recommended_recompute: str | None
    components: dict
    window: dict
    policies: dict  # policy -> peak bytes at this batch
    param_counts: dict = field(default_factory=dict)
    host_bytes: int = 0  # CPU memory of one process for what --offload moves there
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def detect_budget_gib() -> tuple[float, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        name = pynvml.nvmlDeviceGetName(handle)
        return total / GiB, f"detected {name if isinstance(name, str) else name.decode()}"
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU
        return 80.0, "default 80 GiB (no GPU detected)"


class Planner:
    """Holds the traced profiles of one model/resolution/precision and composes plans from them."""

    def __init__(self, spec: PlanSpec):
        from ..config import ConfigError, check_resolution, resolution_multiple

        if spec.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {spec.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if spec.recompute not in POLICIES:
            raise ConfigError(f"--recompute {spec.recompute!r}: choose one of {', '.join(POLICIES)}")
        if spec.zero not in (0, 1, 2, 3):
            raise ConfigError("--zero must be 0, 1, 2 or 3")
        spec.window_size()  # an unknown method or a K out of range fails here, with the trainer's message
        self.spec = spec
        self.model = model_spec(spec.model, spec.revision, spec.cache_dir)
        if spec.reward is None:
            spec.reward = "colorfulness" if self.model.name.startswith(("tiny-sd", "toy-world")) else "aesthetic"
        for name in reward_terms(spec.reward):
            if name not in REWARD_BACKBONES:
                raise ConfigError(f"--reward {name!r}: the planner knows {', '.join(REWARD_BACKBONES)}")
        # the trainer's check (Components.image_size): each side a multiple of the down-sampling
        multiple = resolution_multiple(self.model.vae["block_out_channels"], self.model.unet["block_out_channels"])
        sides = []
        for name, side in (("height", spec.height), ("width", spec.width)):
            if not side:
                name, side = "resolution", spec.resolution or self.model.native_resolution
            check_resolution(side, multiple, name)
            sides.append(side)
        self.resolution = max(sides)  # an upper bound for a non-square size
        self._static = None

    # -- static bytes ---------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        if self._static is None:
            key = {"what": "params", "unet": self.model.unet, "vae": self.model.vae, "te": self.model.text_encoders,
                   "rank": self.spec.rank, "targets": self.spec.lora_targets, "reward": self.spec.reward}
            path = _cache_path(key)
            if self.spec.use_cache and path.is_file():
                try:
                    self._static = {k: int(v) for k, v in json.loads(path.read_text()).items()}
                    return self._static
                except (ValueError, TypeError):
                    pass
            self._static = self._count_params()
            if self.spec.use_cache:
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(self._static))
                except OSError:
                    pass
        return self._static

    def _count_params(self) -> dict[str, int]:
        m = self.model
        unet = _meta_unet(m.unet)
        counts = {"unet": count_params(unet), "vae": count_params(_meta_vae(m.vae)),
                  "text_encoders": sum(count_params(_meta_text_encoder(c)) for c in m.text_encoders),
                  "lora": lora_param_count(unet, self.spec.rank, self.spec.lora_targets) if self.spec.rank else 0,
                  "reward": 0}
        # every term of a weighted sum is resident
        counts["reward"] = sum(_meta_reward_params(name) for name in reward_terms(self.spec.reward))
        return counts

    @property
    def vae_precision(self) -> str:
        """The trainer keeps a `force_upcast` VAE (SDXL's) in fp32 under fp16 and decodes in fp32
        (models/load.py vae_dtype)."""
        fp16 = self.spec.mixed_precision == "fp16"
        return "no" if fp16 and self.model.vae.get("force_upcast", False) else self.spec.mixed_precision

    def state_bytes(self, optimizer: str | None = None, offload: bool | str | None = None, zero: int | None = None,
                    rank: int | None = None) -> dict[str, int]:
        s = self.spec
        optimizer = optimizer or s.optimizer
        offload = s.offload if offload is None else offload
        zero = s.zero if zero is None else zero
        if not isinstance(offload, str):  # True: the most ZeRO offloads at this stage
            offload = ("param" if zero == 3 else "optimizer") if offload else "none"
        rank = s.rank if rank is None else rank
        c = self.param_counts()
        half = _dtype(s.mixed_precision).itemsize
        frozen = c["text_encoders"] + c["reward"]
        vae = c["vae"] * _dtype(self.vae_precision).itemsize
        out = {}
        if rank > 0:
            trainable = c["lora"]
            out["params"] = (c["unet"] + frozen) * half + vae + trainable * 4
        else:
            trainable = c["unet"]
            out["params"] = frozen * half + vae + trainable * 4
        opt_per = 2 + 8 / 2048 if optimizer == "adamw8bit" else 8  # AdamW / DeepSpeedCPUAdam: two fp32 moments
        out["grads"] = trainable * 4
        out["optimizer"] = int(trainable * opt_per)
        if rank == 0 and half < 4:
            out["autocast_weight_copy"] = trainable * half
        if offload == "param":
            # parameters, gradients, optimizer state of the trained model live on the host
            out["params"] -= trainable * 4
            out["grads"] = int(min(trainable, 5e8) * half)  # one reduce bucket
            out["optimizer"] = 0
            out["zero3_live_params"] = int(min(trainable, 1e9) * half)
            out.pop("autocast_weight_copy", None)
        elif offload == "optimizer":
            out["optimizer"] = 0  # ZeRO-Offload: optimizer state on the host
            out["grads"] = int(min(trainable, 5e8) * half)
        n = max(1, s.num_gpus)
        if n > 1:  # each GPU keeps its 1/n partition of what the stage shards
            if zero >= 1:
                out["optimizer"] = -(-out["optimizer"] // n)
            if zero >= 2 and offload == "none":
                out["grads"] = -(-out["grads"] // n)
            if zero == 3 and offload != "param":
                out["params"] -= trainable * 4 - -(-trainable * 4 // n)
                out["zero3_live_params"] = int(min(trainable, 1e9) * half)  # stage3_max_live_parameters gathered
        return out

    def host_bytes(self, optimizer: str | None = None, offload: bool | str | None = None,
                   zero: int | None = None) -> int:
        """CPU memory one process holds for --offload: its 1/n partition of the fp32 master
        weights, fp32 gradients and optimizer moments (and under `param` the half weights)."""
        s = self.spec
        optimizer = optimizer or s.optimizer
        offload = s.offload if offload is None else offload
        zero = s.zero if zero is None else zero
        if not isinstance(offload, str):
            offload = ("param" if zero == 3 else "optimizer") if offload else "none"
        if offload == "none":
            return 0
        c = self.param_counts()
        trainable = c["lora"] if s.rank > 0 else c["unet"]
        per = 8 + 4 + 4  # AdamW or DeepSpeedCPUAdam moments, fp32 master, fp32 gradient
        if offload == "param":
            per += _dtype(s.mixed_precision).itemsize
        return -(-trainable * per // max(1, s.num_gpus))

    # -- traced profiles ----------------------------------------------------------------------------
    def unet_profiles(self, batch: int, x_grad: bool = True, rank: int | None = None) -> dict[str, CallProfile]:
        """Profiles of one guided UNet call at `batch` (traced at batch 1, scaled)."""
        s = self.spec
        rank = s.rank if rank is None else rank
        cross = [c.get("projection_dim", c["hidden_size"]) for c in self.model.text_encoders]
        unet_cfg = dict(self.model.unet)
        unet_cfg["_latent_factor"] = 2 ** (len(self.model.vae["block_out_channels"]) - 1)
        traced = _trace("unet", s.use_cache, unet_cfg=unet_cfg, kind_model=self.model.kind, cross_dims=cross,
                        resolution=self.resolution, batch=1, cfg=s.guidance_scale > 1.0, dtype=s.mixed_precision,
                        rank=rank, lora_targets=s.lora_targets, x_grad=x_grad, kinds=["nograd", *WINDOW_KINDS])
        return {k: v.scaled(batch) for k, v in traced.items()}

    def after_window(self, batch: int) -> tuple[CallProfile, CallProfile]:
        """Profiles of the VAE decode and the reward at `batch` (each traced at batch 1)."""
        s = self.spec
        vae = _trace("vae", s.use_cache, vae_cfg=self.model.vae, resolution=self.resolution, batch=1,
                     dtype=self.vae_precision, checkpoint=s.checkpoint_decode,
                     selective=s.selective_decode)["decode"]
        # a weighted sum runs its terms one after another: the largest term sets the phase's peak
        rew = max((_trace("reward", s.use_cache, reward=name, resolution=self.resolution, batch=1,
                          dtype=s.mixed_precision, checkpoint=s.checkpoint_reward)["reward"]
                   for name in reward_terms(s.reward)), key=lambda p: (max(p.fwd_peak, p.bwd_peak), p.retained))
        chunk = s.decode_chunk
        if not s.checkpoint_decode or chunk <= 0 or batch <= chunk:
            return vae.scaled(batch), rew.scaled(batch)
        # Chunked decode (MemoryPolicy.decode_call): chunk by chunk, each its own checkpoint.
        n = math.ceil(batch / chunk)
        image_c = chunk * 3 * self.resolution**2 * 4
        latent_c = self.latent_bytes(chunk)
        v = vae.scaled(chunk)
        fwd = max(v.fwd_peak + (n - 1) * image_c, 2 * n * image_c)  # earlier outputs, then the cat
        bwd = v.bwd_peak - image_c + n * image_c + (n - 1) * latent_c  # full image grad + finished latent grads
        return CallProfile(0, fwd, bwd), rew.scaled(batch)

    def after_window_bytes(self, batch: int) -> int:
        """Peak bytes the VAE decode and the reward add on top of the window's kept bytes: the
        `reserve_bytes` that `AutoRecompute` should hold back."""
        vae, rew = self.after_window(batch)
        image = batch * 3 * self.resolution**2 * 4
        return max(vae.fwd_peak, vae.retained + image + rew.fwd_peak, vae.retained + image + rew.bwd_peak,
                   vae.bwd_peak)

    def latent_bytes(self, batch: int) -> int:
        factor = 2 ** (len(self.model.vae["block_out_channels"]) - 1)
        side = self.resolution // factor
        return batch * self.model.unet.get("in_channels", 4) * side * side * _dtype(self.spec.mixed_precision).itemsize

    def param_grad_bytes(self) -> int:
        """The trainable parameters' gradients in the compute dtype, as autograd's input buffers
        sum them over the chunks of a chunked call."""
        c = self.param_counts()
        return (c["lora"] if self.spec.rank > 0 else c["unet"]) * _dtype(self.spec.mixed_precision).itemsize

    def chunked_profiles(self, profiles: dict[str, CallProfile], batch: int, chunk: int,
                         x_grad: bool) -> dict[str, CallProfile]:
        """`profiles` with the checkpointed kinds run as the trainer runs them at `--recompute_chunk
        chunk` (recompute.chunked): one chunk's call, plus what grows with the batch around it."""
        if chunk <= 0 or chunk >= batch:
            return profiles
        one = self.unet_profiles(chunk, x_grad=x_grad)
        sample = self.latent_bytes(1)  # the call's output per sample, and its input's gradient
        out = dict(profiles)
        for k in CHUNKABLE:
            if k in one:
                out[k] = chunked_profile(one[k], batch, chunk, sample, sample if x_grad else 0,
                                         self.param_grad_bytes())
        return out

    # -- composition ----------------------------------------------------------------------------------
    def activation_plan(self, batch: int, recompute: str, window: int, available: int | None = None):
        """(WindowPlan, after-window peak, profiles) for `recompute` at `batch`. The plan's
        `recompute_chunk` is the chunk its checkpointed calls run at (0 = the whole batch): the
        spec's, or under `auto` with none given the largest that fits (bigger chunks run faster)."""
        s = self.spec
        # The first window step's latent comes from no-grad steps and carries no gradient; later
        # ones do. With one step (ReFL, K = 1) that first step is the whole window; DRaFT-LV's and
        # ImageReFL's calls each start from a latent without gradient.
        x_grad = window > 1 and s.method not in ("draft-lv", "imagerefl")
        whole = self.unet_profiles(batch, x_grad=x_grad)
        vae, rew = self.after_window(batch)
        latent = self.latent_bytes(batch)
        # decode output (the fp32 image) stays for the reward; reward backward, then decode backward
        after = self.after_window_bytes(batch)
        chunk = s.recompute_chunk if s.recompute_chunk < batch else 0
        profiles = self.chunked_profiles(whole, batch, chunk, x_grad)
        if recompute == "auto":
            budget = available if available is not None else 0
            plan = plan_window(window, profiles, budget, after, latent)
            if not s.recompute_chunk and not plan.fits and batch > 1:
                # the largest chunk that fits (the peak grows with the chunk); else chunk 1's plan
                lo, hi, best = 1, batch - 1, None
                while lo <= hi:
                    mid = (lo + hi) // 2
                    p = plan_window(window, self.chunked_profiles(whole, batch, mid, x_grad), budget, after, latent)
                    if p.fits:
                        best, lo = (mid, p), mid + 1
                    else:
                        hi = mid - 1
                chunk = best[0] if best else 1
                profiles = self.chunked_profiles(whole, batch, chunk, x_grad)
                plan = best[1] if best else plan_window(window, profiles, budget, after, latent)
        else:  # a fixed policy: every window position of that kind
            peak, kept, phase = _window_peak([(recompute, window)], profiles, latent, after)
            plan = WindowPlan([recompute] * window, peak, kept, phase, RECOMPUTE_COST[recompute] * window, True)
        plan.recompute_chunk = chunk if recompute in ("auto", *CHUNKABLE) else 0
        # no-grad steps before the window: one forward at a time, of the whole batch (DRaFT with
        # K = N has none; with the checkpointed calls chunked they can set the peak)
        pre = profiles["nograd"].fwd_peak + latent
        if not (s.method == "draft" and window >= s.num_inference_steps) and pre > plan.peak:
            plan.peak, plan.phase = pre, "no-grad steps before the window"
        return plan, after, profiles, vae, rew

    def peak(self, batch: int, recompute: str, state: dict | None = None) -> tuple[int, WindowPlan, dict]:
        state = state or self.state_bytes()
        static = sum(state.values())
        window = self.spec.window_size()
        available = self.usable_bytes() - static
        plan, after, profiles, vae, rew = self.activation_plan(batch, recompute, window, available)
        return static + plan.peak, plan, dict(profiles=profiles, vae=vae, reward=rew, after=after)

    def budget_bytes(self) -> tuple[int, str]:
        if self.spec.budget_gb is not None:
            return int(self.spec.budget_gb * GiB), f"{self.spec.budget_gb:g} GiB given"
        gib, how = detect_budget_gib()
        return int(gib * GiB), how

    def usable_bytes(self) -> int:
        return self.budget_bytes()[0] - int(self.spec.reserve_gb * GiB)

    def max_batch(self, recompute: str, state: dict | None = None, limit: int = 4096) -> int:
        usable = self.usable_bytes()
        if self.peak(1, recompute, state)[0] > usable:
            return 0
        lo, hi = 1, 2
        while hi <= limit and self.peak(hi, recompute, state)[0] <= usable:
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.peak(mid, recompute, state)[0] <= usable:
                lo = mid
            else:
                hi = mid
        return lo

    def plan(self) -> Plan:
        s = self.spec
        B = s.batch_size
        state = self.state_bytes()
        usable = self.usable_bytes()
        budget, how = self.budget_bytes()
        peak, wplan, parts = self.peak(B, s.recompute, state)
        profiles = parts["profiles"]
        policies = {}
        for pol in POLICIES:
            policies[pol] = self.peak(B, pol, state)[0]
        recommended = None
        for pol in ("none", "lean", "auto", "full", "selective"):
            p, wp, _ = self.peak(B, pol, state)
            if p <= usable and (pol != "auto" or wp.fits):
                recommended = pol if pol != "auto" else f"auto ({_counts_text(wp.counts)})"
                break
        fits = peak <= usable and (s.recompute != "auto" or wplan.fits)
        components = dict(state)
        components.update({
            "window_kept_activations": wplan.window_kept,
            "peak_phase_activations": wplan.peak - wplan.window_kept if wplan.phase != "VAE decode / reward" else parts["after"],
            "unet_step_activations": profiles["none"].saved,
            "unet_step_kept": {k: profiles[k].retained for k in WINDOW_KINDS},
            "vae_decode_activations": max(parts["vae"].fwd_peak, parts["vae"].bwd_peak),
            "reward_activations": max(parts["reward"].fwd_peak, parts["reward"].bwd_peak),
        })
        plan = Plan(
            spec=asdict(s), peak_bytes=int(peak), fits=bool(fits), budget_bytes=budget, usable_bytes=usable,
            max_batch=self.max_batch(s.recompute, state), recommended_recompute=recommended,
            components=components,
            window={"size": s.window_size(), "kinds": _counts_text(wplan.counts), "phase": wplan.phase,
                    "recompute_unet_forwards": wplan.recompute_cost, "recompute_chunk": wplan.recompute_chunk},
            policies=policies, param_counts=dict(self.param_counts()), host_bytes=self.host_bytes(),
            notes=[f"budget: {how}; usable = budget - {s.reserve_gb:g} GiB reserve (CUDA context, workspaces, fragmentation)",
                   f"resolution {self.resolution}, latent {self.resolution // (2 ** (len(self.model.vae['block_out_channels']) - 1))}",
                   "activations traced on the meta device with flash-type SDPA (q, k, v, O, fp32 logsumexp saved)"],
        )
        if s.method == "alignprop":
            plan.notes.append("alignprop draws K ~ U{k_min..k_max}; the plan is for the largest window, K = k_max")
        if not fits:
            plan.suggestions = self.suggestions(state)
        return plan

    def suggestions(self, state: dict) -> list[str]:
        """What would make a plan that does not fit, fit: each line one change (or two) that does."""
        s = self.spec
        usable = self.usable_bytes()
        B = s.batch_size
        accum = lambda b: f" with --gradient_accumulation_steps {math.ceil(B / b)} for the same effective batch"  # noqa: E731
        out = []
        for pol in ("lean", "auto", "full", "selective"):
            if pol == s.recompute:
                continue
            peak, wplan, _ = self.peak(B, pol, state)
            if peak <= usable and (pol != "auto" or wplan.fits):
                out.append(f"--recompute {pol} (peak {peak / GiB:.1f} GiB)")
                break
        else:
            for pol in dict.fromkeys((s.recompute, "selective")):
                mb = self.max_batch(pol, state)
                if 0 < mb < B:
                    out.append(f"--recompute {pol} --train_batch_size {mb}{accum(mb)}")
        variants = []
        if s.optimizer == "adamw":
            variants.append(("--use_8bit_adam", dict(optimizer="adamw8bit")))
        if not (s.zero == 3 and s.offload in (True, "param")):
            variants.append(("--zero 3 --offload param --optimizer cpu-adam", dict(offload=True, zero=3)))
        for text, kw in variants:
            st = self.state_bytes(**kw)
            if self.peak(B, "selective", st)[0] <= usable:
                out.append(f"{text} --recompute selective")
            else:
                mb = self.max_batch("selective", st)
                if mb > 0:
                    out.append(f"{text} --recompute selective --train_batch_size {mb}{accum(mb)}")
        if s.rank == 0:
            out.append("LoRA (--rank 8) instead of full fine-tuning: the gradients and optimizer state shrink "
                       "to the adapter's")
        if not out:
            out.append("nothing in reach at this resolution: lower --resolution, drop CFG (--guidance_scale 1) "
                       "or use a smaller --K")
        return out


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "-"


def make_plan(**kwargs) -> Plan:
    return Planner(PlanSpec(**kwargs)).plan()


def auto_reserve_bytes(model: str | None, resolution: int, batch_size: int, mixed_precision: str = "no",
                       reward: str | None = None, checkpoint_decode: bool = True, checkpoint_reward: bool = True,
                       selective_decode: bool = True) -> int:
    """What `--recompute auto` should hold back for decode + reward (AutoRecompute(reserve_bytes=...))."""
    spec = PlanSpec(model=model, resolution=resolution, batch_size=batch_size, mixed_precision=mixed_precision,
                    reward=reward if reward in REWARD_BACKBONES else None, checkpoint_decode=checkpoint_decode,
                    checkpoint_reward=checkpoint_reward, selective_decode=selective_decode)
    return Planner(spec).after_window_bytes(batch_size)

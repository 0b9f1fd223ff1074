"""The models of a run as the planner sees them: architecture configs, parameter counts, and the
UNet, VAE, text encoders and reward towers instantiated on the meta device (shapes and dtypes, no
weights). Offline code: nothing here loads a checkpoint; a hub id's config files are fetched, never
its weights."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def dtype_of(mixed_precision: str) -> torch.dtype:
    return {"no": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


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


def meta_reward_params(name: str) -> int:
    backbone = REWARD_BACKBONES.get(name)
    if backbone is None:
        return 0
    if backbone == "imagereward":
        from ..rewards.imagereward import ImageRewardConfig, ImageRewardModel

        with torch.device("meta"):
            return count_params(ImageRewardModel(ImageRewardConfig()))
    return count_params(meta_vision(backbone))


# ====================================================================== building fake models

def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def meta_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(_strip(cfg))


def meta_vae(cfg: dict):
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL.from_config(_strip(cfg))


def meta_text_encoder(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(cfg)
    proj = cfg.pop("with_projection", False)
    config = CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.device("meta"):
        return (CLIPTextModelWithProjection if proj else CLIPTextModel)(config)


def meta_vision(config_file: str):
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


def fakeify(module: torch.nn.Module, dtype: torch.dtype, trainable_dtype: torch.dtype | None = None):
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


def param_counts(model: ModelSpec, rank: int, lora_targets: str, reward: str) -> dict[str, int]:
    """Parameters of each component of a run: UNet, VAE, text encoders, LoRA adapter (rank > 0)
    and the reward models (every term of a weighted sum is resident)."""
    unet = meta_unet(model.unet)
    return {"unet": count_params(unet), "vae": count_params(meta_vae(model.vae)),
            "text_encoders": sum(count_params(meta_text_encoder(c)) for c in model.text_encoders),
            "lora": lora_param_count(unet, rank, lora_targets) if rank else 0,
            "reward": sum(meta_reward_params(name) for name in reward_terms(reward))}

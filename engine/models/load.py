"""Load diffusers components from a local directory or a hub id, and build the tiny presets.

A preset is built from config with seeded weights, written with `save_pretrained` into a cache
directory and then loaded back through `load_pipeline_components`, the same code a real model
takes, so the tests exercise the real loading path.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError


@dataclass
class Components:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    kind: str  # "sd15" (one CLIP text encoder) or "sdxl" (two, pooled + time ids)
    path: str
    native_resolution: int
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object | None = None

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


# ---------------------------------------------------------------- tiny-sd (shaped like SD1.5)

TINY_SD_RESOLUTION = 32
TINY_SD_WORDS = (
    "a an the of on in with and photo painting drawing picture image "
    "red green blue yellow orange purple pink white black gray brown "
    "circle square triangle star ring stripe stripes dot dots shape shapes "
    "big small large tiny bright dark colorful background sky sea field flower flowers tree "
    "sunset night day cat dog bird house mountain city car boat"
).split()


def tiny_sd_configs() -> dict:
    """Configs of the tiny SD1.5-shaped preset: cross-attention down/up blocks, GroupNorm with a
    divisor of the channels, a CLIP text encoder and an AutoencoderKL (factor 2)."""
    return {
        "unet": dict(
            sample_size=TINY_SD_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=2,  # diffusers' legacy name: 2 heads (head dim 16 and 32)
            norm_num_groups=8,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TINY_SD_RESOLUTION,
            scaling_factor=1.0,
        ),
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
        ),
        "scheduler": dict(  # SD1.5's schedule
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="epsilon",
        ),
    }


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-unicode table (byte-level BPE alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_tiny_tokenizer(words=TINY_SD_WORDS):
    """A byte-level CLIP BPE tokenizer (77 tokens) that works offline: every byte is a token, and
    each word of `words` gets a merge chain so it encodes as one token."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    for c in alphabet:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append(pair)
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_sd(seed: int = 0) -> dict:
    """Instantiate the tiny preset with seeded weights (not yet saved)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfgs = tiny_sd_configs()
    tokenizer = build_tiny_tokenizer()
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **cfgs["text_encoder"],
            )
        )
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**cfgs["scheduler"]),
    )


def save_pipeline_dir(parts: dict, path: str | os.PathLike) -> Path:
    """Write components in the diffusers pipeline layout (model_index.json + one folder each),
    atomically: a half-written directory is never visible under `path`."""
    path = Path(path)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": _diffusers_version()}
        for name, obj in parts.items():
            obj.save_pretrained(tmp / name)
            library = "transformers" if type(obj).__module__.startswith("transformers") else "diffusers"
            index[name] = [library, type(obj).__name__]
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def cache_dir() -> Path:
    root = os.environ.get("REFL_ENGINE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "refl-engine"
    )
    return Path(root)


def tiny_sd_path(seed: int = 0) -> Path:
    """The tiny preset's pipeline directory, built on first use."""
    key = hashlib.sha256(json.dumps([tiny_sd_configs(), list(TINY_SD_WORDS), seed, _diffusers_version()],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"tiny-sd-{key}"
    if not (path / "model_index.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_pipeline_dir(build_tiny_sd(seed), path)
    return path


PRESETS = {"tiny-sd": tiny_sd_path}


# ---------------------------------------------------------------- loading

def resolve_model(model: str | None) -> str:
    """A preset name, a local diffusers directory or a hub id -> something from_pretrained takes."""
    if model is None or model == "":
        from ..toyworld import default_model_path  # the embedded default

        return str(default_model_path())
    if model in PRESETS:
        return str(PRESETS[model]())
    path = Path(model).expanduser()
    looks_local = path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        if not path.exists():
            raise ConfigError(
                f"--model {model!r}: no such directory; give a diffusers model directory, a hub id "
                f"(owner/name) or a preset ({', '.join(PRESETS)})"
            )
        if not (path / "model_index.json").exists() and not (path / "unet" / "config.json").exists():
            raise ConfigError(
                f"--model {model!r} is not a diffusers model directory (no model_index.json or unet/config.json); "
                "point it at the folder saved by save_pretrained"
            )
        return str(path)
    return model  # a hub id


def load_pipeline_components(model: str | None, revision: str | None = None,
                             dtype: torch.dtype = torch.float32) -> Components:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    where = resolve_model(model)
    kw = dict(revision=revision) if revision else {}
    try:
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype, **kw)
        scheduler = DDIMScheduler.from_pretrained(where, subfolder="scheduler", **kw)
        text_encoder_2 = tokenizer_2 = None
        kind = "sd15"
        if unet.config.addition_embed_type == "text_time":
            kind = "sdxl"
            tokenizer_2 = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                where, subfolder="text_encoder_2", torch_dtype=dtype, **kw
            )
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load diffusers model {model!r} ({first}); check the path or hub id, and that it holds "
            "unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        ) from None
    # DDIM with SD's conventions whatever scheduler the model ships with.
    scheduler = DDIMScheduler.from_config(scheduler.config)
    native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    return Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      kind=kind, path=where, native_resolution=int(native),
                      text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)

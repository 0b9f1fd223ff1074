"""Load diffusers components from a local directory or a hub id, and build the tiny presets.

A preset is built from config with seeded weights, written with `save_pretrained` into a cache
directory and then loaded back through `load_pipeline_components`, the same code a real model
takes, so the tests exercise the real loading path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, check_resolution, resolution_multiple

log = logging.getLogger(__name__)


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
    force_zeros_for_empty_prompt: bool = True  # SDXL's model_index: CFG's negative is zeros, not ""
    _pipeline: object | None = field(default=None, repr=False, compare=False)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_size(self, resolution: int = 0, height: int = 0, width: int = 0) -> tuple[int, int]:
        """(height, width) in pixels: --height/--width, else --resolution, else the native size. A
        side the VAE and UNet cannot down-sample evenly is a ConfigError naming the flag."""
        multiple = resolution_multiple(self.vae.config.block_out_channels, self.unet.config.block_out_channels)
        sides = []
        for name, side in (("height", height), ("width", width)):
            if not side:
                name, side = "resolution", resolution or self.native_resolution
            check_resolution(side, multiple, name)
            sides.append(side)
        return sides[0], sides[1]

    def pipeline(self):
        """The diffusers pipeline around these very modules (no copies): the engine encodes
        prompts and builds SDXL's time ids with its code, so training conditions the UNet as
        sampling with the pipeline does."""
        if self._pipeline is None:
            self._pipeline = build_pipeline(self.kind, dict(
                vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
                scheduler=self.scheduler, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
            ), self.force_zeros_for_empty_prompt)
        return self._pipeline


def build_pipeline(kind: str, parts: dict, force_zeros_for_empty_prompt: bool = True):
    """A StableDiffusionPipeline (kind "sd15") or StableDiffusionXLPipeline ("sdxl") holding `parts`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if kind == "sdxl":
        return StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                                         add_watermarker=False)
    parts = {k: v for k, v in parts.items() if not k.endswith("_2")}
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


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


def build_tiny_tokenizer(words=TINY_SD_WORDS, pad_token: str = "<|endoftext|>"):
    """A byte-level CLIP BPE tokenizer (77 tokens) that works offline: every byte is a token, and
    each word of `words` gets a merge chain so it encodes as one token. SDXL's second tokenizer
    pads with "!" instead of the end token."""
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
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad_token)


def clip_text_config(cfg: dict, tokenizer):
    """A CLIPTextConfig for `tokenizer`'s vocabulary and special tokens (the pooled output is read
    at the end token)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **cfg)


def build_tiny_sd(seed: int = 0) -> dict:
    """Instantiate the tiny preset with seeded weights (not yet saved)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfgs = tiny_sd_configs()
    tokenizer = build_tiny_tokenizer()
    devnull = torch.random.fork_rng(devices=[])
    with devnull:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(clip_text_config(cfgs["text_encoder"], tokenizer))
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**cfgs["scheduler"]),
    )


# ---------------------------------------------------------------- tiny-sdxl (shaped like SDXL)

TINY_SDXL_RESOLUTION = 32


def tiny_sdxl_configs() -> dict:
    """Configs of the tiny SDXL-shaped preset, SDXL's architecture at toy width: no attention in the
    first down level, several transformer layers deeper, linear projections, two CLIP text
    encoders whose penultimate states are concatenated (cross-attention 32 + 32), the second's
    pooled projection plus six size/crop time ids as the added embedding, SDXL's scheduler
    config (EulerDiscrete, which the loader converts to DDIM) and a VAE with `force_upcast`."""
    sd = tiny_sd_configs()
    te_dim, te2_proj, time_dim = sd["text_encoder"]["hidden_size"], 32, 8
    return {
        "unet": dict(
            sample_size=TINY_SDXL_RESOLUTION // 2,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),  # diffusers' legacy name: heads per level, as SDXL's (5, 10, 20)
            use_linear_projection=True,
            cross_attention_dim=2 * te_dim,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            # six time ids (original size, crop top-left, target size) + the pooled text embedding
            projection_class_embeddings_input_dim=6 * time_dim + te2_proj,
            norm_num_groups=8,
        ),
        # tiny-sd's VAE (scaling factor 1: random weights do not need SDXL's 0.13025) with SDXL's
        # force_upcast
        "vae": dict(sd["vae"], sample_size=TINY_SDXL_RESOLUTION, force_upcast=True),
        # CLIP ViT-L's text tower (quick_gelu) and OpenCLIP bigG's (gelu, projection) at toy width,
        # three layers so the penultimate states SDXL takes are not the embeddings' next layer
        "text_encoder": dict(sd["text_encoder"], num_hidden_layers=3, hidden_act="quick_gelu"),
        "text_encoder_2": dict(sd["text_encoder"], num_hidden_layers=3, hidden_act="gelu", projection_dim=te2_proj),
        # SD's schedule as stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json writes it
        "scheduler": dict(sd["scheduler"], interpolation_type="linear", sample_max_value=1.0, skip_prk_steps=True,
                          timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False),
    }


def build_tiny_sdxl(seed: int = 0) -> dict:
    """Instantiate the tiny SDXL preset with seeded weights (not yet saved)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfgs = tiny_sdxl_configs()
    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer(pad_token="!")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(clip_text_config(cfgs["text_encoder"], tokenizer))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(cfgs["text_encoder_2"], tokenizer_2))
    return dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler.from_config(cfgs["scheduler"]),
    )


def save_pipeline_dir(parts: dict, path: str | os.PathLike) -> Path:
    """Write components with the diffusers pipeline's own `save_pretrained` (model_index.json + one
    folder each; SDXL when `parts` has a second text encoder), atomically: a half-written directory
    is never visible under `path`."""
    path = Path(path)
    kind = "sdxl" if "text_encoder_2" in parts else "sd15"
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        build_pipeline(kind, parts).save_pretrained(tmp, safe_serialization=True)
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


def _preset_path(name: str, build, key_parts: list, seed: int) -> Path:
    """A preset's pipeline directory in the cache, keyed by everything that shapes its weights;
    built and saved on first use."""
    key = hashlib.sha256(json.dumps([*key_parts, seed, _diffusers_version()],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / f"{name}-{key}"
    if not (path / "model_index.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_pipeline_dir(build(seed), path)
    return path


def tiny_sd_path(seed: int = 0) -> Path:
    """The tiny SD1.5-shaped preset's pipeline directory, built on first use."""
    return _preset_path("tiny-sd", build_tiny_sd, [tiny_sd_configs(), list(TINY_SD_WORDS)], seed)


def tiny_sdxl_path(seed: int = 0) -> Path:
    """The tiny SDXL-shaped preset's pipeline directory, built on first use."""
    return _preset_path("tiny-sdxl", build_tiny_sdxl, [tiny_sdxl_configs(), list(TINY_SD_WORDS)], seed)


PRESETS = {"tiny-sd": tiny_sd_path, "tiny-sdxl": tiny_sdxl_path}

# The embedded default model: the toyworld pipeline shipped in the package (engine/toyworld/,
# which builds it with this module; this module only reads the directory).
EMBEDDED_PIPELINE = Path(__file__).resolve().parent.parent / "toyworld" / "pipeline"


def default_model_path() -> Path:
    """The shipped pretrained pipeline; if it is missing or incomplete (no model_index.json),
    the randomly initialized tiny-sd preset, with a warning."""
    if (EMBEDDED_PIPELINE / "model_index.json").is_file():
        return EMBEDDED_PIPELINE
    log.warning("the pretrained toyworld pipeline is missing (%s has no model_index.json); falling back to the "
                "randomly initialized tiny-sd preset, whose samples are noise. Rebuild it with "
                "`python -m refl_engine.toyworld.pretrain --out %s`", EMBEDDED_PIPELINE, EMBEDDED_PIPELINE)
    return tiny_sd_path()


# ---------------------------------------------------------------- loading

def resolve_model(model: str | None) -> str:
    """A preset name, a local diffusers directory or a hub id -> something from_pretrained takes."""
    if model is None or model == "":
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
                             dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
                             variant: str | None = None) -> Components:
    """Each component with its own class's from_pretrained (no safety checker, watermarker or
    feature extractor), the scheduler converted to DDIM, `force_zeros_for_empty_prompt` from the
    pipeline's model_index.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    where = resolve_model(model)
    kw = {k: v for k, v in dict(revision=revision, cache_dir=cache_dir).items() if v}
    wkw = dict(kw, variant=variant) if variant else kw  # --variant names weights files: *.fp16.safetensors
    try:
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", torch_dtype=dtype, **wkw)
        vae = AutoencoderKL.from_pretrained(where, subfolder="vae", torch_dtype=dtype, **wkw)
        tokenizer = AutoTokenizer.from_pretrained(where, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", torch_dtype=dtype, **wkw)
        scheduler = DDIMScheduler.from_pretrained(where, subfolder="scheduler", **kw)
        text_encoder_2 = tokenizer_2 = None
        kind = "sd15"
        force_zeros = True
        if unet.config.addition_embed_type == "text_time":
            kind = "sdxl"
            tokenizer_2 = AutoTokenizer.from_pretrained(where, subfolder="tokenizer_2", **kw)
            text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                where, subfolder="text_encoder_2", torch_dtype=dtype, **wkw
            )
            # the pipeline's default when model_index.json does not say
            force_zeros = DiffusionPipeline.load_config(where, **kw).get("force_zeros_for_empty_prompt", True)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load diffusers model {model!r} ({first}); check the path or hub id, and that it holds "
            "unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        ) from None
    # DDIM with the model's schedule (betas, offset, spacing, prediction type) whatever scheduler it
    # ships with (SDXL: EulerDiscrete), as `DDIMScheduler.from_config(pipe.scheduler.config)` gives users.
    scheduler = DDIMScheduler.from_config(scheduler.config)
    native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    c = Components(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                   kind=kind, path=where, native_resolution=int(native),
                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                   force_zeros_for_empty_prompt=bool(force_zeros))
    # Build the pipeline now: its constructor settles the scheduler's config (StableDiffusionPipeline
    # turns an old DDIM config's clip_sample off) before the engine reads the schedule from it.
    c.pipeline()
    return c


def vae_dtype(vae_config, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the VAE decodes in: fp32 when the weights are fp16 and the VAE's config says
    `force_upcast` (SDXL's VAE overflows in fp16; its pipeline upcasts to decode), else the weights'."""
    if weight_dtype == torch.float16 and getattr(vae_config, "force_upcast", False):
        return torch.float32
    return weight_dtype

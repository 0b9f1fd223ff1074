"""Combined generation (ImageReFL paper, section 4.2): the first `handover` of N DDIM steps with the
BASE model and its classifier-free guidance (7.5 by default), the rest with the FINE-TUNED model
and its own guidance (1 = none by default, which the paper found best). The early steps set the
layout, so the base model's diversity survives; the late ones set the detail the reward liked.

With LoRA the base model is the same UNet with the adapter switched off: one copy of the weights.
A full fine-tune needs the second UNet, which is loaded.

    refl-generate --finetuned outputs/run --handover 10 --num_inference_steps 40

`--finetuned` is a training output directory (its latest checkpoint and config), an exported LoRA
(`pytorch_lora_weights.safetensors` or its folder) or a full-fine-tune UNet directory. Writes
`grid-handover<n>.png` and per-image PNGs with `images.json` (prompt, seed, handover, steps,
guidance) into --output_dir.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]

import torch

from refl_engine.config import ConfigError, arg
from refl_engine.sampling import DDIMSchedule, randn

log = logging.getLogger("refl_engine")


# ---------------------------------------------------------------- the two models

@dataclass
class CombinedModel:
    """The fine-tuned UNet and the way to get the base one: `base_unet` None means the same UNet
    with its LoRA adapter off."""

    components: object  # models.load.Components; components.unet is the fine-tuned UNet
    base_unet: torch.nn.Module | None = None
    source: str = ""

    @property
    def unet(self):
        return self.components.unet

    @contextlib.contextmanager
    def base(self):
        """The base model for the block's duration."""
        if self.base_unet is not None:
            yield self.base_unet
            return
        from refl_engine.regularizers import adapter_disabled

        with adapter_disabled(self.unet) as unet:
            yield unet


def _load_trainable(unet, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    params = dict(unet.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ConfigError(f"{path} does not match this model (e.g. {missing[0]}); give the --model it was trained on")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].dtype))


def _weights_in(folder: Path) -> tuple[str, Path] | None:
    """The fine-tuned weights a folder holds, loadable formats first: ("lora", file), ("unet",
    folder) or ("trainable", the checkpoint's safetensors of trainable parameters)."""
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return "lora", folder / "pytorch_lora_weights.safetensors"
    for unet_dir in (folder / "unet", folder):
        if (unet_dir / "config.json").is_file() and any(unet_dir.glob("diffusion_pytorch_model*")):
            return "unet", unet_dir
    if (folder / "trainable.safetensors").is_file():
        return "trainable", folder / "trainable.safetensors"
    return None


def load_combined(finetuned: str, model: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> CombinedModel:
    """Base + fine-tuned from a training output dir (its latest checkpoint, else its exported
    weights; the base model from its config.json unless `model` is given), an exported LoRA
    (file or folder) or a full-fine-tune UNet folder."""
    from refl_engine.checkpoint import list_checkpoints
    from refl_engine.models.load import load_pipeline_components
    from refl_engine.models.lora import add_lora

    src = Path(finetuned).expanduser()
    if not src.exists():
        raise ConfigError(f"--finetuned {finetuned!r}: no such file or folder; give a training --output_dir, "
                          "a pytorch_lora_weights.safetensors or a fine-tuned unet folder")
    train: dict = {}
    found = None
    if src.is_file() and src.suffix == ".safetensors":
        found = ("lora", src)
    elif src.is_dir():
        if (src / "config.json").is_file() and (src / "checkpoints").is_dir():  # a training output dir
            train = json.loads((src / "config.json").read_text())
            for folder in list(reversed(list_checkpoints(src / "checkpoints")))[:1] + [src]:
                found = found or _weights_in(folder)
        else:
            found = _weights_in(src)
    if found is None or (found[0] == "trainable" and not train):
        raise ConfigError(f"--finetuned {finetuned!r} is not a training output dir (config.json + checkpoints/), a "
                          "LoRA .safetensors or a diffusers UNet folder")
    kind, path = found
    m = train.get("model", {})
    c = load_pipeline_components(model or m.get("model"), dtype=dtype)
    base = None
    if kind == "lora":
        try:
            c.unet.load_lora_adapter(str(path), prefix="unet", adapter_name="default")
        except (ValueError, KeyError, RuntimeError) as e:
            raise ConfigError(f"cannot load LoRA {str(path)!r} into the base model ({str(e).splitlines()[0]}); "
                              "give the --model it was trained on") from None
    elif kind == "unet":
        from diffusers import UNet2DConditionModel

        base, c.unet = c.unet, UNet2DConditionModel.from_pretrained(str(path), torch_dtype=dtype)
    elif m.get("rank", 0) > 0:  # a checkpoint's trainable parameters: rebuild the adapter as trained
        add_lora(c.unet, m["rank"], m.get("lora_alpha", 0.0), m.get("lora_target_modules", "to_q,to_k,to_v,to_out.0"))
        _load_trainable(c.unet, path)
    else:
        base = load_pipeline_components(model or m.get("model"), dtype=dtype).unet
        _load_trainable(c.unet, path)
    for module in (c.unet, base, c.vae, c.text_encoder, c.text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return CombinedModel(c, base, str(path))


# ---------------------------------------------------------------- sampling

@torch.no_grad()
def combined_generate(model: CombinedModel, prompts: list[str], seeds: list[int], handover: int,
                      num_inference_steps: int, base_guidance_scale: float = 7.5, guidance_scale: float = 1.0,
                      resolution: int = 0, height: int = 0, width: int = 0, progress: bool = False) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1]; image b starts from the noise of `seeds[b]`, so one seed
    gives the same start at every hand-over. Steps 0..handover-1 use the base model, the rest the
    fine-tuned one."""
    from refl_engine.models.conditioning import TextEncoderCache, make_eps_fn

    c = model.components
    if not 0 <= handover <= num_inference_steps:
        raise ConfigError(f"--handover {handover} must be in 0..{num_inference_steps} (--num_inference_steps)")
    device = next(model.unet.parameters()).device
    dtype = next(model.unet.parameters()).dtype
    height, width = c.image_size(resolution, height, width)
    text = TextEncoderCache(c, device, dtype, height, width)
    schedule = DDIMSchedule.from_scheduler(c.scheduler, num_inference_steps)
    shape = (c.unet.config.in_channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
    x = torch.stack([randn(shape, torch.Generator().manual_seed(s), device, dtype) for s in seeds])
    base_cond = text.conditioning(prompts, cfg=base_guidance_scale > 1.0)
    tuned_cond = text.conditioning(prompts, cfg=guidance_scale > 1.0)
    from tqdm.auto import tqdm

    for i in tqdm(range(num_inference_steps), desc=f"handover {handover}", disable=not progress, leave=False):
        t = schedule.timesteps[i].to(device)
        if i < handover:
            with model.base() as unet:
                out = make_eps_fn(unet, base_cond, base_guidance_scale)(x, t)
        else:
            out = make_eps_fn(model.unet, tuned_cond, guidance_scale)(x, t)
        x = schedule.step(i, x, out)
    vae = c.vae
    z = x.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
    return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1).cpu()


# ---------------------------------------------------------------- the CLI

def load_reward(spec: str, device):
    """A reward to caption the grids with (--reward, the training CLI's flag)."""
    from refl_engine.rewards.base import RewardSpecError, build_reward

    try:
        return build_reward(spec).to(device).eval()
    except (RewardSpecError, FileNotFoundError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


@dataclass
class GenerateArgs:
    _argument_group_name = "generate"
    finetuned: str = arg("", "a training --output_dir, an exported LoRA (.safetensors or its folder) or a "
                             "fine-tuned UNet folder")
    handover: str = arg("0", "steps run by the base model before the fine-tuned one takes over; a comma list "
                             "makes one grid each (e.g. 0,10,20)")
    base_guidance_scale: float = arg(7.5, "classifier-free guidance of the base model's steps", valid="[0, inf)")
    num_prompts: int = arg(4, "how many prompts of --prompts to use", valid="[1, inf)")
    images_per_prompt: int = arg(2, "images per prompt (prompt p's image m has seed --seed + p M + m)",
                                 valid="[1, inf)")


def check_ranges(options) -> None:
    """An entry point's own options against their declared `valid` ranges (one-line errors)."""
    import dataclasses

    from refl_engine.config import in_interval

    for f in dataclasses.fields(options):
        valid, value = f.metadata.get("valid"), getattr(options, f.name)
        if valid and not (isinstance(value, (int, float)) and math.isfinite(value) and in_interval(value, valid)):
            raise ConfigError(f"--{f.name} {value!r} is out of range; valid {valid}")


def parse_handovers(spec: str, num_steps: int, flag: str = "--handover") -> list[int]:
    try:
        values = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be integers separated by commas, got {spec!r}") from None
    if not values or any(not 0 <= v <= num_steps for v in values):
        raise ConfigError(f"{flag} {spec!r}: each value must be in 0..{num_steps} (--num_inference_steps)")
    return values


def prompt_seed_grid(prompts: list[str], num_prompts: int, images_per_prompt: int, seed: int):
    """P prompts x M images, prompt-major: prompt p's image m has seed `seed + p M + m`, so every
    image of the set starts from its own noise."""
    chosen = prompts[:num_prompts]
    return ([p for p in chosen for _ in range(images_per_prompt)],
            [seed + i for i in range(len(chosen) * images_per_prompt)])


def save_images(images: torch.Tensor, records: list[dict], out: Path) -> None:
    """Per-image PNGs and images.json with each one's metadata (appended to what is there)."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    px = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype("uint8")
    for im, rec in zip(px, records):
        Image.fromarray(im).save(out / rec["file_name"])
    index = out / "images.json"
    old = json.loads(index.read_text()) if index.is_file() else []
    names = {r["file_name"] for r in records}
    index.write_text(json.dumps([r for r in old if r["file_name"] not in names] + records, indent=2))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from refl_engine.config import parse_args
        from refl_engine.data import load_prompts

        cfg, g = parse_args(argv, prog="refl-generate", extra=(GenerateArgs,), description=__doc__.splitlines()[0])
        check_ranges(g)
        if not g.finetuned:
            raise ConfigError("--finetuned is required: a training --output_dir, a LoRA .safetensors or a UNet folder")
        n = cfg.method.num_inference_steps
        handovers = parse_handovers(g.handover, n)
        prompts, seeds = prompt_seed_grid(load_prompts(cfg.data.prompts), g.num_prompts, g.images_per_prompt,
                                          cfg.optim.seed)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_combined(g.finetuned, cfg.model.model, device)
        reward = load_reward(cfg.method.reward, device)
        out = Path(cfg.output.output_dir)
        from refl_engine.viz import save_grid

        for h in handovers:
            images = combined_generate(model, prompts, seeds, h, n, g.base_guidance_scale, cfg.method.guidance_scale,
                                       cfg.model.resolution, cfg.model.height, cfg.model.width,
                                       progress=cfg.output.progress)
            rewards = reward(images.to(device), prompts).float().cpu().tolist()
            records = [dict(file_name=f"handover{h:03d}-{i:04d}.png", prompt=p, seed=s, handover=h, steps=n,
                            base_guidance_scale=g.base_guidance_scale, guidance_scale=cfg.method.guidance_scale,
                            finetuned=model.source, **{reward.name: r})
                       for i, (p, s, r) in enumerate(zip(prompts, seeds, rewards))]
            save_images(images, records, out)
            grid = save_grid(images, prompts, rewards, out / f"grid-handover{h:03d}.png",
                             title=f"{h} base + {n - h} fine-tuned steps: mean {reward.name} "
                                   f"{sum(rewards) / len(rewards):.4f}", cols=g.images_per_prompt)
            print(f"handover {h}: {len(prompts)} images, mean {reward.name} {sum(rewards) / len(rewards):.4f}, "
                  f"grid {grid}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

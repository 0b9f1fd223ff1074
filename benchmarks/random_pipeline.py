"""A diffusers pipeline directory with the real SD1.5 architecture and random weights, for
measuring memory at real layer sizes where no checkpoint can be downloaded.

The UNet, VAE and text encoder come from the public configs in engine/configs; the tokenizer is
the tiny preset's (its ids fit the real vocabulary, and prompts only set the conditioning's shape).
Weights are seeded; bytes and shapes, not images, are what this is for.

    python benchmarks/random_pipeline.py --out /tmp/sd15-random
    python benchmarks/memory.py --model /tmp/sd15-random --resolution 256 --steps 4 --batch-size 1 \
        --threads 2 --no-timing --rows 'draft,1,full;draft,1,selective' --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parent.parent / "engine" / "configs"


def _config(name: str) -> dict:
    return {k: v for k, v in json.loads((CONFIGS / name).read_text()).items() if not k.startswith("_")}


def build_sd15(out: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from refl_engine.models.load import build_tiny_tokenizer, save_pipeline_dir, tiny_sd_configs

    torch.manual_seed(seed)
    tokenizer = build_tiny_tokenizer()
    te_cfg = _config("sd15_text_encoder_config.json")
    te_cfg.pop("architectures", None)
    parts = dict(
        unet=UNet2DConditionModel(**_config("sd15_unet_config.json")),
        vae=AutoencoderKL(**_config("sd15_vae_config.json")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**te_cfg)),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(**tiny_sd_configs()["scheduler"]),
    )
    return save_pipeline_dir(parts, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = build_sd15(Path(args.out), args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

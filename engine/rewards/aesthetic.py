"""LAION improved aesthetic predictor v2 (Schuhmann et al. 2022).

score = MLP(normalize(CLIP ViT-L/14 image embedding)), the MLP being five linear layers
768-1024-128-64-16-1 with no nonlinearity between them (dropouts only, off at inference). It
regresses the 1-10 AVA/LAION aesthetic rating.

Files: sac+logos+ava1-l14-linearMSE.pth (the MLP's state dict, keys layers.{0,2,4,6,7}.{weight,bias}:
the odd indices are the Dropouts of the training Sequential) and the OpenAI CLIP ViT-L/14 model
directory in transformers' layout (openai/clip-vit-large-patch14).

`--reward aesthetic:PATH` takes either
  - a directory holding sac+logos+ava1-l14-linearMSE.pth and the CLIP directory, which is PATH itself
    (config.json there) or its subdirectory clip-vit-large-patch14/, or
  - the .pth file itself; CLIP then comes from the hub id openai/clip-vit-large-patch14.
With no path, both come from the hub (the MLP from camenduru/improved-aesthetic-predictor, a copy of
the file published in christophschuhmann/improved-aesthetic-predictor on GitHub).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from .base import (
    Reward,
    RewardFiles,
    RewardWeightsError,
    _one_line,
    fetch_hub_file,
    find_in_dir,
    load_state_dict_file,
    register_reward,
)
from .pickscore import _from_pretrained, clip_vision_backbone
from .preprocess import ImagePreprocess, at_least_float32 as f32

MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
MLP_HUB_ID = "camenduru/improved-aesthetic-predictor"
CLIP_L14_HUB_ID = "openai/clip-vit-large-patch14"
CLIP_SUBDIR = "clip-vit-large-patch14"
CLIP_L14_VISION_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "clip_vit_l14_vision_config.json"


class LinearStackHead(nn.Module):
    """in -> 1024 -> 128 -> 64 -> 16 -> 1, purely linear, laid out as the published Sequential.

    The published checkpoints (LAION aesthetic, ImageReward's head) were trained as
    Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear); Dropout is the
    identity here, but its slots keep the Linear layers at indices 0, 2, 4, 6, 7 so the keys match.
    """

    widths = (1024, 128, 64, 16, 1)
    dropouts = (0.2, 0.2, 0.1)

    def __init__(self, in_features: int = 768):
        super().__init__()
        modules: list[nn.Module] = []
        width = in_features
        for i, out in enumerate(self.widths):
            modules.append(nn.Linear(width, out))
            if i < len(self.dropouts):
                modules.append(nn.Dropout(self.dropouts[i]))
            width = out
        self.layers = nn.Sequential(*modules)

    def forward(self, x):
        return self.layers(x)


class LaionAesthetic(Reward):
    name = "aesthetic"
    # The rating scale the MLP regresses (AVA / LAION ratings 1-10); generated images land ~4.5-7.
    bounds = (1.0, 10.0)

    def __init__(self, vision, head: LinearStackHead, output: str = "raw"):
        super().__init__(output)
        self.vision = vision  # transformers CLIPVisionModelWithProjection
        self.head = head
        cfg = vision.config
        self.input_size = cfg.image_size
        # The official predictor embeds with OpenAI CLIP's torchvision transform (round crop);
        # transformers' processor for the same model floors. Equal for square images.
        self.preprocess = ImagePreprocess(size=cfg.image_size, crop_rounding="floor")
        self.backbone = clip_vision_backbone(cfg)
        self.backbone["num_params"] = sum(p.numel() for p in self.parameters())
        self.recompute_layers = tuple(vision.vision_model.encoder.layers)
        self.freeze()

    def score(self, images, prompts):
        weight = self.vision.visual_projection.weight
        pixels = self.preprocess(f32(images)).to(weight.dtype)
        embeds = self.vision(pixel_values=pixels).image_embeds
        embeds = F.normalize(f32(embeds), dim=-1).to(self.head.layers[0].weight.dtype)
        return f32(self.head(embeds).squeeze(-1))


def load_head(file: Path, in_features: int = 768) -> LinearStackHead:
    head = LinearStackHead(in_features)
    state = load_state_dict_file(file, MLP_FILE)
    if not isinstance(state, dict):
        raise RewardWeightsError(f"{file} is not a {MLP_FILE} state dict")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0] if str(err) else ""
        raise RewardWeightsError(
            f"{file} does not have the key layout of {MLP_FILE} (layers.0/2/4/6/7): {first[:200]}"
        ) from None
    return head


def _load_vision_tower(source: str):
    """CLIPVisionModelWithProjection out of a full CLIPModel directory, without its text tower."""
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    expected = "the CLIP ViT-L/14 model directory"
    config = _from_pretrained(AutoConfig, source, expected)
    if getattr(config, "model_type", None) == "clip":
        # The projection width lives at the top of a CLIPConfig; the vision sub-config may not repeat it.
        vision_config = config.vision_config
        vision_config.projection_dim = config.projection_dim
    else:
        vision_config = config
    from transformers.utils import logging as hf_logging

    # The text tower's weights in the directory are skipped on purpose; silence that report.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return CLIPVisionModelWithProjection.from_pretrained(source, config=vision_config).float()
    except Exception as err:  # noqa: BLE001
        raise RewardWeightsError(f"could not load {expected} from {source} ({_one_line(err)})") from None
    finally:
        hf_logging.set_verbosity(level)


def load_aesthetic(path: str | None = None, output: str = "raw") -> LaionAesthetic:
    if path is None:
        mlp_file, clip_source = fetch_hub_file(MLP_HUB_ID, MLP_FILE), CLIP_L14_HUB_ID
    else:
        root = Path(path)
        mlp_file = find_in_dir(root, [MLP_FILE], MLP_FILE)
        if root.is_file():
            clip_source = CLIP_L14_HUB_ID
        elif (root / "config.json").is_file():
            clip_source = str(root)
        elif (root / CLIP_SUBDIR / "config.json").is_file():
            clip_source = str(root / CLIP_SUBDIR)
        else:
            raise RewardWeightsError(
                f"expected the CLIP ViT-L/14 model directory (config.json + weights) in {root} or {root / CLIP_SUBDIR}"
            )
    vision = _load_vision_tower(clip_source)
    head = load_head(Path(mlp_file), vision.config.projection_dim)
    return LaionAesthetic(vision, head, output=output)


def build_random_aesthetic(output: str = "raw") -> LaionAesthetic:
    """The reward at its real size with random weights (benchmarks; nothing is downloaded): the
    CLIP ViT-L/14 vision tower of configs/clip_vit_l14_vision_config.json and the published MLP widths."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = json.loads(CLIP_L14_VISION_CONFIG.read_text())
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    return LaionAesthetic(vision.float(), LinearStackHead(vision.config.projection_dim), output=output)


register_reward("aesthetic", "LAION aesthetic v2: CLIP ViT-L/14 + MLP (path: dir with the .pth and CLIP dir)",
                files=RewardFiles(local=(MLP_FILE,), hub=((MLP_HUB_ID, MLP_FILE), (CLIP_L14_HUB_ID, "config.json")))
                )(load_aesthetic)

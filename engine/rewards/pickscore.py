"""PickScore (Kirstain et al. 2023): CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

score = logit_scale.exp() * cos(image_embeds, text_embeds) of a transformers CLIPModel, as the
official inference code computes it (about 100 x cosine; SD1.5 images score around 21, tuned
models 23-25). `ClipPreferenceReward` is the shared "CLIP dual encoder" reward; HPSv2 (hps.py)
is the same computation on an OpenCLIP checkpoint mapped into CLIPModel.

Files: the PickScore_v1 model directory (config.json + model.safetensors or pytorch_model.bin, the
hub repo yuvalkirstain/PickScore_v1). That repo has no tokenizer; the official code takes the
processor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, and so does this module unless the directory
holds tokenizer files of its own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from .base import Reward, RewardFiles, RewardWeightsError, _one_line, register_reward
from .preprocess import ImagePreprocess, at_least_float32 as f32, tokenize

PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
LAION_VIT_H14_HUB_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
# The OpenCLIP ViT-H/14 that PickScore_v1 and HPSv2 both fine-tune (open_clip model_configs schema).
VIT_H14_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "hps_openclip_vit_h14.json"


def clip_vision_backbone(vision_config, kind: str = "clip_vision") -> dict:
    """The planner's description of a CLIP vision tower (the part the image gradient crosses)."""
    c = vision_config
    return {
        "kind": kind,
        "config": {
            "hidden_size": c.hidden_size,
            "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "patch": c.patch_size,
            "image_size": c.image_size,
        },
        "activation_checkpointing": "per_layer",
    }


class ClipPreferenceReward(Reward):
    """logit_scale.exp() * cos(image, prompt) with a frozen transformers CLIPModel.

    The text side carries no gradient (it does not depend on the image), so it runs under
    no_grad; the vision tower's layers are checkpointed.
    """

    def __init__(self, model, tokenizer, output: str = "raw", crop_rounding: str = "floor", text_attention_mask: bool = True):
        super().__init__(output)
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.input_size = vision.image_size
        self.preprocess = ImagePreprocess(size=vision.image_size, crop_rounding=crop_rounding)
        self.max_length = model.config.text_config.max_position_embeddings
        # PickScore's processor hands CLIP an attention mask; OpenCLIP (HPS) uses none. With a causal
        # text tower and end-of-text pooling the two agree; the flag keeps each model's own call.
        self.text_attention_mask = text_attention_mask
        self.backbone = clip_vision_backbone(vision)
        # Every weight stays resident (text tower included); the planner counts them as frozen bytes.
        self.backbone["num_params"] = sum(p.numel() for p in model.parameters())
        self.recompute_layers = tuple(model.vision_model.encoder.layers)
        self.freeze()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.model.visual_projection.weight
        pixels = self.preprocess(f32(images)).to(weight.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = tokenize(self.tokenizer, prompts, self.max_length, self.model.logit_scale.device)
        mask = tokens.get("attention_mask") if self.text_attention_mask else None
        pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=mask).pooler_output
        return self.model.text_projection(pooled)

    def score(self, images, prompts):
        img = F.normalize(f32(self.image_embeds(images)), dim=-1)
        txt = F.normalize(f32(self.text_embeds(prompts)), dim=-1)
        return f32(self.model.logit_scale.exp()) * (img * txt).sum(dim=-1)


class PickScore(ClipPreferenceReward):
    name = "pickscore"
    # Observed range, not a hard limit (rescaled values may leave [0, 1]; nothing is clamped so the
    # gradient never dies): SD1.5 samples ~20-21.5, reward-tuned SD1.5/SDXL 23.5-24.7 (ImageReFL Table 3).
    bounds = (15.0, 25.0)


def _from_pretrained(cls, source: str, expected: str):
    try:
        return cls.from_pretrained(source)
    except Exception as err:  # noqa: BLE001
        raise RewardWeightsError(f"could not load {expected} from {source} ({_one_line(err)})") from None


def load_clip_tokenizer(path: Path | None, fallback_hub_id: str):
    from transformers import AutoTokenizer

    if path is not None and path.is_dir() and any((path / f).is_file() for f in _TOKENIZER_FILES):
        return _from_pretrained(AutoTokenizer, str(path), f"the CLIP tokenizer in {path}")
    return _from_pretrained(AutoTokenizer, fallback_hub_id, "the CLIP tokenizer")


def load_pickscore(path: str | None = None, output: str = "raw") -> PickScore:
    """`path`: the PickScore_v1 model directory; None = the hub id yuvalkirstain/PickScore_v1."""
    from transformers import CLIPModel

    expected = "the PickScore_v1 model directory (config.json + model.safetensors or pytorch_model.bin)"
    if path is not None:
        root = Path(path)
        if not (root / "config.json").is_file():
            raise RewardWeightsError(f"expected {expected} at {root}, found no config.json there")
        source = str(root)
    else:
        root, source = None, PICKSCORE_HUB_ID
    model = _from_pretrained(CLIPModel, source, expected).float()
    tokenizer = load_clip_tokenizer(root, LAION_VIT_H14_HUB_ID)
    return PickScore(model, tokenizer, output=output)


def openclip_config_to_clip_config(cfg: dict, tokenizer):
    """An OpenCLIP model config (open_clip's model_configs/*.json schema) as a transformers CLIPConfig."""
    from transformers import CLIPConfig

    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    v_width, t_width = vision["width"], text["width"]
    vision_config = dict(
        hidden_size=v_width,
        intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)),
        num_hidden_layers=vision["layers"],
        num_attention_heads=v_width // vision.get("head_width", 64),
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=cfg["embed_dim"],
    )
    text_config = dict(
        vocab_size=text.get("vocab_size", 49408),
        hidden_size=t_width,
        intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
        num_hidden_layers=text["layers"],
        num_attention_heads=text.get("heads", 8),
        max_position_embeddings=text.get("context_length", 77),
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=cfg["embed_dim"],
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=cfg["embed_dim"])


def random_vit_h14_clip(tokenizer):
    """The OpenCLIP ViT-H-14 of configs/hps_openclip_vit_h14.json as a transformers CLIPModel with
    random weights (HPSv2 and PickScore_v1 both fine-tune it). `tokenizer`: a CLIP tokenizer; only
    its special-token ids enter the config, the vocabulary stays the real 49408."""
    from transformers import CLIPModel

    return CLIPModel(openclip_config_to_clip_config(json.loads(VIT_H14_CONFIG.read_text()), tokenizer)).float()


def build_random_pickscore(tokenizer, output: str = "raw") -> PickScore:
    """PickScore at its real size with random weights (benchmarks; nothing is downloaded): PickScore_v1
    fine-tunes laion/CLIP-ViT-H-14, the network HPSv2 fine-tunes too."""
    return PickScore(random_vit_h14_clip(tokenizer), tokenizer, output=output)


register_reward("pickscore", "PickScore_v1: CLIP ViT-H/14, logit_scale x cosine (path: model directory)",
                files=RewardFiles(local=("config.json",), directory=True,
                                  hub=((PICKSCORE_HUB_ID, "config.json"),
                                       (LAION_VIT_H14_HUB_ID, "tokenizer_config.json")))
                )(load_pickscore)

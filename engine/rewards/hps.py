"""HPSv2 / HPSv2.1 (Wu et al. 2023): OpenCLIP ViT-H/14 fine-tuned on human preference pairs.

score = logit_scale.exp() * cos(image_embeds, text_embeds). HPSv2's own `score()` returns the bare
cosine (about 0.25-0.40); papers, ImageReFL's tables included, print it x 100 ("37.80"), which is
what the logit scale (exp = 100, the OpenCLIP clamp) gives. So raw = 100 x the official number.

The checkpoint (HPS_v2.1_compressed.pt / HPS_v2_compressed.pt on the hub repo xswu/HPSv2) is an
OpenCLIP state dict under the key "state_dict". OpenCLIP itself is not needed: the same network is
transformers' CLIPModel (laion's ViT-H/14 is published in both forms), so the keys are mapped once
at load time by the table below and the reward shares PickScore's code path (pickscore.py).

    open_clip key                                  transformers CLIPModel key
    visual.conv1.weight                            vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                         vision_model.embeddings.class_embedding
    visual.positional_embedding                    vision_model.embeddings.position_embedding.weight
    visual.ln_pre.*                                vision_model.pre_layrnorm.*
    visual.transformer.resblocks.{i}.<block>       vision_model.encoder.layers.{i}.<block>
    visual.ln_post.*                               vision_model.post_layernorm.*
    visual.proj  (width x embed)                   visual_projection.weight (transposed)
    token_embedding.weight                         text_model.embeddings.token_embedding.weight
    positional_embedding                           text_model.embeddings.position_embedding.weight
    transformer.resblocks.{i}.<block>              text_model.encoder.layers.{i}.<block>
    ln_final.*                                     text_model.final_layer_norm.*
    text_projection  (width x embed)               text_projection.weight (transposed)
    logit_scale                                    logit_scale
  <block>:
    ln_1.* / ln_2.*                                layer_norm1.* / layer_norm2.*
    attn.in_proj_weight, attn.in_proj_bias         self_attn.{q,k,v}_proj.{weight,bias} (split in 3, q k v order)
    attn.out_proj.*                                self_attn.out_proj.*
    mlp.c_fc.* / mlp.c_proj.*                      mlp.fc1.* / mlp.fc2.*

Text: OpenCLIP's tokenizer is CLIP's BPE (same vocabulary as the laion/openai CLIP tokenizers on the
hub); it pads with 0 and the model pools at the argmax token (end of text), while transformers pads
with end-of-text and pools at its first occurrence. The text tower is causal, so both pick the same
hidden state. No attention mask is passed, as OpenCLIP passes none.

`--reward hps:PATH`: the .pt file, or a directory holding HPS_v2.1_compressed.pt (or
HPS_v2_compressed.pt) and optionally the CLIP tokenizer files (vocab.json + merges.txt) and an
OpenCLIP model config as open_clip_config.json. With no path: HPS_v2.1_compressed.pt from xswu/HPSv2,
tokenizer from laion/CLIP-ViT-H-14-laion2B-s32B-b79K.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .base import RewardFiles, RewardWeightsError, fetch_hub_file, find_in_dir, load_state_dict_file, register_reward
from .pickscore import (
    LAION_VIT_H14_HUB_ID,
    VIT_H14_CONFIG,
    ClipPreferenceReward,
    load_clip_tokenizer,
    openclip_config_to_clip_config,
    random_vit_h14_clip,
)

HPS_HUB_ID = "xswu/HPSv2"
HPS_FILES = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")
OPENCLIP_CONFIG_FILE = "open_clip_config.json"

# Buffers OpenCLIP versions may have saved; they are rebuilt, never loaded.
_IGNORED_KEYS = {"attn_mask"}

_BLOCK_MAP = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP_MAP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


class HPSv2(ClipPreferenceReward):
    name = "hps"
    # In raw units (100 x cosine). Observed range, not a hard limit: SD1.5 samples ~25-28, reward-tuned
    # SD1.5/SDXL 37-40 (ImageReFL Table 3).
    bounds = (15.0, 45.0)

    def __init__(self, model, tokenizer, output: str = "raw"):
        # torchvision's CenterCrop rounds the offset; OpenCLIP passes no text attention mask.
        super().__init__(model, tokenizer, output=output, crop_rounding="round", text_attention_mask=False)


def openclip_to_clipmodel_state_dict(state: dict, source: str = "the checkpoint") -> dict:
    """Rename (and split/transpose) an OpenCLIP CLIP state dict into transformers CLIPModel keys."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key in _IGNORED_KEYS or key.endswith(".attn_mask"):
            continue
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _RESBLOCK.match(key)
        if m is None:
            raise RewardWeightsError(f"{source} has key {key!r}, which is not in the OpenCLIP ViT layout HPSv2 uses")
        tower = "vision_model" if m.group(1) else "text_model"
        prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = "weight" if rest.endswith("weight") else "bias"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
            continue
        module, _, leaf = rest.rpartition(".")
        if module not in _BLOCK_MAP:
            raise RewardWeightsError(f"{source} has key {key!r}, which is not in the OpenCLIP ViT layout HPSv2 uses")
        out[f"{prefix}{_BLOCK_MAP[module]}.{leaf}"] = value
    return out


def hps_from_openclip_state_dict(state: dict, openclip_cfg: dict, tokenizer, output: str = "raw", source: str = "the checkpoint") -> HPSv2:
    return _hps_from_mapped(openclip_to_clipmodel_state_dict(state, source), openclip_cfg, tokenizer, output, source)


def _hps_from_mapped(mapped: dict, openclip_cfg: dict, tokenizer, output: str, source: str) -> HPSv2:
    from transformers import CLIPModel

    model = CLIPModel(openclip_config_to_clip_config(openclip_cfg, tokenizer))
    expected = model.state_dict()
    missing = [k for k in expected if k not in mapped]
    unexpected = [k for k in mapped if k not in expected]
    wrong = [k for k in mapped if k in expected and mapped[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or (
            f"{wrong[0]} has shape {tuple(mapped[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}"
        )
        raise RewardWeightsError(
            f"{source} does not match the OpenCLIP architecture (ViT-H-14 unless {OPENCLIP_CONFIG_FILE} says otherwise): "
            f"{detail} ({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped)"
        )
    model.load_state_dict(mapped, strict=True)
    return HPSv2(model.float(), tokenizer, output=output)


def load_hps(path: str | None = None, output: str = "raw") -> HPSv2:
    expected = " or ".join(HPS_FILES)
    if path is None:
        file, root = fetch_hub_file(HPS_HUB_ID, HPS_FILES[0]), None
    else:
        file = find_in_dir(path, HPS_FILES, expected)
        root = file.parent  # where the optional tokenizer and open_clip_config.json sit
    checkpoint = load_state_dict_file(file, expected)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardWeightsError(f"{file} is not an HPSv2 checkpoint (expected a dict with an OpenCLIP 'state_dict')")
    mapped = openclip_to_clipmodel_state_dict(state, str(file))  # a foreign file fails here, before any tokenizer lookup
    del checkpoint, state
    cfg_file = root / OPENCLIP_CONFIG_FILE if root is not None else None
    cfg = json.loads((cfg_file if cfg_file is not None and cfg_file.is_file() else VIT_H14_CONFIG).read_text())
    tokenizer = load_clip_tokenizer(root, LAION_VIT_H14_HUB_ID)
    return _hps_from_mapped(mapped, cfg, tokenizer, output, str(file))


def build_random_hps(tokenizer, output: str = "raw") -> HPSv2:
    """HPSv2 at its real size with random weights (benchmarks; nothing is downloaded)."""
    return HPSv2(random_vit_h14_clip(tokenizer), tokenizer, output=output)


register_reward("hps", "HPSv2.1: OpenCLIP ViT-H/14, 100 x cosine (path: HPS_v2.1_compressed.pt or its directory)",
                files=RewardFiles(local=HPS_FILES, hub=((HPS_HUB_ID, HPS_FILES[0]),
                                                        (LAION_VIT_H14_HUB_ID, "tokenizer_config.json")))
                )(load_hps)

"""ImageReward at a tiny size with random weights, in the key layout of the published ImageReward.pt,
checked against transformers' BLIP modules as an independent implementation."""
from __future__ import annotations

import json

import pytest
import torch

from reward_fixtures import random_images, write_bert_tokenizer
from refl_engine.rewards.base import RewardWeightsError, build_reward
from refl_engine.rewards.imagereward import (
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardConfig,
    ImageRewardModel,
    blip_tokenizer,
    load_imagereward,
)
from refl_engine.rewards.preprocess import ImagePreprocess

PROMPTS = ["a photo of a cat", "a red car on the grass"]
TINY = dict(
    image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, vision_mlp=64,
    hidden_size=24, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
)


def published_keys(cfg: ImageRewardConfig) -> list[str]:
    """The key names of ImageReward.pt (BLIP_Pretrain + MLP), written out from the published layout."""
    keys = ["blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed"]
    keys += [f"blip.visual_encoder.patch_embed.proj.{p}" for p in ("weight", "bias")]
    for i in range(cfg.vision_layers):
        for mod in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blip.visual_encoder.blocks.{i}.{mod}.{p}" for p in ("weight", "bias")]
    keys += [f"blip.visual_encoder.norm.{p}" for p in ("weight", "bias")]
    t = "blip.text_encoder"
    keys += [f"{t}.embeddings.word_embeddings.weight", f"{t}.embeddings.position_embeddings.weight",
             f"{t}.embeddings.LayerNorm.weight", f"{t}.embeddings.LayerNorm.bias", f"{t}.embeddings.position_ids"]
    for i in range(cfg.num_hidden_layers):
        for att in ("attention", "crossattention"):
            for mod in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys += [f"{t}.encoder.layer.{i}.{att}.{mod}.{p}" for p in ("weight", "bias")]
        for mod in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [f"{t}.encoder.layer.{i}.{mod}.{p}" for p in ("weight", "bias")]
    keys += [f"blip.{proj}.{p}" for proj in ("vision_proj", "text_proj") for p in ("weight", "bias")]
    keys += [f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    return keys


def _official_like_state(model: ImageRewardModel) -> dict:
    """Our weights plus the extra entries the published file carries."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = model.config
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    state["blip.vision_proj.weight"] = torch.randn(256, cfg.vision_width)
    state["blip.vision_proj.bias"] = torch.randn(256)
    state["blip.text_proj.weight"] = torch.randn(256, cfg.hidden_size)
    state["blip.text_proj.bias"] = torch.randn(256)
    return state


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # LayerNorm scales around 1
                p.add_(1.0)
    return model


def _imagereward_dir(tmp_path):
    root = tmp_path / "ImageReward"
    tok = write_bert_tokenizer(root)
    cfg = ImageRewardConfig(**TINY, vocab_size=len(tok) + 2)
    model = _randomize(ImageRewardModel(cfg)).eval()
    torch.save(_official_like_state(model), root / "ImageReward.pt")
    (root / "med_config.json").write_text(json.dumps({**TINY, "vocab_size": len(tok) + 2, "encoder_width": 768,
                                                       "add_cross_attention": True, "layer_norm_eps": 1e-12}))
    return root, model


def test_key_layout_is_the_published_one():
    cfg = ImageRewardConfig(**TINY, vocab_size=60)
    extras = {"blip.text_encoder.embeddings.position_ids", "blip.vision_proj.weight", "blip.vision_proj.bias",
              "blip.text_proj.weight", "blip.text_proj.bias"}
    assert sorted(ImageRewardModel(cfg).state_dict()) == sorted(set(published_keys(cfg)) - extras)
    # The default sizes are the published ones (BLIP ViT-L/16 + med_config.json).
    big = ImageRewardConfig()
    assert (big.vision_width, big.vision_layers, big.vision_heads, big.patch_size) == (1024, 24, 16, 16)
    assert (big.hidden_size, big.num_hidden_layers, big.vocab_size, big.layer_norm_eps) == (768, 12, 30524, 1e-12)


def test_loads_official_layout_and_gradient_reaches_image(tmp_path):
    root, model = _imagereward_dir(tmp_path)
    reward = build_reward(f"imagereward:{root}")
    images = random_images(2, 40).requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.shape == (2,) and torch.isfinite(out).all()
    out.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(p.grad is None for p in reward.parameters())
    # The loaded weights are the saved ones.
    saved = torch.load(root / "ImageReward.pt", weights_only=True)
    for k, v in reward.model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert reward.backbone["kind"] == "blip_vit" and reward.backbone["config"]["num_layers"] == 2


def _transformers_reference(model: ImageRewardModel):
    """transformers' BlipVisionModel and BlipTextModel carrying the same weights."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    c = model.config
    vision = BlipVisionModel(BlipVisionConfig(
        hidden_size=c.vision_width, intermediate_size=c.vision_mlp, num_hidden_layers=c.vision_layers,
        num_attention_heads=c.vision_heads, image_size=c.image_size, patch_size=c.patch_size,
        layer_norm_eps=c.vision_eps, hidden_act="gelu")).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, encoder_hidden_size=c.vision_width,
        intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, max_position_embeddings=c.max_position_embeddings,
        layer_norm_eps=c.layer_norm_eps, is_decoder=True, hidden_act="gelu"), add_pooling_layer=False).eval()
    ours = model.state_dict()
    v = {"embeddings.class_embedding": ours["blip.visual_encoder.cls_token"],
         "embeddings.position_embedding": ours["blip.visual_encoder.pos_embed"],
         "embeddings.patch_embedding.weight": ours["blip.visual_encoder.patch_embed.proj.weight"],
         "embeddings.patch_embedding.bias": ours["blip.visual_encoder.patch_embed.proj.bias"],
         "post_layernorm.weight": ours["blip.visual_encoder.norm.weight"],
         "post_layernorm.bias": ours["blip.visual_encoder.norm.bias"]}
    rename = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(c.vision_layers):
        for a, b in rename.items():
            for p in ("weight", "bias"):
                v[f"encoder.layers.{i}.{b}.{p}"] = ours[f"blip.visual_encoder.blocks.{i}.{a}.{p}"]
    vision.load_state_dict(v, strict=True)
    t = {k[len("blip.text_encoder."):]: w for k, w in ours.items() if k.startswith("blip.text_encoder.")}
    missing, unexpected = text.load_state_dict(t, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    return vision, text


def test_matches_transformers_blip(tmp_path):
    root, model = _imagereward_dir(tmp_path)
    reward = load_imagereward(str(root))
    vision, text = _transformers_reference(model)
    images = random_images(2, 40)
    tok = blip_tokenizer(str(root))
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    pixels = ImagePreprocess(size=32, crop_rounding="round")(images)
    with torch.no_grad():
        image_embeds = vision(pixel_values=pixels).last_hidden_state
        hidden = text(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                      encoder_hidden_states=image_embeds,
                      encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
                      is_decoder=False).last_hidden_state
        expected = (model.mlp(hidden[:, 0]).squeeze(-1) - REWARD_MEAN) / REWARD_STD
        torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=1e-4, atol=1e-4)


def test_missing_or_wrong_file_is_one_line_error(tmp_path):
    with pytest.raises(RewardWeightsError, match="ImageReward.pt") as info:
        load_imagereward(str(tmp_path / "missing"))
    assert "\n" not in str(info.value)
    root, model = _imagereward_dir(tmp_path)
    state = _official_like_state(model)
    del state["mlp.layers.7.weight"]
    torch.save(state, root / "ImageReward.pt")
    with pytest.raises(RewardWeightsError, match=r"layout of ImageReward.pt: missing mlp.layers.7.weight") as info:
        load_imagereward(str(root))
    assert "\n" not in str(info.value)
    (root / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RewardWeightsError, match="not a loadable ImageReward.pt"):
        load_imagereward(str(root / "ImageReward.pt"))


def test_full_size_shapes_are_the_published_ones():
    """ImageReward.pt shapes (BLIP ViT-L/16 at 224 px, BERT-base with 1024-wide cross-attention), on meta."""
    with torch.device("meta"):
        state = ImageRewardModel().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["blip.visual_encoder.pos_embed"] == (1, 197, 1024)
    assert shapes["blip.visual_encoder.patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert shapes["blip.visual_encoder.blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert shapes["blip.text_encoder.embeddings.word_embeddings.weight"] == (30524, 768)
    assert shapes["blip.text_encoder.encoder.layer.11.crossattention.self.key.weight"] == (768, 1024)
    assert shapes["mlp.layers.0.weight"] == (1024, 768) and shapes["mlp.layers.7.weight"] == (1, 16)
    assert len(state) == len(published_keys(ImageRewardConfig())) - 5

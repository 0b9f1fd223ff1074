"""PickScore, LAION aesthetic and HPSv2 at tiny sizes with random weights, loaded from files in the
official layouts. No downloads: every reward gets a local path."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reward_fixtures import random_images, tiny_clip_config, write_clip_tokenizer
from refl_engine.rewards.aesthetic import MLP_FILE, LinearStackHead, load_aesthetic
from refl_engine.rewards.base import RewardWeightsError
from refl_engine.rewards.hps import load_hps
from refl_engine.rewards.pickscore import load_pickscore
from refl_engine.rewards.preprocess import ImagePreprocess

PROMPTS = ["a photo of a cat", "a red car on the grass"]


def _save_clip_dir(directory, hidden_act="quick_gelu"):
    from transformers import CLIPModel

    tok = write_clip_tokenizer(directory)
    model = CLIPModel(tiny_clip_config(tok, hidden_act=hidden_act))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model.save_pretrained(str(directory))
    return model, tok


def _assert_grad_only_to_image(reward, images):
    images = images.clone().requires_grad_(True)
    out = reward(images, PROMPTS[: images.shape[0]])
    assert out.shape == (images.shape[0],) and torch.isfinite(out).all()
    out.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())
    return out.detach()


# ---------------------------------------------------------------- PickScore


def test_pickscore_matches_clipmodel_and_gets_gradient(tmp_path):
    model, tok = _save_clip_dir(tmp_path / "PickScore_v1")
    reward = load_pickscore(str(tmp_path / "PickScore_v1"))
    images = random_images(2, 40)
    out = _assert_grad_only_to_image(reward, images)

    # Reference: the official PickScore computation with transformers' own CLIPModel.forward,
    # fed our preprocessed pixels and the tokenizer's ids.
    pixels = ImagePreprocess(size=model.config.vision_config.image_size)(images)
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        ref = model.eval()(input_ids=enc.input_ids, attention_mask=enc.attention_mask, pixel_values=pixels)
    expected = ref.logits_per_image.diagonal()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert reward.backbone["kind"] == "clip_vision" and reward.backbone["config"]["num_layers"] == 2


def test_pickscore_missing_directory_names_expected_file(tmp_path):
    with pytest.raises(RewardWeightsError, match="PickScore_v1 model directory") as info:
        load_pickscore(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- aesthetic


def _aesthetic_dir(tmp_path):
    root = tmp_path / "aesthetic"
    model, _ = _save_clip_dir(root / "clip-vit-large-patch14")
    head = LinearStackHead(model.config.projection_dim)
    torch.save(head.state_dict(), root / MLP_FILE)
    return root, model, head


def test_aesthetic_key_layout_is_the_published_one():
    keys = list(LinearStackHead(768).state_dict())
    published = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert sorted(keys) == sorted(published)
    shapes = {k: tuple(v.shape) for k, v in LinearStackHead(768).state_dict().items()}
    assert shapes["layers.0.weight"] == (1024, 768) and shapes["layers.7.weight"] == (1, 16)


def test_aesthetic_loads_official_layout_and_matches_reference(tmp_path):
    root, model, head = _aesthetic_dir(tmp_path)
    reward = load_aesthetic(str(root))
    images = random_images(2, 36)
    out = _assert_grad_only_to_image(reward, images)
    pixels = ImagePreprocess(size=model.config.vision_config.image_size)(images)
    with torch.no_grad():
        features = model.eval().get_image_features(pixel_values=pixels)
        # transformers 4.x returns the tensor, 5.x an output whose pooler_output is projected.
        features = features if isinstance(features, torch.Tensor) else features.pooler_output
        expected = head.eval()(F.normalize(features, dim=-1)).squeeze(-1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_aesthetic_wrong_mlp_file_is_one_line_error(tmp_path):
    root, _, _ = _aesthetic_dir(tmp_path)
    torch.save({"fc.weight": torch.zeros(1)}, root / MLP_FILE)
    with pytest.raises(RewardWeightsError, match=r"sac\+logos\+ava1-l14-linearMSE.pth") as info:
        load_aesthetic(str(root))
    assert "\n" not in str(info.value)
    (root / MLP_FILE).unlink()
    with pytest.raises(RewardWeightsError, match=r"sac\+logos\+ava1-l14-linearMSE.pth"):
        load_aesthetic(str(root))


def test_aesthetic_gradient_matches_finite_differences(tmp_path, seed):
    """float64 directional derivative through preprocessing, checkpointed CLIP layers and the head."""
    torch.manual_seed(seed)  # the tiny CLIP's and the head's random weights
    root, _, _ = _aesthetic_dir(tmp_path)
    reward = load_aesthetic(str(root)).double()
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=g, requires_grad=True)
    direction = torch.randn(images.shape, dtype=torch.float64, generator=g)
    reward(images, PROMPTS[:1]).sum().backward()
    analytic = (images.grad * direction).sum()
    eps = 1e-6
    with torch.no_grad():
        plus = reward(images + eps * direction, PROMPTS[:1]).sum()
        minus = reward(images - eps * direction, PROMPTS[:1]).sum()
    numeric = (plus - minus) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-8)


def test_backbone_layers_are_recomputed_only_under_the_policy(tmp_path):
    from refl_engine.memory.recompute import build_policy

    root, _, _ = _aesthetic_dir(tmp_path)
    reward = load_aesthetic(str(root))
    calls = []
    fc1 = reward.vision.vision_model.encoder.layers[0].mlp.fc1
    inner = fc1.forward

    def counting_forward(*args):  # (module hooks do not fire during checkpoint recomputation)
        calls.append(1)
        return inner(*args)

    fc1.forward = counting_forward
    images = random_images(1, 28).requires_grad_(True)
    reward(images, PROMPTS[:1]).sum().backward()
    assert len(calls) == 1  # a reward never checkpoints itself
    build_policy("full").reward_call(reward, images, PROMPTS[:1]).sum().backward()
    assert len(calls) == 3  # the policy's per-layer checkpoint ran the layer again during backward
    with torch.no_grad():
        build_policy("full").reward_call(reward, images, PROMPTS[:1])
    assert len(calls) == 4


# ---------------------------------------------------------------- HPSv2


TINY_OPENCLIP_CFG = {
    "embed_dim": 16,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 8, "patch_size": 7},
    "text_cfg": {"context_length": 16, "vocab_size": None, "width": 32, "heads": 4, "layers": 2},
}


class _Block(nn.Module):
    """A pre-norm residual block with OpenCLIP's parameter names (independent reference)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Tower(nn.Module):
    def __init__(self, width, heads, layers):
        super().__init__()
        self.resblocks = nn.ModuleList([_Block(width, heads) for _ in range(layers)])


class OpenClipLayoutCLIP(nn.Module):
    """Plain-torch CLIP in OpenCLIP's state-dict layout: nn.MultiheadAttention (packed in_proj),
    projections as (width, embed) matrices, argmax end-of-text pooling, causal text mask."""

    def __init__(self, cfg):
        super().__init__()
        v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
        grid = v["image_size"] // v["patch_size"]
        self.visual = nn.Module()
        self.visual.conv1 = nn.Conv2d(3, v["width"], v["patch_size"], v["patch_size"], bias=False)
        self.visual.class_embedding = nn.Parameter(torch.randn(v["width"]) * 0.5)
        self.visual.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, v["width"]) * 0.5)
        self.visual.ln_pre = nn.LayerNorm(v["width"])
        self.visual.transformer = _Tower(v["width"], v["width"] // v["head_width"], v["layers"])
        self.visual.ln_post = nn.LayerNorm(v["width"])
        self.visual.proj = nn.Parameter(torch.randn(v["width"], e) * 0.2)
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.randn(t["context_length"], t["width"]) * 0.5)
        self.transformer = _Tower(t["width"], t["heads"], t["layers"])
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.randn(t["width"], e) * 0.2)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        for p in self.parameters():  # non-trivial LayerNorm affine parameters and biases
            if p.dim() == 1 and p is not self.logit_scale:
                p.data.add_(torch.randn_like(p) * 0.1)

    def encode_image(self, pixels):
        x = self.visual.conv1(pixels).flatten(2).transpose(1, 2)
        cls = self.visual.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.visual.positional_embedding
        x = self.visual.ln_pre(x)
        for block in self.visual.transformer.resblocks:
            x = block(x)
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def encode_text(self, ids):
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        causal = torch.full((n, n), float("-inf")).triu(1)
        for block in self.transformer.resblocks:
            x = block(x, causal)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ self.text_projection


def _openclip_ids(tok, prompts, length):
    """OpenCLIP-style token ids: [sot] tokens [eot], zero padded (the eot has the largest id)."""
    rows = []
    for p in prompts:
        ids = tok(p, truncation=True, max_length=length)["input_ids"]
        rows.append(ids + [0] * (length - len(ids)))
    return torch.tensor(rows)


def _hps_dir(tmp_path, reference_cls=OpenClipLayoutCLIP):
    root = tmp_path / "hps"
    tok = write_clip_tokenizer(root)
    cfg = {**TINY_OPENCLIP_CFG, "text_cfg": {**TINY_OPENCLIP_CFG["text_cfg"], "vocab_size": len(tok)}}
    reference = reference_cls(cfg).eval()
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save({"state_dict": reference.state_dict()}, root / "HPS_v2.1_compressed.pt")
    return root, reference, tok, cfg


def test_hps_loads_openclip_layout_and_matches_reference(tmp_path):
    root, reference, tok, cfg = _hps_dir(tmp_path)
    reward = load_hps(str(root))
    images = random_images(2, 30)
    out = _assert_grad_only_to_image(reward, images)

    pixels = ImagePreprocess(size=28, crop_rounding="round")(images)
    with torch.no_grad():
        img = F.normalize(reference.encode_image(pixels), dim=-1)
        txt = F.normalize(reference.encode_text(_openclip_ids(tok, PROMPTS, 16)), dim=-1)
    expected = 100.0 * (img * txt).sum(-1)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)


def test_hps_accepts_the_pt_file_itself_and_rejects_foreign_keys(tmp_path):
    root, reference, _, _ = _hps_dir(tmp_path)
    state = reference.state_dict()
    state["visual.extra_head.weight"] = torch.zeros(2)
    torch.save({"state_dict": state}, root / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardWeightsError, match="HPS_v2.1_compressed.pt") as info:
        load_hps(str(root / "HPS_v2.1_compressed.pt"))
    assert "\n" not in str(info.value)
    with pytest.raises(RewardWeightsError, match="HPS_v2.1_compressed.pt or HPS_v2_compressed.pt"):
        load_hps(str(tmp_path / "empty_dir_does_not_exist"))
    del state["visual.extra_head.weight"]
    torch.save({"state_dict": state}, root / "HPS_v2.1_compressed.pt")
    reward = load_hps(str(root / "HPS_v2.1_compressed.pt"))  # tokenizer and config found beside the file
    assert reward.backbone["config"]["num_layers"] == 2 and reward.bounds == (15.0, 45.0)


def test_hps_refuses_pickled_code(tmp_path):
    root, _, _, _ = _hps_dir(tmp_path)
    torch.save({"state_dict": {}, "args": nn.Linear(1, 1)}, root / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardWeightsError, match="not a loadable HPS_v2.1_compressed.pt"):
        load_hps(str(root))


def test_hps_against_open_clip_create_model(tmp_path):
    """The key layout and numbers of OpenCLIP's own model class, when open_clip can be imported."""
    try:
        import open_clip
    except Exception as err:  # noqa: BLE001 - ImportError, or torchvision's operator error
        # open_clip imports torchvision; PyPI's torchvision wheels are CUDA builds that fail to load
        # beside a CPU-only torch ("operator torchvision::nms does not exist").
        pytest.skip(f"open_clip not importable here ({type(err).__name__}: {str(err)[:100]})")
    from open_clip.factory import _MODEL_CONFIGS

    root = tmp_path / "hps"
    tok = write_clip_tokenizer(root)
    cfg = {**TINY_OPENCLIP_CFG, "text_cfg": {**TINY_OPENCLIP_CFG["text_cfg"], "vocab_size": len(tok)}}
    _MODEL_CONFIGS["refl-tiny-vit"] = cfg
    model = open_clip.create_model("refl-tiny-vit", pretrained=None).eval()
    assert sorted(model.state_dict()) == sorted(k for k in OpenClipLayoutCLIP(cfg).state_dict())
    (root / "open_clip_config.json").write_text(json.dumps(cfg))
    torch.save({"state_dict": model.state_dict()}, root / "HPS_v2.1_compressed.pt")
    reward = load_hps(str(root))
    images = random_images(2, 28)
    pixels = ImagePreprocess(size=28, crop_rounding="round")(images)
    with torch.no_grad():
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(_openclip_ids(tok, PROMPTS, 16)), dim=-1)
        expected = model.logit_scale.exp() * (img * txt).sum(-1)
        torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=1e-4, atol=1e-3)


def test_full_size_vit_h14_mapping_shapes():
    """The shipped ViT-H-14 config and the key table agree at full size (meta tensors, no memory)."""
    from transformers import CLIPModel

    from refl_engine.rewards.hps import VIT_H14_CONFIG, openclip_config_to_clip_config, openclip_to_clipmodel_state_dict

    cfg = json.loads(VIT_H14_CONFIG.read_text())

    class _Tok:
        eos_token_id, bos_token_id, pad_token_id = 49407, 49406, 49407

    with torch.device("meta"):
        reference = OpenClipLayoutCLIP(cfg)
        model = CLIPModel(openclip_config_to_clip_config(cfg, _Tok()))
    mapped = openclip_to_clipmodel_state_dict(reference.state_dict())
    expected = model.state_dict()
    assert sorted(mapped) == sorted(expected)
    assert all(mapped[k].shape == expected[k].shape for k in expected)
    assert expected["vision_model.embeddings.position_embedding.weight"].shape == (257, 1280)
    assert expected["text_projection.weight"].shape == (1024, 1024)
    assert model.config.vision_config.num_attention_heads == 16 and model.config.vision_config.hidden_act == "gelu"

"""`--reward` parsing, weighted sums, the [0, 1] rescaling and the reward contract of the real models."""
from __future__ import annotations

import math

import pytest
import torch

import numerics
from reward_fixtures import random_images, tiny_clip_config, write_clip_tokenizer
from refl_engine.rewards.aesthetic import MLP_FILE, LinearStackHead
from refl_engine.rewards.base import (
    REWARDS,
    RewardSpecError,
    RewardWeightsError,
    WeightedSum,
    build_reward,
    parse_reward_spec,
)

PROMPTS = ["a cat", "a dog on the grass"]
BF16_COSINE_EPS = 4


def test_parse_forms():
    assert parse_reward_spec("aesthetic") == [(1.0, "aesthetic", None)]
    assert parse_reward_spec("hps:/models/HPS_v2.1_compressed.pt") == [(1.0, "hps", "/models/HPS_v2.1_compressed.pt")]
    assert parse_reward_spec("aesthetic=1.0, hps=0.5") == [(1.0, "aesthetic", None), (0.5, "hps", None)]
    assert parse_reward_spec("pickscore:yuvalkirstain/PickScore_v1=-0.25") == [
        (-0.25, "pickscore", "yuvalkirstain/PickScore_v1")
    ]


@pytest.mark.parametrize("spec", ["", "  ", "aesthetic=x", "aesthetic=nan", "hps=inf"])
def test_parse_rejects(spec):
    with pytest.raises(RewardSpecError):
        parse_reward_spec(spec)


def test_unknown_name_lists_the_real_rewards():
    with pytest.raises(RewardSpecError) as info:
        build_reward("asthetic")
    for name in ("aesthetic", "hps", "pickscore", "imagereward", "colorfulness"):
        assert name in str(info.value)


def test_all_real_rewards_are_registered():
    build_reward("colorfulness")  # triggers the registry's imports
    for name in ("aesthetic", "hps", "pickscore", "imagereward"):
        assert name in REWARDS and REWARDS[name].description


@pytest.mark.parametrize(
    "name, expected",
    [
        ("aesthetic", r"sac\+logos\+ava1-l14-linearMSE.pth"),
        ("hps", r"HPS_v2.1_compressed.pt"),
        ("pickscore", r"PickScore_v1 model directory"),
        ("imagereward", r"ImageReward.pt"),
    ],
)
def test_missing_path_names_the_expected_file(tmp_path, name, expected):
    with pytest.raises(RewardWeightsError, match=expected) as info:
        build_reward(f"{name}:{tmp_path / 'nothing_here'}")
    assert "\n" not in str(info.value)


def test_weighted_sum_of_builtins_and_its_bounds():
    images = random_images(3, 16).requires_grad_(True)
    prompts = ["x"] * 3
    total = build_reward("colorfulness=1.0,brightness=-0.5")
    assert isinstance(total, WeightedSum)
    c, b = build_reward("colorfulness"), build_reward("brightness")
    torch.testing.assert_close(total(images, prompts), c(images, prompts) - 0.5 * b(images, prompts))
    # Negative weights swap a term's bounds: 1*(0, 1.1) + (-0.5)*(0, 1) -> (-0.5, 1.1).
    assert total.bounds == pytest.approx((-0.5, 1.1))
    total(images, prompts).sum().backward()
    assert images.grad.abs().sum() > 0


def test_rescaled_mode_maps_bounds_to_unit_interval():
    images = random_images(2, 16)
    raw = build_reward("colorfulness")
    scaled = build_reward("colorfulness", output="rescaled")
    low, high = raw.bounds
    torch.testing.assert_close(scaled(images, PROMPTS), (raw(images, PROMPTS) - low) / (high - low))
    # A weighted sum of rescaled terms is in the terms' [0, 1] units, and its bounds say so.
    total = build_reward("colorfulness=2,contrast=1", output="rescaled")
    assert total.bounds == pytest.approx((0.0, 3.0))
    expected = 2 * scaled(images, PROMPTS) + build_reward("contrast", output="rescaled")(images, PROMPTS)
    torch.testing.assert_close(total(images, PROMPTS), expected)


def _clip_dir(tmp_path, seed=0):
    from transformers import CLIPModel

    root = tmp_path / "clip"
    tok = write_clip_tokenizer(root)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(tok))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    model.save_pretrained(str(root))
    torch.save(LinearStackHead(model.config.projection_dim).state_dict(), root / MLP_FILE)
    return root


def test_real_rewards_rescale_and_sum(tmp_path):
    root = _clip_dir(tmp_path)
    images = random_images(2, 30)
    pick = build_reward(f"pickscore:{root}")
    pick01 = build_reward(f"pickscore:{root}", output="rescaled")
    low, high = pick.bounds
    assert (low, high) == (15.0, 25.0)
    torch.testing.assert_close(pick01(images, PROMPTS), (pick(images, PROMPTS) - low) / (high - low))
    aes = build_reward(f"aesthetic:{root}")
    both = build_reward(f"aesthetic:{root}=1.0,pickscore:{root}=0.5")
    torch.testing.assert_close(both(images, PROMPTS), aes(images, PROMPTS) + 0.5 * pick(images, PROMPTS))
    assert both.bounds == pytest.approx((1.0 + 7.5, 10.0 + 12.5))
    assert not any(p.requires_grad for p in both.parameters())


def test_reward_runs_in_the_training_dtype(tmp_path, seed):
    """bf16 weights and images: the score is float32, the gradient reaches the bf16 image."""
    root = _clip_dir(tmp_path, seed)
    reward = build_reward(f"pickscore:{root}")
    images32 = random_images(2, 28, seed)
    ref = reward(images32, PROMPTS)
    reward = reward.to(torch.bfloat16)
    images = images32.to(torch.bfloat16).requires_grad_(True)
    out = reward(images, PROMPTS)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert images.grad.dtype == torch.bfloat16 and images.grad.abs().sum() > 0
    # The score is logit_scale (100) x a cosine, and the cosine's error is a few bf16 eps (2^-8
    # relative rounding on the image, every weight and activation): the tolerance is in units of
    # eps(bf16) x 100, not relative to the score, which is near zero when the cosine is.
    err, tol = (out - ref).abs().max().item(), BF16_COSINE_EPS * numerics.eps(torch.bfloat16) * 100.0
    numerics.record("score", err / tol)
    assert err <= tol, f"bf16 score off by {err:.3g} > {tol:.3g} ({BF16_COSINE_EPS} bf16 eps of the cosine x 100)"


@pytest.mark.parametrize(
    "name, repo, filename",
    [
        ("imagereward", "THUDM/ImageReward", "ImageReward.pt"),
        ("hps", "xswu/HPSv2", "HPS_v2.1_compressed.pt"),
        ("aesthetic", "camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth"),
    ],
)
def test_no_path_asks_the_hub_for_the_official_file(monkeypatch, name, repo, filename):
    """Without a path the official hub file is requested; a failed fetch is a one-line error (no network used)."""
    import huggingface_hub

    asked = []

    def offline_download(repo_id, file, *args, **kwargs):
        asked.append((repo_id, file))
        raise OSError("offline\nsecond line")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    with pytest.raises(RewardWeightsError) as info:
        build_reward(name)
    assert asked[0] == (repo, filename)
    assert filename in str(info.value) and repo in str(info.value) and "\n" not in str(info.value)


def test_pickscore_without_path_uses_the_official_hub_ids(monkeypatch):
    import transformers

    asked = []

    def offline(source, *args, **kwargs):
        asked.append(source)
        raise OSError("offline")

    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", offline)
    with pytest.raises(RewardWeightsError, match="yuvalkirstain/PickScore_v1"):
        build_reward("pickscore")
    assert asked == ["yuvalkirstain/PickScore_v1"]


@pytest.mark.parametrize("checkpoint_reward", [True, False])
def test_the_memory_policy_alone_decides_reward_recompute(tmp_path, checkpoint_reward):
    """Same gradients either way; with --checkpoint_reward each backbone layer runs twice (forward
    and its recompute), without it once: no checkpoint of the reward's own."""
    from refl_engine.memory.recompute import build_policy

    root = _clip_dir(tmp_path)
    reward = build_reward(f"aesthetic:{root}=1.0,pickscore:{root}=0.01")
    assert len(reward.recompute_layers) == 2 * reward.terms[0].vision.config.num_hidden_layers
    calls = []
    for i, layer in enumerate(reward.recompute_layers):
        # a pre-hook on the layer's first op: a recompute stops early once it has what backward needs
        layer.layer_norm1.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    images = random_images(2, 30)
    a = images.clone().requires_grad_(True)
    reward(a, PROMPTS).sum().backward()
    assert sorted(calls) == list(range(len(reward.recompute_layers)))  # plain call: once each
    calls.clear()
    b = images.clone().requires_grad_(True)
    policy = build_policy("full", checkpoint_reward=checkpoint_reward)
    policy.reward_call(reward, b, PROMPTS).sum().backward()
    runs = 2 if checkpoint_reward else 1
    assert sorted(calls) == sorted(list(range(len(reward.recompute_layers))) * runs)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7 * float(a.grad.abs().max()) + 1e-12)
    assert all("forward" not in vars(layer) for layer in reward.recompute_layers)  # stock forwards restored


def test_backbones_report_what_the_planner_needs(tmp_path):
    root = _clip_dir(tmp_path)
    for name in ("aesthetic", "pickscore"):
        reward = build_reward(f"{name}:{root}")
        b = reward.backbone
        assert b["kind"] == "clip_vision" and b["activation_checkpointing"] == "per_layer"
        assert set(b["config"]) >= {"hidden_size", "num_layers", "patch", "image_size"}
        assert b["config"]["image_size"] == reward.input_size == 28
        assert b["num_params"] == sum(p.numel() for p in reward.parameters())

"""The trainer: convergence per method, exact resume, non-finite handling, outputs (checkpoints and
exports in detail: test_checkpoint.py)."""
import json

import pytest
import torch
from engine_config import make_config

from refl_engine.rewards.base import REWARDS, Reward, register_reward
from refl_engine.trainer import ReFLTrainer, TrainingError


def _trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,kw", [
    ("refl", {}), ("draft", dict(K="full")), ("draft", dict(K="1")), ("draft-lv", {}), ("alignprop", {}),
])
def test_each_method_raises_the_reward(tiny_sd_dir, tmp_path, method, kw):
    cfg = make_config(tmp_path, method=method, num_inference_steps=6, learning_rate=2e-2, rank=4,
                      num_sample_images=4, **kw)
    trainer = ReFLTrainer(cfg).setup()
    prompts = trainer.prompts[:4]
    before = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    for _ in range(25):
        trainer.train_step()
    after = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    # Fixed prompts and seeds: the same noise before and after, so the change is the model's.
    assert after > before + 0.02, (method, before, after)


def test_resume_is_exact(tiny_sd_dir, tmp_path):
    straight = ReFLTrainer(make_config(tmp_path / "a", max_train_steps=4, method="alignprop")).setup()
    for _ in range(4):
        straight.train_step()

    first = ReFLTrainer(make_config(tmp_path / "b", max_train_steps=4, method="alignprop")).setup()
    for _ in range(2):
        first.train_step()
    path = first.save_checkpoint()
    del first
    second = ReFLTrainer(make_config(tmp_path / "b", max_train_steps=4, method="alignprop",
                                     resume_from_checkpoint=str(path))).setup()
    assert second.resume(str(path)) and second.step == 2
    for _ in range(2):
        second.train_step()
    a, b = _trainable(straight), _trainable(second)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_train_writes_outputs_and_resumes_latest(tiny_sd_dir, tmp_path):
    cfg = make_config(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=2)
    summary = ReFLTrainer(cfg).train()
    out = tmp_path / "run"
    assert (out / "summary.json").exists() and (out / "reward_curve.png").exists()
    assert (out / "samples" / "step-000000.png").exists() and (out / "samples" / "step-000003.png").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"loss", "reward_mean", "reward_std", "grad_norm", "window_size", "seconds"} <= rows[0].keys()
    entries = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert entries == ["checkpoint-2", "checkpoint-3", "latest"]  # keep-last-2, no temp leftovers
    assert (out / "checkpoints" / "latest").read_text().strip() == "checkpoint-3"
    assert summary["steps"] == 3
    # Resume from latest, train to 5: the metrics file continues, without duplicates.
    cfg2 = make_config(tmp_path, max_train_steps=5, resume_from_checkpoint="latest")
    ReFLTrainer(cfg2).train()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]


class _NaNReward(Reward):
    name = "nan-test"

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_nonfinite_reward_skips_steps_and_stops(tiny_sd_dir, tmp_path):
    register_reward("nan-test")(lambda path=None, output="raw": _NaNReward(output))
    try:
        trainer = ReFLTrainer(make_config(tmp_path, reward="nan-test", max_nonfinite_steps=3)).setup()
        before = _trainable(trainer)
        for _ in range(2):
            m = trainer.train_step()
            assert m["skipped"]
        with pytest.raises(TrainingError, match="non-finite"):
            trainer.train_step()
        after = _trainable(trainer)
        for name in before:
            assert torch.equal(before[name], after[name])
            assert torch.isfinite(after[name]).all()
    finally:
        REWARDS.pop("nan-test", None)

"""Checkpoints and the output folder: keep-last-N by recency, `latest`, one atomic rename with the
exports inside, the umask, the diffusers-layout weights a stock pipeline loads, the refusal to
write over another run; sample grids at full resolution."""
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from engine_config import make_config

from refl_engine import checkpoint as ckpt
from refl_engine.config import ConfigError
from refl_engine.trainer import ReFLTrainer


def _save(root, step, keep_last=2, export=None, value=0.0):
    return ckpt.save_checkpoint(root, step, trainable={"w": torch.full((2,), value)}, optimizer_state={},
                                rng_state={}, state={}, export=export, keep_last=keep_last)


def _names(root):
    return [p.name for p in ckpt.list_checkpoints(root)]


def _unet_io(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(1, 77, 32, generator=g)


def _close(actual, expected):
    # fp32, the same weights through the same ops: equal up to a few ulps of the output's size.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * max(1.0, float(expected.abs().max())))


# ---------------------------------------------------------------- keep-last-N, latest, atomicity


def test_keep_last_keeps_the_written_checkpoint_and_latest_names_it(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 10)
    _save(root, 20)  # another run's, with higher step numbers
    written = _save(root, 5)
    assert _names(root) == ["checkpoint-5", "checkpoint-20"]  # the oldest-written went, not the newest
    assert ckpt.resolve_checkpoint("latest", root) == written
    _save(root, 6)
    assert _names(root) == ["checkpoint-5", "checkpoint-6"]
    assert (root / "latest").read_text().strip() == "checkpoint-6"


def test_rewriting_a_step_keeps_the_old_copy_until_the_new_is_complete(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 3, value=1.0)

    def broken_export(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _save(root, 3, export=broken_export, value=2.0)
    assert _names(root) == ["checkpoint-3"]
    assert torch.equal(ckpt.load_checkpoint(root / "checkpoint-3")["trainable"]["w"], torch.full((2,), 1.0))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3", "latest"]  # no temporary leftovers

    def export(folder):
        (folder / "weights.bin").write_bytes(b"new")

    _save(root, 3, export=export, value=2.0)
    assert (root / "checkpoint-3" / "weights.bin").read_bytes() == b"new"
    assert torch.equal(ckpt.load_checkpoint(root / "checkpoint-3")["trainable"]["w"], torch.full((2,), 2.0))
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-3", "latest"]


def test_checkpoint_modes_follow_the_umask(tiny_sd_dir, tmp_path):
    trainer = ReFLTrainer(make_config(tmp_path, rank=4)).setup()
    old = os.umask(0o022)
    try:
        path = trainer.save_checkpoint()
        weights = ckpt.publish_weights(trainer.unet, trainer.out)
    finally:
        os.umask(old)
    assert weights == trainer.out / ckpt.LORA_WEIGHTS
    entries = [path, *path.rglob("*"), weights]
    assert any(p.is_file() for p in entries) and any(p.is_dir() for p in entries)
    for p in entries:
        assert stat.S_IMODE(p.stat().st_mode) == (0o755 if p.is_dir() else 0o644), p


def test_a_failed_export_leaves_no_checkpoint(tiny_sd_dir, tmp_path, monkeypatch):
    trainer = ReFLTrainer(make_config(tmp_path, rank=4)).setup()

    def failing(unet, folder):
        raise OSError("no space left on device")

    monkeypatch.setattr(ckpt, "export_weights", failing)
    with pytest.raises(OSError):
        trainer.save_checkpoint()
    assert ckpt.list_checkpoints(trainer.out / "checkpoints") == []


# ---------------------------------------------------------------- weights a stock pipeline loads


def test_lora_exports_apply_alpha_in_a_stock_pipeline(tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    # alpha != rank: training scales the adapters by alpha / r = 4; the export must carry it.
    cfg = make_config(tmp_path, rank=4, lora_alpha=16, max_train_steps=1, learning_rate=5e-2, num_inference_steps=2)
    trainer = ReFLTrainer(cfg)
    trainer.train()
    out = Path(cfg.output.output_dir)
    x, t, emb = _unet_io()
    trainer.unet.eval()
    with torch.no_grad():
        ours = trainer.unet(x, t, encoder_hidden_states=emb).sample
    for folder in (out, out / "checkpoints" / "checkpoint-1"):
        assert (folder / "pytorch_lora_weights.safetensors").exists()
        pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
        pipe.load_lora_weights(str(folder))
        with torch.no_grad():
            theirs = pipe.unet(x, t, encoder_hidden_states=emb).sample
            pipe.unet.disable_adapters()
            base = pipe.unet(x, t, encoder_hidden_states=emb).sample
        _close(theirs, ours)
        assert (theirs - base).abs().max() > 1e-3  # the adapter is really applied


def test_full_finetune_exports_a_loadable_unet_and_resumes_from_it(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    cfg = make_config(tmp_path, rank=0, max_train_steps=1, learning_rate=1e-3, num_inference_steps=2)
    trainer = ReFLTrainer(cfg)
    trainer.train()
    out = Path(cfg.output.output_dir)
    ckpt_dir = out / "checkpoints" / "checkpoint-1"
    assert not (out / ckpt.LORA_WEIGHTS).exists() and not (ckpt_dir / "trainable.safetensors").exists()
    x, t, emb = _unet_io()
    trainer.unet.eval()
    with torch.no_grad():
        ours = trainer.unet(x, t, encoder_hidden_states=emb).sample
        base = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")(x, t, emb).sample
    assert (ours - base).abs().max() > 1e-4  # one step moved the weights
    for folder in (out, ckpt_dir):
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
        with torch.no_grad():
            _close(unet(x, t, encoder_hidden_states=emb).sample, ours)
    # The checkpoint's unet/ is also the resume source.
    resumed = ReFLTrainer(make_config(tmp_path, rank=0, max_train_steps=1)).setup()
    assert resumed.resume(str(ckpt_dir)) and resumed.step == 1
    for (n, a), b in zip(trainer.unet.named_parameters(), resumed.unet.parameters()):
        assert torch.equal(a, b), n


# ---------------------------------------------------------------- the output folder


def test_output_dir_of_another_run_is_refused_before_loading(tmp_path):
    cfg = make_config(tmp_path)
    out = Path(cfg.output.output_dir)
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("a folder with other files is not a run")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    trainer = ReFLTrainer(cfg)
    with pytest.raises(ConfigError, match="--overwrite_output_dir") as e:
        trainer.train()
    assert "\n" not in str(e.value) and not trainer._setup_done


def test_overwrite_output_dir_replaces_the_previous_run(tiny_sd_dir, tmp_path):
    cfg = make_config(tmp_path, max_train_steps=1, overwrite_output_dir=True, num_inference_steps=2)
    out = Path(cfg.output.output_dir)
    _save(out / "checkpoints", 7)
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    (out / "notes.txt").write_text("kept")
    ReFLTrainer(cfg).train()
    assert _names(out / "checkpoints") == ["checkpoint-1"]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "notes.txt").read_text() == "kept"


def test_resume_from_an_earlier_checkpoint_keeps_its_own_newest(tiny_sd_dir, tmp_path):
    fast = dict(num_inference_steps=2, num_sample_images=1)
    ReFLTrainer(make_config(tmp_path, max_train_steps=3, checkpointing_steps=1, checkpoints_total_limit=3,
                            **fast)).train()
    out = tmp_path / "run"
    assert _names(out / "checkpoints") == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    # Go back to step 1 and train to step 2 keeping one checkpoint: the one just written.
    cfg = make_config(tmp_path, max_train_steps=2, checkpoints_total_limit=1, **fast,
                      resume_from_checkpoint=str(out / "checkpoints" / "checkpoint-1"))
    ReFLTrainer(cfg).train()
    assert _names(out / "checkpoints") == ["checkpoint-2"]
    assert ckpt.resolve_checkpoint("latest", out / "checkpoints") == out / "checkpoints" / "checkpoint-2"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    abandoned = [json.loads(line)["step"] for line in (out / "metrics.abandoned.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and abandoned == [2, 3]  # the replaced continuation is kept aside, not lost


# ---------------------------------------------------------------- sample grids


def test_sample_grid_is_saved_at_full_resolution(tmp_path):
    from PIL import Image

    from refl_engine.viz import save_grid

    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 40, 24, generator=g)
    path = save_grid(images, [f"p{i}" for i in range(5)], [0.1 * i for i in range(5)], tmp_path / "s.png", cols=3)
    full = torch.from_numpy(np.array(Image.open(tmp_path / "s-full.png").convert("RGB")))
    pad = 2
    assert full.shape == (2 * 40 + pad, 3 * 24 + 2 * pad, 3)
    for i in range(5):
        r, q = divmod(i, 3)
        tile = full[r * (40 + pad): r * (40 + pad) + 40, q * (24 + pad): q * (24 + pad) + 24].permute(2, 0, 1)
        assert torch.equal(tile, (images[i] * 255).round().to(torch.uint8)), i
    assert path.exists() and json.loads(path.with_suffix(".json").read_text())["prompts"][4] == "p4"

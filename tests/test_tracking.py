"""--report_to: TensorBoard for real (event files read back), wandb through a fake module that
records the calls (no network), one-line refusals when a library is missing."""
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from engine_config import make_config

from refl_engine.config import ConfigError
from refl_engine.trainer import ReFLTrainer


class _FakeWandb(types.ModuleType):
    """The slice of the wandb API the tracker uses; every call is recorded."""

    def __init__(self):
        super().__init__("wandb")
        self.calls = []
        fake = self

        class Image:
            def __init__(self, data, caption=None):
                self.data, self.caption = np.array(data), caption

        class Config:
            def update(self, values, allow_val_change=False):
                fake.calls.append(("config", values))

        class Run:
            config = Config()

            def log(self, values, step=None):
                fake.calls.append(("log", values, step))

            def finish(self):
                fake.calls.append(("finish",))

        self.Image, self._run = Image, Run()

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self._run


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _tiles(path, n, size, pad=2):
    from PIL import Image

    grid = np.asarray(Image.open(path).convert("RGB"))
    return [grid[:, i * (size + pad): i * (size + pad) + size] for i in range(n)]


def test_report_to_all_sends_scalars_images_and_config(tiny_sd_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    cfg = make_config(tmp_path, report_to="all", max_train_steps=2, tracker_project_name="proj", logging_dir="tb")
    trainer = ReFLTrainer(cfg)
    trainer.train()
    out = Path(cfg.output.output_dir)
    rows = _rows(out)
    size = trainer.resolution

    # wandb: one run, the config, every metrics.jsonl row, the sample images with their captions.
    (kind, init), *rest = wandb.calls
    run_id = json.loads((out / "tracking.json").read_text())["wandb_run_id"]
    assert kind == "init" and init["project"] == "proj" and init["id"] == run_id and init["dir"] == str(out)
    assert rest[0] == ("config", cfg.to_dict()) and rest[-1] == ("finish",)
    scalars = {c[2]: c[1] for c in rest if c[0] == "log" and "loss" in c[1]}
    assert sorted(scalars) == [1, 2]
    for row in rows:
        assert scalars[row["step"]]["reward_mean"] == row["reward_mean"] and scalars[row["step"]]["loss"] == row["loss"]
    images = {c[2]: c[1]["samples"] for c in rest if c[0] == "log" and "samples" in c[1]}
    assert sorted(images) == [0, 2]
    for step, logged in images.items():
        grid = _tiles(out / "samples" / f"step-{step:06d}-full.png", 2, size)
        for im, tile, prompt in zip(logged, grid, trainer.sample_prompts):
            assert im.data.shape == (size, size, 3) and np.array_equal(im.data, tile)
            assert im.caption.startswith(prompt)

    # TensorBoard, in --logging_dir: the same scalars (stored as float32), full-size images, the config.
    ea = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    loss = ea.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    np.testing.assert_allclose([e.value for e in loss], [r["loss"] for r in rows], rtol=1e-6, atol=1e-30)
    tb_images = ea.Images("samples")
    assert [e.step for e in tb_images] == [0, 2]
    assert all(e.width * e.height >= 2 * size * size for e in tb_images)  # not scaled down
    assert "config/text_summary" in ea.Tags()["tensors"]

    # A resume continues the same wandb run and logs only the new steps.
    wandb.calls.clear()
    ReFLTrainer(make_config(tmp_path, report_to="wandb", max_train_steps=3, resume_from_checkpoint="latest")).train()
    assert wandb.calls[0][1]["id"] == run_id
    assert sorted(c[2] for c in wandb.calls if c[0] == "log" and "loss" in c[1]) == [3]


@pytest.mark.parametrize("report_to,module,package", [
    ("wandb", "wandb", "pip install wandb"),
    ("all", "wandb", "pip install wandb"),
    ("tensorboard", "torch.utils.tensorboard", "pip install tensorboard"),
])
def test_missing_tracker_library_is_one_line_before_loading(tmp_path, monkeypatch, report_to, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import` raise ImportError
    trainer = ReFLTrainer(make_config(tmp_path, report_to=report_to))
    with pytest.raises(ConfigError, match=package) as e:
        trainer.train()
    assert "\n" not in str(e.value) and not trainer._setup_done


def test_report_to_values(tmp_path):
    with pytest.raises(ConfigError, match=r"--report_to .*tensorboard, wandb, all.*none"):
        make_config(tmp_path, report_to="jsonl")
    assert make_config(tmp_path).output.report_to == "none"

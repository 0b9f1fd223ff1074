"""The CLI: bad input gives one line naming the problem and the fix, exit code 2, no traceback;
the embedded default runs end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refl_engine.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,needle", [
    (["--method", "ppo"], "unknown --method 'ppo'"),
    (["--method", "draft", "--K", "0"], "--K 0 is out of range"),
    (["--method", "draft", "--K", "51", "--num_inference_steps", "50"], "--K 51 is out of range"),
    (["--method", "draft", "--K", "many"], "--K must be 'full' or an integer"),
    (["--model", "/nonexistent/model"], "no such directory"),
    (["--prompts", "/nonexistent/prompts.txt"], "no such file"),
    (["--method", "refl", "--K", "3"], "--K applies to --method draft only"),
    (["--gradient_checkpointing", "false", "--recompute", "lean"], "conflicts with --recompute"),
    (["--recompute", "auto"], "--recompute auto needs --memory_budget"),
    (["--learning_rate", "abc"], "--learning_rate expects float"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--reward", "nosuchreward"], "unknown reward 'nosuchreward'"),
    (["--config", "nosuchpreset"], "neither a YAML file nor a preset"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys, tmp_path, tiny_sd_dir):
    extra = ["--output_dir", str(tmp_path / "out")] + ([] if "--model" in argv else ["--model", tiny_sd_dir])
    code = main(argv + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "Traceback" not in err[0]


def test_not_a_diffusers_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "not a diffusers model directory" in capsys.readouterr().err


def test_unreadable_prompt_file(tmp_path, capsys, tiny_sd_dir):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8")
    assert main(["--prompts", str(bad), "--model", tiny_sd_dir, "--output_dir", str(tmp_path / "o")]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err


def test_embedded_default_end_to_end(tmp_path):
    """`python engine/train.py` with no --model: the embedded default, as a user runs it."""
    env = dict(os.environ, REFL_ENGINE_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "engine" / "train.py"), "--method", "draft", "--K", "full",
         "--max_train_steps", "2", "--num_inference_steps", "4", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "draft"
    assert (out / "samples" / "step-000000.png").exists() and (out / "reward_curve.png").exists()
    assert "done: 2 steps of draft" in proc.stdout


def test_presets_parse_and_aliases():
    from refl_engine.config import PRESET_DIR, parse_args

    for preset in sorted(PRESET_DIR.glob("*.yaml")):
        cfg = parse_args(["--config", preset.stem])
        assert cfg.method.method in ("refl", "draft", "draft-lv", "alignprop")
    cfg = parse_args(["--config", "draft-sd15", "--pretrained_model_name_or_path", "some/model",
                      "--train-batch-size", "3", "--use_8bit_adam", "true"])
    assert cfg.model.model == "some/model" and cfg.optim.train_batch_size == 3 and cfg.optim.use_8bit_adam
    assert cfg.method.num_inference_steps == 50 and cfg.model.rank == 8

"""The CLI: bad input gives one line naming the problem and the fix, exit code 2, no traceback,
before anything heavy loads; `--help` exits 0; the embedded default runs end to end."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refl_engine.config import FIELDS, _interval
from refl_engine.train import main
from hang import hang_timeout

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, code, needle, after_loading=False):
    """Exit code 2 and one line `error: ...` naming the problem. `after_loading`: the libraries'
    progress bars of model loading may come first; the error is still one line, the last."""
    err = capsys.readouterr().err.strip()
    lines = err.splitlines()
    assert code == 2, lines
    if after_loading:
        assert "Traceback" not in err and [x for x in lines if x.startswith("error:")] == lines[-1:], lines
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Traceback" not in lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if a flag that should be refused reaches the trainer."""
    import refl_engine.trainer

    def refuse(cfg):
        raise AssertionError("the flags were accepted and training started")

    monkeypatch.setattr(refl_engine.trainer, "ReFLTrainer", refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the diffusion model starts loading: the check must come before."""
    import refl_engine.trainer

    def refuse(*args, **kwargs):
        raise AssertionError("the diffusion model started loading before the input was checked")

    monkeypatch.setattr(refl_engine.trainer, "load_pipeline_components", refuse)


@pytest.mark.parametrize("argv,needle", [
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--method", "draft", "--K", "0"], "--K 0 is out of range"),
    (["--method", "draft", "--K", "51", "--num_inference_steps", "50"], "--K 51 is out of range"),
    (["--method", "draft", "--K", "many"], "--K must be 'full' or an integer"),
    (["--model", "/nonexistent/model"], "no such directory"),
    (["--prompts", "/nonexistent/prompts.txt"], "no such file"),
    (["--method", "refl", "--K", "3"], "--K applies to --method draft only"),
    (["--gradient_checkpointing", "--recompute", "lean"], "conflicts with --recompute lean"),
    (["--memory_budget", "1KB"], "--memory_budget: one training step does not fit"),  # at the first step
    (["--recompute", "auto", "--memory_budget=-5GB"], "--memory_budget '-5GB' is not a positive size"),
    (["--recompute", "auto", "--memory_budget", "lots"], "--memory_budget 'lots' is not a positive size"),
    (["--learning_rate", "abc"], "invalid float value: 'abc'"),
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
    (["--guidance_scale", "0.5"], "--guidance_scale 0.5 is out of range"),
    (["--lr_warmup_steps", "500", "--max_train_steps", "100"], "--lr_warmup_steps 500 is longer than the run"),
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--max_train", "5"], "unrecognized arguments: --max_train"),  # no prefix abbreviations
    (["--use_8bit_adam", "maybe"], "--use_8bit_adam"),
    (["--enable_xformers_memory_efficient_attention", "--kernels", "triton"], "conflicts with --kernels triton"),
    (["--reward", "nosuchreward"], "unknown reward 'nosuchreward'"),
    (["--reward", "colorfulness:/some/file"], "takes no path"),
    (["--config", "nosuchpreset"], "neither a YAML file nor a preset"),
    (["--resolution", "30"], "--resolution 30 is not a multiple of 4"),  # tiny-sd: VAE x2 times UNet x2
    # ImageReFL, the regularizers, training-time evaluation (their numeric ranges: BAD_NUMERIC below)
    (["--reward_loss", "square"], "invalid choice: 'square'"),
    (["--kl_coeff", "0.1", "--rank", "0", "--zero", "3"], "--kl_coeff with full fine-tuning (--rank 0)"),
    (["--pretrain_loss_coeff", "0.1"], "--pretrain_loss_coeff needs image-caption pairs"),
    (["--method", "imagerefl"], "--method imagerefl trains on real images: give --train_data_dir"),
    (["--method", "imagerefl", "--handover_step", "20", "--num_inference_steps", "20"], "--handover_step 20 must be"),
    (["--method", "imagerefl", "--stop_range", "2:5", "--num_inference_steps", "20"], "ends before --handover_step"),
    (["--refl_every", "1"], "--refl_every must be 0 (never) or >= 2"),
    (["--train_data_dir", "/nonexistent/folder"], "--train_data_dir '/nonexistent/folder': no such folder"),
    (["--eval_every", "5", "--eval_images_per_prompt", "1"], "--eval_images_per_prompt"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys, tmp_path, tiny_sd_dir):
    extra = ["--output_dir", str(tmp_path / "out")] + ([] if "--model" in argv else ["--model", tiny_sd_dir])
    # these two need the model (the second, a step's profile)
    _one_line_error(capsys, main(argv + extra), needle, after_loading="--resolution" in argv or "1KB" in argv)


# ------------------------------------------------------------------ every numeric flag, bad values

NUMERIC = {name: info for name, info in FIELDS.items() if info.base in (int, float)}


def test_every_numeric_flag_declares_its_range():
    """A new numeric field must say which values are valid (arg(..., valid="[lo, hi]")), so the
    table below covers it."""
    missing = [name for name, info in NUMERIC.items() if info.valid is None]
    assert not missing, f"declare valid=... for these config fields: {missing}"


def _bad_values(info) -> list[str]:
    """Values just outside the declared interval, plus non-finite and non-numeric ones."""
    lo, lo_in, hi, hi_in = _interval(info.valid)
    is_int = info.base is int
    bad = ["abc"] + ([] if is_int else ["nan", "inf", "-inf"]) + (["1.5"] if is_int else [])
    step = 1 if is_int else 0.5
    for bound, closed, sign in ((lo, lo_in, -1), (hi, hi_in, +1)):
        if math.isfinite(bound):
            value = bound + sign * step if closed else bound
            bad.append(str(int(value)) if is_int else repr(float(value)))
    return bad


BAD_NUMERIC = [(name, value) for name, info in NUMERIC.items() if info.valid for value in _bad_values(info)]


@pytest.mark.parametrize("name,value", BAD_NUMERIC, ids=[f"{n}={v}" for n, v in BAD_NUMERIC])
def test_bad_numeric_values_refused(name, value, capsys, tmp_path, no_training):
    code = main([f"--{name}={value}", "--output_dir", str(tmp_path / "out")])
    _one_line_error(capsys, code, f"--{name}")


def test_numeric_defaults_are_valid():
    """The table's reference: every default is inside its own declared range."""
    from refl_engine.config import in_interval

    for name, info in NUMERIC.items():
        if info.default is not None and info.valid:
            assert in_interval(info.default, info.valid), (name, info.default, info.valid)


# ------------------------------------------------------------------ rewards: missing and malformed weights

REAL_REWARDS = ("aesthetic", "hps", "pickscore", "imagereward")


def _expected_file(name):
    from refl_engine.rewards import REWARDS

    return REWARDS[name].files.local[0]


@pytest.mark.parametrize("name", REAL_REWARDS)
def test_reward_missing_weights_before_model_load(name, capsys, tmp_path, no_model_load):
    code = main(["--reward", f"{name}:{tmp_path}/missing/{_expected_file(name)}", "--output_dir", str(tmp_path / "o")])
    _one_line_error(capsys, code, "no such file or directory")


@pytest.mark.parametrize("name", REAL_REWARDS)
def test_reward_empty_directory_before_model_load(name, capsys, tmp_path, no_model_load):
    (tmp_path / "weights").mkdir()
    code = main(["--reward", f"{name}:{tmp_path}/weights", "--output_dir", str(tmp_path / "o")])
    _one_line_error(capsys, code, f"holds no {_expected_file(name)}")


@pytest.mark.parametrize("name", REAL_REWARDS)
def test_reward_offline_hub_before_model_load(name, capsys, tmp_path, monkeypatch, no_model_load):
    """`--reward NAME` with no path fetches from the hub: offline and not cached -> one line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    code = main(["--reward", name, "--output_dir", str(tmp_path / "o")])
    _one_line_error(capsys, code, "the hub is offline")


def _malformed_weights(name, root: Path) -> Path:
    """A directory the early check accepts (the expected file names are there) holding a file that
    is not the checkpoint: a few bytes of text."""
    root.mkdir()
    (root / _expected_file(name)).write_text("not a checkpoint\n")
    if name == "aesthetic":  # the CLIP directory the MLP comes with: a real (tiny) one, so the .pth is what fails
        sys.path.insert(0, str(ROOT / "tests" / "rewards"))
        from reward_fixtures import tiny_clip_config, write_clip_tokenizer
        from transformers import CLIPModel

        tok = write_clip_tokenizer(root)
        CLIPModel(tiny_clip_config(tok)).save_pretrained(str(root))
    return root


@pytest.mark.parametrize("name", REAL_REWARDS)
def test_reward_malformed_weights(name, capsys, tmp_path, tiny_sd_dir, monkeypatch):
    root = _malformed_weights(name, tmp_path / "weights")
    capsys.readouterr()  # the fixture's own save_pretrained progress output

    def no_diffusion_model(*args, **kwargs):
        raise AssertionError("the diffusion model loaded before the reward's weights were read")

    monkeypatch.setattr("refl_engine.trainer.load_pipeline_components", no_diffusion_model)
    code = main(["--reward", f"{name}:{root}", "--model", tiny_sd_dir, "--output_dir", str(tmp_path / "o"),
                 "--max_train_steps", "1", "--num_inference_steps", "2"])
    _one_line_error(capsys, code, str(root), after_loading=True)


# ------------------------------------------------------------------ --help and files

def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--use_8bit_adam" in out and "{refl,draft,draft-lv,alignprop" in out


@pytest.mark.parametrize("entry", [["engine/train.py"], ["-m", "refl_engine.train"]])
def test_help_in_a_fresh_interpreter(entry):
    proc = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True, cwd=ROOT,
                          timeout=hang_timeout(300))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "usage: refl-train" in proc.stdout


def test_not_a_diffusers_directory(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "not a diffusers model directory" in capsys.readouterr().err


def test_unreadable_prompt_file(tmp_path, capsys, tiny_sd_dir):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"\xff\xfe\xfa not utf-8")
    assert main(["--prompts", str(bad), "--model", tiny_sd_dir, "--output_dir", str(tmp_path / "o")]) == 2
    assert "cannot read prompt file" in capsys.readouterr().err


def test_jsonl_row_without_prompt(tmp_path, capsys, tiny_sd_dir, no_model_load):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a red circle"}\n{"text": "no prompt here"}\n')
    code = main(["--prompts", str(bad), "--output_dir", str(tmp_path / "o")])
    _one_line_error(capsys, code, f"{bad}:2: no 'prompt' or 'caption' field")


def test_embedded_default_end_to_end(tmp_path):
    """`python engine/train.py` with no --model: the embedded default, as a user runs it."""
    env = dict(os.environ, REFL_ENGINE_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "engine" / "train.py"), "--method", "draft", "--K", "full",
         "--max_train_steps", "2", "--num_inference_steps", "4", "--output_dir", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=hang_timeout(600),
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
        assert cfg.method.method in ("refl", "draft", "draft-lv", "alignprop", "imagerefl")
    cfg = parse_args(["--config", "draft-sd15", "--pretrained_model_name_or_path", "some/model",
                      "--train-batch-size", "3", "--use_8bit_adam", "true"])
    assert cfg.model.model == "some/model" and cfg.optim.train_batch_size == 3 and cfg.optim.use_8bit_adam
    assert cfg.method.num_inference_steps == 50 and cfg.model.rank == 8


# ------------------------------------------------------------------ refl-plan takes the training flags

def _plan_main(argv):
    from refl_engine.plan import main as plan_main

    return plan_main(argv)


def test_plan_accepts_every_training_flag():
    """Every flag `refl-train --help` lists is a flag of refl-plan, with the same destination,
    default and choices (one parser)."""
    import re

    from refl_engine.config import build_parser
    from refl_engine.plan import PlanOptions

    train, plan = build_parser("refl-train"), build_parser("refl-plan", extra=(PlanOptions,))
    listed = set(re.findall(r"(?<![\w-])(--[A-Za-z0-9][\w-]*)", train.format_help()))
    assert "--use_8bit_adam" in listed and "--pretrained-model-name-or-path" in listed
    plan_options = plan._option_string_actions
    missing = sorted(listed - set(plan_options))
    assert not missing, f"refl-plan lacks training flags: {missing}"
    for option in listed - {"--help"}:
        a, b = train._option_string_actions[option], plan_options[option]
        assert (a.dest, a.default, a.choices, a.nargs) == (b.dest, b.default, b.choices, b.nargs), option


def test_plan_help_exits_0(capsys):
    assert _plan_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: refl-plan" in out and "--budget_gb" in out and "--use_8bit_adam" in out


@pytest.mark.parametrize("argv,needle", [
    (["--guidance_scale", "nan"], "--guidance_scale must be a finite number"),
    (["--K", "0"], "--K 0 is out of range"),
    (["--reward", "nosuchreward"], "unknown reward 'nosuchreward'"),
    (["--budget_gb", "-3"], "--budget_gb -3.0 is out of range"),
    (["--max_train", "5"], "unrecognized arguments: --max_train"),
    (["--config", "nosuchpreset"], "neither a YAML file nor a preset"),
])
def test_plan_bad_input_one_line_exit_2(argv, needle, capsys):
    _one_line_error(capsys, _plan_main(argv), needle)


def test_plan_refuses_a_resolution_as_the_trainer_does(capsys, tmp_path, tiny_sd_dir):
    """The same check, the same line: a side the model cannot down-sample evenly (tiny-sd: 4)."""
    flags = ["--model", tiny_sd_dir, "--resolution", "30"]
    assert main([*flags, "--output_dir", str(tmp_path / "o")]) == 2
    trainer_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert _plan_main(flags) == 2
    plan_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert plan_line == trainer_line and "--resolution 30 is not a multiple of 4" in plan_line
    # SD1.5 (its shipped configs stand for the hub id): 500 px is refused, 512 planned
    assert _plan_main(["--model", "runwayml/stable-diffusion-v1-5", "--resolution", "500"]) == 2
    err = capsys.readouterr().err
    assert "--resolution 500 is not a multiple of 64 for this model" in err and "use 448 or 512" in err


def test_plan_maps_the_training_flags(tmp_path):
    """The one mapping from the training flags to the planner's inputs."""
    from refl_engine.config import parse_args
    from refl_engine.plan import PlanOptions, plan_spec

    cfg = parse_args(["--config", "draft-k1-sd15", "--use_8bit_adam", "--no_checkpoint_decode",
                      "--train_batch_size", "3", "--gradient_accumulation_steps", "4", "--memory_budget", "24GiB",
                      "--reward", "aesthetic=1,hps=0.5", "--height", "512", "--width", "768"])
    spec = plan_spec(cfg, PlanOptions(reserve_gb=2.0))
    assert (spec.model, spec.method, spec.K, spec.num_inference_steps, spec.guidance_scale) == \
        ("runwayml/stable-diffusion-v1-5", "draft", "1", 50, 7.5)
    assert (spec.optimizer, spec.checkpoint_decode, spec.batch_size, spec.mixed_precision, spec.rank) == \
        ("adamw8bit", False, 3, "bf16", 8)
    assert spec.budget_gb == 24.0 and spec.reserve_gb == 2.0 and spec.reward == "aesthetic=1,hps=0.5"
    assert (spec.height, spec.width) == (512, 768)


# (method, flags): a small grid of methods and K; N is the test's parameter
WINDOW_GRID = [
    ("draft", ["--K", "full"]), ("draft", ["--K", "1"]), ("draft", ["--K", "2"]), ("refl", []),
    ("draft-lv", ["--lv_inner", "1"]), ("draft-lv", ["--lv_inner", "3"]), ("alignprop", []),
    ("alignprop", ["--alignprop_k_min", "2", "--alignprop_k_max", "2"]),
]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("method,flags", WINDOW_GRID, ids=[f"{m}{''.join(f)}" for m, f in WINDOW_GRID])
def test_plan_window_is_the_grad_carrying_calls_a_rollout_makes(method, flags, n):
    """The planner's window for the training flags equals the most grad-carrying model calls the
    method's rollouts make (counted on a toy model whose output carries gradient only inside the
    window; the largest over draws, as AlignProp draws K)."""
    import torch
    from diffusers import DDIMScheduler

    from refl_engine.config import ConfigError, parse_args
    from refl_engine.memory.recompute import NoRecompute
    from refl_engine.methods import SamplingChain, build_method
    from refl_engine.plan import plan_spec
    from refl_engine.sampling import DDIMSchedule

    try:
        cfg = parse_args(["--method", method, "--num_inference_steps", str(n), *flags])
    except ConfigError:
        pytest.skip("K or k_max beyond N")
    planned = plan_spec(cfg).window_size()
    w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
    counted = []

    def eps(x, t):
        out = w * x + torch.cos(x + float(t) / 300.0)
        counted[-1] += int(out.requires_grad)
        return out

    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(), n)
    rollouts = build_method(cfg.method)
    for seed in range(12):
        counted.append(0)
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=g)
        rollouts.rollout(SamplingChain(eps, schedule, NoRecompute()), x_T, g)
    assert max(counted) == planned, (counted, planned)


def test_plan_reads_a_hub_ids_configs_only(tmp_path, tiny_sd_dir, monkeypatch, capsys):
    """A hub id: its model_index and component configs are fetched (here served from the tiny-sd
    folder), never its weights, and planned like the local folder; offline, one line."""
    import huggingface_hub
    from huggingface_hub import constants

    from refl_engine.config import parse_args
    from refl_engine.memory.planner import Planner
    from refl_engine.plan import plan_spec

    fetched = []

    def serve(repo_id, filename, revision=None, cache_dir=None, **kw):
        assert filename.endswith(".json"), f"the planner fetched {filename}, not a config"
        fetched.append(filename)
        return str(Path(tiny_sd_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", serve)
    hub = Planner(plan_spec(parse_args(["--model", "someone/tiny-sd", "--rank", "0"]))).param_counts()
    local = Planner(plan_spec(parse_args(["--model", tiny_sd_dir, "--rank", "0"]))).param_counts()
    assert hub == local and "model_index.json" in fetched and "unet/config.json" in fetched
    monkeypatch.undo()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code = _plan_main(["--model", "someone/not-cached", "--cache_dir", str(tmp_path / "empty")])
    _one_line_error(capsys, code, "--model someone/not-cached: cannot read its configs from the hub")

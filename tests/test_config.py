"""The run description and its parser: every field is a flag, diffusers' flags parse as in the
training examples, presets plus flags equal flags, one validation, prompt files read right."""
import dataclasses
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hang import hang_timeout

from refl_engine.config import (
    FIELDS,
    PRESET_DIR,
    SECTIONS,
    ConfigError,
    TrainConfig,
    build_parser,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_field_is_a_flag():
    """Every field of every section, and nothing else, is a flag: a new field needs no parser code."""
    fields = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    assert fields == set(FIELDS)
    options = build_parser()._option_string_actions
    for name in fields:
        assert f"--{name}" in options and options[f"--{name}"].dest == name
        assert options[f"--{name.replace('_', '-')}"].dest == name  # the hyphen spelling too


def test_bare_boolean_flags_and_no_forms():
    cfg = parse_args(["--use_8bit_adam", "--gradient_checkpointing", "--allow_tf32", "--no_checkpoint_decode",
                      "--no-progress"])
    assert cfg.optim.use_8bit_adam and cfg.memory.gradient_checkpointing and cfg.optim.allow_tf32
    assert not cfg.memory.checkpoint_decode and not cfg.output.progress
    assert cfg.memory.checkpoint_reward  # untouched
    cfg = parse_args(["--use_8bit_adam", "false", "--checkpoint_reward", "no"])
    assert not cfg.optim.use_8bit_adam and not cfg.memory.checkpoint_reward
    default = parse_args([])
    assert not default.optim.use_8bit_adam and not default.optim.allow_tf32 and default.memory.checkpoint_decode


def test_gradient_checkpointing_is_off_by_default_and_asks_for_a_checkpointing_policy():
    cfg = parse_args([])
    assert cfg.memory.gradient_checkpointing is False and cfg.memory.recompute == "auto"
    for policy in ("full", "selective", "auto"):
        assert parse_args(["--gradient_checkpointing", "--recompute", policy]).memory.recompute == policy
    for policy in ("none", "lean"):
        with pytest.raises(ConfigError, match=f"--gradient_checkpointing conflicts with --recompute {policy}"):
            parse_args(["--gradient_checkpointing", "--recompute", policy])


def _preset_as_flags(path: Path) -> list[str]:
    flags = []
    for key, value in yaml.safe_load(path.read_text()).items():
        if isinstance(value, bool):
            flags += [f"--{key}"] if value else [f"--{key}", "false"]
        else:
            flags += [f"--{key}", str(value)]
    return flags


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_preset_plus_overrides_equals_flags(preset):
    overrides = ["--learning_rate", "3e-4", "--train-batch-size", "1", "--no_checkpoint_decode", "--seed", "7"]
    from_preset = parse_args(["--config", preset, *overrides])
    from_flags = parse_args([*_preset_as_flags(PRESET_DIR / f"{preset}.yaml"), *overrides])
    assert from_preset.to_dict() == from_flags.to_dict()
    assert from_preset.optim.learning_rate == 3e-4 and from_preset.optim.train_batch_size == 1
    # the preset is really applied (not only the overrides)
    assert from_preset.to_dict() != parse_args(overrides).to_dict()


def test_a_preset_file_and_nested_sections(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("method:\n  method: refl\n  num_inference_steps: 12\noptim:\n  learning_rate: 2.0e-4\nrank: 2\n")
    cfg = parse_args(["--config", str(f), "--rank", "3"])
    assert (cfg.method.method, cfg.method.num_inference_steps, cfg.optim.learning_rate, cfg.model.rank) == \
        ("refl", 12, 2e-4, 3)
    f.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"--config .*--learning_rate expects float"):
        parse_args(["--config", str(f)])


def test_diffusers_names_are_aliases():
    a = parse_args(["--pretrained_model_name_or_path", "x/y", "--adam_weight_decay", "0.1", "--num_validation_images",
                    "3", "--lora_rank", "2", "--num_train_steps", "9", "--checkpoints_keep", "1"])
    b = parse_args(["--model", "x/y", "--weight_decay", "0.1", "--num_sample_images", "3", "--rank", "2",
                    "--max_train_steps", "9", "--checkpoints_total_limit", "1"])
    assert a.to_dict() == b.to_dict()
    assert (b.model.model, b.optim.weight_decay, b.data.num_sample_images, b.model.rank) == ("x/y", 0.1, 3, 2)


def test_diffusers_example_flags_have_their_meaning(tmp_path):
    from refl_engine.data import sample_prompts

    cfg = parse_args(["--enable_xformers_memory_efficient_attention", "--validation_prompt", "a red star",
                      "--num_validation_images", "3", "--train_data_dir", str(tmp_path), "--logging_dir", "tb",
                      "--cache_dir", str(tmp_path / "hub"), "--variant", "fp16", "--allow_tf32"])
    assert cfg.model.kernels == "xformers"
    assert sample_prompts(cfg.data, ["p1", "p2"]) == ["a red star"] * 3
    assert cfg.data.train_data_dir == str(tmp_path) and cfg.output.logging_dir == "tb"
    assert (cfg.model.cache_dir, cfg.model.variant) == (str(tmp_path / "hub"), "fp16")


def test_allow_tf32_sets_the_torch_backend_flags():
    import torch

    from refl_engine.train import apply_backend_flags

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        apply_backend_flags(parse_args([]))
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        apply_backend_flags(parse_args(["--allow_tf32"]))
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_warmup_with_the_constant_schedule_warms_up():
    """diffusers' 'constant' ignores warm-up steps; the config runs it as constant_with_warmup,
    checked against diffusers' own schedule."""
    import torch
    from diffusers.optimization import get_scheduler

    cfg = parse_args(["--lr_warmup_steps", "4", "--learning_rate", "1e-3"])
    assert cfg.optim.lr_scheduler == "constant_with_warmup"
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.learning_rate)
    sched = get_scheduler(cfg.optim.lr_scheduler, opt, num_warmup_steps=cfg.optim.lr_warmup_steps,
                          num_training_steps=cfg.optim.max_train_steps)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], abs=1e-12)
    assert parse_args([]).optim.lr_scheduler == "constant"  # no warm-up: unchanged


def test_no_prefix_abbreviations():
    for argv in (["--max_train", "5"], ["--learning", "1e-3"], ["--use_8bit"]):
        with pytest.raises(ConfigError, match="unrecognized arguments"):
            parse_args(argv)


def test_help_is_grouped_lists_choices_and_defaults_and_is_stable():
    """--help: one group per section, choices and defaults shown, canonical underscore spelling
    first, the same text whatever the hash seed."""
    code = "from refl_engine.config import build_parser; print(build_parser().format_help())"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           timeout=hang_timeout(300),
                           env=dict(os.environ, PYTHONHASHSEED=str(seed), COLUMNS="100")).stdout
            for seed in (1, 2)]
    assert outs[0] == outs[1] and outs[0]
    text = outs[0]
    for name, cls in SECTIONS.items():
        title = getattr(cls, "_argument_group_name", None)
        assert title, f"give the section {name} an _argument_group_name: its flags' --help group"
        assert f"\n{title}:\n" in text
    assert "--lr_scheduler {constant,constant_with_warmup,linear,cosine}" in text
    block = re.split(r"\n  --recompute \{[a-z,]+\}", text, maxsplit=1)[1].split("\n  --", 1)[0]
    assert re.search(r"\(default:\s+auto\)", block), block
    usage = text.split("\n\n")[0]
    assert "--max_train_steps" in usage and "--num_train_steps" not in usage and "--max-train-steps" not in usage


def test_to_dict_from_dict_round_trip_and_set_field():
    from refl_engine.config import set_field

    cfg = parse_args(["--method", "refl", "--stop_range", "3:5", "--num_inference_steps", "8", "--use_8bit_adam"])
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg
    set_field(again, "learning-rate", "5e-4")
    set_field(again, "pretrained_model_name_or_path", "a/b")
    assert again.optim.learning_rate == 5e-4 and again.model.model == "a/b"
    with pytest.raises(ConfigError, match="--recompute must be one of"):
        set_field(again, "recompute", "sometimes")
    with pytest.raises(ConfigError, match="unknown option"):
        set_field(again, "no_such_field", 1)


def test_validation_checks_fields_set_in_code():
    """validate() catches what a parser never sees: values set from Python or a preset dict."""
    from refl_engine.config import validate

    cfg = TrainConfig()
    cfg.method.guidance_scale = float("nan")
    with pytest.raises(ConfigError, match="--guidance_scale must be a finite number"):
        validate(cfg)
    cfg = TrainConfig()
    cfg.optim.train_batch_size = 0
    with pytest.raises(ConfigError, match=r"--train_batch_size 0 is out of range: valid \[1, inf\)"):
        validate(cfg)


# ------------------------------------------------------------------ prompt files

def test_jsonl_row_without_a_prompt_names_the_line(tmp_path):
    from refl_engine.data import load_prompts

    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"caption": "b"}\n{"text": "c"}\n')
    with pytest.raises(ConfigError, match=rf"{f}:4: no 'prompt' or 'caption' field \(found: text\)"):
        load_prompts(str(f))
    f.write_text('{"prompt": "a"}\n{"prompt": null}\n')
    with pytest.raises(ConfigError, match=rf"{f}:2: 'prompt' is NoneType, not a string"):
        load_prompts(str(f))
    f.write_text('{"prompt": "a"}\n{"caption": "b"}\n')
    assert load_prompts(str(f)) == ["a", "b"]


def test_csv_read_with_the_csv_module(tmp_path):
    from refl_engine.data import load_prompts

    f = tmp_path / "p.csv"
    f.write_text('id,Prompt,score\n1,"a cat, sitting",3\n2,"a ""quoted"" dog",4\n3,,5\n')
    assert load_prompts(str(f)) == ["a cat, sitting", 'a "quoted" dog']  # header and empty cell dropped
    f.write_text("id,caption\n1,a tree\n")
    assert load_prompts(str(f)) == ["a tree"]
    f.write_text("id,text\n1,a tree\n")
    with pytest.raises(ConfigError, match="no 'prompt' or 'caption' column in the header \\(id, text\\)"):
        load_prompts(str(f))


def test_invisible_only_lines_dropped(tmp_path):
    from refl_engine.data import load_prompts

    f = tmp_path / "p.txt"
    f.write_text("\ufeffa red circle\n   \n\u200b\n\u200d\u2060\t\n\u00a0\n  a blue square  \n", encoding="utf-8")
    assert load_prompts(str(f)) == ["a red circle", "a blue square"]
    f.write_text("\u200b\n \n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(str(f))


def test_long_prompts_warned_once(caplog):
    from transformers import AutoTokenizer

    from refl_engine.data import warn_long_prompts

    tok = AutoTokenizer.from_pretrained(str(ROOT / "engine" / "toyworld" / "pipeline" / "tokenizer"))
    limit = tok.model_max_length
    short = "a red circle on a blue background"
    long = " ".join(["red"] * (limit + 5))
    with caplog.at_level(logging.WARNING, logger="refl_engine"):
        assert warn_long_prompts([short, long, long, short], tok) == 2
    records = [r for r in caplog.records if "longer than the text encoder" in r.getMessage()]
    assert len(records) == 1 and f"2 of 4 --prompts are longer than the text encoder's {limit} tokens" in \
        records[0].getMessage()
    assert warn_long_prompts([short], tok) == 0


def test_variant_picks_the_weights_files(tmp_path, tiny_sd_dir):
    """--variant fp16 loads *.fp16.safetensors, as diffusers' from_pretrained(variant=...) names
    them: a folder holding only those loads with the variant and is refused without it."""
    import shutil

    from refl_engine.models.load import load_pipeline_components

    root = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, root)
    renamed = 0
    for f in root.rglob("*.safetensors"):
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
        renamed += 1
    assert renamed >= 3  # unet, vae, text encoder
    c = load_pipeline_components(str(root), variant="fp16", cache_dir=str(tmp_path / "hub"))
    assert c.unet is not None and c.text_encoder is not None
    with pytest.raises(ConfigError, match="cannot load diffusers model"):
        load_pipeline_components(str(root))

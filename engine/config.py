"""The training configuration: one typed dataclass tree, YAML presets, CLI overrides, validation.

Every flag is a field of a section below; `--section.field` is not needed: field names are unique
across sections, so `--learning_rate 1e-4` or `--learning-rate 1e-4` both set
`TrainConfig.optim.learning_rate`. Flags that users of diffusers' training examples know keep
their names (see ALIASES). Validation happens once, at start, and raises ConfigError with a
message that names the flag and the fix.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml


class ConfigError(ValueError):
    """Bad user input: the message names the problem and the fix; the CLI exits with code 2."""


@dataclass
class ModelConfig:
    model: str | None = None  # diffusers dir, hub id, or preset ("tiny-sd"); None = embedded default
    revision: str | None = None
    resolution: int = 0  # square image side in pixels; 0 = the model's native size
    height: int = 0  # non-square sizes: pixels, overriding --resolution for that side; 0 = --resolution
    width: int = 0
    rank: int = 4  # LoRA rank on the UNet attention projections; 0 = full fine-tuning
    lora_alpha: float = 0.0  # 0 = same as rank
    lora_target_modules: str = "to_q,to_k,to_v,to_out.0"
    kernels: str = "torch"  # torch | triton | sdpa | xformers


@dataclass
class MethodConfig:
    method: str = "draft"  # refl | draft | draft-lv | alignprop
    K: str = "full"  # DRaFT window: "full" or 1..N
    stop_range: str = ""  # ReFL stop-step indices "lo:hi" (inclusive); "" = the last 10 steps
    lv_inner: int = 2  # DRaFT-LV inner loops n
    alignprop_k_min: int = 1
    alignprop_k_max: int = 0  # 0 = N
    num_inference_steps: int = 20
    guidance_scale: float = 1.0  # > 1 enables classifier-free guidance
    eta: float = 0.0  # DDIM eta
    reward: str = "colorfulness"
    reward_output: str = "raw"  # raw | rescaled (the [0, 1] form ImageReFL trains on)
    reward_scale: float = 1.0  # loss = -reward_scale * reward
    reward_loss: str = "linear"  # linear: -reward_scale * r | relu: reward_scale * relu(threshold - r) (ImageReward script)
    reward_loss_threshold: float = 2.0
    handover_step: int = -1  # ImageReFL: step index where the noised real latent enters; -1 = 3/4 of N (30 of 40)
    refl_every: int = 4  # ImageReFL: every n-th rollout is a classic ReFL one from pure noise; 0 = never
    diffusion_loss_weight: float = 1e-5  # ImageReFL: weight of ||eps - eps_theta(x_t', t', c)||^2
    kl_coeff: float = 0.0  # DRaFT+ penalty coeff * ||eps_theta - eps_base||^2 on the window steps (LoRA only)
    pretrain_loss_coeff: float = 0.0  # diffusion loss on --train_data_dir pairs, added to every method's loss


@dataclass
class DataConfig:
    prompts: str = "builtin:toy"  # builtin:toy, a .txt file (one prompt a line) or a .jsonl with "prompt"
    sample_prompts: str = ""  # prompts for the sample grids ("" = the first prompts of `prompts`)
    num_sample_images: int = 8
    train_data_dir: str = ""  # image-caption pairs: a folder with metadata.jsonl (file_name, text) or COCO captions
    coco_captions: str = ""  # COCO captions json (images + annotations); images in --train_data_dir or beside it
    caption_column: str = ""  # metadata.jsonl caption field; "" = text, caption or prompt


@dataclass
class OptimConfig:
    train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # constant | linear | cosine
    lr_warmup_steps: int = 0
    max_train_steps: int = 40
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPU only; CPU runs in fp32)
    seed: int = 0
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row


@dataclass
class MemoryConfig:
    recompute: str = "selective"  # none | lean | full | selective | auto (engine/memory/recompute.py)
    memory_budget: str = ""  # for --recompute auto: bytes or "40GB"
    checkpoint_decode: bool = True
    selective_decode: bool = True  # VAE GroupNorm/SiLU outputs and frozen-conv inputs recomputed, not kept
    checkpoint_reward: bool = True
    gradient_checkpointing: bool = True  # diffusers alias; False means --recompute none


@dataclass
class OutputConfig:
    output_dir: str = "outputs/run"
    checkpointing_steps: int = 0  # 0 = only at the end
    checkpoints_total_limit: int = 3
    resume_from_checkpoint: str = ""  # "latest" or a checkpoint directory
    overwrite_output_dir: bool = False  # replace the run an existing --output_dir holds
    sample_every: int = 0  # 0 = only before and after training
    report_to: str = "none"  # tensorboard | wandb | all | none (metrics.jsonl is always written)
    tracker_project_name: str = "refl-engine"  # the wandb project
    progress: bool = True
    eval_every: int = 0  # held-out reward and diversity every n steps; 0 = off
    eval_prompts: str = ""  # held-out prompts ("" = the last --eval_num_prompts of --prompts)
    eval_num_prompts: int = 4
    eval_images_per_prompt: int = 4
    eval_embedding: str = "pixels"  # diversity embedding: pixels, or a DINOv2/CLIP vision model dir or hub id


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls()
        for key, value in _flatten(d).items():
            set_field(cfg, key, value)
        return cfg


METHODS = ("refl", "draft", "draft-lv", "alignprop", "imagerefl")
ALIASES = {
    "pretrained_model_name_or_path": "model",
    "num_train_steps": "max_train_steps",
    "lora_rank": "rank",
    "checkpoints_keep": "checkpoints_total_limit",
}


def _sections(cfg: TrainConfig):
    for f in dataclasses.fields(cfg):
        yield f.name, getattr(cfg, f.name)


def _field_index() -> dict[str, tuple[str, Any]]:
    index = {}
    for section_name, section in _sections(TrainConfig()):
        hints = get_type_hints(type(section))
        for f in dataclasses.fields(section):
            index[f.name] = (section_name, hints[f.name])
    return index


FIELDS = _field_index()


def _flatten(d: dict) -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in {n for n, _ in _sections(TrainConfig())}:
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _coerce(name: str, typ, value):
    if value is None:
        return None
    base = typ
    if getattr(typ, "__args__", None) and type(None) in typ.__args__:
        base = next(a for a in typ.__args__ if a is not type(None))
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} expects {base.__name__}, got {value!r}") from None


def set_field(cfg: TrainConfig, name: str, value) -> None:
    name = name.replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        raise ConfigError(f"unknown option {name!r}; run with --help to see the options")
    section_name, typ = FIELDS[name]
    setattr(getattr(cfg, section_name), name, _coerce(name, typ, value))


PRESET_DIR = Path(__file__).parent / "configs"


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.exists():
        candidate = PRESET_DIR / f"{name_or_path}.yaml"
        if not candidate.exists():
            known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise ConfigError(f"--config {name_or_path!r} is neither a YAML file nor a preset; presets: {known}")
        path = candidate
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read --config {path}: {e.__class__.__name__}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="refl-train",
        description="Fine-tune a diffusion model on a differentiable reward (ReFL, DRaFT, AlignProp).",
    )
    p.add_argument("--config", default=None, help="YAML preset (a file or a name in engine/configs)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    defaults = TrainConfig()
    reverse_alias: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        reverse_alias.setdefault(target, []).append(alias)
    for section_name, section in _sections(defaults):
        group = p.add_argument_group(section_name)
        for f in dataclasses.fields(section):
            names = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
            for alias in reverse_alias.get(f.name, []):
                names |= {f"--{alias}", f"--{alias.replace('_', '-')}"}
            group.add_argument(
                *sorted(names, key=len), dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                help=f"default: {getattr(section, f.name)!r}",
            )
    return p


class _Parser(argparse.ArgumentParser):
    pass


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = build_parser()

    def fail(message):
        raise ConfigError(message.splitlines()[0])

    parser.error = fail  # one-line errors, exit code 2 from the CLI, no usage dump
    ns = vars(parser.parse_args(argv))
    ns.pop("local_rank", None)
    cfg = TrainConfig()
    preset = ns.pop("config", None)
    if preset:
        for key, value in _flatten(load_preset(preset)).items():
            set_field(cfg, key, value)
    for key, value in ns.items():
        set_field(cfg, key, value)
    validate(cfg)
    return cfg


def parse_memory(value: str) -> int:
    """'40GB' / '40G' / '512MiB' / '1234' -> bytes."""
    s = value.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ConfigError(f"--memory_budget {value!r} is not a size; write e.g. 40GB or 42949672960") from None


def parse_K(K: str, num_steps: int) -> int:
    """--K full|<int> -> number of grad-carrying steps, checked against N."""
    if str(K).lower() == "full":
        return num_steps
    try:
        k = int(K)
    except ValueError:
        raise ConfigError(f"--K must be 'full' or an integer in 1..{num_steps}, got {K!r}") from None
    if not 1 <= k <= num_steps:
        raise ConfigError(
            f"--K {k} is out of range for --num_inference_steps {num_steps}; use 1..{num_steps} or 'full'"
        )
    return k


def parse_stop_range(spec: str, num_steps: int) -> tuple[int, int]:
    if not spec:
        return max(0, num_steps - 10), num_steps - 1
    try:
        lo, hi = (int(s) for s in spec.split(":"))
    except ValueError:
        raise ConfigError(f"--stop_range must be 'lo:hi' step indices, got {spec!r}") from None
    if not 0 <= lo <= hi < num_steps:
        raise ConfigError(
            f"--stop_range {spec} must satisfy 0 <= lo <= hi < {num_steps} (--num_inference_steps)"
        )
    return lo, hi


def resolution_multiple(vae_block_out_channels, unet_block_out_channels) -> int:
    return 2 ** (len(vae_block_out_channels) - 1) * 2 ** (len(unet_block_out_channels) - 1)


def check_resolution(side: int, multiple: int, name: str = "resolution") -> None:
    """The model-dependent part of the size flags' validation (Components.image_size)."""
    if side % multiple:
        lower = side // multiple * multiple
        fix = f"{lower} or {lower + multiple}" if lower else str(multiple)
        raise ConfigError(f"--{name} {side} is not a multiple of {multiple} for this model (the VAE and UNet "
                          f"down-sample by {multiple}); use {fix}")


def validate(cfg: TrainConfig) -> None:
    m, o, mem, mo = cfg.method, cfg.optim, cfg.memory, cfg.model
    if m.method not in METHODS:
        raise ConfigError(f"unknown --method {m.method!r}; choose one of: {', '.join(METHODS)}")
    if m.num_inference_steps < 1:
        raise ConfigError("--num_inference_steps must be >= 1")
    parse_K(m.K, m.num_inference_steps)
    if m.method in ("refl", "imagerefl"):
        parse_stop_range(m.stop_range, m.num_inference_steps)
    validate_extras(cfg)
    if m.method != "draft" and str(m.K).lower() != "full" and m.method != "draft-lv":
        raise ConfigError(
            f"--K applies to --method draft only; {m.method} sets its own window "
            "(refl: --stop_range, alignprop: --alignprop_k_min/--alignprop_k_max)"
        )
    if m.method == "draft-lv" and str(m.K).lower() not in ("full", "1"):
        raise ConfigError("--method draft-lv uses K=1 by definition; drop --K or use --method draft")
    if m.method == "draft-lv" and m.lv_inner < 1:
        raise ConfigError("--lv_inner must be >= 1")
    if m.method == "alignprop":
        kmax = m.alignprop_k_max or m.num_inference_steps
        if not 1 <= m.alignprop_k_min <= kmax <= m.num_inference_steps:
            raise ConfigError(
                f"AlignProp bounds need 1 <= --alignprop_k_min ({m.alignprop_k_min}) <= --alignprop_k_max "
                f"({kmax}) <= --num_inference_steps ({m.num_inference_steps})"
            )
    if m.reward_output not in ("raw", "rescaled"):
        raise ConfigError("--reward_output must be 'raw' or 'rescaled'")
    if m.eta < 0:
        raise ConfigError("--eta must be >= 0")
    if mo.rank < 0:
        raise ConfigError("--rank must be >= 0 (0 = full fine-tuning)")
    if mo.kernels not in ("torch", "triton", "sdpa", "xformers"):
        raise ConfigError(f"unknown --kernels {mo.kernels!r}; choose torch, triton, sdpa or xformers")
    if o.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"--mixed_precision must be no, fp16 or bf16, got {o.mixed_precision!r}")
    if o.lr_scheduler not in ("constant", "linear", "cosine"):
        raise ConfigError(f"--lr_scheduler must be constant, linear or cosine, got {o.lr_scheduler!r}")
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps"):
        if getattr(o, name) < 1:
            raise ConfigError(f"--{name} must be >= 1")
    if o.learning_rate <= 0:
        raise ConfigError("--learning_rate must be > 0")
    if not mem.gradient_checkpointing:
        if mem.recompute not in (MemoryConfig.recompute, "none"):
            raise ConfigError(
                f"--gradient_checkpointing false conflicts with --recompute {mem.recompute}; drop one of them"
            )
        mem.recompute = "none"
    if mem.recompute not in ("none", "lean", "full", "selective", "auto"):
        raise ConfigError(f"unknown --recompute {mem.recompute!r}; choose none, lean, full, selective or auto")
    if mem.recompute == "auto" and not mem.memory_budget:
        raise ConfigError("--recompute auto needs --memory_budget (e.g. 70GB)")
    if mem.memory_budget:
        parse_memory(mem.memory_budget)
    if cfg.output.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ConfigError(f"--report_to must be tensorboard, wandb, all or none, got {cfg.output.report_to!r}")
    p = cfg.data.prompts
    if not p.startswith("builtin:") and not os.path.isfile(p):
        raise ConfigError(f"--prompts {p!r}: no such file; give a .txt (one prompt a line) or .jsonl, or builtin:toy")


def handover_index(handover_step: int, num_steps: int) -> int:
    """ImageReFL's hand-over step index: -1 = the paper's 30 of 40, scaled to N."""
    return round(0.75 * num_steps) if handover_step < 0 else handover_step


def validate_extras(cfg: TrainConfig) -> None:
    """ImageReFL, the regularizers, the image-caption data and training-time evaluation."""
    m, d, out = cfg.method, cfg.data, cfg.output
    n = m.num_inference_steps
    if m.reward_loss not in ("linear", "relu"):
        raise ConfigError(f"--reward_loss must be linear or relu, got {m.reward_loss!r}")
    for name in ("diffusion_loss_weight", "kl_coeff", "pretrain_loss_coeff"):
        if not getattr(m, name) >= 0:
            raise ConfigError(f"--{name} must be >= 0")
    if m.refl_every < 0 or m.refl_every == 1:
        raise ConfigError("--refl_every must be 0 (never) or >= 2 (every n-th step a ReFL step from noise)")
    if m.method == "imagerefl":
        h = handover_index(m.handover_step, n)
        if not 0 <= h < n:
            raise ConfigError(f"--handover_step {m.handover_step} must be in 0..{n - 1} (--num_inference_steps) or -1")
        lo, hi = parse_stop_range(m.stop_range, n)
        if hi < h:
            raise ConfigError(f"--stop_range {lo}:{hi} ends before --handover_step {h}; the stop step must come after "
                              "the hand-over")
        if not (d.train_data_dir or d.coco_captions):
            raise ConfigError("--method imagerefl trains on real images: give --train_data_dir (a folder with "
                              "metadata.jsonl, or COCO captions); `python -m refl_engine.toyworld.make_dataset` makes one")
    if m.pretrain_loss_coeff > 0 and not (d.train_data_dir or d.coco_captions):
        raise ConfigError("--pretrain_loss_coeff needs image-caption pairs: give --train_data_dir")
    if m.kl_coeff > 0 and cfg.model.rank == 0:
        raise ConfigError("--kl_coeff needs LoRA (--rank > 0): the base prediction is the same UNet with its "
                          "adapter switched off")
    if d.train_data_dir and not os.path.isdir(d.train_data_dir):
        raise ConfigError(f"--train_data_dir {d.train_data_dir!r}: no such folder")
    if d.coco_captions and not os.path.isfile(d.coco_captions):
        raise ConfigError(f"--coco_captions {d.coco_captions!r}: no such file")
    if out.eval_every < 0:
        raise ConfigError("--eval_every must be >= 0 (0 = off)")
    if out.eval_num_prompts < 1 or out.eval_images_per_prompt < 2:
        raise ConfigError("--eval_num_prompts must be >= 1 and --eval_images_per_prompt >= 2 (diversity compares "
                          "images of one prompt)")

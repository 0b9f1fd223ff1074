"""The run description: one typed dataclass tree, parsed by one standard parser for every entry
point (`refl-train`, `engine/train.py`, `refl-plan`), with YAML presets and one validation.

Every flag is a field of a section below and every field is a flag: `transformers.HfArgumentParser`
turns the tree into argparse options, so a new field needs nothing else (declare its valid range
with `arg(..., valid=...)`; `tests/test_cli.py` checks every numeric field has one). Spelling: the
field name with underscores is canonical (`--learning_rate`); the hyphen form (`--learning-rate`)
is accepted; diffusers' training-example names are aliases (`--pretrained_model_name_or_path`,
`--adam_weight_decay`, `--num_validation_images`, ...). Booleans are bare flags as in diffusers
(`--use_8bit_adam`, `--gradient_checkpointing`; `--flag false` works too) and a boolean that is on
by default has a `--no_<flag>` form. Choices are `Literal` types, so `--help` lists them. No prefix
abbreviations (`--max_train 5` is refused).

`--config NAME|PATH` loads a YAML preset (flat `field: value` pairs, or nested by section) as the
defaults; flags given next to it override it, so a preset plus flags gives the same config as the
equivalent flags alone.

Validation happens once, at start (`validate`): every field is checked against its type and
declared range (finite, in range, one of the choices), then the flags against each other. Errors
raise ConfigError with one line naming the flag and the fix; the CLIs print it and exit with 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """Bad user input: the message names the problem and the fix; the CLI exits with code 2."""


def _interval(spec: str) -> tuple[float, bool, float, bool]:
    """'[1, inf)' -> (1.0, True, inf, False): low, low included, high, high included."""
    s = spec.replace(" ", "")
    lo, hi = s[1:-1].split(",")
    if s[0] not in "[(" or s[-1] not in "])":
        raise ValueError(f"bad interval {spec!r}")
    return float(lo), s[0] == "[", float(hi), s[-1] == "]"


def arg(default, help: str = "", *, valid: str | None = None, aliases: tuple[str, ...] = ()):
    """A config field: its default, its --help text, its valid range in interval notation
    ("[1, inf)", "(0, 1]", "(-inf, inf)" = any finite number; checked by `validate`) and other flag
    names (each also accepted with hyphens)."""
    metadata: dict[str, Any] = {"help": help}
    if valid is not None:
        _interval(valid)  # a typo in a declaration fails at import
        metadata["valid"] = valid
    if aliases:
        metadata["aliases"] = tuple(aliases)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    _argument_group_name = "model"
    model: str | None = arg(None, "a diffusers model directory, a hub id (owner/name) or a preset (tiny-sd); unset = "
                            "the embedded toy-world model", aliases=("pretrained_model_name_or_path",))
    revision: str | None = arg(None, "hub revision (branch, tag or commit) of --model")
    variant: str | None = arg(None, "weights variant of --model, e.g. fp16 (loads *.fp16.safetensors)")
    cache_dir: str | None = arg(None, "where hub downloads are cached; unset = the Hugging Face cache")
    resolution: int = arg(0, "square image side in pixels; 0 = the model's native size; else a multiple of the VAE "
                          "factor times 2^(UNet levels - 1), 64 for SD1.5/SDXL", valid="[0, inf)")
    height: int = arg(0, "non-square sizes: pixels, overriding --resolution for that side; 0 = --resolution",
                      valid="[0, inf)")
    width: int = arg(0, "as --height, for the width", valid="[0, inf)")
    rank: int = arg(4, "LoRA rank on the UNet attention projections; 0 = full fine-tuning", valid="[0, inf)",
                    aliases=("lora_rank",))
    lora_alpha: float = arg(0.0, "LoRA alpha (adapters scale by alpha / rank); 0 = same as --rank", valid="[0, inf)")
    lora_target_modules: str = arg("to_q,to_k,to_v,to_out.0", "comma-separated module-name suffixes LoRA wraps")
    kernels: Literal["torch", "triton", "native", "xformers", "auto"] = arg(
        "torch", "attention/normalization kernels (lean recompute included): stock torch, the Triton kernels, the "
        "native (csrc/) GroupNorm+SiLU, xformers attention, or auto (Triton on CUDA, native on CPU when built, "
        "else torch)")
    enable_xformers_memory_efficient_attention: bool = arg(False, "diffusers' flag: the same as --kernels xformers")


@dataclass
class MethodConfig:
    _argument_group_name = "method"
    method: Literal["refl", "draft", "draft-lv", "alignprop", "imagerefl"] = arg("draft", "the training method")
    K: str = arg("full", "DRaFT window: gradient through the last K steps, 'full' or 1..N")
    stop_range: str = arg("", "ReFL stop-step indices 'lo:hi' (inclusive); '' = the last 10 steps")
    lv_inner: int = arg(2, "DRaFT-LV inner loops n", valid="[1, inf)")
    alignprop_k_min: int = arg(1, "AlignProp: smallest window K drawn", valid="[1, inf)")
    alignprop_k_max: int = arg(0, "AlignProp: largest window K drawn; 0 = N", valid="[0, inf)")
    num_inference_steps: int = arg(20, "DDIM steps N of a rollout", valid="[1, 1000]")
    guidance_scale: float = arg(1.0, "classifier-free guidance: 1 = none, > 1 = guided (doubles the UNet batch)",
                                valid="[1, inf)")
    eta: float = arg(0.0, "DDIM eta: 0 = deterministic DDIM, 1 = DDPM-like noise", valid="[0, 1]")
    reward: str = arg("colorfulness", "reward: a name, name:PATH (local file/dir) or a weighted sum 'a=1,b:PATH=0.5'")
    reward_output: Literal["raw", "rescaled"] = arg("raw", "raw scores, or rescaled to [0, 1] as ImageReFL trains")
    reward_scale: float = arg(1.0, "loss = -reward_scale * reward (to lower a reward, give it a negative weight "
                              "in --reward)", valid="(0, inf)")
    reward_loss: Literal["linear", "relu"] = arg(
        "linear", "linear: -reward_scale * r; relu: reward_scale * relu(threshold - r) (the ImageReward script)")
    reward_loss_threshold: float = arg(2.0, "the relu reward loss's threshold", valid="(-inf, inf)")
    handover_step: int = arg(-1, "ImageReFL: step index where the noised real latent enters; -1 = 3/4 of N "
                             "(30 of 40)", valid="[-1, inf)")
    refl_every: int = arg(4, "ImageReFL: every n-th rollout is a classic ReFL one from pure noise; 0 = never",
                          valid="[0, inf)")
    diffusion_loss_weight: float = arg(1e-5, "ImageReFL: weight of ||eps - eps_theta(x_t', t', c)||^2",
                                       valid="[0, inf)")
    kl_coeff: float = arg(0.0, "DRaFT+ penalty coeff * ||eps_theta - eps_base||^2 on the window steps (base: LoRA "
                          "off, or a frozen copy under --rank 0)",
                          valid="[0, inf)")
    pretrain_loss_coeff: float = arg(0.0, "diffusion loss on --train_data_dir pairs, added to every method's loss",
                                     valid="[0, inf)")


@dataclass
class DataConfig:
    _argument_group_name = "data"
    prompts: str = arg("builtin:toy", "training prompts: builtin:toy, a .txt (one a line), a .jsonl (a 'prompt' or "
                       "'caption' field a line) or a .csv (a 'prompt' or 'caption' column)")
    sample_prompts: str = arg("", "prompts for the sample grids, same forms as --prompts; '' = the first of --prompts")
    validation_prompt: str = arg("", "diffusers' flag: one prompt for the sample grids, drawn --num_sample_images "
                                 "times (instead of --sample_prompts)")
    num_sample_images: int = arg(8, "images in each sample grid", valid="[1, inf)", aliases=("num_validation_images",))
    train_data_dir: str = arg("", "image-caption pairs: a folder with metadata.jsonl (file_name, text) or COCO captions")
    coco_captions: str = arg("", "COCO captions json (images + annotations); images in --train_data_dir or beside it")
    caption_column: str = arg("", "metadata.jsonl caption field; '' = text, caption or prompt")


@dataclass
class OptimConfig:
    _argument_group_name = "optimization"
    train_batch_size: int = arg(2, "prompts per micro-batch on each device", valid="[1, inf)")
    gradient_accumulation_steps: int = arg(1, "micro-batches per optimizer step", valid="[1, inf)")
    learning_rate: float = arg(1e-3, "AdamW learning rate", valid="(0, inf)")
    weight_decay: float = arg(0.0, "AdamW weight decay", valid="[0, inf)", aliases=("adam_weight_decay",))
    adam_beta1: float = arg(0.9, "AdamW beta1", valid="[0, 1)")
    adam_beta2: float = arg(0.999, "AdamW beta2", valid="[0, 1)")
    adam_epsilon: float = arg(1e-8, "AdamW epsilon", valid="(0, inf)")
    use_8bit_adam: bool = arg(False, "diffusers' flag: the same as --optimizer adamw8bit")
    optimizer: Literal["adamw", "adamw8bit", "cpu-adam"] = arg(
        "adamw", "adamw | adamw8bit (bitsandbytes, moments in uint8) | cpu-adam (DeepSpeedCPUAdam, with --offload)")
    max_grad_norm: float = arg(1.0, "gradient-norm clipping; 0 = no clipping", valid="[0, inf)")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = arg(
        "constant", "learning-rate schedule (diffusers.optimization); 'constant' with --lr_warmup_steps > 0 runs as "
        "constant_with_warmup")
    lr_warmup_steps: int = arg(0, "linear warm-up steps of the learning rate", valid="[0, inf)")
    max_train_steps: int = arg(40, "optimizer steps of the run", valid="[1, inf)", aliases=("num_train_steps",))
    mixed_precision: Literal["no", "fp16", "bf16"] = arg("no", "autocast precision on GPU (CPU runs in fp32)")
    allow_tf32: bool = arg(False, "TF32 matmuls and convolutions on Ampere+ GPUs (torch.backends flags)")
    seed: int = arg(0, "random seed (rollout noise, timesteps, prompt order)", valid="[0, inf)")
    max_nonfinite_steps: int = arg(5, "stop after this many non-finite losses in a row", valid="[1, inf)")


@dataclass
class DistributedConfig:
    _argument_group_name = "distributed"
    zero: int | None = arg(None, "DeepSpeed ZeRO stage 0-3; unset: plain torch on one process, stage 0 on several",
                           valid="[0, 3]")
    offload: Literal["none", "optimizer", "param"] = arg(
        "none", "none | optimizer (ZeRO 1-3) | param (ZeRO-3: parameters and optimizer state on CPU)")
    deepspeed: str = arg("", "a DeepSpeed JSON config file; its settings are cross-checked against the flags")


@dataclass
class MemoryConfig:
    _argument_group_name = "memory"
    recompute: Literal["none", "lean", "full", "selective", "nested", "auto"] = arg(
        "auto", "what a window step keeps for backward: none (everything), lean (recompute cheap tensors), "
        "full (checkpoint), selective (checkpoint + lean recompute), nested (selective, and each UNet block "
        "checkpointed again inside the recompute: the lowest peak), auto (the fastest mix that fits "
        "--memory_budget; with memory to spare, none)")
    memory_budget: str = arg("", "device memory for --recompute auto (and refl-plan): bytes or a size such as 40GB; "
                             "'' = the device's free memory at start less a margin (GPU), or the available RAM (CPU)")
    checkpoint_decode: bool = arg(True, "recompute the VAE decode in backward instead of keeping it (under "
                                  "--recompute auto: when the plan needs the memory; false = never)")
    lean_decode: bool = arg(True, "recompute the VAE's GroupNorm/SiLU outputs and frozen-conv inputs in backward",
                             aliases=("selective_decode",))
    checkpoint_reward: bool = arg(True, "recompute the reward model in backward instead of keeping it (under "
                                  "--recompute auto: when the plan needs the memory; false = never)")
    recompute_chunk: int = arg(
        0, "samples per checkpoint of a full/selective/nested UNet call, so its backward recomputes one chunk at a "
        "time; 0 = the whole batch (auto: the largest chunk that fits --memory_budget)", valid="[0, inf)")
    gradient_checkpointing: bool = arg(
        False, "diffusers' flag, off by default: asks for a checkpointing policy; --recompute full/selective/auto "
        "are ones (auto checkpoints what the budget needs), --recompute none/lean with it is refused")


@dataclass
class OutputConfig:
    _argument_group_name = "output"
    output_dir: str = arg("outputs/run", "folder of the run: checkpoints, samples, metrics, final weights")
    checkpointing_steps: int = arg(0, "save a checkpoint every n steps; 0 = only at the end", valid="[0, inf)")
    checkpoints_total_limit: int = arg(3, "keep the last n checkpoints; 0 = keep all", valid="[0, inf)",
                                       aliases=("checkpoints_keep",))
    resume_from_checkpoint: str = arg("", "'latest' or a checkpoint directory")
    overwrite_output_dir: bool = arg(False, "replace the run an existing --output_dir holds")
    sample_every: int = arg(0, "sample grids every n steps; 0 = only before and after training", valid="[0, inf)")
    report_to: Literal["tensorboard", "wandb", "all", "none"] = arg(
        "none", "experiment tracker (metrics.jsonl is always written)")
    tracker_project_name: str = arg("refl-engine", "the wandb project")
    logging_dir: str = arg("tensorboard", "tensorboard's folder; a relative path is inside --output_dir")
    progress: bool = arg(True, "progress bar")
    eval_every: int = arg(0, "held-out reward and diversity every n steps; 0 = off", valid="[0, inf)")
    eval_prompts: str = arg("", "held-out prompts ('' = the last --eval_num_prompts of --prompts)")
    eval_num_prompts: int = arg(4, "held-out prompts evaluated", valid="[1, inf)")
    eval_images_per_prompt: int = arg(4, "images per held-out prompt (diversity compares them)", valid="[2, inf)")
    eval_embedding: str = arg("pixels", "diversity embedding: pixels, toyworld (the toy world's encoder), or a DINOv2/CLIP "
                                 "vision model dir or hub id")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        cfg = cls()
        for key, value in _flatten(d).items():
            set_field(cfg, key, value)
        return cfg


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class FieldInfo:
    section: str
    type: Any  # the resolved annotation
    default: Any
    help: str
    valid: str | None  # interval notation, numeric fields
    aliases: tuple[str, ...]

    @property
    def base(self):
        """The annotation without None: bool, int, float, str or a Literal."""
        t = self.type
        if isinstance(t, types.UnionType) or get_origin(t) is not None and type(None) in get_args(t):
            t = next(a for a in get_args(t) if a is not type(None))
        return t

    @property
    def choices(self) -> tuple | None:
        return get_args(self.base) if get_origin(self.base) is Literal else None


def field_infos(cls, section: str = "") -> dict[str, FieldInfo]:
    """{field name: FieldInfo} of one dataclass (a section, or an entry point's own options)."""
    hints = get_type_hints(cls)
    return {f.name: FieldInfo(section, hints[f.name], f.default, f.metadata.get("help", ""), f.metadata.get("valid"),
                              tuple(f.metadata.get("aliases", ()))) for f in dataclasses.fields(cls)}


def _field_index() -> dict[str, FieldInfo]:
    index = {}
    for section_name, cls in SECTIONS.items():
        for name, info in field_infos(cls, section_name).items():
            if name in index:
                raise TypeError(f"config field {name!r} is in two sections; flags need unique names")
            index[name] = info
    return index


FIELDS = _field_index()
ALIASES = {alias: name for name, info in FIELDS.items() for alias in info.aliases}
METHODS = FIELDS["method"].choices


def in_interval(value: float, spec: str) -> bool:
    lo, lo_in, hi, hi_in = _interval(spec)
    return (lo < value or (lo_in and value == lo)) and (value < hi or (hi_in and value == hi))


def _flatten(d: dict) -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in SECTIONS:
            flat.update(value)
        else:
            flat[key] = value
    return flat


def _coerce(name: str, info: FieldInfo, value):
    """A value from YAML or Python code -> the field's type (the parser converts flags itself)."""
    if value is None:
        return None
    base = info.base
    if info.choices is not None:
        if str(value) not in info.choices:
            raise ConfigError(f"--{name} must be one of {', '.join(info.choices)}; got {value!r}")
        return str(value)
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"--{name} expects {getattr(base, '__name__', base)}, got {value!r}") from None


def set_field(cfg: TrainConfig, name: str, value) -> None:
    name = name.replace("-", "_")
    name = ALIASES.get(name, name)
    if name not in FIELDS:
        raise ConfigError(f"unknown option {name!r}; run with --help to see the options")
    info = FIELDS[name]
    setattr(getattr(cfg, info.section), name, _coerce(name, info, value))


def flat_dict(cfg: TrainConfig) -> dict:
    """{field name: value} over every section (flag names are unique across sections)."""
    return {name: getattr(getattr(cfg, info.section), name) for name, info in FIELDS.items()}


PRESET_DIR = Path(__file__).parent / "configs"


def load_preset(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        candidate = PRESET_DIR / f"{name_or_path}.yaml"
        if not candidate.exists():
            known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
            raise ConfigError(f"--config {name_or_path!r} is neither a YAML file nor a preset; presets: {known}")
        path = candidate
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read --config {path}: {e.__class__.__name__}: {e}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    return data


# ---------------------------------------------------------------------------------- the parser

def _metavar(info: FieldInfo) -> str | None:
    if info.choices is not None:
        return None  # argparse shows {a,b,c}
    return {bool: "BOOL", int: "INT", float: "FLOAT"}.get(info.base, "STR")


def _make_parser_class():
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        """HfArgumentParser with one-line errors (ConfigError), our field metadata (aliases in
        both spellings, the valid range in the help, short metavars) and a `--config` preset."""

        @staticmethod
        def _parse_dataclass_field(parser, f):
            info = FIELDS.get(f.name) or FieldInfo(  # an entry point's own (`extra`) option
                "extra", f.type, f.default, f.metadata.get("help", ""), f.metadata.get("valid"),
                tuple(f.metadata.get("aliases", ())))
            meta = {k: v for k, v in f.metadata.items() if k not in ("valid", "aliases", "help")}
            text = info.help + (f"; valid {info.valid}" if info.valid else "")
            meta["help"] = text.replace("%", "%%")
            spellings = (s for a in info.aliases for s in (f"--{a}", f"--{a.replace('_', '-')}"))
            meta["aliases"] = list(dict.fromkeys(spellings))
            if _metavar(info) not in (None, "BOOL"):  # bool: set below (the --no_ form takes no metavar)
                meta["metavar"] = _metavar(info)
            g = dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=meta)
            g.name, g.type = f.name, f.type
            HfArgumentParser._parse_dataclass_field(parser, g)
            for action in parser._actions:
                if action.dest == f.name and action.nargs == "?":
                    action.metavar = "BOOL"

        def error(self, message):
            raise ConfigError(f"{message.splitlines()[0]}; run with --help to see the options")

    return Parser


def build_parser(prog: str = "refl-train", extra: tuple[type, ...] = (), description: str | None = None):
    """The parser of every entry point: the TrainConfig sections (one --help group each), plus the
    `extra` dataclasses of an entry point's own options (refl-plan's budget, --json, ...)."""
    parser = _make_parser_class()(
        list(SECTIONS.values()) + list(extra), prog=prog, allow_abbrev=False,
        description=description or "Fine-tune a diffusion model on a differentiable reward "
                                   "(ReFL, DRaFT, DRaFT-LV, AlignProp, ImageReFL).")
    parser.add_argument("--config", default=None, metavar="NAME|PATH",
                        help="YAML preset: a file, or a name in engine/configs (" +
                        ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))) + "); flags override it")
    # torch.distributed.launch / deepspeed pass --local_rank; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "refl-train", extra: tuple[type, ...] = (),
               description: str | None = None):
    """argv -> a validated TrainConfig (and an instance of each `extra` dataclass, as a tuple).

    A `--config` preset becomes the parser's defaults, so the flags override it and `--help` shows
    the preset's values."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(prog, extra, description)
    cfg = TrainConfig()
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    preset = pre.parse_known_args(argv)[0].config
    if preset:
        for key, value in _flatten(load_preset(preset)).items():
            try:
                set_field(cfg, key, value)
            except ConfigError as e:
                raise ConfigError(f"--config {preset}: {e}") from None
        parser.set_defaults(**flat_dict(cfg))
    ns = vars(parser.parse_args(argv))
    for name, info in FIELDS.items():
        setattr(getattr(cfg, info.section), name, ns.pop(name))
    validate(cfg)
    if not extra:
        return cfg
    extras = tuple(cls(**{f.name: ns[f.name] for f in dataclasses.fields(cls)}) for cls in extra)
    for obj in extras:
        check_fields(obj, field_infos(type(obj)))
    return (cfg, *extras)


# ---------------------------------------------------------------------------------- values

def parse_memory(value: str, flag: str = "--memory_budget") -> int:
    """'40GB' / '40G' / '512MiB' / '1234' -> bytes (> 0)."""
    s = str(value).strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": 10**9, "M": 10**6, "K": 10**3, "B": 1}
    number, mult = s, 1
    for unit, m in units.items():
        if s.endswith(unit):
            number, mult = s[: -len(unit)], m
            break
    try:
        amount = float(number) * mult
    except ValueError:
        amount = float("nan")
    if not math.isfinite(amount) or amount < 1:
        raise ConfigError(f"{flag} {value!r} is not a positive size; write e.g. 40GB, 512MiB or 42949672960")
    return int(amount)


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
    """The pixels a side must be a multiple of: the VAE's factor 2^(levels - 1) times the UNet's
    2^(levels - 1), since the UNet halves the latent once per level below the top (64 for SD1.5
    and SDXL)."""
    return 2 ** (len(vae_block_out_channels) - 1) * 2 ** (len(unet_block_out_channels) - 1)


def check_resolution(side: int, multiple: int, name: str = "resolution") -> None:
    """The model-dependent part of the size flags' validation, shared by the trainer
    (Components.image_size) and the planner."""
    if side % multiple:
        lower = side // multiple * multiple
        fix = f"{lower} or {lower + multiple}" if lower else str(multiple)
        raise ConfigError(f"--{name} {side} is not a multiple of {multiple} for this model (the VAE and UNet "
                          f"down-sample by {multiple}); use {fix}")


# ---------------------------------------------------------------------------------- validation

def check_fields(cfg, infos: dict[str, FieldInfo] | None = None) -> None:
    """Every field against its type, its choices and its declared range (finite numbers only).
    `cfg`: a TrainConfig, or with `infos` any dataclass of options (an entry point's own)."""
    for name, info in (infos or FIELDS).items():
        value = getattr(getattr(cfg, info.section), name) if infos is None else getattr(cfg, name)
        if value is None and info.default is None:
            continue
        base = info.base
        if info.choices is not None:
            if value not in info.choices:
                raise ConfigError(f"--{name} must be one of {', '.join(info.choices)}; got {value!r}")
        elif base is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"--{name} expects true or false, got {value!r}")
        elif base in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                    base is int and not isinstance(value, int)):
                raise ConfigError(f"--{name} expects {base.__name__}, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"--{name} must be a finite number, got {value}")
            if info.valid and not in_interval(value, info.valid):
                raise ConfigError(f"--{name} {value} is out of range: valid {info.valid} ({info.help})")
        elif not isinstance(value, str):
            raise ConfigError(f"--{name} expects a string, got {value!r}")


def validate(cfg: TrainConfig) -> None:
    """Check a config once, at start, and settle the diffusers-style flags into the engine's own
    (the config then records what runs): --enable_xformers_memory_efficient_attention sets
    --kernels xformers; --lr_scheduler constant with warm-up steps runs as constant_with_warmup, as
    the warm-up asks (diffusers' 'constant' would ignore it)."""
    check_fields(cfg)
    m, o, mem, mo = cfg.method, cfg.optim, cfg.memory, cfg.model
    parse_K(m.K, m.num_inference_steps)
    if m.method in ("refl", "imagerefl"):
        parse_stop_range(m.stop_range, m.num_inference_steps)
    validate_extras(cfg)
    validate_distributed(cfg)
    if m.method != "draft" and str(m.K).lower() != "full" and m.method != "draft-lv":
        raise ConfigError(
            f"--K applies to --method draft only; {m.method} sets its own window "
            "(refl: --stop_range, alignprop: --alignprop_k_min/--alignprop_k_max)"
        )
    if m.method == "draft-lv" and str(m.K).lower() not in ("full", "1"):
        raise ConfigError("--method draft-lv uses K=1 by definition; drop --K or use --method draft")
    if m.method == "alignprop":
        kmax = m.alignprop_k_max or m.num_inference_steps
        if not 1 <= m.alignprop_k_min <= kmax <= m.num_inference_steps:
            raise ConfigError(
                f"AlignProp bounds need 1 <= --alignprop_k_min ({m.alignprop_k_min}) <= --alignprop_k_max "
                f"({kmax}) <= --num_inference_steps ({m.num_inference_steps})"
            )
    if mo.enable_xformers_memory_efficient_attention:
        if mo.kernels not in ("torch", "xformers"):
            raise ConfigError(f"--enable_xformers_memory_efficient_attention conflicts with --kernels {mo.kernels}; "
                              "drop one of them")
        mo.kernels = "xformers"
    if o.lr_warmup_steps > o.max_train_steps:
        raise ConfigError(f"--lr_warmup_steps {o.lr_warmup_steps} is longer than the run (--max_train_steps "
                          f"{o.max_train_steps}); the learning rate would never reach --learning_rate")
    if o.lr_scheduler == "constant" and o.lr_warmup_steps > 0:
        o.lr_scheduler = "constant_with_warmup"
    if mem.gradient_checkpointing and mem.recompute in ("none", "lean"):
        raise ConfigError(f"--gradient_checkpointing conflicts with --recompute {mem.recompute}, which checkpoints "
                          "nothing; drop one of them (or use --recompute selective/full/auto)")
    if mem.recompute_chunk and mem.recompute in ("none", "lean"):
        raise ConfigError(f"--recompute_chunk applies to checkpointed calls; --recompute {mem.recompute} checkpoints "
                          "none: drop --recompute_chunk or use --recompute full/selective/auto")
    if mem.memory_budget:
        parse_memory(mem.memory_budget)
    for flag in ("prompts", "sample_prompts"):
        p = getattr(cfg.data, flag)
        if p and not p.startswith("builtin:") and not os.path.isfile(p):
            raise ConfigError(f"--{flag} {p!r}: no such file; give a .txt (one prompt a line), .jsonl or .csv, "
                              "or builtin:toy")


# ---------------------------------------------------------------------------------- DeepSpeed flags
# (the flags' own checks; engine/distributed.py builds the engine from them)

OFFLOADS = ("none", "optimizer", "param")


def validate_distributed(cfg: TrainConfig) -> None:
    """The flags (and a --deepspeed file) -> one consistent setting, or one ConfigError line."""
    o, d = cfg.optim, cfg.distributed
    if o.optimizer not in FIELDS["optimizer"].choices:
        choices = ", ".join(FIELDS["optimizer"].choices)
        raise ConfigError(f"unknown --optimizer {o.optimizer!r}; choose one of: {choices}")
    if o.use_8bit_adam:  # the diffusers examples' flag
        if o.optimizer not in ("adamw", "adamw8bit"):
            raise ConfigError(f"--use_8bit_adam conflicts with --optimizer {o.optimizer}; drop one of them")
        o.optimizer = "adamw8bit"
    if d.deepspeed:
        _adopt_file(cfg, d.deepspeed)
    if d.zero is not None and d.zero not in (0, 1, 2, 3):
        raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {d.zero}")
    if d.offload not in OFFLOADS:
        raise ConfigError(f"unknown --offload {d.offload!r}; choose none, optimizer or param")
    stage = d.zero or 0
    if d.offload == "optimizer" and stage < 1:
        raise ConfigError("--offload optimizer needs a ZeRO optimizer; add --zero 2 (or 1 or 3)")
    if d.offload == "param" and stage != 3:
        raise ConfigError("--offload param needs ZeRO-3, the only stage that partitions parameters; use "
                          f"--zero 3 --offload param, or --zero {max(stage, 1)} --offload optimizer")
    if o.optimizer == "adamw8bit" and d.offload != "none":
        raise ConfigError(f"--optimizer adamw8bit keeps its 8-bit state beside the weights and cannot run with "
                          f"--offload {d.offload}; use --optimizer cpu-adam with --offload, or adamw8bit without")
    if o.optimizer == "cpu-adam" and d.offload == "none":
        raise ConfigError("--optimizer cpu-adam steps CPU copies of the weights; add --zero 2 --offload optimizer "
                          "(or --zero 3 --offload param), or use --optimizer adamw")
    if cfg.memory.recompute == "nested" and stage == 3:
        raise ConfigError("--recompute nested hands the UNet's parameters to its own backward, which ZeRO-3 has "
                          "partitioned again by then; use --recompute selective or full with --zero 3")
    if cfg.method.kl_coeff > 0 and cfg.model.rank == 0 and stage == 3:
        raise ConfigError("--kl_coeff with full fine-tuning (--rank 0) keeps a frozen copy of the whole UNet as the "
                          "base model, which ZeRO-3 would not partition (every rank would hold all of it); use LoRA "
                          "(--rank > 0: the base is the adapter switched off) or --zero 2")


def read_deepspeed_file(path: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read --deepspeed {path}: {e.strerror}; give a DeepSpeed JSON config file") from None
    except ValueError as e:
        raise ConfigError(f"--deepspeed {path} is not valid JSON ({e}); give a DeepSpeed JSON config file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--deepspeed {path} must hold a JSON object")
    return data


def _offload_of(zero: dict, path: str) -> str:
    devices = {}
    for key in ("offload_optimizer", "offload_param"):
        device = str((zero.get(key) or {}).get("device", "none")).lower()
        if device not in ("none", "cpu"):
            raise ConfigError(f"--deepspeed {path}: {key}.device {device!r} is not supported; use cpu or none")
        devices[key] = device
    if devices["offload_param"] == "cpu":
        if devices["offload_optimizer"] != "cpu":
            raise ConfigError(f"--deepspeed {path}: offload_param without offload_optimizer is not supported; "
                              "offload both (--offload param)")
        return "param"
    return "optimizer" if devices["offload_optimizer"] == "cpu" else "none"


def _adopt_file(cfg: TrainConfig, path: str) -> None:
    """A --deepspeed file's settings become the flags': a flag at its default takes the file's
    value ("auto" in the file keeps the flag), a flag set to something else is a conflict."""
    data = read_deepspeed_file(path)
    o, d = cfg.optim, cfg.distributed
    defaults = OptimConfig()

    def adopt(section, name, value, default, key):
        if value is None or value == "auto":
            return
        current = getattr(section, name)
        if current == default:
            setattr(section, name, value)
        elif current != value:
            raise ConfigError(f"--{name} {current} conflicts with {key}={value} in --deepspeed {path}; "
                              "drop one of them")

    if "scheduler" in data:
        raise ConfigError(f"--deepspeed {path}: its 'scheduler' is not used; remove it and set --lr_scheduler "
                          "and --lr_warmup_steps")
    zero = data.get("zero_optimization") or {}
    if zero.get("stage", "auto") != "auto":
        adopt(d, "zero", int(zero["stage"]), None, "zero_optimization.stage")
    adopt(d, "offload", _offload_of(zero, path), "none", "zero_optimization.offload_*")
    adopt(o, "train_batch_size", data.get("train_micro_batch_size_per_gpu"), defaults.train_batch_size,
          "train_micro_batch_size_per_gpu")
    adopt(o, "gradient_accumulation_steps", data.get("gradient_accumulation_steps"),
          defaults.gradient_accumulation_steps, "gradient_accumulation_steps")
    adopt(o, "max_grad_norm", data.get("gradient_clipping"), defaults.max_grad_norm, "gradient_clipping")
    for kind in ("fp16", "bf16"):
        if (data.get(kind) or {}).get("enabled") in (True, "true"):
            adopt(o, "mixed_precision", kind, defaults.mixed_precision, f"{kind}.enabled")
    opt = data.get("optimizer")
    if opt:
        if str(opt.get("type", "")).lower() not in ("adam", "adamw"):
            raise ConfigError(f"--deepspeed {path}: optimizer type {opt.get('type')!r} is not supported; "
                              "remove it and choose --optimizer adamw, adamw8bit or cpu-adam")
        p = opt.get("params") or {}
        adopt(o, "learning_rate", p.get("lr"), defaults.learning_rate, "optimizer.params.lr")
        adopt(o, "weight_decay", p.get("weight_decay"), defaults.weight_decay, "optimizer.params.weight_decay")
        adopt(o, "adam_epsilon", p.get("eps"), defaults.adam_epsilon, "optimizer.params.eps")
        if isinstance(p.get("betas"), list):
            adopt(o, "adam_beta1", p["betas"][0], defaults.adam_beta1, "optimizer.params.betas[0]")
            adopt(o, "adam_beta2", p["betas"][1], defaults.adam_beta2, "optimizer.params.betas[1]")
        if p.get("torch_adam") is False and d.offload != "none" and o.optimizer == "adamw":
            o.optimizer = "cpu-adam"  # DeepSpeed's own choice for that file


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
    if d.train_data_dir and not os.path.isdir(d.train_data_dir):
        raise ConfigError(f"--train_data_dir {d.train_data_dir!r}: no such folder")
    if d.coco_captions and not os.path.isfile(d.coco_captions):
        raise ConfigError(f"--coco_captions {d.coco_captions!r}: no such file")
    if out.eval_every < 0:
        raise ConfigError("--eval_every must be >= 0 (0 = off)")
    if out.eval_num_prompts < 1 or out.eval_images_per_prompt < 2:
        raise ConfigError("--eval_num_prompts must be >= 1 and --eval_images_per_prompt >= 2 (diversity compares "
                          "images of one prompt)")

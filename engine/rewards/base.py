"""The Reward interface, the reward registry and the `--reward` spec parser.

A reward maps a batch of images (float tensors in [0, 1], shape (B, 3, H, W)) and their prompts
to one score per image, differentiably with respect to the images. Rewards are frozen modules:
their parameters never receive gradient, only the image does.

`--reward` accepts
    name                 a registered reward ("colorfulness", "aesthetic", ...)
    name:path            a registered reward loaded from a local file or directory
    a=1.0,b:path=0.5     a weighted sum of the above

The registry (REWARDS) is filled by the reward modules as they are imported; the package
(`refl_engine.rewards`) imports them all, so this module imports none of them. `check_reward_spec`
checks what each reward will read (`RewardFiles`) before anything heavy loads: a local path must
exist and be of the kind the reward reads; without a path, the hub files must be in the local
Hugging Face cache when the hub is offline, or reachable when it is not.

Output modes: "raw" is each model's own score; "rescaled" is (raw - low) / (high - low), the [0, 1]
form ImageReFL trains on ("all reward models are rescaled to the [0, 1] range"). The paper does not
publish its bounds; ours are the observed ranges below, not hard limits, and nothing is clamped
(a clamp would zero the gradient of the images that leave the range):

    reward        raw score                                   bounds (low, high)
    aesthetic     LAION MLP rating                            (1, 10)   the 1-10 rating scale
    hps           100 x cosine (HPSv2.1; = logit scale x cos)  (15, 45)  SD1.5 ~25-28, tuned ~37-40
    pickscore     logit scale x cosine                        (15, 25)  SD1.5 ~20-21.5, tuned ~23.5-24.7
    imagereward   standardized MLP output                     (-2.5, 2.5)
A weighted sum adds its terms, each in its own output mode; its bounds are the weighted bounds
(a rescaled term counting as (0, 1)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..config import ConfigError


class RewardSpecError(ConfigError):
    """A `--reward` string that cannot be parsed or names an unknown reward (bad user input: exit 2)."""


class RewardWeightsError(ConfigError, RuntimeError):
    """A reward checkpoint that is missing or is not the file the reward expects (one-line message;
    bad user input: exit 2)."""


class Reward(nn.Module):
    """Base class: subclasses implement `score(images, prompts) -> Tensor[B]` (raw score).

    `bounds` are the (low, high) raw-score values mapped to 0 and 1 by `rescaled` (the [0, 1]
    form ImageReFL trains on); `backbone` describes the network for the memory planner
    (a dict with at least `kind`, and the architecture config where there is one).
    """

    name: str = "reward"
    bounds: tuple[float, float] = (0.0, 1.0)
    backbone: dict | None = None
    #: The image side length the backbone reads (after preprocessing); None = any.
    input_size: int | None = None
    #: The transformer layers a memory policy may recompute one at a time in backward (the policy
    #: decides; a reward never checkpoints itself). Empty: the reward is one unit.
    recompute_layers: tuple[nn.Module, ...] = ()

    def __init__(self, output: str = "raw"):
        super().__init__()
        if output not in ("raw", "rescaled"):
            raise RewardSpecError(f"reward output must be 'raw' or 'rescaled', got {output!r}")
        self.output = output

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def rescale(self, raw: torch.Tensor) -> torch.Tensor:
        low, high = self.bounds
        return (raw - low) / (high - low)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{self.name}: {images.shape[0]} images but {len(prompts)} prompts")
        raw = self.score(images, prompts)
        return self.rescale(raw) if self.output == "rescaled" else raw

    def freeze(self) -> "Reward":
        self.requires_grad_(False)
        self.eval()
        return self


class WeightedSum(Reward):
    """sum_i w_i * R_i(images, prompts); each term in its own output mode."""

    name = "weighted"

    def __init__(self, terms: Sequence[tuple[float, Reward]]):
        super().__init__()
        self.weights = [float(w) for w, _ in terms]
        self.terms = nn.ModuleList([r for _, r in terms])
        # A term in rescaled mode already spans [0, 1]; the sum's bounds are in the terms' units.
        spans = [(0.0, 1.0) if r.output == "rescaled" else r.bounds for _, r in terms]
        lows = [w * (lo if w >= 0 else hi) for (w, _), (lo, hi) in zip(terms, spans)]
        highs = [w * (hi if w >= 0 else lo) for (w, _), (lo, hi) in zip(terms, spans)]
        self.bounds = (sum(lows), sum(highs))
        self.name = ",".join(f"{r.name}={w:g}" for w, r in terms)
        self.recompute_layers = tuple(layer for _, r in terms for layer in r.recompute_layers)

    def score(self, images, prompts):
        return sum(w * r(images, prompts) for w, r in zip(self.weights, self.terms))

    def forward(self, images, prompts):
        # Terms apply their own output mode; the sum is not rescaled again.
        return self.score(images, prompts)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def load_state_dict_file(path: str | Path, expected: str) -> dict:
    """Load a checkpoint with safetensors or `torch.load(weights_only=True)`, never unpickling code.

    `expected` names the file the reward wants (e.g. "ImageReward.pt"); it is in every error.
    """
    path = Path(path)
    if not path.is_file():
        raise RewardWeightsError(f"expected {expected} at {path}, but there is no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a wrong file
        raise RewardWeightsError(f"{path} is not a loadable {expected} ({_one_line(err)})") from None


def fetch_hub_file(repo_id: str, filename: str) -> Path:
    """Download (or take from the local hub cache) one file of a hub repository."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    except Exception as err:  # noqa: BLE001
        raise RewardWeightsError(
            f"could not get {filename} from hub repo {repo_id} ({_one_line(err)}); "
            f"give a local path as --reward NAME:PATH"
        ) from None


def find_in_dir(path: str | Path, names: Sequence[str], expected: str) -> Path:
    """`path` itself if it is a file, else the first of `names` inside the directory `path`."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        raise RewardWeightsError(f"expected {expected} in {path}, found none of: {', '.join(names)}")
    raise RewardWeightsError(f"expected {expected} at {path}, but the path does not exist")


@dataclass(frozen=True)
class RewardFiles:
    """What a reward reads, checked by `check_reward_spec` before anything heavy loads.

    local: a `name:PATH` is one of these files (any name), or a directory holding one of them;
           with `directory`, PATH must be a directory holding them (a transformers model folder).
    hub:   (repo id, file) pairs fetched when no PATH is given.
    """

    local: tuple[str, ...] = ()
    hub: tuple[tuple[str, str], ...] = ()
    directory: bool = False


@dataclass
class RewardEntry:
    factory: Callable[..., Reward]  # factory(path: str | None, output: str) -> Reward
    description: str
    files: RewardFiles | None = field(default=None)  # None: reads nothing (a built-in formula)


REWARDS: dict[str, RewardEntry] = {}


def register_reward(name: str, description: str = "", files: RewardFiles | None = None):
    def deco(factory):
        REWARDS[name] = RewardEntry(factory, description, files)
        return factory

    return deco


def parse_reward_spec(spec: str) -> list[tuple[float, str, str | None]]:
    """'a=1,b:path=0.5' -> [(1.0, 'a', None), (0.5, 'b', 'path')]."""
    if not spec or not spec.strip():
        raise RewardSpecError("empty --reward; give a name such as 'colorfulness' or 'aesthetic=1.0,hps=0.5'")
    terms = []
    for part in spec.split(","):
        part = part.strip()
        weight = 1.0
        if "=" in part:
            part, w = part.rsplit("=", 1)
            try:
                weight = float(w)
            except ValueError:
                raise RewardSpecError(f"reward weight {w!r} in --reward {spec!r} is not a number") from None
            if not math.isfinite(weight):
                raise RewardSpecError(f"reward weight {w!r} in --reward {spec!r} is not finite")
        name, _, path = part.partition(":")
        terms.append((weight, name.strip(), path.strip() or None))
    return terms


def _check_local(name: str, path: str, files: RewardFiles) -> None:
    p = Path(path).expanduser()
    wants = " or ".join(files.local)
    what = f"a directory holding {wants}" if files.directory else f"the {wants} file or a directory holding it"
    if not p.exists():
        raise RewardWeightsError(f"--reward {name}:{path}: no such file or directory; give {what}")
    if p.is_dir():
        if not any((p / f).is_file() for f in files.local):
            raise RewardWeightsError(f"--reward {name}:{path}: the directory holds no {wants}; give {what}")
    elif files.directory or not p.is_file():
        raise RewardWeightsError(f"--reward {name}:{path} is not a directory; give {what}")


def _check_hub(name: str, repo_id: str, filename: str) -> None:
    """The file is in the local hub cache, or the hub is online and has it."""
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    except ImportError:
        raise RewardWeightsError(f"--reward {name} downloads {repo_id}/{filename}, which needs huggingface_hub; "
                                 f"pip install huggingface_hub or give local weights as --reward {name}:PATH") from None
    if isinstance(try_to_load_from_cache(repo_id, filename), str):
        return
    fix = f"download it while online, or give local weights as --reward {name}:PATH"
    if constants.HF_HUB_OFFLINE:
        raise RewardWeightsError(f"--reward {name} needs {repo_id}/{filename}, which is not in the Hugging Face "
                                 f"cache, and the hub is offline (HF_HUB_OFFLINE); {fix}")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename), timeout=10)
    except Exception as err:  # noqa: BLE001 - no network, no such repo or file: the user's to fix
        raise RewardWeightsError(f"--reward {name} needs {repo_id}/{filename}, which is not in the Hugging Face "
                                 f"cache, and the hub did not give it ({_one_line(err)}); {fix}") from None


def check_reward_spec(spec: str, check_files: bool = True) -> list[tuple[float, str, str | None]]:
    """Parse a `--reward` string, check every name is a registered reward and (`check_files`) that
    what each reward reads is there (`RewardFiles`); loads nothing."""
    terms = parse_reward_spec(spec)
    for _, name, path in terms:
        if name not in REWARDS:
            known = ", ".join(sorted(REWARDS))
            raise RewardSpecError(f"unknown reward {name!r}; choose one of: {known}")
        files = REWARDS[name].files
        if files is None:
            if path:
                raise RewardSpecError(f"--reward {name}:{path}: {name} is computed from the pixels and takes no "
                                      f"path; write --reward {name}")
            continue
        if not check_files:
            continue
        if path:
            _check_local(name, path, files)
        else:
            for repo_id, filename in files.hub:
                _check_hub(name, repo_id, filename)
    return terms


def build_reward(spec: str, output: str = "raw") -> Reward:
    """Build the (frozen) reward a `--reward` string names."""
    built = []
    # the files were checked up front by the caller (check_reward_spec); the factories check them again
    # with their own messages as they load
    for weight, name, path in check_reward_spec(spec, check_files=False):
        built.append((weight, REWARDS[name].factory(path=path, output=output).freeze()))
    if len(built) == 1 and built[0][0] == 1.0:
        return built[0][1]
    return WeightedSum(built).freeze()

"""Prompt sources."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError

_COLORS = "red green blue yellow orange purple pink white black gray".split()
_SHAPES = "circle square triangle star ring".split()
_SCENES = "sky sea field city mountain sunset night".split()


def toy_prompts() -> list[str]:
    """A fixed, deterministic set of captions over the tiny tokenizer's vocabulary."""
    prompts = []
    for i, shape in enumerate(_SHAPES):
        for j, color in enumerate(_COLORS):
            bg = _COLORS[(i + 3 * j + 1) % len(_COLORS)]
            prompts.append(f"a {color} {shape} on a {bg} background")
    for k, scene in enumerate(_SCENES):
        prompts.append(f"a painting of a {scene} with a {_COLORS[k % len(_COLORS)]} {_SHAPES[k % len(_SHAPES)]}")
    return prompts


def load_prompts(spec: str) -> list[str]:
    """builtin:toy | a .txt file with one prompt a line | a .jsonl file with a "prompt" (or
    "caption") field a line."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "toy":
            raise ConfigError(f"unknown built-in prompt set {spec!r}; the built-in set is builtin:toy")
        return toy_prompts()
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompt file {spec!r} ({e.__class__.__name__}); give a readable UTF-8 "
                          ".txt or .jsonl file") from None
    prompts = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(str(row.get("prompt", row.get("caption"))))
            except (json.JSONDecodeError, AttributeError):
                raise ConfigError(f"{spec}:{n}: not a JSON object with a 'prompt' field") from None
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {spec!r} holds no prompts")
    return prompts

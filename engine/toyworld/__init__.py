"""The embedded default model: the tiny SD1.5-shaped pipeline (see models/load.py)."""
from __future__ import annotations

from pathlib import Path


def default_model_path() -> Path:
    from ..models.load import tiny_sd_path

    return tiny_sd_path()

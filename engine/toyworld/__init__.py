"""The embedded default model: a tiny SD1.5-shaped pipeline pretrained on the procedural
captioned-shapes world (world.py), shipped in the repo under toyworld/pipeline/ and rebuilt by
`python -m refl_engine.toyworld.pretrain --out engine/toyworld/pipeline`.

It learned the world's layout (flat backgrounds, smooth shapes) but not to follow the caption's
colors: samples do not depend on the prompt (README, "The embedded default").
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

PIPELINE_DIR = Path(__file__).resolve().parent / "pipeline"


def default_model_path() -> Path:
    """The shipped pretrained pipeline; if it is missing or incomplete (no model_index.json),
    the randomly initialized tiny-sd preset, with a warning."""
    if (PIPELINE_DIR / "model_index.json").is_file():
        return PIPELINE_DIR
    from ..models.load import tiny_sd_path

    log.warning("the pretrained toyworld pipeline is missing (%s has no model_index.json); falling back to the "
                "randomly initialized tiny-sd preset, whose samples are noise. Rebuild it with "
                "`python -m refl_engine.toyworld.pretrain --out %s`", PIPELINE_DIR, PIPELINE_DIR)
    return tiny_sd_path()

"""The embedded default model: a tiny SD1.5-shaped pipeline pretrained on the procedural
captioned-shapes world (world.py), shipped in the repo under toyworld/pipeline/ and rebuilt by
`python -m refl_engine.toyworld.pretrain --out engine/toyworld/pipeline`.

It learned the world's layout (flat backgrounds, smooth shapes) but not to follow the caption's
colors: samples do not depend on the prompt (README, "The embedded default").
"""
from __future__ import annotations

# The loader owns where the embedded pipeline lives and the fallback when it is missing; this
# package only builds it (pretrain.py), so imports point one way: toyworld -> models.load.
from ..models.load import EMBEDDED_PIPELINE as PIPELINE_DIR
from ..models.load import default_model_path

__all__ = ["PIPELINE_DIR", "default_model_path"]

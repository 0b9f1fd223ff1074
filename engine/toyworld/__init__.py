"""The embedded default model: a tiny SD1.5-shaped pipeline pretrained on the procedural
captioned-shapes world (world.py), shipped in the repo under toyworld/pipeline/ and rebuilt by
`python -m refl_engine.toyworld.pretrain --out engine/toyworld/pipeline`.

Its text encoder trained jointly with the UNet, so samples follow the caption's shape, color and
position to the degree the README states (measured with the ground-truth classifier,
classifier.py: `python -m refl_engine.toyworld.classifier --measure`).
"""
from __future__ import annotations

# The loader owns where the embedded pipeline lives and the fallback when it is missing; this
# package only builds it (pretrain.py), so imports point one way: toyworld -> models.load.
from ..models.load import EMBEDDED_PIPELINE as PIPELINE_DIR
from ..models.load import default_model_path

__all__ = ["PIPELINE_DIR", "default_model_path"]

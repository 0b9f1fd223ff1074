"""Import refl_kernels with triton in its CPU interpreter, if this process can still choose.

Triton fixes interpreter mode at its first import, and diffusers imports triton: TRITON_INTERPRET
is set before either is imported and put back afterwards, so the variable does not leak into the
rest of the suite (refl_kernels' dispatch picks the interpreter on CPU only while it is set; the
tests that want it set it themselves). INTERPRETED says whether it worked; when it did not, the
interpreter tests run in a fresh subprocess (tests/kernels/conftest.py).
"""
from __future__ import annotations

import importlib
import os
import sys

_previous = os.environ.get("TRITON_INTERPRET")
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import refl_kernels  # noqa: F401
finally:
    if _previous is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _previous

INTERPRETED = importlib.import_module("refl_kernels.attention").INTERPRETED

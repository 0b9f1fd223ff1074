"""Run the Triton kernels in Triton's CPU interpreter.

Triton fixes interpreter mode when it is first imported (its own tl.sum etc. are decorated then),
so TRITON_INTERPRET=1 is set here before anything imports triton, and put back afterwards so the
variable does not leak into the rest of the suite: refl_kernels' dispatch only picks the
interpreter on CPU while the variable is set, which the `interpreter` fixture does for these
tests only. If another module imported triton first (diffusers does, via its integrations), this
process cannot interpret kernels; each test here then runs in a fresh subprocess instead.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from interpreted_kernels import INTERPRETED  # noqa: E402  (before anything imports triton)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """TRITON_INTERPRET=1 during each test so refl_kernels' dispatch picks the Triton path on CPU."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if INTERPRETED or pyfuncitem.get_closest_marker("no_interpreter") is not None:
        return None
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
        cwd=str(pyfuncitem.config.rootpath), env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{pyfuncitem.nodeid} failed in the interpreter subprocess:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}")
    return True


def pytest_configure(config):
    config.addinivalue_line("markers", "no_interpreter: runs in this process even when triton is not in interpreter mode")

"""Tolerances from the numerics, for comparing a computation with a reference.

Two rules, both with an absolute floor so that values near zero are never held to a pure relative
tolerance (a gradient that is the small difference of large terms carries the rounding error of
those terms, not of its own value):

- `assert_close`: |actual - expected| <= atol + rtol * |expected| elementwise, with
  atol = atol_scale * eps(dtype) * max|expected| (the reference's magnitude, in units of the
  precision the computation ran in).
- `assert_as_accurate`: against a float64 reference, actual's error is at most `factor` times the
  error of a baseline run in the same precision (the same computation done the stock way), plus the
  same kind of floor. The baseline's error is the measured rounding error of the computation itself,
  cancellation included, so nothing about the model's depth has to be guessed.

Both return the worst ratio error / allowed (<= 1 when they pass), so a seed sweep can report how
much headroom a tolerance has.
"""
from __future__ import annotations

import torch

RATIOS: list[tuple[str, float]] = []  # (msg, ratio) of each check in the running test (conftest reports them)


def record(label: str, ratio: float) -> None:
    """For a test that checks its own tolerance rule: error / allowed, reported by --tolerance-report."""
    RATIOS.append((label, ratio))


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _max_abs(t: torch.Tensor) -> float:
    return t.detach().abs().max().item() if t.numel() else 0.0


def assert_close(actual, expected, *, atol_scale: float, rtol: float = 0.0, dtype: torch.dtype | None = None,
                 msg: str = "") -> float:
    """`dtype`: the precision the computation ran in (default: actual's). Compared in float64."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{msg}: non-finite values"
    atol = atol_scale * eps(dtype) * max(_max_abs(e), torch.finfo(dtype).tiny)
    allowed = atol + rtol * e.abs()
    err = (a - e).abs()
    ratio = (err / allowed).max().item() if err.numel() else 0.0
    RATIOS.append((msg, ratio))
    assert ratio <= 1.0, (f"{msg}: max |diff| {_max_abs(err):.3g} exceeds atol {atol:.3g} + rtol {rtol:g} x |ref| "
                          f"(worst element at {ratio:.3g}x its tolerance; max |ref| {_max_abs(e):.3g}, {dtype})")
    return ratio


def assert_as_accurate(actual, baseline, ref64, *, factor: float = 2.0, atol_scale: float, msg: str = "") -> float:
    """max|actual - ref64| <= factor * max|baseline - ref64| + atol_scale * eps(dtype) * max|ref64|,
    dtype = baseline's (the precision both ran in). Max norms over the whole tensor."""
    actual, baseline, ref64 = (torch.as_tensor(t).detach() for t in (actual, baseline, ref64))
    dtype = baseline.dtype
    assert actual.shape == baseline.shape == ref64.shape, msg
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values"
    err = _max_abs(actual.double() - ref64.double())
    base_err = _max_abs(baseline.double() - ref64.double())
    floor = atol_scale * eps(dtype) * max(_max_abs(ref64), torch.finfo(dtype).tiny)
    allowed = factor * base_err + floor
    ratio = err / allowed
    RATIOS.append((msg, ratio))
    assert ratio <= 1.0, (f"{msg}: error {err:.3g} vs float64 > {factor:g} x the {dtype} baseline's error "
                          f"{base_err:.3g} + floor {floor:.3g} ({ratio:.3g}x the tolerance)")
    return ratio

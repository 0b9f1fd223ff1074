"""Fused GroupNorm(+SiLU) (Triton, interpreter on CPU) against the float64 reference: output and
the gradients of x, weight and bias, by the same tolerance rule as attention (kernel error at
most ~2x the error of plain PyTorch in the same precision, plus a small atol)."""
from __future__ import annotations

import importlib

import pytest
import torch

import numerics
import refl_kernels
from refl_kernels import reference

gn_mod = importlib.import_module("refl_kernels.groupnorm")

CASES = [
    # N, C, spatial, G, activation, dtype
    (1, 10, (5, 7), 5, "silu", torch.float32),   # C not a multiple of any block, odd spatial
    (1, 6, (1, 1), 6, None, torch.float32),      # G = C at 1x1: one element per group
    (3, 8, (33,), 1, "silu", torch.float16),     # one group, 1-D odd length
    (1, 12, (9, 11), 3, "silu", torch.float16),
    (1, 4, (40, 30), 2, None, torch.float32),    # rows split across programs (SPLIT > 1)
    (2, 3, (3, 5, 7), 3, "silu", torch.float32),  # 3-D spatial, G = C
]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture
def poisoned(monkeypatch):
    def nan_empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t
    monkeypatch.setattr(gn_mod, "_empty", nan_empty)


def _run(fn, x, w, b, dy, dtype=None):
    x, w, b = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad, w.grad, b.grad]


def _check(got, ref64, plain, dtype):
    for name, g, r, p in zip(("y", "dx", "dw", "db"), got, ref64, plain):
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten elements?)"
        err = (g.double() - r).abs().max().item()
        torch_err = (p.double() - r).abs().max().item()
        bound = 2 * torch_err + ATOL[dtype] * max(1.0, r.abs().max().item())
        numerics.record(name, err / bound)
        assert err <= bound, f"{name}: kernel error {err:.3g} > 2 x torch error {torch_err:.3g} + atol"


def _inputs(N, C, spatial, dtype, gen):
    x = (torch.randn(N, C, *spatial, generator=gen) * 3 + 2).to(dtype)  # mean offset: tests stability
    w = (torch.randn(C, generator=gen) * 0.5 + 1).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype)
    dy = torch.randn(N, C, *spatial, generator=gen).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("N,C,spatial,G,act,dtype", CASES)
def test_group_norm_matches_float64_reference(N, C, spatial, G, act, dtype, poisoned, seed):
    gen = torch.Generator().manual_seed(seed)
    x, w, b, dy = _inputs(N, C, spatial, dtype, gen)
    got = _run(lambda a, c, d: refl_kernels.group_norm(a, G, c, d, activation=act, backend="triton"), x, w, b, dy)
    ref64 = _run(lambda a, c, d: reference.group_norm(a, G, c, d, activation=act), x, w, b, dy, torch.float64)
    plain = _run(lambda a, c, d: reference.group_norm(a, G, c, d, activation=act), x, w, b, dy)
    _check(got, ref64, plain, dtype)


def test_split_reduction_is_used():
    block, chunk, split = gn_mod._tile_and_split(rows=4, hw=1200, device=torch.device("cpu"))
    assert split > 1 and chunk % block == 0 and (split - 1) * chunk < 1200 <= split * chunk


@pytest.mark.parametrize("N,C,hw", [(1, 320, 128 * 128), (1, 1280, 8 * 8), (2, 640, 64 * 64), (1, 40, 16384)])
def test_gpu_launch_fills_the_gpu(N, C, hw, monkeypatch):
    """The CUDA launch (the interpreter uses smaller targets) splits long rows so that batch 1
    still gives >= ~1000 programs, and every chunk is a whole number of tiles."""
    monkeypatch.setattr(gn_mod, "INTERPRETED", False)
    block, chunk, split = gn_mod._tile_and_split(N * C, hw, torch.device("cuda"))
    assert block in gn_mod.GPU_BLOCKS and chunk % block == 0
    assert (split - 1) * chunk < hw <= split * chunk
    assert N * C * split >= min(gn_mod.GPU_TARGET_PROGRAMS, N * C * triton_cdiv(hw, block))


def triton_cdiv(a, b):
    return -(-a // b)


def test_channels_last_and_no_affine(poisoned, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 5, 6, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(2, 8, 5, 6, generator=gen)
    y = refl_kernels.group_norm(x, 4, activation="silu", backend="triton")
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    y64 = reference.group_norm(x64, 4, activation="silu")
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def test_saves_input_and_statistics_only():
    """Autograd keeps x, weight, bias and (N, G) mean/rstd: not the normalised or activated tensor."""
    N, C, H, W, G = 2, 64, 16, 16, 32
    x = torch.randn(N, C, H, W, device="meta", requires_grad=True)
    w = torch.randn(C, device="meta", requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gn_mod.group_norm(x, G, w, w, activation="silu")
    assert sorted(t.numel() for t in saved) == sorted([N * C * H * W, C, C, N * G, N * G])


def test_argument_errors():
    x = torch.randn(1, 6, 2, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divide"):
        refl_kernels.group_norm(x, 4, backend="triton")
    with pytest.raises(ValueError, match="activation"):
        refl_kernels.group_norm(x, 3, activation="gelu", backend="triton")
    with pytest.raises(ValueError, match="unknown group_norm backend"):
        refl_kernels.group_norm(x, 3, backend="sdpa")
    torch.testing.assert_close(refl_kernels.group_norm(x, 3, activation="silu", backend="torch"),
                               reference.group_norm(x, 3, activation="silu"))


@pytest.mark.parametrize("act", ["silu", None])
def test_pieces_are_the_op(act, poisoned, seed):
    """group_norm_with_stats / _from_stats / _backward (what the lean recompute runs) give
    exactly the fused op's output, statistics-based recompute and gradients: the same launches."""
    gen = torch.Generator().manual_seed(seed)
    x, w, b, dy = _inputs(2, 12, (9, 11), torch.float32, gen)
    silu = act == "silu"
    y_op, dx_op, dw_op, db_op = _run(lambda a, c, d: refl_kernels.group_norm(a, 3, c, d, activation=act,
                                                                            backend="triton"), x, w, b, dy)
    assert refl_kernels.group_norm_runs("triton", x)
    y, mean, rstd = refl_kernels.group_norm_with_stats(x, 3, w, b, 1e-5, silu, "triton")
    assert mean.shape == rstd.shape == (2, 3) and mean.dtype == torch.float32
    again = refl_kernels.group_norm_from_stats(x, w, b, mean, rstd, 1e-5, silu, "triton")
    dx, dw, db = refl_kernels.group_norm_backward(dy, x, w, b, mean, rstd, silu, "triton")
    for got, ref in ((y, y_op), (again, y_op), (dx, dx_op), (dw, dw_op), (db, db_op)):
        assert torch.equal(got, ref)
    with pytest.raises(ValueError, match="triton or native"):
        refl_kernels.group_norm_with_stats(x, 3, w, b, 1e-5, silu, "torch")
    assert not refl_kernels.group_norm_runs("triton", x.double())

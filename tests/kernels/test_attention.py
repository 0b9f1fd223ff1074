"""Fused attention (Triton, interpreter on CPU) against the float64 reference, forward and every
gradient, by the flash-attention tolerance rule: the kernel's error is at most ~2x the error of
plain PyTorch run in the same precision, plus a small atol."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

import numerics
import refl_kernels
from refl_kernels import reference

attn_mod = importlib.import_module("refl_kernels.attention")

# A sample of the (Nq, Nk, D, dtype) grid, not the cross product: every Nq and Nk in
# {1, 7, 77, 129} and every D in {8, 40, 64, 80, 160} appears, in fp32 and fp16.
CASES = [
    # B, H, Nq, Nk, D, dtype
    (1, 2, 1, 77, 40, torch.float32),
    (2, 1, 7, 129, 8, torch.float16),
    (1, 1, 77, 7, 64, torch.float32),
    (1, 2, 129, 1, 80, torch.float16),
    (2, 1, 129, 77, 160, torch.float32),
    (1, 1, 7, 7, 160, torch.float16),
    (1, 1, 77, 129, 64, torch.float16),
    (1, 1, 1, 1, 8, torch.float32),
    (1, 1, 129, 129, 40, torch.float16),
    (1, 1, 7, 77, 80, torch.float32),
]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write shows up."""
    def nan_empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t
    monkeypatch.setattr(attn_mod, "_empty", nan_empty)


def _inputs(B, H, Nq, Nk, D, dtype, gen):
    q = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    k = torch.randn(B, H, Nk, D, generator=gen).to(dtype)
    v = torch.randn(B, H, Nk, D, generator=gen).to(dtype)
    do = torch.randn(B, H, Nq, D, generator=gen).to(dtype)
    return q, k, v, do


def _run(fn, q, k, v, do, dtype=None):
    q, k, v = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


def _check(got, ref64, plain, dtype, names=("out", "dq", "dk", "dv")):
    for name, g, r, p in zip(names, got, ref64, plain):
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten elements?)"
        err = (g.double() - r).abs().max().item()
        torch_err = (p.double() - r).abs().max().item()
        bound = 2 * torch_err + ATOL[dtype] * max(1.0, r.abs().max().item())
        numerics.record(name, err / bound)
        assert err <= bound, f"{name}: kernel error {err:.3g} > 2 x torch error {torch_err:.3g} + atol"


@pytest.mark.parametrize("B,H,Nq,Nk,D,dtype", CASES)
def test_attention_matches_float64_reference(B, H, Nq, Nk, D, dtype, poisoned, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = _inputs(B, H, Nq, Nk, D, dtype, gen)
    got = _run(lambda a, b, c: refl_kernels.attention(a, b, c, backend="triton"), q, k, v, do)
    ref64 = _run(reference.attention, q, k, v, do, torch.float64)
    plain = _run(reference.attention, q, k, v, do)  # plain torch in the same precision
    _check(got, ref64, plain, dtype)


def test_saved_log_sum_exp(poisoned, seed):
    q, k, v, _ = _inputs(2, 2, 77, 129, 40, torch.float32, torch.Generator().manual_seed(seed))
    out, lse = attn_mod.attention_forward(q, k, v, 1 / math.sqrt(40))
    ref = reference.attention_lse(q.double(), k.double())
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 77)
    torch.testing.assert_close(lse.double(), ref, rtol=1e-5, atol=1e-5)  # lse >= log(Nk) ~ 5: not near zero


def test_custom_scale_and_non_contiguous_inputs(poisoned, seed):
    """diffusers hands over (B, N, H, D) tensors transposed to (B, H, N, D): strided views."""
    B, H, Nq, Nk, D = 2, 3, 33, 77, 40
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Nq, H, D, generator=gen).transpose(1, 2)
    kv = torch.randn(B, Nk, 2 * H, D, generator=gen)
    k, v = kv[:, :, :H].transpose(1, 2), kv[:, :, H:].transpose(1, 2)
    do = torch.randn(B, H, Nq, D, generator=gen)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    scale = 0.37
    got = _run(lambda a, b, c: refl_kernels.attention(a, b, c, scale=scale, backend="triton"), q, k, v, do)
    ref64 = _run(lambda a, b, c: reference.attention(a, b, c, scale), q, k, v, do, torch.float64)
    plain = _run(lambda a, b, c: reference.attention(a, b, c, scale), q, k, v, do)
    _check(got, ref64, plain, torch.float32)


def test_saves_no_score_matrix():
    """What autograd keeps: q, k, v, O and the fp32 log-sum-exp, nothing of size Nq x Nk."""
    B, H, Nq, Nk, D = 1, 2, 64, 96, 40
    q, k, v = (torch.randn(B, H, n, D, device="meta", requires_grad=True) for n in (Nq, Nk, Nk))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn_mod.attention(q, k, v)
    numels = sorted(t.numel() for t in saved)
    assert numels == sorted([B * H * Nq, B * H * Nq * D, B * H * Nk * D, B * H * Nk * D, B * H * Nq * D])


def test_dispatch_and_backend_errors():
    q = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(refl_kernels.attention(q, q, q, backend="sdpa"), reference.attention(q, q, q))
    torch.testing.assert_close(refl_kernels.attention(q, q, q, backend="auto"), reference.attention(q, q, q))
    with pytest.raises(ValueError, match="unknown attention backend"):
        refl_kernels.attention(q, q, q, backend="flash9")
    with pytest.raises(ValueError, match="xformers"):
        refl_kernels.attention(q, q, q, backend="xformers")  # CPU tensors: unavailable either way
    with pytest.raises(ValueError, match="head dim"):
        refl_kernels.attention(torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300), torch.randn(1, 1, 2, 300), backend="triton")


def test_cpu_dispatch_without_interpreter_uses_torch(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not refl_kernels.triton_interpreting()

    def no_triton(*args, **kwargs):
        raise AssertionError("auto dispatch on CPU ran the Triton kernel without TRITON_INTERPRET=1")
    monkeypatch.setattr(attn_mod, "attention", no_triton)
    q = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(refl_kernels.attention(q, q, q), reference.attention(q, q, q))
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        refl_kernels.attention(torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), backend="triton")

"""apply_kernels on a tiny diffusers UNet2DConditionModel (cross-attention blocks, random
weights): the patched UNet gives the stock UNet's output and parameter gradients (fp32), with
the Triton kernels running in Triton's CPU interpreter."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from interpreted_kernels import INTERPRETED  # noqa: E402  (before diffusers imports triton)

from diffusers import UNet2DConditionModel  # noqa: E402

from tiny_unet import tiny_unet  # noqa: E402
from refl_engine.models.patch import (  # noqa: E402
    FusedAttnProcessor, FusedGroupNorm, FusedGroupNormSiLU, FusedResnetBlock2D, apply_kernels,
)


_unet = tiny_unet


def _inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, 16, generator=gen)  # 5 text tokens: cross-attention Nk != Nq
    weight = torch.randn(1, 4, 8, 8, generator=gen)
    return sample, torch.tensor([500]), context, weight


def _forward_backward(unet, sample, t, context, weight):
    unet.zero_grad(set_to_none=True)
    out = unet(sample, t, encoder_hidden_states=context).sample
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


def _assert_same(stock, patched):
    out_s, grads_s = stock
    out_p, grads_p = patched
    torch.testing.assert_close(out_p, out_s, rtol=1e-4, atol=1e-5)
    assert grads_p.keys() == grads_s.keys()
    for name in grads_s:
        scale = max(1.0, grads_s[name].abs().max().item())
        torch.testing.assert_close(grads_p[name], grads_s[name], rtol=1e-4, atol=2e-5 * scale, msg=name)


def _in_subprocess(nodeid: str) -> None:
    """Triton was imported before this module without the interpreter: run the test where it is."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", nodeid],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_triton_patched_unet_matches_stock(monkeypatch, request, seed):
    if not INTERPRETED:
        return _in_subprocess(request.node.nodeid)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    stock = _unet()
    patched = copy.deepcopy(stock)
    apply_kernels(patched, "triton")
    kinds = [type(m) for m in patched.modules()]
    assert FusedResnetBlock2D in kinds and FusedGroupNorm in kinds and FusedGroupNormSiLU in kinds
    attns = [m for m in patched.modules() if hasattr(m, "processor")]
    assert attns and all(isinstance(m.processor, FusedAttnProcessor) for m in attns)
    assert patched.state_dict().keys() == stock.state_dict().keys()

    args = _inputs(seed)
    _assert_same(_forward_backward(stock, *args), _forward_backward(patched, *args))


def test_sdpa_backend_and_torch_restores_stock(seed):
    stock = _unet()
    patched = copy.deepcopy(stock)
    apply_kernels(patched, "sdpa")
    assert all(isinstance(m.processor, FusedAttnProcessor) for m in patched.modules() if hasattr(m, "processor"))
    args = _inputs(seed)
    _assert_same(_forward_backward(stock, *args), _forward_backward(patched, *args))
    apply_kernels(patched, "torch")
    assert not any(isinstance(getattr(m, "processor", None), FusedAttnProcessor) for m in patched.modules())
    assert [type(m) for m in patched.modules()] == [type(m) for m in stock.modules()]


def test_unavailable_backends_raise_one_line_value_errors(monkeypatch):
    unet = _unet()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend, needle in (("triton", "TRITON_INTERPRET"), ("xformers", "xformers"), ("flash", "choose one of")):
        with pytest.raises(ValueError, match=needle) as info:
            apply_kernels(unet, backend)
        assert "\n" not in str(info.value)
    assert not any(isinstance(getattr(m, "processor", None), FusedAttnProcessor) for m in unet.modules())

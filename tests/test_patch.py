"""The one patching mechanism (engine/models/patch.py) on tiny diffusers UNets (cross-attention
blocks, random weights): with every kernel backend the patched UNet gives the stock UNet's output
and parameter gradients, in lean mode too, and with `--kernels triton` the Triton GroupNorm+SiLU
runs in every ResNet block under every recompute policy. The Triton kernels run in Triton's CPU
interpreter (in a subprocess when this process cannot interpret)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from interpreted_kernels import INTERPRETED  # noqa: E402  (before diffusers imports triton)

from diffusers import UNet2DConditionModel  # noqa: E402

import numerics  # noqa: E402
from tiny_unet import tiny_unet  # noqa: E402
from refl_engine.memory import lean  # noqa: E402
from refl_engine.models.patch import (  # noqa: E402
    FusedAttnProcessor, FusedGroupNorm, FusedGroupNormSiLU, ReflConv2d, ReflGEGLU, ReflResnetBlock2D,
    ReflTransformer2DModel, patch,
)
from refl_kernels import native  # noqa: E402

_unet = tiny_unet
needs_native = pytest.mark.skipif(not native.available("cpu"), reason="native library not built (make install)")


def _inputs(seed, batch=1):
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 8, 8, generator=gen)
    context = torch.randn(batch, 5, 16, generator=gen)  # 5 text tokens: cross-attention Nk != Nq
    weight = torch.randn(batch, 4, 8, 8, generator=gen)
    return sample, torch.tensor([500] * batch), context, weight


def _forward_backward(unet, sample, t, context, weight, lean_on=False):
    unet.zero_grad(set_to_none=True)
    with lean.lean_mode(lean_on):
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
    assert patch(patched, "triton") == "triton"
    kinds = {type(m) for m in patched.modules()}
    assert {ReflResnetBlock2D, ReflGEGLU, ReflTransformer2DModel, ReflConv2d, FusedGroupNorm, FusedGroupNormSiLU} <= kinds
    attns = [m for m in patched.modules() if hasattr(m, "processor")]
    assert attns and all(isinstance(m.processor, FusedAttnProcessor) for m in attns)
    assert patched.state_dict().keys() == stock.state_dict().keys()

    args = _inputs(seed)
    _assert_same(_forward_backward(stock, *args), _forward_backward(patched, *args))


def test_torch_backend_is_the_stock_model(seed):
    """--kernels torch: the routed classes run diffusers' own forwards (bit for bit), and patching
    back to torch after another backend undoes its fused modules and attention processors."""
    stock = _unet()
    patched = copy.deepcopy(stock)
    assert patch(patched, "torch") == "torch"
    args = _inputs(seed)
    ref = _forward_backward(stock, *args)
    got = _forward_backward(patched, *args)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(got[1][n], ref[1][n]) for n in ref[1])
    if native.available("cpu"):
        patch(patched, "native")
        assert any(type(m) is FusedGroupNormSiLU for m in patched.modules())
        patch(patched, "torch")
    assert not any(type(m) in (FusedGroupNorm, FusedGroupNormSiLU) for m in patched.modules())
    assert not any(isinstance(getattr(m, "processor", None), FusedAttnProcessor) for m in patched.modules())
    assert type(patched.conv_act) is type(stock.conv_act)
    got = _forward_backward(patched, *args)
    assert torch.equal(got[0], ref[0])


def test_unavailable_backends_raise_one_line_value_errors(monkeypatch):
    unet = _unet()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for backend, needle in (("triton", "TRITON_INTERPRET"), ("xformers", "xformers"), ("sdpa", "choose one of"),
                            ("flash", "choose one of")):
        with pytest.raises(ValueError, match=needle) as info:
            patch(unet, backend)
        assert "\n" not in str(info.value)
    assert not any(isinstance(getattr(m, "processor", None), FusedAttnProcessor) for m in unet.modules())


# ------------------------------------------------------------------ kernels inside lean mode

class _CountSiLULaunches:
    """Stands in for the Triton GroupNorm apply kernel (the pass that writes act(norm(x))): counts
    its launches with SILU on, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.count = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.count += bool(kwargs.get("SILU"))
            return launch(*args, **kwargs)

        return run


def _tiny_preset_unet():
    from refl_engine.models.load import tiny_sd_configs

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_sd_configs()["unet"]).float()


def _default_recompute() -> str:
    from refl_engine.config import MemoryConfig

    return MemoryConfig().recompute


@pytest.mark.parametrize("policy_name", ["default", "selective"])
def test_triton_groupnorm_silu_runs_in_every_resnet_block(policy_name, monkeypatch, request):
    """--kernels triton on the tiny preset's UNet, one grad-carrying call run by the recompute
    policy (the config's default, and `selective`, which runs lean mode in the forward and in the
    recompute; tests/memory/test_lean.py covers the kinds' equal gradients): the forward launches the fused Triton
    GroupNorm+SiLU twice per ResNet block (norm1 -> act, norm2 -> act) and once for conv_norm_out,
    in lean mode too; the backward recomputes the call (full, selective) and, in lean mode, each
    ResNet activation from its saved statistics, with the same kernel."""
    if not INTERPRETED:
        return _in_subprocess(request.node.nodeid)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import importlib

    from refl_engine.memory.recompute import build_policy

    gn_mod = importlib.import_module("refl_kernels.groupnorm")
    counter = _CountSiLULaunches(gn_mod._gn_fwd_apply_kernel)
    monkeypatch.setattr(gn_mod, "_gn_fwd_apply_kernel", counter)

    unet = _tiny_preset_unet()
    patch(unet, "triton")  # what the trainer does with --kernels triton
    policy = build_policy(_default_recompute() if policy_name == "default" else policy_name)
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 4, 4, generator=gen)  # small: every kernel runs in the interpreter
    context = torch.randn(1, 7, 32, generator=gen)

    def eps(x):
        return unet(x, torch.tensor([500]), encoder_hidden_states=context).sample

    eps.unet = unet

    kinds = []

    def step():
        unet.zero_grad(set_to_none=True)
        with policy.window(1):
            out = policy.unet_call(eps, sample)
            kinds.append(policy.call_kind(0))  # auto plans at a window's first call: ask before it closes
        forward = counter.count
        out.square().sum().backward()
        return forward, counter.count - forward

    if policy.name == "auto":  # it measures before it plans, at its first window: with torch's
        patch(unet, "torch")    # GroupNorm (the interpreter took 140 s for its five profiled kinds)
        step()
        patch(unet, "triton")
        counter.count = 0
    forward, backward = step()
    resnets = [m for m in unet.modules() if isinstance(m, ReflResnetBlock2D)]
    lean_ones = sum(lean.resnet_eligible(m) for m in resnets)
    assert resnets and lean_ones == len(resnets)  # the tiny preset's blocks all fit lean's pattern
    per_call = 2 * len(resnets) + 1
    kind = kinds[-1]
    assert forward == per_call, (kind, forward, per_call)
    expected = {"none": 0, "lean": 2 * lean_ones, "full": per_call, "selective": per_call + 2 * lean_ones}
    assert kind in expected, f"no launch count known for the call kind {kind!r}"
    assert backward == expected[kind], (kind, backward, expected[kind])


# FACTOR x as far from the float64 result as the stock float32 model is, plus a floor of ATOL_ULPS
# float32 ulps of the largest entry: the kernels compute the same math with fp32 statistics in
# another order (as the recompute policies' tests, tests/memory/test_recompute.py)
FACTOR, ATOL_ULPS = 8.0, 8


def _lean_kernel_matches_float64_stock(backend, seed, batch=2):
    from refl_engine.models.lora import add_lora

    stock = _tiny_preset_unet()
    params = add_lora(stock, 4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=gen)
    stock64 = copy.deepcopy(stock).double()
    patched = copy.deepcopy(stock)
    patch(patched, backend)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    context = torch.randn(batch, 7, 32, generator=gen)
    w = torch.randn(batch, 4, 8, 8, generator=gen)

    def run(unet, dtype, lean_on):
        xi = x.to(dtype).requires_grad_(True)
        trainable = [p for p in unet.parameters() if p.requires_grad]
        with lean.lean_mode(lean_on):
            out = unet(xi, torch.tensor([500, 20][:batch]), encoder_hidden_states=context.to(dtype)).sample
        return [out.detach(), *torch.autograd.grad((out * w.to(dtype)).sum(), [xi, *trainable])]

    ref64 = run(stock64, torch.float64, False)
    baseline = run(stock, torch.float32, False)
    got = run(patched, torch.float32, True)
    for i, (a, b, r) in enumerate(zip(got, baseline, ref64)):
        numerics.assert_as_accurate(a, b, r, factor=FACTOR, atol_scale=ATOL_ULPS, msg=f"{backend} lean, tensor {i}")


def test_lean_with_triton_matches_float64_stock(monkeypatch, request, seed):
    """Lean mode on a --kernels triton UNet (LoRA): output, input and LoRA gradients as close to
    the float64 stock model as the float32 stock model is."""
    if not INTERPRETED:
        return _in_subprocess(request.node.nodeid)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _lean_kernel_matches_float64_stock("triton", seed, batch=1)  # one sample: the interpreter is slow


@needs_native
def test_lean_with_native_matches_float64_stock(seed):
    _lean_kernel_matches_float64_stock("native", seed)

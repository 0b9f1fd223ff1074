"""Lean recomputation: the same values and gradients as the stock diffusers modules (float64,
autograd as the reference), with only the declared tensors saved; with a kernel GroupNorm backend
(native here; Triton in tests/test_patch.py) as accurate as the stock float32 path. Every test runs
twice: with lean.py's Functions as the native library's C++ ops (csrc/lean.cpp) and as its Python
autograd.Functions (tests/memory/test_lean_native.py checks the routing between them)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import numerics
from refl_engine.memory import lean as lean_functions
from refl_engine.memory import measure
from refl_engine.memory.lean import geglu_gate, lean_mode, norm_act_project
from refl_engine.models.patch import ReflGEGLU, ReflResnetBlock2D, ReflTransformer2DModel, patch
from refl_kernels import native


@pytest.fixture(autouse=True, params=["C++", "Python"])
def functions(request):
    if request.param == "C++" and not native.lean_ops_available():
        pytest.skip("the native library's lean ops are not built (make install)")
    with lean_functions.use_native_functions(request.param == "C++"):
        yield request.param


def _assert_exact(got, ref, what):
    """float64, the same math in another order: 4096 ulps of the tensor's largest entry (~1e-12
    relative). Measured over 50 seeds: at most ~25 ulps (the whole VAE decoder's latent gradient);
    a wrong formula is off by O(1)."""
    numerics.assert_close(got, ref, atol_scale=2**12, msg=what)


def _grads(fn, inputs, weight):
    out = fn()
    return out.detach(), torch.autograd.grad((out * weight).sum(), inputs)


def _saved_bytes(fn, exclude):
    with measure.SavedTensorCounter(exclude=exclude) as counter:
        out = fn()
    del out
    return counter.bytes


@pytest.mark.parametrize("proj_kind,act", [("conv3s2", "silu"), ("conv1", None), ("conv3", "silu"), ("linear", None),
                                           ("linear", "silu")])
@pytest.mark.parametrize("trainable", [True, False], ids=["train_proj", "frozen_proj"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_norm_act_project_matches_autograd(proj_kind, act, trainable, layout, seed):
    # contiguous x takes torch's GroupNorm aten ops directly in backward, channels-last x the graph path
    g = torch.Generator().manual_seed(seed)
    C, O = 6, 10
    norm = nn.GroupNorm(3, C, eps=1e-5).double()
    if proj_kind == "linear":
        proj = nn.Linear(C, O).double()
    else:
        k = 1 if proj_kind == "conv1" else 3
        proj = nn.Conv2d(C, O, k, stride=2 if proj_kind == "conv3s2" else 1, padding=k // 2).double()
    with torch.no_grad():
        for p in list(norm.parameters()) + list(proj.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    proj.requires_grad_(trainable)
    x = torch.randn(2, C, 5, 7, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    leaves = [x, norm.weight, norm.bias] + ([proj.weight, proj.bias] if trainable else [])

    def stock():
        a = norm(x)
        a = F.silu(a) if act == "silu" else a
        if proj_kind == "linear":
            a = a.permute(0, 2, 3, 1).reshape(2, 35, C)
        return proj(a)

    with torch.no_grad():
        w = torch.randn(stock().shape, generator=g, dtype=torch.float64)
    ref_out, ref = _grads(stock, leaves, w)
    out, got = _grads(lambda: norm_act_project(x, norm, act, proj), leaves, w)
    _assert_exact(out, ref_out, "out")
    for i, (a, b) in enumerate(zip(got, ref)):
        _assert_exact(a, b, f"grad {i}")
    # saved for backward: the input only (parameters are referenced, not copied)
    params = list(norm.parameters()) + list(proj.parameters())
    assert _saved_bytes(lambda: norm_act_project(x, norm, act, proj), params) == x.untyped_storage().nbytes()
    # stock keeps the norm's input and output (and the activation's): more, except for a frozen
    # linear right after the norm, which needs no input for backward
    stock_bytes = _saved_bytes(stock, params)
    assert stock_bytes > 2 * x.untyped_storage().nbytes() or (proj_kind == "linear" and act is None and not trainable)


def test_geglu_gate_matches_autograd(seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, 11, 2 * 13, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 11, 13, generator=g, dtype=torch.float64)

    def stock():
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)

    ref_out, ref = _grads(stock, [h], w)
    out, got = _grads(lambda: geglu_gate(h), [h], w)
    _assert_exact(out, ref_out, "out")
    _assert_exact(got[0], ref[0], "grad")
    assert _saved_bytes(lambda: geglu_gate(h), []) == h.untyped_storage().nbytes()


def _unet(linear_projection: bool, rank: int, seed: int):
    from diffusers import UNet2DConditionModel

    from refl_engine.models.load import tiny_sd_configs
    from refl_engine.models.lora import add_lora

    cfg = dict(tiny_sd_configs()["unet"], use_linear_projection=linear_projection)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfg).double()
    params = add_lora(unet, rank)
    for p in params if rank else []:
        p.data.normal_(0, 0.05)
    return unet, params


@pytest.mark.parametrize("linear_projection,rank", [(False, 4), (True, 4), (False, 0)],
                         ids=["conv_proj_lora", "linear_proj_lora", "full_finetune"])
def test_unet_lean_equals_stock(linear_projection, rank, seed):
    """The whole tiny UNet: same output and gradients (input and every trainable parameter) with
    and without lean mode, and fewer saved bytes."""
    unet, params = _unet(linear_projection, rank, seed)
    patch(unet)
    routed = [m for m in unet.modules() if isinstance(m, (ReflResnetBlock2D, ReflGEGLU, ReflTransformer2DModel))]
    assert len(routed) >= 5  # resnets, GEGLUs and transformer inputs of the tiny UNet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 12, 10, generator=g, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 7, 32, generator=g, dtype=torch.float64)
    w = torch.randn(2, 4, 12, 10, generator=g, dtype=torch.float64)

    def call():
        return unet(x, torch.tensor(321), encoder_hidden_states=cond).sample

    def lean():
        with lean_mode():
            return call()

    ref_out, ref = _grads(call, [x] + params, w)
    out, got = _grads(lean, [x] + params, w)
    _assert_exact(out, ref_out, "out")
    for i, (a, b) in enumerate(zip(got, ref)):
        _assert_exact(a, b, f"grad {i}")
    stock_bytes = _saved_bytes(call, list(unet.parameters()))
    sel_bytes = _saved_bytes(lean, list(unet.parameters()))
    assert sel_bytes < 0.8 * stock_bytes, (sel_bytes, stock_bytes)


def test_lean_under_bf16_autocast_close_to_stock(seed):
    """Mixed precision: the Functions run their projection backward in the dtype autocast ran the
    forward in, and return parameter gradients in the parameters' dtype."""
    unet, params = _unet(True, 4, seed)
    unet.float()
    patch(unet)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, 4, 16, 16, generator=g, requires_grad=True)
    cond = torch.randn(2, 7, 32, generator=g)

    def run(lean):
        with torch.autocast("cpu", dtype=torch.bfloat16), lean_mode(lean):
            out = unet(x, torch.tensor(500), encoder_hidden_states=cond).sample
        return out.float(), torch.autograd.grad(out.float().square().mean(), [x] + params)

    ref_out, ref = run(False)
    out, got = run(True)
    torch.testing.assert_close(out, ref_out)  # same bf16 forward
    for a, b, p in zip(got, ref, [x] + params):
        assert a.dtype == p.dtype
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-12


def test_inactive_or_no_grad_is_the_stock_path():
    unet, _ = _unet(False, 4, 0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(1, 7, 32, generator=g, dtype=torch.float64)
    call = lambda: unet(x, torch.tensor(10), encoder_hidden_states=cond).sample  # noqa: E731
    before = _saved_bytes(call, list(unet.parameters()))
    patch(unet)
    assert _saved_bytes(call, list(unet.parameters())) == before
    with torch.no_grad(), lean_mode():
        y = call()
    assert y.grad_fn is None


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 3)])
def test_frozen_conv_saves_nothing_and_matches_autograd(stride, padding, dilation, groups, seed):
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(6, 9, 3, stride=stride, padding=padding, dilation=dilation, groups=groups).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64))
    conv.requires_grad_(False)
    x = torch.randn(2, 6, 9, 11, generator=g, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        w = torch.randn(conv(x).shape, generator=g, dtype=torch.float64)
    ref_out, ref = _grads(lambda: conv(x), [x], w)
    patch(conv)

    def lean():
        with lean_mode():
            return conv(x)

    out, got = _grads(lean, [x], w)
    _assert_exact(out, ref_out, "out")
    _assert_exact(got[0], ref[0], "grad")
    assert _saved_bytes(lean, list(conv.parameters())) == 0
    assert _saved_bytes(lambda: conv(x), list(conv.parameters())) == x.untyped_storage().nbytes()
    conv.requires_grad_(True)  # a trainable conv keeps the stock path (its weight gradient needs x)
    assert _saved_bytes(lean, list(conv.parameters())) == x.untyped_storage().nbytes()


def test_vae_decode_lean_equals_stock(seed):
    """A VAE decoder (ResnetBlock2D with time_embedding_norm="group", upsamplers, mid-block
    attention): same image and latent gradient, fewer saved bytes."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 24),
                        layers_per_block=2, latent_channels=4, norm_num_groups=4).double().requires_grad_(False)
    patch(vae, attention=False)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, 4, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 20, 28, generator=g, dtype=torch.float64)

    def stock():
        return vae.decode(z).sample

    def lean():
        with lean_mode():
            return stock()

    ref_out, ref = _grads(stock, [z], w)
    out, got = _grads(lean, [z], w)
    _assert_exact(out, ref_out, "out")
    _assert_exact(got[0], ref[0], "grad")
    params = list(vae.parameters())
    assert _saved_bytes(lean, params) < 0.5 * _saved_bytes(stock, params)


@pytest.mark.skipif(not native.available("cpu"), reason="native library not built (make install)")
@pytest.mark.parametrize("proj_kind,act", [("conv3", "silu"), ("conv1", None), ("linear", None)])
def test_norm_act_project_on_the_native_op(proj_kind, act, seed):
    """GroupNorm(+SiLU) on the native op inside the Function: float32 output and gradients as
    close to float64 as torch's float32 ops are; saved: x and the op's fp32 mean and rstd."""
    g = torch.Generator().manual_seed(seed)
    C, O, G = 8, 6, 4
    norm = nn.GroupNorm(G, C)
    proj = nn.Linear(C, O) if proj_kind == "linear" else nn.Conv2d(C, O, 3 if proj_kind == "conv3" else 1,
                                                                     padding=1 if proj_kind == "conv3" else 0)
    with torch.no_grad():
        for p in list(norm.parameters()) + list(proj.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, C, 6, 5, generator=g) * 3 + 1

    def run(dtype, backend):
        n, pr = copy.deepcopy(norm).to(dtype), copy.deepcopy(proj).to(dtype)
        xi = x.to(dtype).requires_grad_(True)
        leaves = [xi, *n.parameters(), *pr.parameters()]
        out = norm_act_project(xi, n, act, pr, backend)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
        return [out.detach(), *torch.autograd.grad((out * w).sum(), leaves)]

    ref64, plain, got = run(torch.float64, "torch"), run(torch.float32, "torch"), run(torch.float32, "native")
    for i, (a, b, r) in enumerate(zip(got, plain, ref64)):
        numerics.assert_as_accurate(a, b, r, factor=4.0, atol_scale=8, msg=f"tensor {i}")
    xs = x.clone().requires_grad_(True)
    params = list(norm.parameters()) + list(proj.parameters())
    saved = _saved_bytes(lambda: norm_act_project(xs, norm, act, proj, "native"), params)
    assert saved == xs.untyped_storage().nbytes() + 2 * 2 * G * 4  # x, then (N, G) fp32 mean and rstd

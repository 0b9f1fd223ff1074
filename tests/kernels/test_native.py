"""The native fused GroupNorm(+SiLU) op (csrc/, refl_kernels.native): forward and gradients
against the float64 reference (error at most ~2x plain PyTorch's in the same precision plus a
small atol), channels-first and channels-last; the tiny UNet with the op under every recompute
policy against the stock model; what it saves for backward; the meta device and torch.compile;
the fallback when the library is absent; the CUDA source compiling for sm_80/sm_90 where nvcc is.

Needs the library (`make install` builds it into build/native/); without it these tests skip,
except the fallback test."""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import refl_kernels
from refl_kernels import native, reference
from tiny_unet import tiny_unet

pytestmark = pytest.mark.no_interpreter  # nothing here runs Triton
ROOT = Path(__file__).resolve().parents[2]
needs_lib = pytest.mark.skipif(not native.available("cpu"), reason="native library not built (make install)")


@pytest.fixture(autouse=True)
def interpreter():
    """Overrides the directory's fixture: these tests must not see TRITON_INTERPRET=1."""
    yield


CASES = [
    # N, C, spatial, G, activation, channels_last
    (1, 10, (5, 7), 5, "silu", False),     # C not a multiple of 32 or of the vector width, odd H/W
    (1, 10, (5, 7), 5, "silu", True),
    (1, 6, (1, 1), 6, None, False),        # G = C at 1x1: one element per group
    (3, 8, (33,), 1, "silu", False),       # one group, 1-D odd length
    (1, 12, (9, 11), 1, "silu", True),     # one group, channels-last
    (2, 64, (16, 16), 32, "silu", False),  # SD-like: 32 groups of 2 channels
    (2, 64, (16, 16), 32, None, True),
    (1, 40, (13, 3), 4, "silu", True),     # channels-last with a channel tail (40 = 5 x 8)
    (2, 3, (3, 5, 7), 3, "silu", False),   # 3-D spatial, G = C
    (1, 4, (2, 3, 5), 2, "silu", True),    # 3-D spatial channels-last (ChannelsLast3d)
]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # 4x each 16-bit type's unit roundoff


def _channels_last(t):
    return t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _inputs(N, C, spatial, dtype, seed, channels_last):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, *spatial, generator=gen) * 3 + 2).to(dtype)  # mean offset: tests stability
    w = (torch.randn(C, generator=gen) * 0.5 + 1).to(dtype)
    b = torch.randn(C, generator=gen).to(dtype)
    dy = torch.randn(N, C, *spatial, generator=gen).to(dtype)
    if channels_last:
        x, dy = _channels_last(x), _channels_last(dy)
    return x, w, b, dy


def _run(fn, x, w, b, dy, dtype=None):
    x, w, b = (t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, b))
    y = fn(x, w, b)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad, w.grad, b.grad]


def _check(got, ref64, plain, dtype):
    for name, g, r, p in zip(("y", "dx", "dw", "db"), got, ref64, plain):
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - r).abs().max().item()
        torch_err = (p.double() - r).abs().max().item()
        torch_err = torch_err if math.isfinite(torch_err) else 0.0  # torch's own op failed (fp16 dx of a 1x1 group)
        bound = 2 * torch_err + ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: native error {err:.3g} > 2 x torch error {torch_err:.3g} + atol"


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("N,C,spatial,G,act,channels_last", CASES)
def test_native_matches_float64_reference(N, C, spatial, G, act, channels_last, dtype):
    x, w, b, dy = _inputs(N, C, spatial, dtype, seed=N * 1000 + C * 10 + G, channels_last=channels_last)
    got = _run(lambda a, c, d: native.group_norm(a, G, c, d, activation=act), x, w, b, dy)
    ref64 = _run(lambda a, c, d: reference.group_norm(a, G, c, d, activation=act), x, w, b, dy, torch.float64)
    plain = _run(lambda a, c, d: reference.group_norm(a, G, c, d, activation=act), x, w, b, dy)
    _check(got, ref64, plain, dtype)
    # the output and dx keep x's layout
    if channels_last:
        assert _channels_last(got[0]).stride() == got[0].stride() and _channels_last(got[1]).stride() == got[1].stride()


@needs_lib
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_native_two_threads_matches_one(channels_last):
    """Positions split across threads (channels-last: per-thread partial sums) give the
    one-thread result up to summation order."""
    x, w, b, dy = _inputs(2, 16, (48, 45), torch.float32, seed=7, channels_last=channels_last)
    fn = lambda a, c, d: native.group_norm(a, 4, c, d, activation="silu")  # noqa: E731
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(fn, x, w, b, dy)
        torch.set_num_threads(2)
        two = _run(fn, x, w, b, dy)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * max(1.0, a.abs().max().item()))


def _saved(fn, x, params):
    seen = {p.untyped_storage()._cdata for p in params}
    sizes = []

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_saved_tensors_on_meta(dtype):
    N, C, H, W, G = 2, 320, 64, 64, 32  # SD1.5's first level at 512 px, on the meta device
    x = torch.empty(N, C, H, W, device="meta", dtype=dtype, requires_grad=True)
    w = torch.empty(C, device="meta", dtype=dtype, requires_grad=True)
    b = torch.empty(C, device="meta", dtype=dtype, requires_grad=True)
    act_bytes = x.numel() * x.element_size()
    fused = _saved(lambda: native.group_norm(x, G, w, b, activation="silu"), x, (w, b))
    stock = _saved(lambda: F.silu(F.group_norm(x, G, w, b)), x, (w, b))
    assert sorted(fused) == [N * G * 4, N * G * 4, act_bytes]  # x, mean, rstd
    assert sum(s == act_bytes for s in stock) == 2  # x and the GroupNorm output
    # and the backward runs on meta (the op's Meta kernels)
    y = native.group_norm(x, G, w, b, activation="silu")
    gx, gw = torch.autograd.grad(y, (x, w), torch.empty_like(y))
    assert gx.shape == x.shape and gx.device.type == "meta" and gw.shape == w.shape


@needs_lib
def test_torch_compile_traces_the_op():
    """torch.compile (aot_eager: graph capture, FakeTensor via the Meta kernels, AOT autograd;
    no C++ codegen) gives the eager values and gradients, in one graph."""
    x, w, b, dy = _inputs(2, 8, (6, 5), torch.float32, seed=3, channels_last=False)
    fn = lambda a, c, d: native.group_norm(a, 4, c, d, activation="silu")  # noqa: E731
    eager = _run(fn, x, w, b, dy)
    torch._dynamo.reset()
    compiled = _run(torch.compile(fn, backend="aot_eager", fullgraph=True), x, w, b, dy)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@needs_lib
def test_op_rejects_bad_arguments():
    x = torch.randn(1, 6, 4, 4)
    with pytest.raises(RuntimeError, match="must divide"):
        torch.ops.refl.group_norm_silu(x, torch.ones(6), torch.zeros(6), 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        torch.ops.refl.group_norm_silu(x.double(), torch.ones(6), torch.zeros(6), 3, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"weight and bias must be \(6,\)"):
        torch.ops.refl.group_norm_silu(x, torch.ones(5), torch.zeros(6), 3, 1e-5, True)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_extreme_pre_activations(dtype, channels_last):
    """Pre-activations far past the sigmoid's range (|z| up to ~300): the kernels' sigmoid caps
    exp's argument (a reciprocal's Newton step would turn exp's inf into NaN); y and the gradients
    stay finite and match the float64 reference."""
    x, w, b, dy = _inputs(2, 24, (7, 9), dtype, seed=11, channels_last=channels_last)
    w = (w.float() * 100).to(dtype)  # xhat ~ N(0, 1) times 100: z spans about -300..300
    got = _run(lambda a, c, d: native.group_norm(a, 6, c, d, activation="silu"), x, w, b, dy)
    ref64 = _run(lambda a, c, d: reference.group_norm(a, 6, c, d, activation="silu"), x, w, b, dy, torch.float64)
    plain = _run(lambda a, c, d: reference.group_norm(a, 6, c, d, activation="silu"), x, w, b, dy)
    _check(got, ref64, plain, dtype)


@needs_lib
@pytest.mark.parametrize("x_dtype,p_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
                         ids=["bf16-x-fp32-params", "fp32-x-bf16-params"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_parameters_in_another_dtype_or_strided(x_dtype, p_dtype, channels_last):
    """weight and bias in another dtype than x, and not contiguous (every other element of a
    longer tensor): the kernels convert them to fp32 themselves; dweight and dbias come back in
    the parameters' dtype and match the float64 reference."""
    N, C, G = 2, 20, 5
    x, _, _, dy = _inputs(N, C, (5, 6), x_dtype, seed=5, channels_last=channels_last)
    gen = torch.Generator().manual_seed(6)
    w_long = (torch.randn(2 * C, generator=gen) * 0.5 + 1).to(p_dtype).requires_grad_()
    b_long = torch.randn(2 * C, generator=gen).to(p_dtype).requires_grad_()
    w, b = w_long[::2], b_long[::2]
    assert not w.is_contiguous()
    xg = x.detach().requires_grad_()
    y = native.group_norm(xg, G, w, b, activation="silu")
    y.backward(dy)
    assert y.dtype == x_dtype and xg.grad.dtype == x_dtype and w_long.grad.dtype == p_dtype
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    y64 = reference.group_norm(x64, G, w64, b64, activation="silu")
    y64.backward(dy.double())
    # error budget: a few roundings in x's dtype (the output and dx) or the parameters' (dw, db),
    # plus this file's floor for that dtype, on the size of the values
    for name, g, r, dt in (("y", y, y64, x_dtype), ("dx", xg.grad, x64.grad, x_dtype),
                           ("dw", w_long.grad[::2], w64.grad, p_dtype), ("db", b_long.grad[::2], b64.grad, p_dtype)):
        tol = (4 * torch.finfo(dt).eps + ATOL[dt]) * max(1.0, r.abs().max().item())
        assert (g.double() - r).abs().max().item() <= tol, name
    assert (w_long.grad[1::2] == 0).all() and (b_long.grad[1::2] == 0).all()


@needs_lib
def test_gradients_only_for_inputs_that_need_them():
    """A frozen norm (weight and bias without grad) gives dx alone; a detached x gives dweight
    and dbias alone; each equals the gradient of the full call."""
    x, w, b, dy = _inputs(1, 8, (4, 5), torch.float32, seed=9, channels_last=False)
    full = _run(lambda a, c, d: native.group_norm(a, 2, c, d, activation="silu"), x, w, b, dy)
    xg = x.detach().requires_grad_()
    native.group_norm(xg, 2, w, b, activation="silu").backward(dy)
    torch.testing.assert_close(xg.grad, full[1], rtol=0, atol=0)
    wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()
    native.group_norm(x, 2, wg, bg, activation="silu").backward(dy)
    torch.testing.assert_close(wg.grad, full[2], rtol=0, atol=0)
    torch.testing.assert_close(bg.grad, full[3], rtol=0, atol=0)


@needs_lib
def test_double_backward_is_refused():
    x, w, b, dy = _inputs(1, 4, (3, 3), torch.float32, seed=2, channels_last=False)
    x = x.requires_grad_()
    y = native.group_norm(x, 2, w, b, activation="silu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, dy, create_graph=True)


@needs_lib
def test_output_cache_reuses_freed_outputs_and_can_be_turned_off():
    """Outputs of 1 MiB or more come back from the cache when an earlier output of the same size
    was freed (same memory, no page faults), with the same values and gradients as the first
    call; with the bound at 0 nothing is kept and outputs come from torch's allocator."""
    x, w, b, dy = _inputs(1, 64, (64, 64), torch.float32, seed=4, channels_last=False)  # 1 MiB tensors
    nbytes = x.numel() * x.element_size()
    limit = torch.ops.refl.output_cache_limit(-1)
    try:
        torch.ops.refl.output_cache_limit(1 << 30)
        run = _run(lambda a, c, d: native.group_norm(a, 8, c, d, activation="silu"), x, w, b, dy)
        first = [t.clone() for t in run]  # clones come from torch's allocator
        idle = torch.ops.refl.output_cache_idle_bytes()
        del run  # frees y and dx
        assert torch.ops.refl.output_cache_idle_bytes() == idle + 2 * nbytes
        idle += 2 * nbytes
        y, _, _ = torch.ops.refl.group_norm_silu(x, w, b, 8, 1e-5, True)
        assert torch.ops.refl.output_cache_idle_bytes() == idle - nbytes  # taken from the cache
        torch.testing.assert_close(y, first[0], rtol=0, atol=0)
        del y
        assert torch.ops.refl.output_cache_idle_bytes() == idle
        second = _run(lambda a, c, d: native.group_norm(a, 8, c, d, activation="silu"), x, w, b, dy)
        for a, c in zip(first, second):  # computed in reused memory
            torch.testing.assert_close(a, c, rtol=0, atol=0)
        torch.ops.refl.output_cache_limit(0)
        assert torch.ops.refl.output_cache_idle_bytes() == 0  # lowering the bound frees idle blocks
        third = _run(lambda a, c, d: native.group_norm(a, 8, c, d, activation="silu"), x, w, b, dy)
        assert torch.ops.refl.output_cache_idle_bytes() == 0
        for a, c in zip(first, third):
            torch.testing.assert_close(a, c, rtol=0, atol=0)
    finally:
        torch.ops.refl.output_cache_limit(limit)


@needs_lib
def test_output_cache_evicts_the_least_recently_freed():
    """At the bound, a freed output evicts older idle blocks (another shape's) and is kept, so the
    next call of its shape reuses it instead of mapping fresh memory every call."""
    gen = torch.Generator().manual_seed(8)
    a, b = torch.randn(1, 64, 64, 64, generator=gen), torch.randn(1, 128, 64, 64, generator=gen)  # 1 and 2 MiB
    nbytes = a.numel() * a.element_size()
    params = lambda C: (torch.ones(C), torch.zeros(C))  # noqa: E731
    limit = torch.ops.refl.output_cache_limit(-1)
    try:
        torch.ops.refl.output_cache_limit(0)  # start empty
        torch.ops.refl.output_cache_limit(2 * nbytes)
        ya = torch.ops.refl.group_norm_silu(a, *params(64), 8, 1e-5, True)[0]
        del ya
        assert torch.ops.refl.output_cache_idle_bytes() == nbytes
        yb = torch.ops.refl.group_norm_silu(b, *params(128), 8, 1e-5, True)[0]
        expected = yb.clone()
        del yb  # evicts a's block to keep b's
        assert torch.ops.refl.output_cache_idle_bytes() == 2 * nbytes
        yb = torch.ops.refl.group_norm_silu(b, *params(128), 8, 1e-5, True)[0]
        assert torch.ops.refl.output_cache_idle_bytes() == 0  # reused
        torch.testing.assert_close(yb, expected, rtol=0, atol=0)
    finally:
        torch.ops.refl.output_cache_limit(limit)


def test_library_without_autograd_formula_is_not_used(monkeypatch, caplog):
    """A library built before the op had its C++ autograd formula (its outputs would carry no
    gradient) is reported as out of date and the torch path is used."""
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setattr(native, "library_candidates", lambda: [Path(__file__)])  # any existing file
    monkeypatch.setattr(native, "_has_kernel", lambda key: key != "Autograd")
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available("cpu")
    msgs = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    assert len(msgs) == 1 and "out of date" in msgs[0] and "make install" in msgs[0]
    x = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(native.group_norm(x, 2, activation="silu"), F.silu(F.group_norm(x, 2)), rtol=0, atol=0)


# ---------------------------------------------------------------------------------- tiny UNet

_unet = tiny_unet


def _policy_step(unet, policy_name, seed=0):
    """One grad-carrying UNet call run by the recompute policy; output and parameter gradients."""
    from refl_engine.memory.recompute import build_policy

    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 5, 16, generator=gen)
    weight = torch.randn(2, 4, 8, 8, generator=gen)

    def eps(s):
        return unet(s, torch.tensor([500, 20]), encoder_hidden_states=context).sample

    eps.unet = unet
    policy = build_policy(policy_name)
    unet.zero_grad(set_to_none=True)
    with policy.window(1):
        out = policy.unet_call(eps, sample)
    (out * weight).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}


@needs_lib
@pytest.mark.parametrize("functions", ["C++", "Python"])
@pytest.mark.parametrize("policy", ["none", "lean", "full", "selective"])
def test_tiny_unet_with_native_op_matches_stock(policy, functions, monkeypatch):
    """--kernels native (every GroupNorm(+SiLU) fused) and, in the recompute modes, the native op
    inside lean.py's GroupNorm->SiLU->projection, whether that Function is lean.py's Python one or
    its C++ op (csrc/lean.cpp): the stock model's outputs and gradients."""
    from refl_engine.memory import lean

    if functions == "C++" and not native.lean_ops_available():
        pytest.skip("the native library predates its lean ops (make install)")
    if functions == "Python" and policy not in ("lean", "selective"):
        pytest.skip("runs no lean-mode Function: the C++ case covers it")
    with lean.use_native_functions(functions == "C++"):
        _native_op_matches_stock(policy, functions, monkeypatch)


def _native_op_matches_stock(policy, functions, monkeypatch):
    from torch.profiler import ProfilerActivity, profile

    from refl_engine.models.patch import FusedGroupNorm, FusedGroupNormSiLU, ReflResnetBlock2D, patch

    stock_out, stock_grads = _policy_step(_unet(), "none")

    calls = {"patch": 0, "selective": 0}
    real_gn, real_sel = native.group_norm, refl_kernels.group_norm_with_stats

    def counting_gn(*a, **k):
        calls["patch"] += 1
        return real_gn(*a, **k)

    def counting_sel(*a, **k):
        calls["selective"] += a[-1] == "native"
        return real_sel(*a, **k)

    monkeypatch.setattr(native, "group_norm", counting_gn)
    monkeypatch.setattr(refl_kernels, "group_norm_with_stats", counting_sel)
    unet = _unet()
    patch(unet, "native")
    # every GroupNorm runs the op: the ResNet blocks' through lean.py's routed block, the others
    # fused with the SiLU after them (conv_norm_out) or alone (the attention blocks' norms)
    in_resnets = {id(n) for b in unet.modules() if isinstance(b, ReflResnetBlock2D) for n in (b.norm1, b.norm2)}
    others = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm) and id(m) not in in_resnets]
    assert {type(m) for m in others} == {FusedGroupNorm, FusedGroupNormSiLU}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, grads = _policy_step(unet, policy)
    ran = {e.key: e.count for e in prof.key_averages()}
    assert calls["patch"] > 0
    if policy in ("lean", "selective"):  # these run the ResNet blocks' norms through lean.py
        if functions == "C++":  # the C++ Function, which calls the op from C++ (fused=True)
            assert ran.get("refl::norm_act_project", 0) > 0 and calls["selective"] == 0
            assert ran.get("refl::group_norm_silu", 0) > calls["patch"]
        else:
            assert calls["selective"] > 0 and "refl::norm_act_project" not in ran
    torch.testing.assert_close(out, stock_out, rtol=1e-4, atol=1e-5)
    assert grads.keys() == stock_grads.keys()
    for name, ref in stock_grads.items():
        scale = max(1.0, ref.abs().max().item())
        torch.testing.assert_close(grads[name], ref, rtol=1e-4, atol=2e-5 * scale, msg=name)


# ---------------------------------------------------------------------------------- fallback

def test_fallback_when_library_is_absent(monkeypatch, caplog, tmp_path):
    """The loader finds nothing: the dispatch, the recompute modes and native.group_norm use
    torch's GroupNorm, and one log line says why (once)."""
    monkeypatch.setenv(native.ENV_VAR, str(tmp_path / "missing" / native.LIB_NAME))
    monkeypatch.setattr(native, "_status", None)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available("cpu")
        assert not native.available("cpu")
    msgs = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    assert len(msgs) == 1 and "torch path" in msgs[0] and "make install" in msgs[0]
    assert refl_kernels._resolve("auto", torch.device("cpu"), refl_kernels.GROUP_NORM_BACKENDS, "group_norm") == "torch"
    with pytest.raises(ValueError, match="native.*unavailable"):
        refl_kernels.group_norm(torch.randn(1, 4, 3, 3), 2, backend="native")
    x = torch.randn(2, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    w, b = torch.randn(6), torch.randn(6)
    torch.testing.assert_close(native.group_norm(x, 3, w, b, activation="silu"), F.silu(F.group_norm(x, 3, w, b)),
                               rtol=0, atol=0)
    assert not refl_kernels.group_norm_runs("native", x)


# ---------------------------------------------------------------------------------- CUDA compile

@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc")
def test_cuda_source_compiles_for_sm80_and_sm90(tmp_path):
    """nvcc -c of csrc/group_norm_cuda.cu for sm_80 and sm_90 against torch's headers, through the
    CMake target (compile only: no GPU here; a CPU torch cannot link a CUDA extension)."""
    build = ROOT / "build" / "native"
    if not (build / "CMakeCache.txt").is_file():
        build = tmp_path / "build"
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "--log-level=NOTICE",
                        f"-DPython_EXECUTABLE={sys.executable}"], check=True, capture_output=True)
    proc = subprocess.run(["cmake", "--build", str(build), "--target", "refl_native_cuda_objects"],
                          capture_output=True, text=True)
    if "refl_native_cuda_objects" in proc.stderr and "No rule" in proc.stderr:
        pytest.skip("the CMake build links the CUDA ops itself (CUDA torch): nothing compile-only to check")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    obj = build / "group_norm_cuda.o"
    assert obj.is_file() and obj.stat().st_mtime >= (ROOT / "csrc" / "group_norm_cuda.cu").stat().st_mtime
    # the cubins inside: cuobjdump of the toolkit, or the one triton ships
    tools = [shutil.which("cuobjdump")]
    if importlib.util.find_spec("triton") is not None:
        tools.append(str(Path(importlib.util.find_spec("triton").origin).parent / "backends/nvidia/bin/cuobjdump"))
    tool = next((t for t in tools if t and Path(t).is_file()), None)
    if tool is None:
        pytest.skip("compiled; no cuobjdump to list the architectures")
    listing = subprocess.run([tool, "--list-elf", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "sm_80.cubin" in listing and "sm_90.cubin" in listing, listing


def test_library_built_for_missing_cpu_instructions_is_refused(monkeypatch, caplog, tmp_path):
    """A library whose build recorded vector instructions this CPU lacks is not loaded (it would
    die with SIGILL at its first call): one log line names the missing flag and the fix."""
    lib = tmp_path / native.LIB_NAME
    lib.write_bytes(b"")  # never opened: the flag check comes first
    lib.with_suffix(".cpuflags").write_text("avx2 refl_no_such_cpu_flag\n")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n")
    assert native.missing_cpu_flags(lib, str(cpuinfo)) == ["refl_no_such_cpu_flag"]
    assert native.missing_cpu_flags(lib, str(tmp_path / "no-cpuinfo")) == []  # nothing to compare with
    monkeypatch.setenv(native.ENV_VAR, str(lib))
    monkeypatch.setattr(native, "_status", None)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not native.available("cpu")
    msgs = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    assert len(msgs) == 1 and "refl_no_such_cpu_flag" in msgs[0] and "make install" in msgs[0]


@pytest.mark.skipif(not native.library_candidates()[0].is_file(), reason="native library not built")
def test_the_build_records_the_instructions_it_needs():
    """CMake writes the flags next to the library it builds, and this machine (which built it) has them."""
    lib = native.library_candidates()[0]
    assert lib.with_suffix(".cpuflags").is_file()
    assert native.missing_cpu_flags(lib) == []

"""lean.py's Functions as the native library's C++ ops (csrc/lean.cpp): bit-identical to the
Python Functions on a UNet (they run the same aten ops), taken only in the plain case (no autocast,
x contiguous; otherwise the Python Functions), on the meta device too, no double
backward, and the Python Functions when the library is absent, stale or switched off.
tests/memory/test_lean.py runs its float64-against-autograd tests on both."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from refl_engine.memory import lean
from refl_engine.models.patch import patch
from refl_kernels import native

needs_ops = pytest.mark.skipif(not native.lean_ops_available(), reason="the native library's lean ops are not "
                                                                        "built (make install)")


def _unet(rank: int, dtype, seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=16,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).to(dtype)
    if rank:
        from peft import LoraConfig, inject_adapter_in_model

        unet.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                           init_lora_weights="gaussian"), unet)
    patch(unet)
    return unet


def _step(unet, native_functions: bool, seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype, requires_grad=True)
    ctx = torch.randn(2, 5, 16, generator=g, dtype=dtype)
    w = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    with lean.use_native_functions(native_functions), lean.lean_mode():
        out = unet(x, torch.tensor([500, 20]), encoder_hidden_states=ctx).sample
        grads = torch.autograd.grad((out * w).sum(), [x, *params])
    return out.detach(), grads


@needs_ops
@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "full_finetune"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_functions_equal_python_functions_on_a_unet(rank, dtype, seed):
    """The same aten ops in the same order: equal bit for bit, output and every gradient."""
    unet = _unet(rank, dtype, seed)
    cpp_out, cpp_grads = _step(unet, True, seed, dtype)
    py_out, py_grads = _step(unet, False, seed, dtype)
    assert torch.equal(cpp_out, py_out)
    assert len(cpp_grads) == len(py_grads) > 1
    for a, b in zip(cpp_grads, py_grads):
        assert torch.equal(a, b)


def _norm_proj():
    return nn.GroupNorm(2, 8), nn.Conv2d(8, 6, 3, padding=1)


@needs_ops
def test_native_functions_take_only_the_plain_case():
    norm, proj = _norm_proj()
    frozen = nn.Conv2d(8, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)

    def kinds(x, norm=norm, proj=proj):
        outs = lean.norm_act_project(x, norm, "silu", proj), lean.frozen_conv(frozen, x), lean.geglu_gate(x.flatten(2))
        return [t.grad_fn.name() for t in outs]

    with lean.use_native_functions(True):
        assert kinds(x) == [f"torch::autograd::CppNode<refl::(anonymous namespace)::{name}>"
                            for name in ("NormActProject", "FrozenConv", "GegluGate")]
        # channels-last x: the Python Functions (their graph path lays it out as F.group_norm does)
        assert kinds(x.to(memory_format=torch.channels_last))[:2] == ["_NormActProjectBackward", "_FrozenConvBackward"]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's casts: the Python Functions
            assert kinds(x) == ["_NormActProjectBackward", "_FrozenConvBackward", "_GegluGateBackward"]
    with lean.use_native_functions(False):
        assert kinds(x) == ["_NormActProjectBackward", "_FrozenConvBackward", "_GegluGateBackward"]


@needs_ops
@pytest.mark.parametrize("backend", ["torch", "native"])
def test_native_functions_on_the_meta_device(backend):
    """The planner's traces run on the meta device: shapes, and a backward, without data."""
    norm, proj = _norm_proj()
    frozen = nn.Conv2d(8, 6, 3, padding=1, stride=2).requires_grad_(False)
    ref_x = torch.randn(2, 8, 5, 6)
    ref = [lean.norm_act_project(ref_x, norm, "silu", proj, backend), lean.frozen_conv(frozen, ref_x),
           lean.geglu_gate(ref_x)]
    norm, proj, frozen = norm.to("meta"), proj.to("meta"), frozen.to("meta")
    x = torch.empty(2, 8, 5, 6, device="meta", requires_grad=True)
    with lean.use_native_functions(True):
        outs = [lean.norm_act_project(x, norm, "silu", proj, backend), lean.frozen_conv(frozen, x),
                lean.geglu_gate(x)]
    assert [o.shape for o in outs] == [r.shape for r in ref]
    assert all(o.device.type == "meta" and o.grad_fn.name().startswith("torch::autograd::CppNode") for o in outs)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), [x, norm.weight, proj.weight])
    assert [g.shape for g in grads] == [x.shape, norm.weight.shape, proj.weight.shape]


@needs_ops
def test_double_backward_is_refused():
    norm, proj = _norm_proj()
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    with lean.use_native_functions(True):
        out = lean.norm_act_project(x, norm, "silu", proj)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@needs_ops
def test_frozen_conv_op_refuses_a_trainable_weight():
    conv = nn.Conv2d(8, 6, 3)
    with pytest.raises(RuntimeError, match="must not require grad"):
        torch.ops.refl.frozen_conv(torch.randn(1, 8, 5, 5), conv.weight, conv.bias, [1, 1], [0, 0], [1, 1], 1)


def test_python_functions_when_the_library_is_stale_or_switched_off(monkeypatch, caplog):
    """A library built before the lean ops: one warning, the Python Functions. $REFL_LEAN_NATIVE=0:
    the Python Functions."""
    if not native.available("cpu"):
        pytest.skip("native library not built (make install)")
    real = native._has_kernel
    monkeypatch.setattr(native, "_has_kernel", lambda key, op="refl::group_norm_silu":
                        False if op == "refl::norm_act_project" else real(key, op))
    monkeypatch.setattr(native, "_lean_ops", None)
    monkeypatch.setattr(lean, "_native", None)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert not lean.native_functions()
        assert not native.lean_ops_available()
    msgs = [r.getMessage() for r in caplog.records if r.name == native.__name__]
    assert len(msgs) == 1 and "make install" in msgs[0]
    norm, proj = _norm_proj()
    out = lean.norm_act_project(torch.randn(2, 8, 5, 6, requires_grad=True), norm, "silu", proj)
    assert out.grad_fn.name() == "_NormActProjectBackward"

    monkeypatch.setattr(native, "_has_kernel", real)
    monkeypatch.setattr(native, "_lean_ops", None)
    monkeypatch.setattr(lean, "_native", None)
    monkeypatch.setenv("REFL_LEAN_NATIVE", "0")
    assert not lean.native_functions()
    monkeypatch.setattr(lean, "_native", None)
    monkeypatch.delenv("REFL_LEAN_NATIVE")
    assert lean.native_functions() == native.lean_ops_available()


@needs_ops
def test_torch_compile_traces_the_functions():
    """torch.compile (aot_eager: FakeTensor through the ops' composite forward, AOT autograd through
    the C++ backward): the eager gradients."""
    norm, proj = _norm_proj()
    frozen = nn.Conv2d(6, 6, 3, padding=1).requires_grad_(False)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)

    def f(x):
        y = lean.frozen_conv(frozen, lean.norm_act_project(x, norm, "silu", proj))
        return lean.geglu_gate(y.flatten(2)).square().sum()

    with lean.use_native_functions(True):
        eager = torch.autograd.grad(f(x), [x, norm.weight, proj.weight])
        compiled = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(x),
                                       [x, norm.weight, proj.weight])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)

"""Block-nested recomputation: a checkpointed UNet call whose recompute is itself checkpointed,
one UNet block at a time.

A `full` checkpoint keeps a call's input and, in backward, rematerialises the whole call: its
backward peak is everything `none` would keep for that call. `nested_call` owns both levels in
one autograd Function:

    forward     runs the call without a graph and keeps its tensor arguments (the latent, the
                timestep): nothing of the call outlives it but what `full` keeps, so the window
                stays flat in K.
    backward    recomputes the call with a graph in which every block but the last one run
                (`unet_blocks`: down blocks, mid block, up blocks) is a non-reentrant checkpoint,
                so the recompute keeps the blocks' inputs and outputs (the skip connections
                among them) and the few ops between blocks; then backpropagates through it, and
                each block is recomputed once more when its backward comes, one block at a
                time. The last block runs unchecked: its backward is the first to run, right
                after the recompute, so keeping its activations costs no peak and saves its
                second recompute. Everything is freed when the Function's backward returns.

The inner checkpoints exist only inside the Function's backward, so nothing of them is kept
across window steps (a non-reentrant checkpoint around checkpointed blocks would keep every
block's input per step, and non-reentrant checkpoint cannot switch the inner ones on only for its
recompute: it requires the recompute to save what the forward saved).

The call's differentiable inputs are its tensor arguments and the trainable parameters of
`fn.unet`, passed to the Function explicitly: their gradients come back through autograd as from
any op (into .grad under .backward(), returned by torch.autograd.grad), not accumulated behind
autograd's back as a reentrant checkpoint does. Returned at once, they are one full set of
parameter gradients alive beside .grad when the Function's backward returns: for full fine-tuning
of SD1.5 (3.4 GB in fp32) more than the blocks' activations it saves. So the trainer's backward
runs under `param_grads_into_grad()`, in which the backward accumulates each parameter's gradient
into its .grad as soon as its block's backward has produced it (through the parameter's own
AccumulateGrad node, so gradient hooks and AMP scaling see it as from any op) and returns none for
the parameters: the same .grad, one block's gradients in flight. torch.autograd.grad must not be
taken for the parameters inside it (they would get none). Not under DeepSpeed's ZeRO-1/2: their
hooks reduce each gradient as it accumulates and refuse a second accumulation of a parameter in one
backward, which a window of several nested calls makes (distributed.backward;
tests/test_distributed.py::test_nested_recompute_under_deepspeed_equals_plain). Anything else `fn` closes over (the prompt
embeddings) is a constant. ZeRO-3's partitioned parameters cannot be inputs of a Function (their
gradients have the gathered shape, the inputs the partitioned one): there the call runs as one
checkpoint recomputed under `mode` (what `selective` does; logged once). `--recompute nested` with
ZeRO-3 is refused at start; `auto` may still profile the kind, and then sees `selective`'s peak.

`mode` (a context-manager factory, e.g. lean.py's `lean_mode`) is entered around the
recompute and around each block's recompute: the recomputed blocks then save what lean mode
saves, so one block's backward peaks lower still.

Cost: the forward, the call's recompute, and every block but the last recomputed again: about
one UNet forward more than `full`.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def unet_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of a diffusers UNet in the order its forward runs them."""
    mid = [unet.mid_block] if getattr(unet, "mid_block", None) is not None else []
    return [*unet.down_blocks, *mid, *unet.up_blocks]


def _no_mode():
    return contextlib.nullcontext()


@contextlib.contextmanager
def checkpointed_modules(modules, mode: Callable | None = None):
    """For the calls made inside: each of `modules` keeps only its inputs for backward and is
    recomputed there (a non-reentrant checkpoint; with `mode`, its forward and recompute both run
    under `mode()`). The checkpoints hold the forward they recompute, so the modules' own forwards
    are restored on exit while their backward is still to come. Used for a nested call's blocks and
    for a reward's layers (recompute.checkpointed_layers)."""
    kwargs = {} if mode is None else {"context_fn": lambda: (mode(), mode())}

    def run(inner, *args, **kw):
        if not torch.is_grad_enabled():
            return inner(*args, **kw)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs, **kw)

    stock = []
    for module in modules:
        inner = module.forward
        stock.append((module, "forward" in vars(module), inner))
        module.forward = functools.partial(run, inner)
    try:
        yield
    finally:
        for module, had_own, inner in reversed(stock):
            if had_own:
                module.forward = inner
            else:
                del module.forward


_into_grad = 0  # > 0 inside param_grads_into_grad(); module-wide: a CUDA backward runs on autograd's device threads
_trim_with: list = []  # the trim function of each trimming_backward() entered, innermost last


@contextlib.contextmanager
def trimming_backward(trim: Callable[[], object]):
    """Checkpointed calls (`nested_call`, `recomputed_call`) made inside call `trim` (the policy's
    heap trim, MemoryPolicy._trim, which trims glibc's heap where the RSS needs it) in their backward:
    after the recompute, before the backward through it, and in a nested call before each block's
    forward and recompute too (a CPU budget of resident memory, MemoryPolicy.trim_heap). Without it
    the freed activations stay resident through the whole backward: measured on tiny-sd at 128 px,
    K=1, a nested call's backward grew the RSS by ~2.1x its tensor peak."""
    _trim_with.append(trim)
    try:
        yield
    finally:
        _trim_with.pop()


def _trimming(mode: Callable, trim: Callable[[], object]) -> Callable:
    """`mode`, with `trim()` called as it is entered."""

    @contextlib.contextmanager
    def trimmed():
        trim()
        with mode():
            yield

    return trimmed


@contextlib.contextmanager
def param_grads_into_grad():
    """For the backward run inside (a `.backward()` into .grad, as the trainer's): nested calls
    accumulate their parameters' gradients into .grad block by block instead of returning them
    all at once (module docstring)."""
    global _into_grad
    _into_grad += 1
    try:
        yield
    finally:
        _into_grad -= 1


def _autocast_states(device: torch.device):
    kinds = dict.fromkeys(["cpu", device.type if device.type in ("cuda", "xpu") else "cpu"])
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


class _NestedCall(torch.autograd.Function):
    """fn(*args) with the two-level recompute of the module docstring. Inputs: (fn, blocks, mode,
    n_args, *args, *params)."""

    @staticmethod
    def forward(ctx, fn, blocks, mode, n_args, *inputs):
        args = inputs[:n_args]
        ctx.fn, ctx.blocks, ctx.mode, ctx.n_args = fn, blocks, mode, n_args
        ctx.trim = _trim_with[-1] if _trim_with else None
        ctx.params = inputs[n_args:]  # referenced, not copied: they are the module's own
        is_tensor = [isinstance(a, torch.Tensor) for a in args]
        ctx.is_tensor = is_tensor
        ctx.constants = [None if t else a for a, t in zip(args, is_tensor)]
        ctx.save_for_backward(*(a for a, t in zip(args, is_tensor) if t))
        device = next((a.device for a, t in zip(args, is_tensor) if t), torch.device("cpu"))
        ctx.device = device
        ctx.autocast = _autocast_states(device)
        # the RNG state the call starts from, so the recompute draws what the forward drew (dropout)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return fn(*args)  # autograd.Function runs forward without a graph

    @staticmethod
    def backward(ctx, grad_out):
        needs = ctx.needs_input_grad[4:]
        saved = iter(ctx.saved_tensors)
        args = []
        for i, is_tensor in enumerate(ctx.is_tensor):
            if is_tensor:
                a = next(saved)
                args.append(a.detach().requires_grad_(needs[i]) if a.is_floating_point() else a)
            else:
                args.append(ctx.constants[i])
        arg_leaves = [a for a, need in zip(args, needs) if need]
        params = [p for p, need in zip(ctx.params, needs[ctx.n_args:]) if need]
        into_grad = _into_grad > 0 and bool(params)
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            stack.enter_context(torch.enable_grad())
            for kind, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            stack.enter_context(ctx.mode())
            trim = ctx.trim
            with checkpointed_modules(ctx.blocks[:-1], _trimming(ctx.mode, trim) if trim else ctx.mode):
                out = ctx.fn(*args)
            if trim is not None:  # the recompute's freed blocks, before the backward through it
                trim()
            if into_grad:
                torch.autograd.backward(out, grad_out, inputs=arg_leaves + params)
                grads = iter([a.grad for a in arg_leaves] + [None] * len(params))
            else:
                wrt = arg_leaves + params
                grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True) if wrt else ())
        del out
        return (None, None, None, None, *(next(grads) if need else None for need in needs))


def _partitioned(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


_warned_partitioned = False


def nested_call(fn: Callable, *args, mode: Callable = _no_mode):
    """fn(*args), a guided UNet call carrying its UNet as `fn.unet`, with block-nested recompute.
    Without grad it is the plain call; a function without a UNet is refused (its blocks and its
    trainable parameters are unknown)."""
    if torch.is_grad_enabled() and getattr(fn, "unet", None) is None:
        raise TypeError("nested recompute needs the UNet call's `fn.unet` (make_eps_fn sets it)")
    return _recomputed(fn, args, mode, nest=True)


def recomputed_call(fn: Callable, *args, mode: Callable = _no_mode):
    """fn(*args) checkpointed as a whole: `_NestedCall` without inner checkpoints, so its backward
    recomputes the call once (under `mode`) and backpropagates through it, as a non-reentrant
    checkpoint would, for the same gradients. What it saves is what such a checkpoint saves (the
    tensor arguments), but its forward runs with no graph at all and its backward through the
    recompute's own graph, where torch's checkpoint runs a Python pack hook on every tensor the
    forward and the recompute save and an unpack hook on every one the backward reads: on the tiny
    UNet at 32 px (LoRA) that was 0.3x of an uncheckpointed call's forward+backward time, per call
    (`recompute.CALL_KINDS`' `full` and `selective`). A function without `fn.unet` (its trainable
    parameters unknown) and ZeRO-3's partitioned parameters take torch's checkpoint instead."""
    if getattr(fn, "unet", None) is None and torch.is_grad_enabled():
        return _torch_checkpoint(fn, args, mode)
    return _recomputed(fn, args, mode, nest=False)


def _torch_checkpoint(fn, args, mode):
    """fn(*args) as torch's non-reentrant checkpoint, forward and recompute under `mode`."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (mode(), mode()))


def _recomputed(fn, args, mode, nest: bool):
    global _warned_partitioned
    if not torch.is_grad_enabled():
        return fn(*args)
    unet = fn.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    if _partitioned(params):
        if nest and not _warned_partitioned:
            _warned_partitioned = True
            logging.getLogger("refl_engine").warning(
                "nested recompute: ZeRO-3 partitions the UNet's parameters; its calls run as one checkpoint "
                "recomputed in lean mode (selective) instead")
        return _torch_checkpoint(fn, args, mode)
    blocks = unet_blocks(unet) if nest else []
    return _NestedCall.apply(fn, blocks, mode, len(args), *args, *params)

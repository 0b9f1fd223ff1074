"""Block-nested recomputation (`--recompute nested`, memory/nested.py): the gradients of `none` for
every method, LoRA and full fine-tuning, alone and chunked; one call's backward peaks below a plain
checkpoint's; nothing of it outlives a window step, so the step's peak is as flat in K as `full`'s."""
import contextlib
import random

import numerics
import pytest
import torch
from test_chunked import GUIDANCE, METHODS, N_STEPS, _conditioning, _step, _tiny
from test_planner import assert_cheapest_plan_that_fits

from refl_engine.memory import measure
from refl_engine.memory import nested as nested_module
from refl_engine.memory.nested import unet_blocks
from refl_engine.memory.recompute import CALL_KINDS, build_policy, chunked
from refl_engine.memory.window import CallProfile
from refl_engine.models.conditioning import make_eps_fn

ONE = {"decode_chunk": 0}  # the decode as one call in every run: only the UNet calls differ

# As tests/memory/test_recompute.py: the nested recompute runs the blocks in lean mode, whose CPU
# GroupNorm is the native op (other summation order), so its float32 gradient may be FACTOR x as far
# from float64 as `none`'s float32 gradient is, plus a floor of ATOL_ULPS float32 ulps of the
# tensor's largest entry. A wrong gradient (a block's backward missed or run twice) is off by O(1).
FACTOR, ATOL_ULPS = 8.0, 8


@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "full_finetune"])
@pytest.mark.parametrize("method", list(METHODS))
def test_nested_gradients_equal_none(method, rank, seed):
    kw = METHODS[method]
    loss64, grads64 = _step(_tiny(seed, rank, torch.float64), kw, build_policy("none", **ONE), seed,
                            dtype=torch.float64)
    models = _tiny(seed, rank, torch.float32)
    ref_loss, ref = _step(models, kw, build_policy("none", **ONE), seed)
    assert any(g.abs().max() > 0 for g in ref)
    for chunk in (0, 1):  # alone, and composed with --recompute_chunk
        loss, got = _step(models, kw, build_policy("nested", recompute_chunk=chunk, **ONE), seed)
        numerics.assert_as_accurate(loss, ref_loss, loss64, factor=FACTOR, atol_scale=ATOL_ULPS,
                                    msg=f"nested@{chunk} loss")
        for i, (gr, r32, r64) in enumerate(zip(got, ref, grads64)):
            numerics.assert_as_accurate(gr, r32, r64, factor=FACTOR, atol_scale=ATOL_ULPS,
                                        msg=f"{method} nested@{chunk} grad {i}")


@pytest.mark.parametrize("method", list(METHODS))
def test_nested_float64_equals_none(method, seed):
    """In float64 (torch's GroupNorm: the native op takes no float64) the nested gradient is
    `none`'s up to float64 rounding: at most FACTOR x float32 `none`'s distance from float64
    scaled by eps64 / eps32, plus ATOL_ULPS float64 ulps of the largest entry."""
    kw = METHODS[method]
    _, ref32 = _step(_tiny(seed, 4, torch.float32), kw, build_policy("none", **ONE), seed)
    models = _tiny(seed, 4, torch.float64)
    _, ref = _step(models, kw, build_policy("none", **ONE), seed, dtype=torch.float64)
    _, got = _step(models, kw, build_policy("nested", **ONE), seed, dtype=torch.float64)
    scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    for i, (gr, r, r32) in enumerate(zip(got, ref, ref32)):
        floor = ATOL_ULPS * torch.finfo(torch.float64).eps * r.abs().max().item()
        allowed = FACTOR * scale * (r32.double() - r).abs().max().item() + floor
        assert (gr - r).abs().max().item() <= allowed, (i, (gr - r).abs().max().item(), allowed)


def _block_runs(kind, unet, params, dtype=torch.float32):
    """How many times each UNet block ran in one grad-carrying `kind` call and its backward, and
    the gradients of that call (input latent and parameters)."""
    blocks = unet_blocks(unet)
    runs = [0] * len(blocks)
    # on each block's first ResNet: a checkpoint recomputes the block's forward, not its __call__
    hooks = [b.resnets[0].register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
             for i, b in enumerate(blocks)]
    try:
        fn = make_eps_fn(unet, _conditioning(0, 2, dtype), GUIDANCE)
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0), dtype=dtype, requires_grad=True)
        grads = torch.autograd.grad(CALL_KINDS[kind](fn, x, torch.tensor(500)).square().sum(), [x, *params])
    finally:
        for h in hooks:
            h.remove()
    return runs, grads


def test_each_block_but_the_last_runs_three_times():
    """One grad-carrying nested call runs every block but the last three times (the forward without
    graph, the call's recompute, the block's own recompute in backward) and the last one twice;
    a `full` call runs each block twice."""
    unet, _, params, _ = _tiny(0, 4, torch.float32)
    n = len(unet_blocks(unet))
    assert _block_runs("full", unet, params)[0] == [2] * n
    assert _block_runs("nested", unet, params)[0] == [3] * (n - 1) + [2]


def test_partitioned_parameters_run_as_one_checkpoint(caplog, monkeypatch):
    """ZeRO-3-partitioned parameters (`ds_id`) cannot be Function inputs: the nested kind then runs
    the call as one checkpoint (each block twice), says so in the log, and its gradients are
    `none`'s (float64)."""
    unet, _, params, _ = _tiny(0, 4, torch.float64)
    _, ref = _block_runs("none", unet, params, torch.float64)
    monkeypatch.setattr(nested_module, "_warned_partitioned", False)
    params[0].ds_id = 0
    try:
        with caplog.at_level("WARNING", logger="refl_engine"):
            runs, got = _block_runs("nested", unet, params, torch.float64)
    finally:
        del params[0].ds_id
    assert runs == [2] * len(runs)
    assert "ZeRO-3 partitions" in caplog.text
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=0, atol=64 * torch.finfo(torch.float64).eps * r.abs().max().item())


def test_nested_call_backward_peak_below_a_plain_checkpoints():
    """Measured on one guided UNet call (CPU tracker): the nested call keeps what `full` keeps (its
    forward is the same call without a graph) and its backward peaks below `selective`'s, which
    peaks below `full`'s; chunked at 1 it peaks at one sample's nested backward plus what
    `chunked_profile` adds for the batch."""
    unet, _, params, _ = _tiny(0, 4, torch.float32)
    fn = make_eps_fn(unet, _conditioning(0, 2, torch.float32), GUIDANCE)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prof = measure.profile_call(fn, [x, torch.tensor(500)], {k: CALL_KINDS[k] for k in ("full", "selective", "nested")})
    full, sel, nested = prof["full"], prof["selective"], prof["nested"]
    assert (nested.retained, nested.fwd_peak) == (full.retained, full.fwd_peak)
    assert nested.bwd_peak < sel.bwd_peak < full.bwd_peak, prof


def _step_peak(models, policy, method_kw, batch=2):
    with measure.LiveBytesTracker(devices={"cpu"}) as tracker:
        _step(models, method_kw, policy, 0, batch=batch)
    return tracker.peak


def test_nested_is_flat_in_K():
    """DRaFT K=1 -> K=N: a nested step's peak grows by what a `full` step's grows by (the window's
    latents: nothing of a nested call is kept across window steps) and stays below it."""
    models = _tiny(0, 4, torch.float32)
    peaks = {}
    for kind in ("full", "nested"):
        for K in ("1", "full"):
            peaks[kind, K] = _step_peak(models, build_policy(kind, **ONE), dict(method="draft", K=K))
    growth = {kind: peaks[kind, "full"] - peaks[kind, "1"] for kind in ("full", "nested")}
    assert growth["nested"] <= growth["full"], (peaks, growth)
    assert peaks["nested", "full"] < peaks["full", "full"], peaks


def test_nested_without_grad_or_unet():
    """Without grad the nested kind is the plain call; a grad-carrying call whose function carries
    no UNet (its blocks and trainable parameters unknown) is refused, not silently checkpointed."""
    def fn(x, t):
        return x * t

    fn.unet = None
    x = torch.arange(6.0).view(3, 2)
    for chunk in (0, 1):
        policy = build_policy("nested", recompute_chunk=chunk)
        with torch.no_grad(), policy.window(1):
            assert torch.equal(policy.unet_call(fn, x, torch.tensor(2.0)), x * 2)
    with pytest.raises(TypeError, match="fn.unet"):
        CALL_KINDS["nested"](fn, x.requires_grad_(), torch.tensor(2.0))


def test_nested_with_zero3_is_refused():
    from refl_engine.config import ConfigError, TrainConfig, set_field, validate

    cfg = TrainConfig()
    for k, v in dict(recompute="nested", zero=3, memory_budget="").items():
        set_field(cfg, k, v)
    with pytest.raises(ConfigError, match="nested.*ZeRO-3"):
        validate(cfg)


def test_plan_window_with_nested_matches_brute_force(seed):
    """plan_window over all five kinds is the cheapest plan that fits, as enumerating every
    sequence of kinds finds it."""
    rng = random.Random(seed)
    for _ in range(20):
        R = rng.randint(500, 1000)
        none = CallProfile(R, R + rng.randint(0, 200), R + rng.randint(50, 300))
        lean = CallProfile(int(R * rng.uniform(0.4, 0.8)), R, R + rng.randint(50, 300))
        full = CallProfile(0, rng.randint(50, 200), none.bwd_peak)
        profiles = dict(none=none, lean=lean, full=full, selective=CallProfile(0, full.fwd_peak, lean.bwd_peak),
                        nested=CallProfile(0, full.fwd_peak, int(lean.bwd_peak * rng.uniform(0.3, 0.9))))
        W, latent, after = rng.randint(1, 5), rng.randint(1, 20), rng.randint(0, 1500)
        assert_cheapest_plan_that_fits(W, profiles, latent, after, available=rng.randint(R // 2, (W + 1) * R + after))


def test_chunked_nested_call_backward_is_one_chunks():
    """At chunk 1 a nested call's backward at batch 4 peaks at batch 1's plus what grows with the
    batch around one chunk (recompute.chunked_profile), to the byte."""
    from refl_engine.memory.recompute import chunked_profile

    unet, _, params, _ = _tiny(0, 4, torch.float32)
    one = {}
    for batch in (1, 4):
        fn = make_eps_fn(unet, _conditioning(0, batch, torch.float32), GUIDANCE)
        x = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        one[batch] = measure.profile_call(fn, [x, torch.tensor(500)], {"nested@1": chunked("nested", 1)})["nested@1"]
    sample = 4 * 16 * 16 * 4
    lora_grads = sum(p.numel() * p.element_size() for p in params)
    want = chunked_profile(one[1], 4, 1, sample, sample, lora_grads)
    assert (one[4].fwd_peak, one[4].bwd_peak) == (want.fwd_peak, want.bwd_peak)


def test_planner_predicts_the_nested_step_within_5_percent():
    """One ReFLTrainer step of DRaFT K=full on tiny-sd under `nested`, alone and at chunk 1: the
    planner (the nested call traced on the meta device, scaled, chunked as the trainer runs it)
    predicts the measured peak (CPU tracker, fresh process) within 5%."""
    from test_chunked import _in_fresh_process

    for batch, chunk in ((2, 0), (4, 1)):
        measured, planned = _in_fresh_process(batch, chunk, 32, 3, 3.0, "nested")
        assert abs(planned - measured) <= 0.05 * measured, (batch, chunk, planned, measured)


def test_auto_nests_when_only_nesting_fits():
    """Batch 1 (chunking cannot help), a budget between the measured peaks of `nested` and
    `selective`: auto's plan checkpoints window steps as `nested`, and the measured step stays
    within the budget."""
    from refl_engine.memory.planner import Planner, PlanSpec

    models = _tiny(0, 4, torch.float32)
    kw = dict(method="draft", K="full")
    nested = _step_peak(models, build_policy("nested"), kw, batch=1)
    selective = _step_peak(models, build_policy("selective"), kw, batch=1)
    assert nested < selective
    reserve = Planner(PlanSpec(model="tiny-sd", mixed_precision="no")).after_window_bytes(1)
    budget = int(nested + 0.3 * (selective - nested))
    policy = build_policy("auto", budget_bytes=budget, reserve_bytes=reserve)
    _step(models, kw, policy, 0, batch=1)  # the first window profiles the kinds
    peak = _step_peak(models, policy, kw, batch=1)
    assert policy.last_plan.fits and "nested" in policy.last_plan.counts, policy.last_plan
    assert peak <= budget, (peak, budget, policy.last_plan.counts)


def test_planner_auto_nests_when_only_nesting_fits():
    """The planner's `auto` at batch 1 under a budget between its `nested` and `selective` peaks:
    a plan with nested steps that fits."""
    from refl_engine.memory.planner import Planner, PlanSpec

    GiB = 2**30
    common = dict(model="tiny-sd", method="draft", K="full", num_inference_steps=4, guidance_scale=3.0, rank=4,
                  mixed_precision="no", batch_size=1, reserve_gb=0.0)
    nested = Planner(PlanSpec(recompute="nested", **common)).peak(1, "nested")[0]
    selective = Planner(PlanSpec(recompute="selective", **common)).peak(1, "selective")[0]
    assert nested < selective
    planner = Planner(PlanSpec(recompute="auto", budget_gb=(nested + 0.3 * (selective - nested)) / GiB, **common))
    peak, plan, _ = planner.peak(1, "auto")
    assert plan.fits and "nested" in plan.counts and peak <= planner.usable_bytes(), plan


def test_full_finetune_gradients_go_into_grad_block_by_block():
    """Full fine-tuning, one guided nested call's .backward() into existing .grad buffers (the
    trainer's steady state): under param_grads_into_grad() the call hands each parameter's gradient
    to its .grad as its block's backward produces it, instead of returning the whole set at once.
    The .grad it leaves is bit-identical (the same sums, in the same order), the latent's gradient
    too, and the backward peaks lower by at least half the trainable parameters' bytes (returned at
    once, all of them are alive beside .grad)."""
    unet, _, params, _ = _tiny(0, 0, torch.float32)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    # one 8x8 sample: the parameters (3.2 MB) outweigh a block's activations, as SD1.5's 3.4 GB do
    fn = make_eps_fn(unet, _conditioning(0, 1, torch.float32), GUIDANCE)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    results = {}
    for into_grad in (False, True):
        for p in params:
            p.grad = torch.full_like(p, 0.5)  # a window's earlier steps already accumulated here
        x = x0.clone().requires_grad_()
        y = CALL_KINDS["nested"](fn, x, torch.tensor(500))
        with measure.LiveBytesTracker(include_existing=False, devices={"cpu"}) as tracker:
            with nested_module.param_grads_into_grad() if into_grad else contextlib.nullcontext():
                y.square().sum().backward()
        results[into_grad] = tracker.peak, x.grad.clone(), [p.grad.clone() for p in params]
    (peak_ret, gx_ret, g_ret), (peak_into, gx_into, g_into) = results[False], results[True]
    assert torch.equal(gx_ret, gx_into)
    for i, (a, b) in enumerate(zip(g_ret, g_into)):
        assert torch.equal(a, b), (i, (a - b).abs().max().item())
    assert any((g - 0.5).abs().max() > 0 for g in g_into)
    print(f"backward peak: returned {peak_ret}, into .grad {peak_into}, parameters {param_bytes} bytes")
    assert peak_ret - peak_into >= param_bytes // 2, (peak_ret, peak_into, param_bytes)


def test_planner_models_nested_under_zero_as_the_trainer_runs_it():
    """As the trainer: `--recompute nested` with ZeRO-3 is refused with the fix named, and under
    ZeRO-3 the planner's nested profile is `selective`'s (nested.py runs the kind as one selective
    checkpoint there), so `auto` never plans on a peak the trainer cannot reach."""
    from refl_engine.config import ConfigError
    from refl_engine.memory.planner import Planner, PlanSpec

    common = dict(model="tiny-sd", method="draft", K="full", num_inference_steps=4, guidance_scale=3.0, rank=4,
                  mixed_precision="no", batch_size=1, reserve_gb=0.0)
    with pytest.raises(ConfigError, match="nested.*ZeRO-3.*selective"):
        Planner(PlanSpec(recompute="nested", zero=3, **common))
    plain = Planner(PlanSpec(recompute="auto", **common)).unet_profiles(2)
    zero3 = Planner(PlanSpec(recompute="auto", zero=3, **common)).unet_profiles(2)
    assert plain["nested"].bwd_peak < plain["selective"].bwd_peak
    assert zero3["nested"] == zero3["selective"] == plain["selective"]
    # ZeRO-1/2: the calls return their parameters' gradients at once (distributed.backward), one
    # set of fp32 gradients more in a call's backward than the block-by-block hand-over
    planner = Planner(PlanSpec(recompute="auto", zero=2, **common))
    zero2 = planner.unet_profiles(2)
    grads = planner.param_counts()["lora"] * 4
    assert zero2["nested"].bwd_peak == plain["nested"].bwd_peak + grads
    assert zero2["selective"] == plain["selective"]

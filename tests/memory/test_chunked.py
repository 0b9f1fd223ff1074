"""Batch-chunked recomputation (`--recompute_chunk`): the same gradients as the whole batch, for
every method, LoRA and full fine-tuning; a checkpointed call's backward peaks at one chunk's."""
import numerics
import pytest
import torch

from refl_engine.config import MethodConfig
from refl_engine.memory import measure
from refl_engine.memory.recompute import CALL_KINDS, build_policy, chunked, chunked_profile
from refl_engine.methods import SamplingChain, build_method
from refl_engine.models.conditioning import Conditioning, make_eps_fn
from refl_engine.sampling import DDIMSchedule
from hang import hang_timeout

N_STEPS, BATCH, GUIDANCE = 3, 3, 3.0


def _tiny(seed, rank, dtype):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from refl_engine.models.load import tiny_sd_configs
    from refl_engine.models.lora import add_lora

    cfgs = tiny_sd_configs()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**cfgs["unet"])
    vae = AutoencoderKL(**cfgs["vae"]).requires_grad_(False)
    if rank:
        params = add_lora(unet, rank=rank)
        for p in params:  # peft's B starts at zero; give the adapters a non-trivial value
            p.data.normal_(0, 0.05)
    else:
        params = list(unet.parameters())
        unet.requires_grad_(True)
    unet.to(dtype), vae.to(dtype)
    return unet, vae, params, DDIMScheduler(**cfgs["scheduler"])


def _conditioning(seed, batch, dtype):
    g = torch.Generator().manual_seed(seed + 1)
    return Conditioning(torch.randn(batch, 77, 32, generator=g).to(dtype),
                        torch.randn(batch, 77, 32, generator=g).to(dtype))


METHODS = {  # the tiny preset's methods, at N_STEPS
    "draft_K_full": dict(method="draft", K="full"),
    "alignprop": dict(method="alignprop", alignprop_k_min=1, alignprop_k_max=N_STEPS),
    "refl": dict(method="refl"),
    "draft_lv": dict(method="draft-lv", lv_inner=2),
}


def _step(models, method_kw, policy, seed, batch=BATCH, dtype=torch.float32, unet_batches=None):
    """Loss and parameter gradients of one training step of the method (its rollout, decode,
    reward, loss), as the trainer composes it."""
    from refl_engine.rewards.toy import Colorfulness

    unet, vae, params, scheduler = models
    method = build_method(MethodConfig(num_inference_steps=N_STEPS, guidance_scale=GUIDANCE, **method_kw))
    schedule = DDIMSchedule.from_scheduler(scheduler, N_STEPS)
    eps_fn = make_eps_fn(unet, _conditioning(seed, batch, dtype), GUIDANCE)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 4, 16, 16, generator=g).to(dtype)
    hook = None
    if unet_batches is not None:  # the batch of every grad-carrying UNet forward
        hook = unet.register_forward_pre_hook(
            lambda m, a: unet_batches.append(a[0].shape[0]) if torch.is_grad_enabled() else None)
    try:
        rollout = method.rollout(SamplingChain(eps_fn, schedule, policy), x_T, g)
        rewards = []
        for x0 in rollout.x0s:
            images = policy.decode_call(lambda z: (vae.decode(z).sample / 2 + 0.5).clamp(0, 1), x0)
            rewards.append(policy.reward_call(Colorfulness(), images, [""] * images.shape[0]))
        loss = method.loss(rewards)
        for p in params:
            p.grad = None
        loss.backward()
    finally:
        if hook is not None:
            hook.remove()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


# As tests/memory/test_recompute.py: a float32 gradient computed another way (here: the batch in
# chunks, so other matrix shapes and summation orders) must be at most FACTOR x as far from the
# float64 result as the unchunked float32 gradient is, plus a floor of a few float32 ulps of the
# tensor's largest entry (a tolerance relative to each value cannot see the cancellation inside a
# gradient). A wrong gradient (a chunk missed, or counted twice) is off by O(1) of its magnitude.
FACTOR, ATOL_ULPS = 4.0, 8


@pytest.mark.parametrize("rank", [4, 0], ids=["lora", "full_finetune"])
@pytest.mark.parametrize("method", list(METHODS))
def test_chunked_gradients_equal_unchunked(method, rank, seed):
    kw = METHODS[method]
    one = {"decode_chunk": 0}  # the decode as one call in every run: only the UNet calls differ
    loss64, grads64 = _step(_tiny(seed, rank, torch.float64), kw, build_policy("full", **one), seed,
                            dtype=torch.float64)
    models = _tiny(seed, rank, torch.float32)
    ref_loss, ref = _step(models, kw, build_policy("full", **one), seed)
    assert any(g.abs().max() > 0 for g in ref)
    for kind, chunk in (("full", 1), ("selective", 2)):
        batches = []
        loss, got = _step(models, kw, build_policy(kind, recompute_chunk=chunk, **one), seed, unet_batches=batches)
        # every grad-carrying UNet forward (and its recompute) saw at most one chunk, CFG-doubled
        assert batches and max(batches) == 2 * chunk, (kind, chunk, batches)
        numerics.assert_as_accurate(loss, ref_loss, loss64, factor=FACTOR, atol_scale=ATOL_ULPS, msg=f"{kind}@{chunk} loss")
        for i, (gr, r32, r64) in enumerate(zip(got, ref, grads64)):
            numerics.assert_as_accurate(gr, r32, r64, factor=FACTOR, atol_scale=ATOL_ULPS,
                                        msg=f"{method} {kind}@{chunk} grad {i}")


@pytest.mark.parametrize("method", ["draft_K_full", "draft_lv"])
def test_chunked_float64_equals_unchunked(method, seed):
    """In float64 the chunked gradient is the unchunked one up to float64 rounding of the regrouped
    sums. How much rounding a gradient amplifies (its cancellation) is measured by the float32 run's
    distance from float64; float64 rounds eps64 / eps32 = 2^-29 as coarsely, so the chunked float64
    gradient may be FACTOR x that scaled distance away, plus a floor of ATOL_ULPS float64 ulps. A
    missed or doubled chunk is ~1e8 x outside this."""
    one = {"decode_chunk": 0}
    kw = METHODS[method]
    _, ref32 = _step(_tiny(seed, 4, torch.float32), kw, build_policy("full", **one), seed)
    models = _tiny(seed, 4, torch.float64)
    _, ref = _step(models, kw, build_policy("full", **one), seed, dtype=torch.float64)
    _, got = _step(models, kw, build_policy("full", recompute_chunk=1, **one), seed, dtype=torch.float64)
    scale = torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
    for i, (gr, r, r32) in enumerate(zip(got, ref, ref32)):
        floor = ATOL_ULPS * torch.finfo(torch.float64).eps * r.abs().max().item()
        allowed = FACTOR * scale * (r32.double() - r).abs().max().item() + floor
        assert (gr - r).abs().max().item() <= allowed, (i, (gr - r).abs().max().item(), allowed)


def test_per_sample_timestep_is_split_with_the_batch(seed):
    """A call with one timestep per sample (the pre-training diffusion loss) chunks its timesteps
    with its latents."""
    unet, _, params, _ = _tiny(seed, 4, torch.float64)
    eps_fn = make_eps_fn(unet, _conditioning(seed, BATCH, torch.float64), 1.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 4, 16, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([100, 500, 900])
    grads = []
    for chunk in (0, 1):
        policy = build_policy("full", recompute_chunk=chunk)
        with policy.window(1):
            loss = policy.unet_call(eps_fn, x, t).square().mean()
        grads.append(torch.autograd.grad(loss, params))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=0, atol=64 * torch.finfo(torch.float64).eps * b.abs().max().item())


def test_chunked_call_backward_peak_is_one_chunks():
    """Measured on one guided UNet call: at chunk 1 the backward peak at batch 8 is batch 1's plus
    the whole output's gradient, the finished chunks' input gradients and the summed parameter
    gradients (chunked_profile), byte for byte; unchunked, it is ~8x batch 1's."""
    unet, _, params, _ = _tiny(0, 4, torch.float32)
    t = torch.tensor(500)
    one = {}
    for batch in (1, 8):
        fn = make_eps_fn(unet, _conditioning(0, batch, torch.float32), GUIDANCE)
        x = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        one[batch] = measure.profile_call(fn, [x, t], {"full": CALL_KINDS["full"], "full@1": chunked("full", 1),
                                                        "selective@1": chunked("selective", 1)})
    sample = 4 * 16 * 16 * 4  # output and input gradient of one sample
    lora_grads = sum(p.numel() * p.element_size() for p in params)
    for kind in ("full", "selective"):
        want = chunked_profile(one[1][f"{kind}@1"], 8, 1, sample, sample, lora_grads)
        got = one[8][f"{kind}@1"]
        assert (got.fwd_peak, got.bwd_peak) == (want.fwd_peak, want.bwd_peak), kind
    assert one[8]["full"].bwd_peak > 7 * one[8]["full@1"].bwd_peak


def test_chunk_on_a_policy_that_checkpoints_nothing_is_refused():
    from refl_engine.config import ConfigError, TrainConfig, set_field, validate

    cfg = TrainConfig()
    set_field(cfg, "recompute", "lean")
    set_field(cfg, "recompute_chunk", 2)
    with pytest.raises(ConfigError, match="recompute_chunk"):
        validate(cfg)


def _trainer_step_peak(batch, chunk, resolution, steps, guidance, recompute="full"):
    """Measured peak bytes (CPU tracker) of one ReFLTrainer step of DRaFT K=full on tiny-sd, after
    a warm-up step (optimizer state exists), and the planner's prediction of the same run."""
    import tempfile

    from refl_engine.config import TrainConfig, set_field, validate
    from refl_engine.memory.planner import Planner, PlanSpec
    from refl_engine.trainer import ReFLTrainer

    common = dict(model="tiny-sd", resolution=resolution, method="draft", K="full", num_inference_steps=steps,
                  guidance_scale=guidance, rank=4, mixed_precision="no", recompute=recompute, recompute_chunk=chunk,
                  reward="colorfulness")
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig()
        for k, v in dict(common, train_batch_size=batch, seed=0, max_train_steps=10, output_dir=out, progress=False,
                         num_sample_images=1).items():
            set_field(cfg, k, v)
        validate(cfg)
        trainer = ReFLTrainer(cfg).setup()
        trainer.train_step()
        _, peak = measure.measure_peak(trainer.train_step, "cpu")
    spec = PlanSpec(**{k: v for k, v in common.items() if k != "num_inference_steps"}, num_inference_steps=steps,
                    batch_size=batch, optimizer="adamw", budget_gb=1.0, reserve_gb=0.0, use_cache=False)
    return peak.peak_bytes, Planner(spec).plan().peak_bytes


def _in_fresh_process(*args):
    """_trainer_step_peak in its own interpreter: the tracker counts every live tensor of the
    process, and a trainer built earlier in the same process is not always collected."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = ("import json, torch; torch.set_num_threads(1); from test_chunked import _trainer_step_peak; "
            f"print('RESULT', json.dumps(_trainer_step_peak{args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=hang_timeout(900))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_chunk_1_peak_grows_only_by_latents_and_outputs_and_planner_agrees():
    """DRaFT K=full at chunk 1, batch 1 -> 8: the step's measured peak grows by at most what must
    grow with the batch, per added sample: its N + 1 trajectory latents; the latent-sized
    gradients in flight in one window step's backward (the step's incoming gradient, the UNet
    output's, the input's through the DDIM update, the chunks' input gradients and their sum: 5);
    the decoded fp32 image and its gradient; its prompt's embedding. Unchunked, one call's
    recompute alone grows by ~7x batch 1's. The planner predicts both peaks within 5%."""
    res, steps, guidance = 32, 3, 3.0
    latent = 4 * (res // 2) ** 2 * 4  # tiny-sd: VAE factor 2, fp32
    image = 3 * res * res * 4
    embedding = 77 * 32 * 4
    per_sample = (steps + 1 + 5) * latent + 2 * image + embedding
    measured1, planned1 = _in_fresh_process(1, 1, res, steps, guidance)
    measured8, planned8 = _in_fresh_process(8, 1, res, steps, guidance)
    assert measured8 - measured1 <= 7 * per_sample, (measured1, measured8, per_sample)
    for measured, planned in ((measured1, planned1), (measured8, planned8)):
        assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


def test_auto_picks_a_chunk_and_stays_within_budget():
    """A budget between the measured peaks of `full` at chunk 1 and the lowest unchunked kind's
    (`nested` here): no plan of whole-batch calls fits, so auto chunks its checkpointed calls (the
    largest chunk that fits) and the measured step stays within the budget."""
    from refl_engine.memory.planner import Planner, PlanSpec

    batch = 4
    models = _tiny(0, 4, torch.float32)
    kw = METHODS["draft_K_full"]

    def measured_peak(policy):
        with measure.LiveBytesTracker(devices={"cpu"}) as tracker:
            _step(models, kw, policy, 0, batch=batch)
        return tracker.peak

    chunk1 = measured_peak(build_policy("full", recompute_chunk=1))
    whole = min(measured_peak(build_policy(kind)) for kind in ("full", "selective", "nested"))
    assert whole > 1.4 * chunk1, (whole, chunk1)
    reserve = Planner(PlanSpec(model="tiny-sd", mixed_precision="no")).after_window_bytes(batch)
    budget = int(chunk1 + 0.3 * (whole - chunk1))
    policy = build_policy("auto", budget_bytes=budget, reserve_bytes=reserve)
    _step(models, kw, policy, 0, batch=batch)  # the first window profiles each kind on the whole batch
    peak = measured_peak(policy)
    assert 1 <= policy.chunk < batch and policy.last_plan.fits, (policy.chunk, policy.last_plan)
    assert peak <= budget, (peak, budget, policy.chunk, policy.last_plan.counts)


@pytest.mark.parametrize("kind", ["full", "selective"])
def test_checkpointed_kinds_without_grad_just_call(kind):
    """Without grad a checkpointed kind (chunked or not) is the plain call: the checkpoint's own
    options never reach `fn`."""
    def fn(x, t):
        return x * t

    fn.unet = None
    x = torch.arange(6.0).view(3, 2)
    for chunk in (0, 1):
        policy = build_policy(kind, recompute_chunk=chunk)
        with torch.no_grad(), policy.window(1):
            assert torch.equal(policy.unet_call(fn, x, torch.tensor(2.0)), x * 2)


def test_planner_auto_picks_the_largest_chunk_that_fits():
    """The planner's `auto` with no chunk given, under a budget between the chunk-1 and the
    whole-batch checkpointed peaks: it picks a chunk, fits, and the next larger chunk would not."""
    from refl_engine.memory.planner import Planner, PlanSpec

    batch, GiB = 8, 2**30
    common = dict(model="tiny-sd", method="draft", K="full", num_inference_steps=4, guidance_scale=3.0, rank=4,
                  mixed_precision="no", batch_size=batch, reserve_gb=0.0)
    one = Planner(PlanSpec(recompute="selective", recompute_chunk=1, **common)).peak(batch, "selective")[0]
    whole = Planner(PlanSpec(recompute="selective", **common)).peak(batch, "selective")[0]
    budget = one + 0.4 * (whole - one)
    planner = Planner(PlanSpec(recompute="auto", budget_gb=budget / GiB, **common))
    peak, plan, _ = planner.peak(batch, "auto")
    assert plan.fits and peak <= planner.usable_bytes() and 1 <= plan.recompute_chunk < batch
    bigger = Planner(PlanSpec(recompute="auto", budget_gb=budget / GiB, recompute_chunk=plan.recompute_chunk + 1,
                              **common))
    assert not bigger.peak(batch, "auto")[1].fits


def test_planner_counts_the_zero3_hold_of_a_chunked_call():
    """Under ZeRO-3 a chunked call keeps the whole partitioned UNet gathered through its forward and
    its backward (distributed.Zero3Hold): the planner adds what that holds beyond the live
    parameters it already counts, to chunked calls only, and nothing under LoRA (whose frozen UNet
    it counts resident)."""
    from refl_engine.memory.meta import dtype_of
    from refl_engine.memory.planner import Planner, PlanSpec

    common = dict(model="tiny-sd", method="draft", K="full", num_inference_steps=4, guidance_scale=3.0, rank=0,
                  mixed_precision="no", batch_size=4, reserve_gb=0.0, recompute="full")
    planner = Planner(PlanSpec(recompute_chunk=1, zero=3, offload="param", **common))
    state = planner.state_bytes()
    whole = planner.param_counts()["unet"] * dtype_of("no").itemsize
    assert planner.zero3_held_bytes(state) == whole - state["zero3_live_params"]
    assert planner.zero3_held_bytes({"zero3_live_params": 0}) == whole
    assert planner.zero3_held_bytes({"params": 1}) == 0  # no ZeRO-3 partitioning, no hold
    assert Planner(PlanSpec(**dict(common, rank=4), zero=3, offload="param")).zero3_held_bytes(
        {"zero3_live_params": 0}) == 0
    for chunk, added in ((1, whole), (0, 0)):  # whole batch: nothing held
        p = Planner(PlanSpec(**dict(common, recompute_chunk=chunk)))
        window = p.spec.window_size()
        base = p.activation_plan(4, "full", window)[0].peak
        assert p.activation_plan(4, "full", window, held=whole)[0].peak == base + added

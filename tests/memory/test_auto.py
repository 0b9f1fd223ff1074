"""`--recompute auto`, the default: its budget (given, or the device's free memory), the fastest plan
that fits it (decode and reward checkpointing included), and one line when nothing fits."""
import dataclasses

import pytest
import torch

from refl_engine.config import ConfigError
from refl_engine.memory import measure, planner
from refl_engine.memory import recompute
from refl_engine.memory.recompute import AutoRecompute, build_policy, device_budget
from refl_engine.sampling import DDIMSchedule, Window, run_trajectory

GiB = 2**30
N_STEPS = 3


def _simulated_gpu(monkeypatch, free, total, reserved, allocated):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)


def test_gpu_budget_is_free_memory_less_a_margin(monkeypatch):
    """80 GiB device, 30 GiB free to the driver, 6 GiB cached by torch of which 5 GiB hold tensors:
    the step may use the 5 GiB live + 30 + 1 GiB cached-but-unused, less max(1 GiB, 5% of 80 GiB)."""
    _simulated_gpu(monkeypatch, free=30 * GiB, total=80 * GiB, reserved=6 * GiB, allocated=5 * GiB)
    budget, how = device_budget("cuda:0")
    assert budget == (5 + 30 + 1 - 4) * GiB and "free GPU memory" in how
    policy = AutoRecompute(device=torch.device("cuda", 0))
    assert policy.memory_budget == budget and "free GPU memory" in policy.budget_source
    # a small device: the margin is the 1 GiB floor
    _simulated_gpu(monkeypatch, free=10 * GiB, total=12 * GiB, reserved=0, allocated=0)
    assert device_budget("cuda")[0] == 9 * GiB


def test_explicit_budget_overrides_the_device(monkeypatch):
    def unread(*args, **kwargs):
        raise AssertionError("the device's free memory was read although --memory_budget was given")

    monkeypatch.setattr(torch.cuda, "mem_get_info", unread)
    monkeypatch.setattr(recompute, "_host_available", unread)
    for device in ("cuda", "cpu"):
        policy = AutoRecompute(budget_bytes="3GB", device=device)
        assert policy.memory_budget == 3 * 10**9 and policy.budget_source == "--memory_budget 3GB"


def test_cpu_budget_is_available_ram_less_a_margin(monkeypatch):
    monkeypatch.setattr(recompute, "_host_available", lambda: (10 * GiB, 24 * GiB))
    budget, how = device_budget("cpu")
    assert budget == 9 * GiB and "available RAM" in how  # no tracker: the budget is the window's alone
    with measure.LiveBytesTracker(include_existing=False) as tracker:
        keep = torch.zeros(1 << 20)  # 4 MiB live: counted in the budget, as AutoRecompute subtracts it
        assert device_budget("cpu")[0] == 9 * GiB + tracker.live
        del keep


def test_host_available_reads_the_kernels_count():
    """MemAvailable of /proc/meminfo, as psutil reads it (both move with the other processes: a
    loose bound around two reads close in time)."""
    psutil = pytest.importorskip("psutil")
    available, total = recompute._host_available()
    vm = psutil.virtual_memory()
    assert total == vm.total
    assert abs(available - vm.available) <= 0.05 * vm.total, (available, vm.available)


# ------------------------------------------------------------------ a step on the tiny preset

def _tiny():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from refl_engine.models.load import tiny_sd_configs
    from refl_engine.models.lora import add_lora

    cfgs = tiny_sd_configs()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfgs["unet"])
    vae = AutoencoderKL(**cfgs["vae"]).requires_grad_(False)
    params = add_lora(unet, rank=4)
    for p in params:
        p.data.normal_(0, 0.05)
    return unet, vae, params, DDIMScheduler(**cfgs["scheduler"])


def _step(policy, models, batch=2):
    from refl_engine.models.conditioning import Conditioning, make_eps_fn
    from refl_engine.rewards.toy import Colorfulness

    unet, vae, params, scheduler = models
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(batch, 4, 16, 16, generator=g)
    cond = Conditioning(torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g))
    x0 = run_trajectory(make_eps_fn(unet, cond, 3.0), DDIMSchedule.from_scheduler(scheduler, N_STEPS), x_T,
                        Window([0] * batch), policy)
    images = policy.decode_call(lambda z: (vae.decode(z).sample / 2 + 0.5).clamp(0, 1), x0)
    loss = -policy.reward_call(Colorfulness(), images, [""] * batch).mean()
    for p in params:
        p.grad = None
    loss.backward()


def _measured_peak(policy, models):
    with measure.LiveBytesTracker(devices={"cpu"}) as tracker:
        _step(policy, models)
    return tracker.peak


def _reserves(batch=2):
    """What the trainer passes: the planner's decode + reward bytes for each way of running them."""
    return {(d, r): planner.Planner(planner.PlanSpec(model="tiny-sd", mixed_precision="no", checkpoint_decode=d,
                                                     checkpoint_reward=r)).after_window_bytes(batch)
            for d in (False, True) for r in (False, True)}


def test_auto_is_the_fastest_plan_that_fits_and_stays_within_budget():
    """With memory to spare auto keeps everything (only `none` is profiled) and checkpoints neither
    the decode nor the reward; under a budget between the smallest and the largest measured peaks
    it checkpoints some calls, and the measured peak stays within that budget."""
    models = _tiny()
    _step(build_policy("none"), models)  # warm-up: the first call's one-off allocations
    smallest = _measured_peak(build_policy("full"), models)
    largest = _measured_peak(build_policy("none", checkpoint_decode=False, checkpoint_reward=False), models)
    assert largest > 1.5 * smallest

    spare = build_policy("auto", budget_bytes=2 * largest, reserve_bytes=_reserves())
    _step(spare, models)
    assert set(spare.last_plan.kinds) == {"none"} and set(spare._profiles[next(iter(spare._profiles))]) == {"none"}
    assert not spare.checkpoint_decode and not spare.checkpoint_reward

    budget = int(smallest + 0.4 * (largest - smallest))
    tight = build_policy("auto", budget_bytes=budget, reserve_bytes=_reserves())
    peak = _measured_peak(tight, models)
    assert tight.last_plan.fits and peak <= budget, (peak, budget, tight.last_plan.counts, tight.checkpoint_decode)
    assert set(tight.last_plan.kinds) != {"none"}


def test_a_budget_nothing_fits_is_one_line_naming_the_flag():
    models = _tiny()
    policy = build_policy("auto", budget_bytes="1KB", reserve_bytes=_reserves())
    with pytest.raises(ConfigError) as e:
        _step(policy, models)
    text = str(e.value)
    assert "\n" not in text and text.startswith("--memory_budget: one training step does not fit") \
        and "--memory_budget 1KB" in text, text


def test_the_trainer_defaults_to_auto_on_the_devices_memory(tiny_sd_dir, tmp_path, monkeypatch):
    """No flags: `auto`, budgeted from the available RAM read once at set-up; the tiny preset has
    memory to spare, so the plan is `none` with nothing checkpointed."""
    from engine_config import make_config
    from refl_engine.trainer import ReFLTrainer

    reads = []
    monkeypatch.setattr(recompute, "_host_available", lambda: reads.append(1) or (8 * GiB, 24 * GiB))
    trainer = ReFLTrainer(make_config(tmp_path, num_inference_steps=3)).setup()
    assert trainer.cfg.memory.recompute == "auto" and isinstance(trainer.policy, AutoRecompute)
    assert trainer.policy.memory_budget == 8 * GiB - int(0.1 * 8 * GiB) and "available RAM" in trainer.policy.budget_source
    trainer.micro_step(trainer.prompts[:2])
    assert set(trainer.policy.last_plan.kinds) == {"none"} and len(reads) == 1
    assert not trainer.policy.checkpoint_decode and not trainer.policy.checkpoint_reward


def test_the_planner_chooses_decode_and_reward_checkpointing_as_auto_does():
    """refl-plan's `auto` makes the trainer's choice: with memory to spare decode and reward are kept
    (nothing recomputed); with a budget at the smallest fixed-policy peak it still fits, and what it
    keeps of decode and reward is what that budget allows."""
    from refl_engine.memory.planner import Planner, PlanSpec

    common = dict(model="tiny-sd", mixed_precision="no", batch_size=2, guidance_scale=3.0, num_inference_steps=4,
                  recompute="auto", reserve_gb=0.0)
    planner = Planner(PlanSpec(budget_gb=64, **common))
    _, spare, _ = planner.peak(2, "auto")
    assert spare.fits and set(spare.kinds) == {"none"}
    assert not spare.checkpoint_decode and not spare.checkpoint_reward
    assert planner.after_window_bytes(2, True, True) < planner.after_window_bytes(2, False, False)
    lowest = min(planner.peak(2, k)[0] for k in ("full", "selective"))  # decode and reward recomputed
    tight = Planner(PlanSpec(budget_gb=lowest / GiB, **common))
    peak, wplan, parts = tight.peak(2, "auto")
    assert wplan.fits and peak <= lowest, (peak, lowest, wplan.counts)
    assert parts["after"] == tight.after_window_bytes(2, wplan.checkpoint_decode, wplan.checkpoint_reward)


def test_full_finetune_plans_stay_within_budget_gradients_included():
    """Full fine-tuning: every UNet weight gets a gradient (3.2 MB here), allocated during the
    backward (the trainer zeroes with set_to_none), on top of the activations of the window call
    being backpropagated. auto profiles each call's backward into scratch .grad buffers (its peak:
    the activations alone) and adds the gradients to every backward peak. Over budgets from the
    nested policy's measured peak to well below keeping everything, the plan's measured peak (the
    second step: the first also runs the profile) stays within the budget. Before, with the
    gradients left out, 5 of these 8 budgets were exceeded, by up to 29%."""
    from refl_engine.models.patch import patch

    unet, vae, _, scheduler = _tiny()
    patch(vae, "torch", attention=False)  # as the trainer places it: the decode runs lean, as planned
    unet.requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    models = (unet, vae, params, scheduler)

    def second_step_peak(policy):
        for p in params:  # as after the trainer's zero_grad(set_to_none=True)
            p.grad = None
        _step(policy, models)
        for p in params:
            p.grad = None
        return _measured_peak(policy, models)

    _step(build_policy("none"), models)
    nested = second_step_peak(build_policy("nested"))
    full = second_step_peak(build_policy("full"))
    assert full > 1.3 * nested
    kinds = set()
    for budget in [int(nested * f) for f in (1.0, 1.05, 1.1)] + [int(full * f) for f in (0.85, 0.9, 0.95, 1.1, 1.3)]:
        policy = build_policy("auto", budget_bytes=budget, reserve_bytes=_reserves())
        peak = second_step_peak(policy)
        assert policy.last_plan.fits and peak <= budget, (peak, budget, policy.last_plan.counts)
        kinds |= set(policy.last_plan.kinds)
    assert {"nested", "full", "none"} <= kinds, kinds  # the sweep crossed the policies


_RSS_STEP = r"""
import ctypes, gc, json, sys, tempfile
import torch
from refl_engine.config import TrainConfig, set_field, validate
from refl_engine.memory import measure
from refl_engine.trainer import ReFLTrainer

torch.set_num_threads(1)
budget, K, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
with tempfile.TemporaryDirectory() as out:
    cfg = TrainConfig()
    for name, v in dict(model="tiny-sd", method="draft", K=K, num_inference_steps=20, guidance_scale=5.0,
                        train_batch_size=2, resolution=64, rank=4, reward="colorfulness", recompute="auto",
                        memory_budget=budget, seed=0, output_dir=out, progress=False).items():
        set_field(cfg, name, v)
    validate(cfg)
    trainer = ReFLTrainer(cfg).setup()
    rows = []
    for _ in range(steps):
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before, file = measure.status_kib("VmRSS"), measure.status_kib("RssFile")
        trims = trainer.policy.trims[:]
        assert measure.reset_peak_rss()
        trainer.train_step()
        peak = measure.status_kib("VmHWM")
        p = trainer.policy
        rows.append(dict(delta=(peak - before) * 1024, file=(measure.status_kib("RssFile") - file) * 1024,
                         planned=p.last_plan.peak, counts=p.last_plan.counts, allocator=p.allocator,
                         trim_heap=p.trim_heap, threshold=measure.malloc_mmap_threshold(),
                         trims=[a - b for a, b in zip(p.trims, trims)]))
    print(json.dumps(rows))
"""


@pytest.mark.skipif(not measure.has_glibc_malloc() or measure.status_kib("VmHWM") is None
                    or not measure.reset_peak_rss(), reason="needs glibc's malloc and /proc's peak-RSS counter")
def test_cpu_budget_bounds_the_resident_memory_of_a_step(tmp_path):
    """On a CPU `--memory_budget` is the step's resident memory, not the tensor bytes the plan
    counts. tiny-sd at 64 px, draft K=full, batch 2, in a fresh process, budget 1000 MiB (keeping
    everything would grow the RSS by ~2 GB): under glibc's untouched allocator the plan of 973 MB of
    tensors the budget used to buy grew the RSS by 1644 MB, and a plan of 376 MB (budget / 2.5) still
    by ~1009 MB. auto now trims the heap at every call boundary, after which the RSS follows the
    tensors, and plans at budget / 1.15 (at budget / 1.1: 944 MB planned, 1040 MB measured, 1% under
    the budget); with the running call counted at its measured RSS factor, 897 MB planned, 968 MB
    measured (the first step, 25 MB of it torch's code mapped in). Trimmed lazily (a boundary trims
    only when the RSS would pass the plan's limit): 10 of 47 boundaries trimmed, 898 MB planned,
    970 MB measured."""
    budget = 1000 * 2**20
    r, = _rss_step(budget, "full")
    assert r["allocator"] == "trim" and r["trim_heap"] and r["threshold"] is None, r
    assert r["planned"] <= budget / recompute.TRIM_RSS_FACTOR and set(r["counts"]) != {"none"}, r
    assert r["trims"][1] > 0, r  # the budget held with trims skipped
    assert r["delta"] <= budget, r


def _rss_step(budget: int, K: str, steps: int = 1) -> list[dict]:
    """Train `steps` steps in a fresh process under `--memory_budget budget`; per step: `delta`, its
    peak RSS over the RSS before it (glibc's heap trimmed), `file`, the file-backed pages it added to
    the RSS (library code run for the first time), and the plan."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run([sys.executable, "-c", _RSS_STEP, str(budget), K, str(steps)], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not measure.has_glibc_malloc() or measure.status_kib("VmHWM") is None
                    or not measure.reset_peak_rss(), reason="needs glibc's malloc and /proc's peak-RSS counter")
def test_cpu_budget_bounds_the_resident_memory_of_a_one_call_window():
    """The same at K=1 (one grad-carrying call), budget 100 MiB, two steps. A trimmed heap holds what
    the running call freed since the last trim: a kept call's forward grew the RSS by ~1.45x the
    tensors it kept (64 px), so a plan that counted tensors alone (`none`, 81 MB) grew the RSS by
    ~105 MiB a step. auto now counts the running call's peaks (and the decode's and reward's) at the
    RSS factor its `none` profile measures (~1.48 here) and plans `lean`: 83 MiB planned, 82-88 MiB
    measured a step. The first step also maps in ~22 MiB of torch's code the first backward runs
    (file-backed pages, the `file` column): its anonymous memory is what the budget bounds. Trimmed
    lazily, 3 of the step's 7 boundaries trim, and the second step grew the RSS by 86 MiB."""
    budget = 100 * 2**20
    first, second = _rss_step(budget, "1", steps=2)
    for r in (first, second):
        assert r["allocator"] == "trim" and r["trim_heap"], r
        assert r["planned"] <= budget / recompute.TRIM_RSS_FACTOR, r
        assert r["trims"][1] > 0, r
    assert first["delta"] - first["file"] <= budget, first
    assert second["delta"] <= budget, second
    assert second["delta"] >= 0.75 * second["planned"], second  # the plan models the step, not a wide margin


@pytest.mark.skipif(not measure.has_glibc_malloc() or measure.status_kib("VmHWM") is None
                    or not measure.reset_peak_rss(), reason="needs glibc's malloc and /proc's peak-RSS counter")
def test_cpu_budget_bounds_a_recomputed_one_call_window():
    """K=1 at 70 MiB, where the plan recomputes the call (`nested`, 58 MB planned). A checkpointed
    call's backward trims the heap after its recompute, and a nested one before each block's
    forward and recompute: without those trims the second step grew the RSS by 77-82 MiB, with
    them by 61-62 MiB (at 128 px and 300 MiB: 325-330 MiB, then 239-245 MiB). Only the second step
    is held to the budget here: the first step's profile runs one sample's call unchecked whatever
    the budget (~57 MiB of RSS at 64 px) beside the ~24 MiB of torch's code it maps in, which
    reached 69 MiB of 70."""
    budget = 70 * 2**20
    first, second = _rss_step(budget, "1", steps=2)
    assert second["allocator"] == "trim" and set(second["counts"]) & {"full", "selective", "nested"}, second
    assert second["delta"] <= budget, second
    assert second["delta"] >= 0.75 * second["planned"], second


@pytest.mark.skipif(measure.status_kib("VmRSS") is None, reason="needs /proc's RSS counter")
def test_trimmed_plan_counts_the_running_call_at_its_measured_rss_factor(monkeypatch):
    """A trimmed plan counts the running call's peaks (and the decode's and reward's) at the RSS
    factor the `none` profile measured, what earlier calls keep at their tensor bytes. With the
    factor stubbed (1.0, then 2.0) under a budget of 1.5x the keep-everything plan's tensors: at
    1.0 `none` fits the trimmed budget; at 2.0 its running call no longer does and the plan
    recomputes. Only the trimmed plan asks for the measurement (`resident`)."""
    monkeypatch.setattr(measure, "malloc_mmap_threshold", lambda: None)
    monkeypatch.setattr(measure, "trim_heap", lambda: True)
    models = _tiny()
    _step(build_policy("none"), models)
    roomy = build_policy("auto", budget_bytes=64 * GiB, reserve_bytes=_reserves())
    _step(roomy, models)
    keep_all = roomy.last_plan.peak
    assert set(roomy.last_plan.kinds) == {"none"}
    profile_call = measure.profile_call
    for factor, recomputes in ((1.0, False), (2.0, True)):
        asked = []

        def stub(*a, resident=False, **k):
            asked.append(resident)
            got = profile_call(*a, resident=False, **k)
            if resident and "none" in got:
                got["none"] = dataclasses.replace(got["none"], rss_factor=factor)
            return got

        monkeypatch.setattr(measure, "profile_call", stub)
        policy = build_policy("auto", budget_bytes=int(1.5 * keep_all), reserve_bytes=_reserves(), host_rss=True)
        _step(policy, models)
        assert policy.allocator == "trim" and True in asked, (policy.allocator, asked)
        plan = policy.last_plan
        assert plan.fits and plan.peak <= 1.5 * keep_all / recompute.TRIM_RSS_FACTOR, plan
        assert (plan.recompute_cost > 0) == recomputes, (factor, plan)


@pytest.mark.skipif(measure.status_kib("VmRSS") is None, reason="needs /proc's RSS counter")
def test_trimmed_plan_trims_lazily_within_its_limit(monkeypatch):
    """A trimmed auto plan trims once as its window opens and measures the step's RSS from there
    (`rss_limit` = that RSS + the budget it planned in); every later boundary trims only when the
    RSS now plus what the next call may add (its forward or backward peak as the plan counts it,
    the decode's and reward's reserve) would pass that limit. The RSS is stubbed: held where the
    window opened, no boundary trims; past the limit, every one does, as with `lazy_trim` off."""
    monkeypatch.setattr(measure, "malloc_mmap_threshold", lambda: None)
    trims, rss = [], {"kib": 1 << 20}
    monkeypatch.setattr(measure, "trim_heap", lambda: trims.append(1) or True)
    status_kib = measure.status_kib
    monkeypatch.setattr(measure, "status_kib", lambda f: rss["kib"] if f == "VmRSS" else status_kib(f))
    models = _tiny()
    _step(build_policy("none"), models)
    roomy = build_policy("auto", budget_bytes=64 * GiB, reserve_bytes=_reserves())
    _step(roomy, models)
    budget = int(1.5 * roomy.last_plan.peak)
    boundaries = 2 * (N_STEPS + 2)  # each window call, the decode and the reward: forward and backward
    for lazy, grown, made in ((True, 0, 1), (True, budget, 1 + boundaries), (False, 0, boundaries)):
        policy = build_policy("auto", budget_bytes=budget, reserve_bytes=_reserves(), host_rss=True)
        policy.lazy_trim = lazy
        _step(policy, models)  # plans (its profile trims too)
        assert policy.allocator == "trim" and set(policy.last_plan.kinds) == {"none"}, policy.last_plan
        ahead = policy._lookahead
        assert set(ahead) == {"none", "after"} and 0 < max(max(v) for v in ahead.values()) <= policy.last_plan.peak
        assert policy.rss_limit == ((1 << 30) + int(budget / recompute.TRIM_RSS_FACTOR) if lazy else None)
        trims.clear()
        done = policy.trims[:]
        rss["kib"] = 1 << 20
        real = policy._make_plan

        def grow(*a):  # the window opens at 1 GiB of RSS, then the RSS is `grown` above it
            real(*a)
            rss["kib"] += grown // 1024

        policy._make_plan = grow
        _step(policy, models)
        assert len(trims) == made, (lazy, grown, len(trims))
        assert policy.trims == [done[0] + made, done[1] + lazy + boundaries - made], policy.trims


def test_cpu_budget_with_room_keeps_the_default_allocator(monkeypatch):
    """With memory to spare the fast plan runs under glibc's default allocator as it is: the heap,
    whose trimming costs CPU time, is left alone."""
    trims = []
    monkeypatch.setattr(measure, "trim_heap", lambda: trims.append(1) or True)
    monkeypatch.setattr(measure, "malloc_mmap_threshold", lambda: None)
    unet, vae, params, scheduler = _tiny()
    policy = build_policy("auto", budget_bytes=64 * GiB, reserve_bytes=_reserves(), host_rss=True)
    _step(policy, (unet, vae, params, scheduler))
    assert policy.allocator == "heap" and set(policy.last_plan.kinds) == {"none"} and not policy.trim_heap
    assert not trims


@pytest.mark.parametrize("kind", ["full", "nested"])
def test_trimmed_policy_trims_at_every_call_boundary(monkeypatch, kind):
    """`trim_heap`: the heap is trimmed before each window call, the decode and the reward, and
    again before each of their backwards (a hook on the output); inside a checkpointed call's
    backward once more after its recompute, and in a nested call before each checkpointed
    block's forward and recompute; the gradients are untouched."""
    from refl_engine.memory.nested import unet_blocks

    trims = []
    monkeypatch.setattr(measure, "trim_heap", lambda: trims.append(1) or True)
    models = _tiny()
    grads = {}
    for trim in (False, True):
        policy = build_policy(kind)
        policy.trim_heap = trim
        trims.clear()
        _step(policy, models)
        grads[trim] = [p.grad.clone() for p in models[2]]
        for p in models[2]:
            p.grad = None
        calls = len(trims)
    window = N_STEPS  # _step: every step in the window, then one decode and one reward
    per_backward = 1 + (2 * (len(unet_blocks(models[0])) - 1) if kind == "nested" else 0)
    assert calls == 2 * (window + 2) + window * per_backward, calls
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_auto_profiles_one_sample_and_scales_it_to_the_batch(monkeypatch):
    """auto's first-step profile runs one sample's call (its CFG pair together), not the whole
    batch: an unchecked call at the batch the plan is for could itself exhaust the memory. Scaled to
    the batch it matches a whole-batch profile of the same call (activations are per sample).
    Measured at batch 4: bytes kept and forward peaks equal to the byte; every kind's backward
    peak 117 KiB (0.3%) under the whole batch's."""
    from refl_engine.models.conditioning import Conditioning, make_eps_fn

    unet, vae, params, scheduler = _tiny()
    seen = []
    profile_call = measure.profile_call
    monkeypatch.setattr(measure, "profile_call", lambda fn, args, *a, **k: seen.extend(
        v.shape[0] for v in args if isinstance(v, torch.Tensor) and v.dim()) or profile_call(fn, args, *a, **k))
    policy = build_policy("auto", budget_bytes=64 * GiB, reserve_bytes=_reserves())
    _step(policy, (unet, vae, params, scheduler), batch=4)
    assert seen and set(seen) == {1}, seen  # every kind profiled (and any window shape) at one sample

    g = torch.Generator().manual_seed(1)
    batch = 4
    x = torch.randn(batch, 4, 16, 16, generator=g)
    cond = Conditioning(torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 77, 32, generator=g))
    fn, t = make_eps_fn(unet, cond, 3.0), torch.tensor(500)
    seen.clear()  # a per-sample timestep (an unguided call) is cut with the latents, as `chunked` cuts it
    policy = build_policy("auto", budget_bytes=64 * GiB, reserve_bytes=_reserves())
    with policy.window(1):
        out = policy.unet_call(make_eps_fn(unet, cond, 1.0), x, torch.tensor([100, 200, 300, 400]))
    assert out.shape == x.shape and seen and set(seen) == {1}, seen
    kinds = {k: recompute.CALL_KINDS[k] for k in ("none", "full", "lean")}
    whole = profile_call(fn, (x, t), kinds)
    one = profile_call(fn.rows(0, 1), (x[:1], t), kinds)
    diffs = {(k, f): (getattr(one[k].scaled(batch), f), getattr(whole[k], f))
             for k in kinds for f in ("retained", "fwd_peak", "bwd_peak")}
    for (k, f), (a, b) in diffs.items():
        assert abs(a - b) <= 0.01 * b + 4096, (k, f, a, b)

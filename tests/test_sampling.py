"""DDIM math against diffusers for every prediction type, the noise helper, and the gradient
window's semantics for every method."""
import pytest
import torch
from diffusers import DDIMScheduler

from refl_engine.config import ConfigError, MethodConfig
from refl_engine.memory.recompute import FullRecompute, NoRecompute
from refl_engine.methods import METHODS, SamplingChain, build_method
from refl_engine.sampling import DDIMSchedule, Window, randn, run_trajectory

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def _float64_scheduler(**overrides):
    """diffusers' DDIMScheduler with its alphas in float64, so `step` runs entirely in float64 and
    agreement is to float64 round-off (our schedule takes the same float32-born alpha values)."""
    sched = DDIMScheduler(**dict(SD_SCHEDULER, **overrides))
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


def _close(ours, ref):
    # float64 round-off of a few operations on values of size |ref|: an absolute floor scaled to the values
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10 * (1.0 + float(ref.abs().max())))


@pytest.mark.parametrize("clip_sample", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddim_step_matches_diffusers(prediction_type, eta, clip_sample):
    sched = _float64_scheduler(prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=1.5)
    schedule = DDIMSchedule.from_scheduler(sched, 7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=g)
    clipped = 0
    for i, t in enumerate(sched.timesteps):
        out = torch.randn(x.shape, dtype=torch.float64, generator=g)
        noise = torch.randn(x.shape, dtype=torch.float64, generator=g)
        ref = sched.step(out, t, x, eta=eta, variance_noise=noise)
        ours = schedule.step(i, x, out, eta, noise)
        _close(ours, ref.prev_sample)
        _close(schedule.x0_hat(i, x, out), ref.pred_original_sample)
        clipped += int(ref.pred_original_sample.abs().max() >= 1.5)
        x = ours
    if clip_sample:
        assert clipped > 0, "degenerate test: the clamp never acted"


def _eps_fn(x, t):
    """A fixed smooth stand-in for a UNet: depends on x and t."""
    return 0.3 * x + torch.sin(x + float(t) / 100.0)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_trajectory_matches_the_diffusers_loop(prediction_type, eta):
    """The whole run, noise included: with eta > 0 both draw the step noise from the same generator."""
    sched = _float64_scheduler(prediction_type=prediction_type)
    n = 6
    schedule = DDIMSchedule.from_scheduler(sched, n)
    x_T = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for window in (Window([n, n]), Window([0, 3])):  # no gradient, and gradient from per-sample starts
        ours = run_trajectory(_eps_fn, schedule, x_T, window, NoRecompute(), eta,
                              generator=torch.Generator().manual_seed(2))
        g = torch.Generator().manual_seed(2)
        ref = x_T
        for t in sched.timesteps:
            ref = sched.step(_eps_fn(ref, t), t, ref, eta=eta, generator=g).prev_sample
        _close(ours.detach(), ref)


def test_unsupported_scheduler_settings_are_one_line_config_errors():
    for bad in (dict(prediction_type="flow"), dict(thresholding=True)):
        with pytest.raises(ConfigError) as e:
            DDIMSchedule.from_scheduler(DDIMScheduler(**dict(SD_SCHEDULER, **bad)), 4)
        assert "\n" not in str(e.value) and str(next(iter(bad.values()))).lower() in str(e.value).lower()


# ---------------------------------------------------------------- noise on the generator's device

@pytest.fixture
def strict_generator_device(monkeypatch):
    """torch.randn with CUDA's rule on every device: a generator must live on the device it draws
    on ("Expected a 'cuda' device type for generator"). On CPU-only torch a CPU generator drawing
    on the meta device is otherwise accepted, so the mismatch would go unseen without a GPU."""
    original = torch.randn

    def randn_strict(*args, generator=None, device=None, **kwargs):
        if generator is not None and torch.device(device or "cpu").type != generator.device.type:
            raise RuntimeError(f"Expected a '{torch.device(device).type}' device type for generator")
        return original(*args, generator=generator, device=device, **kwargs)

    monkeypatch.setattr(torch, "randn", randn_strict)


def test_randn_draws_on_the_generator_and_moves(strict_generator_device):
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z = randn((2, 3), g, "meta", torch.float16)
    assert z.device.type == "meta" and z.dtype == torch.float16
    assert torch.equal(g.get_state(), _advanced(ref, (2, 3), torch.float16))  # a CPU draw, same numbers anywhere
    torch.testing.assert_close(randn((4,), torch.Generator().manual_seed(5)),
                               torch.randn(4, generator=torch.Generator().manual_seed(5)), rtol=0, atol=0)


def _advanced(g, shape, dtype):
    torch.randn(shape, generator=g, dtype=dtype)
    return g.get_state()


@pytest.mark.parametrize("method,kw", [("draft", dict(K="2")), ("draft-lv", dict(lv_inner=2)), ("refl", {}),
                                       ("alignprop", {})])
def test_rollouts_draw_noise_on_the_generators_device(strict_generator_device, method, kw):
    """Latents on another device than the (CPU) generator, eta > 0: every draw must still work."""
    n = 4
    cfg = MethodConfig(method=method, num_inference_steps=n, eta=0.5, **kw)
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER), n)
    x_T = torch.empty(2, 4, 3, 3, device="meta")
    rollout = build_method(cfg).rollout(SamplingChain(lambda x, t: 0.5 * x, schedule, NoRecompute(), eta=0.5), x_T,
                                        torch.Generator().manual_seed(0))
    assert all(x0.device.type == "meta" for x0 in rollout.x0s)


# ---------------------------------------------------------------- the window

class Probe:
    """eps(x, t) = a * x + delta[i, b]: a per-(step, sample) parameter, so d loss / d delta[i, b] is
    non-zero exactly when step i of sample b carries gradient. Counts graph-building calls."""

    def __init__(self, schedule, batch):
        self.steps = {int(t): i for i, t in enumerate(schedule.timesteps)}
        self.delta = torch.zeros(len(schedule), batch, dtype=torch.float64, requires_grad=True)
        self.a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        self.graph_calls = 0
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        if torch.is_grad_enabled():
            self.graph_calls += 1
        i = self.steps[int(t)]
        return self.a * x + self.delta[i].view(-1, 1, 1, 1)


def _rollout(method_name, n=8, batch=3, seed=0, policy=None, **cfg_kw):
    cfg = MethodConfig(method=method_name, num_inference_steps=n, **cfg_kw)
    method = build_method(cfg)
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER), n)
    probe = Probe(schedule, batch)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 1, 2, 2, dtype=torch.float64, generator=g)
    rollout = method.rollout(SamplingChain(probe, schedule, policy or FullRecompute()), x_T, g)
    calls_before_backward = probe.graph_calls
    loss = sum((x0 ** 2).sum() for x0 in rollout.x0s)
    loss.backward()
    return rollout, probe, calls_before_backward


@pytest.mark.parametrize("policy", [FullRecompute(), NoRecompute()], ids=["full", "none"])
@pytest.mark.parametrize("method,kw,expected", [
    ("draft", dict(K="full"), 8), ("draft", dict(K="3"), 3), ("draft", dict(K="1"), 1),
    ("refl", dict(stop_range="4:6"), 1), ("draft-lv", dict(lv_inner=2), 3), ("alignprop", {}, None),
])
def test_graph_calls_equal_window_size(method, kw, expected, policy):
    rollout, probe, graph_calls = _rollout(method, policy=policy, **kw)
    assert graph_calls == rollout.window_size
    if expected is not None:
        assert rollout.window_size == expected


@pytest.mark.parametrize("method,kw", [
    ("draft", dict(K="full")), ("draft", dict(K="3")), ("refl", dict(stop_range="2:6")), ("alignprop", {}),
    ("draft-lv", dict(lv_inner=2)),
])
def test_steps_outside_the_window_get_exactly_zero_gradient(method, kw):
    for seed in range(3):
        rollout, probe, _ = _rollout(method, seed=seed, **kw)
        grad = probe.delta.grad  # (N, B)
        n = grad.shape[0]
        last = rollout.window.stop if rollout.window.stop is not None else n - 1
        for b, start in enumerate(rollout.window.starts):
            inside = [start <= i <= last for i in range(n)]
            for i in range(n):
                if inside[i]:
                    assert grad[i, b] != 0, (method, seed, i, b)
                else:
                    assert grad[i, b] == 0, (method, seed, i, b)  # exactly zero, not small


def test_alignprop_draws_K_once_per_sample():
    n, batch = 10, 64
    rollout, probe, _ = _rollout("alignprop", n=n, batch=batch, seed=1)
    ks = [n - s for s in rollout.window.starts]
    # Each sample's gradient covers one contiguous suffix of length K_b: one draw per trajectory.
    grad = probe.delta.grad
    for b, k in enumerate(ks):
        nonzero = (grad[:, b] != 0).nonzero().flatten().tolist()
        assert nonzero == list(range(n - k, n))
    # Uniform on 1..N: every value appears and none dominates.
    counts = torch.bincount(torch.tensor(ks), minlength=n + 1)[1:]
    assert (counts > 0).sum() >= n - 1 and counts.max() <= 20


def test_alignprop_bounds():
    cfg = MethodConfig(method="alignprop", num_inference_steps=20, alignprop_k_min=5, alignprop_k_max=7)
    g = torch.Generator().manual_seed(0)
    w = build_method(cfg).window(20, 200, g)
    assert {20 - s for s in w.starts} == {5, 6, 7}


def test_refl_stop_step_uniform_in_range():
    cfg = MethodConfig(method="refl", num_inference_steps=40)
    m = build_method(cfg)
    g = torch.Generator().manual_seed(0)
    stops = [m.window(40, 1, g).stop for _ in range(400)]
    assert set(stops) == set(range(30, 40))  # the last 10 by default


def test_every_method_is_registered():
    assert {"refl", "draft", "draft-lv", "alignprop"} <= set(METHODS)


def test_window_outside_runs_without_graph():
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER), 5)
    probe = Probe(schedule, 2)
    x_T = torch.randn(2, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = run_trajectory(probe, schedule, x_T, Window([5, 5]))
    assert not x.requires_grad and probe.graph_calls == 0 and probe.calls == 5

"""DDIM math against diffusers, and the gradient window's semantics for every method."""
import pytest
import torch
from diffusers import DDIMScheduler

from refl_engine.config import MethodConfig
from refl_engine.memory.recompute import FullRecompute, NoRecompute
from refl_engine.methods import METHODS, Sampler, build_method
from refl_engine.sampling import DDIMSchedule, Window, ddim_step, run_trajectory, x0_hat

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(eta):
    sched = DDIMScheduler(**SD_SCHEDULER)
    schedule = DDIMSchedule.from_scheduler(sched, 7)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn_like(x)
        noise = torch.randn_like(x)
        ours = ddim_step(x, eps, schedule.alpha(i), schedule.alpha_prev(i), eta, noise)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        # diffusers takes square roots of its float32 alphas in float32: agree to float32 precision
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        ref_x0 = sched.step(eps, t, x, eta=eta, variance_noise=noise).pred_original_sample
        torch.testing.assert_close(x0_hat(x, eps, schedule.alpha(i)), ref_x0, rtol=1e-5, atol=1e-6)
        x = ours


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
    rollout = method.rollout(Sampler(probe, schedule, policy or FullRecompute()), x_T, g)
    calls_before_backward = probe.graph_calls
    loss = sum((x0 ** 2).sum() for x0 in rollout.x0s)
    loss.backward()
    return rollout, probe, calls_before_backward


@pytest.mark.parametrize("policy", [FullRecompute(), NoRecompute()], ids=["full", "none"])
@pytest.mark.parametrize("method,kw,expected", [
    ("draft", dict(K="full"), 8), ("draft", dict(K="3"), 3), ("draft", dict(K="1"), 1),
    ("refl", dict(stop_range="4:6"), 1), ("draft-lv", dict(lv_inner=2), 2), ("alignprop", {}, None),
])
def test_graph_calls_equal_window_size(method, kw, expected, policy):
    rollout, probe, graph_calls = _rollout(method, policy=policy, **kw)
    assert graph_calls == rollout.window_size
    if expected is not None:
        assert rollout.window_size == expected


@pytest.mark.parametrize("method,kw", [
    ("draft", dict(K="full")), ("draft", dict(K="3")), ("refl", dict(stop_range="2:6")), ("alignprop", {}),
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


def test_draft_lv_gradient_only_from_the_renoised_step():
    rollout, probe, _ = _rollout("draft-lv", lv_inner=3)
    grad = probe.delta.grad
    assert torch.all(grad[:-1] == 0)
    assert torch.all(grad[-1] != 0)
    assert len(rollout.x0s) == 3


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
    assert set(METHODS) == {"refl", "draft", "draft-lv", "alignprop"}


def test_window_outside_runs_without_graph():
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER), 5)
    probe = Probe(schedule, 2)
    x = run_trajectory(probe, schedule, torch.randn(2, 1, 2, 2, dtype=torch.float64), Window([5, 5]))
    assert not x.requires_grad and probe.graph_calls == 0 and probe.calls == 5

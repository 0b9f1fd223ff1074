"""The engine's gradient equals central finite differences of the same loss (float64, tiny model)."""
import copy

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from refl_engine.config import MethodConfig
from refl_engine.memory.recompute import FullRecompute, NoRecompute
from refl_engine.methods import SamplingChain, build_method
from refl_engine.models.conditioning import Conditioning, make_eps_fn
from refl_engine.models.load import tiny_sd_configs
from refl_engine.rewards.toy import Colorfulness
from refl_engine.sampling import DDIMSchedule, Window, run_trajectory


@pytest.fixture(scope="module")
def tiny64():
    cfgs = tiny_sd_configs()
    with torch.random.fork_rng(devices=[]):  # seeded weights without reseeding the global generator
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**dict(cfgs["unet"], sample_size=4)).double()
        vae = AutoencoderKL(**dict(cfgs["vae"], sample_size=8)).double().requires_grad_(False)
        cond = Conditioning(torch.randn(2, 7, cfgs["unet"]["cross_attention_dim"], dtype=torch.float64),
                            torch.randn(2, 7, cfgs["unet"]["cross_attention_dim"], dtype=torch.float64))
    # Random-init conv_out is small; scale it so the trajectory depends strongly on the weights.
    with torch.no_grad():
        unet.conv_out.weight.mul_(20)
    return unet, vae, cond, DDIMScheduler(**cfgs["scheduler"])


def _decode_reward(vae, x0):
    return Colorfulness()((vae.decode(x0).sample / 2 + 0.5).clamp(0, 1), ["", ""])


def _loss(tiny64, method_name, policy, frozen=None, n_steps=4, guidance=2.0, **kw):
    """The method's loss, or with `frozen` (the unperturbed weights) the objective whose derivative
    the method claims to compute: the UNet calls the method runs without gradient use the frozen
    weights (DRaFT-K, ReFL and DRaFT-LV stop the gradient before their window), and DRaFT-LV's
    copies are re-noised from the frozen sample (its stop_grad), written out here by hand:
    -(r(x0) + sum_j r(x0^(j)))."""
    unet, vae, cond, sched = tiny64
    cfg = MethodConfig(method=method_name, num_inference_steps=n_steps, guidance_scale=guidance, **kw)
    method = build_method(cfg)
    schedule = DDIMSchedule.from_scheduler(sched, n_steps)
    g = torch.Generator().manual_seed(7)  # same window, x_T and DRaFT-LV noise in every evaluation
    x_T = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=g)
    live = make_eps_fn(unet, cond, guidance)
    if frozen is None:
        rollout = method.rollout(SamplingChain(live, schedule, policy), x_T, g)
        return method.loss([_decode_reward(vae, x0) for x0 in rollout.x0s])

    stale = make_eps_fn(frozen, cond, guidance)
    window = method.window(n_steps, 2, g)  # the same draw as the rollout's (after x_T)
    first, last = window.first(), window.last(n_steps)
    calls = iter(range(n_steps))

    def truncated(x, t):
        c = next(calls)  # trajectory calls are 0..N-1
        if not first <= c <= last:
            return stale(x, t)
        # per sample: AlignProp's samples whose own window starts later still run frozen here
        mine = torch.tensor([start <= c for start in window.starts]).view(-1, 1, 1, 1)
        return torch.where(mine, live(x, t), stale(x, t))

    x0 = run_trajectory(truncated, schedule, x_T, window, policy)
    rewards = [_decode_reward(vae, x0)]
    if method_name == "draft-lv":
        sample = run_trajectory(stale, schedule, x_T, Window([n_steps] * 2))  # stop_grad(x0)
        i = n_steps - 1
        a, t = schedule.alpha(i), schedule.timesteps[i]
        for _ in range(kw["lv_inner"]):
            x1 = a**0.5 * sample + (1 - a) ** 0.5 * torch.randn(sample.shape, dtype=sample.dtype, generator=g)
            rewards.append(_decode_reward(vae, schedule.step(i, x1, live(x1, t))))
        return -cfg.reward_scale * sum(r.mean() for r in rewards)
    return -cfg.reward_scale * rewards[0].mean()


@pytest.mark.parametrize("policy", [FullRecompute(), NoRecompute()], ids=["checkpointed", "no-checkpoint"])
@pytest.mark.parametrize("method,kw", [
    ("draft", dict(K="full")), ("draft", dict(K="2")), ("refl", dict(stop_range="1:3")),
    ("draft-lv", dict(lv_inner=2)), ("alignprop", {}),
])
def test_gradient_matches_finite_differences(tiny64, method, kw, policy):
    unet = tiny64[0]
    params = [p for p in unet.parameters()]
    unet.zero_grad(set_to_none=True)
    loss = _loss(tiny64, method, policy, **kw)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    gen = torch.Generator().manual_seed(11)  # one fixed direction (a seed sweep is not this test's job)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d ** 2).sum() for d in direction))
    direction = [d / norm for d in direction]
    analytic = float(sum((g * d).sum() for g, d in zip(grads, direction)))
    h = 1e-4
    frozen = copy.deepcopy(unet)
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = float(_loss(tiny64, method, policy, frozen, **kw))
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = float(_loss(tiny64, method, policy, frozen, **kw))
        for p, d in zip(params, direction):
            p.add_(h * d)
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-10, "degenerate test: the loss does not depend on the weights"
    # central differences: truncation O(h^2) plus float64 round-off of about eps * |loss| / h,
    # which matters when a random direction is nearly orthogonal to a small gradient
    roundoff = 64 * torch.finfo(torch.float64).eps * abs(float(loss.detach())) / h
    assert abs(analytic - numeric) < 1e-5 * abs(numeric) + roundoff, (analytic, numeric, roundoff)

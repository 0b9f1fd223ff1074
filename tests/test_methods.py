"""The method is the one source of which UNet calls carry gradient: its window opens and closes
around every rollout, holds every grad-carrying call (DRaFT-LV's re-noised ones included), and
`Method.grad_calls(N)` is what the trainer makes. DRaFT-LV's estimator against a hand-written
reference built on diffusers' scheduler; the logged reward is the sampled image's."""
import pytest
import torch
from diffusers import DDIMScheduler
from engine_config import make_config
from test_sampling import SD_SCHEDULER, strict_generator_device  # noqa: F401  (a fixture)

from refl_engine.config import MethodConfig
from refl_engine.memory.recompute import NoRecompute
from refl_engine.methods import METHODS, Method, SamplingChain, build_method
from refl_engine.sampling import DDIMSchedule

# (method, config) pairs over a small grid of N and K; N is filled in by the test
GRID = [
    ("draft", dict(K="full")), ("draft", dict(K="1")), ("draft", dict(K="2")), ("refl", {}),
    ("draft-lv", dict(lv_inner=1)), ("draft-lv", dict(lv_inner=2)), ("alignprop", {}),
    ("alignprop", dict(alignprop_k_min=2, alignprop_k_max=2)),
]


class Recording(NoRecompute):
    """A policy that records the window protocol: ('begin', size), ('call', pos)..., ('end',)."""

    def __init__(self):
        super().__init__()
        self.events = []

    def begin_window(self, window_size):
        self.events.append(("begin", window_size))

    def end_window(self):
        self.events.append(("end",))

    def call_kind(self, window_pos):
        self.events.append(("call", window_pos))
        return "none"


def _eps(x, t):
    return 0.3 * x + torch.cos(x + float(t) / 300.0)


def _rollout(method, n, policy, seed, batch=3):
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER), n)
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 1, 2, 2, dtype=torch.float64, generator=g)
    return method.rollout(SamplingChain(_eps, schedule, policy), x_T, g)


def _valid(name, n, kw):
    return not (kw.get("K", "full") != "full" and int(kw["K"]) > n) and kw.get("alignprop_k_max", 0) <= n


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("name,kw", GRID)
def test_window_protocol_and_grad_calls(name, kw, n):
    """Every rollout opens one window of this draw's size, makes exactly that many grad-carrying
    calls at positions 0, 1, ..., closes it, and the largest draw is grad_calls(N)."""
    if not _valid(name, n, kw):
        pytest.skip("K or k_max beyond N")
    method = build_method(MethodConfig(method=name, num_inference_steps=n, **kw))
    sizes = []
    for seed in range(40):
        policy = Recording()
        rollout = _rollout(method, n, policy, seed)
        size = rollout.window_size
        assert policy.events == [("begin", size), *[("call", i) for i in range(size)], ("end",)]
        assert not policy.in_window
        sizes.append(size)
    assert max(sizes) == method.grad_calls(n)


def test_every_registered_method_says_its_grad_calls():
    for name, cls in METHODS.items():
        assert cls.grad_calls is not Method.grad_calls, f"{name} does not say how many UNet calls carry gradient"


def test_window_closes_on_every_exit():
    """ReFL returns from inside the trajectory and a UNet call may raise: the window is closed
    either way (the auto policy's plan is dropped), and the next rollout opens a fresh one."""
    policy = Recording()
    refl = build_method(MethodConfig(method="refl", num_inference_steps=6, stop_range="2:3"))
    _rollout(refl, 6, policy, 0)
    assert policy.events[-1] == ("end",) and not policy.in_window

    calls = []

    def failing(x, t):
        calls.append(t)
        if torch.is_grad_enabled() and len(calls) > 4:
            raise RuntimeError("out of memory")
        return _eps(x, t)

    draft = build_method(MethodConfig(method="draft", num_inference_steps=6, K="3"))
    schedule = DDIMSchedule.from_scheduler(DDIMScheduler(**SD_SCHEDULER), 6)
    policy = Recording()
    with pytest.raises(RuntimeError, match="out of memory"):
        draft.rollout(SamplingChain(failing, schedule, policy), torch.zeros(1, 1, 2, 2, dtype=torch.float64),
                      torch.Generator().manual_seed(0))
    assert policy.events[0] == ("begin", 3) and policy.events[-1] == ("end",) and not policy.in_window
    _rollout(draft, 6, policy, 1)  # a fresh window opens
    assert policy.events[-1] == ("end",)


def test_window_refuses_calls_it_was_not_opened_for():
    policy = NoRecompute()
    x, t = torch.zeros(1, 1, 2, 2), torch.tensor(1)
    with pytest.raises(RuntimeError, match="outside a gradient window"):
        policy.unet_call(_eps, x, t)
    with pytest.raises(RuntimeError, match="opened for 1"):
        with policy.window(1):
            policy.unet_call(_eps, x, t)
            policy.unet_call(_eps, x, t)
    with pytest.raises(RuntimeError, match="opened for 2 grad-carrying UNet calls and 1 were made"):
        with policy.window(2):
            policy.unet_call(_eps, x, t)
    assert not policy.in_window


# ---------------------------------------------------------------- DRaFT-LV's estimator

def _float64_scheduler():
    sched = DDIMScheduler(**SD_SCHEDULER)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    return sched


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_draft_lv_is_the_K1_gradient_plus_the_renoised_copies(eta):
    """g = grad r(x0) + sum_j grad r(x0^(j)): the sample's last step carries gradient (K = 1) and
    each copy is stop_grad(x0) re-noised to t_1 and denoised by one grad-carrying step. The
    reference is written out with diffusers' DDIMScheduler.step and the same generator."""
    n, inner, scale = 5, 2, 0.5
    w = torch.tensor([0.7, -0.4, 0.2, 1.1], dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.35, dtype=torch.float64, requires_grad=True)
    params = [w, a]

    def model(x, t):  # depends on the parameters at every step
        return a * x + w.view(1, -1, 1, 1) * torch.sin(x + float(t) / 200.0)

    def reward(x0):  # per sample
        return -((x0 - 0.25) ** 2).flatten(1).mean(1) + x0.flatten(1).mean(1)

    sched = _float64_scheduler()
    method = build_method(MethodConfig(method="draft-lv", num_inference_steps=n, lv_inner=inner, eta=eta,
                                       reward_scale=scale))
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    rollout = method.rollout(SamplingChain(model, DDIMSchedule.from_scheduler(sched, n), NoRecompute(), eta), x_T, g)
    loss = method.loss([reward(x0) for x0 in rollout.x0s])
    grads = torch.autograd.grad(loss, params)

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=g)
    sched.set_timesteps(n)
    *early, t1 = sched.timesteps
    with torch.no_grad():
        for t in early:
            x = sched.step(model(x, t), t, x, eta=eta, generator=g).prev_sample
    x0 = sched.step(model(x, t1), t1, x, eta=eta, generator=g).prev_sample  # K = 1: with gradient
    a1 = sched.alphas_cumprod[t1]
    terms = [reward(x0).mean()]
    for _ in range(inner):
        z = torch.randn(x0.shape, dtype=torch.float64, generator=g)
        x1 = a1**0.5 * x0.detach() + (1 - a1) ** 0.5 * z
        terms.append(reward(sched.step(model(x1, t1), t1, x1).prev_sample).mean())
    ref_loss = -scale * sum(terms)
    ref_grads = torch.autograd.grad(ref_loss, params)

    assert len(rollout.x0s) == 1 + inner and rollout.window_size == 1 + inner == method.grad_calls(n)
    torch.testing.assert_close(rollout.x0s[0].detach(), x0.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-10, atol=1e-12)
    for ours, ref in zip(grads, ref_grads):
        assert ref.abs().max() > 1e-6  # not a degenerate test
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-10 * (1 + float(ref.abs().max())))


# ---------------------------------------------------------------- the trainer on the tiny model

def _trainer(tmp_path, **overrides):
    from refl_engine.trainer import ReFLTrainer

    cfg = make_config(tmp_path, guidance_scale=1.0, train_batch_size=2, **overrides)
    return ReFLTrainer(cfg).setup()


def _count_grad_unet_forwards(trainer, prompts):
    from refl_engine.memory.measure import GradCallCounter

    with GradCallCounter(trainer.unet) as counter:
        result = trainer.micro_step(prompts)
    return counter.calls, result


@pytest.mark.parametrize("n", [2, 5])
@pytest.mark.parametrize("name,kw", GRID + [("imagerefl", {})])
def test_trainer_grad_carrying_unet_calls_equal_grad_calls(tiny_sd_dir, tmp_path, name, kw, n):
    """Counted on the UNet itself (forwards with grad enabled; `--recompute none` so backward runs
    none again). Draws that can be smaller than the largest (AlignProp 1..N) are pinned to it."""
    if not _valid(name, n, kw) or (name == "imagerefl" and n < 4):
        pytest.skip("K, k_max or the hand-over step beyond N")
    if name == "alignprop" and not kw:
        kw = dict(alignprop_k_min=n)  # the largest draw, k = N
    if name == "imagerefl":
        from refl_engine.toyworld.make_dataset import make_dataset

        make_dataset(tmp_path / "data", 4, seed=0)
        kw = dict(train_data_dir=str(tmp_path / "data"))
    trainer = _trainer(tmp_path, method=name, num_inference_steps=n, recompute="none", **kw)
    counted, result = _count_grad_unet_forwards(trainer, trainer.prompts[:2])
    assert counted == result["window_size"] == trainer.method.grad_calls(n), (counted, result["window_size"])


def test_auto_plans_draft_lv_renoised_calls(tiny_sd_dir, tmp_path):
    """`--recompute auto` plans the whole window, the re-noised calls included."""
    trainer = _trainer(tmp_path, method="draft-lv", lv_inner=2, num_inference_steps=4, recompute="auto",
                       memory_budget="100GB")
    trainer.micro_step(trainer.prompts[:2])
    assert len(trainer.policy.last_plan.kinds) == trainer.method.grad_calls(4) == 3


def test_logged_reward_is_the_sampled_images(tiny_sd_dir, tmp_path):
    """DRaFT-LV rewards the sample and its copies; the reward logged is the sample's, x0s[0]."""
    trainer = _trainer(tmp_path, method="draft-lv", lv_inner=2, num_inference_steps=4)
    rollouts, outputs = [], []
    rollout = trainer.method.rollout

    def keep(*args, **kwargs):
        rollouts.append(rollout(*args, **kwargs))
        return rollouts[-1]

    trainer.method.rollout = keep
    handle = trainer.reward.register_forward_hook(lambda m, args, out: outputs.append(out.detach().float().cpu()))
    prompts = trainer.prompts[:2]
    try:
        logged = trainer.micro_step(prompts)["reward"]
    finally:
        handle.remove()
    sample, *copies = outputs[:3]  # the forward calls, in rollout order (backward's recomputes follow)
    assert torch.equal(logged, sample)
    assert all(not torch.equal(c, sample) for c in copies)  # not a degenerate test
    with torch.no_grad():
        ref = trainer.reward(trainer.decode(rollouts[0].x0s[0].detach()), prompts).float().cpu()
    torch.testing.assert_close(logged, ref, rtol=1e-5, atol=1e-6 * (1 + float(ref.abs().max())))


def test_trainer_initial_noise_on_the_generators_device(tiny_sd_dir, tmp_path, strict_generator_device):  # noqa: F811
    trainer = _trainer(tmp_path)
    trainer.device = torch.device("meta")  # the latents' device differs from the CPU generator's
    x = trainer.initial_noise(2, trainer.generator)
    assert x.device.type == "meta" and x.shape[:2] == (2, trainer.unet.config.in_channels)

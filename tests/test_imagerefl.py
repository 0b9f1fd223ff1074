"""ImageReFL and the regularizers on the tiny float64 model: gradient only through the stop
step (and the diffusion loss's call), the diffusion term as configured, the 3:1 alternation,
the KL penalty (zero for a zero-initialized adapter, positive after a step, gradient equal to
finite differences), relu reward loss."""
import copy
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from refl_engine.config import MethodConfig, handover_index
from refl_engine.memory.recompute import FullRecompute, NoRecompute
from refl_engine.methods import SamplingChain, build_method
from refl_engine.models.conditioning import Conditioning, make_eps_fn
from refl_engine.models.load import tiny_sd_configs
from refl_engine.regularizers import (KLPenalty, adapter_disabled, attach_regularizers, frozen_base, reward_objective,
                                     watch_rollout)
from refl_engine.rewards.toy import Colorfulness
from refl_engine.sampling import DDIMSchedule

N = 4


@pytest.fixture(scope="module")
def tiny64():
    cfgs = tiny_sd_configs()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(cfgs["unet"], sample_size=4)).double()
    vae = AutoencoderKL(**dict(cfgs["vae"], sample_size=8)).double().requires_grad_(False)
    with torch.no_grad():
        unet.conv_out.weight.mul_(20)  # so the trajectory depends strongly on the weights
    cond = Conditioning(torch.randn(2, 7, 32, dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64))
    return unet, vae, cond, DDIMScheduler(**cfgs["scheduler"])


def _directional_check(params, loss_fn, seed=11, h=1e-4):
    """Autograd's derivative of loss_fn() along a seeded random direction vs central differences."""
    for p in params:
        p.grad = None
    loss = loss_fn()
    loss.backward()
    gen = torch.Generator().manual_seed(seed)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    direction = [d / norm for d in direction]
    analytic = float(sum((p.grad * d).sum() for p, d in zip(params, direction)))
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        plus = float(loss_fn())
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        minus = float(loss_fn())
        for p, d in zip(params, direction):
            p.add_(h * d)
    numeric = (plus - minus) / (2 * h)
    assert abs(analytic) > 1e-10, "degenerate test: the loss does not depend on the weights"
    roundoff = 64 * torch.finfo(torch.float64).eps * abs(float(loss.detach())) / h
    assert abs(analytic - numeric) < 1e-5 * abs(numeric) + roundoff, (analytic, numeric, roundoff)


def _imagerefl(**kw):
    cfg = MethodConfig(method="imagerefl", num_inference_steps=N, guidance_scale=2.0, handover_step=1,
                       stop_range="3:3", refl_every=4, **kw)
    return build_method(cfg)


def _real_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=g), torch.randn(2, 4, 4, 4, dtype=torch.float64,
                                                                                   generator=g)


@pytest.mark.parametrize("policy", [FullRecompute(), NoRecompute()], ids=["checkpointed", "no-checkpoint"])
def test_imagerefl_gradient_flows_only_through_the_stop_step(tiny64, policy):
    """The loss is reward(x0_hat at the stop step) + w * diffusion loss at t'. Its gradient must be
    the derivative of that objective with the no-grad steps t'..stop-1 held at the current weights:
    finite differences where those steps run a frozen copy agree with autograd."""
    unet, vae, cond, sched = tiny64
    schedule = DDIMSchedule.from_scheduler(sched, N)
    x0_real, eps = _real_batch()
    frozen = copy.deepcopy(unet)

    def loss_fn(weight=1e-1):
        method = _imagerefl(diffusion_loss_weight=weight)
        live, stale = make_eps_fn(unet, cond, 2.0), make_eps_fn(frozen, cond, 2.0)
        calls = []

        def eps_fn(x, t):  # steps 1, 2 run without gradient (frozen weights); the stop step 3 and
            calls.append(t)  # its recomputation in backward run the live weights
            return live(x, t) if len(calls) >= 3 else stale(x, t)

        method.set_real_batch(x0_real, make_eps_fn(unet, Conditioning(cond.cond), 1.0))
        rollout = method.rollout(SamplingChain(eps_fn, schedule, policy), eps, torch.Generator().manual_seed(0))
        assert rollout.window_size == 2 and rollout.window.stop == 3
        reward = Colorfulness()((vae.decode(rollout.x0s[0]).sample / 2 + 0.5).clamp(0, 1), ["", ""])
        terms = method.regularize({"rollout": rollout})
        return method.loss([reward]) + terms["diffusion_loss"]

    _directional_check(list(unet.parameters()), loss_fn)


def test_no_grad_steps_build_no_graph(tiny64):
    unet, vae, cond, sched = tiny64
    schedule = DDIMSchedule.from_scheduler(sched, N)
    x0_real, eps = _real_batch()
    method = _imagerefl(diffusion_loss_weight=0.0)
    live = make_eps_fn(unet, cond, 2.0)
    grad_flags = []

    def eps_fn(x, t):
        grad_flags.append(torch.is_grad_enabled())
        return live(x, t)

    method.set_real_batch(x0_real, make_eps_fn(unet, Conditioning(cond.cond), 1.0))
    rollout = method.rollout(SamplingChain(eps_fn, schedule, FullRecompute()), eps, torch.Generator().manual_seed(0))
    # hand-over at step 1, stop at 3: steps 1 and 2 without gradient, the stop call with it
    assert grad_flags == [False, False, True]
    assert rollout.window_size == 1 == method.grad_calls(N) and float(rollout.diffusion_loss) == 0.0


def test_diffusion_term_is_the_configured_multiple_of_the_denoising_loss(tiny64):
    unet, vae, cond, sched = tiny64
    schedule = DDIMSchedule.from_scheduler(sched, N)
    x0_real, eps = _real_batch()
    weight = 3e-5
    method = _imagerefl(diffusion_loss_weight=weight)
    method.set_real_batch(x0_real, make_eps_fn(unet, Conditioning(cond.cond), 1.0))
    rollout = method.rollout(SamplingChain(make_eps_fn(unet, cond, 2.0), schedule, NoRecompute()), eps,
                             torch.Generator().manual_seed(0))
    # by hand: x_t' from the scheduler's alphas at the hand-over timestep, the conditional eps
    t = int(sched.timesteps[1])
    a = float(sched.alphas_cumprod[t])
    x_t = a**0.5 * x0_real + (1 - a) ** 0.5 * eps
    with torch.no_grad():
        pred = unet(x_t, torch.tensor(t), encoder_hidden_states=cond.cond).sample
    expected = weight * float(((pred - eps) ** 2).mean())
    got = float(method.regularize({"rollout": rollout})["diffusion_loss"].detach())
    assert expected > 0 and abs(got - expected) <= 1e-12 + 1e-10 * expected
    assert method.grad_calls(N) == 2 == rollout.window_size


def test_every_fourth_step_is_classic_refl():
    method = _imagerefl()
    drawn = []
    fake = SimpleNamespace(
        step=0, generator=torch.Generator().manual_seed(0), device=torch.device("cpu"), unet=None, text=None,
        dataset=SimpleNamespace(sample=lambda b, g: (drawn.append(b), (torch.zeros(b, 3, 8, 8), ["cap"] * b))[1]),
        components=SimpleNamespace(vae=None))
    method.cond_fn = None
    kinds = []
    for step in range(12):
        fake.step = step
        refl = method.is_refl_step(step)
        kinds.append(refl)
        if refl:
            assert method.prepare_batch(fake, ["p", "q"]) == ["p", "q"] and method.x0_real is None
    assert kinds.count(True) == 3 and [i for i, k in enumerate(kinds) if k] == [3, 7, 11]
    never = _imagerefl()
    never.cfg.refl_every = 0
    assert not any(never.is_refl_step(s) for s in range(12))


def test_handover_default_and_stop_draws():
    assert handover_index(-1, 40) == 30 and handover_index(-1, 20) == 15 and handover_index(7, 20) == 7
    cfg = MethodConfig(method="imagerefl", num_inference_steps=20)
    method = build_method(cfg)
    method.x0_real = torch.zeros(1)
    g = torch.Generator().manual_seed(0)
    stops = {method.window(20, 2, g).stop for _ in range(200)}
    assert stops == set(range(15, 20))  # uniform over [hand-over, N - 1] within the last 10 steps


# ---------------------------------------------------------------- regularizers

def _lora_unet(tiny64):
    from refl_engine.models.lora import add_lora

    unet = copy.deepcopy(tiny64[0])
    params = add_lora(unet, 2)
    with torch.no_grad():  # peft's gaussian init already zeroes B; make it explicit
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.zero_()
    return unet, params


def _kl_loss(unet, tiny64, kl, policy=NoRecompute(), method="draft"):
    _, vae, cond, sched = tiny64
    m = build_method(MethodConfig(method=method, num_inference_steps=N, guidance_scale=2.0, K="full"))
    m.add_regularizer("kl", 1.0, kl)
    schedule = DDIMSchedule.from_scheduler(sched, N)
    x_T = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    chain = watch_rollout(m, SamplingChain(make_eps_fn(unet, cond, 2.0), schedule, policy))
    rollout = m.rollout(chain, x_T, torch.Generator().manual_seed(0))
    return m.regularize({"rollout": rollout})["kl"], rollout


def _reward_step(unet, tiny64, opt):
    """One DRaFT K=2 colorfulness step: moves the trained weights off the base."""
    vae = tiny64[1]
    m = build_method(MethodConfig(method="draft", num_inference_steps=N, guidance_scale=2.0, K="2"))
    schedule = DDIMSchedule.from_scheduler(tiny64[3], N)
    x_T = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ro = m.rollout(SamplingChain(make_eps_fn(unet, tiny64[2], 2.0), schedule, NoRecompute()), x_T,
                   torch.Generator().manual_seed(0))
    loss = m.loss([Colorfulness()((vae.decode(ro.x0s[0]).sample / 2 + 0.5).clamp(0, 1), ["", ""])])
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_kl_is_zero_for_a_zero_adapter_and_positive_after_a_step(tiny64):
    unet, params = _lora_unet(tiny64)
    kl = KLPenalty()
    value, rollout = _kl_loss(unet, tiny64, kl)
    assert float(value.detach()) == 0.0 and rollout.window_size == N
    # one reward step moves the adapter off zero
    opt = torch.optim.SGD(params, lr=1e-2)
    _reward_step(unet, tiny64, opt)
    after, _ = _kl_loss(unet, tiny64, KLPenalty())
    assert float(after) > 1e-12
    # the adapter is back on after the base calls: the fine-tuned output differs from the base one
    assert unet.active_adapters() == ["default"]


@pytest.mark.parametrize("policy", [FullRecompute(), NoRecompute()], ids=["checkpointed", "no-checkpoint"])
def test_kl_gradient_matches_finite_differences(tiny64, policy):
    """KL with the base output a fixed target (recorded once): its autograd derivative equals
    central differences of coeff * mean ||out_theta(x_t(theta)) - target||^2."""
    unet, params = _lora_unet(tiny64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the B = 0 point so the penalty is not flat
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    targets = []

    def record(x, t):  # the real base output (adapter off), kept to replay as a fixed target
        with adapter_disabled(unet):
            targets.append(make_eps_fn(unet, tiny64[2], 2.0)(x, t))
        return targets[-1]

    _kl_loss(unet, tiny64, KLPenalty(base_fn=record), policy)
    assert len(targets) == N

    def loss_fn():
        replay = iter(targets)
        value, _ = _kl_loss(unet, tiny64, KLPenalty(base_fn=lambda x, t: next(replay)), policy)
        return value

    _directional_check(params, loss_fn, seed=4)


# -------------------------------------------- the KL penalty under full fine-tuning (--rank 0)

def _full_ft_unet(tiny64):
    unet = copy.deepcopy(tiny64[0]).requires_grad_(True)
    return unet, list(unet.parameters())


def test_frozen_base_is_a_frozen_copy_in_the_training_dtype(tiny64):
    unet, params = _full_ft_unet(tiny64)
    base = frozen_base(unet, torch.float32)
    pairs = list(zip(unet.named_parameters(), base.named_parameters()))
    assert len(pairs) == len(params) and not base.training
    for (name, p), (base_name, b) in pairs:
        assert name == base_name and b.dtype == torch.float32 and b.device == p.device and not b.requires_grad
        assert b.data_ptr() != p.data_ptr() and torch.equal(b, p.detach().float())
    assert all(p.dtype == torch.float64 and p.requires_grad for p in params)  # the trained model untouched
    # the copy's tensors are its own: changing the trained weights leaves it as it was
    before = next(base.parameters()).clone()
    with torch.no_grad():
        params[0].add_(1.0)
    assert torch.equal(next(base.parameters()), before)


def test_kl_full_ft_is_zero_for_an_identical_copy_and_positive_after_a_step(tiny64):
    unet, params = _full_ft_unet(tiny64)
    base = frozen_base(unet)
    snapshot = [b.clone() for b in base.parameters()]
    value, rollout = _kl_loss(unet, tiny64, KLPenalty(base_unet=base))
    assert float(value.detach()) == 0.0 and rollout.window_size == N
    value.backward()  # a flat penalty: zero gradient, and none reaches the frozen copy
    assert all(b.grad is None for b in base.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    _reward_step(unet, tiny64, opt)
    after, _ = _kl_loss(unet, tiny64, KLPenalty(base_unet=base))
    assert float(after) > 1e-12
    assert all(torch.equal(b, s) for b, s in zip(base.parameters(), snapshot))  # the base did not move


@pytest.mark.parametrize("policy", [FullRecompute(), NoRecompute()], ids=["checkpointed", "no-checkpoint"])
def test_kl_full_ft_gradient_matches_finite_differences(tiny64, policy):
    """Full fine-tuning: the penalty against the frozen copy's outputs (a fixed target, as for
    LoRA): autograd's derivative over every UNet weight equals central differences, and the
    frozen copy's path gives exactly the gradient of the replayed targets (no graph through it)."""
    unet, params = _full_ft_unet(tiny64)
    base = frozen_base(unet)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # move off the base so the penalty is not flat
        for p in params:
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    kl = KLPenalty(base_unet=base)
    m = build_method(MethodConfig(method="draft", num_inference_steps=N, guidance_scale=2.0, K="full"))
    m.add_regularizer("kl", 1.0, kl)
    schedule = DDIMSchedule.from_scheduler(tiny64[3], N)
    x_T = torch.randn(2, 4, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    chain = watch_rollout(m, SamplingChain(make_eps_fn(unet, tiny64[2], 2.0), schedule, policy))
    rollout = m.rollout(chain, x_T, torch.Generator().manual_seed(0))
    targets = [b for _, b in kl.records]  # the frozen copy's outputs, before regularize() clears them
    for p in params:
        p.grad = None
    m.regularize({"rollout": rollout})["kl"].backward()
    via_copy = [p.grad.clone() for p in params]
    assert len(targets) == N and all(not t.requires_grad for t in targets)

    def loss_fn():
        replay = iter(targets)
        value, _ = _kl_loss(unet, tiny64, KLPenalty(base_fn=lambda x, t: next(replay)), policy)
        return value

    _directional_check(params, loss_fn, seed=4)
    assert all(torch.equal(g, p.grad) for g, p in zip(via_copy, params))


def test_relu_reward_loss():
    cfg = MethodConfig(reward_loss="relu", reward_loss_threshold=2.0)
    r = torch.tensor([1.5, 2.5, -1.0], dtype=torch.float64)
    assert torch.equal(reward_objective(r, cfg), -torch.tensor([0.5, 0.0, 3.0], dtype=torch.float64))
    assert torch.equal(reward_objective(r, MethodConfig()), r)
    m = build_method(MethodConfig(method="refl", reward_loss="relu", reward_scale=1e-3))
    assert abs(float(m.loss([reward_objective(r, m.cfg)])) - 1e-3 * 3.5 / 3) < 1e-15


def test_attach_registers_the_configured_terms():
    m = build_method(MethodConfig(method="refl", kl_coeff=0.1, pretrain_loss_coeff=0.5))
    attach_regularizers(m, m.cfg)
    assert {k: w for k, (w, _) in m.regularizers.items()} == {"kl": 0.1, "pretrain_loss": 0.5}


# ---------------------------------------------------------------- in the trainer

def test_trainer_runs_imagerefl_with_every_regularizer_and_raises_the_reward(tiny_sd_dir, tmp_path):
    from engine_config import make_config

    from refl_engine.toyworld.make_dataset import make_dataset
    from refl_engine.trainer import ReFLTrainer

    make_dataset(tmp_path / "data", 16, seed=0)
    cfg = make_config(tmp_path, method="imagerefl", train_data_dir=str(tmp_path / "data"), num_inference_steps=6,
                      learning_rate=2e-2, rank=4, refl_every=2, diffusion_loss_weight=1e-3, kl_coeff=1e-3,
                      pretrain_loss_coeff=1e-3, reward_loss="relu", reward_loss_threshold=2.0,
                      eval_num_prompts=2, eval_images_per_prompt=2)
    trainer = ReFLTrainer(cfg).setup()
    prompts = trainer.prompts[:4]
    before = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    rows = [trainer.train_step() for _ in range(24)]
    after = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    assert after > before + 0.02, (before, after)
    for key in ("reward_loss", "diffusion_loss", "kl", "pretrain_loss"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    # odd steps (1, 3, ...) are ImageReFL steps with the diffusion term; even ones classic ReFL
    assert all(r["diffusion_loss"] > 0 for r in rows[0::2]) and all(r["diffusion_loss"] == 0 for r in rows[1::2])
    # relu(2 - r) with colorfulness < 2: the reward loss is scale * (2 - r), positive
    assert all(r["reward_loss"] > 0 for r in rows)
    # the adapter starts at zero (equal outputs up to the policy's op order), then moves
    assert rows[0]["kl"] < 1e-12 and rows[-1]["kl"] > 1e3 * max(rows[0]["kl"], 1e-15)
    from refl_engine.evaluate import heldout_metrics

    m = heldout_metrics(trainer)
    assert set(m) == {"eval_reward", "eval_reward_se", "eval_diversity"} and 0 < m["eval_diversity"] <= 2


def test_trainer_full_ft_kl_against_a_frozen_copy(tiny_sd_dir, tmp_path):
    """--rank 0 --kl_coeff: the trainer's base model is a frozen copy of the UNet (every weight,
    the training dtype, its device, eval, no gradient); the penalty is 0 at the first step and
    positive once the weights moved, while the copy stays as loaded."""
    from engine_config import make_config

    from refl_engine.trainer import ReFLTrainer

    cfg = make_config(tmp_path, method="draft", K="2", num_inference_steps=4, rank=0, kl_coeff=1.0,
                      learning_rate=1e-3)
    trainer = ReFLTrainer(cfg).setup()
    base = trainer.method.regularizers["kl"][1].base_unet
    unet_params = dict(trainer.unet.named_parameters())
    base_params = dict(base.named_parameters())
    assert base_params.keys() == unet_params.keys() and not base.training
    for name, b in base_params.items():
        p = unet_params[name]
        assert not b.requires_grad and b.dtype == torch.float32 and b.device == p.device
        assert b.data_ptr() != p.data_ptr() and torch.equal(b, p.detach())
    loaded = {n: b.clone() for n, b in base_params.items()}
    rows = [trainer.train_step() for _ in range(3)]
    assert rows[0]["kl"] < 1e-12 and rows[-1]["kl"] > 1e3 * max(rows[0]["kl"], 1e-15), [r["kl"] for r in rows]
    assert all(torch.equal(b, loaded[n]) for n, b in base.named_parameters())
    assert any(not torch.equal(p.detach(), loaded[n]) for n, p in trainer.unet.named_parameters())


@pytest.mark.parametrize("argv,match", [
    (["--method", "imagerefl"], "--train_data_dir"),
    (["--method", "imagerefl", "--train_data_dir", "{data}", "--handover_step", "25"], "--handover_step"),
    (["--method", "imagerefl", "--train_data_dir", "{data}", "--stop_range", "2:5"], "--stop_range"),
    (["--refl_every", "1"], "--refl_every"),
    (["--reward_loss", "square"], "reward_loss"),
    (["--kl_coeff", "-1"], "kl_coeff"),
    (["--kl_coeff", "0.1", "--rank", "0", "--zero", "3"], "--kl_coeff with full fine-tuning"),
    (["--pretrain_loss_coeff", "0.1"], "--pretrain_loss_coeff needs"),
    (["--diffusion_loss_weight", "nan"], "diffusion_loss_weight"),
    (["--train_data_dir", "/nonexistent/folder"], "--train_data_dir"),
    (["--coco_captions", "/nonexistent.json"], "--coco_captions"),
    (["--eval_every", "-2"], "eval_every"),
    (["--eval_images_per_prompt", "1"], "--eval_images_per_prompt"),
])
def test_bad_flags_are_one_line_errors(tmp_path, argv, match):
    from refl_engine.config import ConfigError, parse_args
    from refl_engine.toyworld.make_dataset import make_dataset

    make_dataset(tmp_path / "data", 2)
    argv = [a.replace("{data}", str(tmp_path / "data")) for a in argv] + ["--output_dir", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match=match) as e:
        parse_args(argv)
    assert "\n" not in str(e.value)


def test_pretrain_loss_is_the_denoising_loss_on_a_real_batch(tiny64):
    """The pre-training term against the same draws replayed by hand: VAE posterior sample,
    timesteps, noise, then ||eps - eps_theta(x_t, t, c)||^2 at each sample's own timestep."""
    from refl_engine.regularizers import pretrain_loss

    unet, vae, cond, sched = tiny64
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)

    class Text:
        def conditioning(self, captions, cfg):
            assert captions == ["x", "y"] and not cfg
            return Conditioning(cond.cond)

    def trainer(policy=None):
        return SimpleNamespace(
            generator=torch.Generator().manual_seed(9), device=torch.device("cpu"), unet=unet, text=Text(),
            dataset=SimpleNamespace(sample=lambda b, gen: (images, ["x", "y"])), policy=policy,
            components=SimpleNamespace(vae=vae), schedule=DDIMSchedule.from_scheduler(sched, N))

    got = float(pretrain_loss({"trainer": trainer(), "prompts": ["p", "q"]}).detach())
    # through the memory policy's own one-call window (checkpointed): the same value
    got_policy = float(pretrain_loss({"trainer": trainer(FullRecompute()), "prompts": ["p", "q"]}).detach())
    assert got_policy == got
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        dist = vae.encode(images * 2 - 1).latent_dist
        x0 = (dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen, dtype=torch.float64)) \
            * vae.config.scaling_factor
        t = torch.randint(0, 1000, (2,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
        a = sched.alphas_cumprod.double()[t].view(2, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=cond.cond).sample
    expected = float(((pred - eps) ** 2).mean())
    assert expected > 0 and abs(got - expected) <= 1e-12 + 1e-10 * expected

"""DDIM step math, x0_hat, the noise helper, and the trajectory runner
with a gradient window.

The runner is the one loop all methods share: steps before the window run under torch.no_grad()
and build no graph; steps inside it carry gradient and go through the memory policy
(engine/memory/recompute.py), which decides what each UNet call keeps for backward. The method
opens the policy's window (`policy.window(size)`) around its whole rollout, so every grad-carrying
UNet call of a step, DRaFT-LV's re-noised ones included, has a position in one window.

The DDIM update is diffusers' `DDIMScheduler.step` (the tests compare against it), written on
tensors so that it carries gradient, for the three parameterisations diffusers defines
(`prediction_type`: epsilon, v_prediction, sample) and with its `clip_sample` clamp of x0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import ConfigError
from .memory.recompute import FullRecompute, MemoryPolicy


# ---------------------------------------------------------------- noise

def randn(shape, generator: torch.Generator | None = None, device: torch.device | str | None = None,
          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn on the GENERATOR's device and then moved.

    torch.randn refuses a generator on another device ("Expected a 'cuda' device type for
    generator"), and the trainer's generators live on the CPU so runs are reproducible and
    resumable on any hardware; drawing there and moving (as diffusers' `randn_tensor` does) also
    gives the same numbers on every device. Every place the engine draws noise goes through here.
    """
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)


# ---------------------------------------------------------------- the schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class DDIMSchedule:
    """N inference timesteps (high noise to low), the cumulative alphas DDIM needs, and what the
    model predicts."""

    timesteps: torch.Tensor  # (N,) long, t_N > ... > t_1
    alphas_cumprod: torch.Tensor  # (T,) float64
    final_alpha_cumprod: float
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    clip_sample_range: float | None = None  # x0 is clamped to [-r, r] when the scheduler clips

    @classmethod
    def from_scheduler(cls, scheduler, num_inference_steps: int) -> "DDIMSchedule":
        """Take timesteps, alphas, prediction type and x0 clipping from a diffusers DDIMScheduler
        (its spacing, offset and final-alpha conventions), so the math below agrees with
        `scheduler.step`. Settings this engine does not implement end in one ConfigError line."""
        c = scheduler.config
        prediction_type = c.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"the model's scheduler has prediction_type {prediction_type!r}, which is not supported; "
                              f"use a model that predicts one of: {', '.join(PREDICTION_TYPES)}")
        if c.get("thresholding", False):
            raise ConfigError("the model's scheduler sets thresholding=true (dynamic thresholding of x0, meant for "
                              "pixel-space models), which is not supported; set it false in scheduler_config.json")
        scheduler.set_timesteps(num_inference_steps)
        return cls(
            timesteps=scheduler.timesteps.clone().long(),
            alphas_cumprod=scheduler.alphas_cumprod.double().clone(),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            num_train_timesteps=c.num_train_timesteps,
            prediction_type=prediction_type,
            clip_sample_range=float(c.get("clip_sample_range", 1.0)) if c.get("clip_sample", False) else None,
        )

    def __len__(self) -> int:
        return len(self.timesteps)

    def _alphas(self) -> tuple[list[float], list[float]]:
        """(alpha, alpha_prev) of every step as Python floats, read once per schedule: indexing a
        tensor and taking .item() per step and per call cost ~0.3 ms a step on CPU."""
        cache = self.__dict__.get("_alpha_cache")
        if cache is None or cache[0] is not self.timesteps:
            ts = self.timesteps.tolist()
            ac = self.alphas_cumprod.tolist()
            # diffusers: prev_t = t - T // N, or the final alpha past the start of the schedule.
            gap = self.num_train_timesteps // len(ts)
            cache = (self.timesteps, [ac[t] for t in ts],
                     [ac[t - gap] if t - gap >= 0 else self.final_alpha_cumprod for t in ts])
            self.__dict__["_alpha_cache"] = cache
        return cache[1], cache[2]

    def alpha(self, i: int) -> float:
        return self._alphas()[0][i]

    def alpha_prev(self, i: int) -> float:
        return self._alphas()[1][i]

    def x0_hat(self, i: int, x: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """The predicted clean latent at step i (clipped as the scheduler clips it)."""
        return x0_hat(x, model_output, self.alpha(i), self.prediction_type, self.clip_sample_range)

    def step(self, i: int, x: torch.Tensor, model_output: torch.Tensor, eta: float = 0.0,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t_i} -> x_{t_{i-1}}: `scheduler.step(model_output, t_i, x, eta, variance_noise=noise)`."""
        return ddim_step(x, model_output, self.alpha(i), self.alpha_prev(i), eta, noise,
                         self.prediction_type, self.clip_sample_range)


def predict_x0_eps(x: torch.Tensor, model_output: torch.Tensor, alpha_bar: float, prediction_type: str = "epsilon",
                   clip_sample_range: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the model's output, with x_t = sqrt(a) x0 + sqrt(1 - a) eps:
    epsilon: the output is eps; v_prediction: v = sqrt(a) eps - sqrt(1 - a) x0; sample: it is x0.
    Clipping (diffusers' clip_sample) clamps x0 only; eps stays the model's."""
    a, b = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        x0, eps = (x - b * model_output) / a, model_output
    elif prediction_type == "v_prediction":
        x0, eps = a * x - b * model_output, a * model_output + b * x
    elif prediction_type == "sample":
        x0, eps = model_output, (x - a * model_output) / b
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    if clip_sample_range is not None:
        x0 = x0.clamp(-clip_sample_range, clip_sample_range)
    return x0, eps


def x0_hat(x: torch.Tensor, model_output: torch.Tensor, alpha_bar: float, prediction_type: str = "epsilon",
           clip_sample_range: float | None = None) -> torch.Tensor:
    """The predicted clean latent; for epsilon (x_t - sqrt(1 - a) eps) / sqrt(a)."""
    return predict_x0_eps(x, model_output, alpha_bar, prediction_type, clip_sample_range)[0]


def ddim_step(x: torch.Tensor, model_output: torch.Tensor, alpha_bar: float, alpha_bar_prev: float,
              eta: float = 0.0, noise: torch.Tensor | None = None, prediction_type: str = "epsilon",
              clip_sample_range: float | None = None) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

    sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev);
    x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps_hat + sigma z.
    """
    x0, eps = predict_x0_eps(x, model_output, alpha_bar, prediction_type, clip_sample_range)
    sigma = 0.0
    if eta > 0:
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5
    x_prev = alpha_bar_prev**0.5 * x0 + (1.0 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs the noise z")
        x_prev = x_prev + sigma * noise
    return x_prev


# ---------------------------------------------------------------- the window

@dataclass
class Window:
    """Which steps carry gradient.

    starts: per sample, the first step index (0 = t_N, the noisiest) whose UNet call carries
        gradient; N means "no step". DRaFT-K: N - K for every sample; AlignProp: drawn per sample.
    stop: ReFL only: the step index at which to stop and return x0_hat of that step's prediction.
    """

    starts: list[int]
    stop: int | None = None

    def first(self) -> int:
        return min(self.starts)

    def last(self, num_steps: int) -> int:
        return self.stop if self.stop is not None else num_steps - 1

    def size(self, num_steps: int) -> int:
        """The number of grad-carrying UNet calls the runner makes for this draw."""
        return max(0, self.last(num_steps) - self.first() + 1)


# ---------------------------------------------------------------- the runner

# (x, t) -> the guided model output: eps, v or x0 as the schedule's prediction_type says
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def run_trajectory(eps_fn: EpsFn, schedule: DDIMSchedule, x: torch.Tensor, window: Window,
                   policy: MemoryPolicy | None = None, eta: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Run x_T down the schedule; return x0 (with the graph of the window steps attached).

    Sample b's steps before `window.starts[b]` carry no gradient; steps before the window's first
    step run under no_grad entirely. With eta > 0 the per-step noise is drawn from `generator`.
    The grad-carrying calls go through `policy` inside its open window (the method's rollout
    opens it); called on its own (sampling, tests) the runner opens one for `window` itself.
    """
    policy = policy or FullRecompute()
    n = len(schedule)
    if not policy.in_window:
        with policy.window(window.size(n)):
            return run_trajectory(eps_fn, schedule, x, window, policy, eta, generator)
    if len(window.starts) != x.shape[0]:
        raise ValueError(f"window has {len(window.starts)} starts for a batch of {x.shape[0]}")
    first, last = window.first(), window.last(n)
    for i in range(n):
        t = schedule.timesteps[i].to(x.device)
        noise = randn(x.shape, generator, x.device, x.dtype) if eta > 0 else None
        if i < first or i > last:
            with torch.no_grad():
                x = schedule.step(i, x, eps_fn(x, t), eta, noise)
            continue
        out = policy.unet_call(eps_fn, x, t)
        if i == window.stop:
            return schedule.x0_hat(i, x, out)
        x_next = schedule.step(i, x, out, eta, noise)
        late = [s > i for s in window.starts]  # on the host: no device sync per step
        if any(late):
            # Samples whose own window has not begun keep the value but drop the graph.
            inactive = torch.tensor(late, device=x.device).view(-1, *([1] * (x.dim() - 1)))
            x = torch.where(inactive, x_next.detach(), x_next)
        else:
            x = x_next
    return x


def renoise_and_denoise(eps_fn: EpsFn, schedule: DDIMSchedule, x0: torch.Tensor, noise: torch.Tensor,
                        policy: MemoryPolicy) -> torch.Tensor:
    """DRaFT-LV's inner step: x1 = sqrt(a1) stop_grad(x0) + sqrt(1 - a1) noise at the last
    (least noisy) schedule step t_1, then one grad-carrying DDIM step back to x0. The UNet call is
    the next call of the policy's open window."""
    i = len(schedule) - 1
    a = schedule.alpha(i)
    x1 = a**0.5 * x0.detach() + (1 - a) ** 0.5 * noise
    t = schedule.timesteps[i].to(x0.device)
    return schedule.step(i, x1, policy.unet_call(eps_fn, x1, t))

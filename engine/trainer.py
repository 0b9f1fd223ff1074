"""The training loop. Read `ReFLTrainer.train` top to bottom; `train_step` is one optimizer step.

One step, as data: prompts -> cached text embeddings -> method.window -> x_T down the
schedule (no-grad outside the window, the memory policy inside) -> x0 -> VAE decode -> reward ->
method.loss (+ regularizers) -> backward -> clip -> optimizer step -> log, sample, checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from .config import ConfigError, TrainConfig, parse_memory, validate
from .data import image_dataset, load_prompts, sample_prompts, warn_long_prompts
from .memory.recompute import build_policy
from .methods import SamplingChain, build_method
from .models.conditioning import TextEncoderCache, make_eps_fn
from .models.load import load_pipeline_components
from .models.lora import has_lora
from .models.place import place_frozen, prepare_unet
from .optim import build_optimization
from .regularizers import attach_regularizers, reward_objective, watch_rollout
from .rewards.base import RewardSpecError, build_reward, check_reward_spec
from .sampling import DDIMSchedule, Window, randn, run_trajectory
from .tracking import DeviceMonitor, Trackers, check_report_to, start_trackers

log = logging.getLogger("refl_engine")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); the message says why."""


class ReFLTrainer:
    """Fine-tunes a diffusion model on a differentiable reward with ReFL / DRaFT / AlignProp."""

    def __init__(self, config: TrainConfig):
        validate(config)
        self.cfg = config
        self.rank, self.world_size, _ = dist.world_info()
        self.is_main = self.rank == 0
        self.step = 0
        self._setup_done = False

    # ------------------------------------------------------------ setup

    def setup(self) -> "ReFLTrainer":
        if self._setup_done:
            return self
        cfg = self.cfg
        try:
            self._setup()
        except RewardSpecError as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        self._setup_done = True
        return self

    def _setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world_size, self.device, self.use_deepspeed = dist.init_process_group(cfg)
        self.is_main = self.rank == 0
        self.engine = None  # the DeepSpeed engine, when one runs (engine/distributed.py)
        self.collective_sampling = False  # ZeRO-3: generating gathers weights, so every rank generates
        mp = cfg.optim.mixed_precision
        if self.device.type == "cpu" and mp != "no":
            log.warning("--mixed_precision %s is for GPUs; this CPU run uses fp32", mp)
            mp = "no"
        self.autocast_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mp]
        weight_dtype = self.autocast_dtype or torch.float32

        torch.manual_seed(cfg.optim.seed)
        # Shared by all ranks: the global batch's prompts and noise (each rank keeps its slice).
        self.generator = torch.Generator().manual_seed(cfg.optim.seed)
        # This rank's own draws (windows, eta noise).
        self.rank_generator = torch.Generator().manual_seed(cfg.optim.seed + 1000003 * (self.rank + 1))

        # Cheap checks of user input first, so a typo fails before minutes of loading.
        self.prompts = load_prompts(cfg.data.prompts)
        self.sample_prompts = sample_prompts(cfg.data, self.prompts)
        check_reward_spec(cfg.method.reward)
        # The reward before the diffusion model: a malformed reward checkpoint is caught by loading
        # it, and should not wait for minutes of model loading.
        try:
            self.reward = build_reward(cfg.method.reward, cfg.method.reward_output).to(self.device, weight_dtype)
        except (RewardSpecError, FileNotFoundError) as e:
            raise ConfigError(str(e).splitlines()[0]) from None

        c = load_pipeline_components(cfg.model.model, cfg.model.revision, cache_dir=cfg.model.cache_dir,
                                     variant=cfg.model.variant)
        self.components = c
        warn_long_prompts(self.prompts, c.tokenizer)
        place_frozen(c, self.device, weight_dtype, cfg.model.kernels)
        self.unet = c.unet
        self.params = prepare_unet(self.unet, cfg.model, self.device, weight_dtype)  # LoRA or all, kernels

        self.height, self.width = c.image_size(cfg.model.resolution, cfg.model.height, cfg.model.width)
        self.resolution = max(self.height, self.width)  # the planner's square side (an upper bound)
        self.latent_size = (self.height // c.vae_scale_factor, self.width // c.vae_scale_factor)
        self.schedule = DDIMSchedule.from_scheduler(c.scheduler, cfg.method.num_inference_steps)
        self.method = build_method(cfg.method)
        # full fine-tuning's KL base: a frozen copy of the UNet as loaded, made before DeepSpeed wraps it
        attach_regularizers(self.method, cfg.method, self.unet, weight_dtype)
        # Real image-caption pairs (ImageReFL, --pretrain_loss_coeff), this rank's shard.
        self.dataset = image_dataset(cfg, (self.height, self.width), self.rank, self.world_size)
        budget = parse_memory(cfg.memory.memory_budget) if cfg.memory.memory_budget else None
        policy_kwargs = dict(checkpoint_decode=cfg.memory.checkpoint_decode,
                             checkpoint_reward=cfg.memory.checkpoint_reward,
                             lean_decode=cfg.memory.lean_decode,
                             recompute_chunk=cfg.memory.recompute_chunk)
        if cfg.memory.recompute == "auto":
            from .memory.planner import auto_reserve_bytes

            # Hold back what decode and reward need after the window, as the planner counts it, for
            # each way of running them the flags allow (--no_checkpoint_decode / _reward: never
            # checkpointed): the plan chooses. No --memory_budget: the device's free memory now.
            # On a CPU the budget is resident memory, not tensor bytes (AutoRecompute.host_rss).
            reserves = {
                (d, r): auto_reserve_bytes(
                    c.path if Path(c.path).is_dir() else c.kind, self.resolution, cfg.optim.train_batch_size,
                    cfg.optim.mixed_precision, cfg.method.reward, d, r, cfg.memory.lean_decode)
                for d in {False, cfg.memory.checkpoint_decode} for r in {False, cfg.memory.checkpoint_reward}}
            policy_kwargs.update(budget_bytes=budget, device=self.device, reserve_bytes=reserves,
                                 host_rss=self.device.type == "cpu")
        try:
            self.policy = build_policy(cfg.memory.recompute, **policy_kwargs)
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e).splitlines()[0]) from None
        self.text = TextEncoderCache(c, self.device, weight_dtype, self.height, self.width)
        if self.use_deepspeed:  # DeepSpeed owns optimizer, schedule and loss scaling
            self.engine, self.optimizer, self.lr_schedule = dist.initialize(self)
            self.collective_sampling = dist.zero_stage(self.engine) == 3
            self.scaler = None
            # DeepSpeed's gradient hooks would take the profile's gradients for real ones
            self.policy.profile_into_grad = False
        else:
            self.optimizer, self.lr_schedule, self.scaler = build_optimization(self.params, cfg.optim, mp)
        self.out = Path(cfg.output.output_dir)
        self.monitor = DeviceMonitor(self.device)
        self.history: list[dict] = []
        self.nonfinite_in_a_row = 0

    # ------------------------------------------------------------ pieces of a step

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]. A VAE kept in fp32 under fp16 training (`force_upcast`, see
        _setup) decodes outside autocast, in fp32, as the SDXL pipeline decodes."""
        vae = self.components.vae
        dtype = next(vae.parameters()).dtype
        upcast = self.autocast_dtype == torch.float16 and dtype == torch.float32
        with torch.autocast(self.device.type, enabled=False) if upcast else contextlib.nullcontext():
            z = latents.to(dtype) / vae.config.scaling_factor
            return (vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    def sample_prompts_batch(self, batch_size: int) -> list[str]:
        """This rank's slice of a global batch of world_size x batch_size prompts, drawn from the
        generator all ranks share: N ranks x batch b draw what one process of batch N x b draws."""
        idx = torch.randint(len(self.prompts), (batch_size * self.world_size,), generator=self.generator)
        return [self.prompts[i] for i in self.rank_slice(idx).tolist()]

    def rank_slice(self, global_batch: torch.Tensor) -> torch.Tensor:
        b = global_batch.shape[0] // self.world_size
        return global_batch[self.rank * b:(self.rank + 1) * b]

    def initial_noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        shape = (batch_size, self.unet.config.in_channels, *self.latent_size)
        return randn(shape, generator, self.device)

    def sampling_chain(self, prompts: list[str]) -> SamplingChain:
        g = self.cfg.method.guidance_scale
        cond = self.text.conditioning(prompts, cfg=g > 1.0)
        return SamplingChain(make_eps_fn(self.unet, cond, g), self.schedule, self.policy, self.cfg.method.eta)

    def micro_step(self, prompts: list[str]) -> dict:
        """One forward + backward on one micro-batch; returns its numbers (loss already scaled
        for accumulation). A loss non-finite on any rank is not backpropagated (under DeepSpeed
        every rank backpropagates a non-finite one instead: distributed.backward)."""
        if hasattr(self.method, "prepare_batch"):  # ImageReFL: a real batch's captions replace the prompts
            prompts = self.method.prepare_batch(self, prompts)
        # the global batch's noise from the shared generator, this rank's slice (sample_prompts_batch)
        x_T = self.rank_slice(self.initial_noise(len(prompts) * self.world_size, self.generator))
        with self._autocast():
            chain = watch_rollout(self.method, self.sampling_chain(prompts))
            rollout = self.method.rollout(chain, x_T, self.rank_generator)
            rewards = []
            for x0 in rollout.x0s:
                images = self.policy.decode_call(self.decode, x0)
                rewards.append(self.policy.reward_call(self.reward, images, prompts).float())
            loss = reward_loss = self.method.loss([reward_objective(r, self.cfg.method) for r in rewards])
            terms = self.method.regularize({"trainer": self, "prompts": prompts, "rollout": rollout})
            for value in terms.values():
                loss = loss + value
        reward = rewards[0].detach()  # the sampled image's (DRaFT-LV's copies only feed the loss)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(reward).all())
        finite = dist.backward(self, loss, finite)  # agreed by all ranks
        return dict(loss=float(loss.detach()), reward=reward.cpu(), finite=finite,
                    reg_reward_loss=float(reward_loss.detach()),
                    window_size=rollout.window_size, window_starts=rollout.window.starts,
                    **{f"reg_{k}": float(v.detach()) for k, v in terms.items()})

    def train_step(self) -> dict:
        """One optimizer step (with gradient accumulation); returns its metrics."""
        self.setup()
        o = self.cfg.optim
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.unet.train()
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        results = []
        for i in range(o.gradient_accumulation_steps):
            results.append(self.micro_step(self.sample_prompts_batch(o.train_batch_size)))
            if self.engine is not None:  # DeepSpeed: step() after every micro-batch, applied at the last
                applied, grad_norm = dist.engine_step(self, boundary=i == o.gradient_accumulation_steps - 1)
        finite = all(r["finite"] for r in results)
        if self.engine is not None:
            finite = finite and applied  # DeepSpeed drops a non-finite update on every rank
        else:
            grad_norm = float("nan")
            if finite:
                if self.scaler:
                    self.scaler.unscale_(self.optimizer)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm or float("inf")))
                finite = math.isfinite(grad_norm)
            if finite:
                if self.scaler:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.lr_schedule.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)  # never apply a NaN update
                if self.scaler:
                    self.scaler.update()
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        self.step += 1
        rewards = dist.all_gather_cat(torch.cat([r["reward"] for r in results]))  # the global batch's
        metrics = dict(
            step=self.step,
            loss=sum(r["loss"] for r in results) / len(results),
            reward_mean=float(rewards.mean()),
            reward_std=float(rewards.std(unbiased=False)) if rewards.numel() > 1 else 0.0,
            grad_norm=grad_norm,
            lr=self.lr_schedule.get_last_lr()[0],
            window_size=max(r["window_size"] for r in results),
            skipped=not finite,
            seconds=time.perf_counter() - t0,
            **self.monitor.read(),
        )
        for key in results[0]:
            if key.startswith("reg_"):  # the loss terms by name: reward_loss, diffusion_loss, kl, ...
                metrics[key[4:]] = sum(r[key] for r in results) / len(results)
        if not finite:
            log.warning("step %d: non-finite loss, reward or gradient; update skipped (%d in a row)",
                        self.step, self.nonfinite_in_a_row)
            if self.nonfinite_in_a_row >= o.max_nonfinite_steps:
                raise TrainingError(
                    f"{self.nonfinite_in_a_row} non-finite steps in a row (limit --max_nonfinite_steps "
                    f"{o.max_nonfinite_steps}); lower --learning_rate or check the reward for NaN/inf")
        return metrics

    # ------------------------------------------------------------ samples, plots, checkpoints

    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int = 1234) -> torch.Tensor:
        """Images in [0, 1] for `prompts`, one fixed seed per prompt position (no gradient)."""
        was_training = self.unet.training
        self.unet.eval()
        g = torch.Generator().manual_seed(seed)
        x_T = self.initial_noise(len(prompts), g)
        window = Window(starts=[len(self.schedule)] * len(prompts))
        with self._autocast():
            chain = self.sampling_chain(prompts)
            x0 = run_trajectory(chain.eps_fn, self.schedule, x_T, window, self.policy, chain.eta, generator=g)
            images = self.decode(x0)
        self.unet.train(was_training)
        return images.float().cpu()

    def save_samples(self, tag: str, tracking=None) -> float:
        """The sample grid for the current weights (fixed prompts and seeds) to samples/<tag>.png
        (captioned) and samples/<tag>-full.png (full resolution), and to the trackers."""
        from .viz import save_grid

        images = self.generate(self.sample_prompts)  # under ZeRO-3 every rank runs it (collective_sampling)
        rewards = self.reward(images.to(self.device), self.sample_prompts).float().cpu()
        if not self.is_main:
            return float(rewards.mean())
        save_grid(images, self.sample_prompts, rewards.tolist(), self.out / "samples" / f"{tag}.png",
                  title=f"{tag}: mean {self.reward.name} {rewards.mean():.4f}")
        if tracking is not None:
            captions = [f"{p} | {self.reward.name} {r:.4f}" for p, r in zip(self.sample_prompts, rewards.tolist())]
            tracking.log_images("samples", images, captions, self.step)
            tracking.log({"sample_reward_mean": float(rewards.mean())}, self.step)
        return float(rewards.mean())

    def state_for_checkpoint(self) -> dict:
        """Everything resume needs, gathered: the trainable weights (None for full fine-tuning,
        whose checkpoint keeps the whole UNet as its unet/ export), optimizer, RNG, counters."""
        rng = dist.rng_state(self)
        optim = {"optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict()}
        if self.scaler:
            optim["scaler"] = self.scaler.state_dict()
        trainable = ({n: p for n, p in self.unet.named_parameters() if p.requires_grad}
                     if has_lora(self.unet) else None)
        return dict(trainable=trainable, optimizer=optim, rng=rng,
                    state={"config": self.cfg.to_dict(), "nonfinite_in_a_row": self.nonfinite_in_a_row})

    def save_checkpoint(self) -> Path | None:
        """checkpoints/checkpoint-<step>, exports included, in one atomic rename (main process)."""
        if self.engine is not None:  # DeepSpeed's layout; every rank writes its part
            return dist.save_checkpoint(self)
        if not self.is_main:
            return None
        s = self.state_for_checkpoint()
        return ckpt.save_checkpoint(self.out / "checkpoints", self.step, trainable=s["trainable"],
                                    optimizer_state=s["optimizer"], rng_state=s["rng"], state=s["state"],
                                    export=lambda folder: ckpt.export_weights(self.unet, folder),
                                    keep_last=self.cfg.output.checkpoints_total_limit)

    def resume(self, spec: str) -> bool:
        path = ckpt.resolve_checkpoint(spec, self.out / "checkpoints")
        if path is None:
            log.info("--resume_from_checkpoint latest: no checkpoint yet in %s; starting fresh", self.out)
            return False
        if self.engine is not None or dist.is_deepspeed_checkpoint(path):
            if self.engine is None:
                raise ConfigError(f"{path} was written by a DeepSpeed run; resume it with the same launch and "
                                  "--zero/--offload flags")
            return dist.load_checkpoint(self, path)
        data = ckpt.load_checkpoint(path)
        params = dict(self.unet.named_parameters())
        missing = [n for n in data["trainable"] if n not in params]
        if missing or len(data["trainable"]) != len([p for p in params.values() if p.requires_grad]):
            raise ConfigError(f"checkpoint {path} does not match this model's trainable parameters "
                              f"(e.g. {missing[:1]}); resume with the same --model and --rank")
        with torch.no_grad():
            for n, t in data["trainable"].items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))
        self.optimizer.load_state_dict(data["optimizer"]["optimizer"])
        self.lr_schedule.load_state_dict(data["optimizer"]["lr_schedule"])
        if self.scaler and "scaler" in data["optimizer"]:
            self.scaler.load_state_dict(data["optimizer"]["scaler"])
        dist.set_rng_state(self, data["rng"])
        self.step = int(data["state"]["step"])
        self.nonfinite_in_a_row = int(data["state"].get("nonfinite_in_a_row", 0))
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg
        out = Path(cfg.output.output_dir)
        if self.is_main:  # cheap checks of the output side before minutes of loading
            check_report_to(cfg.output.report_to)
            ckpt.claim_output_dir(out, resume=bool(cfg.output.resume_from_checkpoint),
                                  overwrite=cfg.output.overwrite_output_dir, logging_dir=cfg.output.logging_dir)
        self.setup()
        out.mkdir(parents=True, exist_ok=True)
        if cfg.output.resume_from_checkpoint:
            self.resume(cfg.output.resume_from_checkpoint)
        metrics_path = out / "metrics.jsonl"
        tracking = Trackers([])
        if self.is_main:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            self.history = ckpt.history_upto(metrics_path, self.step)
            tracking = start_trackers(cfg.output.report_to, out, cfg.to_dict(), project=cfg.output.tracker_project_name,
                                      resume_step=self.step, logging_dir=cfg.output.logging_dir)
        try:
            summary = self._loop(out, metrics_path, tracking)
        finally:
            tracking.finish()
        return summary

    def _loop(self, out: Path, metrics_path: Path, tracking) -> dict:
        cfg = self.cfg
        reward_before = None
        if self.step == 0 and (self.is_main or self.collective_sampling):
            reward_before = self.save_samples("step-000000", tracking)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.optim.max_train_steps, initial=self.step, desc=f"{cfg.method.method}",
                   disable=not (self.is_main and cfg.output.progress), dynamic_ncols=True)
        t_start = time.perf_counter()
        while self.step < cfg.optim.max_train_steps:
            try:
                metrics = self.train_step()
            except BaseException:  # the bar's line ends before the error's (one line, the last)
                bar.close()
                raise
            if cfg.output.eval_every and self.step % cfg.output.eval_every == 0 and (
                    self.is_main or self.collective_sampling):
                from .evaluate import heldout_metrics

                metrics.update(heldout_metrics(self))  # held-out reward and diversity
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.4f}", loss=f"{metrics['loss']:.4f}",
                            s=f"{metrics['seconds']:.2f}")
            if self.is_main:
                self.history.append(metrics)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                tracking.log(metrics, self.step)
            every = cfg.output.checkpointing_steps  # every rank: DeepSpeed's save is collective
            if every and self.step % every == 0 and self.step < cfg.optim.max_train_steps:
                self.save_checkpoint()
            if cfg.output.sample_every and self.step % cfg.output.sample_every == 0 and (
                    self.is_main or self.collective_sampling):
                self.save_samples(f"step-{self.step:06d}", tracking)
        bar.close()
        path = self.save_checkpoint()
        if self.is_main or self.collective_sampling:
            reward_after = self.save_samples(f"step-{self.step:06d}", tracking)
        if not self.is_main:
            return {}
        weights = (dist.publish_weights(self, path, out) if self.engine is not None
                   else ckpt.publish_weights(self.unet, out))  # the diffusers examples' layout
        if reward_before is None:
            reward_before = ckpt.reward_before(out)
        from .viz import plot_reward_curve

        plot_reward_curve(self.history, out / "reward_curve.png", self.reward.name)
        secs = [m["seconds"] for m in self.history]
        summary = dict(
            method=cfg.method.method, K=cfg.method.K, model=self.components.path, reward=self.reward.name,
            steps=self.step, num_inference_steps=cfg.method.num_inference_steps,
            sample_reward_before=reward_before, sample_reward_after=reward_after,
            train_reward_first=self.history[0]["reward_mean"] if self.history else None,
            train_reward_last10=(sum(m["reward_mean"] for m in self.history[-10:]) / len(self.history[-10:])
                                 if self.history else None),
            median_seconds_per_step=sorted(secs)[len(secs) // 2] if secs else None,
            skipped_steps=sum(1 for m in self.history if m.get("skipped")),
            wall_seconds=time.perf_counter() - t_start,
            outputs=dict(weights=str(weights), samples=str(out / "samples"), reward_curve=str(out / "reward_curve.png"),
                         metrics=str(metrics_path), checkpoints=str(out / "checkpoints")),
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

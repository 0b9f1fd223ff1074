"""The memory-budget planner: predict the peak bytes of one training step without weights.

How: `trace.py` runs one call of the UNet, the VAE decoder and the reward on the meta device (models
built by `meta.py` from their configs) and profiles each as a `CallProfile`:

    retained   bytes the call leaves alive for backward (its output excluded)
    fwd_peak   peak above the bytes live before the call, during its forward
    bwd_peak   peak above the bytes live before the call, during its backward (recompute included)

at batch 1 (activations are proportional to the batch; the planner scales). `full` is derived
from the `none` and no-grad traces. A step is then composed here: parameters, gradients and
optimizer state, plus the largest of the phase peaks of the window (each window position's
retained bytes stacked, then the backward of the last one), the VAE decode and the reward.
`window.plan_window` is the shared optimiser that `--recompute auto` uses too. The window's size
comes from the method (`grad_calls`), as the trainer's rollout makes its calls.

Offline code (planner, trace, meta) imports the runtime (recompute, lean mode, window, measure),
never the other way.

Precision model (stated, not measured on GPU here): with --mixed_precision bf16/fp16 activations
and frozen weights are half precision; trainable LoRA weights, master weights of a full fine-tune,
their gradients and AdamW moments are fp32; 8-bit AdamW keeps two uint8 moments plus one fp32
absmax per 2048 values; a full fine-tune under autocast also holds one half copy of the UNet's
weights. ZeRO-3 with CPU offload keeps parameters, gradients and optimizer state of the UNet on
the host and holds on the GPU the half working copy of the parameters being gathered
(stage3_max_live_parameters = 1e9) and one reduce bucket (5e8 elements).

--kl_coeff (regularizers.KLPenalty): after each grad-carrying window call the base model runs once
more without gradient (a no-grad call's transient on top of what the step keeps), and both outputs
stay referenced until the penalty is computed after the rollout; under full fine-tuning the base
model is a frozen copy of the UNet in the training dtype, resident for the whole run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .meta import REWARD_BACKBONES, dtype_of, model_spec, param_counts, reward_terms
from .recompute import AFTER_RECOMPUTE_COST, CHUNKABLE, chunked_profile
from .trace import cached_json, trace
from .window import RECOMPUTE_COST, WINDOW_KINDS, CallProfile, WindowPlan, _window_peak, plan_window  # noqa: F401

GiB = 2**30


OPTIMIZERS = ("adamw", "adamw8bit", "cpu-adam")
POLICIES = ("none", "lean", "full", "selective", "nested", "auto")


@dataclass
class PlanSpec:
    model: str | None = "sd15"
    resolution: int = 0  # 0 = native
    height: int = 0  # non-square: 0 = --resolution; the activations are planned for the larger side, squared
    width: int = 0
    revision: str | None = None  # of a hub --model (its configs are read)
    cache_dir: str | None = None
    batch_size: int = 1
    method: str = "draft"
    K: str = "full"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    rank: int = 8
    lora_targets: str = "to_q,to_k,to_v,to_out.0"
    mixed_precision: str = "bf16"
    optimizer: str = "adamw"
    zero: int = 0
    offload: bool | str = False  # "none" | "optimizer" | "param" (--offload); True = the most the stage offloads
    num_gpus: int = 1  # data-parallel processes: ZeRO partitions optimizer state (1+), gradients (2+), weights (3)
    recompute: str = "selective"
    budget_gb: float | None = None  # GiB; None = detected GPU or 80
    reserve_gb: float = 3.0  # CUDA context, cuBLAS/cuDNN workspaces, allocator fragmentation
    reward: str | None = None  # None: aesthetic (CLIP ViT-L/14) for sd15/sdxl, colorfulness for tiny-sd
    checkpoint_decode: bool = True
    lean_decode: bool = True  # MemoryPolicy.lean_decode
    checkpoint_reward: bool = True
    decode_chunk: int = 1  # samples per checkpointed decode chunk (MemoryPolicy.decode_chunk); 0 = whole batch
    recompute_chunk: int = 0  # samples per checkpoint of a full/selective/nested call; 0 = whole batch (auto: chosen)
    lv_inner: int = 2
    use_cache: bool = True
    method_options: dict = field(default_factory=dict)  # other MethodConfig fields (alignprop_k_max, ...)

    def method_config(self):
        from ..config import MethodConfig

        return MethodConfig(method=self.method, K=str(self.K), num_inference_steps=self.num_inference_steps,
                            guidance_scale=self.guidance_scale, lv_inner=self.lv_inner, **self.method_options)

    def window_size(self) -> int:
        """Grad-carrying UNet calls of one rollout, as the method makes them (its largest draw:
        AlignProp's k_max, DRaFT-LV's 1 + n): the method is the only source of the window."""
        from ..methods import build_method

        mc = self.method_config()
        # --pretrain_loss_coeff: one more grad-carrying UNet call (its own one-call window), kept
        # beside the rollout's until the joint backward; counted as a guided call (an upper bound:
        # it runs unguided). --kl_coeff's base calls run without grad (Planner.kl_profiles).
        return build_method(mc).grad_calls(self.num_inference_steps) + (mc.pretrain_loss_coeff > 0)


@dataclass
class Plan:
    spec: dict
    peak_bytes: int
    fits: bool
    budget_bytes: int
    usable_bytes: int
    max_batch: int
    recommended_recompute: str | None
    components: dict
    window: dict
    policies: dict  # policy -> peak bytes at this batch
    param_counts: dict = field(default_factory=dict)
    host_bytes: int = 0  # CPU memory of one process for what --offload moves there
    suggestions: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def detect_budget_gib() -> tuple[float, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
        name = pynvml.nvmlDeviceGetName(handle)
        return total / GiB, f"detected {name if isinstance(name, str) else name.decode()}"
    except Exception:  # noqa: BLE001 - no NVML, no driver, no GPU
        return 80.0, "default 80 GiB (no GPU detected)"


class Planner:
    """Holds the traced profiles of one model/resolution/precision and composes plans from them."""

    def __init__(self, spec: PlanSpec):
        from ..config import ConfigError, check_resolution, resolution_multiple

        if spec.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {spec.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        if spec.recompute not in POLICIES:
            raise ConfigError(f"--recompute {spec.recompute!r}: choose one of {', '.join(POLICIES)}")
        if spec.zero not in (0, 1, 2, 3):
            raise ConfigError("--zero must be 0, 1, 2 or 3")
        spec.window_size()  # an unknown method or a K out of range fails here, with the trainer's message
        if spec.recompute == "nested" and spec.zero == 3:
            raise ConfigError("--recompute nested cannot run with ZeRO-3 (its partitioned parameters cannot be the "
                              "nested recompute's inputs); use --recompute selective or auto, or --zero 2")
        if spec.method_config().kl_coeff > 0 and spec.rank == 0 and spec.zero == 3:
            raise ConfigError("--kl_coeff with full fine-tuning (--rank 0) keeps a frozen copy of the whole UNet, "
                              "which ZeRO-3 would not partition; use LoRA (--rank > 0) or --zero 2")
        self.spec = spec
        self.model = model_spec(spec.model, spec.revision, spec.cache_dir)
        if spec.reward is None:
            spec.reward = "colorfulness" if self.model.name.startswith(("tiny-sd", "toy-world")) else "aesthetic"
        for name in reward_terms(spec.reward):
            if name not in REWARD_BACKBONES:
                raise ConfigError(f"--reward {name!r}: the planner knows {', '.join(REWARD_BACKBONES)}")
        # the trainer's check (Components.image_size): each side a multiple of the down-sampling
        multiple = resolution_multiple(self.model.vae["block_out_channels"], self.model.unet["block_out_channels"])
        sides = []
        for name, side in (("height", spec.height), ("width", spec.width)):
            if not side:
                name, side = "resolution", spec.resolution or self.model.native_resolution
            check_resolution(side, multiple, name)
            sides.append(side)
        self.resolution = max(sides)  # an upper bound for a non-square size
        self._static = None

    # -- static bytes ---------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        if self._static is None:
            s = self.spec
            key = {"what": "params", "unet": self.model.unet, "vae": self.model.vae, "te": self.model.text_encoders,
                   "rank": s.rank, "targets": s.lora_targets, "reward": s.reward}
            counts = cached_json(key, lambda: param_counts(self.model, s.rank, s.lora_targets, s.reward), s.use_cache)
            self._static = {k: int(v) for k, v in counts.items()}
        return self._static

    @property
    def vae_precision(self) -> str:
        """The trainer keeps a `force_upcast` VAE (SDXL's) in fp32 under fp16 and decodes in fp32
        (models/load.py vae_dtype)."""
        fp16 = self.spec.mixed_precision == "fp16"
        return "no" if fp16 and self.model.vae.get("force_upcast", False) else self.spec.mixed_precision

    @property
    def kl_penalty(self) -> bool:
        return self.spec.method_config().kl_coeff > 0

    def state_bytes(self, optimizer: str | None = None, offload: bool | str | None = None, zero: int | None = None,
                    rank: int | None = None) -> dict[str, int]:
        s = self.spec
        optimizer = optimizer or s.optimizer
        offload = s.offload if offload is None else offload
        zero = s.zero if zero is None else zero
        if not isinstance(offload, str):  # True: the most ZeRO offloads at this stage
            offload = ("param" if zero == 3 else "optimizer") if offload else "none"
        rank = s.rank if rank is None else rank
        c = self.param_counts()
        half = dtype_of(s.mixed_precision).itemsize
        frozen = c["text_encoders"] + c["reward"]
        vae = c["vae"] * dtype_of(self.vae_precision).itemsize
        out = {}
        if rank > 0:
            trainable = c["lora"]
            out["params"] = (c["unet"] + frozen) * half + vae + trainable * 4
        else:
            trainable = c["unet"]
            out["params"] = frozen * half + vae + trainable * 4
        opt_per = 2 + 8 / 2048 if optimizer == "adamw8bit" else 8  # AdamW / DeepSpeedCPUAdam: two fp32 moments
        out["grads"] = trainable * 4
        out["optimizer"] = int(trainable * opt_per)
        if rank == 0 and half < 4:
            out["autocast_weight_copy"] = trainable * half
        if offload == "param":
            # parameters, gradients, optimizer state of the trained model live on the host
            out["params"] -= trainable * 4
            out["grads"] = int(min(trainable, 5e8) * half)  # one reduce bucket
            out["optimizer"] = 0
            out["zero3_live_params"] = int(min(trainable, 1e9) * half)
            out.pop("autocast_weight_copy", None)
        elif offload == "optimizer":
            out["optimizer"] = 0  # ZeRO-Offload: optimizer state on the host
            out["grads"] = int(min(trainable, 5e8) * half)
        n = max(1, s.num_gpus)
        if n > 1:  # each GPU keeps its 1/n partition of what the stage shards
            if zero >= 1:
                out["optimizer"] = -(-out["optimizer"] // n)
            if zero >= 2 and offload == "none":
                out["grads"] = -(-out["grads"] // n)
            if zero == 3 and offload != "param":
                out["params"] -= trainable * 4 - -(-trainable * 4 // n)
                out["zero3_live_params"] = int(min(trainable, 1e9) * half)  # stage3_max_live_parameters gathered
        if rank == 0 and self.kl_penalty:  # KL's base model: a frozen copy in the training dtype, never sharded
            out["kl_base_copy"] = c["unet"] * half
        return out

    def host_bytes(self, optimizer: str | None = None, offload: bool | str | None = None,
                   zero: int | None = None) -> int:
        """CPU memory one process holds for --offload: its 1/n partition of the fp32 master
        weights, fp32 gradients and optimizer moments (and under `param` the half weights)."""
        s = self.spec
        optimizer = optimizer or s.optimizer
        offload = s.offload if offload is None else offload
        zero = s.zero if zero is None else zero
        if not isinstance(offload, str):
            offload = ("param" if zero == 3 else "optimizer") if offload else "none"
        if offload == "none":
            return 0
        c = self.param_counts()
        trainable = c["lora"] if s.rank > 0 else c["unet"]
        per = 8 + 4 + 4  # AdamW or DeepSpeedCPUAdam moments, fp32 master, fp32 gradient
        if offload == "param":
            per += dtype_of(s.mixed_precision).itemsize
        return -(-trainable * per // max(1, s.num_gpus))

    # -- traced profiles ----------------------------------------------------------------------------
    def unet_profiles(self, batch: int, x_grad: bool = True, rank: int | None = None) -> dict[str, CallProfile]:
        """Profiles of one guided UNet call at `batch` (traced at batch 1, scaled)."""
        s = self.spec
        rank = s.rank if rank is None else rank
        cross = [c.get("projection_dim", c["hidden_size"]) for c in self.model.text_encoders]
        unet_cfg = dict(self.model.unet)
        unet_cfg["_latent_factor"] = 2 ** (len(self.model.vae["block_out_channels"]) - 1)
        traced = trace("unet", s.use_cache, unet_cfg=unet_cfg, kind_model=self.model.kind, cross_dims=cross,
                        resolution=self.resolution, batch=1, cfg=s.guidance_scale > 1.0, dtype=s.mixed_precision,
                        rank=rank, lora_targets=s.lora_targets, x_grad=x_grad, kinds=["nograd", *WINDOW_KINDS])
        profiles = {k: v.scaled(batch) for k, v in traced.items()}
        if s.zero == 3:  # partitioned parameters: the nested kind runs as one selective checkpoint (nested.py)
            profiles["nested"] = profiles["selective"]
        elif s.zero in (1, 2):  # the calls return their parameter gradients at once (distributed.backward)
            n = self.param_counts()["lora" if rank > 0 else "unet"] * 4
            nested = profiles["nested"]
            profiles["nested"] = CallProfile(nested.retained, nested.fwd_peak, nested.bwd_peak + n, nested.saved)
        return profiles

    def after_window(self, batch: int, checkpoint_decode: bool | None = None,
                     checkpoint_reward: bool | None = None) -> tuple[CallProfile, CallProfile]:
        """Profiles of the VAE decode and the reward at `batch` (each traced at batch 1), checkpointed
        as the spec says or as given (`auto` chooses)."""
        s = self.spec
        ckpt_decode = s.checkpoint_decode if checkpoint_decode is None else checkpoint_decode
        ckpt_reward = s.checkpoint_reward if checkpoint_reward is None else checkpoint_reward
        vae = trace("vae", s.use_cache, vae_cfg=self.model.vae, resolution=self.resolution, batch=1,
                     dtype=self.vae_precision, checkpoint=ckpt_decode,
                     lean=s.lean_decode)["decode"]
        # a weighted sum runs its terms one after another: the largest term sets the phase's peak
        rew = max((trace("reward", s.use_cache, reward=name, resolution=self.resolution, batch=1,
                          dtype=s.mixed_precision, checkpoint=ckpt_reward)["reward"]
                   for name in reward_terms(s.reward)), key=lambda p: (max(p.fwd_peak, p.bwd_peak), p.retained))
        chunk = s.decode_chunk
        if not ckpt_decode or chunk <= 0 or batch <= chunk:
            return vae.scaled(batch), rew.scaled(batch)
        # Chunked decode (MemoryPolicy.decode_call): chunk by chunk, each its own checkpoint.
        n = math.ceil(batch / chunk)
        image_c = chunk * 3 * self.resolution**2 * 4
        latent_c = self.latent_bytes(chunk)
        v = vae.scaled(chunk)
        fwd = max(v.fwd_peak + (n - 1) * image_c, 2 * n * image_c)  # earlier outputs, then the cat
        bwd = v.bwd_peak - image_c + n * image_c + (n - 1) * latent_c  # full image grad + finished latent grads
        return CallProfile(0, fwd, bwd), rew.scaled(batch)

    def after_window_bytes(self, batch: int, checkpoint_decode: bool | None = None,
                           checkpoint_reward: bool | None = None) -> int:
        """Peak bytes the VAE decode and the reward add on top of the window's kept bytes: the
        `reserve_bytes` that `AutoRecompute` should hold back."""
        vae, rew = self.after_window(batch, checkpoint_decode, checkpoint_reward)
        image = batch * 3 * self.resolution**2 * 4
        return max(vae.fwd_peak, vae.retained + image + rew.fwd_peak, vae.retained + image + rew.bwd_peak,
                   vae.bwd_peak)

    def latent_bytes(self, batch: int) -> int:
        factor = 2 ** (len(self.model.vae["block_out_channels"]) - 1)
        side = self.resolution // factor
        return batch * self.model.unet.get("in_channels", 4) * side * side * dtype_of(self.spec.mixed_precision).itemsize

    def param_grad_bytes(self) -> int:
        """The trainable parameters' gradients in the compute dtype, as autograd's input buffers
        sum them over the chunks of a chunked call."""
        c = self.param_counts()
        return (c["lora"] if self.spec.rank > 0 else c["unet"]) * dtype_of(self.spec.mixed_precision).itemsize

    def zero3_held_bytes(self, state: dict[str, int]) -> int:
        """What a chunked call's ZeRO-3 hold (distributed.Zero3Hold) keeps whole beyond the live
        parameters `state` already counts: the hold gathers the whole partitioned UNet for the
        call's chunks, where ZeRO-3 alone keeps at most stage3_max_live_parameters (1e9) gathered.
        Under LoRA the frozen UNet is counted resident already."""
        if "zero3_live_params" not in state or self.spec.rank > 0:
            return 0
        return max(0, self.param_counts()["unet"] * dtype_of(self.spec.mixed_precision).itemsize
                   - state["zero3_live_params"])

    def chunked_profiles(self, profiles: dict[str, CallProfile], batch: int, chunk: int,
                         x_grad: bool, held: int = 0) -> dict[str, CallProfile]:
        """`profiles` with the checkpointed kinds run as the trainer runs them at `--recompute_chunk
        chunk` (recompute.chunked): one chunk's call, plus what grows with the batch around it, plus
        `held` bytes of ZeRO-3 parameters kept whole through the call's forward and backward."""
        if chunk <= 0 or chunk >= batch:
            return profiles
        one = self.unet_profiles(chunk, x_grad=x_grad)
        sample = self.latent_bytes(1)  # the call's output per sample, and its input's gradient
        out = dict(profiles)
        for k in CHUNKABLE:
            if k in one:
                p = chunked_profile(one[k], batch, chunk, sample, sample if x_grad else 0, self.param_grad_bytes())
                out[k] = replace(p, fwd_peak=p.fwd_peak + held, bwd_peak=p.bwd_peak + held)
        return out

    def kl_profiles(self, profiles: dict[str, CallProfile], batch: int) -> dict[str, CallProfile]:
        """`profiles` with --kl_coeff's base call after each window call: the no-grad call's peak on
        top of what the call keeps and its output, then its output and the fine-tuned one kept to
        the end of the window forward (an upper bound in backward, where they are already freed)."""
        if not self.kl_penalty:
            return profiles
        out = self.latent_bytes(batch)  # the guided output of one call
        base = profiles["nograd"].fwd_peak
        return {k: p if k not in WINDOW_KINDS else
                CallProfile(p.retained + 2 * out, max(p.fwd_peak, p.retained + out + base), p.bwd_peak, p.saved)
                for k, p in profiles.items()}

    # -- composition ----------------------------------------------------------------------------------
    def activation_plan(self, batch: int, recompute: str, window: int, available: int | None = None,
                        held: int = 0):
        """(WindowPlan, after-window peak, profiles) for `recompute` at `batch`. The plan's
        `recompute_chunk` is the chunk its checkpointed calls run at (0 = the whole batch): the
        spec's, or under `auto` with none given the largest that fits (bigger chunks run faster).
        `held`: Planner.zero3_held_bytes, on top of a chunked call's peaks."""
        s = self.spec
        # The first window step's latent comes from no-grad steps and carries no gradient; later
        # ones do. With one step (ReFL, K = 1) that first step is the whole window; DRaFT-LV's and
        # ImageReFL's calls each start from a latent without gradient.
        x_grad = window > 1 and s.method not in ("draft-lv", "imagerefl")
        whole = self.unet_profiles(batch, x_grad=x_grad)
        vae, rew = self.after_window(batch)
        latent = self.latent_bytes(batch)
        # decode output (the fp32 image) stays for the reward; reward backward, then decode backward
        after = self.after_window_bytes(batch)
        chunk = s.recompute_chunk if s.recompute_chunk < batch else 0
        profiles = self.kl_profiles(self.chunked_profiles(whole, batch, chunk, x_grad, held), batch)
        ckpt = (s.checkpoint_decode, s.checkpoint_reward)
        if recompute == "auto":
            budget = available if available is not None else 0
            # the cheapest fitting plan over the ways decode and reward may run (AutoRecompute's
            # choice: each checkpoint costs AFTER_RECOMPUTE_COST); none fits: the least held back
            options = {(d, r): self.after_window_bytes(batch, d, r)
                       for d in {False, s.checkpoint_decode} for r in {False, s.checkpoint_reward}}
            best = None
            for option, reserve in options.items():
                p = plan_window(window, profiles, budget, reserve, latent)
                cost = p.recompute_cost + AFTER_RECOMPUTE_COST * sum(option)
                if p.fits and (best is None or (cost, p.peak) < best[0]):
                    best = ((cost, p.peak), option, p)
            ckpt = best[1] if best else min(options, key=options.get)
            after = options[ckpt]
            vae, rew = self.after_window(batch, *ckpt)
            plan = best[2] if best else plan_window(window, profiles, budget, after, latent)
            if not s.recompute_chunk and not plan.fits and batch > 1:
                # the largest chunk that fits (the peak grows with the chunk); else chunk 1's plan
                lo, hi, best = 1, batch - 1, None
                while lo <= hi:
                    mid = (lo + hi) // 2
                    p = plan_window(window, self.kl_profiles(self.chunked_profiles(whole, batch, mid, x_grad, held), batch),
                                    budget, after, latent)
                    if p.fits:
                        best, lo = (mid, p), mid + 1
                    else:
                        hi = mid - 1
                chunk = best[0] if best else 1
                profiles = self.kl_profiles(self.chunked_profiles(whole, batch, chunk, x_grad, held), batch)
                plan = best[1] if best else plan_window(window, profiles, budget, after, latent)
        else:  # a fixed policy: every window position of that kind
            peak, kept, phase = _window_peak([(recompute, window)], profiles, latent, after)
            plan = WindowPlan([recompute] * window, peak, kept, phase, RECOMPUTE_COST[recompute] * window, True)
        plan.recompute_chunk = chunk if recompute in ("auto", *CHUNKABLE) else 0
        plan.checkpoint_decode, plan.checkpoint_reward = ckpt
        # no-grad steps before the window: one forward at a time, of the whole batch (DRaFT with
        # K = N has none; with the checkpointed calls chunked they can set the peak)
        pre = profiles["nograd"].fwd_peak + latent
        if not (s.method == "draft" and window >= s.num_inference_steps) and pre > plan.peak:
            plan.peak, plan.phase = pre, "no-grad steps before the window"
        return plan, after, profiles, vae, rew

    def peak(self, batch: int, recompute: str, state: dict | None = None) -> tuple[int, WindowPlan, dict]:
        state = state or self.state_bytes()
        static = sum(state.values())
        window = self.spec.window_size()
        available = self.usable_bytes() - static
        plan, after, profiles, vae, rew = self.activation_plan(batch, recompute, window, available,
                                                               self.zero3_held_bytes(state))
        return static + plan.peak, plan, dict(profiles=profiles, vae=vae, reward=rew, after=after)

    def budget_bytes(self) -> tuple[int, str]:
        if self.spec.budget_gb is not None:
            return int(self.spec.budget_gb * GiB), f"{self.spec.budget_gb:g} GiB given"
        gib, how = detect_budget_gib()
        return int(gib * GiB), how

    def usable_bytes(self) -> int:
        return self.budget_bytes()[0] - int(self.spec.reserve_gb * GiB)

    def max_batch(self, recompute: str, state: dict | None = None, limit: int = 4096) -> int:
        usable = self.usable_bytes()
        if self.peak(1, recompute, state)[0] > usable:
            return 0
        lo, hi = 1, 2
        while hi <= limit and self.peak(hi, recompute, state)[0] <= usable:
            lo, hi = hi, hi * 2
        hi = min(hi, limit + 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.peak(mid, recompute, state)[0] <= usable:
                lo = mid
            else:
                hi = mid
        return lo

    def plan(self) -> Plan:
        s = self.spec
        B = s.batch_size
        state = self.state_bytes()
        usable = self.usable_bytes()
        budget, how = self.budget_bytes()
        peak, wplan, parts = self.peak(B, s.recompute, state)
        profiles = parts["profiles"]
        policies = {}
        for pol in POLICIES:
            policies[pol] = self.peak(B, pol, state)[0]
        recommended = None
        for pol in ("none", "lean", "auto", "full", "selective", "nested"):
            p, wp, _ = self.peak(B, pol, state)
            if p <= usable and (pol != "auto" or wp.fits):
                recommended = pol if pol != "auto" else f"auto ({_counts_text(wp.counts)})"
                break
        fits = peak <= usable and (s.recompute != "auto" or wplan.fits)
        components = dict(state)
        components.update({
            "window_kept_activations": wplan.window_kept,
            "peak_phase_activations": wplan.peak - wplan.window_kept if wplan.phase != "VAE decode / reward" else parts["after"],
            "unet_step_activations": profiles["none"].saved,
            "unet_step_kept": {k: profiles[k].retained for k in WINDOW_KINDS},
            "vae_decode_activations": max(parts["vae"].fwd_peak, parts["vae"].bwd_peak),
            "reward_activations": max(parts["reward"].fwd_peak, parts["reward"].bwd_peak),
        })
        plan = Plan(
            spec=asdict(s), peak_bytes=int(peak), fits=bool(fits), budget_bytes=budget, usable_bytes=usable,
            max_batch=self.max_batch(s.recompute, state), recommended_recompute=recommended,
            components=components,
            window={"size": s.window_size(), "kinds": _counts_text(wplan.counts), "phase": wplan.phase,
                    "recompute_unet_forwards": wplan.recompute_cost, "recompute_chunk": wplan.recompute_chunk,
                    "checkpoint_decode": wplan.checkpoint_decode, "checkpoint_reward": wplan.checkpoint_reward},
            policies=policies, param_counts=dict(self.param_counts()), host_bytes=self.host_bytes(),
            notes=[f"budget: {how}; usable = budget - {s.reserve_gb:g} GiB reserve (CUDA context, workspaces, fragmentation)",
                   f"resolution {self.resolution}, latent {self.resolution // (2 ** (len(self.model.vae['block_out_channels']) - 1))}",
                   "activations traced on the meta device with flash-type SDPA (q, k, v, O, fp32 logsumexp saved)"],
        )
        if s.method == "alignprop":
            plan.notes.append("alignprop draws K ~ U{k_min..k_max}; the plan is for the largest window, K = k_max")
        if not fits:
            plan.suggestions = self.suggestions(state)
        return plan

    def suggestions(self, state: dict) -> list[str]:
        """What would make a plan that does not fit, fit: each line one change (or two) that does."""
        s = self.spec
        usable = self.usable_bytes()
        B = s.batch_size
        accum = lambda b: f" with --gradient_accumulation_steps {math.ceil(B / b)} for the same effective batch"  # noqa: E731
        out = []
        for pol in ("lean", "auto", "full", "selective", "nested"):
            if pol == s.recompute:
                continue
            peak, wplan, _ = self.peak(B, pol, state)
            if peak <= usable and (pol != "auto" or wplan.fits):
                out.append(f"--recompute {pol} (peak {peak / GiB:.1f} GiB)")
                break
        else:
            for pol in dict.fromkeys((s.recompute, "selective")):
                mb = self.max_batch(pol, state)
                if 0 < mb < B:
                    out.append(f"--recompute {pol} --train_batch_size {mb}{accum(mb)}")
        variants = []
        if s.optimizer == "adamw":
            variants.append(("--use_8bit_adam", dict(optimizer="adamw8bit")))
        if not (s.zero == 3 and s.offload in (True, "param")) and not (s.rank == 0 and self.kl_penalty):
            variants.append(("--zero 3 --offload param --optimizer cpu-adam", dict(offload=True, zero=3)))
        for text, kw in variants:
            st = self.state_bytes(**kw)
            if self.peak(B, "selective", st)[0] <= usable:
                out.append(f"{text} --recompute selective")
            else:
                mb = self.max_batch("selective", st)
                if mb > 0:
                    out.append(f"{text} --recompute selective --train_batch_size {mb}{accum(mb)}")
        if s.rank == 0:
            out.append("LoRA (--rank 8) instead of full fine-tuning: the gradients and optimizer state shrink "
                       "to the adapter's")
        if not out:
            out.append("nothing in reach at this resolution: lower --resolution, drop CFG (--guidance_scale 1) "
                       "or use a smaller --K")
        return out


def _counts_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "-"


def make_plan(**kwargs) -> Plan:
    return Planner(PlanSpec(**kwargs)).plan()


def auto_reserve_bytes(model: str | None, resolution: int, batch_size: int, mixed_precision: str = "no",
                       reward: str | None = None, checkpoint_decode: bool = True, checkpoint_reward: bool = True,
                       lean_decode: bool = True) -> int:
    """What `--recompute auto` should hold back for decode + reward (AutoRecompute(reserve_bytes=...))."""
    spec = PlanSpec(model=model, resolution=resolution, batch_size=batch_size, mixed_precision=mixed_precision,
                    reward=reward if reward in REWARD_BACKBONES else None, checkpoint_decode=checkpoint_decode,
                    checkpoint_reward=checkpoint_reward, lean_decode=lean_decode)
    return Planner(spec).after_window_bytes(batch_size)

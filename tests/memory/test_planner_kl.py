"""The planner's model of the KL regularizer (--kl_coeff): full fine-tuning's frozen base copy is
resident (its parameter bytes, counted on the real tiny model), each window step runs the base
model once more without gradient (a transient) and keeps its output and the fine-tuned one until
the penalty is computed; the plan matches the CPU tracker's measured peak of a trainer step."""
import json
import os
import subprocess
import sys

import pytest
import torch

from refl_engine.memory.planner import Planner, PlanSpec
from hang import hang_timeout


@pytest.mark.parametrize("mixed_precision,dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_frozen_copy_adds_exactly_its_parameter_bytes(mixed_precision, dtype):
    from refl_engine.models.load import build_tiny_sd
    from refl_engine.regularizers import frozen_base

    unet = build_tiny_sd(seed=0)["unet"]
    copy_bytes = sum(p.numel() * p.element_size() for p in frozen_base(unet, dtype).parameters())
    common = dict(model="tiny-sd", mixed_precision=mixed_precision, use_cache=False)
    for rank, expected in ((0, copy_bytes), (4, 0)):  # LoRA: the base is the adapter switched off
        plain = Planner(PlanSpec(rank=rank, **common)).state_bytes()
        kl = Planner(PlanSpec(rank=rank, method_options={"kl_coeff": 0.1}, **common)).state_bytes()
        assert sum(kl.values()) - sum(plain.values()) == expected, (rank, kl, plain)
        assert kl.get("kl_base_copy", 0) == expected


def _trainer_step_peak(rank, kl_coeff, recompute):
    """Measured peak bytes (CPU tracker) of one ReFLTrainer step of DRaFT K=full on tiny-sd with
    --kl_coeff, after a warm-up step (optimizer state exists), and the planner's prediction."""
    import tempfile

    from refl_engine.config import TrainConfig, set_field, validate
    from refl_engine.memory import measure
    from refl_engine.trainer import ReFLTrainer

    common = dict(model="tiny-sd", resolution=32, method="draft", K="full", guidance_scale=3.0, rank=rank,
                  mixed_precision="no", recompute=recompute, reward="colorfulness")
    steps = 3
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig()
        for k, v in dict(common, num_inference_steps=steps, kl_coeff=kl_coeff, train_batch_size=2, seed=0,
                         max_train_steps=10, output_dir=out, progress=False, num_sample_images=1).items():
            set_field(cfg, k, v)
        validate(cfg)
        trainer = ReFLTrainer(cfg).setup()
        trainer.train_step()
        _, peak = measure.measure_peak(trainer.train_step, "cpu")
    spec = PlanSpec(**common, num_inference_steps=steps, batch_size=2, optimizer="adamw", budget_gb=1.0,
                    reserve_gb=0.0, use_cache=False, method_options={"kl_coeff": kl_coeff})
    return peak.peak_bytes, Planner(spec).plan().peak_bytes


def _in_fresh_process(*args):
    """In its own interpreter: the tracker counts every live tensor of the process."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    code = ("import json, torch; torch.set_num_threads(1); from test_planner_kl import _trainer_step_peak; "
            f"print('RESULT', json.dumps(_trainer_step_peak{args!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=hang_timeout(900))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("rank,recompute", [(4, "none"), (0, "full")])
def test_planner_matches_the_measured_peak_with_kl(rank, recompute):
    """LoRA with nothing recomputed: the base call's transient sets the peak (measured +2.0 MB over
    the same step without --kl_coeff, planned +2.1 MB); full fine-tuning: the frozen copy (+3.2 MB)."""
    measured, planned = _in_fresh_process(rank, 0.1, recompute)
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


def test_full_ft_kl_under_zero3_is_refused_and_not_suggested():
    """ZeRO-3 would not partition the frozen copy: the planner refuses it as the trainer does, and
    does not suggest it when a full fine-tune with --kl_coeff does not fit."""
    from refl_engine.config import ConfigError

    GiB = 2**30
    kl = {"kl_coeff": 0.1}
    with pytest.raises(ConfigError, match="--kl_coeff with full fine-tuning") as e:
        Planner(PlanSpec(model="tiny-sd", rank=0, zero=3, offload="param", optimizer="cpu-adam", method_options=kl))
    assert "\n" not in str(e.value)
    common = dict(model="tiny-sd", rank=0, mixed_precision="no", recompute="selective", reserve_gb=0.0)
    probe = Planner(PlanSpec(**common))
    plain = probe.peak(1, "selective")[0]
    zero3 = probe.peak(1, "selective", probe.state_bytes(offload=True, zero=3))[0]
    assert zero3 < plain
    budget = (zero3 + plain) / 2 / GiB  # only the ZeRO-3 offload variant fits
    without = Planner(PlanSpec(budget_gb=budget, **common)).plan()
    assert not without.fits and any("--zero 3" in line for line in without.suggestions)
    with_kl = Planner(PlanSpec(budget_gb=budget, method_options=kl, **common)).plan()
    assert not with_kl.fits and not any("--zero 3" in line for line in with_kl.suggestions), with_kl.suggestions

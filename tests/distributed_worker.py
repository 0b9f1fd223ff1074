"""One rank of a multi-process test run (tests/test_distributed.py starts it, one process a rank,
with the environment torchrun would set): trains a few steps of the tiny preset, then writes this
rank's view of the trainable weights, metrics and drawn prompts to <out>/rank<r>.pt.

    python tests/distributed_worker.py SPEC_JSON
SPEC: {"config": {...make_config overrides...}, "tmp": dir, "steps": n, "out": dir, "save_at": k|null,
       "resume": path|null, "nan_rank": r|null, "nan_step": s|null,
       "chunk_at": {step: recompute_chunk}|null, "count_gathers": bool}
   or {"runs": [SPEC, ...]}: the runs one after another in this process (each its own trainer and
       DeepSpeed engine in the one process group), which spares each run the ~12 s of imports.
count_gathers: each step's metrics gain "gather_bytes", the bytes this rank all-gathered in it
(torch.distributed's all-gather collectives, which DeepSpeed's ZeRO-3 calls). chunk_at: the step
(1-based) runs its checkpointed calls at that --recompute_chunk.
"""
import json
import os
import sys

import torch

torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(spec: dict) -> None:
    from refl_engine import distributed as dist

    runs = spec.get("runs", [spec])
    # before DeepSpeed starts: its communication layer binds torch.distributed's functions then
    gathered = dist.count_all_gathers() if any(r.get("count_gathers") for r in runs) else None
    for run in runs:
        run_one(run, gathered if run.get("count_gathers") else None)


def run_one(spec: dict, gathered: dict | None) -> None:
    from pathlib import Path

    from engine_config import make_config

    from refl_engine import distributed as dist
    from refl_engine.trainer import ReFLTrainer

    rank = int(os.environ.get("RANK", 0))
    cfg = make_config(Path(spec["tmp"]), **spec["config"])
    trainer = ReFLTrainer(cfg).setup()
    if spec.get("resume"):
        trainer.resume(spec["resume"])
    if spec.get("nan_rank") == rank:  # a reward that turns NaN at one step, on this rank only
        score = trainer.reward.score
        nan_step = spec["nan_step"]

        def nan_score(images, prompts):
            out = score(images, prompts)
            return out * float("nan") if trainer.step + 1 == nan_step else out

        trainer.reward.score = nan_score
    drawn, metrics, saved, at_save = [], [], None, None
    sample = trainer.sample_prompts_batch

    def recording(batch_size):
        prompts = sample(batch_size)
        drawn.append(prompts)
        return prompts

    trainer.sample_prompts_batch = recording
    chunk_at, chunk = spec.get("chunk_at") or {}, trainer.policy.recompute_chunk
    while trainer.step < spec["steps"]:
        trainer.policy.recompute_chunk = chunk_at.get(str(trainer.step + 1), chunk)
        if gathered is not None:
            gathered.update(calls=0, bytes=0)
        metrics.append(trainer.train_step())
        if gathered is not None:
            metrics[-1]["gather_bytes"] = gathered["bytes"]
        if spec.get("save_at") == trainer.step:
            saved = str(trainer.save_checkpoint())
            at_save = dist.trainable_state(trainer)
    weights = dist.trainable_state(trainer)
    torch.save(dict(weights=weights, metrics=metrics, drawn=drawn, saved=saved, weights_at_save=at_save,
                    state_bytes=_state_bytes(trainer)), os.path.join(spec["out"], f"rank{rank}.pt"))


def _state_bytes(trainer) -> int:
    from refl_engine.optim import optimizer_state_bytes

    try:
        return optimizer_state_bytes(trainer.optimizer)
    except AttributeError:
        return -1


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

"""CLI entry: `python engine/train.py`, `python -m refl_engine.train`, `refl-train`, `torchrun ...`,
`deepspeed engine/train.py ...`.

Bad input (unknown method, K out of range, a missing model, reward weights or prompt file,
conflicting flags) ends with one line naming the problem and the fix, and exit code 2; the checks
run before anything heavy loads. `--help` lists every flag by section with its choices and default."""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a path (python engine/train.py, deepspeed engine/train.py): this folder must not
    # shadow top-level modules, and the package is imported by its installed name.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]


def apply_backend_flags(cfg) -> None:
    """--allow_tf32: TF32 matmuls and cuDNN convolutions (Ampere and newer), as diffusers' examples."""
    if cfg.optim.allow_tf32:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def main(argv: list[str] | None = None) -> int:
    import logging

    from refl_engine.config import ConfigError, parse_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes probes Hugging Face's `kernels` hub package for 4-bit CPU GEMMs at import and
    # warns when it cannot load them; the engine never uses 4-bit, so the warning is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help printed the options
        return e.code if isinstance(e.code, int) else 0
    apply_backend_flags(cfg)
    from refl_engine.trainer import ReFLTrainer, TrainingError

    try:
        summary = ReFLTrainer(cfg).train()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        return 130
    if summary:
        before, after = summary["sample_reward_before"], summary["sample_reward_after"]
        print(f"done: {summary['steps']} steps of {summary['method']}; sample {summary['reward']} "
              f"{before if before is None else round(before, 4)} -> {after:.4f}; outputs in {cfg.output.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

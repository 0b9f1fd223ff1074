"""How often ZeRO-3 gathers the UNet's weights in one training step, with and without batch-chunked
recomputation, and with and without the engine's hold (distributed.Zero3Hold) that keeps the
gathered weights across a call's chunks.

    python benchmarks/zero3_gathers.py [--json benchmarks/results/zero3_gathers-tiny-sd-cpu.json]

Each row runs 2 ranks (gloo on CPU, the environment torchrun sets) of the tiny preset with full
fine-tuning under ZeRO-3, DRaFT K=full, N=4, batch 4 a rank, `--recompute full`, and
`stage3_param_persistence_threshold` 0 (by default DeepSpeed keeps every parameter under 1e5
elements unpartitioned, which on the tiny UNet is all of them, so nothing would be gathered). It
counts, on rank 0, the all-gather collectives (torch.distributed's all_gather,
all_gather_into_tensor and _all_gather_base, which DeepSpeed's communication layer calls) and
their bytes during the second step (the first records ZeRO-3's parameter trace). Rows vary
`--recompute_chunk` (0 = the whole batch), whether the hold is on (off: ZeRO-3's module hooks
alone, which gather every weight again for each chunk) and `stage3_max_reuse_distance` (DeepSpeed
keeps a gathered parameter when it is used again within that many parameter elements; default 1e9).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(method="draft", K="full", num_inference_steps=4, rank=0, learning_rate=1e-5, train_batch_size=4,
           zero=3, recompute="full", num_sample_images=2, progress=False, max_train_steps=2)
ROWS = [  # name, recompute_chunk, hold, stage3_max_reuse_distance (None: DeepSpeed's default 1e9)
    ("whole batch", 0, True, None),
    ("chunk 2", 2, True, None),
    ("chunk 1", 1, True, None),
    ("chunk 2, no hold", 2, False, None),
    ("chunk 1, no hold", 1, False, None),
    ("chunk 1, no hold, reuse dist. 0", 1, False, 0),
]


def worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    from engine_config import make_config

    from refl_engine import distributed
    from refl_engine.trainer import ReFLTrainer

    if not spec["hold"]:  # ZeRO-3's module hooks alone
        distributed.Zero3Hold.of = classmethod(lambda cls, module: None)
    counts = distributed.count_all_gathers()  # before DeepSpeed starts
    tmp = Path(spec["tmp"])
    ds = dict(zero_optimization=dict(stage=3, stage3_param_persistence_threshold=0))
    if spec["reuse"] is not None:
        ds["zero_optimization"]["stage3_max_reuse_distance"] = spec["reuse"]
    (tmp / "ds.json").write_text(json.dumps(ds))
    cfg = make_config(tmp, deepspeed=str(tmp / "ds.json"), recompute_chunk=spec["chunk"], **RUN)
    trainer = ReFLTrainer(cfg).setup()
    trainer.train_step()  # ZeRO-3 records its parameter trace in the first step
    counts.update(calls=0, bytes=0)
    t0 = time.process_time()
    metrics = trainer.train_step()
    cpu = time.process_time() - t0
    gathers, gather_bytes = counts["calls"], counts["bytes"]
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in trainer.unet.parameters())
    n_modules = sum(1 for m in trainer.unet.modules() if any(True for _ in m.parameters(recurse=False)))
    if int(os.environ["RANK"]) == 0:
        print("RESULT " + json.dumps(dict(gathers=gathers, gather_bytes=gather_bytes, cpu_s=cpu,
                                          unet_params=n_params, modules_with_params=n_modules,
                                          loss=float(metrics.get("loss", float("nan"))))), flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_row(chunk: int, hold: bool, reuse, timeout: float = 900) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        spec = dict(chunk=chunk, hold=hold, reuse=reuse, tmp=tmp)
        port = _free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                  env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
        for p, log in zip(procs, logs):
            if p.returncode != 0:
                raise RuntimeError(f"a rank failed:\n{log[-3000:]}")
        line = next(l for l in logs[0].splitlines() if l.startswith("RESULT "))
        return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "zero3_gathers-tiny-sd-cpu.json"))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(json.loads(a.worker))
        return 0
    import deepspeed
    import torch

    rows = []
    print(f"{'row':32s} {'gathers':>8s} {'gather MB':>10s} {'/ whole':>8s} {'CPU s':>7s}")
    for name, chunk, hold, reuse in ROWS:
        r = dict(name=name, recompute_chunk=chunk, hold=hold, stage3_max_reuse_distance=reuse,
                 **run_row(chunk, hold, reuse))
        base = rows[0] if rows else r  # the whole batch
        r["gather_bytes_over_whole_batch"] = r["gather_bytes"] / base["gather_bytes"]
        rows.append(r)
        print(f"{name:32s} {r['gathers']:8d} {r['gather_bytes'] / 1e6:10.1f} {r['gather_bytes_over_whole_batch']:8.2f} "
              f"{r['cpu_s']:7.2f}", flush=True)
    out = dict(device=f"cpu ({platform.machine()}), 2 ranks, gloo", torch=torch.__version__,
               deepspeed=deepspeed.__version__, run=RUN, stage3_param_persistence_threshold=0,
               counted="rank 0, all-gather collectives and bytes during the second training step",
               load_average=os.getloadavg(), rows=rows)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

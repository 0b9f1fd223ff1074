"""Seconds per image of each real reward model on CPU: forward, and forward + backward to the image.

Every reward is built at its real architecture size with random weights (no downloads) by the
`build_random_*` factory of its module, which hands the network to the same Reward class the
checkpoint loaders build, so the measured path is the training one: a float [0, 1] image
(B, 3, size, size) -> the engine's differentiable preprocessing -> backbone -> score. Forward runs
under torch.no_grad; forward + backward calls reward(images, prompts).sum().backward() with
requires_grad on the image only (the reward is frozen; its layers are checkpointed as in training).
Each case runs one warm-up call, then --repeats timed calls; the median is reported, divided by the
batch. One model is built at a time and freed before the next (the ViT-H/14 ones are ~1B params,
~4 GB in fp32). The tokenizers are offline stand-ins (all prompts are padded to the models' fixed
lengths, 77 and 35 tokens, so the token ids do not change the cost).

Another busy process oversubscribes the cores: all-core times then grow 2-4x while 1-thread times
barely move, so `--threads 2,1` gives a cross-check; each record keeps the 1-minute load average.

    .venv/bin/python benchmarks/rewards.py [--rewards aesthetic,hps,pickscore,imagereward]
        [--repeats 3] [--threads N[,M...]] [--batch 1] [--size 512] [--json FILE]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REWARDS = ("aesthetic", "hps", "pickscore", "imagereward")
PROMPT = "a photo of a cat sitting on a red car"
GiB = 2**30


# ------------------------------------------------------------------ models


def _clip_tokenizer():
    from refl_engine.models.load import build_tiny_tokenizer

    return build_tiny_tokenizer(words=PROMPT.split())


def _bert_tokenizer():
    from refl_engine.rewards.imagereward import blip_tokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(PROMPT.split()))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return blip_tokenizer(tmp)


def build(name: str):
    """The frozen reward `name` at its real size with random weights."""
    if name == "aesthetic":
        from refl_engine.rewards.aesthetic import build_random_aesthetic

        return build_random_aesthetic()
    if name == "hps":
        from refl_engine.rewards.hps import build_random_hps

        return build_random_hps(_clip_tokenizer())
    if name == "pickscore":
        from refl_engine.rewards.pickscore import build_random_pickscore

        return build_random_pickscore(_clip_tokenizer())
    if name == "imagereward":
        from refl_engine.rewards.imagereward import build_random_imagereward

        return build_random_imagereward(_bert_tokenizer())
    raise ValueError(f"unknown reward {name!r}; choose from {', '.join(REWARDS)}")


# ------------------------------------------------------------------ memory


def gib(kib: int | None) -> float | None:
    return None if kib is None else round(kib * 1024 / GiB, 3)


def release_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back to the OS, so the next model's RSS starts low
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------ timing


def timed(fn, repeats: int) -> tuple[list[float], list[float]]:
    """One warm-up call, then `repeats` timed calls: (wall seconds, process CPU seconds) per call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def measure(name: str, repeats: int, batch: int, size: int, thread_counts: list[int]) -> list[dict]:
    """Build `name` once, time it at each thread count; one record per thread count."""
    from refl_engine.memory.measure import reset_peak_rss, status_kib

    resettable = reset_peak_rss()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    reward = build(name)
    build_s = time.perf_counter() - t0
    rss_model = status_kib("VmRSS")
    params = sum(p.numel() for p in reward.parameters())
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    prompts = [PROMPT] * batch

    def forward():
        with torch.no_grad():
            out = reward(images, prompts)
        assert out.shape == (batch,) and torch.isfinite(out).all()

    def forward_backward():
        x = images.clone().requires_grad_(True)
        reward(x, prompts).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()

    records = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        record = dict(reward=name, threads=threads, params=params, build_s=round(build_s, 2),
                      rss_model_gib=gib(rss_model))
        for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
            reset_peak_rss()
            wall, cpu = timed(fn, repeats)
            record[key] = dict(
                s_per_img=statistics.median(wall) / batch,
                min_s_per_img=min(wall) / batch,
                wall_s=[round(t, 4) for t in wall],
                cpu_s=[round(t, 4) for t in cpu],
                peak_rss_gib=gib(status_kib("VmHWM")) if resettable else None,
            )
        # Other processes on the machine inflate the times; the 1-minute load average says how much.
        record["loadavg_1min"] = round(os.getloadavg()[0], 2)
        records.append(record)
    del reward, images
    release_memory()
    return records


# ------------------------------------------------------------------ main


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rewards", default=",".join(REWARDS), help="comma-separated subset of " + ",".join(REWARDS))
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case (after one warm-up)")
    p.add_argument("--threads", default=str(os.cpu_count() or 1),
                   help="torch.set_num_threads; a comma-separated list times each count (default: all cores)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="side of the square input image (before preprocessing)")
    p.add_argument("--json", default=None, help="write the records here (e.g. benchmarks/results/rewards-cpu.json)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.rewards.split(",") if n.strip()]
    unknown = [n for n in names if n not in REWARDS]
    try:
        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        thread_counts = []
    if unknown or not names or args.repeats < 1 or args.batch < 1 or not thread_counts or min(thread_counts) < 1:
        p.error(f"--rewards takes names from {', '.join(REWARDS)}; --threads takes counts >= 1; "
                f"--repeats and --batch must be >= 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    load_start = os.getloadavg()
    rows = []
    print(f"{'reward':12} {'params':>8} {'fwd s/img':>10} {'fwd+bwd s/img':>14} {'peak RSS GiB':>13} {'threads':>7}")
    for name in names:
        for r in measure(name, args.repeats, args.batch, args.size, thread_counts):
            rows.append(r)
            peak = r["fwd_bwd"]["peak_rss_gib"]
            print(f"{name:12} {r['params'] / 1e6:>7.0f}M {r['fwd']['s_per_img']:>10.3f} "
                  f"{r['fwd_bwd']['s_per_img']:>14.3f} {peak if peak is not None else float('nan'):>13.2f} "
                  f"{r['threads']:>7}", flush=True)

    import transformers

    record = dict(
        device=f"cpu ({cpu_name()}, {os.cpu_count()} cores)",
        cpu=cpu_name(), cpu_count=os.cpu_count(), threads=thread_counts,
        torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0],
        dtype="float32", batch=args.batch, image_size=args.size, repeats=args.repeats, prompt=PROMPT,
        timing="s_per_img: median wall-clock seconds of the timed calls / batch, after one warm-up call "
               "(min_s_per_img: the fastest call); cpu_s: process CPU seconds of each call",
        loadavg_start=[round(x, 2) for x in load_start], loadavg_end=[round(x, 2) for x in os.getloadavg()],
        rows=rows,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""DeepSpeed data parallelism on CPU (gloo): N ranks x batch b == one process x batch N*b for ZeRO
0/2/3, ZeRO-3 offload == plain torch, non-finite steps agreed across ranks, exact resume with
per-rank RNG, exports a stock pipeline loads, AdamW8bit, and the refused flag combinations.

Each rank is a subprocess with the environment torchrun sets (tests/distributed_worker.py)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_config import make_config
from hang import hang_timeout

from refl_engine.config import ConfigError

WORKER = Path(__file__).with_name("distributed_worker.py")
# A small DRaFT K=full run: 4 denoising steps, CFG off, default recompute policy (selective).
RUN = dict(method="draft", K="full", num_inference_steps=4, learning_rate=1e-3, adam_epsilon=1e-6, rank=4,
           num_sample_images=2)
# fp32: the ranks' gradient average differs from the batch mean by rounding only (~1e-12 absolute
# here); an Adam step turns a gradient error d into at most lr * d / eps = 1e-3 d of weight.
ATOL = 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path: Path, n: int, runs: list[dict], timeout: float = 240) -> list[list[dict]]:
    """Start n ranks that train `runs` one after another (each {"config", "steps", ...spec}, see
    tests/distributed_worker.py); per run, each rank's weights, metrics and drawn prompts. Fails (and
    kills every rank) if the ranks do not finish in `timeout` seconds a run: a hang is a failure."""
    outs = []
    for _ in runs:
        outs.append(tmp_path / f"ranks-{len(list(tmp_path.glob('ranks-*')))}")
        outs[-1].mkdir(parents=True)
    runs = [dict(run, out=str(out), tmp=str(run.get("tmp", tmp_path))) for run, out in zip(runs, outs)]
    port = _free_port()
    procs = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(dict(runs=runs))], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    limit = hang_timeout(timeout * len(runs))
    try:
        logs = [p.communicate(timeout=limit)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{n} ranks did not finish {len(runs)} run(s) in {limit:.0f} s (hang)")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [[torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)] for out in outs]


def run_ranks(tmp_path: Path, n: int, config: dict, steps: int, timeout: float = 240, **spec) -> list[dict]:
    """Train `steps` steps on n ranks; each rank's weights, metrics and drawn prompts."""
    return launch(tmp_path, n, [dict(spec, config=config, steps=steps)], timeout)[0]


def _plain_run(tmp_path, steps, **overrides):
    """The reference: one process, plain torch (no DeepSpeed)."""
    from refl_engine.trainer import ReFLTrainer

    trainer = ReFLTrainer(make_config(tmp_path, **{**RUN, **overrides})).setup()
    assert trainer.engine is None
    drawn, sample = [], trainer.sample_prompts_batch

    def recording(batch_size):  # what each step's global batch was
        drawn.append(sample(batch_size))
        return drawn[-1]

    trainer.sample_prompts_batch = recording
    for _ in range(steps):
        trainer.train_step()
    weights = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    return weights, drawn


@pytest.fixture(scope="module")
def reference(tiny_sd_dir, tmp_path_factory):
    return _plain_run(tmp_path_factory.mktemp("plain"), steps=2, train_batch_size=2)


def _assert_same(a: dict, b: dict, atol=ATOL, msg: str = ""):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=f"{msg} {name}".strip())


def test_two_ranks_batch1_equal_one_process_batch2(reference, tmp_path):
    """ZeRO 0, 2 and 3 with the default recompute policy, and --recompute nested at ZeRO 0 and 2,
    in one launch (a rank trains the five runs one after another): each equals the one-process run
    at batch 2.

    Nested over the 4 window steps: at stage 0 each nested call hands its parameters' gradients to
    .grad inside its own backward (nested.param_grads_into_grad), four accumulations per parameter
    that DeepSpeed then averages; ZeRO-2's hooks reduce each gradient as it accumulates and refuse
    a second accumulation in one backward, so there the calls return them (once entered there,
    this failed with "Gradient computed twice for this partition")."""
    weights, drawn = reference
    runs = [(0, None), (2, None), (3, None), (0, "nested"), (2, "nested")]  # (zero, recompute; None: default)
    launched = launch(tmp_path, 2, [dict(config=dict(RUN, train_batch_size=1, zero=zero,
                                                     **({"recompute": recompute} if recompute else {})),
                                         steps=2, tmp=str(tmp_path / f"{zero}-{recompute}"))
                                    for zero, recompute in runs])
    for (zero, recompute), ranks in zip(runs, launched):
        for r in ranks:
            _assert_same(weights, r["weights"], msg=f"zero {zero}, recompute {recompute}")
        # the global batch is the reference's batch, split by rank
        assert [a + b for a, b in zip(ranks[0]["drawn"], ranks[1]["drawn"])] == drawn, (zero, recompute)
    # and the weights did move (lora_B starts at zero): equal frozen models would prove nothing
    assert max(w.abs().max() for n, w in weights.items() if "lora_B" in n) > 1e-4


def test_one_rank_zero3_offload_accumulation_and_full_export(reference, tmp_path):
    """One launch of one rank, three runs: ZeRO-3 with parameter and optimizer offload equals plain
    torch; gradient accumulation under ZeRO-2 equals plain torch's (DeepSpeed counts micro-batches
    itself: engine.step() after each, the update at the last one); a full fine-tune under ZeRO-3
    exports a UNet that diffusers loads with the gathered weights."""
    from diffusers import UNet2DConditionModel

    offload, accumulation, full = (r for (r,) in launch(tmp_path, 1, [
        dict(config=dict(RUN, train_batch_size=2, zero=3, offload="param"), steps=2, tmp=str(tmp_path / "offload")),
        dict(config=dict(RUN, zero=2, train_batch_size=1, gradient_accumulation_steps=2), steps=2,
             tmp=str(tmp_path / "accumulation")),
        dict(config=dict(RUN, rank=0, learning_rate=1e-3, train_batch_size=1, zero=3), steps=1, save_at=1,
             tmp=str(tmp_path / "full"))]))
    _assert_same(reference[0], offload["weights"], msg="zero 3, offload param")

    weights, drawn = _plain_run(tmp_path / "plain", steps=2, train_batch_size=1, gradient_accumulation_steps=2)
    _assert_same(weights, accumulation["weights"], msg="gradient accumulation")
    assert accumulation["drawn"] == drawn

    unet = UNet2DConditionModel.from_pretrained(full["saved"], subfolder="unet")
    state = dict(unet.named_parameters())
    assert state.keys() == full["weights"].keys()
    _assert_same(full["weights"], {n: p.detach() for n, p in state.items()}, atol=0)


def test_zero3_chunked_calls_gather_the_weights_once_per_call(tiny_sd_dir, tmp_path):
    """--recompute_chunk under ZeRO-3 with every parameter partitioned: the chunks of a call share
    one gather of the UNet (distributed.Zero3Hold) in forward and one in backward, where ZeRO-3's
    module hooks alone gather every weight again for each chunk, in forward, in the recompute and
    in backward. Step 2 runs the whole batch, step 3 chunk 1 (2 chunks a call); the weights equal
    plain torch's at the same global batch. Two denoising steps: the count does not depend on N."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(dict(zero_optimization=dict(stage=3, stage3_param_persistence_threshold=0))))
    weights, _ = _plain_run(tmp_path / "plain", steps=3, train_batch_size=4, recompute="full",
                            num_inference_steps=2)
    ranks = run_ranks(tmp_path, 2, dict(RUN, train_batch_size=2, zero=3, recompute="full", recompute_chunk=1,
                                        num_inference_steps=2, deepspeed=str(ds)),
                      steps=3, chunk_at={"2": 0}, count_gathers=True)
    for r in ranks:
        _assert_same(weights, r["weights"])
    whole, chunked = (ranks[0]["metrics"][i]["gather_bytes"] for i in (1, 2))
    # without the hold ZeRO-3 gathered 2x the whole batch's bytes at 2 chunks, 4x at 4 (benchmarks/zero3_gathers.py)
    print("GATHER", whole, chunked)
    assert 0 < chunked <= whole, (chunked, whole)


def test_nan_on_one_rank_is_skipped_by_both(tiny_sd_dir, tmp_path):
    """A reward that turns NaN at step 2 on rank 1 only, at ZeRO 0 and 2 (one launch): both ranks
    skip that step and stay equal (two denoising steps)."""
    launched = launch(tmp_path, 2, [dict(config=dict(RUN, train_batch_size=1, zero=zero, num_inference_steps=2),
                                         steps=3, nan_rank=1, nan_step=2, tmp=str(tmp_path / f"zero{zero}"))
                                    for zero in (0, 2)])
    for zero, ranks in zip((0, 2), launched):
        for r in ranks:
            assert [m["skipped"] for m in r["metrics"]] == [False, True, False], zero
            assert all(torch.isfinite(w).all() for w in r["weights"].values()), zero
        _assert_same(ranks[0]["weights"], ranks[1]["weights"], atol=0, msg=f"zero {zero}")


def test_resume_with_two_ranks_is_exact(tiny_sd_dir, tmp_path):
    """ZeRO-3 over two ranks (two denoising steps): 3 steps straight equal 2 steps, a checkpoint and,
    in new processes, the third step resumed from it, bitwise, on the same prompts."""
    config = dict(RUN, train_batch_size=1, zero=3, num_inference_steps=2)
    straight = run_ranks(tmp_path, 2, config, steps=3, save_at=2)
    checkpoint = straight[0]["saved"]
    assert checkpoint and (Path(checkpoint) / "state.json").exists()
    assert (Path(checkpoint) / "rng-rank0.pt").exists() and (Path(checkpoint) / "rng-rank1.pt").exists()
    resumed = run_ranks(tmp_path, 2, config, steps=3, resume=checkpoint)
    for a, b in zip(straight, resumed):
        _assert_same(a["weights"], b["weights"], atol=0)
        assert b["drawn"] == a["drawn"][2:]  # the same prompts as the uninterrupted run...
    assert resumed[0]["drawn"] != resumed[1]["drawn"]  # ...and the ranks draw different ones

    # The checkpoint's LoRA export, gathered from ZeRO-3 partitions, loads into a stock pipeline.
    from diffusers import StableDiffusionPipeline

    from refl_engine.trainer import ReFLTrainer

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(checkpoint)
    trainer = ReFLTrainer(make_config(tmp_path / "plain", **RUN)).setup()
    at_save = straight[0]["weights_at_save"]
    with torch.no_grad():
        for n, p in trainer.unet.named_parameters():
            if n in at_save:
                p.copy_(at_save[n])
    x, emb, t = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32), torch.tensor(500)
    trainer.unet.eval()
    with torch.no_grad():
        ours = trainer.unet(x, t, encoder_hidden_states=emb).sample
        theirs = pipe.unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_adamw8bit_trains_with_a_quarter_of_the_state(tiny_sd_dir, tmp_path):
    from refl_engine.optim import optimizer_state_bytes
    from refl_engine.trainer import ReFLTrainer

    sizes, large = {}, {}
    for optimizer in ("adamw", "adamw8bit"):
        trainer = ReFLTrainer(make_config(tmp_path / optimizer, **dict(RUN, rank=0, learning_rate=1e-3),
                                          optimizer=optimizer)).setup()
        trainer.train_step()
        sizes[optimizer] = optimizer_state_bytes(trainer.optimizer)
        # bitsandbytes keeps 32-bit state for tensors under 4096 elements (biases, norms)
        big = [p for p in trainer.params if p.numel() >= 4096]
        large[optimizer] = sum(v.numel() * v.element_size() for p in big for v in trainer.optimizer.state[p].values()
                               if torch.is_tensor(v) and v.numel() > 256)  # not the shared 256-entry code book
    n = sum(p.numel() for p in trainer.params)
    assert sizes["adamw"] == 8 * n  # two fp32 moments
    # two uint8 moments + one fp32 scale per 256-element block each: (2 + 8/256) / 8 of AdamW's
    assert abs(large["adamw8bit"] / large["adamw"] - (2 + 8 / 256) / 8) < 0.005, large
    assert sizes["adamw8bit"] < 0.35 * sizes["adamw"], sizes  # the small tensors' 32-bit state included

    prompts = trainer.prompts[:4]
    before = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    for _ in range(12):
        trainer.train_step()
    after = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    assert after > before + 0.02, (before, after)


@pytest.mark.parametrize("flags,match", [
    (dict(optimizer="adamw8bit", zero=2, offload="optimizer"), "adamw8bit .* cannot run with --offload optimizer"),
    (dict(use_8bit_adam=True, zero=3, offload="param"), "adamw8bit .* cannot run with --offload param"),
    (dict(zero=2, offload="param"), "--offload param needs ZeRO-3.*--zero 3 --offload param"),
    (dict(offload="optimizer"), "--offload optimizer needs a ZeRO optimizer; add --zero 2"),
    (dict(optimizer="cpu-adam"), "cpu-adam steps CPU copies.*--offload optimizer"),
    (dict(zero=4), "--zero 4"),
    (dict(offload="nvme", zero=3), "--offload.*nvme"),
    (dict(optimizer="sgd"), "--optimizer.*sgd"),
    (dict(use_8bit_adam=True, optimizer="cpu-adam", zero=2, offload="optimizer"), "--use_8bit_adam conflicts"),
])
def test_refused_combinations_are_one_line(tmp_path, flags, match):
    with pytest.raises(ConfigError, match=match) as e:
        make_config(tmp_path, **flags)
    assert "\n" not in str(e.value)


def test_deepspeed_file_is_adopted_and_cross_checked(tmp_path):
    from refl_engine.distributed import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"},
                              "overlap_comm": False},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.01}}}))
    cfg = make_config(tmp_path, deepspeed=str(path), train_batch_size=3)
    assert (cfg.distributed.zero, cfg.distributed.offload) == (3, "param")
    assert (cfg.optim.gradient_accumulation_steps, cfg.optim.max_grad_norm, cfg.optim.weight_decay) == (2, 0.5, 0.01)
    conf = deepspeed_config(cfg, world_size=4, device=torch.device("cpu"))
    assert conf["train_batch_size"] == 3 * 2 * 4 and conf["train_micro_batch_size_per_gpu"] == 3
    assert conf["zero_optimization"]["overlap_comm"] is False  # the file's other settings are kept
    assert conf["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert conf["optimizer"]["params"]["torch_adam"] is True and conf["optimizer"]["params"]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="--zero 2 conflicts with zero_optimization.stage=3"):
        make_config(tmp_path, deepspeed=str(path), zero=2)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        make_config(tmp_path, deepspeed=str(path))


def test_planner_partitions_over_gpus_and_counts_host_memory(tiny_sd_dir):
    from diffusers import UNet2DConditionModel

    from refl_engine.memory.planner import Planner, PlanSpec

    n = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet").parameters())

    def planner(**kw):
        return Planner(PlanSpec(model=tiny_sd_dir, rank=0, mixed_precision="bf16", **kw))

    one = planner(zero=2, num_gpus=1).state_bytes()
    assert (one["optimizer"], one["grads"]) == (8 * n, 4 * n)  # AdamW's two fp32 moments, fp32 gradients
    four = planner(zero=2, num_gpus=4).state_bytes()  # ZeRO-2 shards both over the GPUs
    assert (four["optimizer"], four["grads"]) == (-(-8 * n // 4), -(-4 * n // 4))
    assert planner(zero=1, num_gpus=4).state_bytes()["grads"] == 4 * n  # ZeRO-1: gradients whole
    # offload: moments, fp32 master weights and gradients on the host, split over the processes;
    # parameter offload adds the bf16 weights
    assert planner(zero=2, offload="optimizer", num_gpus=1).host_bytes() == 16 * n
    assert planner(zero=3, offload="param", num_gpus=4).host_bytes() == -(-18 * n // 4)
    assert planner(zero=3, offload="param").state_bytes()["optimizer"] == 0
    assert planner(zero=2).host_bytes() == 0

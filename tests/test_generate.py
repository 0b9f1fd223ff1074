"""Combined generation against diffusers' own StableDiffusionPipeline: hand-over N is the base
model alone (its CFG), hand-over 0 the fine-tuned one alone (its CFG); LoRA keeps one UNet."""
import gc

import pytest
import torch

from refl_engine.checkpoint import export_lora
from refl_engine.generate import combined_generate, load_combined, parse_handovers, prompt_seed_grid
from refl_engine.config import ConfigError
from refl_engine.models.load import load_pipeline_components
from refl_engine.models.lora import add_lora
from refl_engine.sampling import randn

N = 4
PROMPTS = ["a red circle on a blue background", "a painting of a sky with a yellow star"]
SEEDS = [3, 4]


def _unets():
    from diffusers import UNet2DConditionModel

    return sum(1 for o in gc.get_objects() if isinstance(o, UNet2DConditionModel))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """An exported LoRA with non-zero weights (a trained adapter's stand-in)."""
    c = load_pipeline_components(None)
    add_lora(c.unet, 4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in c.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return export_lora(c.unet, tmp_path_factory.mktemp("lora"))


def _pipeline_images(unet, guidance):
    """diffusers' pipeline from the same start noise: the independent reference."""
    from diffusers import StableDiffusionPipeline

    c = load_pipeline_components(None)
    pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer, unet=unet,
                                   scheduler=c.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    shape = (4, c.native_resolution // c.vae_scale_factor, c.native_resolution // c.vae_scale_factor)
    latents = torch.stack([randn(shape, torch.Generator().manual_seed(s)) for s in SEEDS])
    return pipe(PROMPTS, num_inference_steps=N, guidance_scale=guidance, latents=latents, output_type="pt",
                eta=0.0).images


def _close(a, b):
    assert a.shape == b.shape
    err = float((a - b).abs().max())
    assert err <= 1e-6 + 1e-6 * float(b.abs().max()), err


def test_lora_handover_ends_match_the_pipeline_with_one_unet(lora_file):
    before = _unets()
    model = load_combined(str(lora_file))
    assert model.base_unet is None and _unets() - before == 1  # no second UNet for the base
    base_count = sum(p.numel() for p in load_pipeline_components(None).unet.parameters())
    lora_count = sum(p.numel() for n, p in model.unet.named_parameters() if "lora_" in n)
    assert lora_count > 0 and sum(p.numel() for p in model.unet.parameters()) == base_count + lora_count

    base_only = combined_generate(model, PROMPTS, SEEDS, handover=N, num_inference_steps=N,
                                  base_guidance_scale=7.5, guidance_scale=1.0)
    tuned_only = combined_generate(model, PROMPTS, SEEDS, handover=0, num_inference_steps=N,
                                   base_guidance_scale=7.5, guidance_scale=1.0)
    half = combined_generate(model, PROMPTS, SEEDS, handover=N // 2, num_inference_steps=N)
    # the base reference: a fresh model without any adapter
    _close(base_only, _pipeline_images(load_pipeline_components(None).unet, 7.5))
    # the fine-tuned reference: the LoRA loaded by diffusers' own loader, no CFG
    ref = load_pipeline_components(None)
    ref.unet.load_lora_adapter(str(lora_file), prefix="unet", adapter_name="default")
    _close(tuned_only, _pipeline_images(ref.unet, 1.0))
    # the adapter is on again after the base steps, and the mixed run is neither end
    assert float((tuned_only - base_only).abs().max()) > 1e-3
    assert float((half - base_only).abs().max()) > 1e-4 and float((half - tuned_only).abs().max()) > 1e-4


def test_full_finetune_loads_a_second_unet(tmp_path):
    c = load_pipeline_components(None)
    with torch.no_grad():
        c.unet.conv_out.weight.mul_(1.5)
    c.unet.save_pretrained(tmp_path / "unet")
    model = load_combined(str(tmp_path / "unet"))
    assert model.base_unet is not None and model.base_unet is not model.unet
    _close(combined_generate(model, PROMPTS, SEEDS, N, N), _pipeline_images(load_pipeline_components(None).unet, 7.5))
    _close(combined_generate(model, PROMPTS, SEEDS, 0, N, guidance_scale=1.0), _pipeline_images(c.unet, 1.0))


def test_bad_inputs_are_one_line_errors(tmp_path):
    for spec in ("x", "5", "-1", ""):
        with pytest.raises(ConfigError) as e:
            parse_handovers(spec, N)
        assert "\n" not in str(e.value)
    assert parse_handovers("0,2,4", N) == [0, 2, 4]
    with pytest.raises(ConfigError, match="no such file"):
        load_combined(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not a training output dir"):
        load_combined(str(tmp_path))
    assert prompt_seed_grid(["a", "b", "c"], 2, 3, 10) == (["a"] * 3 + ["b"] * 3, [10, 11, 12, 13, 14, 15])


def test_a_training_output_dir_loads_its_latest_checkpoint(lora_file, tmp_path):
    """A run folder whose checkpoint holds only the trainable parameters: the adapter is rebuilt
    from config.json (rank, alpha, targets) and gives the same images as the exported LoRA."""
    import json

    from safetensors.torch import save_file

    exported = load_combined(str(lora_file))
    trainable = {n: p.detach().contiguous() for n, p in exported.unet.named_parameters() if "lora_" in n}
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-7"
    ckpt.mkdir(parents=True)
    save_file(trainable, ckpt / "trainable.safetensors")
    (ckpt / "state.json").write_text(json.dumps({"step": 7}))
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"model": {"model": None, "rank": 4, "lora_alpha": 0.0, "lora_target_modules": "to_q,to_k,to_v,to_out.0"}}))
    run = load_combined(str(tmp_path / "run"))
    assert run.base_unet is None and run.source.endswith("trainable.safetensors")
    _close(combined_generate(run, PROMPTS, SEEDS, 0, N), combined_generate(exported, PROMPTS, SEEDS, 0, N))


# ---------------------------------------------------------------- the two CLIs: bad input, one line

CLI_BAD = [
    ("generate", [], "--finetuned is required"),
    ("generate", ["--finetuned", "{lora}", "--handover", "x"], "--handover must be integers separated by commas"),
    ("generate", ["--finetuned", "{lora}", "--handover", "0,21"], "--handover '0,21': each value must be in 0..20"),
    ("generate", ["--finetuned", "{lora}", "--handover", "-1"], "each value must be in 0..20"),
    ("generate", ["--finetuned", "{lora}", "--handover", ","], "each value must be in 0..20"),
    ("generate", ["--finetuned", "{lora}", "--base_guidance_scale", "nan"], "--base_guidance_scale"),
    ("generate", ["--finetuned", "{lora}", "--num_prompts", "0"], "--num_prompts 0 is out of range"),
    ("generate", ["--finetuned", "{lora}", "--images_per_prompt", "0"], "--images_per_prompt 0 is out of range"),
    ("generate", ["--finetuned", "/nonexistent/run"], "--finetuned '/nonexistent/run': no such file or folder"),
    ("generate", ["--finetuned", "{tmp}"], "is not a training output dir"),
    ("evaluate", ["--sweep_handover", "0,a"], "--sweep_handover must be integers separated by commas"),
    ("evaluate", ["--sweep_handover", "0,10,99"], "--sweep_handover '0,10,99': each value must be in 0..20"),
    ("evaluate", ["--handover", "-1"], "--handover"),
    ("evaluate", ["--handover", "21"], "--handover '21': each value must be in 0..20"),
    ("evaluate", ["--images_per_prompt", "1"], "--images_per_prompt 1 is out of range"),
    ("evaluate", ["--num_prompts", "0"], "--num_prompts 0 is out of range"),
    ("evaluate", ["--reference_limit", "-1"], "--reference_limit"),
    ("evaluate", ["--base_guidance_scale", "-1"], "--base_guidance_scale"),
    ("evaluate", ["--finetuned", "/nonexistent/run"], "no such file or folder"),
    ("evaluate", ["--reference_dir", "/nonexistent/images"], "--reference_dir '/nonexistent/images': no such folder"),
]


@pytest.mark.parametrize("entry,argv,needle", CLI_BAD, ids=[f"{e}:{' '.join(a)}" for e, a, _ in CLI_BAD])
def test_cli_bad_input_one_line_exit_2(entry, argv, needle, lora_file, tmp_path, capsys):
    from refl_engine import evaluate, generate

    main = {"generate": generate.main, "evaluate": evaluate.main}[entry]
    argv = [a.replace("{lora}", str(lora_file)).replace("{tmp}", str(tmp_path)) for a in argv]
    code = main(argv + ["--num_inference_steps", "20", "--output_dir", str(tmp_path / "out"), "--progress", "false"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2 and errors == err[-1:] and needle in errors[0], err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "out").exists()  # refused before writing anything

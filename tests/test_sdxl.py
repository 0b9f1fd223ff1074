"""SDXL end to end on the tiny-sdxl preset: the engine samples exactly as diffusers' pipelines do
(SD1.5 too), the preset round-trips through save/load, every method's gradient matches finite
differences, every method raises the reward, and fp16 decoding follows the VAE's force_upcast."""
import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from engine_config import make_config
from test_gradients import test_gradient_matches_finite_differences as gradient_matches_finite_differences

from refl_engine.config import ConfigError
from refl_engine.memory.recompute import FullRecompute
from refl_engine.models.conditioning import Conditioning
from refl_engine.models.load import (build_tiny_sdxl, load_pipeline_components, save_pipeline_dir,
                                     tiny_sdxl_configs, tiny_sdxl_path, vae_dtype)
from refl_engine.sampling import Window, run_trajectory
from refl_engine.trainer import ReFLTrainer

PROMPTS = ["a red circle on a blue background", "a big green star"]


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_sd_dir):  # tiny_sd_dir points the preset cache at a session temp dir
    return str(tiny_sdxl_path())


def _reference_pipeline(model_dir):
    """What a user runs: the saved pipeline loaded by diffusers, its scheduler swapped for DDIM."""
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _close(ours, ref, what):
    # fp32 through N steps of the same modules: agreement to float32 round-off with a floor for
    # entries near zero (the engine keeps the alphas in float64, diffusers in float32)
    err = (ours - ref).abs().max().item()
    bound = 1e-5 * ref.abs().max().item() + 1e-6
    assert err <= bound, (what, err, bound)
    return err


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
@pytest.mark.parametrize("height,width", [(32, 32), (24, 40)])
def test_sampling_loop_equals_the_diffusers_pipeline(family, guidance, height, width, tiny_sd_dir, tiny_sdxl_dir,
                                                     tmp_path):
    model_dir = tiny_sdxl_dir if family == "sdxl" else tiny_sd_dir
    n = 4
    trainer = ReFLTrainer(make_config(tmp_path, model=model_dir, rank=0, num_inference_steps=n,
                                      guidance_scale=guidance, height=height, width=width)).setup()
    x_T = trainer.initial_noise(len(PROMPTS), torch.Generator().manual_seed(3))
    assert x_T.shape[-2:] == (height // 2, width // 2)
    with torch.no_grad():
        ours = run_trajectory(trainer.sampling_chain(PROMPTS).eps_fn, trainer.schedule, x_T, Window([n] * len(PROMPTS)))
        ref = _reference_pipeline(model_dir)(PROMPTS, num_inference_steps=n, guidance_scale=guidance,
                                             output_type="latent", latents=x_T.clone(), height=height,
                                             width=width).images
    _close(ours, ref, (family, guidance, height, width))


def test_generate_equals_the_sdxl_pipeline_images(tiny_sdxl_dir, tmp_path):
    """The trainer's sample grids are the pipeline's images: same conditioning, loop and decode."""
    n, seed = 3, 11
    trainer = ReFLTrainer(make_config(tmp_path, model=tiny_sdxl_dir, rank=0, num_inference_steps=n,
                                      guidance_scale=5.0, height=24, width=32)).setup()
    ours = trainer.generate(PROMPTS, seed=seed)
    x_T = trainer.initial_noise(len(PROMPTS), torch.Generator().manual_seed(seed))  # generate's noise
    with torch.no_grad():
        ref = _reference_pipeline(tiny_sdxl_dir)(PROMPTS, num_inference_steps=n, guidance_scale=5.0,
                                                 output_type="pt", latents=x_T, height=24, width=32).images
    _close(ours, ref, "images")


def test_sdxl_conditioning_is_the_pipelines(tiny_sdxl_dir, tmp_path):
    """Zero negative embeddings (force_zeros_for_empty_prompt) and time ids of the training size."""
    trainer = ReFLTrainer(make_config(tmp_path, model=tiny_sdxl_dir, guidance_scale=5.0, height=24,
                                      width=40)).setup()
    cond = trainer.text.conditioning(PROMPTS, cfg=True)
    assert torch.equal(cond.uncond, torch.zeros_like(cond.cond))
    assert torch.equal(cond.added_uncond["text_embeds"], torch.zeros_like(cond.added["text_embeds"]))
    expected = torch.tensor([[24.0, 40.0, 0.0, 0.0, 24.0, 40.0]] * len(PROMPTS))
    assert torch.equal(cond.added["time_ids"], expected) and torch.equal(cond.added_uncond["time_ids"], expected)
    assert cond.cond.shape == (2, 77, tiny_sdxl_configs()["unet"]["cross_attention_dim"])


def test_sizes_the_model_cannot_downsample_are_one_line_errors(tiny_sdxl_dir, tmp_path):
    for flags, flag, fix in ((dict(width=30), "--width 30", "28 or 32"), (dict(resolution=18), "--resolution 18", "16 or 20"),
                             (dict(resolution=32, height=6), "--height 6", "4 or 8")):
        with pytest.raises(ConfigError) as e:
            ReFLTrainer(make_config(tmp_path, model=tiny_sdxl_dir, **flags)).setup()
        message = str(e.value)  # names the flag and the nearest valid sizes, on one line
        assert message.startswith(flag) and "multiple of 4" in message and fix in message and "\n" not in message
    trainer = ReFLTrainer(make_config(tmp_path, model=tiny_sdxl_dir, resolution=16, width=24)).setup()
    assert (trainer.height, trainer.width, trainer.latent_size) == (16, 24, (8, 12))


def test_tiny_sdxl_round_trips_through_save_and_load(tiny_sdxl_dir, tmp_path):
    built = build_tiny_sdxl(0)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        built[name].eval()  # as from_pretrained returns modules
    saved = save_pipeline_dir(build_tiny_sdxl(0), tmp_path / "copy")
    for where in (tiny_sdxl_dir, saved):
        c = load_pipeline_components(str(where))
        assert c.kind == "sdxl" and c.force_zeros_for_empty_prompt and c.native_resolution == 32
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            ref, got = built[name].state_dict(), getattr(c, name).state_dict()
            assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
        for name in ("tokenizer", "tokenizer_2"):
            assert getattr(c, name)(PROMPTS, padding="max_length").input_ids == built[name](
                PROMPTS, padding="max_length").input_ids
        # identical outputs, through diffusers' own pipeline on both sides
        ref_pipe = StableDiffusionXLPipeline(**built, add_watermarker=False)
        with torch.no_grad():
            ours = c.pipeline().encode_prompt(PROMPTS, device=torch.device("cpu"))
            theirs = ref_pipe.encode_prompt(PROMPTS, device=torch.device("cpu"))
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)
        x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
        added = {"text_embeds": ours[2], "time_ids": torch.tensor([[16.0, 24, 0, 0, 16, 24]] * 2)}
        with torch.no_grad():
            assert torch.equal(c.unet(x, 500, ours[0], added_cond_kwargs=added).sample,
                               built["unet"](x, 500, ours[0], added_cond_kwargs=added).sample)
            assert torch.equal(c.vae.decode(x).sample, built["vae"].decode(x).sample)


@pytest.fixture(scope="module")
def tiny_sdxl64():
    """tiny-sdxl's UNet and VAE in float64 at 8 px, with random SDXL conditioning."""
    cfgs = tiny_sdxl_configs()
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**dict(cfgs["unet"], sample_size=4)).double()
        vae = AutoencoderKL(**dict(cfgs["vae"], sample_size=8)).double().requires_grad_(False)
    with torch.no_grad():  # random-init conv_out is small: make the trajectory depend on the weights
        unet.conv_out.weight.mul_(20)
    dim, pooled = cfgs["unet"]["cross_attention_dim"], cfgs["text_encoder_2"]["projection_dim"]
    rand = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=g)  # noqa: E731
    time_ids = torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2, dtype=torch.float64)
    cond = Conditioning(rand(2, 7, dim), torch.zeros(2, 7, dim, dtype=torch.float64),
                        {"text_embeds": rand(2, pooled), "time_ids": time_ids},
                        {"text_embeds": torch.zeros(2, pooled, dtype=torch.float64), "time_ids": time_ids})
    return unet, vae, cond, DDIMScheduler.from_config(cfgs["scheduler"], clip_sample=False)


@pytest.mark.parametrize("method,kw", [
    ("draft", dict(K="full")), ("draft", dict(K="2")), ("refl", dict(stop_range="1:3")),
    ("draft-lv", dict(lv_inner=2)), ("alignprop", {}),
])
def test_sdxl_gradient_matches_finite_differences(tiny_sdxl64, method, kw):
    """test_gradients' check (autograd against central differences of the objective the method
    claims, float64), on tiny-sdxl with its pooled embeddings and time ids."""
    gradient_matches_finite_differences(tiny_sdxl64, method, kw, FullRecompute())


def _image_folder(root, n=4):
    """n flat-colored 40 x 28 PNGs with captions (metadata.jsonl), for ImageReFL's real images."""
    import json

    from PIL import Image

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            rgb = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g))
            Image.new("RGB", (40, 28), rgb).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i % len(PROMPTS)]}) + "\n")
    return str(root)


@pytest.mark.parametrize("method,kw", [
    ("refl", {}), ("draft", dict(K="full")), ("draft-lv", {}), ("alignprop", {}), ("imagerefl", {}),
])
def test_each_method_raises_the_reward_on_tiny_sdxl(tiny_sdxl_dir, tmp_path, method, kw):
    if method == "imagerefl":  # real images noised to the hand-over step, at the training size
        kw = dict(kw, train_data_dir=_image_folder(tmp_path / "images"))
    # Full fine-tuning: tiny-sdxl, like SDXL, has no attention at the top level, so LoRA on the
    # attention projections moves this random-weight model's images slowly.
    cfg = make_config(tmp_path, model=tiny_sdxl_dir, method=method, num_inference_steps=4, learning_rate=3e-3,
                      rank=0, guidance_scale=5.0, height=16, width=24, **kw)
    trainer = ReFLTrainer(cfg).setup()
    prompts = trainer.prompts[:4]
    before = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    for _ in range(12):
        trainer.train_step()
    after = trainer.reward(trainer.generate(prompts), prompts).mean().item()
    # fixed prompts and seeds: the same noise before and after, so the change is the model's
    assert after > before + 0.03, (method, before, after)


def test_fp16_decode_follows_force_upcast(tiny_sdxl_dir, tmp_path):
    """Simulates an fp16 run on CPU: the VAE with force_upcast is kept in fp32 and decodes outside
    autocast (the SDXL pipeline's upcast); without force_upcast it decodes in fp16."""
    trainer = ReFLTrainer(make_config(tmp_path, model=tiny_sdxl_dir)).setup()
    vae = trainer.components.vae
    trainer.autocast_dtype = torch.float16
    seen = []
    vae.decoder.conv_in.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for force_upcast, expected in ((True, torch.float32), (False, torch.float16)):
        vae.register_to_config(force_upcast=force_upcast)
        vae.to(vae_dtype(vae.config, torch.float16))  # what _setup places for fp16 weights
        seen.clear()
        with trainer._autocast():
            images = trainer.decode(z)
        assert seen == [(expected, expected)], (force_upcast, seen)
        assert images.dtype == torch.float32 and torch.isfinite(images).all()


@pytest.mark.parametrize("spec_name", ["tiny-sdxl", "dir"])
def test_planner_model_spec_is_the_loaders_architecture(tiny_sdxl_dir, spec_name):
    from refl_engine.memory.meta import meta_text_encoder, meta_unet, meta_vae, model_spec

    spec = model_spec(tiny_sdxl_dir if spec_name == "dir" else spec_name)
    c = load_pipeline_components(tiny_sdxl_dir)
    assert spec.kind == c.kind == "sdxl" and spec.native_resolution == c.native_resolution
    shapes = lambda m: {n: tuple(p.shape) for n, p in m.named_parameters()}  # noqa: E731
    assert shapes(meta_unet(spec.unet)) == shapes(c.unet)
    assert shapes(meta_vae(spec.vae)) == shapes(c.vae)
    assert [shapes(meta_text_encoder(t)) for t in spec.text_encoders] == [shapes(c.text_encoder),
                                                                          shapes(c.text_encoder_2)]


def test_planner_sdxl_preset_is_consistent_as_the_pipeline_checks():
    """SDXL base's configs: the added embedding takes six time ids and the second encoder's pooled
    projection (the check in StableDiffusionXLPipeline._get_add_time_ids), and cross-attention
    takes both encoders' states concatenated."""
    from refl_engine.memory.meta import meta_unet, model_spec

    spec = model_spec("sdxl")
    te1, te2 = spec.text_encoders
    unet = meta_unet(spec.unet)
    assert unet.add_embedding.linear_1.in_features == 6 * spec.unet["addition_time_embed_dim"] + te2["projection_dim"]
    assert spec.unet["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert spec.native_resolution == 1024 and spec.vae["force_upcast"]


def test_sdxl_lora_export_loads_in_a_stock_sdxl_pipeline(tiny_sdxl_dir, tmp_path):
    cfg = make_config(tmp_path, model=tiny_sdxl_dir, rank=4, max_train_steps=1, learning_rate=5e-2,
                      num_inference_steps=2, guidance_scale=5.0)
    trainer = ReFLTrainer(cfg)
    trainer.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    states = torch.randn(2, 77, tiny_sdxl_configs()["unet"]["cross_attention_dim"], generator=g)
    added = {"text_embeds": torch.randn(2, tiny_sdxl_configs()["text_encoder_2"]["projection_dim"], generator=g),
             "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)}
    trainer.unet.eval()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(cfg.output.output_dir)
    with torch.no_grad():
        ours = trainer.unet(x, 500, states, added_cond_kwargs=added).sample
        theirs = pipe.unet(x, 500, states, added_cond_kwargs=added).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(x, 500, states, added_cond_kwargs=added).sample
    _close(theirs, ours, "lora export")
    assert (theirs - base).abs().max() > 1e-3  # the adapter is really applied

"""A small TrainConfig builder for the engine tests (tiny preset, few steps, temp output)."""


def make_config(tmp_path, **overrides):
    from refl_engine.config import TrainConfig, set_field, validate

    cfg = TrainConfig()
    defaults = dict(model="tiny-sd", output_dir=str(tmp_path / "run"), num_inference_steps=6, max_train_steps=2,
                    train_batch_size=2, progress=False, num_sample_images=2)
    defaults.update(overrides)
    for k, v in defaults.items():
        set_field(cfg, k, v)
    validate(cfg)
    return cfg

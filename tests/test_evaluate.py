"""Evaluation metrics against hand-computed values, the pluggable backbone, the CLI end to end."""
import math

import pytest
import torch

from refl_engine.evaluate import (PixelEmbedder, covariance_distance, dino_diversity, frechet_distance,
                                  log_covariance_distance, mean_cov, mean_se, set_distances)


def test_identical_images_have_zero_diversity():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 3, 32, 32, generator=g)
    same = img[:, None].expand(3, 4, 3, 32, 32).reshape(12, 3, 32, 32)
    emb = PixelEmbedder()(same)
    assert abs(dino_diversity(emb.view(3, 4, -1))) < 1e-12
    assert dino_diversity(PixelEmbedder()(img).view(1, 3, -1)) > 1e-3


def test_diversity_by_hand():
    # one prompt, three 2-d embeddings at 0, 90 and 180 degrees: cosine distances 1, 2, 1
    e = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]])
    assert abs(dino_diversity(e) - 4 / 3) < 1e-12
    # a second prompt of identical images halves the average
    e2 = torch.cat([e, torch.ones(1, 3, 2)])
    assert abs(dino_diversity(e2) - 2 / 3) < 1e-12


def test_identical_sets_have_zero_distances():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    d = set_distances(x, x.clone())
    # eigen round-off: sqrt of ~1e-15 eigenvalue errors, times the dimension
    assert abs(d["frechet_distance"]) < 1e-6 and d["covariance_distance"] < 1e-12
    assert d["log_covariance_distance"] < 1e-6


def test_two_gaussians_match_the_closed_form():
    # Commuting covariances (diagonal in one rotated basis): the Frechet distance is
    # ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2, the covariance distance
    # sqrt(sum (a_i - b_i)^2), the log-covariance distance sqrt(sum (log a_i - log b_i)^2).
    g = torch.Generator().manual_seed(2)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    a = torch.tensor([4.0, 1.0, 0.25, 2.0, 9.0], dtype=torch.float64)
    b = torch.tensor([1.0, 1.0, 1.0, 0.5, 4.0], dtype=torch.float64)
    s1, s2 = q @ torch.diag(a) @ q.T, q @ torch.diag(b) @ q.T
    mu1, mu2 = torch.zeros(5, dtype=torch.float64), torch.arange(5, dtype=torch.float64)
    expected = float(((mu1 - mu2) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-9 * expected
    assert abs(covariance_distance(s1, s2) - float(((a - b) ** 2).sum().sqrt())) < 1e-12
    assert abs(log_covariance_distance(s1, s2, rel_eps=0.0) - float(((a.log() - b.log()) ** 2).sum().sqrt())) < 1e-9
    # non-commuting covariances: the distance is still symmetric
    r, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    s3 = r @ torch.diag(b) @ r.T
    assert abs(frechet_distance(mu1, s1, mu2, s3) - frechet_distance(mu2, s3, mu1, s1)) < 1e-9


def test_sample_statistics_approach_the_population_distance():
    g = torch.Generator().manual_seed(3)
    n = 200000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.5], dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor([1.0, 0.0], dtype=torch.float64)
    mu1, s1 = mean_cov(x)
    mu2, s2 = mean_cov(y)
    expected = 1.0 + (2 - 1) ** 2 + (0.5 - 1) ** 2  # 2.25
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 0.03  # sampling error ~ 1/sqrt(n) * scale


def test_mean_and_standard_error():
    r = mean_se(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    assert r["mean"] == 3.0 and abs(r["se"] - math.sqrt(14 / 3) / 2) < 1e-12


def test_a_transformers_backbone_plugs_in(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=28, patch_size=14)).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path)
    from refl_engine.evaluate import build_embedder

    emb = build_embedder(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    e = emb(torch.cat([x, x]))
    assert e.shape == (4, 16) and torch.allclose(e[:2], e[2:])
    assert not torch.allclose(e[0], e[1])  # different images, different embeddings


def test_bad_embedding_is_a_one_line_error(tmp_path):
    from refl_engine.config import ConfigError
    from refl_engine.evaluate import build_embedder

    with pytest.raises(ConfigError) as e:
        build_embedder(str(tmp_path / "nothing"))
    assert "\n" not in str(e.value)


def test_clip_score_is_100_times_the_clamped_cosine(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from refl_engine.evaluate import ClipScore
    from refl_engine.models.load import build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        projection_dim=8))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tmp_path)
    score = ClipScore(str(tmp_path))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 28, 28, generator=g)
    prompts = ["a red circle", "a blue sky", "a green tree"]
    got = score(images, prompts)
    # the reference: the model's own forward, whose logits are logit_scale * cosine
    proc = CLIPImageProcessor.from_pretrained(tmp_path)
    x = (images - torch.tensor(proc.image_mean).view(1, 3, 1, 1)) / torch.tensor(proc.image_std).view(1, 3, 1, 1)
    ids = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = CLIPModel.from_pretrained(tmp_path)(pixel_values=x, **ids)
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    assert float(cos.max()) > 0.05  # some scores are positive: the check is not of zeros
    assert torch.allclose(got, 100 * cos.clamp(min=0), atol=1e-4)

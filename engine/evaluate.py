"""Quality and diversity of a fine-tuned model (ImageReFL paper, section 5), and the trade-off that
combined generation sweeps.

For P prompts x M images each (prompt p's image m starts from seed --seed + p M + m):
    quality    every --rewards reward: mean and standard error over the P*M images;
    diversity  DinoDiversity: the mean pairwise cosine distance 1 - cos(e_i, e_j) of the image
               embeddings of ONE prompt, averaged over prompts (higher = more diverse);
               against a reference image set (--reference_dir), on the same embeddings:
               Frechet distance ||mu_g - mu_r||^2 + tr(S_g + S_r - 2 (S_g^1/2 S_r S_g^1/2)^1/2),
               covariance distance ||S_g - S_r||_F and log-covariance distance
               ||log(S_g + eps I) - log(S_r + eps I)||_F (matrix logarithm; eps keeps a
               rank-deficient covariance finite);
    alignment  CLIP score 100 * max(cos(image, text), 0), when --clip names a CLIP model.
The embedding backbone (--eval_embedding) is DINOv2 or any transformers vision model given by
path or hub id (its pooled output; CLIP's image embedding), or `pixels` (the image itself,
downsampled), which needs no download. The paper's numbers use DINO embeddings for diversity
and Inception features for FID; on the embedded toy model, pixels are the honest choice.

    refl-evaluate --finetuned outputs/run --sweep_handover 0,10,20 --reference_dir data/toy

writes evaluation.json (every number) and quality_vs_diversity.png into --output_dir.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]

import torch
import torch.nn.functional as F

from refl_engine.config import ConfigError, arg

log = logging.getLogger("refl_engine")


# ---------------------------------------------------------------- metrics on embeddings

def dino_diversity(embeddings: torch.Tensor) -> float:
    """(P, M, D) embeddings, M images per prompt -> mean over prompts of the mean pairwise cosine
    distance within the prompt."""
    P, M, _ = embeddings.shape
    if M < 2:
        raise ValueError("diversity needs at least 2 images per prompt")
    e = F.normalize(embeddings.double(), dim=-1)
    cos = e @ e.transpose(1, 2)  # (P, M, M)
    off = ~torch.eye(M, dtype=torch.bool)
    return float((1 - cos[:, off]).mean())


def mean_cov(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (n, D) features, in float64."""
    x = x.double().flatten(1)
    if x.shape[0] < 2:
        raise ValueError("a covariance needs at least 2 samples")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sym_fn(s: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to the eigenvalues of the symmetric matrix s."""
    w, v = torch.linalg.eigh((s + s.T) / 2)
    return (v * fn(w)) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 tr((s1^1/2 s2 s1^1/2)^1/2): the Frechet (2-Wasserstein)
    distance of two Gaussians, with the symmetric form of the cross term so every root is of a
    PSD matrix (eigenvalues clamped at 0 against round-off)."""
    root1 = _sym_fn(s1, lambda w: w.clamp(min=0).sqrt())
    cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * cross)


def covariance_distance(s1, s2) -> float:
    return float(torch.linalg.matrix_norm(s1 - s2))


def log_covariance_distance(s1, s2, rel_eps: float = 1e-3) -> float:
    """||log(s1 + eps I) - log(s2 + eps I)||_F: compares the spectra's spread on a log scale. eps is
    rel_eps times the mean eigenvalue of the two, so a direction one set does not span (fewer
    samples than dimensions) counts as a small variance, not as log(0)."""
    eps = rel_eps * float(torch.trace(s1) + torch.trace(s2)) / (2 * s1.shape[0])
    log1 = _sym_fn(s1, lambda w: (w.clamp(min=0) + eps).log())
    log2 = _sym_fn(s2, lambda w: (w.clamp(min=0) + eps).log())
    return float(torch.linalg.matrix_norm(log1 - log2))


def set_distances(generated: torch.Tensor, reference: torch.Tensor) -> dict:
    for name, x in (("generated", generated), ("reference", reference)):
        if x.shape[0] <= x.flatten(1).shape[1]:
            log.warning("%d %s embeddings of dimension %d: the covariance is rank-deficient, so the set distances "
                        "are dominated by it; use more images or a smaller embedding", x.shape[0], name,
                        x.flatten(1).shape[1])
    mu1, s1 = mean_cov(generated)
    mu2, s2 = mean_cov(reference)
    return dict(frechet_distance=frechet_distance(mu1, s1, mu2, s2), covariance_distance=covariance_distance(s1, s2),
                log_covariance_distance=log_covariance_distance(s1, s2))


def mean_se(values: torch.Tensor) -> dict:
    v = values.double().flatten()
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return {"mean": float(v.mean()), "se": se}


# ---------------------------------------------------------------- embedding backbones

def _resize_center_crop(images: torch.Tensor, size: int, crop: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    s = size / min(h, w)
    images = F.interpolate(images, size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                           align_corners=False, antialias=True)
    h, w = images.shape[-2:]
    top, left = (h - crop) // 2, (w - crop) // 2
    return images[..., top:top + crop, left:left + crop]


class PixelEmbedder:
    """The image itself, area-downsampled to 8 x 8 and mapped to [-1, 1] (192 numbers): a
    backbone-free embedding of color and layout for toy images (flat colors and one shape)."""

    name = "pixels"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (F.adaptive_avg_pool2d(images.float(), 8) * 2 - 1).flatten(1)


class HFVisionEmbedder:
    """A transformers vision model: DINOv2 (the pooled CLS output), CLIP (the projected image
    embedding) or any AutoModel with a pooled output; the image processor's size, crop, mean and
    std applied with torch ops."""

    def __init__(self, spec: str, device="cpu"):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModelWithProjection

        try:
            config = AutoConfig.from_pretrained(spec)
            processor = AutoImageProcessor.from_pretrained(spec)
            if config.model_type == "clip":
                self.model = CLIPVisionModelWithProjection.from_pretrained(spec)
            else:
                self.model = AutoModel.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--eval_embedding {spec!r}: cannot load a vision model ({str(e).splitlines()[0]}); "
                              "give a DINOv2/CLIP folder or hub id, or 'pixels'") from None
        self.model.requires_grad_(False).eval().to(device)
        self.name = f"{config.model_type}:{spec}"
        size = getattr(processor, "size", {}) or {}
        crop = getattr(processor, "crop_size", {}) or {}
        self.size = int(size.get("shortest_edge") or size.get("height") or 224)
        self.crop = int(crop.get("height") or self.size)
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        x = (_resize_center_crop(images.float(), self.size, self.crop) - self.mean) / self.std
        out = self.model(pixel_values=x.to(p.device, p.dtype))
        if hasattr(out, "image_embeds"):
            return out.image_embeds.float()
        return out.pooler_output.float()


def build_embedder(spec: str, device="cpu"):
    if spec == "toyworld":  # the toy world's own contrastive encoder (shipped weights)
        from refl_engine.toyworld.embed import ToyworldEmbedder

        return ToyworldEmbedder(device=device)
    return PixelEmbedder() if spec in ("", "pixels") else HFVisionEmbedder(spec, device)


class ClipScore:
    """100 * max(cos(image embedding, text embedding), 0) with a transformers CLIPModel."""

    def __init__(self, spec: str, device="cpu"):
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(spec).requires_grad_(False).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(spec)
            processor = CLIPImageProcessor.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--clip {spec!r}: cannot load a CLIP model ({str(e).splitlines()[0]})") from None
        self.size = int(processor.size.get("shortest_edge", 224))
        self.crop = int(processor.crop_size.get("height", self.size))
        self.mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = next(self.model.parameters())
        x = (_resize_center_crop(images.float(), self.size, self.crop) - self.mean) / self.std
        img = self.model.get_image_features(pixel_values=x.to(p.device, p.dtype))
        ids = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(p.device)
        txt = self.model.get_text_features(**ids)
        img = getattr(img, "pooler_output", img)  # transformers >= 5 may return an output object
        txt = getattr(txt, "pooler_output", txt)
        return 100 * F.cosine_similarity(img.float(), txt.float(), dim=-1).clamp(min=0)


# ---------------------------------------------------------------- reference sets

def load_reference_images(folder: str, resolution: int | tuple[int, int], limit: int = 0) -> torch.Tensor:
    """Every image of an image-caption folder (metadata.jsonl / COCO json), else every image file."""
    from refl_engine.data import find_records, load_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--reference_dir {folder!r}: no such folder")
    try:
        paths = [p for p, _ in find_records(str(root))]
    except ConfigError:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    paths = paths[:limit] if limit else paths
    if len(paths) < 2:
        raise ConfigError(f"--reference_dir {folder!r} holds {len(paths)} images; the covariance needs at least 2")
    return torch.stack([load_image(p, resolution) for p in paths])


def embed_all(embedder, images: torch.Tensor, batch: int = 64, progress: bool = False, desc: str = "embed"):
    from tqdm.auto import tqdm

    return torch.cat([embedder(images[i:i + batch]) for i in
                      tqdm(range(0, images.shape[0], batch), desc=desc, disable=not progress, leave=False)])


# ---------------------------------------------------------------- evaluation

def evaluate_images(images: torch.Tensor, prompts: list[str], images_per_prompt: int, rewards: list, embedder,
                    reference_embeddings: torch.Tensor | None = None, clip: ClipScore | None = None) -> dict:
    """All metrics of a P*M batch laid out prompt-major (prompt p's images are rows pM..pM+M-1)."""
    out: dict = {"num_images": images.shape[0], "images_per_prompt": images_per_prompt}
    with torch.no_grad():
        for reward in rewards:
            p = next(reward.parameters(), None)
            device = p.device if p is not None else "cpu"
            out[reward.name] = mean_se(torch.cat([reward(images[i:i + 16].to(device), prompts[i:i + 16]).float().cpu()
                                                  for i in range(0, images.shape[0], 16)]))
        emb = embedder(images)
    out["dino_diversity"] = dino_diversity(emb.view(-1, images_per_prompt, emb.shape[-1]))
    out["embedding"] = embedder.name
    if reference_embeddings is not None:
        out.update(set_distances(emb, reference_embeddings))
    if clip is not None:
        out["clip_score"] = mean_se(clip(images, prompts))
    return out


@dataclass
class EvaluateArgs:
    _argument_group_name = "evaluate"
    finetuned: str = arg("", "a training --output_dir, an exported LoRA or a fine-tuned UNet folder; unset = the "
                             "base --model alone")
    sweep_handover: str = arg("", "comma list of hand-overs to evaluate (combined generation); unset = --handover")
    handover: int = arg(0, "base-model steps before the fine-tuned model takes over", valid="[0, inf)")
    base_guidance_scale: float = arg(7.5, "classifier-free guidance of the base model's steps", valid="[0, inf)")
    num_prompts: int = arg(8, "P: prompts from --prompts", valid="[1, inf)")
    images_per_prompt: int = arg(4, "M: images per prompt (prompt p's image m has seed --seed + p M + m)",
                                 valid="[2, inf)")
    rewards: str = arg("", "comma list of reward specs to score (as --reward); unset = --reward")
    reference_dir: str = arg("", "real images for the Frechet and covariance distances (an image folder); unset = "
                                 "--train_data_dir if given, else none")
    reference_limit: int = arg(0, "use at most this many reference images; 0 = all", valid="[0, inf)")
    clip: str = arg("", "a transformers CLIP model (folder or hub id) for the CLIP score; unset = skipped")


def plot_tradeoff(results: list[dict], quality: str, path: Path) -> Path:
    from refl_engine.viz import _atomic_savefig, _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    xs = [r["dino_diversity"] for r in results]
    ys = [r[quality]["mean"] for r in results]
    es = [r[quality]["se"] for r in results]
    ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=3)
    for r, x, y in zip(results, xs, ys):
        ax.annotate(f"{r['handover']}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel(f"diversity: mean pairwise cosine distance within a prompt ({results[0]['embedding']})", fontsize=8)
    ax.set_ylabel(f"{quality} (mean +- s.e.)")
    ax.set_title("combined generation: base steps before the hand-over (labels)", fontsize=9)
    ax.grid(alpha=0.3)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        from refl_engine.config import parse_args
        from refl_engine.data import load_prompts
        from refl_engine.generate import (CombinedModel, check_ranges, combined_generate, load_combined, load_reward,
                                          parse_handovers, prompt_seed_grid)

        cfg, e = parse_args(argv, prog="refl-evaluate", extra=(EvaluateArgs,), description=__doc__.splitlines()[0])
        check_ranges(e)
        n = cfg.method.num_inference_steps
        handovers = parse_handovers(e.sweep_handover or str(e.handover), n,
                                    "--sweep_handover" if e.sweep_handover else "--handover")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if e.finetuned:
            model = load_combined(e.finetuned, cfg.model.model, device)
        else:
            from refl_engine.models.load import load_pipeline_components

            c = load_pipeline_components(cfg.model.model)
            for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2):
                if m is not None:
                    m.requires_grad_(False).eval().to(device)
            model = CombinedModel(c, base_unet=c.unet, source="base")
        rewards = [load_reward(s.strip(), device) for s in (e.rewards or cfg.method.reward).split(",") if s.strip()]
        prompts, seeds = prompt_seed_grid(load_prompts(cfg.data.prompts), e.num_prompts, e.images_per_prompt,
                                          cfg.optim.seed)
        embedder = build_embedder(cfg.output.eval_embedding, device)
        clip = ClipScore(e.clip, device) if e.clip else None
        reference = None
        ref_dir = e.reference_dir or cfg.data.train_data_dir
        if ref_dir:
            size = model.components.image_size(cfg.model.resolution, cfg.model.height, cfg.model.width)
            ref_images = load_reference_images(ref_dir, size, e.reference_limit)
            reference = embed_all(embedder, ref_images, progress=cfg.output.progress, desc="reference")
        out = Path(cfg.output.output_dir)
        results = []
        from tqdm.auto import tqdm

        for h in tqdm(handovers, desc="hand-overs", disable=not cfg.output.progress):
            images = torch.cat([combined_generate(model, prompts[i:i + 16], seeds[i:i + 16], h, n,
                                                  e.base_guidance_scale, cfg.method.guidance_scale,
                                                  cfg.model.resolution, cfg.model.height, cfg.model.width,
                                                  progress=cfg.output.progress)
                                for i in range(0, len(prompts), 16)])
            r = dict(handover=h, num_inference_steps=n,
                     **evaluate_images(images, prompts, e.images_per_prompt, rewards, embedder, reference, clip))
            results.append(r)
            q = r[rewards[0].name]
            print(f"handover {h:3d}: {rewards[0].name} {q['mean']:.4f} +- {q['se']:.4f}  "
                  f"diversity {r['dino_diversity']:.4f}" +
                  (f"  FD {r['frechet_distance']:.3f}  cov {r['covariance_distance']:.3f}  "
                   f"logcov {r['log_covariance_distance']:.3f}" if reference is not None else "") +
                  (f"  CLIP {r['clip_score']['mean']:.2f}" if clip else ""))
        out.mkdir(parents=True, exist_ok=True)
        summary = dict(finetuned=model.source, prompts=cfg.data.prompts,
                       num_prompts=len(prompts) // e.images_per_prompt,
                       images_per_prompt=e.images_per_prompt, seed=cfg.optim.seed,
                       base_guidance_scale=e.base_guidance_scale, guidance_scale=cfg.method.guidance_scale,
                       reference_dir=ref_dir or None, num_reference=None if reference is None else reference.shape[0],
                       results=results)
        (out / "evaluation.json").write_text(json.dumps(summary, indent=2))
        plot = plot_tradeoff(results, rewards[0].name, out / "quality_vs_diversity.png")
        print(f"wrote {out / 'evaluation.json'} and {plot}")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------- training-time monitoring

@torch.no_grad()
def heldout_metrics(trainer) -> dict:
    """--eval_every: the current model's reward and diversity on held-out prompts (M images each,
    fixed seeds), so reward hacking shows as diversity falling while the reward climbs."""
    o = trainer.cfg.output
    if getattr(trainer, "eval_embedder", None) is None:
        from refl_engine.data import load_prompts

        trainer.eval_embedder = build_embedder(o.eval_embedding, trainer.device)
        pool = load_prompts(o.eval_prompts) if o.eval_prompts else trainer.prompts[-o.eval_num_prompts:]
        trainer.eval_prompts = pool[:o.eval_num_prompts]
    embedder, prompts = trainer.eval_embedder, trainer.eval_prompts
    m = o.eval_images_per_prompt
    batch = [p for p in prompts for _ in range(m)]
    images = trainer.generate(batch, seed=4321)
    reward = trainer.reward(images.to(trainer.device), batch).float().cpu()
    emb = embedder(images)
    return {"eval_reward": float(reward.mean()), "eval_reward_se": mean_se(reward)["se"],
            "eval_diversity": dino_diversity(emb.view(len(prompts), m, -1))}


if __name__ == "__main__":
    sys.exit(main())

"""ImageReward (Xu et al. 2023): BLIP ViT-L image encoder + BERT text encoder with cross-attention
to the image tokens + a linear MLP head, standardized.

score = (MLP(h_[CLS]) - 0.16717362830052426) / 1.0333394966054072, where h_[CLS] is the text
encoder's first output token; mean and std are the constants of the official ImageReward class.

The modules here are written in the key layout of the official checkpoint ImageReward.pt
(hub repo THUDM/ImageReward), so it loads without renaming:
    blip.visual_encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.{i}.{norm1, attn.qkv, attn.proj,
        norm2, mlp.fc1, mlp.fc2}.*, norm.*}                                     (BLIP's timm-style ViT)
    blip.text_encoder.embeddings.{word_embeddings, position_embeddings, LayerNorm}.*
    blip.text_encoder.encoder.layer.{i}.{attention, crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}}.*
    blip.text_encoder.encoder.layer.{i}.{intermediate.dense, output.dense, output.LayerNorm}.*   (BLIP's med.py BERT)
    mlp.layers.{0,2,4,6,7}.*                                                    (the linear head)
The checkpoint also holds BLIP's unused contrastive projections (blip.vision_proj, blip.text_proj) and
the position_ids buffer; they are skipped, as the official loader (strict=False) ignores them too.

Architecture (ImageReward's BLIP_Pretrain(vit="large") and its med_config.json): ViT-L/16 at 224 px
(1024 wide, 24 blocks, 16 heads, MLP 4096, LayerNorm eps 1e-6, qkv bias); BERT-base (768 wide,
12 layers, 12 heads, 3072, eps 1e-12, vocab 30524 = bert-base-uncased + [DEC] + [ENC], 512 positions,
no token-type embeddings) whose cross-attention keys/values read the 1024-wide image tokens.
Prompts: bert-base-uncased WordPiece, padded/truncated to 35 tokens.

`--reward imagereward:PATH`: ImageReward.pt, or a directory holding it and optionally med_config.json
and a bert-base-uncased tokenizer (vocab.txt). With no path: both files from THUDM/ImageReward and
the tokenizer from bert-base-uncased.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .aesthetic import LinearStackHead
from .base import (
    Reward,
    RewardFiles,
    RewardWeightsError,
    _one_line,
    fetch_hub_file,
    find_in_dir,
    load_state_dict_file,
    register_reward,
)
from .preprocess import ImagePreprocess, at_least_float32 as f32, tokenize

IMAGEREWARD_HUB_ID = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
BERT_HUB_ID = "bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_PROMPT_TOKENS = 35


@dataclass
class ImageRewardConfig:
    # BLIP ViT-L
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_mlp: int = 4096
    vision_eps: float = 1e-6
    # med_config.json (BERT-base with cross-attention)
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-12
    vocab_size: int = 30524
    max_position_embeddings: int = 512

    @classmethod
    def from_med_config(cls, med: dict) -> "ImageRewardConfig":
        """The text sizes from med_config.json; its encoder_width is ignored (the ViT's width is used,
        as BLIP_Pretrain does). Keys named like the vision fields above override the ViT-L sizes
        (not in the official file; tiny test models use them)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in med.items() if k in names})


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.view(b, t, n, c // n).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads))
        return self.proj(out.transpose(1, 2).flatten(2))


class _ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        w = cfg.vision_width
        self.norm1 = nn.LayerNorm(w, eps=cfg.vision_eps)
        self.attn = _ViTAttention(w, cfg.vision_heads)
        self.norm2 = nn.LayerNorm(w, eps=cfg.vision_eps)
        self.mlp = _ViTMlp(w, cfg.vision_mlp)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.vision_width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BlipVisionEncoder(nn.Module):
    """Pre-norm ViT returning all tokens after the final LayerNorm (B, 1 + patches, width)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        patches = (cfg.image_size // cfg.patch_size) ** 2
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vision_width))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, cfg.vision_width))
        self.blocks = nn.ModuleList([_ViTBlock(cfg) for _ in range(cfg.vision_layers)])
        self.norm = nn.LayerNorm(cfg.vision_width, eps=cfg.vision_eps)

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class _BertSelfAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_width, cfg.hidden_size)
        self.value = nn.Linear(kv_width, cfg.hidden_size)

    def forward(self, x, context, mask):
        q, k, v = (_heads(t, self.heads) for t in (self.query(x), self.key(context), self.value(context)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class _BertResidualOut(nn.Module):
    """dense -> add the sublayer's input -> LayerNorm (post-norm BERT)."""

    def __init__(self, in_width: int, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, cfg: ImageRewardConfig, kv_width: int):
        super().__init__()
        self.self = _BertSelfAttention(cfg, kv_width)
        self.output = _BertResidualOut(cfg.hidden_size, cfg)

    def forward(self, x, context, mask):
        return self.output(self.self(x, context, mask), x)


class _BertIntermediate(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class _BertLayer(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.attention = _BertAttention(cfg, cfg.hidden_size)
        self.crossattention = _BertAttention(cfg, cfg.vision_width)
        self.intermediate = _BertIntermediate(cfg)
        self.output = _BertResidualOut(cfg.intermediate_size, cfg)

    def forward(self, x, text_mask, image_tokens):
        x = self.attention(x, x, text_mask)
        x = self.crossattention(x, image_tokens, None)
        return self.output(self.intermediate(x), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(positions))


class _BertEncoder(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.layer = nn.ModuleList([_BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class BlipTextEncoder(nn.Module):
    """BERT whose every layer cross-attends to the image tokens (BLIP's 'multimodal' mode)."""

    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.embeddings = _BertEmbeddings(cfg)
        self.encoder = _BertEncoder(cfg)

    def forward(self, input_ids, attention_mask, image_tokens):
        x = self.embeddings(input_ids)
        # Padding keys masked out; an additive mask in x's dtype, (B, 1, 1, T) over keys.
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, mask, image_tokens)
        return x


class _Blip(nn.Module):
    def __init__(self, cfg: ImageRewardConfig):
        super().__init__()
        self.visual_encoder = BlipVisionEncoder(cfg)
        self.text_encoder = BlipTextEncoder(cfg)


class ImageRewardModel(nn.Module):
    """The network of ImageReward.pt (without tokenizer and preprocessing)."""

    def __init__(self, cfg: ImageRewardConfig | None = None):
        super().__init__()
        self.config = cfg or ImageRewardConfig()
        self.blip = _Blip(self.config)
        self.mlp = LinearStackHead(self.config.hidden_size)

    def forward(self, pixels, input_ids, attention_mask):
        image_tokens = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        raw = f32(self.mlp(text[:, 0]).squeeze(-1))
        return (raw - REWARD_MEAN) / REWARD_STD


# Keys of ImageReward.pt the reward does not use (see the module docstring).
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_UNUSED_SUFFIXES = ("position_ids",)


def load_imagereward_state_dict(model: ImageRewardModel, state: dict, source: str) -> None:
    used = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES) and not k.endswith(_UNUSED_SUFFIXES)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in used]
    unexpected = [k for k in used if k not in expected]
    wrong = [k for k in used if k in expected and used[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (missing and f"missing {missing[0]}") or (unexpected and f"unexpected {unexpected[0]}") or (
            f"{wrong[0]} has shape {tuple(used[wrong[0]].shape)}, expected {tuple(expected[wrong[0]].shape)}"
        )
        raise RewardWeightsError(
            f"{source} does not have the layout of {IMAGEREWARD_FILE}: {detail} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped)"
        )
    model.load_state_dict(used, strict=True)


class ImageReward(Reward):
    name = "imagereward"
    # Standardized score: +-2.5 covers ~99% of the human-rated images; tuned models reach ~1.5
    # (ImageReFL Table 3). Observed range, not a hard limit.
    bounds = (-2.5, 2.5)

    def __init__(self, model: ImageRewardModel, tokenizer, output: str = "raw"):
        super().__init__(output)
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.input_size = cfg.image_size
        self.preprocess = ImagePreprocess(size=cfg.image_size, crop_rounding="round")  # BLIP's torchvision transform
        self.backbone = {
            "kind": "blip_vit",
            "config": {
                "hidden_size": cfg.vision_width,
                "num_layers": cfg.vision_layers,
                "num_heads": cfg.vision_heads,
                "intermediate_size": cfg.vision_mlp,
                "patch": cfg.patch_size,
                "image_size": cfg.image_size,
            },
            # The text encoder cross-attends to the image, so the gradient crosses it as well.
            "text_config": {
                "hidden_size": cfg.hidden_size,
                "num_layers": cfg.num_hidden_layers,
                "num_heads": cfg.num_attention_heads,
                "intermediate_size": cfg.intermediate_size,
                "seq_len": MAX_PROMPT_TOKENS,
                "cross_attention_width": cfg.vision_width,
            },
            "activation_checkpointing": "per_layer",
            "num_params": sum(p.numel() for p in model.parameters()),
        }
        self.recompute_layers = (*model.blip.visual_encoder.blocks, *model.blip.text_encoder.encoder.layer)
        self.freeze()

    def score(self, images, prompts):
        weight = self.model.blip.visual_encoder.pos_embed
        pixels = self.preprocess(f32(images)).to(weight.dtype)
        tokens = tokenize(self.tokenizer, prompts, MAX_PROMPT_TOKENS, weight.device)
        return self.model(pixels, tokens["input_ids"], tokens["attention_mask"])


def blip_tokenizer(source: str):
    """bert-base-uncased WordPiece plus BLIP's two added tokens ([DEC] as bos, [ENC])."""
    from transformers import BertTokenizer

    try:
        tokenizer = BertTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001
        raise RewardWeightsError(f"could not load the bert-base-uncased tokenizer from {source} ({_one_line(err)})") from None
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_imagereward(path: str | None = None, output: str = "raw") -> ImageReward:
    root = None
    if path is None:
        file = fetch_hub_file(IMAGEREWARD_HUB_ID, IMAGEREWARD_FILE)
        med_file = fetch_hub_file(IMAGEREWARD_HUB_ID, MED_CONFIG_FILE)
    else:
        file = find_in_dir(path, [IMAGEREWARD_FILE], IMAGEREWARD_FILE)
        root = Path(path) if Path(path).is_dir() else None
        med_file = file.parent / MED_CONFIG_FILE
    cfg = ImageRewardConfig()
    if med_file.is_file():
        try:
            cfg = ImageRewardConfig.from_med_config(json.loads(med_file.read_text()))
        except (ValueError, TypeError) as err:
            raise RewardWeightsError(f"{med_file} is not a readable {MED_CONFIG_FILE} ({_one_line(err)})") from None
    state = load_state_dict_file(file, IMAGEREWARD_FILE)
    if not isinstance(state, dict):
        raise RewardWeightsError(f"{file} is not an {IMAGEREWARD_FILE} state dict")
    model = ImageRewardModel(cfg)
    load_imagereward_state_dict(model, state, str(file))
    tok_source = str(root) if root is not None and (root / "vocab.txt").is_file() else BERT_HUB_ID
    return ImageReward(model.float(), blip_tokenizer(tok_source), output=output)


def build_random_imagereward(tokenizer, output: str = "raw") -> ImageReward:
    """ImageReward at its real size (ImageRewardConfig's defaults: BLIP ViT-L + BERT-base, as published)
    with random weights (benchmarks; nothing is downloaded). `tokenizer`: a BERT tokenizer (blip_tokenizer)."""
    return ImageReward(ImageRewardModel(ImageRewardConfig()).float(), tokenizer, output=output)


register_reward("imagereward", "ImageReward v1.0: BLIP ViT-L + cross-attention BERT + MLP (path: ImageReward.pt)",
                files=RewardFiles(local=(IMAGEREWARD_FILE,), hub=((IMAGEREWARD_HUB_ID, IMAGEREWARD_FILE),
                                                                    (IMAGEREWARD_HUB_ID, MED_CONFIG_FILE),
                                                                    (BERT_HUB_ID, "vocab.txt")))
                )(load_imagereward)

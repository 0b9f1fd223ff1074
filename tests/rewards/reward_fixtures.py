"""Tiny offline stand-ins for the reward models' tokenizers and configurations.

Nothing here downloads: the tokenizers are written from a made-up vocabulary into tmp dirs and the
models are built from config with random weights.
"""
from __future__ import annotations

import json

import torch

WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "car", "the", "on", "grass"]


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(directory) -> "object":
    """A CLIP BPE tokenizer with a ~540-token vocabulary; <|endoftext|> has the highest id, as in CLIP."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet]
    # A few merges so that some words become single tokens (exercises real BPE, not only bytes).
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    tokens += ["ca", "cat</w>", "do", "dog</w>", "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="<|endoftext|>")
    tok.save_pretrained(str(directory))
    return tok


def write_bert_tokenizer(directory):
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("abcdefghijklmnopqrstuvwxyz")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(directory / "vocab.txt"))
    return tok


def tiny_clip_config(tokenizer, image_size=28, patch=7, projection_dim=16, hidden_act="quick_gelu"):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch, hidden_act=hidden_act,
    )
    vision["projection_dim"] = text["projection_dim"] = projection_dim
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def random_images(batch=2, size=40, seed=0):
    """Images in [0, 1], the same for the same seed."""
    return torch.rand(batch, 3, size, size + 8, generator=torch.Generator().manual_seed(seed))

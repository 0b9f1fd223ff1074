"""Prompt sources."""
from __future__ import annotations

import csv
import io
import json
import logging
import unicodedata
from pathlib import Path

import torch

from .config import ConfigError

log = logging.getLogger("refl_engine")

_COLORS = "red green blue yellow orange purple pink white black gray".split()
_SHAPES = "circle square triangle star ring".split()
_SCENES = "sky sea field city mountain sunset night".split()


def article(word: str) -> str:
    """The indefinite article before `word` ("an orange", "a red")."""
    return "an" if word[:1] in "aeiou" else "a"


def toy_prompts() -> list[str]:
    """A fixed, deterministic set of captions over the tiny tokenizer's vocabulary."""
    prompts = []
    for i, shape in enumerate(_SHAPES):
        for j, color in enumerate(_COLORS):
            bg = _COLORS[(i + 3 * j + 1) % len(_COLORS)]
            prompts.append(f"{article(color)} {color} {shape} on {article(bg)} {bg} background")
    for k, scene in enumerate(_SCENES):
        color = _COLORS[k % len(_COLORS)]
        prompts.append(f"a painting of a {scene} with {article(color)} {color} {_SHAPES[k % len(_SHAPES)]}")
    return prompts


PROMPT_FIELDS = ("prompt", "caption")  # the field (jsonl) or column (csv) a prompt is read from


def _visible(text: str) -> bool:
    """Whether the text has a character that shows: not whitespace, not a format character
    (zero-width space/joiners, BOM, bidi marks: Unicode category Cf), not a control character."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc") for c in text)


def _prompt_of(row, where: str) -> str:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: not a JSON object; write one {{\"prompt\": \"...\"}} object a line")
    for key in PROMPT_FIELDS:
        if key in row:
            if not isinstance(row[key], str):
                raise ConfigError(f"{where}: {key!r} is {type(row[key]).__name__}, not a string")
            return row[key]
    raise ConfigError(f"{where}: no 'prompt' or 'caption' field (found: {', '.join(map(str, row)) or 'none'})")


def load_prompts(spec: str) -> list[str]:
    """builtin:toy | a .txt file with one prompt a line | a .jsonl file with a "prompt" (or
    "caption") field a line | a .csv file with a header and a "prompt" (or "caption") column.
    Lines with nothing visible (whitespace, zero-width characters) are dropped."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name != "toy":
            raise ConfigError(f"unknown built-in prompt set {spec!r}; the built-in set is builtin:toy")
        return toy_prompts()
    path = Path(spec)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the first prompt
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read prompt file {spec!r} ({e.__class__.__name__}); give a readable UTF-8 "
                          ".txt, .jsonl or .csv file") from None
    suffix = path.suffix.lower()
    prompts = []
    if suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{spec}:{n}: not valid JSON; write one {{\"prompt\": \"...\"}} object a "
                                  "line") from None
            prompts.append(_prompt_of(row, f"{spec}:{n}"))
    elif suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""))
            columns = {c.strip().lower(): c for c in reader.fieldnames or () if c}
            key = next((columns[c] for c in PROMPT_FIELDS if c in columns), None)
            if key is None:
                raise ConfigError(f"{spec}: no 'prompt' or 'caption' column in the header "
                                  f"({', '.join(reader.fieldnames or ()) or 'empty'}); the first row names the columns")
            prompts = [row[key] or "" for row in reader]
        except csv.Error as e:
            raise ConfigError(f"{spec}:{reader.line_num}: not readable CSV ({e})") from None
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if _visible(p)]
    if not prompts:
        raise ConfigError(f"prompt file {spec!r} holds no prompts")
    return prompts


def sample_prompts(data, prompts: list[str]) -> list[str]:
    """The sample grids' prompts: --validation_prompt drawn --num_sample_images times (diffusers'
    validation), else the first --num_sample_images of --sample_prompts (default: the training prompts)."""
    if data.validation_prompt:
        return [data.validation_prompt] * data.num_sample_images
    return (load_prompts(data.sample_prompts) if data.sample_prompts else prompts)[: data.num_sample_images]


def warn_long_prompts(prompts: list[str], tokenizer, what: str = "--prompts") -> int:
    """Log once how many prompts the text encoder will cut at its length limit (the tokenizer's
    model_max_length, 77 tokens for CLIP); returns that number."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not limit or limit > 100_000:  # transformers' "no limit" sentinel is a huge int
        return 0
    lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False, verbose=False)["input_ids"]]
    long = [i for i, n in enumerate(lengths) if n > limit]
    if long:
        first = prompts[long[0]]
        log.warning("%d of %d %s are longer than the text encoder's %d tokens and are cut there (e.g. %d tokens: "
                    "%r)", len(long), len(prompts), what, limit, lengths[long[0]], first[:80])
    return len(long)


# ---------------------------------------------------------------- image-caption datasets

CAPTION_COLUMNS = ("text", "caption", "prompt")  # diffusers' imagefolder default first


def _read_imagefolder(root: Path, caption_column: str) -> list[tuple[Path, str]]:
    """metadata.jsonl of the diffusers `imagefolder` layout: one JSON object a line with
    `file_name` (relative to the folder) and a caption column."""
    records = []
    text = (root / "metadata.jsonl").read_text(encoding="utf-8")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{root / 'metadata.jsonl'}:{n}: not a JSON object with a 'file_name' field") from None
        columns = (caption_column,) if caption_column else CAPTION_COLUMNS
        caption = next((row[c] for c in columns if c in row), None)
        if caption is None:
            raise ConfigError(f"{root / 'metadata.jsonl'}:{n}: no caption column ({'/'.join(columns)}); "
                              "set --caption_column")
        if isinstance(caption, list):  # several captions per image: the first
            caption = caption[0] if caption else ""
        records.append((root / name, str(caption)))
    return records


def _read_coco(captions_json: Path, image_dir: Path) -> list[tuple[Path, str]]:
    """COCO captions layout: {"images": [{"id", "file_name"}], "annotations": [{"image_id",
    "caption"}]}; every (image, caption) annotation is one record."""
    try:
        data = json.loads(captions_json.read_text(encoding="utf-8"))
        files = {im["id"]: im["file_name"] for im in data["images"]}
        return [(image_dir / files[a["image_id"]], str(a["caption"]).strip()) for a in data["annotations"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read COCO captions {str(captions_json)!r} ({e.__class__.__name__}: {e}); "
                          "it needs 'images' (id, file_name) and 'annotations' (image_id, caption)"
                          .splitlines()[0]) from None


def find_records(train_data_dir: str, coco_captions: str = "", caption_column: str = "") -> list[tuple[Path, str]]:
    """(image path, caption) pairs from --train_data_dir: a folder with metadata.jsonl, or with a
    COCO captions json (--coco_captions FILE, else the one *.json in the folder holding
    'annotations')."""
    root = Path(train_data_dir).expanduser() if train_data_dir else None
    if coco_captions:
        captions = Path(coco_captions).expanduser()
        if not captions.is_file():
            raise ConfigError(f"--coco_captions {coco_captions!r}: no such file")
        records = _read_coco(captions, root or captions.parent)
    else:
        if root is None or not root.is_dir():
            raise ConfigError(f"--train_data_dir {train_data_dir!r}: no such folder; give a folder of images with a "
                              "metadata.jsonl (file_name + text) or a COCO captions json")
        if (root / "metadata.jsonl").is_file():
            records = _read_imagefolder(root, caption_column)
        else:
            coco = [p for p in sorted(root.glob("*.json")) if '"annotations"' in p.read_text(errors="ignore")]
            if len(coco) != 1:
                raise ConfigError(f"--train_data_dir {train_data_dir!r} has no metadata.jsonl and "
                                  f"{'no' if not coco else 'several'} COCO captions json; add a metadata.jsonl "
                                  "or name the json with --coco_captions")
            records = _read_coco(coco[0], root)
    if not records:
        raise ConfigError(f"--train_data_dir {train_data_dir or coco_captions!r} holds no image-caption pairs")
    return records


def load_image(path: Path, resolution: int | tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float in [0, 1] for resolution H = W or (H, W): RGB, resized (bicubic, as the
    diffusers training examples) to the smallest size that covers (H, W), then the center crop."""
    from PIL import Image

    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = max(height / h, width / w)
        im = im.resize((max(width, round(w * s)), max(height, round(h * s))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - width) // 2, (h - height) // 2
        im = im.crop((left, top, left + width, top + height))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float() / 255.0


class ImageCaptionDataset:
    """Real image-caption pairs for ImageReFL and the pre-training loss; this rank's shard only
    (records rank, rank + world_size, ...). Unreadable images are skipped, counted and warned
    about once each."""

    def __init__(self, train_data_dir: str, resolution: int | tuple[int, int], coco_captions: str = "",
                 caption_column: str = "", rank: int = 0, world_size: int = 1):
        records = find_records(train_data_dir, coco_captions, caption_column)
        missing = sum(1 for p, _ in records[:1000] if not p.is_file())
        if missing == min(len(records), 1000):
            raise ConfigError(f"--train_data_dir {train_data_dir!r}: none of the listed images exist "
                              f"(e.g. {records[0][0]}); file_name is relative to the folder")
        self.records = records[rank::world_size]
        if not self.records:
            raise ConfigError(f"--train_data_dir holds {len(records)} pairs, fewer than the {world_size} ranks")
        self.resolution = resolution
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str] | None:
        path, caption = self.records[i]
        try:
            return load_image(path, self.resolution), caption
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for missing/corrupt files
            self.bad.add(i)
            log.warning("skipping unreadable image %s (%s); %d skipped so far", path, e.__class__.__name__,
                        len(self.bad))
            return None

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[str]]:
        """A random batch (B, 3, H, W) in [0, 1] with its captions, drawn with `generator`."""
        images, captions = [], []
        while len(images) < batch_size:
            if len(self.bad) == len(self.records):
                raise ConfigError("every image of --train_data_dir is unreadable")
            i = int(torch.randint(len(self.records), (1,), generator=generator))
            if i in self.bad:
                continue
            item = self[i]
            if item is not None:
                images.append(item[0])
                captions.append(item[1])
        return torch.stack(images), captions


def image_dataset(cfg, resolution: int | tuple[int, int], rank: int = 0,
                  world_size: int = 1) -> ImageCaptionDataset | None:
    """The run's image-caption dataset, or None when no --train_data_dir / --coco_captions is set."""
    d = cfg.data
    if not (getattr(d, "train_data_dir", "") or getattr(d, "coco_captions", "")):
        return None
    return ImageCaptionDataset(d.train_data_dir, resolution, d.coco_captions, d.caption_column, rank, world_size)

"""Render an image-caption dataset from the procedural world, for ImageReFL and the
pre-training loss: `python -m refl_engine.toyworld.make_dataset --out DIR --n 64`.

Layouts: `imagefolder` (PNGs + metadata.jsonl with file_name and text, as diffusers' imagefolder
reads) or `coco` (PNGs + captions.json with images/annotations, as COCO's captions files)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from .world import RESOLUTION, generate


def make_dataset(out: str | Path, n: int, seed: int = 0, size: int = RESOLUTION, layout: str = "imagefolder") -> Path:
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, captions, _ = generate(n, seed, size)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    names = [f"{i:06d}.png" for i in range(n)]
    for name, px in zip(names, pixels):
        Image.fromarray(px).save(out / name)
    if layout == "coco":
        data = {"images": [{"id": i, "file_name": name, "width": size, "height": size} for i, name in enumerate(names)],
                "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(captions)]}
        (out / "captions.json").write_text(json.dumps(data))
    else:
        (out / "metadata.jsonl").write_text("".join(json.dumps({"file_name": name, "text": c}) + "\n"
                                                    for name, c in zip(names, captions)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m refl_engine.toyworld.make_dataset", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=RESOLUTION, help="image side in pixels")
    p.add_argument("--layout", choices=("imagefolder", "coco"), default="imagefolder")
    args = p.parse_args(argv)
    if args.n < 1 or args.size < 8:
        print("error: --n must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    out = make_dataset(args.out, args.n, args.seed, args.size, args.layout)
    print(f"wrote {args.n} images ({args.layout}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

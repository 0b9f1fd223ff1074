"""Image-caption datasets: imagefolder and COCO layouts, resize + center crop, sharding,
unreadable images, one-line errors."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from refl_engine.config import ConfigError
from refl_engine.data import ImageCaptionDataset, find_records, load_image
from refl_engine.toyworld.make_dataset import make_dataset


def test_imagefolder_and_coco_layouts_give_the_same_pairs(tmp_path):
    make_dataset(tmp_path / "folder", 6, seed=3)
    make_dataset(tmp_path / "coco", 6, seed=3, layout="coco")
    a = find_records(str(tmp_path / "folder"))
    b = find_records(str(tmp_path / "coco"))
    assert [c for _, c in a] == [c for _, c in b] and len(a) == 6
    b2 = find_records("", coco_captions=str(tmp_path / "coco" / "captions.json"))
    assert [c for _, c in b2] == [c for _, c in b]
    ds_a, ds_b = ImageCaptionDataset(str(tmp_path / "folder"), 32), ImageCaptionDataset(str(tmp_path / "coco"), 32)
    assert torch.equal(ds_a[2][0], ds_b[2][0])


def test_resize_and_center_crop(tmp_path):
    # 64 x 32: left half red, right half blue. Shorter side 32 -> 16 makes it 32 x 16; the center
    # crop keeps columns 8..23, so the crop's left half is red and its right half blue.
    px = np.zeros((32, 64, 3), np.uint8)
    px[:, :32, 0] = 255
    px[:, 32:, 2] = 255
    Image.fromarray(px).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png", 16)
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32
    # Bicubic rings within two pixels of the edge at column 8 of the crop; look away from it.
    assert torch.allclose(img[:, :, :5], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 16, 5), atol=1 / 255)
    assert torch.allclose(img[:, :, 11:], torch.tensor([0, 0, 1.0]).view(3, 1, 1).expand(3, 16, 5), atol=1 / 255)


def test_sharding_is_a_partition(tmp_path):
    make_dataset(tmp_path, 7, seed=1)
    shards = [ImageCaptionDataset(str(tmp_path), 32, rank=r, world_size=3).records for r in range(3)]
    flat = [p for s in shards for p in s]
    assert sorted(flat) == sorted(find_records(str(tmp_path))) and len(flat) == 7
    assert [len(s) for s in shards] == [3, 2, 2]


def test_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    make_dataset(tmp_path, 3, seed=2)
    (tmp_path / "000001.png").write_bytes(b"not a png")
    ds = ImageCaptionDataset(str(tmp_path), 32)
    g = torch.Generator().manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="refl_engine"):
        images, captions = ds.sample(8, g)
    assert images.shape == (8, 3, 32, 32) and len(captions) == 8
    assert ds.bad == {1}
    warnings = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


@pytest.mark.parametrize("setup,match", [
    (lambda p: None, "no such folder"),
    (lambda p: (p.mkdir(), (p / "metadata.jsonl").write_text("")), "holds no image-caption pairs"),
    (lambda p: (p.mkdir(), (p / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')), "no caption column"),
    (lambda p: (p.mkdir(), (p / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')),
     "none of the listed images exist"),
    (lambda p: p.mkdir(), "no metadata.jsonl"),
])
def test_bad_datasets_are_one_line_errors(tmp_path, setup, match):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(ConfigError, match=match) as e:
        ImageCaptionDataset(str(root), 32)
    assert "\n" not in str(e.value)


def test_coco_json_without_annotations_is_a_one_line_error(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="annotations") as e:
        find_records(str(tmp_path), coco_captions=str(tmp_path / "c.json"))
    assert "\n" not in str(e.value)


def test_non_square_resolution_crops_the_center(tmp_path):
    # 32 x 32, a red band in rows 12..19: at (8, 16) the image is resized to 16 x 16 and rows
    # 4..11 kept, so the band (rows 6..9 after resizing) sits in the middle of the crop.
    px = np.zeros((32, 32, 3), np.uint8)
    px[12:20, :, 0] = 255
    Image.fromarray(px).save(tmp_path / "x.png")
    img = load_image(tmp_path / "x.png", (8, 16))
    assert img.shape == (3, 8, 16)
    assert torch.allclose(img[0, 3:5], torch.ones(2, 16), atol=2 / 255)
    assert float(img[0, 0].max()) < 0.05 and float(img[0, 7].max()) < 0.05

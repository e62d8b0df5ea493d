"""Vision preprocessing as the GPart authors train and evaluate: RandomResizedCrop + flip, Resize + CenterCrop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gpart_cli.data.image_transforms import (
    ImageTransform,
    center_crop,
    random_resized_box,
    resize_short_side,
    transform_for,
)
from gpart_cli.data.vision import VisionItems, build_vision_splits
from gpart_cli.recipe.schema import DataSection
from tests.conftest import ASSETS


def _gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose red channel is the column index and green the row index (positions are readable)."""
    xs, ys = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8))


def test_random_boxes_cover_8_to_100_percent_at_aspect_3_4_to_4_3():
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        left, top, w, h = random_resized_box(500, 375, g)
        assert 0 <= left <= 500 - w and 0 <= top <= 375 - h
        assert 0.08 * 500 * 375 * 0.9 <= w * h <= 500 * 375          # rounding may shave a little off 8%
        assert math.log(3 / 4) - 0.05 <= math.log(w / h) <= math.log(4 / 3) + 0.05


def test_random_boxes_replay_with_the_same_generator_seed():
    draws = [random_resized_box(64, 48, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert draws[0] == draws[1] != random_resized_box(64, 48, torch.Generator().manual_seed(8))


def test_an_extreme_aspect_falls_back_to_the_centred_clamped_crop():
    # 1000 x 10 has no 3/4..4/3 box of >= 8% area: ten misses, then the widest 4:3 box in the middle.
    assert random_resized_box(1000, 10, torch.Generator().manual_seed(0)) == (493, 0, 13, 10)


def test_eval_resizes_the_short_side_then_crops_the_centre():
    image = _gradient(40, 20)
    short = resize_short_side(image, 10)
    assert short.size == (20, 10)
    crop = center_crop(short, 10)
    assert crop.size == (10, 10)
    red = np.asarray(crop)[:, :, 0]
    # Columns 5..14 of the 20-wide resize, i.e. source columns 10..29 of 40 (each pixel averages two).
    assert 10 <= int(red[0, 0]) <= 11 and 28 <= int(red[0, -1]) <= 29


def test_transform_modes_give_the_model_size_and_normalise():
    image = _gradient(50, 30)
    for mode in ("resize", "center_crop", "random_resized_crop"):
        out = ImageTransform(16, 3, [0.5], [0.5], mode)(image, torch.Generator().manual_seed(0))
        assert out.shape == (3, 16, 16) and float(out.min()) >= -1 and float(out.max()) <= 1
    plain = ImageTransform(16, 3, [0.5], [0.5], "center_crop")
    assert torch.equal(plain(image), plain(image)) and not plain.random
    with pytest.raises(Exception, match="image transform 'jitter' is not one of"):
        ImageTransform(16, 3, [0.5], [0.5], "jitter")


def test_training_flips_half_the_time():
    image = _gradient(16, 16)
    augment = ImageTransform(16, 3, [0.0], [1.0], "random_resized_crop")
    flips = 0
    for seed in range(200):
        out = augment(image, torch.Generator().manual_seed(seed))
        flips += bool(out[0, 0, 0] > out[0, 0, -1])  # red (the column index) decreasing: mirrored
    assert 70 <= flips <= 130


def test_processor_size_and_stats_feed_the_transform():
    from types import SimpleNamespace

    from transformers import ViTConfig

    processor = SimpleNamespace(size={"height": 24, "width": 24}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5] * 3)
    t = transform_for(ViTConfig(image_size=224), None, processor, "center_crop")
    assert (t.image_size, t.mode) == (24, "center_crop")
    assert transform_for(ViTConfig(image_size=224), 32, processor).image_size == 32  # data.image_size wins


def test_items_draw_per_epoch_and_row_so_a_resumed_run_repeats_them():
    import datasets

    rows = datasets.Dataset.from_dict({"image": [_gradient(30, 20)] * 3, "label": [0, 1, 2]},
                                      features=datasets.Features({"image": datasets.Image(),
                                                                  "label": datasets.ClassLabel(num_classes=3)}))
    items = VisionItems(rows, ImageTransform(8, 3, [0.5], [0.5], "random_resized_crop"), seed=4)
    first = [items[i]["pixel_values"] for i in range(3)]
    again = VisionItems(rows, items.transform, seed=4)
    assert all(torch.equal(a["pixel_values"], b) for a, b in zip((again[i] for i in range(3)), first))
    assert not torch.equal(first[0], first[1])  # same picture, another row: another crop
    items.set_epoch(1)
    assert not torch.equal(items[0]["pixel_values"], first[0])
    items.set_epoch(0)
    assert torch.equal(items[0]["pixel_values"], first[0])


def test_splits_augment_training_rows_only():
    from transformers import ViTConfig

    fm = ASSETS / "fashion_mnist"
    data = DataSection(family="vision", task="fashion_mnist", max_train_samples=40, max_eval_samples=10,
                       train_files=[str(fm / "train-images-idx3-ubyte.gz"), str(fm / "train-labels-idx1-ubyte.gz")],
                       eval_files=[str(fm / "t10k-images-idx3-ubyte.gz"), str(fm / "t10k-labels-idx1-ubyte.gz")])
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1)
    splits = build_vision_splits(data, config, seed=0)
    assert (splits.train.transform.mode, splits.dev.transform.mode, splits.eval.transform.mode) == \
        ("random_resized_crop", "center_crop", "center_crop")
    plain = build_vision_splits(DataSection(**{**data.__dict__, "train_transform": "resize",
                                               "eval_transform": "resize"}), config, seed=0)
    assert (plain.train.transform.mode, plain.eval.transform.mode) == ("resize", "resize")

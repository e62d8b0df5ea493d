"""Vision data (docs/design.md §6): IDX / NPZ / image-folder / hub rows, the pixel transform and the ViT splits."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from gpart_cli.data.vision import (
    FASHION_MNIST,
    ImageTransform,
    build_vision_splits,
    load_image_rows,
    select_classes,
    transform_for,
)
from gpart_cli.errors import GpartError
from gpart_cli.recipe.schema import DataSection

ASSETS = Path(__file__).resolve().parents[2].parent / "shared" / "assets"
FASHION = ASSETS / "fashion_mnist"
TEST_PAIR = [str(FASHION / "t10k-labels-idx1-ubyte.gz"), str(FASHION / "t10k-images-idx3-ubyte.gz")]
TRAIN_PAIR = [str(FASHION / "train-images-idx3-ubyte.gz"), str(FASHION / "train-labels-idx1-ubyte.gz")]
DIGITS = str(ASSETS / "digits" / "digits.npz")

pytestmark = pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").is_file() or not Path(DIGITS).is_file(),
                                reason="offline image assets not present")


def section(**kw) -> DataSection:
    return DataSection(**{"family": "vision", "task": "fashion_mnist", **kw})


def tiny_vit_config(num_labels: int = 10):
    from transformers import ViTConfig

    return ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=4, intermediate_size=64, num_labels=num_labels)


# ---- IDX ----

def test_idx_fashion_test_files_labels_first_in_either_order():
    rows, names = load_image_rows(TEST_PAIR, None, None, "test", section(), what="eval data")
    assert len(rows) == 10_000
    assert rows.column_names == ["image", "label"]
    first = rows[0]
    assert first["label"] == 9                       # the first t10k label byte is 0x09: Ankle boot
    assert first["image"].size == (28, 28) and first["image"].mode == "L"
    assert names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                     "Ankle boot"]
    reversed_rows, _ = load_image_rows(TEST_PAIR[::-1], None, None, "test", section())
    assert reversed_rows[0]["label"] == 9 and len(reversed_rows) == 10_000
    assert np.array_equal(np.asarray(reversed_rows[5]["image"]), np.asarray(rows[5]["image"]))


def test_idx_pixels_match_the_raw_bytes():
    raw = gzip.open(TEST_PAIR[1]).read()
    first = np.frombuffer(raw, dtype=np.uint8, offset=16, count=28 * 28).reshape(28, 28)
    rows, _ = load_image_rows(TEST_PAIR, None, None, "test", section())
    assert np.array_equal(np.asarray(rows[0]["image"]), first)


def test_idx_plain_files_get_digit_names(tmp_path):
    plain = []
    for path in TEST_PAIR:
        target = tmp_path / Path(path).name.removesuffix(".gz")
        with gzip.open(path) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.append(str(target))
    rows, names = load_image_rows(plain, None, None, "test", section(task="mnist"))
    assert len(rows) == 10_000 and rows[0]["label"] == 9
    assert names == [str(i) for i in range(10)]


def test_idx_max_samples_is_a_seeded_subset():
    def labels(seed):
        rows, _ = load_image_rows(TEST_PAIR, None, None, "test", section(), max_samples=50, seed=seed)
        assert len(rows) == 50
        return rows["label"][:]

    assert labels(0) == labels(0)
    assert labels(0) != labels(1)
    full, _ = load_image_rows(TEST_PAIR, None, None, "test", section())
    # The same rows `Dataset.shuffle(seed)` picks, so local files and hub data subset alike.
    assert labels(3) == full.shuffle(seed=3).select(range(50))["label"][:]


def test_idx_pair_of_two_image_files_is_rejected():
    with pytest.raises(GpartError, match="one images file .magic 2051. and one labels file .magic 2049."):
        load_image_rows([TEST_PAIR[1], TRAIN_PAIR[0]], None, None, "test", section())


def test_idx_mismatched_counts_are_rejected():
    with pytest.raises(GpartError, match="10000 images of shape \\(28, 28\\) but 60000 labels"):
        load_image_rows([TEST_PAIR[1], TRAIN_PAIR[1]], None, None, "test", section())


def test_not_an_idx_file(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world")
    with pytest.raises(GpartError, match="junk.bin is not an unsigned-byte IDX file"):
        load_image_rows([str(junk), TEST_PAIR[0]], None, None, "test", section())


# ---- NPZ ----

def test_npz_digits_rescaled_to_255():
    rows, names = load_image_rows([DIGITS], None, None, "train", section(task="digits"))
    assert len(rows) == 1797
    assert rows[0]["label"] == 0
    assert names == [str(i) for i in range(10)]
    assert rows[0]["image"].size == (8, 8)
    peak = max(int(np.asarray(rows[i]["image"]).max()) for i in range(20))
    assert peak == 255
    raw = np.load(DIGITS)["images"][0]
    assert np.array_equal(np.asarray(rows[0]["image"]), np.rint(raw * (255 / 16)).astype(np.uint8))


def test_npz_rgb_and_labels_key(tmp_path):
    images = np.zeros((4, 5, 6, 3), dtype=np.uint8)
    images[:, :, :, 0] = 200
    path = tmp_path / "rgb.npz"
    np.savez(path, images=images, labels=np.array([0, 1, 2, 1]))
    rows, names = load_image_rows([str(path)], None, None, "train", section(task="toy"))
    assert names == ["0", "1", "2"] and rows["label"][:] == [0, 1, 2, 1]
    image = rows[0]["image"]
    assert image.mode == "RGB" and image.size == (6, 5) and image.getpixel((0, 0)) == (200, 0, 0)


def test_npz_missing_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((2, 4, 4)))
    with pytest.raises(GpartError, match="should hold arrays `images` and `target`"):
        load_image_rows([str(path)], None, None, "train", section(task="toy"))


def test_select_classes_keeps_and_renumbers():
    rows, names = load_image_rows([DIGITS], None, None, "train", section(task="digits"))
    kept, kept_names = select_classes(rows, names, [7, 3])
    assert kept_names == ["7", "3"]
    target = np.load(DIGITS)["target"]
    assert len(kept) == int((target == 7).sum() + (target == 3).sum()) == 362
    labels = kept["label"][:]
    assert set(labels) == {0, 1} and labels.count(0) == 179 and labels.count(1) == 183
    assert kept.features["label"].names == ["7", "3"]
    with pytest.raises(GpartError, match="distinct ids in \\[0, 10\\)"):
        select_classes(rows, names, [3, 10])


@pytest.mark.slow
def test_held_out_classes_filter_train_and_eval_then_subsample():
    data = section(train_files=TRAIN_PAIR, eval_files=TEST_PAIR, classes=[6, 7, 8, 9], max_train_samples=500,
                   max_eval_samples=300, dev_fraction=0.1)
    splits = build_vision_splits(data, tiny_vit_config(4), seed=0)
    assert splits.labels == ["Shirt", "Sneaker", "Bag", "Ankle boot"] and splits.num_labels == 4
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (450, 50, 300)  # caps count kept rows
    eval_labels = [splits.eval[i]["labels"] for i in range(len(splits.eval))]
    train_labels = [splits.train[i]["labels"] for i in range(len(splits.train))]
    assert set(eval_labels) == set(train_labels) == {0, 1, 2, 3}
    # Renumbered, not relabelled: eval label 2 is a t10k image whose original label is 8 (Bag).
    original = np.frombuffer(gzip.open(TEST_PAIR[0]).read()[8:], dtype=np.uint8)
    assert int((original == 8).sum()) == 1000 and eval_labels.count(2) > 0


def test_held_out_classes_errors_name_the_field():
    with pytest.raises(GpartError, match="data.classes: .*distinct ids in \\[0, 10\\)"):
        build_vision_splits(section(train_files=TRAIN_PAIR, classes=[9, 10], max_train_samples=50),
                            tiny_vit_config(2), seed=0)


# ---- image folders ----

def _image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    from PIL import Image

    colours = {"cat": (255, 0, 0), "dog": (0, 0, 255), "eel": (0, 255, 0)}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (10, 12), colours[name]).save(root / name / f"{name}{i}.png")
    return root


def test_image_folder_two_classes(tmp_path):
    folder = _image_folder(tmp_path / "pets")
    rows, names = load_image_rows([str(folder)], None, None, "train", section(task="pets"))
    assert names == ["cat", "dog"]
    assert len(rows) == 6 and sorted(rows["label"][:]) == [0, 0, 0, 1, 1, 1]
    for row in rows:
        expected = (255, 0, 0) if row["label"] == 0 else (0, 0, 255)
        assert row["image"].size == (10, 12) and row["image"].convert("RGB").getpixel((3, 3)) == expected


def test_eval_folder_with_fewer_classes_is_renumbered_by_name(tmp_path):
    train = _image_folder(tmp_path / "train", ("cat", "dog", "eel"), 4)
    evaluation = _image_folder(tmp_path / "eval", ("cat", "eel"), 2)
    data = section(task="pets", train_files=[str(train)], eval_files=[str(evaluation)], dev_fraction=0.25)
    splits = build_vision_splits(data, tiny_vit_config(3), seed=0)
    assert splits.labels == ["cat", "dog", "eel"] and splits.num_labels == 3
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (9, 3, 4)
    assert sorted(splits.eval[i]["labels"] for i in range(4)) == [0, 0, 2, 2]


def test_eval_folder_with_other_classes_is_rejected(tmp_path):
    train = _image_folder(tmp_path / "train", ("cat", "dog"), 2)
    evaluation = _image_folder(tmp_path / "eval", ("cat", "eel"), 2)
    data = section(task="pets", train_files=[str(train)], eval_files=[str(evaluation)], dev_fraction=0.0)
    with pytest.raises(GpartError, match="classes \\['cat', 'eel'\\] that are not among the training classes"):
        build_vision_splits(data, tiny_vit_config(2), seed=0)


# ---- hub (load_rows stubbed: no network) ----

def _stub_hub(monkeypatch, columns: dict, features=None):
    import datasets

    import gpart_cli.data.vision as vision

    rows = datasets.Dataset.from_dict(columns, features=features)
    calls = []

    def fake_load_rows(files, path, config, split, max_samples=None, seed=0, what="data", revision=None):
        calls.append((files, path, config, split, max_samples, seed))
        return rows

    monkeypatch.setattr(vision, "load_rows", fake_load_rows)
    return calls


def test_hub_columns_renamed_and_class_names_kept(monkeypatch):
    import datasets
    from PIL import Image

    images = [Image.new("RGB", (4, 4), (i * 40, 0, 0)) for i in range(3)]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b", "c"]),
                                  "extra": datasets.Value("int64")})
    calls = _stub_hub(monkeypatch, {"img": images, "fine_label": [2, 0, 1], "extra": [7, 7, 7]}, features)
    data = section(task="cifar", path="uoft-cs/cifar100", image_column="img", label_column="fine_label")
    rows, names = load_image_rows(None, data.path, "cifar100", "train", data, max_samples=2, seed=5)
    assert calls == [(None, "uoft-cs/cifar100", "cifar100", "train", 2, 5)]
    assert rows.column_names == ["image", "label"] and names == ["a", "b", "c"]
    assert rows[0]["label"] == 2 and rows[0]["image"].getpixel((0, 0)) == (0, 0, 0)


def test_hub_missing_column(monkeypatch):
    from PIL import Image

    _stub_hub(monkeypatch, {"image": [Image.new("L", (4, 4))], "fine_label": [0]})
    data = section(task="cifar", path="uoft-cs/cifar100")
    with pytest.raises(GpartError, match="train data uoft-cs/cifar100:train lacks column\\(s\\) label; "
                                         "found image, fine_label"):
        load_image_rows([], data.path, None, "train", data, what="train data")


def test_hub_int_labels_get_numeric_names(monkeypatch):
    from PIL import Image

    _stub_hub(monkeypatch, {"image": [Image.new("L", (4, 4))] * 3, "label": [0, 4, 2]})
    data = section(task="toy", path="someone/toy")
    rows, names = load_image_rows(None, data.path, None, "train", data)
    assert names == ["0", "1", "2", "3", "4"] and rows["label"][:] == [0, 4, 2]


def test_hub_unlabelled_rows_are_rejected(monkeypatch):
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    _stub_hub(monkeypatch, {"image": [Image.new("L", (4, 4))] * 2, "label": [1, -1]}, features)
    data = section(task="toy", path="someone/toy")
    with pytest.raises(GpartError, match="eval data someone/toy:test has label -1 outside \\[0, 2\\)"):
        load_image_rows(None, data.path, None, "test", data, what="eval data")


# ---- transform ----

def test_transform_grey_to_rgb_shape_and_constant_values():
    from PIL import Image

    transform = ImageTransform(16, 3, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    white = transform(Image.new("L", (28, 28), 255))
    assert white.shape == (3, 16, 16) and white.dtype == torch.float32
    assert torch.equal(white, torch.ones(3, 16, 16))
    black = transform(np.zeros((28, 28), dtype=np.uint8))
    assert torch.equal(black, -torch.ones(3, 16, 16))


def test_transform_rgb_to_grey_uses_luminance_and_per_channel_stats():
    from PIL import Image

    grey = ImageTransform(8, 1, [0.0], [1.0])(Image.new("RGB", (20, 20), (255, 0, 0)))
    assert grey.shape == (1, 8, 8)
    assert torch.allclose(grey, torch.full((1, 8, 8), 76 / 255))     # ITU-R 601: 0.299 * 255 = 76.2
    rgb = ImageTransform(4, 3, [0.0, 0.5, 1.0], [1.0, 0.5, 2.0])(Image.new("RGB", (4, 4), (255, 255, 255)))
    assert torch.equal(rgb[:, 0, 0], torch.tensor([1.0, 1.0, 0.0]))


def test_transform_float_array_input_and_determinism():
    array = np.full((6, 6), 1.0, dtype=np.float32)
    transform = ImageTransform(6, 1, [0.5], [0.5])
    assert torch.equal(transform(array), torch.ones(1, 6, 6))
    image = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    assert torch.equal(ImageTransform(16, 3, [0.5], [0.5])(image), ImageTransform(16, 3, [0.5], [0.5])(image))


def test_transform_for_config_and_processor():
    config = tiny_vit_config()
    default = transform_for(config)
    assert default.image_size == 16 and default.num_channels == 3
    assert default.mean.ravel().tolist() == [0.5, 0.5, 0.5] and default.std.ravel().tolist() == [0.5, 0.5, 0.5]
    processor = SimpleNamespace(image_mean=[0.25, 0.5, 0.75], image_std=[0.5, 0.25, 0.125])
    custom = transform_for(config, 8, processor=processor)
    assert custom.image_size == 8
    assert custom.mean.ravel().tolist() == [0.25, 0.5, 0.75] and custom.std.ravel().tolist() == [0.5, 0.25, 0.125]


# ---- splits ----

def test_build_vision_splits_fashion_feeds_a_tiny_vit():
    from transformers import ViTForImageClassification

    data = section(train_files=TRAIN_PAIR, eval_files=TEST_PAIR, max_train_samples=200, max_eval_samples=30,
                   dev_fraction=0.1)
    config = tiny_vit_config()
    splits = build_vision_splits(data, config, seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (180, 20, 30)
    assert splits.labels == FASHION_MNIST and splits.num_labels == 10
    item = splits.train[0]
    assert item["pixel_values"].shape == (3, 16, 16) and isinstance(item["labels"], int)
    batch = splits.collate([splits.train[i] for i in range(8)])
    assert batch["pixel_values"].shape == (8, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
    assert float(batch["pixel_values"].min()) >= -1.0 and float(batch["pixel_values"].max()) <= 1.0
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (8, 10) and torch.isfinite(out.loss)
    again = build_vision_splits(data, config, seed=0)
    assert [again.dev[i]["labels"] for i in range(20)] == [splits.dev[i]["labels"] for i in range(20)]


def test_splits_work_with_a_dataloader():
    data = section(task="digits", train_files=[DIGITS], dev_fraction=0.0, max_train_samples=10)
    splits = build_vision_splits(data, tiny_vit_config(), seed=1)
    assert splits.dev is None and splits.eval is None
    loader = torch.utils.data.DataLoader(splits.train, batch_size=4, collate_fn=splits.collate)
    shapes = [tuple(batch["pixel_values"].shape) for batch in loader]
    assert shapes == [(4, 3, 16, 16), (4, 3, 16, 16), (2, 3, 16, 16)]


def test_eval_label_out_of_range_names_file_value_and_num_labels(tmp_path):
    bad = tmp_path / "bad_eval.npz"
    np.savez(bad, images=np.zeros((3, 8, 8), dtype=np.uint8), target=np.array([0, 12, 3]))
    data = section(task="digits", train_files=[DIGITS], eval_files=[str(bad)])
    with pytest.raises(GpartError, match="eval data file\\(s\\) .*bad_eval.npz has label 12 outside \\[0, 10\\) "
                                         "\\(num_labels = 10\\)"):
        build_vision_splits(data, tiny_vit_config(), seed=0)


def test_fashion_task_with_label_12_is_rejected(tmp_path):
    bad = tmp_path / "bad_train.npz"
    np.savez(bad, images=np.zeros((3, 8, 8), dtype=np.uint8), target=np.array([1, 12, 3]))
    with pytest.raises(GpartError, match="bad_train.npz has label 12 outside \\[0, 10\\) \\(num_labels = 10\\)"):
        build_vision_splits(section(train_files=[str(bad)]), tiny_vit_config(), seed=0)


def test_negative_label_is_rejected(tmp_path):
    bad = tmp_path / "neg.npz"
    np.savez(bad, images=np.zeros((2, 8, 8), dtype=np.uint8), target=np.array([-1, 1]))
    with pytest.raises(GpartError, match="neg.npz has label -1 outside \\[0, 2\\)"):
        load_image_rows([str(bad)], None, None, "train", section(task="toy"))


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope-images-idx3-ubyte.gz")
    with pytest.raises(GpartError, match="train data file .*nope-images-idx3-ubyte.gz does not exist"):
        build_vision_splits(section(train_files=[missing, TEST_PAIR[0]]), tiny_vit_config(), seed=0)


def test_no_source_at_all():
    with pytest.raises(GpartError, match="no train data source"):
        build_vision_splits(section(), tiny_vit_config(), seed=0)


def test_pretrained_head_with_another_label_count_starts_fresh(tmp_path):
    """A self-pretrained 6-class ViT fine-tuned on 4 held-out classes: body loaded, head re-initialised."""
    from transformers import ViTForImageClassification

    from gpart_cli.adapters.loading import ModelSource, load_model

    torch.manual_seed(0)
    pretrained = ViTForImageClassification(tiny_vit_config(6))
    pretrained.save_pretrained(tmp_path / "model")
    model = load_model(ModelSource(str(tmp_path / "model")), "image_classification", 4, ["a", "b", "c", "d"])
    assert tuple(model.classifier.weight.shape) == (4, 32) and model.config.id2label[3] == "d"
    saved = dict(pretrained.named_parameters())
    body = {n: p for n, p in model.named_parameters() if not n.startswith("classifier")}
    assert len(body) == len(saved) - 2 and all(torch.equal(p, saved[n]) for n, p in body.items())
    same = load_model(ModelSource(str(tmp_path / "model")), "image_classification", 6)
    assert torch.equal(same.classifier.weight, pretrained.classifier.weight)  # a matching head still loads

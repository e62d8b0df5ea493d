"""Image classification data for the ViT recipes (docs/design.md §6): IDX, NPZ, image folders and hub datasets.

Every source becomes a `datasets.Dataset` with an `image` (PIL) and an integer `label` column plus class names;
`build_vision_splits` turns rows into normalised pixel tensors lazily, one item at a time (training rows augmented,
dev and eval rows not: `image_transforms`). Local files that are absent are replaced by the recipe's hub dataset.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..errors import GpartError, first_line
from .image_transforms import ImageTransform, transform_for  # noqa: F401  (ImageTransform: part of this API)
from .sources import load_rows, missing_files, require_columns
from .splits import Splits, carve_dev

FASHION_MNIST = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
_IDX_IMAGES, _IDX_LABELS = 2051, 2049


def _source(files, path, split, what: str) -> str:
    """How messages name a split: its files, or the hub id and split."""
    return f"{what} file(s) {', '.join(map(str, files))}" if files else f"{what} {path}:{split}"


def _label_array(rows) -> np.ndarray:
    """The `label` column as int64 numpy, without decoding any image."""
    return np.asarray(rows.with_format("numpy")["label"], dtype=np.int64)


def _check_range(labels: np.ndarray, num_labels: int, source: str) -> None:
    """Raise `GpartError` for the first label outside [0, num_labels)."""
    bad = labels[(labels < 0) | (labels >= num_labels)]
    if bad.size:
        raise GpartError(f"{source} has label {int(bad[0])} outside [0, {num_labels}) (num_labels = {num_labels}); "
                         f"fix the labels or use data files with the same classes as the training data")


def _read_idx(path: str) -> tuple[int, np.ndarray]:
    """(magic number, array) of one IDX file, gzip-compressed or plain."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        raw = f.read()
    # Header: two zero bytes, a dtype code (0x08 = ubyte, the one MNIST-style files use), ndim, big-endian dims.
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise GpartError(f"{path} is not an unsigned-byte IDX file (like train-images-idx3-ubyte.gz)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise GpartError(f"{path} is truncated: its header says shape {dims} but it holds {body.size} values")
    return int.from_bytes(raw[:4], "big"), body.reshape(dims)


def _idx_arrays(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of an IDX pair given in either order, told apart by their magic numbers."""
    parts = dict(_read_idx(f) for f in files)
    if len(files) != 2 or set(parts) != {_IDX_IMAGES, _IDX_LABELS}:
        raise GpartError(f"IDX data {files} should be one images file (magic {_IDX_IMAGES}) and one labels file "
                         f"(magic {_IDX_LABELS}), e.g. train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz")
    images, labels = parts[_IDX_IMAGES], parts[_IDX_LABELS].astype(np.int64)
    if images.ndim != 3 or len(images) != len(labels):
        raise GpartError(f"IDX data {files}: {len(images)} images of shape {images.shape[1:]} but {len(labels)} "
                         f"labels; expected as many (N, H, W) images as labels")
    return images, labels


def _npz_arrays(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images, labels) of an .npz with `images` and `target` (or `labels`)."""
    with np.load(path) as z:
        key = next((k for k in ("target", "labels", "label") if k in z.files), None)
        if "images" not in z.files or key is None:
            raise GpartError(f"{path} should hold arrays `images` and `target` (or `labels`); found {z.files}")
        images, labels = z["images"], z[key].astype(np.int64)
    if images.ndim not in (3, 4) or images.shape[3:] not in ((), (1,), (3,)) or len(images) != len(labels):
        raise GpartError(f"{path}: `images` has shape {images.shape} for {len(labels)} labels; expected "
                         f"(N, H, W) or (N, H, W, 1 or 3) with N = the number of labels")
    peak = float(images.max()) if images.size else 0.0
    # sklearn's digits hold grey levels 0..16 (and float images 0..1): stretch them to the 0..255 PIL expects.
    if 0 < peak <= 16:
        images = images.astype(np.float64) * (255.0 / peak)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def _encode(image: np.ndarray) -> dict:
    """One uint8 image as PGM/PPM bytes for `datasets.Image`: lossless and, unlike PNG, free to write."""
    image = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
    header = (b"P5" if image.ndim == 2 else b"P6") + f"\n{image.shape[1]} {image.shape[0]}\n255\n".encode()
    return {"bytes": header + np.ascontiguousarray(image).tobytes(), "path": None}


def _array_rows(images, labels, names, max_samples, seed):
    """A `datasets.Dataset` of (a seeded subset of) in-memory arrays; only the kept images are encoded."""
    import datasets

    order = np.arange(len(labels))
    if max_samples is not None and max_samples < len(order):
        # The permutation `Dataset.shuffle(seed=seed)` draws, so array files subset like hub data does.
        order = np.random.default_rng(seed).permutation(len(order))[:max_samples]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({"image": [_encode(images[i]) for i in order],
                                       "label": labels[order].tolist()}, features=features)


def _subset(rows, max_samples, seed):
    """A seeded subset of at most `max_samples` rows (all of them when there are no more)."""
    if max_samples is None or len(rows) <= max_samples:
        return rows
    return rows.shuffle(seed=seed).select(range(max_samples))


def _folder_rows(folder: str, max_samples, seed, what: str):
    """Rows of an image folder (one sub-folder per class) through the `imagefolder` builder."""
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset("imagefolder", data_dir=folder, split="train")
    except Exception as e:  # no images, unreadable files and bad layouts surface as several exception types
        raise GpartError(f"could not read {what} image folder {folder}: {first_line(e)}") from None
    require_columns(rows, ["image", "label"], f"{what} image folder {folder} (one sub-folder per class)")
    return _subset(rows, max_samples, seed)


def _hub_rows(path, config, split, data, max_samples, seed, what: str, absent=None):
    """Rows of a hub dataset (standing in for `absent` local files, if given), its image/label columns renamed to
    `image`/`label`, labels a ClassLabel."""
    import datasets

    rows = load_rows(absent, path, config, split, max_samples, seed, what, data.revision)
    require_columns(rows, [data.image_column, data.label_column], _source(None, path, split, what))
    rows = rows.select_columns([data.image_column, data.label_column])
    renames = {old: new for old, new in ((data.image_column, "image"), (data.label_column, "label")) if old != new}
    rows = rows.rename_columns(renames) if renames else rows
    if rows.features["label"].dtype == "string":  # class names as text: number them in sorted order
        rows = rows.class_encode_column("label")
    labels, feature = _label_array(rows), rows.features["label"]
    names = (list(feature.names) if isinstance(feature, datasets.ClassLabel)
             else [str(i) for i in range(int(labels.max(initial=0)) + 1)])
    if data.task == "fashion_mnist" and len(names) == len(FASHION_MNIST):
        names = list(FASHION_MNIST)  # the hub spells class 0 "T - shirt / top": keep one set of names per task
    _check_range(labels, len(names), _source(None, path, split, what))  # -1 marks unlabelled rows in some splits
    return rows.cast_column("label", datasets.ClassLabel(names=names))


def load_image_rows(files, path, config, split, data, max_samples=None, seed=0, what="data"):
    """(`datasets.Dataset` with `image` (PIL) and `label` (int) columns, class names) of one split.

    `files`: an IDX images/labels pair, one .npz, or one image folder; empty, or absent on this machine: hub dataset
    `path`/`config` (an absent file with no hub dataset to stand in is an error naming it).
    """
    files = [str(f) for f in files or []]
    source = _source(files, path, split, what)
    missing = missing_files(files, Path.exists)
    if missing or not files:
        rows = _hub_rows(path, config, split, data, max_samples, seed, what, absent=files if missing else None)
    elif len(files) == 1 and Path(files[0]).is_dir():
        rows = _folder_rows(files[0], max_samples, seed, what)
    else:
        one_npz = len(files) == 1 and files[0].lower().endswith(".npz")
        images, labels = _npz_arrays(files[0]) if one_npz else _idx_arrays(files)
        fashion = data.task == "fashion_mnist" or any("fashion" in f.lower() for f in files)
        names = list(FASHION_MNIST) if fashion else [str(i) for i in range(max(int(labels.max(initial=0)) + 1, 1))]
        _check_range(labels, len(names), source)  # before ClassLabel, whose own error names no file
        rows = _array_rows(images, labels, names, max_samples, seed)
    return rows, list(rows.features["label"].names)


def _relabel(rows, mapping: dict[int, int], names: list[str]):
    """Rows whose label is a key of `mapping`, relabelled to its value, with class names `names`."""
    import datasets

    values = _label_array(rows)
    index = np.flatnonzero(np.isin(values, list(mapping)))
    new = [mapping[int(v)] for v in values[index]]
    kept = rows.select(index).remove_columns("label").add_column("label", new)
    return kept.cast_column("label", datasets.ClassLabel(names=names))


def select_classes(rows, labels: list[str], keep: list[int]):
    """(rows, labels) with only the classes `keep`, renumbered 0..k-1 in the order given (held-out classes)."""
    if not keep or len(set(keep)) != len(keep) or any(not 0 <= k < len(labels) for k in keep):
        raise GpartError(f"classes to keep {keep} should be distinct ids in [0, {len(labels)})")
    names = [labels[k] for k in keep]
    kept = _relabel(rows, {old: new for new, old in enumerate(keep)}, names)
    if len(kept) == 0:
        raise GpartError(f"no rows have the classes {names}")
    return kept, names


def _kept(rows, names: list[str], keep: list, what: str):
    try:
        return select_classes(rows, names, [int(k) for k in keep])
    except (GpartError, TypeError, ValueError) as e:
        raise GpartError(f"data.classes: {e} ({what})") from None


def _align(rows, names: list[str], train_names: list[str], source: str):
    """Eval rows numbered like the training classes: renumbered by name when they hold a subset of them."""
    if names == train_names:
        return rows
    if set(names) <= set(train_names):  # e.g. an eval image folder lacking one class
        return _relabel(rows, {i: train_names.index(n) for i, n in enumerate(names)}, train_names)
    if not all(n.isdigit() for n in names):  # named classes that differ would be silently mislabelled
        raise GpartError(f"{source} has classes {names} that are not among the training classes {train_names}")
    _check_range(_label_array(rows), len(train_names), source)
    return rows


class VisionItems(torch.utils.data.Dataset):
    """Rows of a `datasets.Dataset`, each transformed to {"pixel_values", "labels"} only when indexed.

    A random (training) transform draws from a generator seeded by (seed, epoch, row): the same crops for the same
    epoch in any run, and a resumed run continues with exactly the draws it would have made.
    """

    def __init__(self, rows, transform: ImageTransform, seed: int = 0):
        self.rows, self.transform, self.seed, self.epoch = rows, transform, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        row = self.rows[int(index)]
        generator = None
        if self.transform.random:
            key = ((self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + int(index)) % (2**63 - 1)
            generator = torch.Generator().manual_seed(key)
        return {"pixel_values": self.transform(row["image"], generator), "labels": int(row["label"])}


def collate_images(items: list[dict]) -> dict:
    """Stack items into `pixel_values` [B, C, H, W] float and `labels` [B] long."""
    return {"pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "labels": torch.tensor([item["labels"] for item in items], dtype=torch.long)}


def build_vision_splits(data, model_config, seed: int, processor=None) -> Splits:
    """Train/dev/eval `Splits` of an image classification task; dev is carved from train with `seed`.

    With `data.classes`, only those classes are kept (renumbered) before the max_*_samples subsets are drawn.
    """
    # With classes to keep, the subsets are drawn after the filter, so load every row first.
    train_cap, eval_cap = (None, None) if data.classes else (data.max_train_samples, data.max_eval_samples)
    rows, names = load_image_rows(data.train_files, data.path, data.config, data.train_split, data,
                                  train_cap, seed, "train data")
    all_names = names
    if data.classes:  # e.g. the classes held out of a self-pretraining run
        rows, names = _kept(rows, names, data.classes, "train data")
        rows = _subset(rows, data.max_train_samples, seed)
    train, dev = carve_dev(rows, data.dev_fraction, seed)
    evaluation = None
    if data.eval_files or data.path:
        evaluation, eval_names = load_image_rows(data.eval_files, data.path, data.config, data.eval_split, data,
                                                 eval_cap, seed, "eval data")
        source = _source(data.eval_files, data.path, data.eval_split, "eval data")
        evaluation = _align(evaluation, eval_names, all_names, source)
        if data.classes:
            evaluation, _ = _kept(evaluation, all_names, data.classes, "eval data")
            evaluation = _subset(evaluation, data.max_eval_samples, seed)
    augment = transform_for(model_config, data.image_size, processor, data.train_transform)
    plain = transform_for(model_config, data.image_size, processor, data.eval_transform)
    train = VisionItems(train, augment, seed)
    dev, evaluation = (None if part is None else VisionItems(part, plain) for part in (dev, evaluation))
    return Splits(train=train, dev=dev, eval=evaluation, collate=collate_images, labels=names, num_labels=len(names))


def eval_items(data, model_config, labels: list[str] | None, processor=None, files=None, split: str | None = None,
               limit: int | None = None) -> VisionItems:
    """The scored split of a run's recipe (`gpart eval --adapter RUN`): its dataset, split, columns, class subset
    and eval transform, numbered like the run's classes `labels` (None: as the data numbers them). `files`/`split`
    override the recipe's."""
    split = split or data.eval_split
    files = files if files else data.eval_files
    rows, names = load_image_rows(files, data.path, data.config, split, data, None, 0, "eval data")
    if data.classes:
        rows, names = _kept(rows, names, data.classes, "eval data")
    if labels is not None:
        rows = _align(rows, names, list(labels), _source(files, data.path, split, "eval data"))
    if limit:
        rows = rows.select(range(min(limit, len(rows))))
    return VisionItems(rows, transform_for(model_config, data.image_size, processor, data.eval_transform))

"""Image preprocessing for the ViT recipes, as the GPart authors train and evaluate (SamsungLabs/GPart,
src/scripts/vision/finetune_ViT.py): training RandomResizedCrop(size) + RandomHorizontalFlip, evaluation
Resize(size) (short side) + CenterCrop(size), both with the image processor's size, mean and std.

torchvision cannot be installed beside every torch build gpart supports, so the same geometry is written here with
PIL (bilinear, antialiased like torchvision's PIL path): crop scale U(0.08, 1), log-aspect U(log 3/4, log 4/3), up
to 10 tries, then a centred crop with the aspect clamped; flip with probability 1/2. Random draws come from a
`torch.Generator` the caller seeds, so an epoch's augmentation is reproducible (and `--resume` exact).
`mode="resize"` keeps the plain square resize the tiny from-scratch recipes were tuned with.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import GpartError

MODES = ("resize", "center_crop", "random_resized_crop")
_SCALE = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=generator))


def _randint(generator: torch.Generator, high: int) -> int:
    """An integer in [0, high)."""
    return int(torch.randint(0, high, (1,), generator=generator))


def random_resized_box(width: int, height: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a random crop covering 8-100% of the area with aspect ratio in [3/4, 4/3]."""
    area = width * height
    log_low, log_high = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        target = area * _uniform(generator, *_SCALE)
        aspect = math.exp(_uniform(generator, log_low, log_high))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, height - h + 1)
            return _randint(generator, width - w + 1), top, w, h
    # Ten misses (very elongated images): the largest centred crop whose aspect is within range.
    ratio = width / height
    if ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif ratio > _RATIO[1]:
        w, h = round(height * _RATIO[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_short_side(image, size: int):
    """`image` scaled so its shorter side is `size` (aspect kept, the longer side rounded down)."""
    from PIL import Image

    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return image if new == image.size else image.resize(new, Image.BILINEAR)


def center_crop(image, size: int):
    """The centred size × size window of an image at least that large on both sides."""
    width, height = image.size
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class ImageTransform:
    """PIL image or uint8/float array -> normalised float tensor [C, H, W] (`mode`: see the module docstring)."""

    def __init__(self, image_size: int, num_channels: int, mean: list[float], std: list[float],
                 mode: str = "resize"):
        if num_channels not in (1, 3):
            raise GpartError(f"images need 1 or 3 channels for the model; its config says {num_channels}")
        if mode not in MODES:
            raise GpartError(f"image transform {mode!r} is not one of {', '.join(MODES)}")
        self.image_size, self.num_channels, self.mode = int(image_size), num_channels, mode
        self.mean = _per_channel(mean, num_channels, "mean")
        self.std = _per_channel(std, num_channels, "std")

    @property
    def random(self) -> bool:
        return self.mode == "random_resized_crop"

    def _geometry(self, image, generator: torch.Generator | None):
        from PIL import Image

        size = self.image_size
        if self.mode == "center_crop":
            return center_crop(resize_short_side(image, size), size)
        if self.mode == "random_resized_crop":
            generator = generator if generator is not None else torch.default_generator
            left, top, w, h = random_resized_box(*image.size, generator)
            image = image.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
            flip = float(torch.rand(1, generator=generator)) < 0.5
            return image.transpose(Image.FLIP_LEFT_RIGHT) if flip else image
        return image if image.size == (size, size) else image.resize((size, size), Image.BILINEAR)

    def __call__(self, image, generator: torch.Generator | None = None) -> torch.Tensor:
        from PIL import Image

        if not isinstance(image, Image.Image):
            image = Image.fromarray(_to_uint8(np.asarray(image)))
        # PIL's "L" is the ITU-R 601 luminance of RGB; "RGB" from grey repeats the one channel.
        image = self._geometry(image.convert("L" if self.num_channels == 1 else "RGB"), generator)
        pixels = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray((pixels - self.mean) / self.std))


def _per_channel(values, channels: int, what: str) -> np.ndarray:
    """`values` as a float32 [C, 1, 1] array; one value is shared, an RGB triple is averaged for grey models."""
    values = [float(v) for v in (values if isinstance(values, (list, tuple, np.ndarray)) else [values])]
    if len(values) == 1:
        values = values * channels
    elif channels == 1 and len(values) == 3:
        values = [sum(values) / 3]
    if len(values) != channels:
        raise GpartError(f"image {what} {values} should have 1 or {channels} values")
    return np.asarray(values, dtype=np.float32).reshape(channels, 1, 1)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """An image array as uint8 (H, W) or (H, W, C); floats in [0, 1] are scaled to 0..255."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8:
        scale = 255.0 if array.size and float(array.max()) <= 1.0 else 1.0
        array = np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return array


def _processor_size(processor) -> int | None:
    """The square side an image processor resizes to ({"height", "width"} or {"shortest_edge"})."""
    size = getattr(processor, "size", None)
    if isinstance(size, dict):
        return size.get("height") or size.get("shortest_edge")
    return size if isinstance(size, int) else None


def transform_for(model_config, image_size: int | None = None, processor=None, mode: str = "resize") -> ImageTransform:
    """The `ImageTransform` a ViT-style model expects: size from the recipe, else the processor, else the model
    config; channels from the config; mean/std from the processor (0.5 without one)."""
    size = image_size or _processor_size(processor) or getattr(model_config, "image_size", None)
    size = size[0] if isinstance(size, (list, tuple)) else size
    if not size:
        raise GpartError("the model config has no image_size; set data.image_size in the recipe")
    channels = int(getattr(model_config, "num_channels", 3) or 3)
    mean = getattr(processor, "image_mean", None) or [0.5] * channels
    std = getattr(processor, "image_std", None) or [0.5] * channels
    return ImageTransform(int(size), channels, mean, std, mode)

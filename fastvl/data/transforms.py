"""Image decoding (Pillow) and train/eval transforms written with torch ops (torchvision is not
installable next to this torch).

Every transform takes a uint8 ``[3, H, W]`` image and a ``random.Random`` and returns the model input
— float32 ``[3, S, S]`` normalised with the ImageNet mean/std, ``x = (pixel / 255 - mean) / std`` —
plus whether it mirrored the image. Randomness comes only from the passed generator, which the
loader seeds per (seed, epoch, sample), so augmentations replay exactly on resume.

Mirroring and captions: a horizontal flip turns "the circle left of the square" into a false
caption. The train transform flips with probability 0.5 and the loader then swaps the words
"left" and "right" in that sample's caption (and negatives) with ``swap_left_right``; we keep the
flip (useful augmentation for every other caption) and repair the text instead of skipping it.
"""
from __future__ import annotations

import io
import math
import random
import re

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_rgb(data: bytes, min_side: int = 0) -> torch.Tensor:
    """Decode an encoded image to uint8 ``[3, H, W]`` RGB.

    Grayscale, palette and CMYK images are converted; images with transparency are composited on
    white (dropping alpha would expose whatever colour hides under transparent pixels). With
    ``min_side``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
    >= ``min_side``, which is much cheaper than decoding large photos at full size.
    Raises ``OSError``/``ValueError`` (from Pillow) on undecodable bytes.
    """
    with Image.open(io.BytesIO(data)) as image:
        if min_side > 0:
            image.draft("RGB", (min_side, min_side))
        image.load()
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA", "PA"):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        elif image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


_NORM_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_NORM_SHIFT = (torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """float pixels in [0, 255] ``[..., 3, H, W]`` -> ``(pixels / 255 - mean) / std``."""
    return pixels * _NORM_SCALE - _NORM_SHIFT


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize``: back to [0, 255] floats (for looking at batches)."""
    return (images + _NORM_SHIFT) / _NORM_SCALE


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of ``[3, H, W]`` (any dtype) to float32 ``[3, height, width]``."""
    pixels = image.unsqueeze(0).to(torch.float32)
    if pixels.shape[-2:] != (height, width):
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    return pixels.squeeze(0)


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                            rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a crop covering a uniform fraction in ``scale`` of the image area with a
    log-uniform aspect ratio (w/h) in ``ratio``; 10 tries, then the largest centred crop whose
    ratio is clamped into ``ratio``."""
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = min(max(width / height, ratio[0]), ratio[1])
    if width / height > aspect:
        h, w = height, round(height * aspect)
    else:
        w, h = width, round(width / aspect)
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform:
    """Random-resized crop (area fraction ``scale``, aspect ``ratio``) to ``size`` x ``size``, then a
    horizontal flip with probability ``flip_prob``, then ImageNet normalisation."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5):
        self.size, self.scale, self.ratio, self.flip_prob = size, scale, ratio, flip_prob

    @property
    def decode_side(self) -> int:
        """Smallest source side that still gives a crop of >= ``size`` pixels (crop side >= ~0.6 of the image)."""
        return 2 * self.size

    def __call__(self, image: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, bool]:
        top, left, h, w = random_resized_crop_box(image.shape[1], image.shape[2], self.scale, self.ratio, rng)
        pixels = resize(image[:, top:top + h, left:left + w], self.size, self.size)
        flipped = rng.random() < self.flip_prob
        if flipped:
            pixels = pixels.flip(-1)
        return normalize(pixels), flipped


class EvalTransform:
    """Resize the shorter side to ``size`` (antialiased), centre-crop ``size`` x ``size``, normalise."""

    def __init__(self, size: int):
        self.size = size

    @property
    def decode_side(self) -> int:
        return self.size

    def __call__(self, image: torch.Tensor, rng: random.Random | None = None) -> tuple[torch.Tensor, bool]:
        height, width = image.shape[1:]
        factor = self.size / min(height, width)
        new_h, new_w = max(self.size, round(height * factor)), max(self.size, round(width * factor))
        pixels = resize(image, new_h, new_w)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return normalize(pixels[:, top:top + self.size, left:left + self.size]), False


_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)
_MIRROR = {"left": "right", "right": "left"}


def swap_left_right(text: str) -> str:
    """Exchange the words "left" and "right" (whole words, case kept: "Left" -> "Right"), which is
    what a caption must do when its image is mirrored."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        mirrored = _MIRROR[word.lower()]
        if word.isupper():
            return mirrored.upper()
        return mirrored.capitalize() if word[0].isupper() else mirrored

    return _LEFT_RIGHT.sub(swap, text)

"""Train/eval transforms written with torch ops (torchvision is not installable next to this torch).

Every transform takes a uint8 ``[3, H, W]`` image and a ``random.Random`` and returns the model input
— float32 ``[3, S, S]`` normalised with the ImageNet mean/std, ``x = (pixel / 255 - mean) / std`` —
plus whether it mirrored the image. Randomness comes only from the passed generator, which the
loader seeds per (seed, epoch, sample), so augmentations replay exactly on resume.

A transform is two steps so that two decoders can share it: ``plan(height, width, rng)`` draws the
crop box and the flip from the image's *header* size (a ``CropPlan``), ``apply(image, plan)`` crops,
resizes, flips and normalises a decoded image — which may have been decoded at a reduced JPEG scale;
the box is scaled to it. The DALI pipeline (``fastvl.data.dali``) executes the same plans, so both
decoders crop and flip every sample alike.

Mirroring and captions: a horizontal flip turns "the circle left of the square" into a false
caption. The train transform flips with probability 0.5 and the loader then swaps the words
"left" and "right" in that sample's caption (and negatives) with ``swap_left_right``; we keep the
flip (useful augmentation for every other caption) and repair the text instead of skipping it.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import EVAL_RESIZE_MODES
from .images import decode_rgb  # noqa: F401  (re-exported: the Pillow decoder the transforms pair with)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def resize_bicubic_like_pillow(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> float32 ``[3, height, width]`` holding what Pillow's
    ``Image.resize((width, height), BICUBIC)`` gives (ALBEF's eval resize). Pillow resamples one axis
    at a time with an antialiased Keys a = -0.5 filter (torch's antialiased bicubic is the same
    filter), rounding and clipping to uint8 after each pass, and runs first the pass whose output is
    smaller; we do the same."""
    pixels = image.unsqueeze(0).to(torch.float32)
    in_h, in_w = pixels.shape[-2:]
    sizes = [(in_h, width), (height, width)] if in_h * width <= height * in_w else [(height, in_w), (height, width)]
    for size in sizes:
        if pixels.shape[-2:] != size:
            pixels = F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)
            pixels = pixels.round().clamp(0.0, 255.0)
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


@dataclass(frozen=True)
class CropPlan:
    """A crop box ``(top, left, height, width)`` drawn on an image of ``source_size`` (height, width),
    to be resized to the model input, and whether the result is mirrored."""

    top: int
    left: int
    height: int
    width: int
    source_size: tuple[int, int]
    flipped: bool = False

    def box_for(self, height: int, width: int) -> tuple[int, int, int, int]:
        """The box on the same image decoded at ``height`` x ``width`` (e.g. at a JPEG DCT scale)."""
        source_h, source_w = self.source_size
        if (height, width) == (source_h, source_w):
            return self.top, self.left, self.height, self.width
        fy, fx = height / source_h, width / source_w
        top, left = min(round(self.top * fy), height - 1), min(round(self.left * fx), width - 1)
        h = max(1, min(round(self.height * fy), height - top))
        w = max(1, min(round(self.width * fx), width - left))
        return top, left, h, w


def crop_resize_normalize(image: torch.Tensor, plan: CropPlan, size: int) -> torch.Tensor:
    """``image`` uint8 ``[3, h, w]`` -> the plan's box, resized (antialiased bilinear) to ``size`` x
    ``size``, mirrored if planned, normalised."""
    top, left, h, w = plan.box_for(image.shape[1], image.shape[2])
    pixels = resize(image[:, top:top + h, left:left + w], size, size)
    if plan.flipped:
        pixels = pixels.flip(-1)
    return normalize(pixels)


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

    def plan(self, height: int, width: int, rng: random.Random) -> CropPlan:
        """Box first, then the flip: two draws from ``rng`` in a fixed order."""
        top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        return CropPlan(top, left, h, w, (height, width), rng.random() < self.flip_prob)

    def apply(self, image: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        return crop_resize_normalize(image, plan, self.size)

    def __call__(self, image: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, bool]:
        plan = self.plan(image.shape[1], image.shape[2], rng)
        return self.apply(image, plan), plan.flipped


class EvalTransform:
    """Deterministic eval input of ``size`` x ``size``, normalised, by ``resize`` (``eval.resize``):

    - "square": the whole image resized to ``size`` x ``size`` as Pillow's bicubic resize does
      (``resize_bicubic_like_pillow``), aspect ratio not kept, nothing cropped — ALBEF's test
      transform (``Resize((S, S), BICUBIC)``). The DALI decoder resizes the same box bilinearly.
    - "center_crop": the centred square of side ``min(H, W)``, resized (antialiased bilinear) — the
      same pixels as resizing the shorter side to ``size`` and centre-cropping, up to rounding, but
      resizing only the part that is kept.
    """

    def __init__(self, size: int, resize: str = "square"):
        if resize not in EVAL_RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(EVAL_RESIZE_MODES)}, got {resize!r}")
        self.size, self.resize = size, resize

    @property
    def decode_side(self) -> int:
        return self.size

    def plan(self, height: int, width: int, rng: random.Random | None = None) -> CropPlan:
        if self.resize == "square":
            return CropPlan(0, 0, height, width, (height, width), False)
        side = min(height, width)
        return CropPlan((height - side) // 2, (width - side) // 2, side, side, (height, width), False)

    def apply(self, image: torch.Tensor, plan: CropPlan) -> torch.Tensor:
        if self.resize == "square":  # the plan is the whole image, at whatever scale it was decoded
            return normalize(resize_bicubic_like_pillow(image, self.size, self.size))
        return crop_resize_normalize(image, plan, self.size)

    def __call__(self, image: torch.Tensor, rng: random.Random | None = None) -> tuple[torch.Tensor, bool]:
        return self.apply(image, self.plan(image.shape[1], image.shape[2])), False


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

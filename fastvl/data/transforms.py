"""Train/eval transforms written with torch ops (torchvision is not installable next to this torch).

Every transform takes a uint8 ``[3, H, W]`` image and a ``random.Random`` and returns the model input
— float32 ``[3, S, S]`` normalised with the ImageNet mean/std, ``x = (pixel / 255 - mean) / std`` —
plus whether it mirrored the image. Randomness comes only from the passed generator, which the
loader seeds per (seed, epoch, sample), so augmentations replay exactly on resume.

A transform is two steps so that two decoders can share it: ``plan(height, width, rng)`` draws the
crop box, the flip and the RandAugment ops (train, ``data.rand_augment``) from the image's *header*
size (a ``CropPlan``); ``apply(image, plan)`` crops, resizes, flips, augments and normalises a
decoded image — which may have been decoded at a reduced JPEG scale; the box is scaled to it. The
DALI pipeline (``fastvl.data.dali``) executes the same crops and flips and hands back
uint8 images, which ``finish_batch`` augments with the same ops and normalises, so both decoders
transform every sample alike.

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
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import EVAL_RESIZE_MODES, RAND_AUGMENT_MAX_MAGNITUDE, DataConfig
from .images import decode_rgb  # noqa: F401  (re-exported: the Pillow decoder the transforms pair with)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_NORM_SCALE = (1.0 / (255.0 * torch.tensor(IMAGENET_STD))).view(3, 1, 1)
_NORM_SHIFT = (torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """float pixels in [0, 255] ``[..., 3, H, W]`` (on any device) -> ``(pixels / 255 - mean) / std``."""
    return pixels * _NORM_SCALE.to(pixels.device) - _NORM_SHIFT.to(pixels.device)


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


AugmentOp = tuple[str, float]
"""A RandAugment op as drawn: its name and argument (``_op_value``)."""


@dataclass(frozen=True)
class CropPlan:
    """A crop box ``(top, left, height, width)`` drawn on an image of ``source_size`` (height, width),
    to be resized to the model input, whether the result is mirrored, and its RandAugment ops."""

    top: int
    left: int
    height: int
    width: int
    source_size: tuple[int, int]
    flipped: bool = False
    augment: tuple[AugmentOp, ...] = ()
    """RandAugment ops ``(name, value)`` applied, in order, to the resized and flipped uint8 image."""

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


# ---- RandAugment: ops on uint8 [3, H, W] images, torch only (so they also run on DALI's CUDA output)

RAND_AUGMENT_OPS = {
    "albef": ("identity", "autocontrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
              "translate_x", "translate_y", "rotate"),
    "no_color": ("identity", "sharpness", "shear_x", "shear_y", "translate_x", "translate_y", "rotate"),
}
"""``data.rand_augment``'s op sets (named in ``config.RAND_AUGMENT_OP_SETS``). "albef": the ops of
ALBEF's RandomAugment (no colour jitter, invert, solarize or posterize). "no_color": without the ops
that change colours a caption may name — autocontrast and equalize remap each channel on its own (a
hue shift), brightness turns "dark" into "light" — for EPIC, whose RandAugment leaves colours alone."""

FILL = 128.0
"""Grey of the pixels a geometric op uncovers (ALBEF's)."""
_SIGNED_SPAN = {"shear_x": 0.3, "shear_y": 0.3, "translate_x": 10 / 256, "translate_y": 10 / 256,
                "rotate": 30.0}
"""Geometric ops at magnitude 10 (ALBEF's scale), given a random sign: shear factor; shift as a
fraction of the side (ALBEF's 10 px on its 256 px input); degrees."""


def _op_value(name: str, magnitude: float, rng: random.Random) -> float:
    """The argument of op ``name`` at ``magnitude``: ALBEF's enhance factor ``0.1 + 1.8 M / 10`` for
    brightness/sharpness (1 = unchanged), a signed ``_SIGNED_SPAN`` fraction for geometric ops, 0 else."""
    level = magnitude / RAND_AUGMENT_MAX_MAGNITUDE
    if name in ("brightness", "sharpness"):
        return 0.1 + 1.8 * level
    if name in _SIGNED_SPAN:
        return _SIGNED_SPAN[name] * level * (-1.0 if rng.random() < 0.5 else 1.0)
    return 0.0


class RandAugment:
    """RandAugment as ALBEF runs it: ``num_ops`` ops drawn with replacement from
    ``RAND_AUGMENT_OPS[op_set]``, each applied with probability 0.5, all at ``magnitude`` (0..10)."""

    def __init__(self, op_set: str, num_ops: int = 2, magnitude: float = 7):
        if op_set not in RAND_AUGMENT_OPS:
            raise ValueError(f"op_set must be one of {', '.join(RAND_AUGMENT_OPS)}, got {op_set!r}")
        self.ops, self.num_ops, self.magnitude = RAND_AUGMENT_OPS[op_set], num_ops, magnitude

    def draw(self, rng: random.Random) -> tuple[AugmentOp, ...]:
        """One image's ops ``(name, value)`` from ``rng``, in the order they apply."""
        drawn = []
        for _ in range(self.num_ops):
            name = rng.choice(self.ops)
            if rng.random() < 0.5:
                drawn.append((name, _op_value(name, self.magnitude, rng)))
        return tuple(drawn)


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.round().clamp(0.0, 255.0).to(torch.uint8)


def _autocontrast(image: torch.Tensor, _: float) -> torch.Tensor:
    """Each channel stretched linearly to span 0..255 (a flat channel is kept)."""
    pixels = image.float()
    low, high = pixels.amin(dim=(1, 2), keepdim=True), pixels.amax(dim=(1, 2), keepdim=True)
    stretched = (pixels - low) * (255.0 / (high - low).clamp(min=1.0))
    return _to_uint8(torch.where(high > low, stretched, pixels))


def _equalize(image: torch.Tensor, _: float) -> torch.Tensor:
    """Each channel's histogram equalised, by Pillow's ``ImageOps.equalize`` lookup table."""
    channels = []
    for channel in image.long():
        hist = torch.bincount(channel.flatten(), minlength=256)
        used = hist[hist > 0]
        step = int(used.sum() - used[-1]) // 255
        if step:
            table = ((hist.cumsum(0) - hist + step // 2) // step).clamp(max=255)
        else:  # (almost) a single value: nothing to spread
            table = torch.arange(256, device=image.device)
        channels.append(table[channel])
    return torch.stack(channels).to(torch.uint8)


def _brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    return _to_uint8(image.float() * factor)


def _sharpness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Extrapolate from a smoothed copy (Pillow's ``ImageEnhance.Sharpness``: its 3x3 SMOOTH kernel,
    border pixels kept); factor 1 = unchanged, > 1 sharper."""
    pixels = image.float()
    kernel = torch.ones(3, 1, 3, 3, device=image.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = pixels.clone()
    smooth[:, 1:-1, 1:-1] = F.conv2d(pixels.unsqueeze(0), kernel / 13.0, groups=3).squeeze(0).round()
    return _to_uint8(smooth + factor * (pixels - smooth))


def _warp(image: torch.Tensor, matrix: tuple[tuple[float, ...], tuple[float, ...]]) -> torch.Tensor:
    """Output pixel (x, y) = the image sampled bilinearly at ``matrix @ (x, y, 1)``, both in pixels
    from the image centre; points outside the image are ``FILL``."""
    _, height, width = image.shape
    ys, xs = torch.meshgrid(torch.arange(height, device=image.device) - (height - 1) / 2,
                            torch.arange(width, device=image.device) - (width - 1) / 2, indexing="ij")
    (a, b, c), (d, e, f) = matrix
    grid = torch.stack([(a * xs + b * ys + c) * (2 / max(width - 1, 1)),
                        (d * xs + e * ys + f) * (2 / max(height - 1, 1))], dim=-1)
    out = F.grid_sample(image.float().unsqueeze(0) - FILL, grid.unsqueeze(0).float(), mode="bilinear",
                        padding_mode="zeros", align_corners=True)
    return _to_uint8(out.squeeze(0) + FILL)


def _rotate(image: torch.Tensor, degrees: float) -> torch.Tensor:
    """Counter-clockwise about the centre."""
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return _warp(image, ((cos, -sin, 0.0), (sin, cos, 0.0)))


_OPS = {
    "identity": lambda image, _: image,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "sharpness": _sharpness,
    # shears about the centre; a positive shift moves the content right / down
    "shear_x": lambda image, v: _warp(image, ((1.0, v, 0.0), (0.0, 1.0, 0.0))),
    "shear_y": lambda image, v: _warp(image, ((1.0, 0.0, 0.0), (v, 1.0, 0.0))),
    "translate_x": lambda image, v: _warp(image, ((1.0, 0.0, -v * image.shape[2]), (0.0, 1.0, 0.0))),
    "translate_y": lambda image, v: _warp(image, ((1.0, 0.0, 0.0), (0.0, 1.0, -v * image.shape[1]))),
    "rotate": _rotate,
}


def apply_ops(image: torch.Tensor, ops: tuple[AugmentOp, ...]) -> torch.Tensor:
    """uint8 ``[3, H, W]`` -> uint8 ``[3, H, W]`` with ``ops`` applied in order (rounded after each)."""
    for name, value in ops:
        image = _OPS[name](image, value)
    return image


def finish_batch(images: torch.Tensor, plans: list[CropPlan]) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` already cropped, resized and flipped by ``plans`` (the DALI pipeline's
    output, on any device) -> the model input: each plan's RandAugment ops, then normalisation."""
    pixels = images.float()
    for row, plan in enumerate(plans):
        if plan.augment:
            pixels[row] = apply_ops(images[row], plan.augment).float()
    return normalize(pixels)


def crop_resize_normalize(image: torch.Tensor, plan: CropPlan, size: int) -> torch.Tensor:
    """``image`` uint8 ``[3, h, w]`` -> the plan's box, resized (antialiased bilinear) to ``size`` x
    ``size``, mirrored if planned, rounded to uint8 and augmented if the plan has RandAugment ops,
    normalised."""
    top, left, h, w = plan.box_for(image.shape[1], image.shape[2])
    pixels = resize(image[:, top:top + h, left:left + w], size, size)
    if plan.flipped:
        pixels = pixels.flip(-1)
    if plan.augment:
        pixels = apply_ops(_to_uint8(pixels), plan.augment).float()
    return normalize(pixels)


class TrainTransform:
    """Random-resized crop (area fraction ``scale``, aspect ``ratio``) to ``size`` x ``size``, then a
    horizontal flip with probability ``flip_prob``, then ``rand_augment`` if given, then ImageNet
    normalisation."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5,
                 rand_augment: Optional[RandAugment] = None):
        self.size, self.scale, self.ratio, self.flip_prob = size, scale, ratio, flip_prob
        self.rand_augment = rand_augment

    @classmethod
    def from_config(cls, data: DataConfig) -> "TrainTransform":
        """The train transform of ``data``: its image size and RandAugment settings."""
        augment = None
        if data.rand_augment != "off":
            augment = RandAugment(data.rand_augment, data.rand_augment_ops, data.rand_augment_magnitude)
        return cls(data.image_size, rand_augment=augment)

    @property
    def decode_side(self) -> int:
        """Smallest source side that still gives a crop of >= ``size`` pixels (crop side >= ~0.6 of the image)."""
        return 2 * self.size

    def plan(self, height: int, width: int, rng: random.Random) -> CropPlan:
        """Box, flip, then the RandAugment ops: draws from ``rng`` in a fixed order (the box and flip
        are the same with RandAugment on or off)."""
        top, left, h, w = random_resized_crop_box(height, width, self.scale, self.ratio, rng)
        flipped = rng.random() < self.flip_prob
        augment = self.rand_augment.draw(rng) if self.rand_augment else ()
        return CropPlan(top, left, h, w, (height, width), flipped, augment)

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

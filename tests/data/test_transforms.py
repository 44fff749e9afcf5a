"""Pillow decoding to RGB and the torch-op transforms."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from fastvl.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, decode_rgb,
                                    denormalize, normalize, random_resized_crop_box, swap_left_right)

from .helpers import jpeg_bytes


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_converts_every_mode_to_rgb():
    grey = decode_rgb(png_bytes(Image.new("L", (5, 4), 77)))
    assert grey.shape == (3, 4, 5) and grey.dtype == torch.uint8 and (grey == 77).all()
    cmyk = decode_rgb(jpeg_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0))))  # pure red in CMYK
    assert cmyk.shape == (3, 8, 8)
    assert cmyk[0].float().mean() > 200 and cmyk[1:].float().mean() < 60
    palette = decode_rgb(png_bytes(Image.new("RGB", (6, 6), (10, 200, 30)).convert("P")))
    assert palette.shape == (3, 6, 6) and palette[1].float().mean() > 150


def test_decode_composites_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    pixels = decode_rgb(png_bytes(rgba))
    assert pixels[:, 0, 0].tolist() == [255, 0, 0]
    assert (pixels[:, 1:, 1:] == 255).all()


def test_decode_with_min_side_shrinks_large_jpegs_but_not_below_it():
    big = jpeg_bytes(Image.new("RGB", (640, 480), (50, 60, 70)))
    assert decode_rgb(big).shape == (3, 480, 640)
    small = decode_rgb(big, min_side=100)
    assert 100 <= min(small.shape[1:]) < 480


def test_undecodable_bytes_raise():
    with pytest.raises(Exception):
        decode_rgb(b"\xff\xd8\xff garbage")


def test_normalisation_is_imagenet_and_invertible():
    colour = (30, 128, 250)
    image = torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, 20, 30).contiguous()
    out, flipped = EvalTransform(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and not flipped
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out.mean((1, 2)), torch.tensor(expected), atol=1e-5)
    assert torch.allclose(denormalize(normalize(image.float())), image.float(), atol=1e-4)


def white_centre_black_sides():
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, :, 16:64] = 255  # white centre (48 of 80 columns), black sides
    return image


def test_eval_transform_centre_crop_resizes_the_short_side_and_crops():
    out, _ = EvalTransform(20, "center_crop")(white_centre_black_sides())
    pixels = denormalize(out)
    assert out.shape == (3, 20, 20)
    assert pixels.min() > 250  # the centre crop (columns 20..60 before resizing) sees only white


def test_eval_transform_square_keeps_the_whole_image_and_differs_from_the_centre_crop():
    out, flipped = EvalTransform(20)(white_centre_black_sides())  # "square" is the default
    pixels = denormalize(out)
    assert out.shape == (3, 20, 20) and not flipped
    # the whole width squeezed into 20 columns: 16/80 of it is black on each side -> 4 black columns
    assert pixels[:, :, :3].max() < 1 and pixels[:, :, -3:].max() < 1 and pixels[:, :, 6:14].min() > 254
    assert not torch.allclose(out, EvalTransform(20, "center_crop")(white_centre_black_sides())[0])


@pytest.mark.parametrize("height, width, size", [(37, 83, 24), (30, 50, 64), (100, 60, 64), (480, 640, 224)])
def test_eval_transform_square_is_pillows_bicubic_resize(height, width, size):
    """ALBEF's test transform is ``Resize((S, S), BICUBIC)`` on a PIL image: the reference here.
    Pillow computes in fixed point, so a rare pixel may be one level off."""
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    reference = np.asarray(Image.fromarray(pixels).resize((size, size), Image.BICUBIC)).astype(np.float32)
    out, _ = EvalTransform(size, "square")(torch.from_numpy(pixels).permute(2, 0, 1))
    ours = denormalize(out).permute(1, 2, 0).numpy()
    difference = np.abs(ours - reference)
    assert difference.max() <= 1.0 + 1e-3 and (difference > 0.5).mean() < 1e-3


def test_random_resized_crop_box_respects_scale_and_bounds():
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(60, 90, (0.5, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 90
        assert 0.45 <= h * w / (60 * 90) <= 1.0


def test_train_transform_is_deterministic_for_a_generator_state_and_flips():
    image = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8)
    transform = TrainTransform(32)
    a, flip_a = transform(image, random.Random(7))
    b, flip_b = transform(image, random.Random(7))
    assert torch.equal(a, b) and flip_a == flip_b
    always = TrainTransform(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    never = TrainTransform(48, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    mirrored, flipped = always(image, random.Random(0))
    plain, not_flipped = never(image, random.Random(0))
    assert flipped and not not_flipped
    assert torch.allclose(mirrored, plain.flip(-1))
    assert torch.allclose(denormalize(plain), image.float(), atol=1e-3)
    flips = [transform(image, random.Random(s))[1] for s in range(200)]
    assert 60 < sum(flips) < 140


def test_swap_left_right_swaps_whole_words_and_keeps_case():
    assert swap_left_right("a circle to the left of a square") == "a circle to the right of a square"
    assert swap_left_right("Right of the LEFT one, left.") == "Left of the RIGHT one, right."
    assert swap_left_right("leftover copyright") == "leftover copyright"
    text = "a star right of a circle left of a square"
    assert swap_left_right(swap_left_right(text)) == text


def test_decoded_pixels_match_numpy():
    image = Image.fromarray(np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10)
    assert decode_rgb(png_bytes(image)).permute(1, 2, 0).numpy().tolist() == np.asarray(image).tolist()

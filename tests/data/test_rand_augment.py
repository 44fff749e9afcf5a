"""RandAugment (``data.rand_augment``): what each op does, replay from the per-sample generator,
config checks, eval never augmenting, and the loader (Pillow and DALI) applying the drawn ops while
crops and flips stay those of the run without it."""
import itertools
import json
import random

import pytest
import torch

from fastvl.config import RAND_AUGMENT_OP_SETS, ConfigError
from fastvl.data.dali import dali_import_error
from fastvl.data.loader import build_loader
from fastvl.data.transforms import (_OPS, RAND_AUGMENT_OPS, EvalTransform, RandAugment, TrainTransform, apply_ops,
                                    finish_batch, normalize)

from .helpers import make_config

GEOMETRIC = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def noise(height=12, width=12, low=0, high=256, seed=0):
    return torch.randint(low, high, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def config(path, **data):
    return make_config(path, path, **({"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8} | data))


def take(loader, batches):
    return list(itertools.islice(iter(loader), batches))


# ---- ops ----------------------------------------------------------------------------------------


def test_op_sets_are_the_configs_and_no_color_drops_the_colour_ops():
    assert tuple(RAND_AUGMENT_OPS) == RAND_AUGMENT_OP_SETS
    assert set(RAND_AUGMENT_OPS["albef"]) <= set(_OPS)
    assert set(RAND_AUGMENT_OPS["albef"]) - set(RAND_AUGMENT_OPS["no_color"]) == {"autocontrast", "equalize", "brightness"}


def test_identity_and_factor_one_leave_the_image_unchanged():
    image = noise()
    assert torch.equal(apply_ops(image, (("identity", 0.0),)), image)
    assert torch.equal(apply_ops(image, (("sharpness", 1.0), ("brightness", 1.0))), image)


def test_geometric_ops_at_magnitude_zero_are_identity():
    image = noise(11, 14)
    augment = RandAugment("albef", num_ops=2, magnitude=0)
    for seed in range(50):
        for name, value in augment.draw(random.Random(seed)):
            if name in GEOMETRIC:
                assert value == 0.0
    for name in GEOMETRIC:
        assert torch.equal(apply_ops(image, ((name, 0.0),)), image), name


def test_rotate_turns_counter_clockwise_about_the_centre():
    for side in (9, 10):
        image = noise(side, side)
        assert torch.equal(apply_ops(image, (("rotate", 90.0),)), torch.rot90(image, 1, (1, 2)))
        assert torch.equal(apply_ops(image, (("rotate", -90.0),)), torch.rot90(image, -1, (1, 2)))


def test_translate_moves_the_content_and_fills_grey():
    image = noise(8, 10)
    right = apply_ops(image, (("translate_x", 3 / 10),))
    assert torch.equal(right[:, :, 3:], image[:, :, :-3]) and (right[:, :, :3] == 128).all()
    up = apply_ops(image, (("translate_y", -2 / 8),))
    assert torch.equal(up[:, :-2], image[:, 2:]) and (up[:, -2:] == 128).all()


def test_shear_keeps_the_centre_line_and_moves_the_rest():
    image = noise(9, 16)
    sheared = apply_ops(image, (("shear_x", 0.25),))
    assert torch.equal(sheared[:, 4], image[:, 4])  # the centre row
    assert torch.equal(sheared[:, 0, 1:], image[:, 0, :-1])  # 4 rows up: one pixel right,
    assert torch.equal(sheared[:, 8, :-1], image[:, 8, 1:])  # 4 rows down: one pixel left
    sheared = apply_ops(image.transpose(1, 2), (("shear_y", 0.25),))
    assert torch.equal(sheared[:, :, 4], image.transpose(1, 2)[:, :, 4])


def test_equalize_spreads_a_narrow_histogram_and_autocontrast_stretches_it():
    image = noise(32, 32, low=100, high=120)
    equalized = apply_ops(image, (("equalize", 0.0),)).float()
    assert equalized.min() < 20 and equalized.max() > 230
    for channel, source in zip(equalized, image):  # a non-decreasing remap of the levels
        order = source.flatten().argsort()
        assert (channel.flatten()[order].diff() >= 0).all()
    stretched = apply_ops(image, (("autocontrast", 0.0),))
    for channel, source in zip(stretched, image):
        assert channel.min() == 0 and channel.max() == 255
        assert torch.equal(channel.flatten().argsort(stable=True), source.flatten().argsort(stable=True))
    flat = torch.full((3, 5, 5), 77, dtype=torch.uint8)
    assert torch.equal(apply_ops(flat, (("equalize", 0.0), ("autocontrast", 0.0))), flat)


def test_brightness_scales_and_sharpness_extrapolates_from_a_blur():
    image = noise(16, 16, low=40, high=180)
    brighter = apply_ops(image, (("brightness", 1.36),)).float()
    assert torch.allclose(brighter, (image.float() * 1.36).round().clamp(max=255))
    sharper = apply_ops(image, (("sharpness", 1.9),))
    assert torch.equal(sharper[:, 0], image[:, 0]) and torch.equal(sharper[:, :, -1], image[:, :, -1])
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert sharper[inner].float().std() > image[inner].float().std()


def test_draw_follows_n_and_probability_one_half():
    augment = RandAugment("no_color", num_ops=2, magnitude=7)
    drawn = [augment.draw(random.Random(seed)) for seed in range(2000)]
    counts = [sum(len(ops) == n for ops in drawn) for n in (0, 1, 2)]
    assert all(abs(c / 2000 - p) < 0.04 for c, p in zip(counts, (0.25, 0.5, 0.25)))
    names = {name for ops in drawn for name, _ in ops}
    assert names == set(RAND_AUGMENT_OPS["no_color"])
    values = {name: {value for ops in drawn for n, value in ops if n == name} for name in names}
    assert values["rotate"] == {21.0, -21.0} and values["sharpness"] == {0.1 + 1.8 * 0.7}


# ---- plans --------------------------------------------------------------------------------------


def test_plans_replay_from_the_same_generator_and_keep_the_crops_and_flips():
    plain = TrainTransform(32)
    augmented = TrainTransform(32, rand_augment=RandAugment("albef", 2, 7))
    image = noise(48, 60)
    for seed in range(40):
        a, b = augmented.plan(48, 60, random.Random(seed)), augmented.plan(48, 60, random.Random(seed))
        assert a == b
        assert torch.equal(augmented.apply(image, a), augmented.apply(image, b))
        without = plain.plan(48, 60, random.Random(seed))
        assert (a.top, a.left, a.height, a.width, a.flipped) == (without.top, without.left, without.height,
                                                                   without.width, without.flipped)
        assert without.augment == ()
        if not a.augment:  # nothing drawn: the very same pixels as without RandAugment
            assert torch.equal(augmented.apply(image, a), plain.apply(image, without))


def test_finish_batch_applies_each_plans_ops_then_normalises():
    transform = TrainTransform(16, scale=(1.0, 1.0), ratio=(1.0, 1.0), rand_augment=RandAugment("albef", 2, 9))
    images = torch.stack([noise(16, 16, seed=s) for s in range(12)])
    plans = [transform.plan(16, 16, random.Random(seed)) for seed in range(12)]
    assert any(plan.augment for plan in plans) and not all(plan.augment for plan in plans)
    flipped = torch.stack([image.flip(-1) if plan.flipped else image for image, plan in zip(images, plans)])
    expected = torch.stack([transform.apply(image, plan) for image, plan in zip(images, plans)])
    before = flipped.clone()
    assert torch.allclose(finish_batch(flipped, plans), expected, atol=1e-6)
    assert torch.equal(flipped, before)  # the input batch is left alone


def test_eval_never_augments():
    assert EvalTransform(32).plan(48, 60, random.Random(0)).augment == ()
    assert EvalTransform(32, "center_crop").plan(48, 60, random.Random(0)).augment == ()


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("data.rand_augment=fancy", "data.rand_augment must be 'off' or an op set (albef, no_color), got 'fancy'"),
    ("data.rand_augment_ops=0", "data.rand_augment_ops must be >= 1"),
    ("data.rand_augment_magnitude=11", "data.rand_augment_magnitude must be in [0, 10], got 11"),
    ("data.rand_augment_magnitude=-1", "data.rand_augment_magnitude must be in [0, 10]"),
    ("data.rand_augment_ops=\"two\"", "data.rand_augment_ops must be an integer"),
])
def test_config_errors(override, message):
    from fastvl.config import load_config

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_config_off_by_default_and_builds_the_transform():
    from fastvl.config import load_config

    cfg = load_config(None)
    assert cfg.data.rand_augment == "off" and TrainTransform.from_config(cfg.data).rand_augment is None
    cfg = load_config(None, ["data.rand_augment=no_color", "data.rand_augment_ops=3", "data.rand_augment_magnitude=5"])
    augment = TrainTransform.from_config(cfg.data).rand_augment
    assert (augment.ops, augment.num_ops, augment.magnitude) == (RAND_AUGMENT_OPS["no_color"], 3, 5.0)


# ---- loader -------------------------------------------------------------------------------------


def test_train_loader_augments_with_the_same_crops_flips_and_captions(synth_dir):
    path = synth_dir / "train"
    plain = build_loader(config(path), "train")
    augmented = build_loader(config(path, rand_augment="albef", rand_augment_magnitude=9), "train")
    a, b = take(plain, 5), take(augmented, 5)
    changed = 0
    for x, y in zip(a, b):
        assert x.keys == y.keys and torch.equal(x.input_ids, y.input_ids)  # flips swap the same captions' words
        changed += int(not torch.equal(x.images, y.images))
    assert changed >= 4
    for epoch, index in [(0, i) for i in range(30)]:
        p, q = plain._reader.prepare(epoch, index).plan, augmented._reader.prepare(epoch, index).plan
        assert (p.top, p.left, p.height, p.width, p.flipped) == (q.top, q.left, q.height, q.width, q.flipped)


def test_train_loader_resume_replays_the_ops(synth_dir):
    cfg = config(synth_dir / "train", rand_augment="albef")
    straight = take(build_loader(cfg, "train"), 5)
    first = build_loader(cfg, "train")
    take(first, 2)
    resumed = build_loader(cfg, "train")
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(take(resumed, 3), straight[2:]):
        assert x.keys == y.keys and torch.equal(x.images, y.images)


def test_streamed_data_is_augmented_too(synth_dir):
    """A mixture is read by the streaming reader, which draws the same per-sample ops."""
    mixture = json.dumps([{"path": str(synth_dir / "train"), "weight": 1.0}])
    common = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8}
    plain = take(build_loader(make_config(mixture, synth_dir / "heldout", **common), "train"), 4)
    augmented = take(build_loader(make_config(mixture, synth_dir / "heldout", rand_augment="albef",
                                              rand_augment_magnitude=9, **common), "train"), 4)
    assert [b.keys for b in plain] == [b.keys for b in augmented]
    assert sum(not torch.equal(x.images, y.images) for x, y in zip(plain, augmented)) >= 3


def test_eval_loader_never_augments(synth_dir):
    path = synth_dir / "heldout"
    plain = take(build_loader(config(path), "eval"), 2)
    augmented = take(build_loader(config(path, rand_augment="albef", rand_augment_magnitude=10), "eval"), 2)
    for x, y in zip(plain, augmented):
        assert torch.equal(x.images, y.images)


@pytest.mark.skipif(dali_import_error() is not None, reason=f"DALI not importable: {dali_import_error()}")
def test_dali_applies_the_same_ops_as_pillow(synth_dir):
    path = synth_dir / "train"
    options = dict(rand_augment="albef", rand_augment_magnitude=9, num_workers=1)
    dali = take(build_loader(config(path, decoder="dali", **options), "train"), 6)
    pillow = take(build_loader(config(path, decoder="pillow", **options), "train"), 6)
    plain = take(build_loader(config(path, decoder="dali", num_workers=1), "train"), 6)
    step = (normalize(torch.ones(3, 1, 1)) - normalize(torch.zeros(3, 1, 1))).abs().max()  # one uint8 level
    for a, b, c in zip(dali, pillow, plain):
        assert a.keys == b.keys and torch.equal(a.input_ids, b.input_ids)
        difference = (a.images - b.images).abs()
        assert difference.mean() < 0.5 * step and difference.quantile(0.99) < 3 * step
    assert sum(not torch.equal(a.images, c.images) for a, c in zip(dali, plain)) >= 4


@pytest.mark.parametrize("name, op_set", [("albef", "albef"), ("maskvlm", "albef"), ("mamo", "albef"),
                                          ("epic", "albef"), ("cmask", "off")])
def test_base_configs_turn_it_on_for_the_papers_that_use_it(name, op_set):
    from pathlib import Path

    from fastvl.config import load_config

    data = load_config(str(Path(__file__).resolve().parents[2] / "configs" / f"base_{name}.json")).data
    assert data.rand_augment == op_set
    if op_set != "off":  # ALBEF's RandomAugment(2, 7)
        assert (data.rand_augment_ops, data.rand_augment_magnitude) == (2, 7)

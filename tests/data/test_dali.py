"""The DALI decoder: same batches as Pillow, pairing through shuffling, rank split, exact resume,
decoder parity, recovery from a batch DALI cannot decode, and the Pillow fallback without DALI."""
import io
import itertools
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastvl.data import dali as dali_module
from fastvl.data import loader as loader_module
from fastvl.data.dali import dali_import_error
from fastvl.data.images import ImageHeader, decode_rgb
from fastvl.data.loader import build_loader
from fastvl.data.shards import ShardSource, ShardWriter
from fastvl.data.tokenizer import load_tokenizer
from fastvl.data.transforms import denormalize

from .helpers import jpeg_bytes, make_config, png16_bytes

pytestmark = pytest.mark.skipif(dali_import_error() is not None, reason=f"DALI not importable: {dali_import_error()}")

LEFT, RIGHT = 2187, 2157  # bert-base-uncased ids of "left" / "right"


def take(loader, batches):
    return list(itertools.islice(iter(loader), batches))


def keys_of(batches):
    return [k for b in batches for k in b.keys]


def config(path, eval_path=None, **data):
    data = {"batch_size": 4, "num_workers": 1, "shuffle_buffer": 8, "decoder": "dali"} | data
    return make_config(path, eval_path, **data)


def photo_jpeg(width=96, height=72, seed=0, **options) -> bytes:
    """Gradients, a texture and noise: chroma detail that subsampling and upsampling act on."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin(x / 5.0) * np.cos(y / 3.0)], -1)
    pixels = (pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85, **options)
    return buffer.getvalue()


def test_dali_gives_the_pillow_batches(synth_dir):
    """Same keys, tokens, crops and flips in train; same eval crops and negatives; pixels within
    resampling differences (measured max 0.009 in normalised units, about 0.5 of a uint8 level)."""
    for split, batches in (("train", 6), ("eval", 3)):
        dali = take(build_loader(config(synth_dir / "train", synth_dir / "heldout"), split), batches)
        pillow = take(build_loader(config(synth_dir / "train", synth_dir / "heldout", decoder="pillow"), split), batches)
        assert keys_of(dali) == keys_of(pillow)
        for a, b in zip(dali, pillow):
            assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
            assert a.images.shape == b.images.shape and a.images.dtype == torch.float32
            assert (a.images - b.images).abs().max() < 0.03
            if split == "eval":
                assert all(torch.equal(a.negatives[k][0], b.negatives[k][0]) for k in b.negatives)


@pytest.fixture(scope="module")
def colour_coded(tmp_path_factory):
    """24 samples in 3 shards; sample k is a flat colour that encodes k, captioned "sample number k"."""
    out = tmp_path_factory.mktemp("coded")
    with ShardWriter(out, shard_size=8) as writer:
        for k in range(24):
            colour = (20 + 9 * k, 235 - 9 * k, 128)
            writer.write(f"s{k:02d}", {"jpg": jpeg_bytes(Image.new("RGB", (40 + k, 36), colour)),
                                       "txt": f"sample number {k}"})
    return out


def test_pairing_survives_shuffling(colour_coded):
    tokenizer = load_tokenizer()
    loader = build_loader(config(colour_coded, batch_size=5), "train")
    batches = take(loader, 10)  # two epochs, shuffled across shards, batches straddling the epoch
    assert loader.epoch == 2
    for batch in batches:
        for row, key in enumerate(batch.keys):
            from_key = int(key[1:])
            from_caption = int(tokenizer.decode(batch.input_ids[row][batch.attention_mask[row] == 1][1:-1]).split()[-1])
            from_pixels = round((denormalize(batch.images[row])[0].mean().item() - 20) / 9)
            assert from_key == from_caption == from_pixels
    keys = keys_of(batches)
    assert sorted(keys[:24]) == sorted(keys[24:48]) == sorted(ShardSource(colour_coded).keys)
    assert keys[:24] != sorted(keys[:24])  # actually shuffled


def test_two_ranks_read_disjoint_parts_that_cover_the_epoch(synth_dir):
    cfg = config(synth_dir / "train", batch_size=3)
    seen = [set(keys_of(take(build_loader(cfg, "train", rank=r, world_size=2), 5))) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 15 and not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(ShardSource(synth_dir / "train").keys)


def test_resume_mid_epoch_continues_with_the_right_sample(synth_dir):
    cfg = config(synth_dir / "train", batch_size=4)
    straight = take(build_loader(cfg, "train"), 10)  # 40 samples: crosses into epoch 1
    first = build_loader(cfg, "train")
    iterator = iter(first)
    for _ in range(4):
        next(iterator)
    state = first.state_dict()
    assert (state["epoch"], state["samples_in_epoch"]) == (0, 16)
    resumed = build_loader(cfg, "train")
    resumed.load_state_dict(state)
    rest = take(resumed, 6)
    assert keys_of(rest) == keys_of(straight[4:])
    for a, b in zip(rest, straight[4:]):
        assert torch.equal(a.images, b.images) and torch.equal(a.input_ids, b.input_ids)
    assert (resumed.epoch, resumed.samples_in_epoch) == (1, 10)


def test_thread_count_does_not_change_the_stream(synth_dir):
    one = take(build_loader(config(synth_dir / "train", num_workers=1), "train"), 5)
    two = take(build_loader(config(synth_dir / "train", num_workers=2), "train"), 5)
    assert keys_of(one) == keys_of(two)
    assert all(torch.equal(a.images, b.images) for a, b in zip(one, two))


def test_an_error_in_our_own_reading_code_is_raised_not_taken_for_a_decoding_failure(synth_dir, monkeypatch):
    real_prepare = loader_module._SampleReader.prepare

    def broken(self, epoch, index):
        if index == 7:
            raise KeyError("a bug, not bad data")
        return real_prepare(self, epoch, index)

    monkeypatch.setattr(loader_module._SampleReader, "prepare", broken)
    with pytest.raises(KeyError, match="a bug"):
        list(build_loader(config(synth_dir / "train"), "eval", max_samples=12))


def test_flipped_images_get_mirrored_captions(half_red_half_blue):
    loader = build_loader(config(half_red_half_blue, batch_size=8), "train", with_negatives=True)
    flips = []
    for batch in take(loader, 4):
        pixels = denormalize(batch.images)
        red_on_left = pixels[:, 0, :, :8].mean((1, 2)) > pixels[:, 0, :, -8:].mean((1, 2))
        says_left = (batch.input_ids == LEFT).any(1)
        assert torch.equal(says_left, ~(batch.input_ids == RIGHT).any(1))
        assert torch.equal(red_on_left, says_left)
        for ids, _ in batch.negatives.values():
            assert torch.equal((ids == LEFT).any(1), says_left)
        flips += (~red_on_left).tolist()
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("name, encoded", [
    ("jpeg 4:2:0", photo_jpeg(subsampling=2)),
    ("jpeg 4:4:4", photo_jpeg(subsampling=0)),
    ("jpeg progressive", photo_jpeg(progressive=True)),
    ("jpeg grayscale", jpeg_bytes(Image.open(io.BytesIO(photo_jpeg())).convert("L"))),
    ("jpeg cmyk", jpeg_bytes(Image.open(io.BytesIO(photo_jpeg())).convert("CMYK"))),
])
def test_dali_decodes_jpegs_like_pillow(name, encoded):
    """Mean absolute difference on the uint8 scale with the chosen setting (jpeg_fancy_upsampling=True)
    is at most 0.5; measured 0.0 for every case here — on CPU both run libjpeg-turbo with fancy chroma
    upsampling (the flag only changes nvJPEG, the GPU decoder, where it turns it on)."""
    reference = decode_rgb(encoded).permute(1, 2, 0).numpy().astype(np.int32)
    for fancy in (True, False):
        (decoded,) = dali_module.decode_images([encoded], jpeg_fancy_upsampling=fancy)
        assert decoded.shape == reference.shape
        difference = np.abs(decoded.astype(np.int32) - reference)
        if fancy:
            assert difference.mean() <= 0.5, (name, difference.mean())
        assert difference.mean() <= 3, (name, fancy, difference.mean())


def test_dali_decodes_16bit_png_like_pillow():
    ramp = np.arange(0, 65536, 16, dtype=np.uint16).reshape(64, 64)
    for pixels in (ramp, np.dstack([ramp, ramp[::-1], ramp.T])):
        encoded = png16_bytes(pixels)
        (decoded,) = dali_module.decode_images([encoded])
        difference = np.abs(decoded.astype(np.int32) - decode_rgb(encoded).permute(1, 2, 0).numpy())
        assert difference.max() <= 1  # Pillow drops the low byte of 16-bit colour; DALI rounds


def test_a_batch_dali_cannot_decode_is_decoded_with_pillow_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """Bytes that get past the header check but not DALI's decoder: the pipeline is rebuilt, the
    batches in flight are decoded with Pillow (skipping what fails there too), nothing is lost."""
    good = jpeg_bytes(Image.new("RGB", (32, 32), (10, 200, 10)))
    with ShardWriter(tmp_path, 100) as writer:
        for i in range(10):
            writer.write(f"ok{i}", {"jpg": good, "txt": f"green {i}"})
            if i == 4:
                writer.write("poison", {"jpg": b"\xff\xd8\xff" + b"\x00" * 40, "txt": "looks like a jpeg"})
    real_probe = loader_module.probe_image

    def lenient_probe(data):
        return ImageHeader("jpeg", 32, 32, 3, 8, False) if data.startswith(b"\xff\xd8\xff\x00") else real_probe(data)

    monkeypatch.setattr(loader_module, "probe_image", lenient_probe)
    cfg = config(tmp_path, batch_size=2, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="fastvl.data"):
        loader = build_loader(cfg, "eval")
        keys = keys_of(list(loader))
    assert keys == [f"ok{i}" for i in range(10)]
    assert loader.skipped == {"undecodable_image": 1}
    assert any("DALI failed on a batch" in r.message for r in caplog.records)
    train = build_loader(cfg, "train")
    batches = take(train, 8)  # past the poison (epoch of 11 samples) and on into epoch 1
    assert all(len(b) == 2 for b in batches) and train.epoch == 1
    assert set(keys_of(batches)) == {f"ok{i}" for i in range(10)}
    assert train.skipped["undecodable_image"] >= 1


def test_without_dali_the_loader_falls_back_to_pillow_with_one_warning(synth_dir, monkeypatch, caplog):
    for name in [m for m in sys.modules if m == "nvidia.dali" or m.startswith("nvidia.dali.")]:
        monkeypatch.setitem(sys.modules, name, None)  # "import nvidia.dali" now raises ImportError
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    dali_import_error.cache_clear()
    try:
        assert "nvidia.dali" in dali_import_error()  # ModuleNotFoundError: import of nvidia.dali... halted
        with caplog.at_level(logging.WARNING, logger="fastvl.data"):
            loader = build_loader(config(synth_dir / "train"), "train")
        warnings = [r for r in caplog.records if r.name == "fastvl.data"]
        assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
        assert "DALI is not importable" in warnings[0].getMessage() and "Pillow" in warnings[0].getMessage()
        assert loader.decoder == "pillow"
        fallback = take(loader, 3)
    finally:
        dali_import_error.cache_clear()
    pillow = take(build_loader(config(synth_dir / "train", decoder="pillow"), "train"), 3)
    assert keys_of(fallback) == keys_of(pillow)
    assert all(torch.equal(a.images, b.images) for a, b in zip(fallback, pillow))

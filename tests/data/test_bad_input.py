"""Bad input, with both decoders: every case is skipped and counted by reason, or decoded correctly;
the run goes on and no good sample is lost.

Each case writes one shard in tmp_path — three good samples around the bad one — and reads it with
an ordered eval pass (exact keys, exact skip counts, the bad sample's pixels or tokens when it must
be kept) and a train batch (full size, made of exactly the good samples)."""
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from PIL import Image

from fastvl.data import images
from fastvl.data.dali import dali_import_error
from fastvl.data.images import BadImage, decode_rgb, decode_scale, probe_image
from fastvl.data.loader import build_loader
from fastvl.data.shards import is_safe_member_name, scan_tar
from fastvl.data.tokenizer import encode, load_tokenizer

from .helpers import jpeg_bytes, make_config, mean_colour, png16_bytes, png_bytes, png_header_only, write_tar

DECODERS = ["pillow", pytest.param("dali", marks=pytest.mark.skipif(
    dali_import_error() is not None, reason=f"DALI not importable: {dali_import_error()}"))]
MAX_TEXT_LEN = 32
GOOD_COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]


def colour_jpeg(colour, size=(48, 40)) -> bytes:
    return jpeg_bytes(Image.new("RGB", size, colour))


def near(expected, tolerance):
    def check(image, ids):
        assert np.allclose(mean_colour(image), expected, atol=tolerance), (mean_colour(image), expected)
    return check


def tokens_of(text):
    def check(image, ids):
        expected, _ = encode(load_tokenizer(), [text], MAX_TEXT_LEN)
        assert ids[ids != 0].tolist() == expected[0].tolist()
    return check


def truncated_to_model_length(image, ids):
    assert (ids != 0).sum().item() == MAX_TEXT_LEN and ids[MAX_TEXT_LEN - 1].item() == 102  # ends with [SEP]


@dataclass
class Case:
    name: str
    members: list
    """(member name, bytes) of the bad sample(s), written between good samples."""
    skipped: dict = field(default_factory=dict)
    kept: bool = False
    """The sample must be used (key "bad")."""
    check: Optional[Callable] = None
    """check(image [3, S, S], input_ids [L]) of the kept sample."""
    repaired: dict = field(default_factory=dict)
    cut_inside: Optional[str] = None
    """Truncate the shard in the middle of this member (the bad sample is then written last)."""
    max_pixels: Optional[int] = None


GOOD_JPEG = colour_jpeg((90, 90, 90))
LONG_CAPTION = " ".join(itertools.islice(itertools.cycle("a large red circle to the left of a blue square".split()), 2000))
LONG_CAPTION = (LONG_CAPTION + " ")[:10_000]
CMYK_RED = jpeg_bytes(Image.new("CMYK", (48, 40), (0, 255, 255, 0)))
HALF_TRANSPARENT_BLUE = png_bytes(Image.new("RGBA", (48, 40), (0, 0, 255, 128)))

CASES = [
    Case("truncated_jpeg", [("bad.jpg", GOOD_JPEG[:len(GOOD_JPEG) // 2]), ("bad.txt", b"cut off")],
         skipped={"truncated_image": 1}),
    Case("zero_byte_image", [("bad.jpg", b""), ("bad.txt", b"nothing")], skipped={"empty_image": 1}),
    Case("not_an_image", [("bad.jpg", b"hello, I am text"), ("bad.txt", b"lies")],
         skipped={"unknown_image_format": 1}),
    Case("cmyk_jpeg", [("bad.jpg", CMYK_RED), ("bad.txt", b"red")], kept=True, check=near((255, 0, 0), 12)),
    Case("grayscale_jpeg", [("bad.jpg", jpeg_bytes(Image.new("L", (48, 40), 77))), ("bad.txt", b"gray")],
         kept=True, check=near((77, 77, 77), 2)),
    Case("png_with_alpha", [("bad.png", HALF_TRANSPARENT_BLUE), ("bad.txt", b"blue glass")], kept=True,
         check=near((127, 127, 255), 2)),  # composited on white: 255 * (1 - 128/255) = 127
    Case("png_16bit_gray", [("bad.png", png16_bytes(np.full((40, 48), 40000))), ("bad.txt", b"gray")],
         kept=True, check=near((156, 156, 156), 1)),  # 40000 * 255 / 65535 = 155.6
    Case("png_16bit_rgb", [("bad.png", png16_bytes(np.dstack([np.full((40, 48), v) for v in (40000, 1000, 65535)]))),
                           ("bad.txt", b"orange")], kept=True, check=near((156, 4, 255), 1.01)),
    Case("huge_png_header", [("bad.png", png_header_only(100_000, 100_000)), ("bad.txt", b"bomb")],
         skipped={"image_too_large": 1}),
    # over the (lowered) pixel limit, but a JPEG: decoded at 1/4 scale instead of skipped
    Case("huge_jpeg_scaled_down", [("bad.jpg", colour_jpeg((30, 60, 200), (256, 256))), ("bad.txt", b"big")],
         kept=True, check=near((30, 60, 200), 3), max_pixels=100 * 100),
    Case("huge_png_over_limit", [("bad.png", png_bytes(Image.new("RGB", (256, 256), (1, 2, 3)))),
                                 ("bad.txt", b"big")], skipped={"image_too_large": 1}, max_pixels=100 * 100),
    Case("no_caption", [("bad.jpg", GOOD_JPEG)], skipped={"missing_caption": 1}),
    Case("empty_caption", [("bad.jpg", GOOD_JPEG), ("bad.txt", b"")], skipped={"empty_caption": 1}),
    Case("whitespace_caption", [("bad.jpg", GOOD_JPEG), ("bad.txt", b" \n\t  ")], skipped={"empty_caption": 1}),
    Case("caption_of_10000_chars", [("bad.jpg", GOOD_JPEG), ("bad.txt", LONG_CAPTION.encode())], kept=True,
         check=truncated_to_model_length),
    # decoded with replacement; the tokenizer's normaliser drops U+FFFD: only the bad byte is lost
    Case("non_utf8_caption", [("bad.jpg", GOOD_JPEG), ("bad.txt", b"a red caf\xe9 square")], kept=True,
         check=tokens_of("a red caf square"), repaired={"non_utf8_caption": 1}),
    Case("truncated_tar", [("bad.jpg", GOOD_JPEG), ("bad.txt", b"x" * 3000)], cut_inside="bad.txt",
         skipped={"truncated_shard": 1, "truncated_sample": 1}),
    Case("member_escapes_directory", [("../bad.jpg", GOOD_JPEG), ("../bad.txt", b"up"),
                                      ("/abs/bad.jpg", GOOD_JPEG), ("/abs/bad.txt", b"root"),
                                      ("dir/../../bad.jpg", GOOD_JPEG), ("dir/../../bad.txt", b"sideways")],
         skipped={"unsafe_member_name": 3}),
]


def write_case(folder, case: Case):
    goods = [(f"good{i}.jpg", colour_jpeg(c)) for i, c in enumerate(GOOD_COLOURS)]
    goods = [m for i, (name, data) in enumerate(goods) for m in ((name, data), (f"good{i}.txt", f"good {i}".encode()))]
    members = goods + case.members if case.cut_inside else goods[:4] + case.members + goods[4:]
    path = folder / "shard-000000.tar"
    write_tar(path, members)
    if case.cut_inside:
        offsets = {name: (offset, size) for name, offset, size in scan_tar(str(path))[0]}
        offset, size = offsets[case.cut_inside]
        path.write_bytes(path.read_bytes()[:offset + size // 2])


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_counted_or_decoded_and_the_run_goes_on(tmp_path, monkeypatch, decoder, case):
    if case.max_pixels:
        monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", case.max_pixels)
    write_case(tmp_path, case)
    cfg = make_config(tmp_path, batch_size=8, num_workers=0, shuffle_buffer=0, decoder=decoder,
                      max_text_len=MAX_TEXT_LEN)
    loader = build_loader(cfg, "eval")
    assert loader.decoder == decoder
    batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    good = ["good0", "good1", "good2"]
    expected = (good[:2] + ["bad"] + good[2:] if not case.cut_inside else good + ["bad"]) if case.kept else good
    assert keys == expected
    assert loader.skipped == Counter(case.skipped)
    assert loader.repaired == Counter(case.repaired)
    for row, colour in enumerate(GOOD_COLOURS):  # the good samples around the bad one are intact
        image = batches[0].images[keys.index(f"good{row}")]
        assert np.allclose(mean_colour(image), colour, atol=3)
    if case.check:
        row = keys.index("bad")
        case.check(batches[0].images[row], batches[0].input_ids[row])
    (report,) = loader.pop_epoch_reports()
    assert all(f"{reason} {n}" in report for reason, n in case.skipped.items()), report
    assert metrics_total(loader.metrics()) == sum(case.skipped.values())
    # training goes on: a full batch of exactly the usable samples (topped up with copies)
    batch = next(iter(build_loader(cfg, "train")))
    assert len(batch) == 8 and set(batch.keys) == set(expected)
    assert torch.isfinite(batch.images).all()


def metrics_total(metrics):
    return sum(v for k, v in metrics.items() if k.startswith("data/skipped/"))


def test_header_check_reads_sizes_and_refuses_bombs_before_decoding(monkeypatch):
    header = probe_image(colour_jpeg((1, 2, 3), (320, 240)))
    assert (header.format, header.width, header.height, header.channels, header.bit_depth) == ("jpeg", 320, 240, 3, 8)
    assert probe_image(CMYK_RED).channels == 4
    png = probe_image(HALF_TRANSPARENT_BLUE)
    assert (png.format, png.width, png.height, png.has_alpha) == ("png", 48, 40, True)
    assert probe_image(png16_bytes(np.zeros((3, 5)))).bit_depth == 16
    with pytest.raises(BadImage) as error:
        probe_image(png_header_only(100_000, 100_000))
    assert error.value.reason == "image_too_large"
    # a huge JPEG is decoded at the DCT scale that fits the limit, never at full size
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100 * 100)
    big = colour_jpeg((30, 60, 200), (256, 256))
    assert decode_scale(probe_image(big)) == 4
    assert decode_rgb(big).shape == (3, 64, 64)
    png_too_big = png_bytes(Image.new("RGB", (256, 256)))
    with pytest.raises(BadImage, match="image_too_large"):
        decode_rgb(png_too_big)


def test_truncation_is_found_from_the_container_structure():
    photo = jpeg_bytes(Image.effect_noise((64, 48), 40).convert("RGB"))
    for cut in (len(photo) - 3, len(photo) // 2, 700):
        with pytest.raises(BadImage, match="truncated_image"):
            probe_image(photo[:cut])
    probe_image(photo + b"\0" * 10)  # padding after the end-of-image marker is fine
    png = png_bytes(Image.effect_noise((64, 48), 40))
    with pytest.raises(BadImage, match="truncated_image"):
        probe_image(png[:len(png) - 20])


def test_unsafe_member_names():
    for name in ("../x.jpg", "/etc/x.jpg", "a/../../x.jpg", "..\\x.jpg", "C:x.jpg", "\\\\server\\x.jpg", "", "a\0b"):
        assert not is_safe_member_name(name), name
    for name in ("x.jpg", "dir/x.jpg", "a..b/x.jpg", "dir/..x.jpg"):
        assert is_safe_member_name(name), name


@pytest.mark.parametrize("decoder", DECODERS)
def test_epoch_report_counts_each_epoch_and_survives_resume(tmp_path, decoder):
    case = next(c for c in CASES if c.name == "truncated_jpeg")
    write_case(tmp_path, case)
    (tmp_path / "shard-000001.tar").write_bytes((tmp_path / "shard-000000.tar").read_bytes())  # 8 samples, 2 bad
    cfg = make_config(tmp_path, batch_size=2, num_workers=0, shuffle_buffer=0, decoder=decoder)
    straight = build_loader(cfg, "train")
    batches = list(itertools.islice(iter(straight), 8))  # exactly two epochs of 8 positions
    reports = straight.pop_epoch_reports()
    assert len(reports) == 2 and straight.pop_epoch_reports() == []
    assert all("8 samples, skipped 2 (truncated_image 2)" in line for line in reports), reports
    assert reports[0].startswith("data train rank 0/1 epoch 0 done") and "epoch 1 done" in reports[1]
    assert straight.metrics()["data/skipped/truncated_image"] == 4
    assert all(len(b) == 2 for b in batches)
    first = build_loader(cfg, "train")
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    resumed = build_loader(cfg, "train")
    resumed.load_state_dict(first.state_dict())
    list(itertools.islice(iter(resumed), 5))
    assert resumed.pop_epoch_reports() == reports

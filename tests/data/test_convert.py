"""``fastvl data convert``: a folder of images + a captions CSV/JSONL -> checked webdataset shards."""
import csv
import json

import pytest
from PIL import Image

from fastvl.data.cli import main as data_main
from fastvl.data.loader import build_loader
from fastvl.data.shards import ShardSource

from .helpers import jpeg_bytes, make_config, png16_bytes, png_bytes


@pytest.fixture()
def photo_folder(tmp_path):
    """Good images in several formats and bad ones, plus a file outside the folder."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    good = {
        "a.jpg": jpeg_bytes(Image.new("RGB", (40, 30), (200, 20, 20))),
        "sub/b.png": png_bytes(Image.new("RGBA", (30, 30), (0, 0, 255, 128))),
        "c.gif": _gif(),
        "d.png": png16_bytes([[40000] * 8] * 6),
        "e.jpg": jpeg_bytes(Image.new("CMYK", (20, 20), (0, 255, 255, 0))),
    }
    bad = {
        "truncated.jpg": good["a.jpg"][:300],
        "empty.jpg": b"",
        "text.jpg": b"not an image",
    }
    for name, data in {**good, **bad}.items():
        (images / name).write_bytes(data)
    (tmp_path / "outside.jpg").write_bytes(good["a.jpg"])
    return images, good


def _gif():
    import io

    buffer = io.BytesIO()
    Image.new("P", (12, 10), 3).save(buffer, format="GIF")
    return buffer.getvalue()


RECORDS = [
    ("a.jpg", "a red photo"),
    ("sub/b.png", "blue glass"),
    ("c.gif", "a tiny gif"),
    ("d.png", "sixteen bits"),
    ("e.jpg", "printed red"),
    ("truncated.jpg", "cut short"),
    ("empty.jpg", "nothing"),
    ("text.jpg", "lies"),
    ("missing.jpg", "gone"),
    ("../outside.jpg", "escaping"),
    ("a.jpg", "   "),
]


def test_convert_csv_writes_checked_shards_and_reports_what_it_skipped(photo_folder, tmp_path, capsys):
    images, good = photo_folder
    captions = tmp_path / "captions.csv"
    with open(captions, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "caption", "photographer"])
        for name, caption in RECORDS:
            writer.writerow([name, caption, "ann"])
    with open(captions, "ab") as f:
        f.write(b"a.jpg,caf\xe9 photo,bob\n")  # not UTF-8: kept with the byte replaced
    out = tmp_path / "shards"
    code = data_main(["convert", "--images", str(images), "--captions", str(captions), "--out", str(out),
                      "--shard-size", "2", "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "wrote 6 samples in 3 shards" in printed
    assert ("skipped 6: empty_caption 1, empty_image 1, image_outside_folder 1, missing_image 1, "
            "truncated_image 1, unknown_image_format 1") in printed
    assert "repaired 1: non_utf8_caption 1" in printed and "re-encoded as PNG 1: gif 1" in printed
    source = ShardSource(out)
    assert source.keys == [f"{i:09d}" for i in range(6)]
    samples = [source.read(i, with_meta=True) for i in range(6)]
    assert [s.caption for s in samples] == ["a red photo", "blue glass", "a tiny gif", "sixteen bits", "printed red",
                                           "caf\ufffd photo"]
    assert [s.meta["source"] for s in samples] == ["a.jpg", "sub/b.png", "c.gif", "d.png", "e.jpg", "a.jpg"]
    assert samples[0].meta["photographer"] == "ann"
    assert samples[0].image == good["a.jpg"] and samples[1].image == good["sub/b.png"]  # stored as they are
    assert samples[2].image.startswith(b"\x89PNG")  # the GIF was re-encoded
    batch = next(iter(build_loader(make_config(out, batch_size=8, num_workers=0), "eval")))
    assert len(batch) == 6


def test_convert_jsonl_keeps_extra_fields_and_counts_bad_lines(photo_folder, tmp_path, capsys):
    images, _ = photo_folder
    captions = tmp_path / "captions.jsonl"
    negatives = {"relation_swap": "r", "attribute_swap": "a", "shuffle": "s"}
    lines = [json.dumps({"image": "a.jpg", "caption": "red", "negatives": negatives}), "{broken",
             json.dumps({"image": "e.jpg"}), json.dumps(["not", "an", "object"]), ""]
    captions.write_text("\n".join(lines) + "\n")
    code = data_main(["convert", "--images", str(images), "--captions", str(captions), "--out", str(tmp_path / "o"),
                      "--quiet"])
    assert code == 0
    assert "skipped 3: bad_record 2, missing_caption 1" in capsys.readouterr().out
    source = ShardSource(tmp_path / "o")
    assert len(source) == 1 and source.read(0, with_meta=True).meta["negatives"] == negatives


def test_convert_refuses_unusable_inputs(photo_folder, tmp_path, capsys):
    images, _ = photo_folder
    no_columns = tmp_path / "bad.csv"
    no_columns.write_text("picture,words\na.jpg,red\n")
    assert data_main(["convert", "--images", str(images), "--captions", str(no_columns), "--out",
                      str(tmp_path / "o"), "--quiet"]) == 2
    assert "needs a header row with an image column" in capsys.readouterr().err
    nothing_good = tmp_path / "none.csv"
    nothing_good.write_text("image,caption\nempty.jpg,x\n")
    assert data_main(["convert", "--images", str(images), "--captions", str(nothing_good), "--out",
                      str(tmp_path / "o"), "--quiet"]) == 1
    assert "no usable sample" in capsys.readouterr().err
    assert data_main(["convert", "--images", str(tmp_path / "nope"), "--captions", str(nothing_good), "--out",
                      str(tmp_path / "o"), "--quiet"]) == 2

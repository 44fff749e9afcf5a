"""JSONL {"image", "caption"} records: relative paths, bad records, and loading through the loader."""
import json

import pytest
from PIL import Image

from fastvl.config import ConfigError
from fastvl.data.dali import dali_import_error
from fastvl.data.jsonl import AnnotationSource
from fastvl.data.loader import build_loader
from fastvl.data.source import open_source

from .helpers import make_config, mean_colour


@pytest.fixture()
def jsonl_dataset(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    records = []
    for i in range(6):
        Image.new("RGB", (40 + i, 30), (i * 40, 100, 50)).save(images / f"im{i}.png")
        records.append(json.dumps({"image": f"images/im{i}.png", "caption": f"picture number {i}"}))
    records.insert(2, "{not json")
    records.insert(4, json.dumps({"image": "images/im0.png"}))
    records.insert(5, json.dumps({"image": "images/gone.png", "caption": "lost"}))
    records.append("")
    records.append(json.dumps({"image": "images/im1.png", "caption": "with id", "key": "custom",
                               "negatives": {"relation_swap": "r", "attribute_swap": "a", "shuffle": "s"}}))
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(records) + "\n")
    return path


def test_records_resolve_relative_paths_and_skip_bad_lines(jsonl_dataset):
    source = open_source(str(jsonl_dataset))
    assert isinstance(source, AnnotationSource)
    assert len(source) == 7
    assert source.skipped == {"bad_record": 1, "missing_caption": 1, "missing_image": 1}
    first = source.read(0)
    assert first.caption == "picture number 0" and first.key == "data:1"
    assert first.image == (jsonl_dataset.parent / "images" / "im0.png").read_bytes()
    last = source.read(6, with_meta=True)
    assert last.key == "custom"
    assert last.meta == {"negatives": {"relation_swap": "r", "attribute_swap": "a", "shuffle": "s"}}


def test_missing_and_empty_jsonl_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="absent.jsonl"):
        open_source(str(tmp_path / "absent.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"image": "nope.jpg", "caption": "x"}) + "\n")
    with pytest.raises(ConfigError, match="empty dataset: .*empty.jsonl .*1 missing_image"):
        open_source(str(empty))


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("dali", marks=pytest.mark.skipif(
    dali_import_error() is not None, reason=f"DALI not importable: {dali_import_error()}"))])
def test_loader_reads_jsonl_images_of_any_size(jsonl_dataset, decoder):
    cfg = make_config(str(jsonl_dataset), batch_size=4, num_workers=0, decoder=decoder)
    batch = next(iter(build_loader(cfg, "eval")))
    assert batch.images.shape == (4, 3, 64, 64)
    assert batch.keys == ["data:1", "data:2", "data:4", "data:7"]
    train = iter(build_loader(cfg, "train"))
    keys = [k for _ in range(7) for k in next(train).keys]
    # 7 samples, batches of 4: the first 7 positions are one full epoch
    assert sorted(keys[:7]) == sorted(open_source(str(jsonl_dataset)).keys)
    colours = {f"data:{line}": i for i, line in enumerate((1, 2, 4, 7))}  # image i is (40 i, 100, 50)
    for row, key in enumerate(batch.keys):
        assert abs(mean_colour(batch.images[row])[0] - 40 * colours[key]) < 2


def test_a_non_utf8_line_is_read_with_replacement_and_counted(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_bytes(b'{"image": "a.png", "caption": "caf\xe9 noir"}\n'
                                       b'{"image": "a.png", "caption": "plain"}\n')
    source = open_source(str(tmp_path / "d.jsonl"))
    assert [source.read(i).caption for i in range(2)] == ["caf\ufffd noir", "plain"]
    assert source.read(0).repaired == ("non_utf8_caption",) and source.read(1).repaired == ()
    loader = build_loader(make_config(str(tmp_path / "d.jsonl"), batch_size=2, num_workers=0), "eval")
    assert len(next(iter(loader))) == 2 and loader.repaired == {"non_utf8_caption": 1}

"""ALBEF-style annotation files (a JSON array of {"image", "caption": str | [str], "image_id"?}):
read for eval (one sample per record, all captions) and training (one per (image, caption) pair),
image paths against data.image_root, and ``fastvl data convert`` keeping every caption and image id."""
import json

import pytest
import torch
from PIL import Image

from fastvl.config import ConfigError
from fastvl.data.cli import main as data_main
from fastvl.data.jsonl import AnnotationSource
from fastvl.data.loader import EvalBatch, build_loader
from fastvl.data.shards import ShardSource
from fastvl.data.source import open_source, sample_captions, sample_image_id

from .helpers import make_config

KARPATHY = [  # coco_karpathy_test.json's layout: a list of captions, no image_id
    {"image": "val2014/a.png", "caption": ["a red square .", "red block", "something red"]},
    {"image": "val2014/b.png", "caption": "a single blue caption"},
]
PRETRAIN = [  # coco.json's layout (ALBEF pretraining): one caption per record, images repeated
    {"image": "val2014/c.png", "caption": "green one", "image_id": 7},
    {"image": "val2014/d.png", "caption": "", "image_id": 8},  # no usable caption: skipped
    {"image": "val2014/c.png", "caption": "green two", "image_id": 7},
    {"image": "val2014/missing.png", "caption": "gone"},
    "not a record",
]


@pytest.fixture()
def albef_json(tmp_path):
    """A dataset folder ``root/val2014/*.png`` and, elsewhere, an annotation file naming images
    relative to ``root`` (as ALBEF's files do)."""
    root = tmp_path / "coco"
    (root / "val2014").mkdir(parents=True)
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 255, 0)), ("d", (9, 9, 9))):
        Image.new("RGB", (48, 32), colour).save(root / "val2014" / f"{name}.png")
    annotation = tmp_path / "ann" / "test.json"
    annotation.parent.mkdir()
    annotation.write_text(json.dumps(KARPATHY + PRETRAIN))
    return annotation, root


def test_eval_reading_keeps_every_caption_and_image_id(albef_json):
    annotation, root = albef_json
    source = open_source(annotation, str(root))
    assert isinstance(source, AnnotationSource) and len(source) == 4
    assert source.skipped == {"bad_record": 1, "missing_caption": 1, "missing_image": 1}
    samples = [source.read(i) for i in range(4)]
    assert [sample_captions(s) for s in samples] == [
        ("a red square .", "red block", "something red"), ("a single blue caption",), ("green one",), ("green two",)]
    assert [sample_image_id(s) for s in samples] == [None, None, "7", "7"]
    assert [s.key for s in samples] == ["test:1", "test:2", "test:3", "test:5"]
    assert samples[0].image == (root / "val2014" / "a.png").read_bytes()


def test_training_reading_gives_one_sample_per_image_caption_pair(albef_json):
    annotation, root = albef_json
    source = open_source(annotation, str(root), per_caption=True)
    assert source.keys == ["test:1#0", "test:1#1", "test:1#2", "test:2", "test:3", "test:5"]
    assert [sample_captions(source.read(i)) for i in range(3)] == [("a red square .",), ("red block",),
                                                                  ("something red",)]


def test_image_paths_are_relative_to_the_annotation_file_without_an_image_root(albef_json, tmp_path):
    annotation, _ = albef_json
    with pytest.raises(ConfigError, match=r"empty dataset: .*5 missing_image"):
        open_source(annotation)  # ann/val2014/... does not exist: all 5 records with a caption miss their image
    with pytest.raises(ConfigError, match="data.image_root: folder not found"):
        open_source(annotation, str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="must hold an array"):
        (tmp_path / "object.json").write_text(json.dumps({"images": []}))
        open_source(tmp_path / "object.json")


def test_eval_loader_gives_all_captions_of_each_image(albef_json):
    annotation, root = albef_json
    cfg = make_config(str(annotation), image_root=str(root), batch_size=3, num_workers=0)
    batches = list(build_loader(cfg, "eval", all_captions=True))
    assert [len(b.keys) for b in batches] == [3, 1] and all(isinstance(b, EvalBatch) for b in batches)
    first = batches[0]
    assert first.images.shape == (3, 3, 64, 64) and first.input_ids.shape[0] == 5
    assert first.caption_rows.tolist() == [0, 0, 0, 1, 2] and first.image_ids == [None, None, "7"]
    # without all_captions (the other eval tools) each image keeps its first caption, aligned
    plain = next(iter(build_loader(cfg, "eval")))
    assert not isinstance(plain, EvalBatch) and plain.input_ids.shape[0] == 3
    assert torch.equal(plain.input_ids[1:, :first.input_ids.shape[1]], first.input_ids[3:5, :plain.input_ids.shape[1]])


def test_train_loader_epoch_covers_every_pair(albef_json):
    annotation, root = albef_json
    cfg = make_config(str(annotation), image_root=str(root), batch_size=3, num_workers=0)
    train = iter(build_loader(cfg, "train"))
    keys = [k for _ in range(2) for k in next(train).keys]
    assert sorted(keys) == ["test:1#0", "test:1#1", "test:1#2", "test:2", "test:3", "test:5"]


def test_convert_round_trip_keeps_captions_and_image_ids(albef_json, tmp_path, capsys):
    annotation, root = albef_json
    out = tmp_path / "shards"
    assert data_main(["convert", "--images", str(root), "--captions", str(annotation), "--out", str(out),
                      "--quiet"]) == 0
    printed = capsys.readouterr().out
    # the two records of image 7 are one sample; 7 usable captions in 3 samples
    assert "wrote 3 samples in 1 shards" in printed and "(6 captions)" in printed
    assert "skipped 3: bad_record 1, empty_caption 1, missing_image 1" in printed
    source = ShardSource(out)
    samples = [source.read(i, with_meta=True) for i in range(3)]
    assert [s.caption for s in samples] == ["a red square .", "a single blue caption", "green one"]
    assert [sample_captions(s) for s in samples] == [
        ("a red square .", "red block", "something red"), ("a single blue caption",), ("green one", "green two")]
    assert [sample_image_id(s) for s in samples] == [None, None, "7"]
    # evaluating the shards reads the same images and captions as evaluating the JSON file
    from_json = make_config(str(annotation), image_root=str(root), batch_size=8, num_workers=0)
    from_shards = make_config(str(out), batch_size=8, num_workers=0)
    a, b = (next(iter(build_loader(cfg, "eval", all_captions=True))) for cfg in (from_json, from_shards))
    assert b.caption_rows.tolist() == [0, 0, 0, 1, 2, 2]
    length = b.input_ids.shape[1]
    assert torch.equal(a.input_ids[:, :length], b.input_ids)  # the JSON's image 7 is two rows, merged in the shards
    assert torch.equal(a.images[:3], b.images)


def test_training_on_multi_caption_shards_draws_captions_reproducibly(albef_json, tmp_path):
    """Each visit of a multi-caption shard sample takes one of its captions, drawn from the sample's
    generator: the same stream twice, and over many visits every caption of image "a" shows up."""
    from fastvl.data.tokenizer import encode, load_tokenizer

    annotation, root = albef_json
    out = tmp_path / "shards"
    assert data_main(["convert", "--images", str(root), "--captions", str(annotation), "--out", str(out),
                      "--quiet"]) == 0
    cfg = make_config(str(out), batch_size=3, num_workers=0)

    def first_words(visits: int) -> list[tuple[str, int]]:
        stream = iter(build_loader(cfg, "train"))
        batches = [next(stream) for _ in range(visits)]
        return [(key, int(ids[1])) for b in batches for key, ids in zip(b.keys, b.input_ids)]

    drawn = first_words(20)
    assert drawn == first_words(20)
    ids, _ = encode(load_tokenizer(cfg.data.tokenizer), ["a red square .", "red block", "something red"], 8)
    assert {word for key, word in drawn if key == "000000000"} == set(ids[:, 1].tolist())

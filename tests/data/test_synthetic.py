"""The built-in rendered-scene generator: determinism, geometry, captions, negatives, held-out split."""
import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from fastvl.data import synthetic
from fastvl.data.cli import main as data_main
from fastvl.data.shards import ShardSource
from fastvl.data.synthetic import (HELDOUT_ATTRIBUTES, HELDOUT_RELATIONS, NEGATIVE_TYPES, canonical_relation,
                                   generate, relations_between, sample_scene)

SCENES = 300  # per split, metadata only (no rendering): fast


def all_metadata(folder):
    source = ShardSource(folder)
    return [source.read(i, with_meta=True) for i in range(len(source))]


def digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.tar"))}


def test_same_seed_writes_identical_shards_and_another_seed_does_not(tmp_path):
    generate(tmp_path / "a", train=12, heldout=4, seed=5, image_size=48, shard_size=5, progress=False)
    generate(tmp_path / "b", train=12, heldout=4, seed=5, image_size=48, shard_size=5, progress=False)
    generate(tmp_path / "c", train=12, heldout=4, seed=6, image_size=48, shard_size=5, progress=False)
    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert len(a) == 3 + 1  # train: 5 + 5 + 2; heldout: 4
    assert a == b
    assert all(a[name] != c[name] for name in a)


def test_shard_layout_and_counts(synth_dir):
    def listing(folder):  # without the hidden index cache other tests may have left beside the shards
        return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".fastvl-index-"))

    assert listing(synth_dir / "train") == [f"shard-00000{i}.tar" for i in range(3)]
    assert listing(synth_dir / "heldout") == ["shard-000000.tar", "shard-000001.tar"]
    assert len(ShardSource(synth_dir / "train")) == 30
    assert len(ShardSource(synth_dir / "heldout")) == 12


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_negatives_differ_from_caption_and_each_other(split):
    for index in range(SCENES):
        scene = sample_scene(0, split, index, image_size=96)
        texts = [scene["caption"]] + [scene["negatives"][t] for t in NEGATIVE_TYPES]
        assert len(set(texts)) == 4, texts
        # the shuffle is a permutation of the caption's words; the swaps keep the caption's words too
        for negative in texts[1:]:
            assert sorted(negative.split()) == sorted(scene["caption"].split())


def test_negative_construction_on_a_known_scene():
    scene = next(s for s in (sample_scene(1, "train", i) for i in range(200)) if len(s["objects"]) == 2)
    subject, relation, obj = (scene["caption_relations"][0][k] for k in ("subject", "relation", "object"))
    a, b = scene["objects"][subject], scene["objects"][obj]
    phrase = lambda o: f"{o['size']} {o['colour']} {o['shape']}"  # noqa: E731
    caption = scene["caption"]
    assert phrase(a) in caption and phrase(b) in caption
    assert caption.index(phrase(a)) < caption.index(phrase(b))
    swapped = scene["negatives"]["relation_swap"]
    assert swapped.index(phrase(b)) < swapped.index(phrase(a))
    colour_swap = f"{a['size']} {b['colour']} {a['shape']}"
    size_swap = f"{b['size']} {a['colour']} {a['shape']}"
    assert colour_swap in scene["negatives"]["attribute_swap"] or size_swap in scene["negatives"]["attribute_swap"]


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_objects_do_not_overlap_and_stay_inside(split):
    for index in range(SCENES):
        scene = sample_scene(0, split, index, image_size=64)
        boxes = [o["box"] for o in scene["objects"]]
        assert 2 <= len(boxes) <= 3
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                separated = (a[2] + synthetic.GAP <= b[0] or b[2] + synthetic.GAP <= a[0]
                             or a[3] + synthetic.GAP <= b[1] or b[3] + synthetic.GAP <= a[1])
                assert separated, (index, a, b)


def test_captioned_relations_follow_the_positions():
    for index in range(SCENES):
        scene = sample_scene(2, "train", index)
        objects = scene["objects"]
        for rel in scene["caption_relations"]:
            a, b = objects[rel["subject"]], objects[rel["object"]]
            ca = ((a["box"][0] + a["box"][2]) / 2, (a["box"][1] + a["box"][3]) / 2)
            cb = ((b["box"][0] + b["box"][2]) / 2, (b["box"][1] + b["box"][3]) / 2)
            expected = {"left_of": ca[0] < cb[0], "right_of": ca[0] > cb[0],
                        "above": ca[1] < cb[1], "below": ca[1] > cb[1]}
            assert expected[rel["relation"]], (index, rel, a, b)
            # stated relations are unambiguous: the other axis overlaps by at least half a box
            held, clear = relations_between(synthetic.SceneObject(**a), synthetic.SceneObject(**b))
            assert held == [rel["relation"]] and clear
        # every object is named in the caption
        assert len({rel[k] for rel in scene["caption_relations"] for k in ("subject", "object")}) == len(objects)


def test_relation_canonical_form():
    assert canonical_relation("circle", "right_of", "square") == ("square", "left_of", "circle")
    assert canonical_relation("circle", "below", "square") == ("square", "above", "circle")
    assert canonical_relation("circle", "above", "square") == ("circle", "above", "square")


def test_heldout_combinations_never_occur_in_train(synth_dir):
    """Read both splits' metadata from the shards: no held-out (colour, shape) pair and no held-out
    relation triple appears anywhere in training, and every held-out caption names one."""
    def combos(meta):
        objects = meta["objects"]
        attributes = {(o["colour"], o["shape"]) for o in objects}
        relations = {canonical_relation(objects[r["subject"]]["shape"], r["relation"], objects[r["object"]]["shape"])
                     for r in meta["relations"]}
        captioned = {canonical_relation(objects[r["subject"]]["shape"], r["relation"], objects[r["object"]]["shape"])
                     for r in meta["caption_relations"]}
        return attributes, relations, captioned

    train_attributes, train_relations = set(), set()
    for raw in all_metadata(synth_dir / "train"):
        attributes, relations, _ = combos(raw.meta)
        train_attributes |= attributes
        train_relations |= relations
    assert not train_attributes & HELDOUT_ATTRIBUTES
    assert not train_relations & HELDOUT_RELATIONS
    for raw in all_metadata(synth_dir / "heldout"):
        attributes, _, captioned = combos(raw.meta)
        assert attributes & HELDOUT_ATTRIBUTES or captioned & HELDOUT_RELATIONS, raw.meta["caption"]
    # the same over many more scenes (metadata only)
    for index in range(SCENES):
        attributes, relations, _ = combos(sample_scene(0, "train", index))
        assert not attributes & HELDOUT_ATTRIBUTES and not relations & HELDOUT_RELATIONS


def test_heldout_split_covers_both_kinds_and_train_still_sees_each_colour_and_shape():
    heldout = [sample_scene(0, "heldout", i) for i in range(SCENES)]
    assert any(s["novel"]["attributes"] for s in heldout)
    assert any(s["novel"]["relations_captioned"] for s in heldout)
    train = [sample_scene(0, "train", i) for i in range(SCENES)]
    assert {o["colour"] for s in train for o in s["objects"]} == set(synthetic.COLOURS)
    assert {o["shape"] for s in train for o in s["objects"]} == set(synthetic.SHAPES)


def test_images_keys_captions_and_metadata_stay_paired(synth_dir):
    """Shard round trip: each sample's key, caption and metadata agree, and its JPEG shows each object's
    colour at the object's box centre (inside every shape)."""
    for raw in all_metadata(synth_dir / "train") + all_metadata(synth_dir / "heldout"):
        assert raw.key == raw.meta["key"]
        assert raw.caption == raw.meta["caption"]
        pixels = np.asarray(Image.open(io.BytesIO(raw.image)).convert("RGB"), dtype=np.int32)
        assert pixels.shape == (64, 64, 3)
        for obj in raw.meta["objects"]:
            x0, y0, x1, y1 = obj["box"]
            centre = pixels[(y0 + y1) // 2, (x0 + x1) // 2]
            assert np.abs(centre - np.array(synthetic.COLOURS[obj["colour"]])).max() < 40, (raw.key, obj)


def test_cli_synth_writes_both_splits(tmp_path, capsys):
    code = data_main(["synth", "--out", str(tmp_path / "d"), "--train", "6", "--heldout", "3", "--image-size", "48",
                      "--shard-size", "4", "--seed", "1", "--quiet"])
    assert code == 0
    assert len(ShardSource(tmp_path / "d" / "train")) == 6
    assert len(ShardSource(tmp_path / "d" / "heldout")) == 3
    assert "train: 6 samples in 2 shards" in capsys.readouterr().out

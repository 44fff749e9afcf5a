"""build_loader: batches, rank split, exact resume, flips vs captions, negatives, bad input."""
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from fastvl.config import ConfigError
from fastvl.data.batch import Batch
from fastvl.data.loader import build_loader, epoch_order, shuffle_buffer_order
from fastvl.data.shards import ShardSource, ShardWriter
from fastvl.data.tokenizer import load_tokenizer
from fastvl.data.transforms import EvalTransform, decode_rgb, denormalize

from .helpers import jpeg_bytes, make_config

LEFT, RIGHT = 2187, 2157  # bert-base-uncased ids of "left" / "right"


def take(loader, batches):
    return list(itertools.islice(iter(loader), batches))


def keys_of(batches):
    return [k for b in batches for k in b.keys]


def train_config(synth_dir, **data):
    data = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 8} | data
    return make_config(synth_dir / "train", synth_dir / "heldout", **data)


def test_train_batches_have_the_documented_shapes_dtypes_and_range(synth_dir):
    cfg = train_config(synth_dir, max_text_len=12)
    loader = build_loader(cfg, "train")
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and len(batch) == 4
    assert batch.images.shape == (4, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.input_ids.dtype == torch.int64 and batch.attention_mask.dtype == torch.int64
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[1] <= 12
    assert (batch.input_ids[:, 0] == 101).all()
    assert (batch.attention_mask.sum(1) == (batch.input_ids != 0).sum(1)).all()
    pixels = denormalize(batch.images)
    assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
    assert batch.negatives is None  # train batches carry no negatives unless asked
    assert loader.state_dict()["samples_in_epoch"] == 4


def test_eval_images_are_the_normalised_centre_crops_of_the_decoded_jpegs(synth_dir):
    loader = build_loader(train_config(synth_dir), "eval")
    batch = next(iter(loader))
    source = ShardSource(synth_dir / "heldout")
    assert batch.keys == source.keys[:4]
    for row, key in enumerate(batch.keys):
        expected, _ = EvalTransform(64)(decode_rgb(source.read(source.keys.index(key)).image, 64))
        assert torch.allclose(batch.images[row], expected, atol=1e-5)


def test_eval_is_ordered_with_a_short_last_batch_and_negatives(synth_dir):
    loader = build_loader(train_config(synth_dir, batch_size=5), "eval")
    batches = list(loader)
    assert len(loader) == len(batches) == 3
    assert [len(b) for b in batches] == [5, 5, 2]
    source = ShardSource(synth_dir / "heldout")
    assert keys_of(batches) == source.keys
    assert keys_of(list(loader)) == source.keys  # every pass is the same pass
    tokenizer = load_tokenizer()
    for batch in batches:
        assert set(batch.negatives) == {"relation_swap", "attribute_swap", "shuffle"}
        for name, (ids, mask) in batch.negatives.items():
            assert ids.shape == mask.shape == batch.input_ids.shape
            assert (ids != batch.input_ids).any(1).all(), name
            for row, key in enumerate(batch.keys):
                meta = source.read(source.keys.index(key), with_meta=True).meta
                assert tokenizer.decode(ids[row][mask[row] == 1][1:-1]) == meta["negatives"][name]
    assert len(build_loader(train_config(synth_dir), "eval", max_samples=7).rank_order(0)) == 7


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_read_disjoint_parts_that_cover_an_epoch(synth_dir, world):
    cfg = train_config(synth_dir, batch_size=3)
    per_rank = 30 // world
    seen = []
    for rank in range(world):
        loader = build_loader(cfg, "train", rank=rank, world_size=world)
        assert loader.samples_per_epoch == per_rank
        keys = keys_of(take(loader, -(-per_rank // 3)))[:per_rank]
        assert len(set(keys)) == per_rank
        seen.append(set(keys))
    union = set().union(*seen)
    assert sum(len(s) for s in seen) == len(union) == per_rank * world  # disjoint
    if world == 2:
        assert union == set(ShardSource(synth_dir / "train").keys)  # and complete
    eval_keys = [keys_of(list(build_loader(cfg, "eval", rank=r, world_size=2))) for r in range(2)]
    assert sorted(eval_keys[0] + eval_keys[1]) == sorted(ShardSource(synth_dir / "heldout").keys)
    assert not set(eval_keys[0]) & set(eval_keys[1])


def test_each_epoch_is_a_permutation_that_changes_with_epoch_and_seed(synth_dir):
    cfg = train_config(synth_dir, batch_size=5)
    loader = build_loader(cfg, "train")
    keys = keys_of(take(loader, 12))  # two epochs of 30
    assert sorted(keys[:30]) == sorted(keys[30:]) == sorted(set(keys))
    assert keys[:30] != keys[30:]
    assert loader.epoch == 2 and loader.samples_in_epoch == 0 and loader.samples_seen == 60
    again = keys_of(take(build_loader(cfg, "train"), 12))
    assert again == keys
    other_seed = make_config(synth_dir / "train", batch_size=5, num_workers=0, shuffle_buffer=8)
    other_seed.train.seed = 1
    assert keys_of(take(build_loader(other_seed, "train"), 6)) != keys[:30]
    assert keys_of(take(build_loader(cfg, "train", epoch=1), 6)) == keys[30:]


def test_shuffle_buffer_order_is_a_permutation_and_shards_stay_together_without_it():
    rng = np.random.default_rng(0)
    stream = np.arange(100)
    out = shuffle_buffer_order(stream, 10, rng)
    assert sorted(out.tolist()) == stream.tolist() and out.tolist() != stream.tolist()
    groups = [(0, 4), (4, 8), (8, 12)]
    order = epoch_order(12, groups, seed=0, epoch=0, buffer_size=0).tolist()
    assert sorted(order) == list(range(12))
    shards_in_order = sorted(groups, key=lambda g: order.index(g[0]))
    assert [order[i:i + 4] for i in (0, 4, 8)] == [list(range(*g)) for g in shards_in_order]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_next_unseen_sample(synth_dir, workers):
    cfg = train_config(synth_dir, batch_size=4, num_workers=workers)
    straight = take(build_loader(cfg, "train"), 12)  # 48 samples: crosses into epoch 1
    first = build_loader(cfg, "train")
    iterator = iter(first)
    for _ in range(5):
        next(iterator)
    state = first.state_dict()
    assert (state["epoch"], state["samples_in_epoch"]) == (0, 20)
    resumed = build_loader(cfg, "train")
    resumed.load_state_dict(state)
    rest = take(resumed, 7)
    assert keys_of(rest) == keys_of(straight[5:])
    for a, b in zip(rest, straight[5:]):
        assert torch.equal(a.images, b.images)  # same crops and flips, too
        assert torch.equal(a.input_ids, b.input_ids)
    assert resumed.epoch == 1 and resumed.samples_in_epoch == 48 - 30


def test_worker_count_does_not_change_the_stream(synth_dir):
    single = take(build_loader(train_config(synth_dir, num_workers=0), "train"), 9)
    multi = take(build_loader(train_config(synth_dir, num_workers=2), "train"), 9)
    assert keys_of(single) == keys_of(multi)
    assert all(torch.equal(a.images, b.images) for a, b in zip(single, multi))


def test_resume_with_another_world_size_keeps_the_global_position(synth_dir):
    cfg = train_config(synth_dir, batch_size=2)
    two = [build_loader(cfg, "train", rank=r, world_size=2) for r in range(2)]
    consumed = [keys_of(take(loader, 3)) for loader in two]  # 12 of the epoch's 30 samples
    one = build_loader(cfg, "train")
    one.load_state_dict(two[0].state_dict())
    assert one.samples_in_epoch == 12
    remaining = keys_of(take(one, 9))  # the other 18
    assert set(remaining).isdisjoint(consumed[0] + consumed[1])
    assert len(set(remaining + consumed[0] + consumed[1])) == 30


def test_flipped_images_get_mirrored_captions(half_red_half_blue):
    cfg = make_config(half_red_half_blue, batch_size=8, num_workers=0)
    loader = build_loader(cfg, "train", with_negatives=True)
    flips = []
    for batch in take(loader, 4):
        pixels = denormalize(batch.images)
        red_on_left = pixels[:, 0, :, :8].mean((1, 2)) > pixels[:, 0, :, -8:].mean((1, 2))
        says_left = (batch.input_ids == LEFT).any(1)
        says_right = (batch.input_ids == RIGHT).any(1)
        assert torch.equal(says_left, ~says_right)
        assert torch.equal(red_on_left, says_left)  # caption agrees with the image, flipped or not
        for ids, _ in batch.negatives.values():  # negatives were mirrored with their caption
            assert torch.equal((ids == LEFT).any(1), says_left)
        flips += (~red_on_left).tolist()
    assert 0 < sum(flips) < len(flips)  # both cases occurred


def test_missing_or_empty_data_fails_at_construction_naming_the_path(tmp_path, synth_dir):
    with pytest.raises(ConfigError, match=r"data\.train: data path not found: .*nothing_here"):
        build_loader(make_config(str(tmp_path / "nothing_here")), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"data\.eval: .*empty"):
        build_loader(make_config(synth_dir / "train", str(tmp_path / "empty")), "eval")
    with ShardWriter(tmp_path / "captionless", 4) as writer:
        writer.write("a", {"jpg": jpeg_bytes(Image.new("RGB", (4, 4)))})
    with pytest.raises(ConfigError, match="empty dataset.*captionless.*1 missing_caption"):
        build_loader(make_config(tmp_path / "captionless"), "train")
    with pytest.raises(ConfigError, match="cannot feed 64 ranks"):
        build_loader(train_config(synth_dir), "train", rank=0, world_size=64)


def test_malformed_samples_are_skipped_counted_and_train_batches_keep_their_size(tmp_path):
    good = jpeg_bytes(Image.new("RGB", (32, 32), (200, 10, 10)))
    with ShardWriter(tmp_path, 100) as writer:
        for i in range(6):
            writer.write(f"ok{i}", {"jpg": good, "txt": f"red picture {i}"})
        writer.write("corrupt", {"jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "txt": "broken"})
        writer.write("blank", {"jpg": good, "txt": "   \n"})
        writer.write("nocaption", {"jpg": good})
    cfg = make_config(tmp_path, batch_size=8, num_workers=0, shuffle_buffer=0)
    eval_batches = list(build_loader(cfg, "eval"))
    assert sorted(keys_of(eval_batches)) == [f"ok{i}" for i in range(6)]
    loader = build_loader(cfg, "eval")
    list(loader)
    # the header check classifies the garbage before any decoder sees it: its first segment runs past the end
    assert loader.skipped == {"truncated_image": 1, "empty_caption": 1, "missing_caption": 1}
    train = build_loader(cfg, "train")
    batch = next(iter(train))
    assert len(batch) == 8 and set(batch.keys) == {f"ok{i}" for i in range(6)}
    assert train.skipped["truncated_image"] == 1 and train.skipped["empty_caption"] == 1

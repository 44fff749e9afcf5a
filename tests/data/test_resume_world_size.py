"""Resuming the train loader's position on another number of ranks: the global sample position is
kept, exactly when the new world size divides it, and what changes otherwise is warned about."""
import warnings

import pytest
import torch

from fastvl.data.loader import build_loader

from .test_loader import keys_of, take, train_config


def interleaved(per_rank_batches):
    """The global batches of ranks that read positions r, r + W, ...: rank 0's first sample, rank 1's, ..."""
    return [[key for row in zip(*(batch.keys for batch in step)) for key in row] for step in zip(*per_rank_batches)]


def loaders(synth_dir, world, batch_size):
    cfg = train_config(synth_dir, batch_size=batch_size)
    return [build_loader(cfg, "train", rank=r, world_size=world) for r in range(world)]


@pytest.mark.parametrize("before, after", [((2, 4), (1, 8)), ((1, 8), (2, 4))])
def test_same_global_batch_on_another_world_size_continues_exactly(synth_dir, before, after):
    """30 samples, global batch 8: 3 steps, then 3 more on the other world size cross into epoch 1
    and match a straight single-process run sample for sample (keys, crops, flips)."""
    (straight,) = loaders(synth_dir, 1, 8)
    expected = take(straight, 6)
    first = loaders(synth_dir, *before)
    consumed = interleaved([take(loader, 3) for loader in first])
    assert consumed == [batch.keys for batch in expected[:3]]
    resumed = loaders(synth_dir, *after)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exact: nothing to warn about
        for rank, loader in enumerate(resumed):
            loader.load_state_dict(first[min(rank, len(first) - 1)].state_dict())
    rest = [take(loader, 3) for loader in resumed]
    assert interleaved(rest) == [batch.keys for batch in expected[3:]]
    if len(rest) == 1:
        for got, want in zip(rest[0], expected[3:]):
            assert torch.equal(got.images, want.images)
    assert all(loader.epoch == 1 and loader.samples_in_epoch * len(resumed) == 48 - 30 for loader in resumed)


def test_a_position_the_new_world_cannot_split_rereads_the_last_samples_with_a_warning(synth_dir):
    (straight,) = loaders(synth_dir, 1, 1)
    order = keys_of(take(straight, 14))
    (one,) = loaders(synth_dir, 1, 3)
    take(one, 3)  # 9 samples consumed
    two = loaders(synth_dir, 2, 1)
    with pytest.warns(UserWarning, match="global sample 9 of epoch 0.*the last 1 of them are read again"):
        two[0].load_state_dict(one.state_dict())
    two[1].load_state_dict(one.state_dict())
    assert interleaved([take(loader, 3) for loader in two]) == [order[8:10], order[10:12], order[12:14]]
    assert two[0].skipped == two[0].indexing_skipped  # another rank's counts are not carried over


def test_an_epoch_end_that_moves_with_the_world_size_is_warned_about(synth_dir):
    (one,) = loaders(synth_dir, 1, 4)
    take(one, 2)
    four = loaders(synth_dir, 4, 2)
    with pytest.warns(UserWarning, match="each epoch now ends after 28 instead of 30 of its 30 samples"):
        four[0].load_state_dict(one.state_dict())
    assert four[0].samples_in_epoch == 2

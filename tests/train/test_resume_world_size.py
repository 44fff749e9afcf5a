"""A checkpoint written by 2 processes resumes on 1 with the same global batch and continues with
exactly the samples a straight run would have read (ZeRO 1-3 checkpoints: test_resume_universal.py)."""
import json
import os

import pytest

from fastvl.config import load_config
from fastvl.data.batch import Batch
from fastvl.data.loader import build_loader
from fastvl.train.checkpoint import checkpoint_world_size
from fastvl.train.loop import train

from ..two_ranks import spawn_two_ranks
from .conftest import IMAGE_SIZE, VOCAB, StandInRecipe, stand_in_config


class KeyRecordingLoader:
    """``fastvl.data``'s train loader over real shards, shaped for the stand-in recipe, writing the keys
    of every batch it hands out to ``output_dir/keys_rank<r>.jsonl``."""

    def __init__(self, cfg, split, rank, world_size, epoch):
        self.inner = build_loader(cfg, split, rank, world_size, epoch)
        self.log = os.path.join(cfg.train.output_dir, f"keys_rank{rank}.jsonl")
        os.makedirs(cfg.train.output_dir, exist_ok=True)

    @property
    def epoch(self):
        return self.inner.epoch

    def __iter__(self):
        for batch in self.inner:
            with open(self.log, "a") as out:
                out.write(json.dumps(batch.keys) + "\n")
            yield Batch(batch.images, batch.input_ids % VOCAB, batch.attention_mask, batch.keys)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def run_config(data, out_dir, *overrides):
    return stand_in_config(out_dir, f"data.train={data / 'train'}", f"train.output_dir={out_dir}",
                           f"data.image_size={IMAGE_SIZE}", f"model.image_size={IMAGE_SIZE}", "data.num_workers=0",
                           "data.shuffle_buffer=16", "train.steps=6", *overrides)


def recorded(out_dir, rank):
    with open(out_dir / f"keys_rank{rank}.jsonl") as lines:
        return [json.loads(line) for line in lines]


def _two_rank_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    cfg = load_config(None, json.loads(os.environ["FASTVL_TEST_OVERRIDES"]))
    result = train(cfg, build_recipe=StandInRecipe, build_loader=KeyRecordingLoader, stop_at=3, progress=False)
    out.put((rank, result.step))


def test_two_processes_resume_on_one_with_exactly_the_unseen_samples(synth_data, tmp_path, monkeypatch):
    """Global batch 8 throughout: 2 processes x 4 for 3 steps (interrupted), then 1 x 8 for 3 more; the
    sample keys of every step equal those of a straight 1 x 8 run (rank r reads global positions r, r+2,
    ..., so a global batch is the two ranks' micro-batches interleaved)."""
    straight = tmp_path / "straight"
    train(run_config(synth_data, straight), build_recipe=StandInRecipe, build_loader=KeyRecordingLoader,
          progress=False)

    moved = tmp_path / "moved"
    overrides = [f"data.train={synth_data / 'train'}", f"train.output_dir={moved}", f"data.image_size={IMAGE_SIZE}",
                 f"model.image_size={IMAGE_SIZE}", "data.num_workers=0", "data.shuffle_buffer=16", "data.batch_size=4", "train.steps=6",
                 "train.warmup_steps=2", "train.log_every=1", "train.save_every=0", "train.precision=fp32",
                 "train.lr=0.01"]
    monkeypatch.setenv("FASTVL_TEST_OVERRIDES", json.dumps(overrides))
    assert sorted(spawn_two_ranks(_two_rank_worker, 2)) == [(0, 3), (1, 3)]
    assert checkpoint_world_size(moved / "step_3") is None  # ZeRO-0: the optimizer state is whole
    result = train(run_config(synth_data, moved), build_recipe=StandInRecipe, build_loader=KeyRecordingLoader,
                   progress=False)
    assert result.step == 6

    two_ranks = [[k for pair in zip(a, b) for k in pair] for a, b in zip(recorded(moved, 0)[:3], recorded(moved, 1))]
    assert two_ranks + recorded(moved, 0)[3:] == recorded(straight, 0)


def test_a_new_global_batch_resumes_at_the_sample_position_and_says_what_changes(synth_data, tmp_path):
    run = tmp_path / "run"
    train(run_config(synth_data, run, "data.batch_size=8"), build_recipe=StandInRecipe,
          build_loader=KeyRecordingLoader, stop_at=2, progress=False)
    with pytest.warns(UserWarning, match=r"resuming step 2 with a global batch of 4 samples instead of 8: the data "
                                         r"continues after sample 16 .* the 4 steps left read 16 samples instead of 32"):
        train(run_config(synth_data, run, "data.batch_size=4"), build_recipe=StandInRecipe,
              build_loader=KeyRecordingLoader, progress=False)
    first, rest = recorded(run, 0)[:2], recorded(run, 0)[2:]
    straight = build_loader(run_config(synth_data, tmp_path / "s", "data.batch_size=4"), "train", 0, 1, 0)
    order = [key for _, batch in zip(range(8), straight) for key in batch.keys]
    assert [k for b in first + rest for k in b] == order  # samples 0-15 in 2 batches of 8, then 16-31 in 4 of 4

"""Mixtures: data.train as weighted sources: validation, draws by weight, exact resume with each
source's position, per-source counts in the metrics log."""
import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from fastvl.config import ConfigError, load_config
from fastvl.data.loader import build_loader
from fastvl.data.mixture import SourceMixer, train_sources
from fastvl.train.loop import train
from fastvl.train.metrics import read_metrics

from ..train.conftest import StandInLoader, StandInRecipe, stand_in_config
from .test_streaming import write_shards

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_albef.json"


@pytest.fixture(scope="session")
def two_sources(tmp_path_factory):
    """Source "big": 31 samples ``a000...`` in 5 shards; source "small": 12 samples ``b000...`` in 2."""
    root = tmp_path_factory.mktemp("mixture")
    write_shards(root / "big", 31, 7, prefix="a")
    write_shards(root / "small", 12, 6, prefix="b")
    return root


def mixture(root, big=3.0, small=1.0):
    return [{"path": str(root / "big"), "weight": big, "name": "big"},
            {"path": str(root / "small"), "weight": small, "name": "small"}]


def config(train, **data):
    data = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 5} | data
    return load_config(None, [f"data.train={json.dumps(train)}"] + [f"data.{k}={json.dumps(v)}" for k, v in data.items()])


def keys_of(loader, batches):
    return [k for b in itertools.islice(iter(loader), batches) for k in b.keys]


@pytest.mark.parametrize("train,message", [
    ([{"path": "a", "weight": 0}], r"data.train\[0\].weight must be a positive number"),
    ([{"path": "a", "weight": 1, "share": 2}], r"data.train\[0\]: unknown key\(s\) \['share'\]"),
    ([{"weight": 1}], r"data.train\[0\].path must be a path"),
    ([{"path": "a", "name": "x"}, {"path": "b", "name": "x"}], "source names must differ"),
    ([{"path": "a"}, "b"], r"data.train\[1\] must be a"),
    (7, "data.train must be a path or a non-empty list"),
])
def test_bad_mixtures_stop_at_config_time_naming_the_entry(train, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.train={json.dumps(train)}"])
    assert [s.name for s in train_sources([{"path": "a"}, {"path": "b", "weight": 2}])] == ["0", "1"]


def test_each_sample_comes_from_the_source_the_seeded_draw_names(two_sources):
    loader = build_loader(config(mixture(two_sources)), "train")
    keys = keys_of(loader, 60)  # 240 samples: the small source cycles through ~5 epochs
    mixer = SourceMixer([3.0, 1.0], seed=0, reader=0)
    assert [k[0] for k in keys] == ["ab"[mixer.next()] for _ in keys]
    share = sum(k[0] == "a" for k in keys) / len(keys)
    assert abs(share - 0.75) < 0.12  # 4.4 standard deviations of a binomial(240, 0.75) share
    assert loader.log_metrics() == {"data/source/big": share * 240, "data/source/small": (1 - share) * 240}
    assert set(k for k in keys if k[0] == "b") == {f"b{i:03d}" for i in range(12)}
    assert loader.epoch >= 1  # the big source has been read once at least


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_mixture_continues_every_source_where_it_was(two_sources, world):
    cfg = config(mixture(two_sources, 1.0, 1.0))
    for rank in range(world):
        straight = keys_of(build_loader(cfg, "train", rank=rank, world_size=world), 12)
        first = build_loader(cfg, "train", rank=rank, world_size=world)
        iterator = iter(first)
        for _ in range(4):
            next(iterator)
        state = first.state_dict()
        assert [len(r["sources"]) for r in state["reader_states"]] == [2]  # one reader, a position per source
        resumed = build_loader(cfg, "train", rank=rank, world_size=world)
        resumed.load_state_dict(state)
        assert keys_of(resumed, 8) == straight[16:]
        assert resumed.drawn == Counter({"a": "big", "b": "small"}[k[0]] for k in straight)


def test_a_changed_layout_restarts_the_recorded_epoch_with_a_warning(two_sources):
    cfg = config(mixture(two_sources))
    first = build_loader(cfg, "train")
    keys_of(first, 3)
    other = build_loader(config(mixture(two_sources), num_workers=2), "train")
    with pytest.warns(UserWarning, match="stream layout"):
        other.load_state_dict(first.state_dict())
    assert other.epoch == first.epoch


class _CountingLoader(StandInLoader):
    """The stand-in loader reporting per-source counts as a mixture does."""

    def __iter__(self):
        for n, batch in enumerate(super().__iter__(), 1):
            self.drawn = n * len(batch)
            yield batch

    def log_metrics(self):
        return {"data/source/only": float(getattr(self, "drawn", 0))}


def test_per_source_counts_reach_the_metrics_log(tmp_path):
    train(stand_in_config(tmp_path, "train.steps=3"), build_recipe=StandInRecipe, build_loader=_CountingLoader,
          progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["data/source/only"] for row in rows] == [8.0, 16.0, 24.0]
    assert torch.isfinite(torch.tensor([row["loss"] for row in rows])).all()


def test_training_on_a_mixture_resumes_exactly_through_the_checkpoint(synth_dir, two_sources, tmp_path, single_thread):
    """The tiny ALBEF on a mixture (one source streamed from .tar.gz): 6 steps straight == 3, a restart
    from the checkpoint, 3 more (data positions and buffers through DeepSpeed's checkpoint); the
    metrics rows carry the per-source counts."""
    import gzip

    (tmp_path / "gz").mkdir()
    for path in sorted((synth_dir / "train").glob("*.tar")):
        (tmp_path / "gz" / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    sources = [{"path": str(tmp_path / "gz"), "weight": 2, "name": "synth"},
               {"path": str(two_sources / "small"), "weight": 1, "name": "small"}]
    runs = {}
    for name in ("straight", "split"):
        runs[name] = load_config(str(TINY), [
            f"data.train={json.dumps(sources)}", f"data.eval={synth_dir / 'heldout'}", "data.batch_size=4",
            "data.num_workers=0", "data.shuffle_buffer=8", f"train.output_dir={tmp_path / name}", "train.steps=6",
            "train.save_every=3", "train.warmup_steps=2", "train.log_every=1", "train.precision=fp32"])
    train(runs["straight"], progress=False)
    assert train(runs["split"], stop_at=3, progress=False).step == 3
    assert train(runs["split"], progress=False).step == 6
    straight, split = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "split"))
    assert [row["loss"] for row in straight] == [row["loss"] for row in split]
    assert [(row["data/source/synth"], row["data/source/small"]) for row in straight] == \
           [(row["data/source/synth"], row["data/source/small"]) for row in split]
    assert [row["data/source/synth"] + row["data/source/small"] for row in straight] == [4.0 * s for s in range(1, 7)]


def _two_process_worker(rank, port, out):
    """Rank ``rank`` of 2 gloo processes: 5 batches of the mixture in MIXTURE_ROOT, and the per-source
    counts summed over both ranks as the metrics log sums them."""
    import os

    import torch.distributed as dist

    from fastvl.train.metrics import sum_over_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from pathlib import Path

    loader = build_loader(config(mixture(Path(os.environ["MIXTURE_ROOT"]))), "train", rank=rank, world_size=2)
    out.put((rank, keys_of(loader, 5), sum_over_ranks(loader.log_metrics())))
    dist.destroy_process_group()


def test_two_processes_read_what_two_simulated_ranks_read_and_log_summed_counts(two_sources, monkeypatch):
    from ..two_ranks import spawn_two_ranks

    monkeypatch.setenv("MIXTURE_ROOT", str(two_sources))
    results = {rank: (keys, counts) for rank, keys, counts in spawn_two_ranks(_two_process_worker, 2)}
    simulated = [build_loader(config(mixture(two_sources)), "train", rank=r, world_size=2) for r in range(2)]
    for rank, loader in enumerate(simulated):
        assert results[rank][0] == keys_of(loader, 5)
    names = ("data/source/big", "data/source/small")
    total = {name: simulated[0].log_metrics()[name] + simulated[1].log_metrics()[name] for name in names}
    assert results[0][1] == results[1][1] == total and sum(total.values()) == 2 * 5 * 4
    assert set(results[0][0]) != set(results[1][0])  # the ranks read different shards

"""Streaming mode: shard split across ranks x workers, exact resume (1 and 2 ranks), the same bad-input
rules as the local mode, and shards served by a real HTTP server on 127.0.0.1 (including connections
dropped or stalled mid-shard)."""
import functools
import os
import gzip
import http.server
import itertools
import json
import threading
import time
from collections import Counter

import pytest
import torch
from PIL import Image

from fastvl.config import ConfigError, load_config
from fastvl.data.loader import build_loader
from fastvl.data.shards import ShardWriter
from fastvl.data.streaming import StreamingLoader, needs_streaming, reader_shards, shard_urls

from .helpers import jpeg_bytes, write_tar

NUM_SAMPLES, SHARD_SIZE = 31, 7  # 5 shards of 7, 7, 7, 7, 3 samples


def write_shards(folder, count=NUM_SAMPLES, shard_size=SHARD_SIZE, prefix="s"):
    with ShardWriter(folder, shard_size) as writer:
        for i in range(count):
            writer.write(f"{prefix}{i:03d}", {"jpg": jpeg_bytes(Image.new("RGB", (16, 16), (i * 8 % 256, 60, 90))),
                                              "txt": f"sample {prefix} {i}"})
    return sorted(folder.glob("*.tar"))


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """The same 31 samples as plain tars (``tar/``) and gzipped (``gz/``)."""
    root = tmp_path_factory.mktemp("stream")
    gz = root / "gz"
    gz.mkdir()
    for path in write_shards(root / "tar"):
        (gz / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
    return root


class _FaultyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; a file named in ``server.faults`` (name -> [kind, times]) is sent with its
    full Content-Length but only half its bytes, then the connection is closed ("drop") or left open
    without data ("stall"), ``times`` times."""

    def do_GET(self):
        name = self.path.lstrip("/")
        fault = self.server.faults.get(name)
        if fault is None or fault[1] == 0:
            return super().do_GET()
        fault[1] -= 1
        self.server.hits[name] += 1
        data = (self.server.root / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2])
        self.wfile.flush()
        if fault[0] == "stall":
            self.server.release.wait(30)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(shards):
    """``(base URL, server)`` of a threaded HTTP server on 127.0.0.1 serving ``shards/tar``."""
    root = shards / "tar"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_FaultyHandler, directory=str(root)))
    server.root, server.faults, server.hits, server.release = root, {}, Counter(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.release.set()
    server.shutdown()
    server.server_close()


def config(train, **data):
    data = {"batch_size": 4, "num_workers": 0, "shuffle_buffer": 6} | data
    overrides = [f"data.train={json.dumps(train) if not isinstance(train, str) else train}"]
    overrides += [f"data.{k}={json.dumps(v)}" for k, v in data.items()]
    return load_config(None, overrides)


def take(loader, batches):
    return list(itertools.islice(iter(loader), batches))


def keys_of(batches):
    return [k for b in batches for k in b.keys]


@pytest.mark.parametrize("num_shards,readers", [(5, 1), (5, 2), (5, 4), (8, 4), (3, 4)])
def test_every_reader_gets_the_same_number_of_shards_and_an_epoch_covers_all(num_shards, readers):
    for epoch in range(3):
        lists = [reader_shards(num_shards, r, readers, seed=0, source=0, epoch=epoch) for r in range(readers)]
        assert {len(shards) for shards in lists} == {-(-num_shards // readers)}
        read = Counter(s for shards in lists for s in shards)
        assert set(read) == set(range(num_shards))
        assert sum(n - 1 for n in read.values()) == len(lists[0]) * readers - num_shards  # only the padding repeats
    assert reader_shards(8, 0, 2, 0, 0, 0) != reader_shards(8, 0, 2, 0, 0, 1)  # reshuffled every epoch


def test_what_is_streamed_and_how_urls_expand(shards):
    assert needs_streaming("http://host/a-{000..002}.tar") and needs_streaming("pipe:cat x.tar")
    assert needs_streaming(str(shards / "gz")) and needs_streaming([{"path": str(shards / "tar"), "weight": 1}])
    assert not needs_streaming(str(shards / "tar"))
    assert shard_urls("http://h/s-{000..002}.tar") == [f"http://h/s-{i:03d}.tar" for i in range(3)]
    assert [p.rsplit("/", 1)[1] for p in shard_urls(str(shards / "gz"))] == [f"shard-{i:06d}.tar.gz" for i in range(5)]
    with pytest.raises(ConfigError, match="data path not found"):
        shard_urls(str(shards / "nothing-{0..1}.tar.gz"))
    with pytest.raises(ConfigError, match="data.eval: streamed sources .* are for training"):
        build_loader(config(str(shards / "tar"), eval=str(shards / "gz")), "eval")


def test_a_streamed_epoch_reads_every_sample_with_full_batches(shards):
    loader = build_loader(config(str(shards / "gz"), batch_size=5), "train")
    assert isinstance(loader, StreamingLoader)
    batches = take(loader, 12)  # 60 samples: the 31 of epoch 0, then most of epoch 1
    assert all(len(b) == 5 and b.images.shape == (5, 3, 64, 64) for b in batches)
    keys = keys_of(batches)
    assert set(keys) == {f"s{i:03d}" for i in range(NUM_SAMPLES)}
    assert sorted(keys[:25]) != keys[:25]  # the shuffle buffer mixed them
    assert loader.epoch == 1 and not loader.skipped  # epoch 1 is not over: part of it is unread or buffered
    fresh, seen = build_loader(config(str(shards / "gz"), batch_size=5), "train"), []
    for batch in fresh:  # as train.max_epochs=1 stops: epoch 0 is over once all of it was handed out
        seen += batch.keys
        if fresh.epoch >= 1:
            break
    assert set(seen) == set(keys) and len(seen) < NUM_SAMPLES + 5 + 6  # plus at most a batch and a buffer


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (1, 2)])
def test_a_killed_and_resumed_run_yields_the_same_samples_as_a_straight_one(shards, world, workers):
    cfg = config(str(shards / "gz"), num_workers=workers)
    for rank in range(world):
        straight = take(build_loader(cfg, "train", rank=rank, world_size=world), 14)  # crosses into epoch 1 or 2
        first = build_loader(cfg, "train", rank=rank, world_size=world)
        iterator = iter(first)
        for _ in range(5):
            next(iterator)
        state = first.state_dict()
        del iterator, first  # killed: batches its workers prefetched are lost
        resumed = build_loader(cfg, "train", rank=rank, world_size=world)
        resumed.load_state_dict(state)
        rest = take(resumed, 9)
        assert keys_of(rest) == keys_of(straight[5:])
        for a, b in zip(rest, straight[5:]):
            assert torch.equal(a.images, b.images) and torch.equal(a.input_ids, b.input_ids)  # same crops too


def test_two_ranks_with_uneven_shards_read_all_and_keep_full_batches(shards):
    cfg = config(str(shards / "gz"), batch_size=3, shuffle_buffer=0)
    # epoch 0: each rank reads ceil(5 / 2) = 3 shards (one of them is read by both ranks)
    lists = [reader_shards(5, r, 2, seed=0, source=0, epoch=0) for r in range(2)]
    assert len(set(lists[0]) & set(lists[1])) == 1
    sizes = [sum(min(SHARD_SIZE, NUM_SAMPLES - SHARD_SIZE * s) for s in shards_) for shards_ in lists]
    for rank, size in enumerate(sizes):
        loader = build_loader(cfg, "train", rank=rank, world_size=2)
        batches = take(loader, 8)  # 24 samples: past the end of this rank's epoch 0
        assert all(len(b) == 3 for b in batches)  # an epoch boundary does not shorten a batch
        keys = keys_of(batches)
        expected = [f"s{SHARD_SIZE * s + i:03d}" for s in lists[rank] for i in range(SHARD_SIZE)
                    if SHARD_SIZE * s + i < NUM_SAMPLES]
        assert keys[:size] == expected  # without a shuffle buffer: this rank's shards, front to back
        assert loader.epoch == 1


def test_bad_samples_follow_the_local_rules_and_counters(tmp_path):
    good = jpeg_bytes(Image.new("RGB", (32, 32), (200, 10, 10)))
    with ShardWriter(tmp_path / "local", 100) as writer:
        writer.write("nocaption", {"jpg": good})
        writer.write("emptytxt", {"jpg": good, "txt": b""})
        for i in range(6):
            writer.write(f"ok{i}", {"jpg": good, "txt": f"red picture {i}"})
            if i == 2:
                writer.write("corrupt", {"jpg": b"\xff\xd8\xff\xe0 definitely not a jpeg", "txt": "broken"})
                writer.write("blank", {"jpg": good, "txt": "   \n"})
    (shard,) = (tmp_path / "local").glob("*.tar")
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    # one batch = one pass over the shard's 8 samples with an image and a caption
    local = build_loader(config(str(tmp_path / "local"), batch_size=8, shuffle_buffer=0), "train")
    streamed = build_loader(config(str(tmp_path / "gz"), batch_size=8, shuffle_buffer=0), "train")
    local_batch, streamed_batch = next(iter(local)), next(iter(streamed))
    assert set(streamed_batch.keys) == set(local_batch.keys) == {f"ok{i}" for i in range(6)}
    assert len(streamed_batch) == 8  # topped up with copies of good samples, as in the local mode
    assert streamed.skipped == local.skipped == {"truncated_image": 1, "empty_caption": 2, "missing_caption": 1}
    assert streamed.metrics()["data/skipped"] == 4


def test_a_truncated_shard_keeps_its_complete_samples_and_is_counted(tmp_path):
    members = [(f"k{i}.{ext}", payload) for i in range(4)
               for ext, payload in (("jpg", jpeg_bytes(Image.new("RGB", (8, 8)))), ("txt", b"a caption"))]
    write_tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    cut = data.index(b"k3.txt") + 512 + 3  # inside k3's caption: k3 lost its .txt
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "cut.tar").write_bytes(data[:cut])
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "cut.tar.gz").write_bytes(gzip.compress(data[:cut]))
    for folder in ("local", "gz"):
        loader = build_loader(config(str(tmp_path / folder), batch_size=4, shuffle_buffer=0), "train")
        batch = next(iter(loader))
        assert set(batch.keys) == {"k0", "k1", "k2"}  # the 4th is the first of epoch 1
        assert loader.skipped == {"truncated_shard": 1, "truncated_sample": 1}, folder


def test_http_and_pipe_streams_match_the_local_stream(shards, http_root):
    base, _ = http_root
    expected = keys_of(take(build_loader(config(str(shards / "gz")), "train"), 6))
    over_http = build_loader(config(f"{base}/shard-{{000000..000004}}.tar"), "train")
    assert keys_of(take(over_http, 6)) == expected and not over_http.skipped
    piped = build_loader(config(f"pipe:cat {shards / 'tar'}/shard-{{000000..000004}}.tar"), "train")
    assert keys_of(take(piped, 6)) == expected


def test_a_connection_dropped_mid_shard_is_retried_then_skipped_and_counted(shards, http_root):
    base, server = http_root
    url = f"{base}/shard-{{000000..000004}}.tar"
    expected = keys_of(take(build_loader(config(str(shards / "gz")), "train"), 7))  # epoch 0: 31 samples

    server.faults["shard-000002.tar"] = ["drop", 1]  # dropped once: the retry reads it whole
    loader = build_loader(config(url, stream_retries=2), "train")
    assert keys_of(take(loader, 7)) == expected and not loader.skipped
    assert server.hits["shard-000002.tar"] == 1

    server.faults["shard-000002.tar"] = ["drop", 99]  # dropped every time: 1 + 2 attempts, then skipped
    server.hits.clear()
    loader = build_loader(config(url, stream_retries=2), "train")
    keys = set(keys_of(take(loader, 10)))
    given_up = loader.skipped["unreadable_shard"]
    assert given_up >= 1 and set(loader.skipped) == {"unreadable_shard"}
    assert server.hits["shard-000002.tar"] == 3 * given_up
    in_shard_2 = sorted(k for k in keys if 14 <= int(k[1:]) < 21)
    assert in_shard_2 == [f"s{i:03d}" for i in range(14, 14 + len(in_shard_2))]  # those before the drop
    assert 0 < len(in_shard_2) < 7
    assert keys == {f"s{i:03d}" for i in range(NUM_SAMPLES) if not 14 <= i < 21} | set(in_shard_2)


def test_a_stalled_connection_times_out_instead_of_hanging(http_root):
    base, server = http_root
    server.faults["shard-000001.tar"] = ["stall", 99]
    loader = build_loader(config(f"{base}/shard-{{000000..000004}}.tar", stream_timeout=0.5, stream_retries=1), "train")
    started = time.monotonic()
    keys = keys_of(take(loader, 8))
    given_up = loader.skipped["unreadable_shard"]
    assert time.monotonic() - started < 2 * 0.5 * given_up + 8  # 2 attempts of 0.5 s per give-up, plus work
    assert given_up >= 1 and set(loader.skipped) == {"unreadable_shard"}
    assert server.hits["shard-000001.tar"] == 2 * given_up
    in_shard_1 = sorted({k for k in keys if 7 <= int(k[1:]) < 14})
    assert len(keys) == 32 and in_shard_1 == [f"s{i:03d}" for i in range(7, 7 + len(in_shard_1))]  # before the stall


def test_max_epochs_with_several_ranks_is_refused(shards):
    cfg = config(str(shards / "gz"))
    cfg.train.max_epochs = 1
    with pytest.raises(ConfigError, match="train.max_epochs"):
        build_loader(cfg, "train", rank=0, world_size=2)


def test_s3_urls_are_read_through_the_aws_cli(shards, tmp_path, monkeypatch):
    """``s3://bucket/key`` -> ``pipe:aws s3 cp s3://bucket/key -``: a stand-in ``aws`` on PATH serves
    the local shards and logs its arguments."""
    fake = tmp_path / "bin" / "aws"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\nexec cat "{shards}/tar/${{3#s3://bucket/}}"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    expected = keys_of(take(build_loader(config(str(shards / "gz")), "train"), 3))
    loader = build_loader(config("s3://bucket/shard-{000000..000004}.tar"), "train")
    assert keys_of(take(loader, 3)) == expected
    assert (tmp_path / "calls").read_text().splitlines()[0].startswith("s3 cp s3://bucket/shard-0000")
    assert (tmp_path / "calls").read_text().splitlines()[0].endswith(".tar -")

"""The compact shard index: its arrays against the tar headers, its size, and the index cache (found
again, invalidated by a changed shard, written where it can be, shared by two ranks)."""
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from fastvl.data import shards
from fastvl.data.shards import (NO_META, SETTLE_SECONDS, ShardSource, ShardWriter, index_cache_files, index_shards,
                                load_index, resolve_shard_paths)

from ..two_ranks import spawn_two_ranks
from .helpers import jpeg_bytes

IMAGE = jpeg_bytes(Image.new("RGB", (8, 8), (200, 10, 10)))


def write_img2dataset_like(folder, count=12, shard_size=5, settled=True):
    """Shards keyed like img2dataset output (9 digits: shard number, then position), every third
    sample without metadata; ``settled`` dates the shards back beyond ``SETTLE_SECONDS``."""
    with ShardWriter(folder, shard_size) as writer:
        for i in range(count):
            fields = {"jpg": IMAGE, "txt": f"caption {i}"}
            if i % 3:
                fields["json"] = {"i": i}
            writer.write(f"{i // shard_size:05d}{i % shard_size:04d}", fields)
    if settled:
        old = time.time() - 10 * SETTLE_SECONDS
        for path in writer.paths:
            os.utime(path, (old, old))
    return writer.paths


def tarfile_reference(paths):
    """Per sample (key, {extension: (offset, size)}) from the standard library's tar reader."""
    samples = []
    for path in paths:
        with tarfile.open(path) as archive:
            for member in archive.getmembers():
                key, _, extension = member.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                samples[-1][1][extension] = (member.offset_data, member.size)
    return samples


def test_compact_index_locates_what_tarfile_finds(tmp_path):
    paths = write_img2dataset_like(tmp_path)
    index = index_shards(paths)
    reference = tarfile_reference(paths)
    assert index.keys == [key for key, _ in reference]
    for i, (_, fields) in enumerate(reference):
        assert index.image(i) == fields["jpg"] and index.caption(i) == fields["txt"]
        assert index.meta(i) == fields.get("json")
        assert index.paths[index.shard_of(i)] == os.fspath(paths[i // 5])
    assert index.shard_starts.tolist() == [0, 5, 10]
    # the target of the issue: at most 48 bytes per sample (32-byte record, 4-byte key end, 9-byte key)
    assert index.nbytes / len(index) <= 48


def test_a_second_start_reads_the_cache_instead_of_scanning(tmp_path, monkeypatch):
    write_img2dataset_like(tmp_path)
    first = ShardSource(tmp_path)
    (cache,) = tmp_path.glob(".fastvl-index-*.idx")
    monkeypatch.setattr(shards, "scan_tar", lambda path: pytest.fail(f"scanned {path} again"))
    second = ShardSource(tmp_path)
    assert isinstance(second.index.records, np.memmap)
    assert second.keys == first.keys and second.groups == first.groups and second.skipped == first.skipped
    assert [second.read(i, True) for i in range(12)] == [first.read(i, True) for i in range(12)]
    assert index_cache_files(resolve_shard_paths(tmp_path)) == [cache, shards.user_cache_dir() / cache.name[1:]]


def test_a_changed_shard_or_a_damaged_cache_is_rescanned(tmp_path, monkeypatch):
    paths = write_img2dataset_like(tmp_path)
    ShardSource(tmp_path)
    (cache,) = tmp_path.glob(".fastvl-index-*.idx")
    scanned = []
    real_scan = shards.scan_tar
    monkeypatch.setattr(shards, "scan_tar", lambda path: scanned.append(path) or real_scan(path))

    write_img2dataset_like(tmp_path, count=11)  # the last shard loses a sample
    assert len(ShardSource(tmp_path)) == 11 and len(scanned) == 3
    assert len(ShardSource(tmp_path)) == 11 and len(scanned) == 3  # ... and the new index was cached

    cache.write_bytes(cache.read_bytes()[:100])
    assert len(ShardSource(tmp_path)) == 11 and len(scanned) == 6
    os.utime(paths[0])  # touched just now: indexed, but not cached while it could still change unseen
    cache.unlink()
    assert len(ShardSource(tmp_path)) == 11 and not list(tmp_path.glob(".fastvl-index-*"))


def test_cache_folder_setting_fallback_and_off(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_img2dataset_like(data)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ShardSource(data, index_cache=str(tmp_path / "mine"))
    assert len(list((tmp_path / "mine").glob("fastvl-index-*.idx"))) == 1
    ShardSource(data, index_cache="off")
    assert not list(data.glob(".fastvl-index-*"))
    # beside the shards cannot be written (here: a folder stands where the file would go, which also
    # stops root, who ignores a read-only folder): the user cache folder instead
    (beside, user) = index_cache_files(resolve_shard_paths(data))
    beside.mkdir()
    ShardSource(data)
    assert user.is_file() and user.parent == tmp_path / "xdg" / "fastvl" / "index"
    assert not list(data.glob(".fastvl-index-*.tmp"))


def test_oversized_members_are_skipped_not_wrapped():
    builder = shards._IndexBuilder()
    builder.start_shard()
    builder.add("ok", {"jpg": (512, 10), "txt": (1536, 5)})
    builder.add("huge", {"jpg": (512, NO_META), "txt": (2 ** 33, 5)})
    builder.add("far", {"jpg": (512, 10), "txt": (512 + 2 ** 31, 5)})
    index = builder.finish(["x.tar"])
    assert index.keys == ["ok"] and index.skipped == {"oversized_sample": 2}
    assert index.caption(0) == (1536, 5) and index.meta(0) is None


def _rank_worker(rank, port, out, folder):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    scanned = []
    real_scan = shards.scan_tar
    shards.scan_tar = lambda path: scanned.append(path) or real_scan(path)
    index = load_index(resolve_shard_paths(folder))
    out.put((rank, len(scanned), index.keys))
    dist.destroy_process_group()


def _two_rank_worker(rank, port, out):
    _rank_worker(rank, port, out, os.environ["FASTVL_TEST_SHARDS"])


def test_rank_zero_builds_and_the_other_rank_reads(tmp_path, monkeypatch):
    write_img2dataset_like(tmp_path)
    monkeypatch.setenv("FASTVL_TEST_SHARDS", str(tmp_path))  # spawned workers inherit the environment
    results = dict((rank, (scans, keys)) for rank, scans, keys in spawn_two_ranks(_two_rank_worker, 2))
    assert results[0][0] == 3 and results[1][0] == 0
    assert results[0][1] == results[1][1] == [key for key, _ in tarfile_reference(sorted(tmp_path.glob("*.tar")))]

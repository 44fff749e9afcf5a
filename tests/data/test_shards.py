"""Webdataset-convention shards: keys, path resolution, writing, indexing, bad members."""
import importlib.util
import os
import io
import json
import tarfile

import pytest
from PIL import Image

from fastvl.config import ConfigError
from fastvl.data.shards import (ShardSource, ShardWriter, expand_braces, index_shards, resolve_shard_paths, scan_tar,
                                split_key)
from fastvl.data.source import open_source

from .helpers import jpeg_bytes


def write_shards(folder, count=7, shard_size=3):
    with ShardWriter(folder, shard_size) as writer:
        for i in range(count):
            image = jpeg_bytes(Image.new("RGB", (8, 8), (i * 30, 0, 0)))
            writer.write(f"s{i:02d}", {"jpg": image, "txt": f"caption {i}", "json": {"i": i}})
    return writer.paths


def test_split_key_follows_the_webdataset_convention():
    assert split_key("abc.jpg") == ("abc", "jpg")
    assert split_key("dir/abc.seg.PNG") == ("dir/abc", "seg.png")
    assert split_key("a.b/c.txt") == ("a.b/c", "txt")
    assert split_key("noext") == ("noext", "")


def test_expand_braces():
    assert expand_braces("s-{08..10}.tar") == ["s-08.tar", "s-09.tar", "s-10.tar"]
    assert expand_braces("{a,b}/x-{0..1}") == ["a/x-0", "a/x-1", "b/x-0", "b/x-1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_writer_rolls_shards_and_index_round_trips(tmp_path):
    paths = write_shards(tmp_path, count=7, shard_size=3)
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    source = ShardSource(tmp_path)
    assert source.keys == [f"s{i:02d}" for i in range(7)]
    assert source.groups == [(0, 3), (3, 6), (6, 7)]
    for i in range(7):
        raw = source.read(i, with_meta=True)
        assert raw.caption == f"caption {i}" and raw.meta == {"i": i}
        assert Image.open(io.BytesIO(raw.image)).getpixel((4, 4))[0] == pytest.approx(i * 30, abs=6)
    assert source.read(0).meta is None  # metadata only when asked


def test_paths_as_folder_glob_braces_file_and_list_resolve_alike(tmp_path):
    paths = write_shards(tmp_path)
    expected = [str(p) for p in paths]
    as_str = lambda found: [str(p) for p in found]  # noqa: E731
    assert as_str(resolve_shard_paths(tmp_path)) == expected
    assert as_str(resolve_shard_paths(str(tmp_path / "shard-*.tar"))) == expected
    assert as_str(resolve_shard_paths(str(tmp_path / "shard-{000000..000002}.tar"))) == expected
    assert as_str(resolve_shard_paths([str(p) for p in paths])) == expected
    assert as_str(resolve_shard_paths(str(paths[1]))) == expected[1:2]


def test_missing_and_empty_paths_raise_config_errors_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        resolve_shard_paths(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="matches no files"):
        resolve_shard_paths(str(tmp_path / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        resolve_shard_paths(tmp_path / "empty")
    with tarfile.open(tmp_path / "blank.tar", "w"):
        pass
    with pytest.raises(ConfigError, match="empty dataset.*blank.tar"):
        open_source(str(tmp_path / "blank.tar"))
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ConfigError, match="junk.tar"):
        open_source(str(tmp_path / "junk.tar"))


def test_samples_without_image_or_caption_are_skipped_and_counted(tmp_path):
    with ShardWriter(tmp_path, 100) as writer:
        writer.write("good", {"jpg": jpeg_bytes(Image.new("RGB", (4, 4))), "txt": "ok"})
        writer.write("nocaption", {"jpg": jpeg_bytes(Image.new("RGB", (4, 4)))})
        writer.write("emptycaption", {"jpg": jpeg_bytes(Image.new("RGB", (4, 4))), "txt": ""})
        writer.write("noimage", {"txt": "text only", "json": {}})
    index = index_shards(resolve_shard_paths(tmp_path))
    assert index.keys == ["good"]
    assert index.skipped == {"missing_caption": 1, "empty_caption": 1, "missing_image": 1}


@pytest.mark.parametrize("cut_inside, kept, casualties", [
    ("s02.json", 3, 0),  # the last sample lost only its optional metadata: still a good sample
    ("s02.txt", 2, 1),  # the last sample lost its caption
    ("s01.jpg", 1, 0),  # cut in the first member of a sample: nothing of it was indexed
])
def test_truncated_shard_keeps_the_samples_before_the_damage(tmp_path, cut_inside, kept, casualties):
    (path,) = write_shards(tmp_path, count=3, shard_size=3)
    members = {name: (offset, size) for name, offset, size in scan_tar(str(path))[0]}
    offset, size = members[cut_inside]
    path.write_bytes(path.read_bytes()[:offset + size // 2])
    source = ShardSource(tmp_path)
    assert source.keys == [f"s{i:02d}" for i in range(kept)]
    assert source.skipped == ({"truncated_shard": 1, "truncated_sample": 1} if casualties else {"truncated_shard": 1})
    assert [source.read(i).caption for i in range(kept)] == [f"caption {i}" for i in range(kept)]


def test_writer_refuses_dotted_keys_and_drops_a_half_written_shard(tmp_path):
    with pytest.raises(ValueError, match="dot"):
        ShardWriter(tmp_path / "a").write("a.b", {"txt": "x"})
    for unsafe in ("../up", "/abs", "dir/../../up"):
        with pytest.raises(ValueError, match="relative path"):
            ShardWriter(tmp_path / "a").write(unsafe, {"txt": "x"})
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "b", 10) as writer:
            writer.write("k", {"txt": "x"})
            raise RuntimeError("interrupted")
    assert not list((tmp_path / "b").iterdir())


@pytest.mark.skipif(importlib.util.find_spec("webdataset") is None, reason="webdataset not installed")
def test_webdataset_reads_our_shards_as_we_do(tmp_path):
    import webdataset

    write_shards(tmp_path, count=5, shard_size=2)
    ours = ShardSource(tmp_path)
    urls = [str(p) for p in sorted(tmp_path.glob("*.tar"))]
    theirs = list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in theirs] == ours.keys
    assert [s["txt"].decode() for s in theirs] == [ours.read(i).caption for i in range(5)]
    assert [json.loads(s["json"]) for s in theirs] == [ours.read(i, True).meta for i in range(5)]
    assert [s["jpg"] for s in theirs] == [ours.read(i).image for i in range(5)]


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scan_agrees_with_tarfile(tmp_path, tar_format):
    """Our header scanner against the standard library, with long names (ustar prefix, GNU long-name
    and pax path records), a non-ASCII name, directories and an empty file."""
    path = tmp_path / "mixed.tar"
    names = ["a/short.txt", "d" * 60 + "/" + "n" * 80 + ".jpg", "x" * 120 + ".json", "cafés/ü.txt", "empty.txt"]
    if tar_format == tarfile.USTAR_FORMAT:
        names.remove("x" * 120 + ".json")  # ustar cannot store a 120-character file name
    with tarfile.open(path, "w", format=tar_format) as archive:
        directory = tarfile.TarInfo("a")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)
        for i, name in enumerate(names):
            payload = bytes(range(256))[: (i * 97) % 256] if name != "empty.txt" else b""
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    with tarfile.open(path) as archive:
        expected = [(m.name, m.offset_data, m.size) for m in archive.getmembers() if m.isfile()]
    members, truncated = scan_tar(str(path))
    assert members == expected and not truncated


def test_many_shards_keep_few_descriptors_open(tmp_path, monkeypatch):
    from fastvl.data import shards

    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 3)
    write_shards(tmp_path, count=8, shard_size=1)
    source = ShardSource(tmp_path)
    for _ in range(2):
        assert [source.read(i).caption for i in range(8)] == [f"caption {i}" for i in range(8)]
    assert sum(1 for owner, _ in shards._OPEN_SHARDS if owner == os.getpid()) <= 3

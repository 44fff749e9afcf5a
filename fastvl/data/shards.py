"""Webdataset-convention tar shards: writing them, and indexing them for random access.

Convention (as in webdataset): a shard is a plain tar whose members are grouped into samples by
*key* — the member path up to the first dot of its file name — and consecutive members with the
same key form one sample: ``abc.jpg`` + ``abc.txt`` + ``abc.json`` is sample ``abc`` with fields
``jpg``, ``txt`` and ``json``.

Reading does not stream the tar: ``index_shards`` scans the headers once (no payload is read) and
records where each sample's image, caption and metadata bytes are, so a loader can fetch any sample
with one positional read per field (``os.pread``: no shared file offset, safe across forked workers).
That is what makes the sample order a pure function of (seed, epoch) and resume exact. Compressed
tars cannot be read this way and are refused at start-up.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..config import ConfigError
from ..dist import barrier, rank_and_world
from .source import PathSpec, RawSample, decode_caption

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
"""Member extensions read as the sample's image, in order of preference."""
CAPTION_FIELD = "txt"
META_FIELD = "json"

log = logging.getLogger("fastvl.data")


def split_key(member_name: str) -> tuple[str, str]:
    """``"dir/abc.def.jpg"`` -> ``("dir/abc", "def.jpg")``: key up to the first dot of the file name."""
    directory, _, name = member_name.rpartition("/")
    stem, dot, extension = name.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, extension.lower() if dot else ""


def sample_problem(sizes: dict[str, int], safe: bool = True) -> Optional[str]:
    """Why a sample with these members (extension -> byte size) cannot be used, or None: the reasons
    counted while indexing (``unsafe_member_name`` when ``safe`` is false, ``missing_image``,
    ``missing_caption``, ``empty_caption``, ``empty_image``). The streaming reader applies the same."""
    image = next((sizes[name] for name in IMAGE_FIELDS if name in sizes), None)
    caption = sizes.get(CAPTION_FIELD)
    if not safe:
        return "unsafe_member_name"
    if image is None:
        return "missing_image"
    if caption is None:
        return "missing_caption"
    if caption == 0:
        return "empty_caption"
    if image == 0:
        return "empty_image"
    return None


_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand webdataset-style braces: ``shard-{000..002}.tar`` (zero-padded numeric range) and
    ``{a,b}`` (alternatives), left to right."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first)
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def resolve_shard_paths(spec: PathSpec) -> list[Path]:
    """Shard files named by a folder (every ``*.tar`` inside, sorted), a glob / brace pattern, a file,
    or a list of any of those. Raises ``ConfigError`` naming the first thing that matches nothing."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    paths: list[Path] = []
    for item in items:
        text = os.fspath(item)
        if os.path.isdir(text):
            found = sorted(Path(text).glob("*.tar"))
            if not found:
                raise ConfigError(f"no *.tar shards in data folder: {text}")
            paths += found
            continue
        matched: list[Path] = []
        for pattern in expand_braces(text):
            if any(c in pattern for c in "*?["):
                matched += sorted(Path(p) for p in glob.glob(pattern))
            elif os.path.isfile(pattern):
                matched.append(Path(pattern))
            else:
                raise ConfigError(f"data path not found: {pattern}")
        if not matched:
            raise ConfigError(f"data path matches no files: {text}")
        paths += matched
    return paths


RECORD = np.dtype([("image_offset", "<u8"), ("image_size", "<u4"), ("caption_delta", "<i4"),
                   ("caption_size", "<u4"), ("meta_delta", "<i4"), ("meta_size", "<u4")])
"""One indexed sample: the image's byte range, and the caption's and metadata's as offsets relative to
the image (a sample's members are adjacent in its tar) — 32 bytes. Its key and shard are kept apart."""
NO_META = np.iinfo(np.uint32).max
"""``meta_size`` of a sample without ``.json``."""
_DELTA = np.iinfo(np.int32)


class ShardIndex:
    """Where every sample of a list of shards lives, in flat numpy arrays (about 32 bytes plus the key
    per sample, against ~470 for Python objects) that can be memory-mapped from the index cache and
    are shared, not copied, by forked loader workers.

    Locations are ``(offset, size)`` byte ranges in ``paths[shard_of(i)]``; ``meta(i)`` is None when
    the sample has no ``.json``. Shards keep their samples contiguous: shard ``s`` holds samples
    ``shard_starts[s]`` to ``shard_starts[s + 1]`` (or the end)."""

    def __init__(self, paths: list[str], records: np.ndarray, key_ends: np.ndarray, key_bytes: np.ndarray,
                 shard_starts: np.ndarray, skipped: Counter):
        self.paths, self.records, self.key_ends, self.key_bytes = paths, records, key_ends, key_bytes
        self.shard_starts = shard_starts
        self.skipped = skipped
        """Samples dropped while indexing, by reason: missing_image, missing_caption, empty_caption (a
        zero-byte .txt), empty_image, unsafe_member_name, oversized_sample (a member of 4 GiB or more,
        or members 2 GiB or more apart), truncated_sample (the incomplete last sample of a cut-off
        shard); plus truncated_shard, counted once per damaged shard."""

    def __len__(self) -> int:
        return len(self.records)

    @property
    def nbytes(self) -> int:
        """Bytes the index arrays take (what ``len(self)`` samples cost in memory)."""
        return sum(a.nbytes for a in (self.records, self.key_ends, self.key_bytes, self.shard_starts))

    def key(self, i: int) -> str:
        start = int(self.key_ends[i - 1]) if i > 0 else 0
        return self.key_bytes[start:int(self.key_ends[i])].tobytes().decode("utf-8", "surrogateescape")

    @property
    def keys(self) -> list[str]:
        """Every key, in index order (a new list: for inspection and tests, not the read path)."""
        return [self.key(i) for i in range(len(self))]

    def shard_of(self, i: int) -> int:
        return int(np.searchsorted(self.shard_starts, i, side="right")) - 1

    def image(self, i: int) -> tuple[int, int]:
        record = self.records[i]
        return int(record["image_offset"]), int(record["image_size"])

    def caption(self, i: int) -> tuple[int, int]:
        record = self.records[i]
        return int(record["image_offset"]) + int(record["caption_delta"]), int(record["caption_size"])

    def meta(self, i: int) -> Optional[tuple[int, int]]:
        record = self.records[i]
        if record["meta_size"] == NO_META:
            return None
        return int(record["image_offset"]) + int(record["meta_delta"]), int(record["meta_size"])


class _IndexBuilder:
    """Collects one shard's samples in Python lists at a time, then packs them into arrays."""

    def __init__(self):
        self.records: list[np.ndarray] = []
        self.key_chunks: list[bytes] = []
        self.key_lengths: list[np.ndarray] = []
        self.shard_starts: list[int] = []
        self.skipped: Counter = Counter()
        self._count = 0
        self._shard_records: list[tuple] = []
        self._shard_keys: list[bytes] = []

    def start_shard(self) -> None:
        self._flush()
        self.shard_starts.append(self._count)

    def add(self, key: str, fields: dict[str, tuple[int, int]], safe: bool = True) -> None:
        problem = sample_problem({name: size for name, (_, size) in fields.items()}, safe)
        if problem is None:
            problem, record = _packed(fields)
        if problem is not None:
            self.skipped[problem] += 1
            return
        self._shard_records.append(record)
        self._shard_keys.append(key.encode("utf-8", "surrogateescape"))
        self._count += 1

    def _flush(self) -> None:
        if self._shard_records:
            self.records.append(np.array(self._shard_records, dtype=RECORD))
            self.key_chunks.append(b"".join(self._shard_keys))
            self.key_lengths.append(np.fromiter(map(len, self._shard_keys), np.int64, len(self._shard_keys)))
            self._shard_records, self._shard_keys = [], []

    def finish(self, paths: list[str]) -> ShardIndex:
        self._flush()
        records = np.concatenate(self.records) if self.records else np.empty(0, RECORD)
        ends = np.cumsum(np.concatenate(self.key_lengths)) if self.key_lengths else np.empty(0, np.int64)
        total = int(ends[-1]) if len(ends) else 0
        key_ends = ends.astype(np.uint32 if total < 2 ** 32 else np.uint64)
        key_bytes = np.frombuffer(b"".join(self.key_chunks), dtype=np.uint8)
        return ShardIndex(paths, records, key_ends, key_bytes, np.asarray(self.shard_starts, dtype=np.int64),
                          self.skipped)


def _packed(fields: dict[str, tuple[int, int]]) -> tuple[Optional[str], Optional[tuple]]:
    """(None, a ``RECORD`` row) for a usable sample's members, or ("oversized_sample", None) when its
    sizes or distances do not fit the record."""
    image_offset, image_size = next(fields[name] for name in IMAGE_FIELDS if name in fields)
    caption_offset, caption_size = fields[CAPTION_FIELD]
    meta_offset, meta_size = fields.get(META_FIELD, (image_offset, NO_META))
    deltas = (caption_offset - image_offset, meta_offset - image_offset)
    if max(image_size, caption_size, meta_size if META_FIELD in fields else 0) >= NO_META or not all(
            _DELTA.min <= d <= _DELTA.max for d in deltas):
        return "oversized_sample", None
    return None, (image_offset, image_size, deltas[0], caption_size, deltas[1], meta_size)


class _NotATar(Exception):
    pass


def _octal(field: bytes) -> int:
    """A numeric tar header field: NUL/space-terminated octal, or base-256 when the top bit is set."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<length> <key>=<value>\\n"`` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def scan_tar(path: str) -> tuple[list[tuple[str, int, int]], bool]:
    """Regular-file members of an uncompressed tar as ``(name, data offset, size)``, and whether the
    file ends mid-archive (truncated: the members before the damage are returned).

    Reads only the 512-byte headers (plus GNU long-name and pax records), verifying each header's
    checksum — about 10x faster than ``tarfile``, which matters with thousands of shards. Handles
    ustar (name prefix), GNU (long names, base-256 sizes) and pax (path, size) headers. Raises
    ``_NotATar`` when the first header is not a tar header."""
    members: list[tuple[str, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        position, long_name, pax = 0, None, {}
        while True:
            header = os.pread(fd, 512, position)
            if len(header) < 512:
                if position == 0:
                    raise _NotATar("shorter than one tar header")
                return members, position != file_size
            if header.count(0) == 512:  # end-of-archive block
                return members, False
            try:
                valid = _octal(header[148:156]) == sum(header[:148]) + 8 * 32 + sum(header[156:])
                size = _octal(header[124:136])
            except ValueError:
                valid = False
            if not valid:
                if position == 0:
                    raise _NotATar("bad header at offset 0")
                return members, True
            kind = header[156:157]
            data_at = position + 512
            if kind in (b"x", b"L"):
                payload = os.pread(fd, size, data_at)
                if len(payload) < size:
                    return members, True
                if kind == b"L":
                    long_name = payload.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    try:
                        pax = _pax_records(payload)
                    except ValueError:
                        return members, True
            elif kind in (b"0", b"\0", b"7"):  # regular file
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:263] == b"ustar\0" and header[345] != 0:
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
                name = pax.get("path", long_name or name)
                size = int(pax.get("size", size))
                if data_at + size > file_size:
                    return members, True
                members.append((name, data_at, size))
                long_name, pax = None, {}
            elif kind != b"g":  # directories, links, ...: not samples; reset per-member overrides
                long_name, pax = None, {}
            position = data_at + (size + 511) // 512 * 512
    finally:
        os.close(fd)


def is_safe_member_name(name: str) -> bool:
    """False for member names that would land outside the folder if the shard were extracted:
    absolute paths (``/x``, ``\\x``, ``C:x``), any ``..`` component, NUL bytes. We never extract
    (names are only keys), but such a key would be unsafe in anything that writes files by key, and
    no honest shard writer produces one, so the sample is skipped."""
    if not name or "\0" in name or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return False
    return ".." not in re.split(r"[/\\]", name)


def index_shards(paths: Sequence[Path]) -> ShardIndex:
    """Scan the tar headers of ``paths`` (payloads are skipped) into a ``ShardIndex``.

    A shard that is not a plain tar raises ``ConfigError``; a shard truncated part-way keeps the
    complete samples before the damage (the last one too when it still has image and caption) and
    counts one ``truncated_shard``. Samples with an unsafe member name (``is_safe_member_name``) are
    skipped.
    """
    from tqdm import tqdm

    paths = [os.fspath(p) for p in paths]
    builder = _IndexBuilder()
    for path in tqdm(paths, desc="index shards", unit="shard", disable=len(paths) < 64, dynamic_ncols=True):
        builder.start_shard()
        try:
            members, truncated = scan_tar(path)
        except _NotATar as error:
            raise ConfigError(f"not a readable uncompressed tar shard: {path} ({error})") from None
        if truncated:
            builder.skipped["truncated_shard"] += 1
        key, fields, safe = None, {}, True
        for name, offset, size in members:
            member_key, extension = split_key(name)
            if member_key != key:
                if key is not None:
                    builder.add(key, fields, safe)
                key, fields, safe = member_key, {}, True
            fields[extension] = (offset, size)
            safe = safe and is_safe_member_name(name)
        if key is not None:
            # after damage the last sample may have lost members: keep it only if it has an image
            # and a caption (a lost .json is optional); otherwise it is a casualty of the truncation
            complete = any(f in fields for f in IMAGE_FIELDS) and fields.get(CAPTION_FIELD, (0, 0))[1] > 0
            if truncated and not complete:
                builder.skipped["truncated_sample"] += 1
            else:
                builder.add(key, fields, safe)
    return builder.finish(paths)


# ---------------------------------------------------------------------------------------------
# the index cache

INDEX_VERSION = 1
"""Written into every cache file; bump it when the indexing rules or the layout change, and older
files are rebuilt instead of read."""
_MAGIC = b"FVLINDEX"
_ALIGN = 64
SETTLE_SECONDS = 2.0
"""An index is not cached while a shard is younger than this: a shard rewritten within the file
system's timestamp granularity could keep its size and mtime, and a cached index would then point at
the wrong bytes (git's "racily clean" problem). Such a run scans again next time."""


def shard_stamps(paths: Sequence[str]) -> list[list]:
    """``[absolute path, size, mtime_ns]`` of each shard: what a cached index must still match."""
    stamps = []
    for path in paths:
        stat = os.stat(path)
        stamps.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return stamps


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fastvl/index`` (default ``~/.cache/fastvl/index``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastvl" / "index"


def index_cache_files(paths: Sequence[str], setting: str = "") -> list[Path]:
    """Where the index of these shards is cached, in the order tried for reading and writing, per
    ``data.index_cache``: "" -> beside the first shard, then ``user_cache_dir()`` (when the shards'
    folder is not writable); a folder -> there; "off" -> nowhere. The file name hashes the shards'
    absolute paths, so one dataset has one cache file, replaced when a shard changes."""
    if setting == "off" or not paths:
        return []
    digest = hashlib.sha256("\0".join(os.path.abspath(p) for p in paths).encode("utf-8", "surrogateescape"))
    name = f"fastvl-index-{digest.hexdigest()[:20]}.idx"
    if setting:
        return [Path(setting) / name]
    return [Path(paths[0]).resolve().parent / f".{name}", user_cache_dir() / name]


def write_index_file(path: Path, index: ShardIndex, stamps: list[list]) -> None:
    """Save ``index`` (valid for shards with these ``stamps``) atomically: a temporary file renamed
    into place, so a reader sees the old file, the new one or none."""
    arrays = {"records": index.records, "key_ends": index.key_ends, "key_bytes": index.key_bytes,
              "shard_starts": index.shard_starts}
    layout, offset = {}, 0
    for name, array in arrays.items():
        layout[name] = {"dtype": "record" if array.dtype == RECORD else array.dtype.str, "count": len(array),
                        "offset": offset}
        offset += -(-array.nbytes // _ALIGN) * _ALIGN
    header = json.dumps({"version": INDEX_VERSION, "shards": stamps, "paths": index.paths,
                         "skipped": dict(index.skipped), "arrays": layout}).encode("utf-8", "surrogateescape")
    data_start = -(-(16 + len(header)) // _ALIGN) * _ALIGN
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as out:
            out.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            for name, array in arrays.items():
                out.seek(data_start + layout[name]["offset"])
                out.write(np.ascontiguousarray(array).tobytes())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def read_index_file(path: Path, stamps: list[list]) -> Optional[ShardIndex]:
    """The index saved in ``path``, its arrays memory-mapped (pages are shared by every process that
    maps the file), or None when the file is missing, damaged, of another ``INDEX_VERSION``, or was
    made for shards whose paths, sizes or mtimes differ from ``stamps``."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
            if len(head) < 16 or head[:8] != _MAGIC:
                return None
            header = json.loads(handle.read(int.from_bytes(head[8:], "little")).decode("utf-8", "surrogateescape"))
        if header.get("version") != INDEX_VERSION or header.get("shards") != stamps:
            return None
        data_start = -(-(16 + int.from_bytes(head[8:], "little")) // _ALIGN) * _ALIGN
        arrays = {}
        for name, spec in header["arrays"].items():
            dtype = RECORD if spec["dtype"] == "record" else np.dtype(spec["dtype"])
            if spec["count"] == 0:
                arrays[name] = np.empty(0, dtype)
            else:
                arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=data_start + spec["offset"],
                                         shape=(spec["count"],))
        return ShardIndex(header["paths"], arrays["records"], arrays["key_ends"], arrays["key_bytes"],
                          arrays["shard_starts"], Counter(header["skipped"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_cached(files: list[Path], stamps: list[list]) -> Optional[ShardIndex]:
    return next((index for index in map(lambda f: read_index_file(f, stamps), files) if index is not None), None)


def _write_cached(files: list[Path], index: ShardIndex, stamps: list[list]) -> None:
    """Cache ``index`` in the first of ``files`` that can be written, unless a shard is too fresh."""
    if not stamps or time.time() - max(mtime for _, _, mtime in stamps) / 1e9 < SETTLE_SECONDS:
        return
    for path in files:
        try:
            write_index_file(path, index, stamps)
            return
        except OSError:
            continue
    log.warning("could not write the shard index cache to %s; the next start scans the shards again",
                " or ".join(map(str, files)))


def load_index(paths: Sequence[Path], cache: str = "") -> ShardIndex:
    """The index of ``paths``: read from the cache (``index_cache_files(paths, cache)``) when one
    matches the shards, else scanned and cached. In a multi-process run rank 0 reads or builds it
    while the other ranks wait at a barrier; then they read the file it wrote (or scan for themselves
    when it could not write one, e.g. a cache folder that is not shared)."""
    paths = [os.fspath(p) for p in paths]
    stamps = shard_stamps(paths)  # before scanning: a shard changed meanwhile makes this cache stale
    files = index_cache_files(paths, cache)
    rank, world = rank_and_world()
    if world > 1 and rank != 0:
        barrier()
        return _read_cached(files, stamps) or index_shards(paths)
    try:
        index = _read_cached(files, stamps)
        if index is None:
            index = index_shards(paths)
            _write_cached(files, index, stamps)
        return index
    finally:
        if world > 1:
            barrier()  # also when indexing failed: the other ranks then fail the same way


_OPEN_SHARDS: "OrderedDict[tuple[int, str], int]" = OrderedDict()
MAX_OPEN_SHARDS = 64
"""File descriptors kept open per process (least recently used closed first), far below ulimit -n."""


def read_range(path: str, location: tuple[int, int]) -> bytes:
    """``size`` bytes at ``offset`` of ``path`` (``location = (offset, size)``).

    Shard descriptors are cached per process (the pid is part of the key, so a forked worker opens
    its own) in a small LRU, so datasets with thousands of shards do not exhaust descriptors."""
    cache_key = (os.getpid(), path)
    fd = _OPEN_SHARDS.get(cache_key)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        _OPEN_SHARDS[cache_key] = fd
        while len(_OPEN_SHARDS) > MAX_OPEN_SHARDS:
            _, old = _OPEN_SHARDS.popitem(last=False)
            os.close(old)  # an inherited descriptor (owner != pid) is this process's copy: closing it is safe
    else:
        _OPEN_SHARDS.move_to_end(cache_key)
    offset, size = location
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read in {path} at {offset}: {len(data)} of {size} bytes")
    return data


class ShardWriter:
    """Write samples into ``folder/shard-000000.tar``, ``shard-000001.tar``, ... with at most
    ``shard_size`` samples each.

    Tar headers carry no time or owner (mtime 0, uid/gid 0), so the same samples give byte-identical
    shards. Each shard is written under a temporary name and renamed when complete, so an interrupted
    run never leaves a half shard that looks whole; stale ``shard-*.tar`` files in the folder are
    removed first.
    """

    def __init__(self, folder: Union[str, os.PathLike], shard_size: int = 1000):
        if shard_size <= 0:
            raise ValueError("shard_size must be positive")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob("shard-*.tar"):
            stale.unlink()
        self.shard_size = shard_size
        self.paths: list[Path] = []
        self._archive: Optional[tarfile.TarFile] = None
        self._in_shard = 0

    def _roll(self) -> None:
        self._close_shard()
        path = self.folder / f"shard-{len(self.paths):06d}.tar"
        self.paths.append(path)
        self._archive = tarfile.open(str(path) + ".tmp", mode="w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._archive is not None:
            self._archive.close()
            os.replace(str(self.paths[-1]) + ".tmp", self.paths[-1])
            self._archive = None

    def write(self, key: str, fields: dict[str, Union[bytes, str, dict, list]]) -> None:
        """One sample: ``fields`` maps an extension (``"jpg"``, ``"txt"``, ``"json"``) to bytes, text
        (UTF-8) or a JSON-serialisable value."""
        if "." in key.rpartition("/")[2]:
            raise ValueError(f"sample key must not contain a dot: {key!r}")
        if not is_safe_member_name(key):
            raise ValueError(f"sample key must be a relative path without '..': {key!r}")
        if self._archive is None or self._in_shard == self.shard_size:
            self._roll()
        for extension, value in fields.items():
            if isinstance(value, str):
                payload = value.encode("utf-8")
            elif isinstance(value, (bytes, bytearray)):
                payload = bytes(value)
            else:
                payload = json.dumps(value, sort_keys=True).encode("utf-8")
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            self._archive.addfile(info, io.BytesIO(payload))
        self._in_shard += 1

    def close(self) -> None:
        self._close_shard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        elif self._archive is not None:  # failed mid-shard: drop the partial shard
            self._archive.close()
            os.remove(str(self.paths[-1]) + ".tmp")
            self._archive = None


class ShardSource:
    """Random access to the samples of webdataset shards: ``read(i)`` -> ``RawSample``.

    ``groups`` are the shards' sample ranges, so a sampler can keep reads shard-local. ``index_cache``
    is ``data.index_cache`` (see ``index_cache_files``)."""

    def __init__(self, spec: PathSpec, index_cache: str = ""):
        self.description = spec if isinstance(spec, (str, os.PathLike)) else ", ".join(map(os.fspath, spec))
        self.index = load_index(resolve_shard_paths(spec), index_cache)
        starts = self.index.shard_starts.tolist() + [len(self.index)]
        self.groups = [(a, b) for a, b in zip(starts[:-1], starts[1:]) if b > a]
        self.skipped = Counter(self.index.skipped)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def keys(self) -> list[str]:
        return self.index.keys

    def read(self, i: int, with_meta: bool = False):
        """Image bytes, caption text and (if asked and present) the parsed ``.json`` of sample ``i``.
        A caption that is not valid UTF-8 is decoded with U+FFFD replacement characters and marked
        ``repaired=("non_utf8_caption",)``. Raises OSError / ValueError on unreadable bytes; the
        caller decides what to skip."""
        index = self.index
        path = index.paths[index.shard_of(i)]
        caption, repaired = decode_caption(read_range(path, index.caption(i)))
        image = read_range(path, index.image(i))
        meta = None
        location = index.meta(i) if with_meta else None
        if location is not None:
            meta = json.loads(read_range(path, location))
        return RawSample(index.key(i), image, caption, meta, repaired)

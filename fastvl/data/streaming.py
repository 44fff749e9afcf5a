"""Streaming mode: training shards read front to back, for sources random access cannot serve.

``data.train`` is streamed when it names a ``pipe:`` command, a URL (``http(s)://``, ``s3://``, any
scheme ``webdataset.gopen`` knows), gzip-compressed shards (``.tar.gz`` / ``.tgz``), or when it is a
mixture (``fastvl.data.mixture``; local ``.tar`` sources of a mixture are streamed too). Shard lists
are expanded by webdataset (``expand_urls``: ``{000..099}`` braces, ``::``-separated lists) and each
shard is opened with ``webdataset.gopen`` (curl for http(s), the command for ``pipe:``;
``s3://bucket/key`` is read as ``pipe:aws s3 cp s3://bucket/key -``, webdataset's own convention).

How samples are ordered and split (the design, and why):

* **Readers.** Each rank runs ``max(1, data.num_workers)`` readers, one per DataLoader worker, so
  ``R = world_size * readers`` readers in all; reader ``rank * readers + worker`` owns its shards
  and makes whole batches from them. The DataLoader hands out its workers' batches round-robin, in
  order, so a rank's stream is a pure function of (seed, world size, workers).
* **Shard order.** For epoch ``e`` the shard list is permuted by (seed, source, e), then repeated
  from its start until it has a multiple of ``R`` entries, and reader ``j`` takes entries
  ``j, j + R, ...``. **Uneven shard counts** are handled by this padding: every reader gets exactly
  ``ceil(S / R)`` shards per epoch, so no rank runs out of shards before the others; at most
  ``R - 1`` shards are read twice in an epoch (the first ones of that epoch's permutation,
  different ones each epoch). Shards of unequal size still give readers unequal sample counts,
  so the train stream never ends: an epoch flows into the next (a batch can hold both), every rank
  yields a full batch at every step, and ranks stay in lockstep by steps. ``loader.epoch`` is the
  oldest epoch this rank still has samples of (unread or in a shuffle buffer); since ranks cannot
  agree on it without talking, ``train.max_epochs`` is refused with streamed data on several
  processes (stop by ``train.steps``).
* **Shuffle buffer.** Each reader passes each source's samples through a buffer of
  ``data.shuffle_buffer`` samples (emit a uniformly drawn one, refill from the stream), drawn from a
  generator of (seed, source, reader).
* **Resume.** A batch carries its reader's state after it was made: per source the read position
  (epoch, shard of the reader's list, sample number in that shard), the positions of the buffered
  samples, and the generators' states. The loader keeps the state of each reader's last *consumed*
  batch, so ``state_dict()`` never counts prefetched batches. ``load_state_dict`` re-reads the
  shards the buffered samples came from (usually the last one or two), then continues from the read
  position: the resumed run yields the same samples, crops and flips as a straight one. Resuming
  with another world size, worker count or shard list restarts the recorded epoch (with a warning).
* **Bad input** follows the local mode's rules and counters: a sample group without image or
  caption, with an empty one or an unsafe member name is dropped and counted
  (``shards.sample_problem``); the image and caption checks, decoding and topping up of a batch are
  the local loader's (``_SampleReader``, ``_Collate``). A shard whose data ends mid-archive counts
  one ``truncated_shard`` (its complete samples are kept). A transport failure — the command or curl
  failing (a dropped connection), or no byte for ``data.stream_timeout`` seconds — re-opens the
  shard up to ``data.stream_retries`` times and continues after the last sample read; then the rest
  of the shard is given up and counted as ``unreadable_shard``. Nothing waits forever.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import select
import shlex
import subprocess
import tarfile
import warnings
import zlib
from collections import Counter
from contextlib import closing
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError, RunConfig
from .mixture import SourceMixer, TrainSource, is_mixture, train_sources
from .shards import CAPTION_FIELD, IMAGE_FIELDS, META_FIELD, is_safe_member_name, resolve_shard_paths, \
    sample_problem, split_key
from .source import PathSpec, RawSample, decode_caption

log = logging.getLogger("fastvl.data")

COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")
SHARD_EVENTS = ("truncated_shard", "unreadable_shard")
"""Drop reasons that end a shard rather than drop one sample."""


def is_remote(path: str) -> bool:
    """A ``pipe:`` command or a URL (``scheme://...``), as opposed to a local path."""
    return path.startswith("pipe:") or "://" in path


def _paths(spec: PathSpec) -> list[str]:
    return [os.fspath(spec)] if isinstance(spec, (str, os.PathLike)) else [os.fspath(p) for p in spec]


def needs_streaming(spec: Any) -> bool:
    """Whether ``data.train`` / ``data.eval`` must be streamed: a mixture, a URL or ``pipe:``, or
    gzip-compressed shards (named, or the only shards of a folder)."""
    if is_mixture(spec):
        return True
    if not isinstance(spec, (str, os.PathLike, list, tuple)):
        return False
    for path in _paths(spec):
        if is_remote(path) or path.endswith(COMPRESSED_SUFFIXES):
            return True
        if os.path.isdir(path) and not glob.glob(os.path.join(path, "*.tar")) and any(
                glob.glob(os.path.join(path, "*" + suffix)) for suffix in COMPRESSED_SUFFIXES):
            return True
    return False


def shard_urls(spec: PathSpec) -> list[str]:
    """The shards of a source, in order: URLs and ``pipe:`` commands expanded by webdataset (braces,
    ``::`` lists), local folders (``*.tar``, ``*.tar.gz``, ``*.tgz`` inside), globs, brace patterns
    and files. A ``ConfigError`` names a local path that matches nothing."""
    from webdataset.gopen import gopen_schemes
    from webdataset.shardlists import expand_urls

    urls: list[str] = []
    for path in _paths(spec):
        if is_remote(path):
            scheme = "pipe" if path.startswith("pipe:") else path.split("://", 1)[0]
            if scheme not in gopen_schemes and scheme not in ("s3", "file"):
                raise ConfigError(f"cannot open {path}: no reader for {scheme}:// (known: s3, file, "
                                  f"{', '.join(sorted(k for k in gopen_schemes if not k.startswith('_')))})")
            urls += expand_urls(path)
        elif os.path.isdir(path):
            found = sorted(p for suffix in (".tar",) + COMPRESSED_SUFFIXES
                           for p in glob.glob(os.path.join(path, "*" + suffix)))
            if not found:
                raise ConfigError(f"no *.tar / *.tar.gz shards in data folder: {path}")
            urls += found
        else:
            urls += [os.fspath(p) for p in resolve_shard_paths(path)]
    return urls


def reader_shards(num_shards: int, reader: int, readers: int, seed: int, source: int, epoch: int) -> list[int]:
    """Shard numbers that ``reader`` of ``readers`` reads in ``epoch``, in order: the shards permuted
    by (seed, source, epoch), the permutation repeated from its start to a multiple of ``readers``
    entries, every ``readers``-th entry from ``reader`` on. Every reader gets ``ceil(S / readers)``."""
    order = np.random.default_rng([seed, source, epoch, 0x5EED]).permutation(num_shards)
    per_reader = -(-num_shards // readers)
    return np.resize(order, per_reader * readers)[reader::readers].tolist()


class _ShardStream:
    """A shard's bytes from ``webdataset.gopen``. When it is a subprocess (curl, ``pipe:``, aws) each
    read waits at most ``timeout`` s for data (then the process is killed and ``TimeoutError``
    raised), and its exit status is checked at the end of the data (``OSError`` on failure, so a
    dropped connection is not mistaken for the end of the shard)."""

    def __init__(self, url: str, timeout: float):
        from webdataset.gopen import Pipe, gopen

        if url.startswith("s3://"):
            url = f"pipe:aws s3 cp {shlex.quote(url)} -"
        self.url, self.timeout = url, timeout
        self.stream = gopen(url, "rb")
        self.pipe = self.stream if isinstance(self.stream, Pipe) else None

    def read(self, size: int = -1) -> bytes:
        if self.pipe is None:
            return self.stream.read(size)
        fd = self.pipe.stream.fileno()
        out = bytearray()
        while size < 0 or len(out) < size:
            ready, _, _ = select.select([fd], [], [], self.timeout)
            if not ready:
                self._stop()
                raise TimeoutError(f"no data for {self.timeout:g} s from {self.url}")
            chunk = os.read(fd, 1 << 16 if size < 0 else size - len(out))
            if not chunk:
                if not out:  # the end: hand out what came before it first, then say how it ended
                    try:
                        status = self.pipe.proc.wait(self.timeout)
                    except subprocess.TimeoutExpired:
                        self._stop()
                        raise TimeoutError(f"{self.url}: the command did not exit {self.timeout:g} s after its "
                                           f"output ended") from None
                    if status not in self.pipe.ignore_status:
                        raise OSError(f"{self.url}: exit status {status}")
                break
            out += chunk
        return bytes(out)

    def _stop(self) -> None:
        if self.pipe.proc.poll() is None:
            self.pipe.proc.kill()
        self.pipe.proc.wait()

    def close(self) -> None:
        if self.pipe is None:
            self.stream.close()
            return
        self._stop()
        self.pipe.stream.close()  # closed: webdataset's Pipe.__del__ does not wait on it again


def _sample(key: str, members: dict[str, bytes], safe: bool) -> Union[RawSample, str]:
    """One sample group -> a ``RawSample``, or why it is dropped (the local mode's reasons)."""
    problem = sample_problem({name: len(data) for name, data in members.items()}, safe)
    if problem is not None:
        return problem
    caption, repaired = decode_caption(members[CAPTION_FIELD])
    meta = None
    if META_FIELD in members:
        try:
            meta = json.loads(members[META_FIELD])
        except ValueError:
            return "unreadable_sample"
    image = next(members[name] for name in IMAGE_FIELDS if name in members)
    return RawSample(key, image, caption, meta, repaired)


def read_shard(url: str, timeout: float) -> Iterator[Union[RawSample, str]]:
    """The sample groups of one shard in order (members through webdataset's tar iterator, grouped
    by key as ``shards.split_key`` does): a ``RawSample`` or a drop reason each; ``truncated_shard``
    last when the data ends mid-archive (after the last group when it is complete, else after a
    ``truncated_sample``). Transport failures raise ``OSError`` / ``TimeoutError``."""
    from webdataset.tariterators import tar_file_iterator

    stream = _ShardStream(url, timeout)
    try:
        key, members, safe, truncated = None, {}, True, False
        try:
            for member in tar_file_iterator(stream):
                name = member["fname"]
                member_key, extension = split_key(name)
                if member_key != key:
                    if key is not None:
                        yield _sample(key, members, safe)
                    key, members, safe = member_key, {}, True
                members[extension] = member["data"]
                safe = safe and is_safe_member_name(name)
        except (tarfile.TarError, EOFError, zlib.error):
            truncated = True
        if key is not None:
            complete = any(f in members for f in IMAGE_FIELDS) and len(members.get(CAPTION_FIELD, b"")) > 0
            yield _sample(key, members, safe) if complete or not truncated else "truncated_sample"
        if truncated:
            yield "truncated_shard"
    finally:
        stream.close()


def shard_items(url: str, start: int, timeout: float, retries: int) -> Iterator[tuple[int, Union[RawSample, str]]]:
    """``(n, sample or drop reason)`` for the sample groups of a shard from number ``start`` on, and
    its shard event if any. A transport failure re-opens the shard up to ``retries`` times and goes
    on after the last group handed out; then ``(n, "unreadable_shard")`` ends it."""
    next_number, failures = start, 0
    while True:
        number = 0
        try:
            with closing(read_shard(url, timeout)) as items:
                for item in items:
                    if isinstance(item, str) and item in SHARD_EVENTS:
                        yield next_number, item
                        return
                    number += 1
                    if number > next_number:
                        yield next_number, item
                        next_number += 1
            return
        except OSError as error:  # TimeoutError is one
            failures += 1
            if failures > retries:
                log.warning("data: giving up shard %s after %d attempts (%s)", url, failures, error)
                yield next_number, "unreadable_shard"
                return
            log.warning("data: shard %s failed (%s); retry %d of %d", url, error, failures, retries)


class _SourceStream:
    """One reader's share of one source: its shards in order, epoch after epoch, through a shuffle
    buffer. ``take()`` -> ``(position, sample)`` with position ``(epoch, shard of the reader's list,
    sample number in the shard)``; drops are counted in ``dropped``."""

    def __init__(self, urls: list[str], source: int, reader: int, readers: int, seed: int, buffer_size: int,
                 timeout: float, retries: int, epoch: int):
        self.urls, self.source, self.reader, self.readers, self.seed = urls, source, reader, readers, seed
        self.buffer_size, self.timeout, self.retries = max(1, buffer_size), timeout, retries
        self.epoch, self.shard, self.sample = epoch, 0, 0
        """Read position: the next sample group to read."""
        self.buffer: list[tuple[tuple[int, int, int], RawSample]] = []
        self.rng = np.random.default_rng([seed, source, reader, 0xB0F])
        self.dropped: Counter = Counter()
        self._items: Optional[Iterator] = None
        self._lists: dict[int, list[int]] = {}
        self._kept_in_epoch, self._empty_epochs = 0, 0

    def shards_of(self, epoch: int) -> list[int]:
        if epoch not in self._lists:  # keep two epochs: the buffer mixes samples across a boundary
            self._lists = {e: shards for e, shards in self._lists.items() if abs(e - epoch) == 1}
            self._lists[epoch] = reader_shards(len(self.urls), self.reader, self.readers, self.seed, self.source, epoch)
        return self._lists[epoch]

    def sample_id(self, position: tuple[int, int, int]) -> int:
        """A number naming the sample (its source, shard and place), for its crop/flip generator."""
        epoch, shard, number = position
        return (((self.source << 24) + self.shards_of(epoch)[shard]) << 32) + number

    def _end_shard(self) -> None:
        if self._items is not None:
            self._items.close()
        self._items, self.shard, self.sample = None, self.shard + 1, 0

    def _read_one(self) -> None:
        """Read until one sample is in the buffer, counting what is dropped on the way."""
        while True:
            shards = self.shards_of(self.epoch)
            if self.shard == len(shards):
                self._empty_epochs = self._empty_epochs + 1 if self._kept_in_epoch == 0 else 0
                if self._empty_epochs >= 2:
                    raise ConfigError(f"data.train: no usable sample in {len(shards)} shard(s) of "
                                      f"{self.urls[shards[0]]} ... (dropped: {dict(self.dropped)})")
                self.epoch, self.shard, self.sample, self._kept_in_epoch = self.epoch + 1, 0, 0, 0
                continue
            if self._items is None:
                self._items = shard_items(self.urls[shards[self.shard]], self.sample, self.timeout, self.retries)
            item = next(self._items, None)
            if item is None:
                self._end_shard()
                continue
            number, sample = item
            if isinstance(sample, str):
                self.dropped[sample] += 1
                if sample in SHARD_EVENTS:
                    self._end_shard()
                else:
                    self.sample = number + 1
                continue
            self.buffer.append(((self.epoch, self.shard, number), sample))
            self.sample = number + 1
            self._kept_in_epoch += 1
            return

    def take(self) -> tuple[tuple[int, int, int], RawSample]:
        while len(self.buffer) < self.buffer_size:
            self._read_one()
        slot = int(self.rng.integers(len(self.buffer)))
        item = self.buffer[slot]
        self.buffer[slot] = self.buffer[-1]
        self.buffer.pop()
        return item

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "shard": self.shard, "sample": self.sample,
                "buffer": [list(position) for position, _ in self.buffer], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: re-read the buffered samples from their shards, then read on from
        the read position."""
        self.epoch, self.shard, self.sample = int(state["epoch"]), int(state["shard"]), int(state["sample"])
        self.rng.bit_generator.state = state["rng"]
        wanted = [tuple(position) for position in state["buffer"]]
        found: dict[tuple[int, int, int], RawSample] = {}
        for epoch, shard in sorted({(e, k) for e, k, _ in wanted}):
            numbers = {n for e, k, n in wanted if (e, k) == (epoch, shard)}
            url = self.urls[self.shards_of(epoch)[shard]]
            with closing(shard_items(url, 0, self.timeout, self.retries)) as items:
                for number, sample in items:
                    if number in numbers and not isinstance(sample, str):
                        found[(epoch, shard, number)] = sample
                    if number >= max(numbers):
                        break
        self.buffer = [(position, found[position]) for position in wanted if position in found]
        if len(self.buffer) < len(wanted):
            log.warning("data: %d buffered sample(s) could not be read again on resume", len(wanted) - len(self.buffer))
        self._kept_in_epoch = 1  # unknown after a restart: never call this epoch empty


class _StreamPlan:
    """What every reader of a rank needs (handed to the DataLoader workers)."""

    def __init__(self, loader: "StreamingLoader", cfg: RunConfig):
        self.urls, self.weights, self.names = loader.urls, loader.weights, loader.names
        self.seed, self.rank, self.world_size = loader.seed, loader.rank, loader.world_size
        self.readers = loader.readers
        self.batch_size, self.buffer_size = cfg.data.batch_size, cfg.data.shuffle_buffer
        self.timeout, self.retries = cfg.data.stream_timeout, cfg.data.stream_retries
        self.sample_reader, self.collate = loader.sample_reader, loader.collate


class _Reader:
    """One reader: its share of every source, the source mixer, whole batches."""

    def __init__(self, plan: _StreamPlan, slot: int, state: Optional[dict], epoch: int):
        self.plan = plan
        reader, readers = plan.rank * plan.readers + slot, plan.world_size * plan.readers
        self.sources = [_SourceStream(urls, i, reader, readers, plan.seed, plan.buffer_size, plan.timeout,
                                      plan.retries, epoch) for i, urls in enumerate(plan.urls)]
        self.mixer = SourceMixer(plan.weights, plan.seed, reader)
        if state is not None:
            for source, source_state in zip(self.sources, state["sources"]):
                source.load_state_dict(source_state)
            self.mixer.load_state_dict(state["mixer"])

    def state_dict(self) -> dict:
        return {"sources": [source.state_dict() for source in self.sources], "mixer": self.mixer.state_dict()}

    def batch(self) -> tuple[Optional[Any], Counter, Counter, dict]:
        """(Batch or None, counts by ``(kind, reason)``, samples drawn per source name, state after)."""
        from .loader import _Skip

        items, drawn = [], Counter()
        for _ in range(self.plan.batch_size):
            index = self.mixer.next()
            source = self.sources[index]
            position, raw = source.take()
            drawn[self.plan.names[index]] += 1
            prepared = self.plan.sample_reader.check(raw, position[0], source.sample_id(position))
            items.append(prepared if isinstance(prepared, _Skip) else self.plan.sample_reader.decode(prepared))
        batch, tally = self.plan.collate(items)
        counts = Counter()
        for (_, kind, reason), n in tally.items():
            counts[(kind, reason)] += n
        for source in self.sources:
            for reason, n in source.dropped.items():
                counts[("skipped", reason)] += n
            source.dropped.clear()
        return batch, counts, drawn, self.state_dict()


class _StreamDataset(IterableDataset):
    """Worker ``w`` runs reader slot ``(first_slot + w) % readers`` (so a resumed rank continues
    with the slot whose batch is due) and yields ``(slot, batch, counts, drawn, state)`` forever."""

    def __init__(self, plan: _StreamPlan, states: list[Optional[dict]], first_slot: int, epoch: int):
        self.plan, self.states, self.first_slot, self.epoch = plan, states, first_slot, epoch

    def __iter__(self):
        info = get_worker_info()
        slot = (self.first_slot + (info.id if info is not None else 0)) % self.plan.readers
        reader = _Reader(self.plan, slot, self.states[slot], self.epoch)
        while True:
            yield (slot, *reader.batch())


def _as_is(item):
    return item


class StreamingLoader:
    """The train loader of streamed sources and mixtures (see the module docstring), with the
    interface of ``loader.Loader``: an infinite iterable of ``Batch``, ``epoch``, ``state_dict`` /
    ``load_state_dict``, ``skipped`` / ``repaired`` counters, ``metrics()``, ``log_metrics()``."""

    def __init__(self, cfg: RunConfig, split: str, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 pin_memory: Optional[bool] = None):
        from .loader import CAPTION_CHARS_PER_TOKEN, _Collate, _SampleReader, _TextEncoder, resolve_decoder
        from .tokenizer import load_tokenizer
        from .transforms import TrainTransform

        if split != "train":
            raise ConfigError(f"data.{split}: streamed sources and mixtures are for training; evaluate from "
                              f"local *.tar shards or an annotation file")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if cfg.train.max_epochs and world_size > 1:
            raise ConfigError("train.max_epochs cannot stop several processes reading streamed data at the "
                              "same step (ranks do not see each other's shard sizes): set train.max_epochs=0 "
                              "and stop by train.steps")
        data = cfg.data
        if resolve_decoder(data.decoder) == "dali":
            log.warning("data.decoder='dali' is not used for streamed data: decoding with Pillow")
        self.split, self.rank, self.world_size, self.seed = split, rank, world_size, cfg.train.seed
        self._cfg = cfg
        self.path = data.train
        sources: list[TrainSource] = train_sources(data.train)
        self.names = [source.name for source in sources]
        self.weights = [source.weight for source in sources]
        self.urls = []
        for source in sources:
            try:
                urls = shard_urls(source.path)
            except ConfigError as error:
                raise ConfigError(f"data.train: {error}") from None
            if not urls:
                raise ConfigError(f"data.train: no shards in {source.path}")
            self.urls.append(urls)
        self.num_workers, self.batch_size = data.num_workers, data.batch_size
        self.readers = max(1, data.num_workers)
        for name, urls in zip(self.names, self.urls):
            if len(urls) < world_size * self.readers:
                log.warning("data.train source %s: %d shard(s) for %d readers (%d ranks x %d workers): readers "
                            "share shards, so samples repeat within an epoch", name, len(urls),
                            world_size * self.readers, world_size, self.readers)
        self.sample_reader = _SampleReader(None, TrainTransform.from_config(data), self.seed,
                                           max_caption_chars=CAPTION_CHARS_PER_TOKEN * data.max_text_len,
                                           captions="draw")
        self.collate = _Collate(_TextEncoder(load_tokenizer(data.tokenizer), data.max_text_len, False), refill=True)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._start_epoch = epoch
        self._states: list[Optional[dict]] = [None] * self.readers
        self._next_slot = 0
        self.skipped: Counter = Counter()
        self.repaired: Counter = Counter()
        self.drawn: Counter = Counter()
        """Samples drawn per source name since the start (skipped ones included)."""
        self._reported_epoch = epoch
        self._reports: list[str] = []
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @property
    def epoch(self) -> int:
        """The oldest epoch this rank still has samples of, read or buffered (over its readers and
        sources): epoch ``e`` is over once every sample of it has been handed out."""
        return min((min([int(source["epoch"])] + [int(position[0]) for position in source["buffer"]])
                    for state in self._states if state is not None for source in state["sources"]),
                   default=self._start_epoch)

    def state_dict(self) -> dict:
        return {"split": self.split, "mode": "stream", "epoch": self.epoch, "seed": self.seed,
                "world_size": self.world_size, "readers": self.readers, "sources": list(self.names),
                "shards": [len(urls) for urls in self.urls], "reader_states": list(self._states),
                "next_slot": self._next_slot, "skipped": dict(self.skipped), "repaired": dict(self.repaired),
                "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last consumed batch of ``state`` (see the module docstring)."""
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"data: resuming with the checkpoint's seed {state['seed']} (config has {self.seed})")
            self.seed = state["seed"]
            self.sample_reader.seed = self.seed
        layout = (state.get("mode"), state.get("world_size"), state.get("readers"), state.get("sources"),
                  state.get("shards"))
        mine = ("stream", self.world_size, self.readers, self.names, [len(urls) for urls in self.urls])
        epoch = int(state.get("epoch", 0))
        if layout != mine:
            warnings.warn(f"data: the checkpoint's stream layout (mode, world size, readers per rank, sources, "
                          f"shard counts) {layout} differs from this run's {mine}; restarting epoch {epoch} "
                          f"from its first shard")
            self._states, self._next_slot, self._start_epoch = [None] * self.readers, 0, epoch
        else:
            self._states, self._next_slot = list(state["reader_states"]), int(state["next_slot"])
            self._start_epoch = epoch
        self._reported_epoch = self.epoch
        self.skipped = Counter(state.get("skipped", {}))
        self.repaired = Counter(state.get("repaired", {}))
        self.drawn = Counter(state.get("drawn", {}))

    def metrics(self) -> dict[str, float]:
        """Cumulative counts: ``data/epoch``, ``data/skipped`` (total) and by reason, ``data/repaired/<reason>``,
        and the ``log_metrics()``."""
        out = {"data/epoch": float(self.epoch), "data/skipped": float(sum(self.skipped.values()))}
        out.update({f"data/skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())})
        out.update({f"data/repaired/{reason}": float(n) for reason, n in sorted(self.repaired.items())})
        return out | self.log_metrics()

    def log_metrics(self) -> dict[str, float]:
        """What the trainer writes into each metrics row: for a mixture, the samples this rank drew
        from each source so far, ``data/source/<name>``."""
        if len(self.names) < 2:
            return {}
        return {f"data/source/{name}": float(self.drawn[name]) for name in self.names}

    def pop_epoch_reports(self) -> list[str]:
        reports, self._reports = self._reports, []
        return reports

    def __iter__(self) -> Iterator:
        dataset = _StreamDataset(_StreamPlan(self, self._cfg), list(self._states), self._next_slot,
                                 self._start_epoch)
        extra = {"prefetch_factor": 2} if self.num_workers > 0 else {}
        for slot, batch, counts, drawn, state in DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                                            collate_fn=_as_is, **extra):
            self._states[slot], self._next_slot = state, (slot + 1) % self.readers
            for (kind, reason), n in counts.items():
                (self.skipped if kind == "skipped" else self.repaired)[reason] += n
            self.drawn.update(drawn)
            self._report_epochs()
            if batch is not None:
                if self.pin_memory and batch.images.device.type == "cpu":
                    batch.images = batch.images.pin_memory()
                yield batch

    def _report_epochs(self) -> None:
        while self._reported_epoch < self.epoch:
            line = (f"data train rank {self.rank}/{self.world_size} epoch {self._reported_epoch} read (streaming); "
                    f"skipped so far {sum(self.skipped.values())}")
            if self.skipped:
                line += " (" + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())) + ")"
            self._reports.append(line)
            log.info(line)
            self._reported_epoch += 1

"""``build_loader``: a data path -> an iterable of ``Batch`` for one rank, with exact resume.

How samples are ordered and split (the design, and why):

* The data is indexed at start-up (``source.open_source``: tar headers or JSONL records), so every
  sample has an integer index and can be fetched on its own. A missing path or an empty dataset
  raises ``ConfigError`` here, before training starts.
* **Train order.** For epoch ``e`` the global order is a pure function of (seed, e): the shards are
  permuted, their samples concatenated, and the stream passed through a shuffle buffer of
  ``data.shuffle_buffer`` samples (the webdataset algorithm, run on indices only) — reads stay
  shard-local while samples mix across shards. JSONL sources are fully permuted.
* **Ranks.** Rank ``r`` of ``W`` takes global positions ``r, r + W, r + 2W, ...`` of the first
  ``floor(N / W) * W`` positions: disjoint, every rank has the same number of samples (so ranks stay
  in lockstep and gathered batches have equal shapes), and at most ``W - 1`` samples per epoch are
  left out — different ones each epoch, since the order is reshuffled. We split samples, not
  shards: a shard split would give ranks unequal sample counts whenever shard sizes differ, and
  with random access there is no read-locality to gain from it. Workers do not own data either:
  the torch ``DataLoader`` hands whole batches to its workers round-robin and returns them in
  order, so the stream does not depend on ``num_workers``.
* **Train is infinite.** Batches are always ``batch_size`` long and run on across epoch boundaries
  (the last batch of an epoch is completed with the start of the next). ``loader.epoch`` /
  ``loader.samples_in_epoch`` say where the next sample comes from; the trainer stops by steps or
  by ``loader.epoch`` (``train.max_epochs``).
* **Resume.** ``state_dict()`` = (epoch, samples this rank consumed in it, seed, world size). After
  ``load_state_dict`` iteration continues with the first unseen sample, with the same augmentation
  it would have had: each sample's crop/flip comes from a generator seeded by (seed, epoch, index).
  Batches prefetched by workers but not yet handed out are not counted. Resuming with another world
  size keeps the global position (exact when it divides evenly).
* **Eval** is one ordered pass (``min(N, eval.max_samples)`` samples; rank ``r`` takes indices
  ``r, r + W, ...``), no shuffling, last batch possibly short, centre crops, and the hard negatives
  of each sample's metadata tokenized into ``Batch.negatives`` when every sample of the batch has all
  three.
* **Bad samples** (unreadable bytes, undecodable image, empty caption) are skipped and counted by
  reason in ``loader.skipped`` (samples dropped at indexing are counted there too). A train batch
  that lost samples is topped up with copies of its good ones, keeping its shape fixed across
  ranks; an eval batch is just shorter.
"""
from __future__ import annotations

import math
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, RunConfig
from .batch import Batch
from .source import open_source
from .tokenizer import encode, load_tokenizer
from .transforms import EvalTransform, TrainTransform, decode_rgb, swap_left_right

NEGATIVE_TYPES = ("relation_swap", "attribute_swap", "shuffle")


def shuffle_buffer_order(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of ``buffer_size`` emits ``stream``: fill the buffer, then
    for each further item emit a uniformly chosen buffered item and put the new one in its place;
    finally emit the rest of the buffer in random order."""
    if buffer_size <= 1 or len(stream) <= 1:
        return stream.copy()
    size = min(buffer_size, len(stream))
    buffer = stream[:size].copy()
    out = np.empty_like(stream)
    slots = rng.integers(0, size, len(stream) - size)
    for position, (item, slot) in enumerate(zip(stream[size:].tolist(), slots.tolist())):
        out[position] = buffer[slot]
        buffer[slot] = item
    out[len(stream) - size:] = rng.permutation(buffer)
    return out


def epoch_order(num_samples: int, groups: Optional[list[tuple[int, int]]], seed: int, epoch: int,
                buffer_size: int) -> np.ndarray:
    """Global training order of epoch ``epoch``: shards (``groups``, contiguous index ranges) in a
    random order, then a shuffle buffer; or a full permutation when ``groups`` is None."""
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if groups is None:
        return rng.permutation(num_samples)
    stream = np.concatenate([np.arange(*groups[g]) for g in rng.permutation(len(groups))])
    return shuffle_buffer_order(stream, buffer_size, rng)


@dataclass
class _Sample:
    key: str
    pixels: torch.Tensor
    caption: str
    negatives: Optional[dict]


@dataclass
class _Skip:
    reason: str


class _SampleDataset(Dataset):
    """Item ``(epoch, index)`` -> a decoded, transformed ``_Sample`` (or a ``_Skip`` with the reason)."""

    def __init__(self, source, transform, seed: int, with_meta: bool):
        self.source, self.transform, self.seed, self.with_meta = source, transform, seed, with_meta

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        try:
            raw = self.source.read(index, self.with_meta)
        except (OSError, ValueError) as error:  # bad bytes, bad UTF-8, bad JSON
            return _Skip("unreadable_sample" if not isinstance(error, UnicodeDecodeError) else "bad_caption")
        caption = raw.caption.strip()
        if not caption:
            return _Skip("empty_caption")
        try:
            image = decode_rgb(raw.image, self.transform.decode_side)
        except Exception:  # Pillow raises many types for corrupt files; none may stop training
            return _Skip("undecodable_image")
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        pixels, flipped = self.transform(image, rng)
        negatives = raw.meta.get("negatives") if isinstance(raw.meta, dict) else None
        if flipped:  # a mirrored image needs mirrored words (see transforms.swap_left_right)
            caption = swap_left_right(caption)
            if isinstance(negatives, dict):
                negatives = {k: swap_left_right(v) if isinstance(v, str) else v for k, v in negatives.items()}
        return _Sample(raw.key, pixels, caption, negatives)


class _Collate:
    """A list of ``_Sample``/``_Skip`` -> ``(Batch or None, Counter of skip reasons)``; tokenizes the
    captions and (when every sample has them) the three negatives in one call, so all share one L."""

    def __init__(self, tokenizer, max_len: int, with_negatives: bool, refill: bool):
        self.tokenizer, self.max_len, self.with_negatives, self.refill = tokenizer, max_len, with_negatives, refill

    def __call__(self, items: list) -> tuple[Optional[Batch], Counter]:
        skipped = Counter(item.reason for item in items if isinstance(item, _Skip))
        good = [item for item in items if isinstance(item, _Sample)]
        if not good:
            return None, skipped
        if self.refill and len(good) < len(items):
            good = (good * math.ceil(len(items) / len(good)))[:len(items)]
        size = len(good)
        texts = [s.caption for s in good]
        has_negatives = self.with_negatives and all(
            isinstance(s.negatives, dict) and all(isinstance(s.negatives.get(t), str) for t in NEGATIVE_TYPES)
            for s in good)
        if has_negatives:
            texts += [s.negatives[t] for t in NEGATIVE_TYPES for s in good]
        input_ids, attention_mask = encode(self.tokenizer, texts, self.max_len)
        negatives = None
        if has_negatives:
            negatives = {t: (input_ids[(k + 1) * size:(k + 2) * size].clone(),
                             attention_mask[(k + 1) * size:(k + 2) * size].clone())
                         for k, t in enumerate(NEGATIVE_TYPES)}
            input_ids, attention_mask = input_ids[:size].clone(), attention_mask[:size].clone()
        images = torch.stack([s.pixels for s in good])
        return Batch(images, input_ids, attention_mask, [s.key for s in good], negatives), skipped


class _TrainBatches:
    """Infinite batch sampler: lists of ``(epoch, index)`` for one rank from a start position on."""

    def __init__(self, loader: "Loader", epoch: int, offset: int):
        self.loader, self.epoch, self.offset = loader, epoch, offset

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, offset, size = self.epoch, self.offset, self.loader.batch_size
        order = self.loader.rank_order(epoch)
        while True:
            batch: list[tuple[int, int]] = []
            while len(batch) < size:
                if offset == len(order):
                    epoch, offset = epoch + 1, 0
                    order = self.loader.rank_order(epoch)
                take = min(size - len(batch), len(order) - offset)
                batch += [(epoch, i) for i in order[offset:offset + take].tolist()]
                offset += take
            yield batch


class Loader:
    """Iterable of ``Batch`` for one rank of one split (see the module docstring). Build it with
    ``build_loader``."""

    def __init__(self, cfg: RunConfig, split: str, rank: int = 0, world_size: int = 1, epoch: int = 0,
                 max_samples: Optional[int] = None, with_negatives: Optional[bool] = None,
                 pin_memory: Optional[bool] = None):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        data = cfg.data
        if data.decoder != "pillow":
            raise ConfigError(f"data.decoder='{data.decoder}' is not available yet; use 'pillow'")
        self.split, self.rank, self.world_size = split, rank, world_size
        self.path = data.train if split == "train" else data.eval
        where = f"data.{split}"
        if not self.path:
            raise ConfigError(f"{where} is empty: name a folder/glob of *.tar shards or a .jsonl file")
        try:
            self.source = open_source(self.path)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        self.batch_size, self.num_workers = data.batch_size, data.num_workers
        self.max_text_len, self.shuffle_buffer = data.max_text_len, data.shuffle_buffer
        self.seed = cfg.train.seed
        self.tokenizer = load_tokenizer(data.tokenizer)
        self.skipped: Counter = Counter(self.source.skipped)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        if data.image_size <= 0:
            raise ConfigError("data.image_size must be set (RunConfig takes it from the model preset)")
        train = split == "train"
        transform = TrainTransform(data.image_size) if train else EvalTransform(data.image_size)
        with_negatives = (not train) if with_negatives is None else with_negatives
        self._dataset = _SampleDataset(self.source, transform, self.seed, with_meta=with_negatives)
        self._collate = _Collate(self.tokenizer, data.max_text_len, with_negatives, refill=train)
        if train:
            self.num_samples = len(self.source)
            self.samples_per_epoch = self.num_samples // world_size
            if self.samples_per_epoch == 0:
                raise ConfigError(f"{where}: {self.num_samples} samples in {self.path} cannot feed {world_size} ranks")
        else:
            limit = cfg.eval.max_samples if max_samples is None else max_samples
            self.num_samples = min(len(self.source), limit) if limit and limit > 0 else len(self.source)
            self.samples_per_epoch = len(range(rank, self.num_samples, world_size))
        self._epoch, self._offset = epoch, 0
        self._orders: dict[int, np.ndarray] = {}
        if self.num_workers > 0:
            # the Rust tokenizer's own thread pool does not survive fork; workers are the parallelism
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    # ---- position -------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epoch of the next sample this rank will read."""
        return self._epoch

    @property
    def samples_in_epoch(self) -> int:
        """Samples of the current epoch this rank has consumed (handed out in batches)."""
        return self._offset

    @property
    def samples_seen(self) -> int:
        """Samples this rank consumed since epoch 0 (``epoch * samples_per_epoch + samples_in_epoch``)."""
        return self._epoch * self.samples_per_epoch + self._offset

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch / self.batch_size)

    def rank_order(self, epoch: int) -> np.ndarray:
        """Sample indices this rank reads in ``epoch``, in order."""
        if self.split == "eval":
            return np.arange(self.rank, self.num_samples, self.world_size)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.num_samples, self.source.groups, self.seed, epoch,
                                               self.shuffle_buffer)}
        usable = self.samples_per_epoch * self.world_size
        return self._orders[epoch][:usable][self.rank::self.world_size]

    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self._epoch, "samples_in_epoch": self._offset,
                "world_size": self.world_size, "seed": self.seed, "num_samples": self.num_samples,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last consumed sample of ``state`` (see the module docstring)."""
        if self.split != "train":
            return
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"data: resuming with the checkpoint's seed {state['seed']} (config has {self.seed})")
            self.seed = state["seed"]
            self._dataset.seed = self.seed
            self._orders = {}
        epoch, offset = int(state["epoch"]), int(state["samples_in_epoch"])
        if state.get("num_samples", self.num_samples) != self.num_samples:
            warnings.warn(f"data: {self.path} has {self.num_samples} samples, the checkpoint saw "
                          f"{state['num_samples']}; restarting epoch {epoch} from its first sample")
            offset = 0
        old_world = int(state.get("world_size", self.world_size))
        offset = min(offset * old_world // self.world_size, self.samples_per_epoch)
        if offset == self.samples_per_epoch:
            epoch, offset = epoch + 1, 0
        self._epoch, self._offset = epoch, offset
        self.skipped = Counter(state.get("skipped", {}))

    # ---- iteration ------------------------------------------------------------------------

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train loader is infinite; see batches_per_epoch")
        return self.batches_per_epoch

    def _torch_loader(self, batch_sampler) -> DataLoader:
        extra = {"prefetch_factor": 2} if self.num_workers > 0 else {}
        return DataLoader(self._dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          collate_fn=self._collate, **extra)

    def __iter__(self) -> Iterator[Batch]:
        if self.split == "eval":
            order = self.rank_order(0).tolist()
            batches = [[(0, i) for i in order[s:s + self.batch_size]] for s in range(0, len(order), self.batch_size)]
            for batch, skipped in self._torch_loader(batches):
                self.skipped.update(skipped)
                if batch is not None:
                    yield self._pin(batch)
            return
        for batch, skipped in self._torch_loader(_TrainBatches(self, self._epoch, self._offset)):
            self._offset += self.batch_size
            while self._offset >= self.samples_per_epoch:
                self._epoch, self._offset = self._epoch + 1, self._offset - self.samples_per_epoch
            self.skipped.update(skipped)
            if batch is not None:
                yield self._pin(batch)

    def _pin(self, batch: Batch) -> Batch:
        if self.pin_memory:
            batch.images = batch.images.pin_memory()
        return batch


def build_loader(cfg: RunConfig, split: str, rank: int = 0, world_size: int = 1, epoch: int = 0, *,
                 max_samples: Optional[int] = None, with_negatives: Optional[bool] = None) -> Loader:
    """The ``Batch`` iterable of ``split`` ("train": ``cfg.data.train``, shuffled, augmented, infinite;
    "eval": ``cfg.data.eval``, ordered, one pass of at most ``max_samples`` (default
    ``cfg.eval.max_samples``), with hard negatives) for ``rank`` of ``world_size``, starting at
    ``epoch``. Raises ``ConfigError`` for a missing path or an empty dataset."""
    return Loader(cfg, split, rank, world_size, epoch, max_samples=max_samples, with_negatives=with_negatives)

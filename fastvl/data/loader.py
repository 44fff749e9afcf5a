"""``build_loader``: a data path -> an iterable of ``Batch`` for one rank, with exact resume.

How samples are ordered and split (the design, and why):

* The data is indexed at start-up (``source.open_source``: tar headers or JSONL records), so every
  sample has an integer index and can be fetched on its own. A missing path or an empty dataset
  raises ``ConfigError`` here, before training starts. (Sources that cannot be indexed — URLs,
  ``pipe:`` commands, ``.tar.gz`` — and mixtures are streamed instead: ``fastvl.data.streaming``.)
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
  it would have had: each sample's crop, flip and RandAugment ops come from a generator seeded by
  (seed, epoch, index). Batches prefetched by workers but not yet handed out are not counted.
  Resuming with another world size ``M`` keeps the global position ``P`` (samples of the epoch's
  order consumed by all ranks together): rank ``r`` continues at ``P + r, P + r + M, ...``. That
  is exact whenever ``M`` divides ``P``, which holds when the global batch is unchanged and ``P`` is
  a step boundary; otherwise the last ``P mod M`` samples are read again, with a warning. Where each
  epoch ends also depends on the world size (its first ``floor(N / M) * M`` positions), so a
  different remainder is warned about too.
* **Eval** is one ordered pass (every sample, or the first ``eval.max_samples`` when that is
  positive; rank ``r`` takes indices ``r, r + W, ...``), no shuffling, last batch possibly short,
  the ``eval.resize`` transform (default: the whole image resized to a square, as ALBEF tests), and
  the hard negatives of each sample's metadata tokenized into ``Batch.negatives`` when every sample
  of the batch has all three.
* **Several captions per image** (``source``: annotation records with a caption list, shards with
  ``"captions"`` in their metadata). Training reads annotation files one sample per (image, caption)
  pair, as ALBEF does; a multi-caption shard sample is one image, and each visit draws one of its
  captions from the sample's generator (after its crop, flip and ops, so single-caption data keeps
  its augmentations). Eval takes each image's first caption, or with ``all_captions`` all of them in an
  ``EvalBatch`` (retrieval: ``fastvl.eval.retrieval``).
* **Decoders.** ``data.decoder="pillow"``: a torch ``DataLoader`` whose ``num_workers`` processes
  decode with Pillow and transform with torch ops. ``data.decoder="dali"``: an NVIDIA DALI pipeline
  with ``num_workers`` threads (at least one) decodes, crops, resizes and flips (``fastvl.data.dali``;
  nvJPEG when CUDA is present, and then ``Batch.images`` arrive on the current CUDA device), and the
  loader applies RandAugment and normalises with the Pillow path's torch code. Either way the Python
  side reads the samples in the order above, checks them and draws each crop/flip (and RandAugment
  ops, ``data.rand_augment``) from the same per-sample generator, so both decoders give the same
  batches (keys, captions, crops, flips, ops; pixels within resampling differences) and the same
  resume. When DALI is not importable, "dali" falls back to Pillow with a one-line warning.
* **Bad samples** are skipped and counted by reason, checked before any decoding
  (``images.probe_image``: empty, truncated, corrupt header, unknown format, more than
  ``images.MAX_IMAGE_PIXELS`` pixels) or after (``undecodable_image``, ``unreadable_sample``,
  ``empty_caption``); samples dropped while indexing (missing caption/image, unsafe member name,
  truncated shard) are counted too. Captions are never skipped for length (the tokenizer truncates
  to ``data.max_text_len``; text beyond ``CAPTION_CHARS_PER_TOKEN * max_text_len`` characters is cut
  first so a huge caption costs nothing) nor for bad UTF-8 (decoded with replacement, counted as
  *repaired*). A train batch that lost samples is topped up with copies of its good ones, keeping
  its shape fixed across ranks; an eval batch is just shorter.
* **Reporting.** ``loader.skipped`` / ``loader.repaired`` count by reason since the start (in the
  checkpoint); ``loader.metrics()`` gives them as flat ``data/...`` scalars for the metrics log; at
  the end of each epoch (train) or pass (eval) one line per rank is logged (logger
  ``fastvl.data``) and queued for ``loader.pop_epoch_reports()``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError, RunConfig
from .batch import Batch
from .images import BadImage, ImageHeader, dali_decodes_directly, decode_rgb, encode_ppm, probe_image
from .source import RawSample, open_source, sample_captions, sample_image_id
from .tokenizer import encode, load_tokenizer
from .transforms import CropPlan, EvalTransform, TrainTransform, finish_batch, swap_left_right

NEGATIVE_TYPES = ("relation_swap", "attribute_swap", "shuffle")
CAPTION_CHARS_PER_TOKEN = 64
"""Captions are cut (at a space) to this many characters per token of ``data.max_text_len`` before
tokenizing: the tokenizer truncates anyway, and a WordPiece token spans far fewer characters."""

log = logging.getLogger("fastvl.data")


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


def clean_caption(text: str, max_chars: int) -> str:
    """Strip ``text`` and cut it to at most ``max_chars`` characters, at the last space if there is
    one (so no word is split)."""
    text = text.strip()
    if len(text) > max_chars:
        cut = text.rfind(" ", 0, max_chars + 1)
        text = text[:cut if cut > 0 else max_chars].rstrip()
    return text


Tally = Counter
"""Counts keyed by ``(epoch, kind, reason)``, kind "skipped" or "repaired"."""


@dataclass
class _Skip:
    epoch: int
    reason: str


@dataclass
class EvalBatch(Batch):
    """An eval batch of B images with any number of captions each: ``input_ids`` / ``attention_mask``
    hold the T >= B captions of all of them, image by image; ``negatives`` stay one row per image.
    ``len`` counts captions; ``Batch.slice`` does not apply (it would cut images and captions at the
    same rows)."""

    caption_rows: Optional[torch.Tensor] = None
    """[T] batch row (image) of each caption."""
    image_ids: list[Optional[str]] = field(default_factory=list)
    """Per image: its ``image_id`` (images sharing one are the same image), or None."""

    def to(self, device, non_blocking: bool = False) -> "EvalBatch":
        moved = super().to(device, non_blocking)
        return EvalBatch(**vars(moved), caption_rows=self.caption_rows, image_ids=list(self.image_ids))


@dataclass
class _Prepared:
    """A sample read, checked and planned, not decoded yet."""

    epoch: int
    index: int
    key: str
    data: bytes
    header: ImageHeader
    plan: CropPlan
    captions: tuple[str, ...]
    negatives: Optional[dict]
    repaired: tuple[str, ...]
    image_id: Optional[str] = None


@dataclass
class _Sample:
    """A decoded, transformed sample (the Pillow path)."""

    key: str
    pixels: torch.Tensor
    captions: tuple[str, ...]
    negatives: Optional[dict]
    epoch: int = 0
    repaired: tuple[str, ...] = ()
    image_id: Optional[str] = None


def _tally(items: Iterable[Union[_Skip, _Sample, _Prepared]]) -> Tally:
    tally = Tally()
    for item in items:
        if isinstance(item, _Skip):
            tally[(item.epoch, "skipped", item.reason)] += 1
        else:
            for reason in item.repaired:
                tally[(item.epoch, "repaired", reason)] += 1
    return tally


def _refill(good: list, size: int) -> list:
    """Top ``good`` up to ``size`` items with copies of itself, in order."""
    return (good * math.ceil(size / len(good)))[:size] if len(good) < size else good


class _SampleReader:
    """The Python side of both decoders: ``prepare`` reads sample ``(epoch, index)``, checks its caption
    and image header and draws its crop/flip; ``decode`` finishes it with Pillow; ``for_dali`` turns it
    into what the DALI pipeline takes."""

    def __init__(self, source, transform, seed: int, max_caption_chars: int, captions: str):
        self.source, self.transform, self.seed = source, transform, seed
        self.max_caption_chars = max_caption_chars
        self.captions = captions
        """Which of a sample's captions it keeps: "all", "first" or "draw" (one, from its generator)."""

    def prepare(self, epoch: int, index: int) -> Union[_Prepared, _Skip]:
        try:
            # with the metadata: it may hold the captions and image id (multi-caption shards)
            raw = self.source.read(index, with_meta=True)
        except (OSError, ValueError):  # bytes gone or short (a shard changed after indexing), bad JSON
            return _Skip(epoch, "unreadable_sample")
        return self.check(raw, epoch, index)

    def check(self, raw: RawSample, epoch: int, index: int) -> Union[_Prepared, _Skip]:
        """``prepare`` of a sample already read (the streaming reader reads its own): caption and
        image header checks, crop/flip and caption draw from the generator of (seed, epoch, index)."""
        captions = [clean_caption(c, self.max_caption_chars) for c in sample_captions(raw)]
        captions = [c for c in captions if c]
        if not captions:
            return _Skip(epoch, "empty_caption")
        try:
            header = probe_image(raw.image)
        except BadImage as error:
            return _Skip(epoch, error.reason)
        rng = random.Random(f"{self.seed}:{epoch}:{index}")
        plan = self.transform.plan(header.height, header.width, rng)
        if self.captions == "first" or (self.captions == "draw" and len(captions) == 1):
            captions = captions[:1]
        elif self.captions == "draw":
            captions = [captions[rng.randrange(len(captions))]]
        negatives = raw.meta.get("negatives") if isinstance(raw.meta, dict) else None
        if isinstance(negatives, dict):
            negatives = {k: clean_caption(v, self.max_caption_chars) if isinstance(v, str) else v
                         for k, v in negatives.items()}
        if plan.flipped:  # a mirrored image needs mirrored words (see transforms.swap_left_right)
            captions = [swap_left_right(c) for c in captions]
            if isinstance(negatives, dict):
                negatives = {k: swap_left_right(v) if isinstance(v, str) else v for k, v in negatives.items()}
        return _Prepared(epoch, index, raw.key, raw.image, header, plan, tuple(captions), negatives, raw.repaired,
                         sample_image_id(raw))

    def _decode(self, prepared: _Prepared) -> torch.Tensor:
        return decode_rgb(prepared.data, self.transform.decode_side, prepared.header)

    def decode(self, prepared: _Prepared) -> Union[_Sample, _Skip]:
        try:
            image = self._decode(prepared)
        except Exception:  # Pillow raises many types for corrupt files; none may stop training
            return _Skip(prepared.epoch, "undecodable_image")
        pixels = self.transform.apply(image, prepared.plan)
        return _Sample(prepared.key, pixels, prepared.captions, prepared.negatives, prepared.epoch, prepared.repaired,
                       prepared.image_id)

    def for_dali(self, prepared: _Prepared):
        """A ``dali.DaliSample``: the stored bytes when DALI decodes them like Pillow, else a PPM of the
        Pillow decode (transparency, rare formats, DCT-scaled huge JPEGs); or a ``_Skip``."""
        from .dali import DaliSample

        header = prepared.header
        if dali_decodes_directly(header):
            box = prepared.plan.box_for(header.height, header.width)
            return DaliSample(prepared.data, box, prepared.plan.flipped, prepared.index)
        try:
            image = self._decode(prepared)
        except Exception:
            return _Skip(prepared.epoch, "undecodable_image")
        box = prepared.plan.box_for(image.shape[1], image.shape[2])
        return DaliSample(encode_ppm(image), box, prepared.plan.flipped, prepared.index)


class _SampleDataset(Dataset):
    """Item ``(epoch, index)`` -> a decoded, transformed ``_Sample`` (or a ``_Skip`` with the reason)."""

    def __init__(self, reader: _SampleReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader.source)

    def __getitem__(self, item: tuple[int, int]):
        prepared = self.reader.prepare(*item)
        return prepared if isinstance(prepared, _Skip) else self.reader.decode(prepared)


class _TextEncoder:
    """Captions (and, when every sample has them, the three negatives) of a list of samples ->
    ``Batch`` text fields, tokenized in one call so all share one length L; an ``EvalBatch`` when
    ``all_captions`` (samples then carry any number of captions)."""

    def __init__(self, tokenizer, max_len: int, with_negatives: bool, all_captions: bool = False):
        self.tokenizer, self.max_len, self.with_negatives = tokenizer, max_len, with_negatives
        self.all_captions = all_captions

    def batch(self, samples: list, images: torch.Tensor) -> Batch:
        size = len(samples)
        texts = [caption for s in samples for caption in s.captions]
        captions = len(texts)
        has_negatives = self.with_negatives and all(
            isinstance(s.negatives, dict) and all(isinstance(s.negatives.get(t), str) for t in NEGATIVE_TYPES)
            for s in samples)
        if has_negatives:
            texts += [s.negatives[t] for t in NEGATIVE_TYPES for s in samples]
        input_ids, attention_mask = encode(self.tokenizer, texts, self.max_len)
        negatives = None
        if has_negatives:
            negatives = {t: (input_ids[captions + k * size:captions + (k + 1) * size].clone(),
                             attention_mask[captions + k * size:captions + (k + 1) * size].clone())
                         for k, t in enumerate(NEGATIVE_TYPES)}
            input_ids, attention_mask = input_ids[:captions].clone(), attention_mask[:captions].clone()
        keys = [s.key for s in samples]
        if not self.all_captions:
            return Batch(images, input_ids, attention_mask, keys, negatives)
        rows = torch.repeat_interleave(torch.arange(size), torch.tensor([len(s.captions) for s in samples]))
        return EvalBatch(images, input_ids, attention_mask, keys, negatives, caption_rows=rows,
                         image_ids=[s.image_id for s in samples])


class _Collate:
    """A list of ``_Sample``/``_Skip`` -> ``(Batch or None, Tally)`` (the Pillow path)."""

    def __init__(self, text: _TextEncoder, refill: bool):
        self.text, self.refill = text, refill

    def __call__(self, items: list) -> tuple[Optional[Batch], Tally]:
        tally = _tally(items)
        good = [item for item in items if isinstance(item, _Sample)]
        if not good:
            return None, tally
        if self.refill:
            good = _refill(good, len(items))
        return self.text.batch(good, torch.stack([s.pixels for s in good])), tally


@dataclass
class _DaliStep:
    """One sampler batch, prepared for DALI: ``samples[i]`` is the decodable form of ``prepared[i]``
    (train batches already topped up to full size; the first ``unique`` entries are distinct)."""

    size: int
    prepared: list = field(default_factory=list)
    samples: list = field(default_factory=list)
    unique: int = 0
    tally: Tally = field(default_factory=Tally)


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
                 pin_memory: Optional[bool] = None, all_captions: bool = False):
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        data = cfg.data
        self.decoder = resolve_decoder(data.decoder)
        self.split, self.rank, self.world_size = split, rank, world_size
        self.path = data.train if split == "train" else data.eval
        where = f"data.{split}"
        if not self.path:
            raise ConfigError(f"{where} is empty: name a folder/glob of *.tar shards or a .jsonl file")
        try:
            self.source = open_source(self.path, data.image_root, per_caption=split == "train",
                                      index_cache=data.index_cache)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        self.batch_size, self.num_workers = data.batch_size, data.num_workers
        self.max_text_len, self.shuffle_buffer = data.max_text_len, data.shuffle_buffer
        self.image_size = data.image_size
        self.seed = cfg.train.seed
        self.tokenizer = load_tokenizer(data.tokenizer)
        self.skipped: Counter = Counter(self.source.skipped)
        """Samples skipped so far by reason, including those dropped while indexing."""
        self.repaired: Counter = Counter()
        """Samples used after a repair, by reason (``non_utf8_caption``)."""
        self.indexing_skipped: Counter = Counter(self.source.skipped)
        self._epoch_counts: defaultdict[int, Counter] = defaultdict(Counter)
        self._reports: list[str] = []
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        if data.image_size <= 0:
            raise ConfigError("data.image_size must be set (RunConfig takes it from the model preset)")
        train = split == "train"
        if all_captions and train:
            raise ValueError("all_captions is for the eval split")
        transform = TrainTransform.from_config(data) if train else EvalTransform(data.image_size, cfg.eval.resize)
        with_negatives = (not train) if with_negatives is None else with_negatives
        self._reader = _SampleReader(self.source, transform, self.seed,
                                     max_caption_chars=CAPTION_CHARS_PER_TOKEN * data.max_text_len,
                                     captions="draw" if train else "all" if all_captions else "first")
        self._dataset = _SampleDataset(self._reader)
        self._text = _TextEncoder(self.tokenizer, data.max_text_len, with_negatives, all_captions)
        self._collate = _Collate(self._text, refill=train)
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
        if self.num_workers > 0 and self.decoder == "pillow":
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
        counts = self._epoch_counts.get(self._epoch, Counter())
        return {"split": self.split, "epoch": self._epoch, "samples_in_epoch": self._offset,
                "world_size": self.world_size, "rank": self.rank, "seed": self.seed, "num_samples": self.num_samples,
                "skipped": dict(self.skipped), "repaired": dict(self.repaired),
                "epoch_counts": {f"{kind}/{reason}": n for (kind, reason), n in counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last consumed sample of ``state`` (see the module docstring)."""
        if self.split != "train":
            return
        if state.get("seed", self.seed) != self.seed:
            warnings.warn(f"data: resuming with the checkpoint's seed {state['seed']} (config has {self.seed})")
            self.seed = state["seed"]
            self._reader.seed = self.seed
            self._orders = {}
        epoch, offset = int(state["epoch"]), int(state["samples_in_epoch"])
        if state.get("num_samples", self.num_samples) != self.num_samples:
            warnings.warn(f"data: {self.path} has {self.num_samples} samples, the checkpoint saw "
                          f"{state['num_samples']}; restarting epoch {epoch} from its first sample")
            offset = 0
        old_world = int(state.get("world_size", self.world_size))
        if old_world != self.world_size:
            offset = self._position_on_new_world(epoch, offset, old_world)
        if offset >= self.samples_per_epoch:
            epoch, offset = epoch + 1, 0
        self._epoch, self._offset = epoch, offset
        own = state.get("rank", self.rank) == self.rank  # counts of another rank are not this rank's
        self.skipped = Counter(state.get("skipped", {}) if own else self.indexing_skipped)
        self.repaired = Counter(state.get("repaired", {}) if own else {})
        self._epoch_counts = defaultdict(Counter)
        for name, n in (state.get("epoch_counts", {}) if own else {}).items():
            kind, _, reason = name.partition("/")
            self._epoch_counts[epoch][(kind, reason)] = n

    def _position_on_new_world(self, epoch: int, offset: int, old_world: int) -> int:
        """This rank's offset in ``epoch`` after ``old_world`` ranks consumed ``offset`` samples each:
        the same global position ``offset * old_world`` of the epoch's order, split over this world
        size. Exact when this world size divides it (always when the global batch is unchanged and
        the epoch has not turned over since a step boundary); otherwise the last positions are read
        again, with a warning, as are changes to where the epoch ends."""
        consumed = offset * old_world
        new_offset, again = divmod(consumed, self.world_size)
        changes = []
        if again:
            changes.append(f"{self.world_size} ranks cannot split the {consumed} samples consumed so far evenly, so "
                           f"the last {again} of them are read again")
        old_usable = self.num_samples // old_world * old_world
        if old_usable != self.samples_per_epoch * self.world_size:
            changes.append(f"each epoch now ends after {self.samples_per_epoch * self.world_size} instead of "
                           f"{old_usable} of its {self.num_samples} samples (a multiple of the world size)")
        message = (f"data: resuming the position of {old_world} ranks on {self.world_size}: global sample "
                   f"{consumed} of epoch {epoch}")
        if self.rank == 0:  # every rank computes the same; one says it
            if changes:
                warnings.warn(f"{message}; " + "; ".join(changes))
            else:
                log.info("%s (exact)", message)
        return new_offset

    # ---- reporting ------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """Cumulative counts for the metrics log: ``data/skipped`` (total), ``data/skipped/<reason>``,
        ``data/repaired/<reason>``, and ``data/epoch`` (epoch of the next sample)."""
        out = {"data/epoch": float(self._epoch), "data/skipped": float(sum(self.skipped.values()))}
        out.update({f"data/skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())})
        out.update({f"data/repaired/{reason}": float(n) for reason, n in sorted(self.repaired.items())})
        return out

    def pop_epoch_reports(self) -> list[str]:
        """The one-line summaries of the epochs (train) or passes (eval) this rank finished since the
        last call, oldest first; each is also logged at INFO on the ``fastvl.data`` logger."""
        reports, self._reports = self._reports, []
        return reports

    @staticmethod
    def _format_counts(counts: Counter) -> str:
        return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def _account(self, tally: Tally) -> None:
        for (epoch, kind, reason), n in tally.items():
            (self.skipped if kind == "skipped" else self.repaired)[reason] += n
            self._epoch_counts[epoch][(kind, reason)] += n

    def _finish_epoch(self, epoch: int) -> None:
        counts = self._epoch_counts.pop(epoch, Counter())
        skipped = Counter({reason: n for (kind, reason), n in counts.items() if kind == "skipped"})
        repaired = Counter({reason: n for (kind, reason), n in counts.items() if kind == "repaired"})
        what = f"epoch {epoch}" if self.split == "train" else "pass"
        line = (f"data {self.split} rank {self.rank}/{self.world_size} {what} done: {self.samples_per_epoch} samples, "
                f"skipped {sum(skipped.values())}")
        if skipped:
            line += f" ({self._format_counts(skipped)})"
        if repaired:
            line += f", repaired {sum(repaired.values())} ({self._format_counts(repaired)})"
        if self.indexing_skipped:
            line += f"; dropped while indexing: {self._format_counts(self.indexing_skipped)}"
        self._reports.append(line)
        log.info(line)

    # ---- iteration ------------------------------------------------------------------------

    def __len__(self) -> int:
        if self.split == "train":
            raise TypeError("the train loader is infinite; see batches_per_epoch")
        return self.batches_per_epoch

    def _torch_loader(self, batch_sampler) -> Iterator[tuple[Optional[Batch], Tally]]:
        extra = {"prefetch_factor": 2} if self.num_workers > 0 else {}
        return iter(DataLoader(self._dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                               collate_fn=self._collate, **extra))

    def _dali_step(self, items: list[tuple[int, int]]) -> _DaliStep:
        """Read, check and plan one sampler batch for the DALI pipeline (runs in its input callback)."""
        step = _DaliStep(size=len(items))
        kept, skips = [], []
        for epoch, index in items:
            prepared = self._reader.prepare(epoch, index)
            sample = prepared if isinstance(prepared, _Skip) else self._reader.for_dali(prepared)
            if isinstance(sample, _Skip):
                skips.append(sample)
            else:
                kept.append((prepared, sample))
        step.tally = _tally(skips + [prepared for prepared, _ in kept])
        step.unique = len(kept)
        if kept and self.split == "train":
            kept = _refill(kept, len(items))
        step.prepared = [prepared for prepared, _ in kept]
        step.samples = [sample for _, sample in kept]
        return step

    def _dali_fallback(self, step: _DaliStep) -> tuple[Optional[Batch], Tally]:
        """A batch DALI failed on: decode its distinct samples with Pillow, skipping what fails."""
        decoded = [self._reader.decode(prepared) for prepared in step.prepared[:step.unique]]
        tally = step.tally + _tally(item for item in decoded if isinstance(item, _Skip))
        good = [item for item in decoded if isinstance(item, _Sample)]
        if not good:
            return None, tally
        if self.split == "train":
            good = _refill(good, step.size)
        return self._text.batch(good, torch.stack([s.pixels for s in good])), tally

    def _dali_loader(self, batch_sampler: Iterable[list[tuple[int, int]]]) -> Iterator[tuple[Optional[Batch], Tally]]:
        from .dali import FAILED, DaliStream, default_device_id

        stream = DaliStream((self._dali_step(items) for items in batch_sampler), batch_size=self.batch_size,
                            image_size=self.image_size, num_threads=max(1, self.num_workers),
                            device_id=default_device_id(), seed=self.seed)
        for step, images in stream:
            if images is None:
                yield None, step.tally
            elif isinstance(images, str) and images == FAILED:
                yield self._dali_fallback(step)
            else:
                images = finish_batch(images, [prepared.plan for prepared in step.prepared])
                yield self._text.batch(step.prepared, images), step.tally

    def _batches(self, batch_sampler) -> Iterator[tuple[Optional[Batch], Tally]]:
        if self.decoder == "dali":
            return self._dali_loader(batch_sampler)
        return self._torch_loader(batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        if self.split == "eval":
            order = self.rank_order(0).tolist()
            batches = [[(0, i) for i in order[s:s + self.batch_size]] for s in range(0, len(order), self.batch_size)]
            for batch, tally in self._batches(batches):
                self._account(tally)
                if batch is not None:
                    yield self._pin(batch)
            self._finish_epoch(0)
            return
        for batch, tally in self._batches(_TrainBatches(self, self._epoch, self._offset)):
            self._account(tally)
            self._offset += self.batch_size
            while self._offset >= self.samples_per_epoch:
                self._finish_epoch(self._epoch)
                self._epoch, self._offset = self._epoch + 1, self._offset - self.samples_per_epoch
            if batch is not None:
                yield self._pin(batch)

    def _pin(self, batch: Batch) -> Batch:
        if self.pin_memory and batch.images.device.type == "cpu":
            batch.images = batch.images.pin_memory()
        return batch


def resolve_decoder(name: str) -> str:
    """``data.decoder`` -> the decoder that will run: "dali" when asked for and importable, else
    "pillow" (with a one-line warning when DALI was asked for)."""
    if name not in ("pillow", "dali"):
        raise ConfigError(f"data.decoder must be 'pillow' or 'dali', got {name!r}")
    if name == "dali":
        from .dali import dali_import_error

        error = dali_import_error()
        if error is not None:
            log.warning("data.decoder='dali' but DALI is not importable (%s): decoding with Pillow", error)
            return "pillow"
    return name


def build_loader(cfg: RunConfig, split: str, rank: int = 0, world_size: int = 1, epoch: int = 0, *,
                 max_samples: Optional[int] = None, with_negatives: Optional[bool] = None,
                 all_captions: bool = False) -> Loader:
    """The ``Batch`` iterable of ``split`` ("train": ``cfg.data.train``, shuffled, augmented, infinite;
    "eval": ``cfg.data.eval``, ordered, one pass of at most ``max_samples`` (default
    ``cfg.eval.max_samples``; 0 = all), with hard negatives; ``all_captions``: ``EvalBatch``es with
    every caption of each image) for ``rank`` of ``world_size``, starting at ``epoch``. Raises
    ``ConfigError`` for a missing path or an empty dataset. URLs, ``pipe:`` commands, ``.tar.gz``
    shards and mixtures are streamed (``fastvl.data.streaming.StreamingLoader``, train only)."""
    from .streaming import StreamingLoader, needs_streaming

    if needs_streaming(cfg.data.train if split == "train" else cfg.data.eval):
        return StreamingLoader(cfg, split, rank, world_size, epoch)
    return Loader(cfg, split, rank, world_size, epoch, max_samples=max_samples, with_negatives=with_negatives,
                  all_captions=all_captions)

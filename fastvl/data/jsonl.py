"""An annotation file of image-caption records as a random-access source.

Two layouts of the same records: JSONL (one JSON object per line) or a ``.json`` file holding one
JSON array of them (ALBEF's annotation files, e.g. ``coco_karpathy_test.json``). A record is
``{"image": "relative/or/absolute.jpg", "caption": "..." | ["...", ...]}``, optionally with
``"image_id"`` (records with the same id are one image: evaluation groups them), ``"key"`` (default
``"<file stem>:<line or entry number>"``) and ``"negatives"`` (type -> caption, as the built-in
generator writes them). Image paths are relative to ``image_root`` when it is given
(``data.image_root``; ALBEF's files name images relative to a dataset folder such as
``coco/images/``), else to the annotation file's folder.

Samples: with ``per_caption`` one per (image, caption) pair, keyed ``<key>#<j>`` for the j-th caption
of a record with several (training, as ALBEF's pretrain/re_train datasets do); otherwise one per
record with all of its captions (evaluation). Records are read once at start-up (captions stay in
memory, images are read when a sample is fetched); a record that is not a JSON object, has no
non-empty caption or names a missing image file is skipped and counted. Bytes that are not valid
UTF-8 are decoded with replacement characters (``source.decode_caption``) and the record's samples
marked ``repaired=("non_utf8_caption",)``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from ..config import ConfigError
from .source import RawSample, decode_caption


BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte-order mark some editors write first; JSON parsers refuse it."""


def annotation_records(path: Path, skipped: Counter) -> Iterator[tuple[int, object, bool]]:
    """(line or entry number, parsed record, repaired) of a JSONL file or a ``.json`` array; JSONL
    lines that are not JSON are counted in ``skipped["bad_record"]``."""
    if path.suffix.lower() == ".json":
        text, repaired = decode_caption(path.read_bytes().removeprefix(BOM))
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON: {error}") from None
        if not isinstance(records, list):
            raise ConfigError(f"{path}: a .json annotation file must hold an array of "
                              f'{{"image": ..., "caption": ...}} records, not a {type(records).__name__}')
        for number, record in enumerate(records, start=1):
            yield number, record, bool(repaired)
        return
    with open(path, "rb") as lines:
        for number, raw_line in enumerate(lines, start=1):
            line, repaired = decode_caption(raw_line.removeprefix(BOM) if number == 1 else raw_line)
            if not line.strip():
                continue
            try:
                yield number, json.loads(line), bool(repaired)
            except json.JSONDecodeError:
                skipped["bad_record"] += 1


def record_captions(record: dict) -> tuple[str, ...]:
    """The non-empty captions of a record whose ``"caption"`` is a string or a list of strings."""
    caption = record.get("caption")
    captions = [caption] if isinstance(caption, str) else caption if isinstance(caption, list) else []
    return tuple(c for c in captions if isinstance(c, str) and c.strip())


class AnnotationSource:
    def __init__(self, path, image_root: str = "", per_caption: bool = False):
        self.path = Path(path)
        self.description = os.fspath(path)
        if not self.path.is_file():
            raise ConfigError(f"data path not found: {self.path}")
        root = Path(image_root) if image_root else self.path.parent
        if not root.is_dir():
            raise ConfigError(f"data.image_root: folder not found: {root}")
        self.keys: list[str] = []
        self.images: list[str] = []
        self.captions: list[tuple[str, ...]] = []
        self.image_ids: list[Optional[str]] = []
        self.metas: list[Optional[dict]] = []
        self.skipped: Counter = Counter()
        self.repaired: set[int] = set()
        """Indices of samples whose record was not valid UTF-8."""
        for number, record, repaired in annotation_records(self.path, self.skipped):
            if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                self.skipped["bad_record"] += 1
                continue
            captions = record_captions(record)
            if not captions:
                self.skipped["missing_caption"] += 1
                continue
            image = root / record["image"]
            if not image.is_file():
                self.skipped["missing_image"] += 1
                continue
            key = str(record.get("key", f"{self.path.stem}:{number}"))
            image_id = None if record.get("image_id") is None else str(record["image_id"])
            negatives = record.get("negatives")
            meta = {"negatives": negatives} if isinstance(negatives, dict) else None
            if per_caption and len(captions) > 1:
                samples = [(f"{key}#{j}", (caption,)) for j, caption in enumerate(captions)]
            else:
                samples = [(key, captions)]
            for sample_key, sample_captions in samples:
                if repaired:
                    self.repaired.add(len(self.keys))
                self.keys.append(sample_key)
                self.images.append(os.fspath(image))
                self.captions.append(sample_captions)
                self.image_ids.append(image_id)
                self.metas.append(meta)
        # no shard locality to keep between separate image files: the sampler permutes freely
        self.groups = None

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int, with_meta: bool = False) -> RawSample:
        with open(self.images[i], "rb") as image:
            data = image.read()
        repaired = ("non_utf8_caption",) if i in self.repaired else ()
        first, *more = self.captions[i]
        return RawSample(self.keys[i], data, first, self.metas[i] if with_meta else None, repaired,
                         tuple(more), self.image_ids[i])

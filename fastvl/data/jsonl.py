"""A JSONL file of image-caption records as a random-access source.

One JSON object per line: ``{"image": "relative/or/absolute.jpg", "caption": "..."}``, optionally with
``"key"`` (default ``"<file stem>:<line number>"``) and ``"negatives"`` (type -> caption, as the
built-in generator writes them). Image paths are relative to the JSONL file's folder. Records are
read once at start-up (captions stay in memory, images are read when a sample is fetched); a line
that is not a JSON object, has no caption or names a missing image file is skipped and counted. A
line that is not valid UTF-8 is decoded with replacement characters (``source.decode_caption``) and
its sample marked ``repaired=("non_utf8_caption",)``.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from ..config import ConfigError
from .source import RawSample, decode_caption


class JsonlSource:
    def __init__(self, path):
        self.path = Path(path)
        self.description = os.fspath(path)
        if not self.path.is_file():
            raise ConfigError(f"data path not found: {self.path}")
        self.keys: list[str] = []
        self.images: list[str] = []
        self.captions: list[str] = []
        self.metas: list[dict | None] = []
        self.skipped: Counter = Counter()
        self.repaired: set[int] = set()
        """Indices of samples whose line was not valid UTF-8."""
        root = self.path.parent
        with open(self.path, "rb") as lines:
            for number, raw_line in enumerate(lines, start=1):
                line, repaired = decode_caption(raw_line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.skipped["bad_record"] += 1
                    continue
                if not isinstance(record, dict) or not isinstance(record.get("image"), str):
                    self.skipped["bad_record"] += 1
                    continue
                caption = record.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    self.skipped["missing_caption"] += 1
                    continue
                image = root / record["image"]
                if not image.is_file():
                    self.skipped["missing_image"] += 1
                    continue
                if repaired:
                    self.repaired.add(len(self.keys))
                self.keys.append(str(record.get("key", f"{self.path.stem}:{number}")))
                self.images.append(os.fspath(image))
                self.captions.append(caption)
                negatives = record.get("negatives")
                self.metas.append({"negatives": negatives} if isinstance(negatives, dict) else None)
        # no shard locality to keep between separate image files: the sampler permutes freely
        self.groups = None

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, i: int, with_meta: bool = False) -> RawSample:
        with open(self.images[i], "rb") as image:
            data = image.read()
        repaired = ("non_utf8_caption",) if i in self.repaired else ()
        return RawSample(self.keys[i], data, self.captions[i], self.metas[i] if with_meta else None, repaired)

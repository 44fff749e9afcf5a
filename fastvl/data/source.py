"""Open a data path as a random-access source of raw (image bytes, caption) samples.

Two formats, chosen by the path: a ``.jsonl`` file of ``{"image": path, "caption": text}`` records
(``jsonl.JsonlSource``), or webdataset tar shards given as a folder, a glob / brace pattern, a file
or a list (``shards.ShardSource``). A missing path or a dataset with no usable sample raises
``ConfigError`` naming the path, at start-up.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..config import ConfigError

PathSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]
"""A folder, glob / brace pattern or file, or a list of them."""


@dataclass
class RawSample:
    key: str
    image: bytes
    """Encoded image file (JPEG, PNG, ...)."""
    caption: str
    meta: Optional[dict] = None
    """The sample's metadata (the built-in generator's ``.json``: objects, relations, negatives)."""
    repaired: tuple[str, ...] = ()
    """What was fixed while reading (``"non_utf8_caption"``): counted, not skipped."""


def decode_caption(data: bytes) -> tuple[str, tuple[str, ...]]:
    """Caption bytes -> text. Not valid UTF-8: decoded with U+FFFD for each bad byte sequence rather
    than skipped — the rest of the caption still describes the image, and the BERT tokenizer's
    normaliser deletes U+FFFD, so only the undecodable characters are lost (``b"caf\\xe9 au lait"``
    becomes ``"caf au lait"``). Returns the text and ``("non_utf8_caption",)`` when repaired."""
    try:
        return data.decode("utf-8"), ()
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), ("non_utf8_caption",)


def is_jsonl(spec: PathSpec) -> bool:
    return isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith((".jsonl", ".jsonlines"))


def open_source(spec: PathSpec):
    """A ``JsonlSource`` or ``ShardSource`` for ``spec`` with at least one usable sample."""
    if is_jsonl(spec):
        from .jsonl import JsonlSource

        source = JsonlSource(spec)
    else:
        from .shards import ShardSource

        source = ShardSource(spec)
    if len(source) == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(source.skipped.items())) or "no samples"
        raise ConfigError(f"empty dataset: {source.description} ({reasons})")
    return source

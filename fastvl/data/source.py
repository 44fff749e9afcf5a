"""Open a data path as a random-access source of raw (image bytes, caption) samples.

Two formats, chosen by the path: an annotation file — ``.jsonl`` (one record per line) or ``.json``
(an ALBEF-style array) of ``{"image": path, "caption": text | [text, ...], "image_id"?: ...}``
records (``jsonl.AnnotationSource``) — or webdataset tar shards given as a folder, a glob / brace
pattern, a file or a list (``shards.ShardSource``). A missing path or a dataset with no usable
sample raises ``ConfigError`` naming the path, at start-up.

Several captions per image (COCO/Flickr: five). An annotation source lists one sample per
(image, caption) pair when asked to (``per_caption``: training, as ALBEF does), else one per record
with all of its captions. Shards hold one sample per image: ``.txt`` is its first caption (what
every shard reader takes as *the* caption) and, when there are more, the ``.json`` metadata lists
them all under ``"captions"``; an ``"image_id"`` there names the image. ``sample_captions`` and
``sample_image_id`` read either layout.
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
    more_captions: tuple[str, ...] = ()
    """The image's other captions, after ``caption`` (annotation records with a list of captions)."""
    image_id: Optional[str] = None
    """Samples with the same id are one image (evaluation groups them); None: the sample is its own image."""


def sample_captions(raw: RawSample) -> tuple[str, ...]:
    """Every caption of ``raw``'s image: ``caption`` and ``more_captions``, or the ``"captions"`` list of
    its metadata (multi-caption shards; read only when the sample was read with its metadata)."""
    listed = raw.meta.get("captions") if isinstance(raw.meta, dict) else None
    if isinstance(listed, list) and listed and all(isinstance(c, str) for c in listed):
        return tuple(listed)
    return (raw.caption, *raw.more_captions)


def sample_image_id(raw: RawSample) -> Optional[str]:
    """``raw.image_id``, or the ``"image_id"`` of its metadata, as a string; None when it has none."""
    if raw.image_id is not None:
        return raw.image_id
    value = raw.meta.get("image_id") if isinstance(raw.meta, dict) else None
    return None if value is None else str(value)


def decode_caption(data: bytes) -> tuple[str, tuple[str, ...]]:
    """Caption bytes -> text. Not valid UTF-8: decoded with U+FFFD for each bad byte sequence rather
    than skipped — the rest of the caption still describes the image, and the BERT tokenizer's
    normaliser deletes U+FFFD, so only the undecodable characters are lost (``b"caf\\xe9 au lait"``
    becomes ``"caf au lait"``). Returns the text and ``("non_utf8_caption",)`` when repaired."""
    try:
        return data.decode("utf-8"), ()
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), ("non_utf8_caption",)


ANNOTATION_SUFFIXES = (".jsonl", ".jsonlines", ".json")


def is_annotation_file(spec: PathSpec) -> bool:
    return isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith(ANNOTATION_SUFFIXES)


def open_source(spec: PathSpec, image_root: str = "", per_caption: bool = False, index_cache: str = ""):
    """An ``AnnotationSource`` or ``ShardSource`` for ``spec`` with at least one usable sample.
    ``image_root``: folder the annotation file's image paths are relative to (default: the file's own
    folder); ``per_caption``: one annotation sample per (image, caption) pair; ``index_cache``: where a
    shard index is cached (``data.index_cache``)."""
    if is_annotation_file(spec):
        from .jsonl import AnnotationSource

        source = AnnotationSource(spec, image_root, per_caption)
    else:
        from .shards import ShardSource

        source = ShardSource(spec, index_cache)
    if len(source) == 0:
        reasons = ", ".join(f"{n} {why}" for why, n in sorted(source.skipped.items())) or "no samples"
        raise ConfigError(f"empty dataset: {source.description} ({reasons})")
    return source

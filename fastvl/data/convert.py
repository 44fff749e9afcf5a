"""Convert a folder of images plus a captions file into webdataset shards (``fastvl data convert``).

    fastvl data convert --images photos/ --captions captions.csv --out shards/ [--shard-size 1000]
    fastvl data convert --images coco/images/ --captions coco_karpathy_test.json --out coco_test/

The captions file is CSV with a header row, JSONL (one object per line) or an ALBEF-style ``.json``
array of records. Each record names an image (column/field ``image``, ``file``, ``filename``,
``path`` or ``image_path``; relative to ``--images``) and its caption (``caption``, ``text`` or
``title``: a string, or in JSON a list of strings); other fields are kept in the sample's ``.json``
(e.g. ``image_id``, ``negatives``, read by the eval), with the image's path under ``source``.

One sample per image: records with the same ``image_id`` are merged into the first of them (ALBEF's
pretraining files list an image once per caption). A sample's ``.txt`` is its first caption — what
every shard reader takes as the caption — and when it has more, its ``.json`` lists them all under
``"captions"`` (``source.sample_captions``): training draws one of them per visit, eval scores all.

Every sample is checked as it is converted, with the loader's own rules, so what lands in the shards
trains without surprises: the image header (``images.probe_image``: empty, truncated, corrupt,
unknown format, too many pixels) and a full decode at the smallest JPEG scale (cheap, but it reads
all the compressed data, so corrupt data is caught too); the caption stripped and non-empty, bytes
that are not UTF-8 replaced (counted as repaired). Images outside ``--images`` (``../`` or absolute
paths in the captions file) are refused. Images are stored as they are (no re-encoding), except
formats the shard reader does not take as an image field (GIF, TIFF, ...), which are re-encoded as
PNG. Samples are keyed ``000000000``, ``000000001``, ... in the order of the captions file.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..config import ConfigError
from .images import BadImage, decode_rgb, probe_image
from .jsonl import annotation_records
from .shards import ShardWriter

IMAGE_KEYS = ("image", "file", "filename", "path", "image_path")
CAPTION_KEYS = ("caption", "text", "title")
EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp", "ppm": "ppm"}
"""Detected format -> member extension for the formats stored as they are (all in
``shards.IMAGE_FIELDS``, the extensions the shard reader takes as the image)."""


@dataclass
class ConvertSummary:
    written: int = 0
    captions: int = 0
    shards: list[Path] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    reencoded: Counter = field(default_factory=Counter)

    def lines(self, out: Path) -> list[str]:
        def counts(counter: Counter) -> str:
            return ", ".join(f"{reason} {n}" for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))

        lines = [f"wrote {self.written} samples in {len(self.shards)} shards to {out}"]
        if self.captions > self.written:
            lines[0] += f" ({self.captions} captions)"
        total = sum(self.skipped.values())
        lines.append(f"skipped {total}" + (f": {counts(self.skipped)}" if total else ""))
        if self.repaired:
            lines.append(f"repaired {sum(self.repaired.values())}: {counts(self.repaired)}")
        if self.reencoded:
            lines.append(f"re-encoded as PNG {sum(self.reencoded.values())}: {counts(self.reencoded)}")
        return lines


def _first(record: dict, names: Sequence[str]) -> Optional[str]:
    return next((name for name in names if name in record), None)


def read_records(path: Path, skipped: Counter) -> list[dict]:
    """The records of a CSV (header row), JSONL or JSON-array captions file, as dicts. Lines or
    entries that are not JSON objects are counted as ``bad_record``; a CSV without an image or
    caption column is refused."""
    if not path.is_file():
        raise ConfigError(f"--captions: file not found: {path}")
    # not UTF-8: decode with replacement rather than stop (the affected captions are counted later)
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = reader.fieldnames or []
        if _first(dict.fromkeys(columns), IMAGE_KEYS) is None or _first(dict.fromkeys(columns), CAPTION_KEYS) is None:
            raise ConfigError(f"--captions: {path} needs a header row with an image column ({', '.join(IMAGE_KEYS)}) "
                              f"and a caption column ({', '.join(CAPTION_KEYS)}); it has {columns}")
        return [dict(row) for row in reader]
    if suffix in (".jsonl", ".jsonlines", ".json"):
        try:
            parsed = [record for _, record, _ in annotation_records(path, skipped)]
        except ConfigError as error:
            raise ConfigError(f"--captions: {error}") from None
        skipped["bad_record"] += sum(not isinstance(record, dict) for record in parsed)
        return [record for record in parsed if isinstance(record, dict)]
    raise ConfigError(f"--captions: {path} is neither .csv, .jsonl nor .json")


def _caption_list(value) -> Optional[list]:
    """A caption field as a list (a string is one caption); None when it is neither."""
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, list) else None


def merge_by_image_id(records: list[dict]) -> list[dict]:
    """``records`` with those sharing an ``image_id`` merged into the first: its caption becomes the
    list of all their captions. Records without an id (or without a caption field) stay as they are."""
    merged: list[dict] = []
    first_of: dict[str, dict] = {}
    for record in records:
        caption_key = _first(record, CAPTION_KEYS)
        image_id = record.get("image_id")
        captions = _caption_list(record.get(caption_key)) if caption_key else None
        if image_id is None or captions is None:
            merged.append(record)
            continue
        name = json.dumps(image_id, sort_keys=True)
        if name in first_of:
            first = first_of[name]
            first[_first(first, CAPTION_KEYS)] += captions
            continue
        first_of[name] = {**record, caption_key: captions}
        merged.append(first_of[name])
    return merged


def _check_image(data: bytes) -> tuple[str, bytes, Optional[str]]:
    """(member extension, bytes to store, original format if re-encoded) for a usable image; raises
    ``BadImage`` with the skip reason otherwise."""
    header = probe_image(data)
    extension = EXTENSIONS.get(header.format)
    try:
        # stored as is: decode at the smallest DCT scale, which still reads all the compressed data
        pixels = decode_rgb(data, min_side=1 if extension else 0, header=header)
    except BadImage:
        raise
    except Exception as error:  # Pillow raises many types for corrupt data
        raise BadImage("undecodable_image", f"{type(error).__name__}: {error}") from None
    if extension is not None:
        return extension, data, None
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    return "png", buffer.getvalue(), header.format


def _sample(root: Path, record: dict, summary: ConvertSummary) -> Optional[dict]:
    """The shard fields of one record, or None (counted in ``summary``) when it is not usable."""
    image_key, caption_key = _first(record, IMAGE_KEYS), _first(record, CAPTION_KEYS)
    name = record.get(image_key) if image_key else None
    if not isinstance(name, str) or not name.strip():
        summary.skipped["missing_image"] += 1
        return None
    captions = _caption_list(record.get(caption_key)) if caption_key else None
    if not captions or not all(isinstance(c, str) for c in captions):
        summary.skipped["missing_caption"] += 1
        return None
    captions = [c.strip() for c in captions if c.strip()]
    if not captions:
        summary.skipped["empty_caption"] += 1
        return None
    path = (root / name).resolve()
    if not path.is_relative_to(root):
        summary.skipped["image_outside_folder"] += 1
        return None
    if not path.is_file():
        summary.skipped["missing_image"] += 1
        return None
    try:
        data = path.read_bytes()
    except OSError:
        summary.skipped["unreadable_image"] += 1
        return None
    try:
        extension, payload, reencoded = _check_image(data)
    except BadImage as error:
        summary.skipped[error.reason] += 1
        return None
    if any("\ufffd" in c for c in captions):
        summary.repaired["non_utf8_caption"] += 1
    if reencoded:
        summary.reencoded[reencoded] += 1
    meta = {k: v for k, v in record.items() if k not in (image_key, caption_key)}
    meta["source"] = os.fspath(path.relative_to(root))
    if len(captions) > 1:
        meta["captions"] = captions
    summary.captions += len(captions)
    return {extension: payload, "txt": captions[0], "json": meta}


def convert(images, captions, out, shard_size: int = 1000, progress: bool = True) -> ConvertSummary:
    """Write the checked samples of ``captions`` (images under ``images``) as shards in ``out``."""
    from tqdm import tqdm

    images, captions, out = Path(images), Path(captions), Path(out)
    if not images.is_dir():
        raise ConfigError(f"--images: folder not found: {images}")
    if shard_size <= 0:
        raise ConfigError("--shard-size must be positive")
    summary = ConvertSummary()
    records = merge_by_image_id(read_records(captions, summary.skipped))
    root = images.resolve()
    with ShardWriter(out, shard_size) as writer, tqdm(records, unit="img", desc="convert", disable=not progress) as bar:
        for record in bar:
            fields = _sample(root, record, summary)
            if fields is not None:
                writer.write(f"{summary.written:09d}", fields)
                summary.written += 1
            if summary.skipped:
                bar.set_postfix(skipped=sum(summary.skipped.values()), refresh=False)
    summary.shards = list(writer.paths)
    return summary


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fastvl data convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder the captions file's image paths are relative to")
    parser.add_argument("--captions", required=True,
                        help="captions file: .csv (header row), .jsonl or an ALBEF-style .json array")
    parser.add_argument("--out", required=True, help="output folder for shard-000000.tar, ...")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    import sys

    try:
        summary = convert(args.images, args.captions, args.out, args.shard_size, progress=not args.quiet)
    except ConfigError as error:
        print(f"fastvl data convert: error: {error}", file=sys.stderr)
        return 2
    for line in summary.lines(Path(args.out)):
        print(line)
    if summary.written == 0:
        print("fastvl data convert: error: no usable sample", file=sys.stderr)
        return 1
    return 0

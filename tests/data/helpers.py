"""Shared helpers of the data tests."""
import io
import json
import struct
import tarfile
import zlib

from PIL import Image

from fastvl.config import load_config


def jpeg_bytes(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, subsampling=0, **options)
    return buffer.getvalue()


def make_config(train, eval_path=None, **data):
    """A RunConfig (tiny model: 64 px images) reading ``train`` / ``eval_path`` with ``data.*`` overrides."""
    overrides = [f"data.train={train}", f"data.eval={eval_path or train}"]
    overrides += [f"data.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in data.items()]
    return load_config(None, overrides)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def png16_bytes(pixels) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): ``pixels`` uint16 [H, W] (gray)
    or [H, W, 3] (RGB)."""
    import numpy as np

    pixels = np.asarray(pixels, dtype=np.uint16)
    height, width = pixels.shape[:2]
    colour_type = 0 if pixels.ndim == 2 else 2
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


def png_header_only(width: int, height: int) -> bytes:
    """A structurally complete PNG that claims ``width`` x ``height`` pixels but holds almost no data:
    what a decompression bomb looks like to a header check."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + _png_chunk(b"IEND", b""))


def write_tar(path, members) -> None:
    """A tar of ``(member name, bytes)`` written as given (names are not checked, unlike ShardWriter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def mean_colour(image) -> list[float]:
    """Mean RGB (0-255) of a normalised ``[3, H, W]`` model input."""
    from fastvl.data.transforms import denormalize

    return denormalize(image).mean((1, 2)).tolist()

"""Encoded images: a cheap header check before any decoding, and Pillow decoding to RGB.

``probe_image`` reads only the container structure — JPEG marker segments up to the first scan, PNG
chunk headers — and returns an ``ImageHeader`` (format, size, channels, bit depth, alpha), or raises
``BadImage`` with a reason that the loader counts:

* ``empty_image``: zero bytes;
* ``unknown_image_format``: neither JPEG, PNG nor anything Pillow recognises;
* ``truncated_image``: a JPEG with no end-of-image marker after its first scan, a PNG whose chunks run
  past the end of the file or that has no IEND chunk;
* ``corrupt_image_header``: broken marker segments / chunk layout, a zero width or height;
* ``image_too_large``: more than ``MAX_IMAGE_PIXELS`` pixels even at the smallest JPEG DCT scale
  (``decode_scale``), so a decompression bomb is refused before a byte of pixels is decoded.

The check runs before both decoders: it is what lets the DALI pipeline (which cannot drop a sample
in the middle of a batch) see only images it can decode, and it gives both decoders the same skip
reasons. ``dali_decodes_directly`` says which images DALI's decoder handles exactly like Pillow
(measured: 8-bit JPEG incl. grayscale and CMYK, 8/16-bit PNG without transparency); the others
(transparency, other formats, huge JPEGs needing DCT scaling) are decoded with Pillow first.

``decode_rgb`` (Pillow) defines the colour semantics both decoders share: grayscale is replicated
to three channels, CMYK is converted, 16-bit samples are rounded to 8 bits (``v * 255 / 65535``),
transparency is composited on white. EXIF orientation is ignored by both (as webdataset and
open_clip do): the pixels are used as stored.
"""
from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

MAX_IMAGE_PIXELS = 64 * 1024 * 1024
"""Most pixels one image may decode to (8192 x 8192, 192 MiB as RGB). Below Pillow's own
decompression-bomb threshold (~89 M), so Pillow never warns on an image we accept. Read at call
time: tests and users may lower it."""

JPEG_SCALES = (1, 2, 4, 8)
"""DCT scaling denominators libjpeg can decode at directly."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_HUFFMAN_SOF = {0xC0, 0xC1, 0xC2}
"""Baseline, extended and progressive Huffman JPEG: what DALI's decoders handle (lossless and
arithmetic-coded JPEGs go to Pillow, which refuses most of them)."""
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""PNG colour type -> samples per pixel (3 is a palette index)."""


class BadImage(ValueError):
    """An image that cannot be used; ``reason`` is the skip reason the loader counts."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageHeader:
    format: str
    """"jpeg", "png", or Pillow's lower-cased format name for anything else."""
    width: int
    height: int
    channels: int
    """Components as stored: 1 gray/palette, 2 gray+alpha, 3 colour, 4 CMYK or RGBA."""
    bit_depth: int
    has_alpha: bool
    """An alpha channel or a tRNS/transparency entry."""
    codec_ok: bool = True
    """JPEG: 8-bit Huffman coding (what DALI decodes); always True for other formats."""

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _be16(data: bytes, at: int) -> int:
    return (data[at] << 8) | data[at + 1]


def _probe_jpeg(data: bytes) -> ImageHeader:
    """Walk the marker segments from SOI to the first SOS (start of scan) and read the frame header
    (SOF). The entropy-coded data after SOS cannot hold a 0xFFD9 byte pair (0xFF is stuffed as
    0xFF00 there), so the absence of an EOI marker after it means the file was cut off."""
    n, position, frame = len(data), 2, None
    while True:
        if position >= n:
            raise BadImage("truncated_image", "JPEG ends before its first scan")
        if data[position] != 0xFF:
            raise BadImage("corrupt_image_header", f"JPEG: no marker at byte {position}")
        while position < n and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= n:
            raise BadImage("truncated_image", "JPEG ends inside a marker")
        marker = data[position]
        position += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers: no length
            continue
        if marker == 0xD9:
            raise BadImage("corrupt_image_header", "JPEG: end of image before any scan")
        if position + 2 > n:
            raise BadImage("truncated_image", "JPEG ends inside a segment header")
        length = _be16(data, position)
        if length < 2:
            raise BadImage("corrupt_image_header", f"JPEG: segment length {length}")
        if position + length > n:
            raise BadImage("truncated_image", "JPEG ends inside a segment")
        if marker in _JPEG_SOF:
            if length < 8:
                raise BadImage("corrupt_image_header", "JPEG: short frame header")
            precision = data[position + 2]
            height, width = _be16(data, position + 3), _be16(data, position + 5)
            components = data[position + 7]
            frame = (marker, precision, height, width, components)
        if marker == 0xDA:  # start of scan: the header is over
            scan_data = position + length
            break
        position += length
    if frame is None:
        raise BadImage("corrupt_image_header", "JPEG: no frame header before the scan")
    kind, precision, height, width, components = frame
    if width == 0 or height == 0 or components not in (1, 3, 4):
        raise BadImage("corrupt_image_header", f"JPEG: {width}x{height} with {components} components")
    if not data.endswith(b"\xff\xd9") and data.find(b"\xff\xd9", scan_data) < 0:
        raise BadImage("truncated_image", "JPEG has no end-of-image marker")
    codec_ok = kind in _JPEG_HUFFMAN_SOF and precision == 8
    return ImageHeader("jpeg", width, height, components, precision, False, codec_ok)


def _probe_png(data: bytes) -> ImageHeader:
    """Read IHDR, then walk every chunk header (length + type, 8 bytes each) to the IEND chunk."""
    n = len(data)
    if n < 33 or data[12:16] != b"IHDR":
        raise BadImage("truncated_image" if n < 33 else "corrupt_image_header", "PNG: no IHDR chunk")
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", data[16:26])
    if width == 0 or height == 0 or colour_type not in _PNG_CHANNELS:
        raise BadImage("corrupt_image_header", f"PNG: {width}x{height}, colour type {colour_type}")
    has_alpha = colour_type in (4, 6)
    position = 8
    while True:
        if position + 8 > n:
            raise BadImage("truncated_image", "PNG ends before its IEND chunk")
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        if position + 12 + length > n:
            raise BadImage("truncated_image", f"PNG chunk {kind!r} runs past the end of the file")
        if kind == b"tRNS":
            has_alpha = True
        elif kind == b"IEND":
            break
        position += 12 + length
    return ImageHeader("png", width, height, _PNG_CHANNELS[colour_type], bit_depth, has_alpha)


def _probe_other(data: bytes) -> ImageHeader:
    """Any other format Pillow knows: its ``open`` reads only the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height), mode = (image.format or "unknown").lower(), image.size, image.mode
                channels = len(image.getbands())
                has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    except Image.DecompressionBombError as error:
        raise BadImage("image_too_large", str(error)) from None
    except Exception as error:  # Pillow raises many types for bytes it cannot identify
        raise BadImage("unknown_image_format", f"{type(error).__name__}: {error}") from None
    if width == 0 or height == 0:
        raise BadImage("corrupt_image_header", f"{fmt}: {width}x{height}")
    depth = 16 if mode.startswith("I;16") else 32 if mode in ("I", "F") else 8
    return ImageHeader(fmt, width, height, channels, depth, has_alpha)


def probe_image(data: bytes) -> ImageHeader:
    """The header of an encoded image, read without decoding pixels; raises ``BadImage`` (see the
    module docstring for the reasons). Also enforces ``MAX_IMAGE_PIXELS`` through ``decode_scale``."""
    if len(data) == 0:
        raise BadImage("empty_image", "zero bytes")
    if data[:3] == b"\xff\xd8\xff":
        header = _probe_jpeg(data)
    elif data[:8] == PNG_SIGNATURE:
        header = _probe_png(data)
    else:
        header = _probe_other(data)
    decode_scale(header)  # raises image_too_large
    return header


def decode_scale(header: ImageHeader, min_side: int = 0) -> int:
    """Denominator (1, 2, 4 or 8) to decode ``header``'s image at: the largest JPEG DCT scale that
    keeps both sides >= ``min_side`` (cheap decoding of large photos), raised further until the
    decoded image has at most ``MAX_IMAGE_PIXELS`` pixels. Non-JPEG images decode at full size.
    Raises ``BadImage("image_too_large")`` when no scale brings it under the limit."""
    scales = JPEG_SCALES if header.format == "jpeg" else (1,)
    fitting = [s for s in scales if math.ceil(header.width / s) * math.ceil(header.height / s) <= MAX_IMAGE_PIXELS]
    if not fitting:
        raise BadImage("image_too_large", f"{header.width}x{header.height} {header.format} "
                                          f"(limit {MAX_IMAGE_PIXELS} pixels)")
    wanted = 1
    if min_side > 0:
        wanted = max([s for s in scales if min(header.width, header.height) // s >= min_side] or [1])
    return max(wanted, fitting[0])


def dali_decodes_directly(header: ImageHeader) -> bool:
    """Whether DALI's decoder gives the same pixels as ``decode_rgb`` for this image (at full scale):
    8-bit Huffman JPEG (gray, YCbCr, CMYK) and PNG without transparency (8 or 16 bit)."""
    if header.format == "jpeg":
        return header.codec_ok and decode_scale(header) == 1
    return header.format == "png" and not header.has_alpha and header.bit_depth in (1, 2, 4, 8, 16)


def pil_to_rgb(image: Image.Image) -> torch.Tensor:
    """A loaded Pillow image -> uint8 ``[3, H, W]`` RGB with the module's colour semantics (16-bit and
    float gray scaled, transparency composited on white): what ``decode_rgb`` returns for its bytes."""
    return torch.from_numpy(_to_rgb_array(image).copy()).permute(2, 0, 1)


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> uint8 ``[H, W, 3]`` with the module's colour semantics."""
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit gray (Pillow's convert("RGB") would clip every value above 255 to white)
        values = np.asarray(image, dtype=np.uint32 if mode == "I" else np.uint16).astype(np.uint32)
        gray = ((np.clip(values, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float32), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        # composite on white: dropping alpha would expose whatever colour hides under transparent pixels
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.getchannel("A"))
    elif image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def decode_rgb(data: bytes, min_side: int = 0, header: Optional[ImageHeader] = None) -> torch.Tensor:
    """Decode an encoded image to uint8 ``[3, H, W]`` RGB with Pillow.

    The header is checked first (``probe_image``; pass ``header`` when already probed). With
    ``min_side``, JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps both sides
    >= ``min_side``, much cheaper than decoding large photos at full size; huge JPEGs are scaled down
    until they fit ``MAX_IMAGE_PIXELS``. Grayscale, palette, 16-bit and CMYK images are converted;
    images with transparency are composited on white. Raises ``BadImage`` from the header check and
    whatever Pillow raises on undecodable bytes (OSError, ValueError, SyntaxError, ...).
    """
    header = header or probe_image(data)
    scale = decode_scale(header, min_side)
    if header.format == "jpeg":
        # the plugin class directly: Image.open would refuse a huge JPEG before we can ask for a
        # DCT-scaled decode (our own pixel limit was applied above)
        image = JpegImagePlugin.JpegImageFile(io.BytesIO(data))
    else:
        image = Image.open(io.BytesIO(data))
    with image:
        if scale > 1:
            image.draft("RGB", (header.width // scale, header.height // scale))
        image.load()
        return pil_to_rgb(image)


def encode_ppm(pixels: torch.Tensor) -> bytes:
    """uint8 ``[3, H, W]`` -> binary PPM (P6) bytes: a lossless container any decoder reads with a
    plain copy; how Pillow-decoded images travel through the DALI pipeline."""
    height, width = pixels.shape[1:]
    return b"P6\n%d %d\n255\n" % (width, height) + pixels.permute(1, 2, 0).contiguous().numpy().tobytes()

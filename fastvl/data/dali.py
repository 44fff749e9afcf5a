"""Image decoding and augmentation in an NVIDIA DALI pipeline, fed by the loader in its own order.

Why ``external_source`` and not DALI's webdataset reader: the loader already gives every sample a
random-access index and a training order that is a pure function of (seed, epoch), split across
ranks by position, with exact resume (``fastvl.data.loader``). DALI's readers own the order, the
shard split and the shuffling themselves (and cannot skip a bad sample or swap a caption's "left"
and "right" when they flip its image). So the loader stays the reader: for each batch it reads the
encoded bytes, checks their headers (``images.probe_image``), draws each sample's crop box and flip
from the seeded per-sample generator exactly as the Pillow path does, and hands DALI

    encoded bytes, crop anchor (x, y), crop shape (w, h), mirror flag, sample index

per sample. The graph is one line per step::

    decoders.image_slice (ROI decode: only the crop is decoded, "mixed" = nvJPEG when CUDA is
    present, CPU libjpeg-turbo / nvImageCodec otherwise) -> resize (antialiased linear, to S x S,
    uint8) -> crop_mirror_normalize (mirror per sample, HWC -> CHW, still uint8)

and the loader finishes the uint8 batch with ``transforms.finish_batch``: each sample's RandAugment
ops (drawn with its crop and flip), then normalisation — the same torch code as the Pillow path.

The sample index comes back out of the pipeline next to the images and is checked against what was
fed, so captions (tokenized by the loader, outside the pipeline) are paired with their images by
construction. Feeding happens in the pipeline's input callback, which DALI calls from ``run()`` a
``prefetch_queue_depth`` of batches ahead: while the Python side reads, checks and tokenizes, DALI's
threads decode the batches already queued.

Images DALI does not decode like Pillow (transparency, formats other than JPEG/PNG, JPEGs that must
be DCT-scaled to fit ``images.MAX_IMAGE_PIXELS``) are decoded by Pillow first and fed as PPM, which
DALI reads with a plain copy. If DALI still fails on a batch (bytes that passed the header checks
but not the decoder), the pipeline is rebuilt and the batches that were in flight are returned as
``FAILED`` for the caller to decode another way: the run goes on.
"""
from __future__ import annotations

import functools
import logging
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

log = logging.getLogger("fastvl.data")

FAILED = "failed"
"""Marker yielded by ``DaliStream`` in place of images for a batch DALI could not decode."""


@functools.lru_cache(maxsize=1)
def dali_import_error() -> Optional[str]:
    """None when DALI (and its PyTorch plugin) imports, else why not, in one line."""
    try:
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
        import nvidia.dali.types  # noqa: F401
    except Exception as error:  # ImportError, or a broken CUDA/driver install raising anything
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def default_device_id() -> Optional[int]:
    """The current CUDA device when there is one (decode with nvJPEG: ``mixed``), else None (a CPU-only
    pipeline: DALI wants ``device_id=None``; its CPU_ONLY_DEVICE_ID constant is refused)."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


@dataclass
class DaliSample:
    """One sample as the pipeline takes it."""

    data: bytes
    """Encoded image: the stored JPEG/PNG bytes, or a PPM of a Pillow decode."""
    box: tuple[int, int, int, int]
    """Crop (top, left, height, width) in the pixels of ``data``'s image."""
    flipped: bool
    index: int
    """The sample's dataset index; it comes back out of the pipeline to prove the pairing."""


class _Feed:
    """The pipeline's input callback. Pulls steps (objects with a ``samples`` list of ``DaliSample``)
    from an iterator; steps with no samples are carried along with the next fed one (DALI cannot run
    an empty batch). ``in_flight`` holds, per fed batch in order, the steps it carries."""

    def __init__(self, steps: Iterator):
        self.steps = steps
        self.in_flight: deque[list] = deque()
        self.tail: list = []

    def __call__(self):
        group = self.tail
        self.tail = []
        try:
            for step in self.steps:
                group.append(step)
                if step.samples:
                    self.in_flight.append(group)
                    return self._arrays(step.samples)
        except Exception as error:  # our own code failed: not a decoding problem, do not retry it
            raise _FeedError() from error
        self.tail = group
        raise StopIteration

    @staticmethod
    def _arrays(samples: Sequence[DaliSample]):
        data = [np.frombuffer(s.data, dtype=np.uint8) for s in samples]
        anchors = [np.array([s.box[1], s.box[0]], dtype=np.int32) for s in samples]  # (x, y)
        shapes = [np.array([s.box[3], s.box[2]], dtype=np.int32) for s in samples]  # (w, h)
        mirror = [np.array(int(s.flipped), dtype=np.int32) for s in samples]
        index = [np.array(s.index, dtype=np.int64) for s in samples]
        return data, anchors, shapes, mirror, index


class _FeedError(RuntimeError):
    pass


def build_pipeline(source, *, batch_size: int, image_size: int, num_threads: int,
                   device_id: Optional[int] = None, jpeg_fancy_upsampling: bool = True, seed: int = 0,
                   prefetch_queue_depth: int = 2):
    """The DALI pipeline of the module docstring around ``source`` (a batch callback returning the
    five per-sample lists). Outputs: images uint8 ``[B, 3, S, S]``, cropped, resized and mirrored (on
    GPU when ``device_id`` is set), and the sample indices int64 ``[B]``.

    ``jpeg_fancy_upsampling`` makes nvJPEG (the ``mixed`` decoder) upsample chroma like
    libjpeg-turbo, i.e. like Pillow and DALI's own CPU decoder; see bench/bench_data.py for the
    measured difference."""
    from nvidia.dali import Pipeline, fn, types

    pipe = Pipeline(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, seed=seed,
                    prefetch_queue_depth=prefetch_queue_depth)
    with pipe:
        data, anchor, shape, mirror, index = fn.external_source(
            source=source, num_outputs=5, batch=True,
            dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT64], ndim=[1, 1, 1, 0, 0])
        images = fn.decoders.image_slice(
            data, anchor, shape, device="mixed" if device_id is not None else "cpu", output_type=types.RGB,
            axis_names="WH", normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
            jpeg_fancy_upsampling=jpeg_fancy_upsampling)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size, antialias=True,
                           interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.UINT8, output_layout="CHW")
        pipe.set_outputs(images, index)
    pipe.build()
    return pipe


def decode_images(encoded: Sequence[bytes], *, jpeg_fancy_upsampling: bool = True,
                  device_id: Optional[int] = None, num_threads: int = 1) -> list[np.ndarray]:
    """Decode whole images to uint8 ``[H, W, 3]`` RGB with DALI alone (no crop, resize or
    normalisation) — for comparing its decoder with Pillow's (tests, bench/bench_data.py)."""
    from nvidia.dali import Pipeline, fn, types

    arrays = [np.frombuffer(data, dtype=np.uint8) for data in encoded]
    pipe = Pipeline(batch_size=len(arrays), num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    with pipe:
        data = fn.external_source(source=lambda: arrays, batch=True, dtype=types.UINT8, ndim=1)
        pipe.set_outputs(fn.decoders.image(data, device="mixed" if device_id is not None else "cpu",
                                           output_type=types.RGB, adjust_orientation=False,
                                           jpeg_fancy_upsampling=jpeg_fancy_upsampling))
    pipe.build()
    (images,) = pipe.run()
    if device_id is not None:
        images = images.as_cpu()
    return [np.array(image) for image in images]


def _to_torch(tensor_list, device_id: Optional[int]) -> torch.Tensor:
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    if device_id is None:
        out = torch.empty(dense.shape(), dtype=torch.uint8)
        feed_ndarray(dense, out)
    else:
        out = torch.empty(dense.shape(), dtype=torch.uint8, device=f"cuda:{device_id}")
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


class DaliStream:
    """Run ``steps`` through DALI in order; iterate ``(step, images)`` pairs.

    ``images`` is the uint8 ``[len(step.samples), 3, S, S]`` batch, None for a step without
    samples, or ``FAILED`` when DALI raised on the batch (or a batch in flight with it): the caller
    decodes those steps itself. A failing batch rebuilds the pipeline (DALI marks a pipeline that
    raised as invalid) and the stream continues with the next step."""

    def __init__(self, steps: Iterable, *, batch_size: int, image_size: int, num_threads: int,
                 device_id: Optional[int] = None, jpeg_fancy_upsampling: bool = True, seed: int = 0):
        self.steps = steps
        self.options = dict(batch_size=batch_size, image_size=image_size, num_threads=num_threads,
                            device_id=device_id, jpeg_fancy_upsampling=jpeg_fancy_upsampling, seed=seed)
        self.device_id = device_id
        self.rebuilds = 0

    def __iter__(self) -> Iterator[tuple[object, Union[torch.Tensor, str, None]]]:
        feed = _Feed(iter(self.steps))
        pipe = build_pipeline(feed, **self.options)
        try:
            while True:
                try:
                    images, index = pipe.run()
                except StopIteration:
                    break
                except _FeedError as error:
                    raise error.__cause__ from None
                except RuntimeError as error:
                    message = next((line for line in str(error).splitlines() if "rror" in line), str(error)[:200])
                    log.warning("data: DALI failed on a batch (%s); decoding %d in-flight batch(es) with "
                                "Pillow and rebuilding the pipeline", message.strip(), len(feed.in_flight))
                    failed = list(feed.in_flight)
                    feed.in_flight.clear()
                    pipe = None  # DALI invalidates a pipeline that raised; free its threads first
                    self.rebuilds += 1
                    pipe = build_pipeline(feed, **self.options)
                    for group in failed:
                        yield from ((step, None) for step in group[:-1])
                        yield group[-1], FAILED
                    continue
                group = feed.in_flight.popleft()
                yield from ((step, None) for step in group[:-1])
                step = group[-1]
                returned = np.asarray(index.as_tensor()).reshape(-1).tolist()
                if returned != [s.index for s in step.samples]:  # never expected: DALI keeps batch order
                    raise RuntimeError(f"DALI returned samples {returned}, fed {[s.index for s in step.samples]}")
                yield step, _to_torch(images, self.device_id)
            yield from ((step, None) for step in feed.tail)
        finally:
            pipe = None  # stop DALI's threads now, also when the consumer abandons the stream

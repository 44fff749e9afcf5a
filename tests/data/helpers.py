"""Shared helpers of the data tests."""
import io
import json

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

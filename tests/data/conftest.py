"""Tiny datasets for the data tests, written once per session into a temporary folder."""
import pytest
from PIL import Image

from fastvl.data.shards import ShardWriter
from fastvl.data.synthetic import generate

from .helpers import jpeg_bytes


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """The built-in generator at toy scale: 30 train samples in 3 shards, 12 held-out."""
    out = tmp_path_factory.mktemp("synth")
    generate(out, train=30, heldout=12, seed=3, image_size=64, shard_size=10, progress=False)
    return out


@pytest.fixture(scope="session")
def half_red_half_blue(tmp_path_factory):
    """Shards whose images are red on the left half and blue on the right, captioned accordingly."""
    out = tmp_path_factory.mktemp("halves")
    image = Image.new("RGB", (64, 64), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 64))
    payload = jpeg_bytes(image)
    with ShardWriter(out, shard_size=16) as writer:
        for i in range(32):
            writer.write(f"half{i:03d}", {"jpg": payload, "txt": "a red square to the left of a blue square",
                                          "json": {"negatives": {
                                              "relation_swap": "a blue square to the left of a red square",
                                              "attribute_swap": "a blue circle to the left of a red circle",
                                              "shuffle": "left of a square red blue square to the a"}}})
    return out

"""Shared pieces of the trainer and eval tests.

- ``StandInRecipe`` / ``StandInLoader``: a tiny recipe and loader for the trainer's mechanics (fast;
  the loader's global batches do not depend on the number of processes).
- ``synth_data``: the built-in dataset at toy scale, generated once per session.
- ``tiny_overrides``: config overrides that make the tiny ALBEF baseline train in seconds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvl.config import RunConfig, load_config
from fastvl.data.batch import Batch
from fastvl.methods.base import Recipe

IMAGE_SIZE = 16
VOCAB = 50
TEXT_LEN = 8


class StandInRecipe(Recipe):
    """Two losses over a linear image encoder and a bag-of-words text encoder: an in-batch contrastive
    loss and a reconstruction loss behind dropout (so the torch RNG matters for exact resume).
    ``method.options``: ``dropout`` (default 0.1), ``scalar_shape`` ("0-dim" or "[1]") of the
    learnable logit scale."""

    default_losses = {"contrast": 1.0, "recon": 0.5}

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        options = cfg.method.options
        self.image = nn.Sequential(nn.Flatten(), nn.Linear(3 * IMAGE_SIZE * IMAGE_SIZE, 32), nn.LayerNorm(32))
        self.text = nn.EmbeddingBag(VOCAB, 32)
        self.decoder = nn.Sequential(nn.Dropout(options.get("dropout", 0.1)), nn.Linear(32, 3 * IMAGE_SIZE * IMAGE_SIZE))
        scale = torch.tensor(5.0) if options.get("scalar_shape", "0-dim") == "0-dim" else torch.tensor([5.0])
        self.scale = nn.Parameter(scale)

    def forward(self, batch: Batch) -> dict:
        image = F.normalize(self.image(batch.images).float(), dim=-1)
        text = F.normalize(self.text(batch.input_ids).float(), dim=-1)
        logits = self.scale * image @ text.t()
        targets = torch.arange(len(batch))
        contrast = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
        recon = F.mse_loss(self.decoder(image.to(batch.images.dtype)).float(), batch.images.flatten(1).float())
        return self.total({"contrast": contrast, "recon": recon}, {"scale": self.scale.reshape(())})


class StandInLoader:
    """Infinite like ``fastvl.data``'s train loader: global batch ``i`` of epoch ``e`` is a slice of a
    seeded permutation of ``NUM_SAMPLES`` synthetic pairs, this rank's micro-batch its contiguous part.
    Position = (epoch, batches into the epoch)."""

    NUM_SAMPLES = 96

    def __init__(self, cfg: RunConfig, split: str, rank: int, world_size: int, epoch: int):
        self.rank, self.micro = rank, cfg.data.batch_size
        self.global_batch = self.micro * world_size
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(self.NUM_SAMPLES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        self.ids = torch.randint(1, VOCAB, (self.NUM_SAMPLES, TEXT_LEN), generator=g)
        self.batches_per_epoch = self.NUM_SAMPLES // self.global_batch
        self.epoch, self.position = epoch, 0

    def __iter__(self):
        while True:
            order = torch.randperm(self.NUM_SAMPLES, generator=torch.Generator().manual_seed(self.epoch))
            start = self.position * self.global_batch + self.rank * self.micro
            rows = order[start:start + self.micro]
            self.position += 1
            if self.position == self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield Batch(self.images[rows], self.ids[rows], torch.ones_like(self.ids[rows]), [f"s{int(r)}" for r in rows])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def stand_in_config(tmp_path, *overrides: str) -> RunConfig:
    """A fast config for the stand-ins (data.train only has to exist: it points at tmp_path)."""
    return load_config(None, [f"data.train={tmp_path}", f"train.output_dir={tmp_path / 'run'}",
                              "data.batch_size=8", "train.steps=6", "train.warmup_steps=2", "train.log_every=1",
                              "train.save_every=0", "train.precision=fp32", "train.lr=0.01", *overrides])


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """The built-in generator at toy scale: 320 train samples in 4 shards, 48 held-out."""
    from fastvl.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, train=320, heldout=48, seed=0, image_size=64, shard_size=80, progress=False)
    return out


def tiny_overrides(data, out_dir, *extra: str) -> list[str]:
    """The tiny ALBEF baseline (configs/tiny_albef.json) made quick: small batches, no workers."""
    return [f"data.train={data / 'train'}", f"data.eval={data / 'heldout'}", f"train.output_dir={out_dir}",
            "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=64", "train.steps=6",
            "train.warmup_steps=2", "train.log_every=1", "train.save_every=0", "train.precision=fp32",
            "eval.max_samples=48", "eval.itm_rerank=4", *extra]

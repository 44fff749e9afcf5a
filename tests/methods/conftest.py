"""Shared by the method tests: the built-in data at toy scale and the overrides that make a run quick."""
import json

import pytest
import torch

from fastvl.config import load_config
from fastvl.methods import build_method


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """The built-in generator at toy scale: 128 train samples in 2 shards, 8 held-out."""
    from fastvl.data.synthetic import generate

    out = tmp_path_factory.mktemp("synth_methods")
    generate(out, train=128, heldout=8, seed=0, image_size=64, shard_size=64, progress=False)
    return out


def quick_run(synth, out_dir, *overrides: str) -> list[str]:
    """Overrides that point a recipe's tiny config at ``synth`` and keep the run quick: batch 16, no
    loader workers, a metrics row every step, no checkpoints unless asked, a fresh start."""
    return [f"data.train={synth / 'train'}", f"data.eval={synth / 'heldout'}", f"train.output_dir={out_dir}",
            "data.batch_size=16", "data.num_workers=0", "train.warmup_steps=3", "train.log_every=1",
            "train.save_every=0", "train.resume=false", *overrides]


def read_rows(path) -> list[dict]:
    """The rows of a metrics.jsonl."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def recipe_config(config: str, *overrides: str, **options):
    """``config`` with ``--set``-style overrides and ``method.options`` given as keywords (JSON values)."""
    return load_config(config, [*overrides, *(f"method.options.{k}={json.dumps(v)}" for k, v in options.items())])


def build_recipe(config: str, *overrides: str, seed: int = 0, **options):
    """The recipe of ``recipe_config(...)``, initialised from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    return build_method(recipe_config(config, *overrides, **options)).eval()

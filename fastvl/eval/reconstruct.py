"""Masked-image reconstructions as a PNG grid, for looking at what a MIM recipe learned.

One row per sample, three columns: the original image, the masked input (masked patches grey, the
dataset mean), and the reconstruction (visible patches from the input, masked patches from the
decoder). Works with any recipe that has ``reconstruct(batch, step) -> Reconstruction`` (``maskvlm``).

    python -m fastvl.eval.reconstruct --checkpoint RUN_DIR --data data/synth/heldout --out grid.png

``--step`` picks the masks (the draws of that training step; default 0), ``--samples`` the rows.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from ..config import ConfigError
from ..data.batch import Batch
from ..data.transforms import denormalize

COLUMNS = ("original", "masked", "reconstruction")
PAD = 2
MIN_CELL = 128
"""Cells are upscaled (nearest neighbour) to at least this many pixels so tiny images stay visible."""


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Normalised [B, 3, S, S] -> uint8 [B, S, S, 3]."""
    return denormalize(images.float().cpu()).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def reconstruction_grid(recipe, batch: Batch, step: int = 0, min_cell: int = MIN_CELL) -> Image.Image:
    """The grid image for ``batch`` (rows = samples, columns = ``COLUMNS``)."""
    if not hasattr(recipe, "reconstruct"):
        raise ConfigError(f"recipe {type(recipe).__name__} does not reconstruct images (no masked image modeling)")
    recipe.eval()
    result = recipe.reconstruct(batch, step)
    columns = [_to_uint8(batch.images), _to_uint8(result.masked), _to_uint8(result.pasted)]
    rows, size = columns[0].shape[0], columns[0].shape[1]
    scale = max(1, -(-min_cell // size))
    cell = size * scale
    grid = Image.new("RGB", (len(columns) * (cell + PAD) + PAD, rows * (cell + PAD) + PAD), (255, 255, 255))
    for c, images in enumerate(columns):
        for r in range(rows):
            tile = Image.fromarray(images[r].numpy()).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (PAD + c * (cell + PAD), PAD + r * (cell + PAD)))
    return grid


def save_reconstruction_grid(recipe, batch: Batch, out: str | Path, step: int = 0) -> Path:
    """Write ``reconstruction_grid(recipe, batch, step)`` to ``out`` (PNG) and return the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    reconstruction_grid(recipe, batch, step).save(out, format="PNG")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvl.eval.reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, step_<N> folder, model.safetensors or an exported folder")
    parser.add_argument("--data", required=True, help="image-caption data (shards folder or JSONL)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--samples", type=int, default=8, help="rows of the grid")
    parser.add_argument("--step", type=int, default=0, help="training step whose mask draws to use")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .loading import recipe_and_batches

        if args.samples < 1:
            raise ConfigError("--samples must be positive")
        recipe, _, _, batches = recipe_and_batches(args.checkpoint, args.data, args.samples, args.samples)
        batch = next(iter(batches), None)  # the first samples of data, in eval order
        if batch is None:
            raise ConfigError(f"--data: no samples in {args.data}")
        path = save_reconstruction_grid(recipe, batch, args.out, args.step)
    except ConfigError as error:
        print(f"python -m fastvl.eval.reconstruct: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(batch)} samples: {', '.join(COLUMNS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

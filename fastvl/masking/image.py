"""Image masking policies: which ViT patches a masked-image-modeling branch hides.

``BlockImageMasking`` is SimMIM's random block masking (Xie et al., 2021), used by MaskVLM: the
patch grid ``G x G`` is cut into blocks of ``block x block`` patches (MaskVLM: 32x32-pixel masking
patches over 16x16-pixel ViT patches, i.e. ``block = 2``), and exactly
``ceil(ratio * num_blocks)`` blocks per image are drawn uniformly without replacement. Every patch
of a drawn block is masked, so the patch mask is the block mask upsampled by ``block`` in both
directions, and the masked fraction is ``ceil(ratio * num_blocks) / num_blocks`` (0.6 -> 30/49
blocks at 224 px, 10/16 blocks for the tiny preset's 64 px images with 8 px patches, where a block of
2x2 patches is 16x16 pixels: the block is kept at 2x2 *patches* rather than 32 pixels, so the
block-to-patch structure the paper relies on — a masked patch's neighbours are mostly masked too —
is the same at every preset).

Draws come from ``global_uniform`` (seeded by (seed, step, stream)), so a sample's mask does not
depend on how the global batch is split across ranks.
"""
from __future__ import annotations

import math

import torch

from ..dist import global_uniform


class BlockImageMasking:
    """``__call__(batch_size, step, device) -> [B, G*G] bool`` (True = masked patch, row-major grid
    order, the order of ``VisionTransformer.patchify`` and its patch tokens).

    Args:
        grid_size: patches per side ``G`` (image_size / patch_size).
        ratio: fraction of blocks masked, in (0, 1); ``ceil(ratio * num_blocks)`` blocks per image.
        block: block side in patches; must divide ``grid_size``.
        seed, stream: with the step, the seed of the draws (``global_uniform``).
    """

    def __init__(self, grid_size: int, ratio: float = 0.6, block: int = 2, seed: int = 0, stream: int = 3):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"image mask ratio must be in (0, 1), got {ratio}")
        if block < 1 or grid_size % block:
            raise ValueError(f"mask block of {block} patches must divide the patch grid of {grid_size}")
        self.grid_size, self.ratio, self.block = grid_size, ratio, block
        self.seed, self.stream = seed, stream
        self.blocks_per_side = grid_size // block
        self.num_blocks = self.blocks_per_side ** 2
        self.masked_blocks = min(self.num_blocks, math.ceil(ratio * self.num_blocks))

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def masked_patches(self) -> int:
        """Masked patches per image (the same for every image)."""
        return self.masked_blocks * self.block ** 2

    def block_mask(self, batch_size: int, step: int, device: torch.device) -> torch.Tensor:
        """[B, num_blocks] bool with exactly ``masked_blocks`` True per row: the blocks whose uniform
        draw ranks among the ``masked_blocks`` smallest (a uniformly random subset)."""
        u = global_uniform(batch_size, (self.num_blocks,), seed=self.seed, step=step, stream=self.stream,
                           device=torch.device("cpu"))
        rank = u.argsort(dim=1).argsort(dim=1)
        return (rank < self.masked_blocks).to(device)

    def __call__(self, batch_size: int, step: int, device: torch.device) -> torch.Tensor:
        return blocks_to_patches(self.block_mask(batch_size, step, device), self.blocks_per_side, self.block)


def blocks_to_patches(block_mask: torch.Tensor, blocks_per_side: int, block: int) -> torch.Tensor:
    """[B, K*K] block mask (row-major) -> [B, (K*block)^2] patch mask (row-major): patch (r, c) takes
    block (r // block, c // block)."""
    b = block_mask.shape[0]
    grid = block_mask.view(b, blocks_per_side, blocks_per_side)
    grid = grid.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
    return grid.reshape(b, -1)


def patches_to_pixels(patch_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, G*G] patch mask -> [B, 1, G*p, G*p] pixel mask (for pasting and looking at masks)."""
    b, n = patch_mask.shape
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"patch mask of {n} patches is not a square grid")
    pixels = patch_mask.view(b, grid, grid).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return pixels.unsqueeze(1)

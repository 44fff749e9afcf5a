"""Rank-aware helpers that make a recipe's result independent of how the global batch is split.

Contrastive and hard-negative objectives see the whole global batch (features gathered across ranks,
gradients routed back), and every random draw a recipe makes is taken for the *global* batch from a
generator seeded by (seed, step, stream) and then sliced to this rank's rows. So 1 process with
batch 2b and 2 processes with b each compute the same losses.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait until every rank got here; nothing on one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce, so it
    also runs on gloo, which has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = rank_and_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [b, ...] from every rank along dim 0 (rank order); identity on one process.
    Every rank must pass the same shape."""
    _, world = rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def pad_to_global_length(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Zero-pad ``x`` along ``dim`` to the longest size any rank has (captions are padded per batch,
    so ranks can differ), so that it can be gathered."""
    _, world = rank_and_world()
    if world == 1:
        return x
    longest = torch.tensor([x.shape[dim]], device=x.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    missing = int(longest) - x.shape[dim]
    if missing == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = missing
    return torch.cat([x, x.new_zeros(pad_shape)], dim=dim)


def global_offset(local_rows: int) -> int:
    """Index of this rank's first row in the global batch."""
    rank, _ = rank_and_world()
    return rank * local_rows


def global_uniform(local_rows: int, row_shape: tuple[int, ...], *, seed: int, step: int, stream: int,
                   device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) draws [local_rows, *row_shape] for this rank's rows of a global batch.

    The draws of the whole global batch come from one generator seeded by (seed, step, stream); a
    recipe uses a distinct ``stream`` per purpose so its draws are independent."""
    _, world = rank_and_world()
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + stream)
    draws = torch.rand((local_rows * world, *row_shape), generator=generator)
    start = global_offset(local_rows)
    return draws[start:start + local_rows].to(device)

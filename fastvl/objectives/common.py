"""Reductions shared by the objectives."""
import torch
import torch.distributed as dist

from ..dist import rank_and_world


def global_masked_mean(values: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """``values.sum()`` divided by the number of items over *all* ranks (times the world size), so
    that averaging this rank-local loss across ranks — as data-parallel gradient averaging does —
    gives the mean over the global batch, whatever the split. ``count`` is this rank's item count."""
    _, world = rank_and_world()
    total = torch.as_tensor(count, dtype=torch.float32, device=values.device)
    if world > 1:
        total = total.clone()
        dist.all_reduce(total)
        total = total / world
    return values.sum() / total.clamp_min(1.0).to(values.dtype)

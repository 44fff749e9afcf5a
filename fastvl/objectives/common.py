"""Reductions and targets shared by the objectives."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

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


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy against a target distribution: -sum(targets * log_softmax(logits)), [n]."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1)


def distilled_targets(teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """ALBEF's momentum-distillation targets: alpha * softmax(teacher_logits) + (1 - alpha) * one-hot."""
    one_hot = F.one_hot(labels, teacher_logits.shape[-1]).to(teacher_logits.dtype)
    return alpha * teacher_logits.softmax(dim=-1) + (1.0 - alpha) * one_hot

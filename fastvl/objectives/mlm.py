"""Masked language modeling: cross-entropy at the masked positions only."""
import torch
import torch.nn.functional as F

from .common import global_masked_mean


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logits`` [n, V] at the n masked positions of this rank, ``targets`` [n]; the mean is over the
    masked positions of the global batch. Computed in fp32."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return global_masked_mean(ce, targets.numel())

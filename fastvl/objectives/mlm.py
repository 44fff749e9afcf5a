"""Masked language modeling: cross-entropy at the masked positions only, optionally mixed with ALBEF's
momentum distillation (soft cross-entropy against the momentum model's MLM distribution)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .common import global_masked_mean, soft_cross_entropy


def mlm_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: Optional[torch.Tensor] = None,
             alpha: float = 0.0) -> torch.Tensor:
    """``logits`` [n, V] at the n masked positions of this rank, ``targets`` [n]; the mean is over the
    masked positions of the global batch. Computed in fp32.

    With ``teacher_probs`` [n, V] (the momentum model's softmax at the same positions) the loss is
    ALBEF's ``(1 - alpha) * CE(targets) + alpha * CE(teacher_probs)``; the soft term is a cross-entropy,
    not a KL divergence: same gradient, but it does not subtract the teacher's entropy (ALBEF logs it so)."""
    logits = logits.float()
    per_position = F.cross_entropy(logits, targets, reduction="none")
    if teacher_probs is not None:
        per_position = (1.0 - alpha) * per_position + alpha * soft_cross_entropy(logits, teacher_probs.float())
    return global_masked_mean(per_position, targets.numel())

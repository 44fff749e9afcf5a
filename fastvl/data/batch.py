"""The unit that flows from data to the model: one collated micro-batch of image-caption pairs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Batch:
    images: torch.Tensor
    """[B, 3, H, W] float32, normalised (ImageNet mean/std)."""
    input_ids: torch.Tensor
    """[B, L] int64 WordPiece ids: [CLS] caption [SEP] [PAD]..."""
    attention_mask: torch.Tensor
    """[B, L] int64, 1 for real tokens (including [CLS]/[SEP]), 0 for padding."""
    keys: list[str] = field(default_factory=list)
    """Sample keys (shard member names or JSONL record ids), for tracing and exact resume."""
    negatives: Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]] = None
    """ARO-style hard-negative captions per type ("relation_swap", "attribute_swap", "shuffle"):
    (input_ids, attention_mask), each [B, L]. Present in eval data from the built-in generator."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        negatives = None
        if self.negatives is not None:
            negatives = {k: (move(ids), move(mask)) for k, (ids, mask) in self.negatives.items()}
        return Batch(move(self.images), move(self.input_ids), move(self.attention_mask), list(self.keys), negatives)

    def slice(self, start: int, stop: int) -> "Batch":
        negatives = None
        if self.negatives is not None:
            negatives = {k: (ids[start:stop], m[start:stop]) for k, (ids, m) in self.negatives.items()}
        return Batch(self.images[start:stop], self.input_ids[start:stop], self.attention_mask[start:stop],
                     self.keys[start:stop], negatives)

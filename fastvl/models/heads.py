"""Prediction heads on top of the encoders.

- ``MlmHead``: BERT's LM prediction head, ``logits = LN(GELU(W h + b)) · E^T + bias`` with the decoder
  tied to the word embeddings ``E`` [V, Dt] (their ``nn.Embedding`` is passed in at call time, so no
  parameter is stored twice; under ZeRO-3 ``E`` is registered as an external parameter of the head, see
  ``AlbefModel.zero3_external_parameters``, and read only inside the head's forward, where ZeRO-3 has
  gathered it). Parameter names are
  those of ``transformers``' ``cls.predictions`` (``transform.dense``, ``transform.LayerNorm``, ``bias``).
- ITM head: ``nn.Linear(Dt, 2)`` on the fused [CLS] (built in ``albef.AlbefModel``).
- ITC projections: ``nn.Linear(Dv, E)`` / ``nn.Linear(Dt, E)`` on the unimodal [CLS], then unit norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bert import BERT_LN_EPS


class MlmTransform(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=BERT_LN_EPS)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(hidden)))


class MlmHead(nn.Module):
    """``forward(hidden [..., Dt], word_embeddings: nn.Embedding(V, Dt)) -> logits [..., V]``.

    Gradients reach the transform, ``bias`` and, through the tied decoder, the word embeddings."""

    def __init__(self, width: int, vocab_size: int):
        super().__init__()
        self.transform = MlmTransform(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: nn.Embedding) -> torch.Tensor:
        return F.linear(self.transform(hidden), word_embeddings.weight, self.bias)


def unit_projection(projection: nn.Linear, cls_state: torch.Tensor) -> torch.Tensor:
    """``normalize(projection(cls_state))`` along the last dim: an ITC embedding [B, E] of norm 1."""
    return F.normalize(projection(cls_state), dim=-1)

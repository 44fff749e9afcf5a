"""Text masking policies: turn a caption batch into what the model reads and what it must predict."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.tokenizer import SpecialIds
from ..dist import global_uniform

IGNORE_INDEX = -100


@dataclass
class TextMask:
    input_ids: torch.Tensor
    """[B, L] the corrupted caption the model reads."""
    labels: torch.Tensor
    """[B, L] original ids at the positions to predict, IGNORE_INDEX elsewhere."""

    @property
    def mask(self) -> torch.Tensor:
        return self.labels != IGNORE_INDEX


def first_ordinary_id(special: SpecialIds) -> int:
    """Random replacements are drawn from ids above the special ones (BERT's [PAD]..[MASK] = 0..103)."""
    return max(special.pad, special.cls, special.sep, special.mask, special.unk) + 1


def maskable_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, special: SpecialIds) -> torch.Tensor:
    """Real tokens that are not [CLS]/[SEP]/[PAD]."""
    return attention_mask.bool() & (input_ids != special.cls) & (input_ids != special.sep) & (input_ids != special.pad)


class RandomTextMasking:
    """BERT-style masking: each maskable token is chosen with ``probability``; a chosen token becomes
    [MASK], a random ordinary token, or stays itself with the ``replace`` fractions (0.8/0.1/0.1 for
    BERT and ALBEF; MaskVLM uses 1/0/0 at 30%).

    Draws come from ``global_uniform`` (seeded by seed, step) with rows of ``draw_length`` positions,
    sliced to the batch's length, so the choice for a sample depends neither on how the global batch
    is split across ranks nor on how far each rank's batch is padded.
    """

    def __init__(self, special: SpecialIds, probability: float, replace=(0.8, 0.1, 0.1), seed: int = 0,
                 stream: int = 1, draw_length: int = 0):
        self.special, self.probability, self.replace = special, probability, tuple(replace)
        self.seed, self.stream, self.draw_length = seed, stream, draw_length

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, step: int) -> TextMask:
        b, length = input_ids.shape
        u = global_uniform(b, (3, max(length, self.draw_length)), seed=self.seed, step=step, stream=self.stream,
                           device=input_ids.device)[:, :, :length]
        chosen = maskable_positions(input_ids, attention_mask, self.special) & (u[:, 0] < self.probability)
        to_mask = chosen & (u[:, 1] < self.replace[0])
        to_random = chosen & (u[:, 1] >= self.replace[0]) & (u[:, 1] < self.replace[0] + self.replace[1])
        low = first_ordinary_id(self.special)
        random_ids = low + (u[:, 2] * (self.special.vocab_size - low)).long().clamp_max(self.special.vocab_size - 1 - low)
        corrupted = torch.where(to_mask, torch.full_like(input_ids, self.special.mask), input_ids)
        corrupted = torch.where(to_random, random_ids, corrupted)
        labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return TextMask(corrupted, labels)

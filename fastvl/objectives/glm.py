"""Generalized language modeling with pseudo masks (C-Mask eq. 3, appendix I; UniLMv2-style layout).

Given a caption ``x`` [B, L], a mask ``M`` (positions to predict) and a factorization step per masked
token (``step`` >= 1; tokens of one span share a step), the model maximises

    sum_s  log p(x_{M_s} | x_{unmasked}, x_{M_<s}, image)          (eq. 3, teacher forcing)

Layout (``pseudo=True``): the text keeps its original tokens; for every masked position a pseudo-mask
token ([MASK] id, *same position id* as the token it stands for) is appended after the caption.
Attention follows the kind/step rule of ``fastvl_kernels.permutation_attention``:

- image tokens and unmasked text: CONTEXT (visible to all; they see only CONTEXT keys);
- masked originals: ORIGINAL with their step (seen by originals of step >= s, pseudo masks of step > s);
- pseudo masks: PSEUDO with the step of the token they predict (they see CONTEXT, earlier originals and
  the pseudo masks of their own step — never the token they predict nor later steps).

The loss is the cross-entropy of the pseudo-mask outputs against the original tokens, averaged over
the pseudo masks of the global batch, in fp32.

Special cases of the same builder: vanilla MLM (``pseudo=False``: [MASK] in place, all CONTEXT, one
step, no pseudo masks, loss at the masked positions); left-to-right LM (every token its own span,
steps = positions); span MLM with pseudo masks (every span step 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastvl_kernels import CONTEXT, ORIGINAL, PSEUDO

from ..masking.text import IGNORE_INDEX
from .common import global_masked_mean


@dataclass
class GlmInputs:
    """The sequence the model reads (text part; the image is prepended as CONTEXT by the model)."""

    input_ids: torch.Tensor
    """[B, T] caption (originals, or [MASK] in place for vanilla MLM) followed by P pseudo masks."""
    position_ids: torch.Tensor
    """[B, T] positions; a pseudo mask carries the position of the token it predicts."""
    attention_mask: torch.Tensor
    """[B, T] bool, True = real token (unused pseudo slots are padding)."""
    kind: torch.Tensor
    """[B, T] int32 CONTEXT / ORIGINAL / PSEUDO."""
    step: torch.Tensor
    """[B, T] int32 factorization step (0 for context)."""
    labels: torch.Tensor
    """[B, T] the token each prediction row must produce, IGNORE_INDEX elsewhere."""
    source_position: torch.Tensor
    """[B, T] long: for a prediction row, the caption position it predicts; -1 elsewhere."""
    caption_length: int
    """L: columns ``[0, L)`` are the caption, ``[L, T)`` the pseudo masks."""

    @property
    def predict(self) -> torch.Tensor:
        """[B, T] bool: rows whose output is a prediction (pseudo masks, or in-place [MASK]s)."""
        return self.labels != IGNORE_INDEX


def build_glm_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask: torch.Tensor,
                     step: torch.Tensor, *, mask_id: int, pseudo: bool = True) -> GlmInputs:
    """Build the generalized-LM sequence for ``mask`` [B, L] bool and ``step`` [B, L] (>= 1 where masked).

    With ``pseudo=True`` the P = max masked count pseudo masks of each row are appended in caption
    order; with ``pseudo=False`` the masked tokens become [MASK] in place and everything is CONTEXT."""
    b, length = input_ids.shape
    device = input_ids.device
    mask = mask.bool() & attention_mask.bool()
    positions = torch.arange(length, device=device).expand(b, length)
    if not pseudo:
        ids = torch.where(mask, torch.full_like(input_ids, mask_id), input_ids)
        labels = torch.where(mask, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        zeros = torch.zeros(b, length, dtype=torch.int32, device=device)
        source = torch.where(mask, positions, torch.full_like(positions, -1))
        return GlmInputs(ids, positions.clone(), attention_mask.bool(), zeros + CONTEXT, zeros, labels, source, length)

    step = step.to(torch.int32)
    kind_text = torch.where(mask, torch.full_like(step, ORIGINAL), torch.full_like(step, CONTEXT))
    step_text = torch.where(mask, step, torch.zeros_like(step))
    counts = mask.sum(1)
    p = int(counts.max()) if b > 0 else 0
    # the k-th masked position of each row (caption order) goes to pseudo slot k
    slot = torch.cumsum(mask.long(), dim=1) - 1
    src = torch.full((b, p), -1, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)[:, None].expand(b, length)
    src[rows[mask], slot[mask]] = positions[mask]
    real = src >= 0
    gather_at = src.clamp(min=0)
    pseudo_ids = torch.where(real, torch.full_like(src, mask_id), torch.zeros_like(src))
    no_step = torch.zeros(b, p, dtype=torch.int32, device=device)
    pseudo_step = torch.where(real, torch.gather(step, 1, gather_at), no_step)
    pseudo_labels = torch.where(real, torch.gather(input_ids, 1, gather_at), torch.full_like(src, IGNORE_INDEX))

    return GlmInputs(
        input_ids=torch.cat([input_ids, pseudo_ids], 1),
        position_ids=torch.cat([positions, gather_at], 1),
        attention_mask=torch.cat([attention_mask.bool(), real], 1),
        kind=torch.cat([kind_text, torch.full_like(pseudo_step, PSEUDO)], 1),
        step=torch.cat([step_text, pseudo_step], 1),
        labels=torch.cat([torch.full_like(input_ids, IGNORE_INDEX), pseudo_labels], 1),
        source_position=torch.cat([torch.full_like(positions, -1), src], 1),
        caption_length=length,
    )


def glm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the n prediction rows ``logits`` [n, V] against ``targets`` [n], fp32, averaged
    over the prediction rows of the global batch. Gradient: (softmax - onehot) / n_global per row."""
    ce = F.cross_entropy(logits.float(), targets, reduction="none")
    return global_masked_mean(ce, targets.numel())

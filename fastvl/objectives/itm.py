"""Image-text matching with in-batch hard negatives drawn by ITC similarity (ALBEF section 3.2)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..dist import gather_with_grad, global_offset, pad_to_global_length, rank_and_world


def sample_by_weight(weights: torch.Tensor, exclude: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One index per row of ``weights`` [b, G], never ``exclude`` [b], drawn with probability
    proportional to the weights by inverting the CDF at the uniforms ``u`` [b].

    Computed in fp32. Rows whose weights are all zero, negative or non-finite (fp16 overflow in the
    similarities is what makes ALBEF/BLIP crash with "invalid multinomial distribution") fall back to
    uniform over the other columns instead of failing."""
    b, g = weights.shape
    if g < 2:
        raise ValueError("hard-negative sampling needs a global batch of at least 2 pairs")
    w = torch.nan_to_num(weights.float(), nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    w[torch.arange(b, device=w.device), exclude] = 0.0
    total = w.sum(dim=1, keepdim=True)
    uniform = torch.ones_like(w)
    uniform[torch.arange(b, device=w.device), exclude] = 0.0
    bad = ~(total > 0) | ~torch.isfinite(total)
    w = torch.where(bad, uniform, w)
    # first column whose CDF reaches u * total: u in (0, 1) never lands on a zero-weight column
    cdf = torch.cumsum(w, dim=1)
    target = u.float().clamp(1e-6, 1.0 - 1e-6).unsqueeze(1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target).squeeze(1).clamp_max(g - 1)
    return idx


def itm_loss(
    fuse_cls: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor],
    itm_head: Callable[[torch.Tensor], torch.Tensor],
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    attention_mask: torch.Tensor,
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    u: torch.Tensor,
) -> torch.Tensor:
    """Binary matching loss over b positives, b (image, hard-negative text) and b (hard-negative
    image, text) pairs. Negatives come from the whole global batch (states gathered with gradients),
    drawn with softmax(ITC similarity) weights in fp32; ``u`` [b, 2] are the uniforms for the draws.

    ``fuse_cls(texts [3b, L, D], masks [3b, L], image_index [3b], other_images) -> [3b, D]`` is the
    fused [CLS] of text row i with image ``image_index[i]`` of this rank's b images followed by
    ``other_images``: the hard-negative images' states [b, N, Dv] taken from the gathered global batch,
    or None on one process, where every image is one of this rank's. Images are named by index rather
    than repeated so that the fusion can project each image's side of its cross-attention once
    (``fusion.ImageContext``)."""
    b = image_states.shape[0]
    self_index = torch.arange(b, device=image_states.device) + global_offset(b)
    neg_text = sample_by_weight(F.softmax(sim_i2t.float(), dim=1), self_index, u[:, 0])
    neg_image = sample_by_weight(F.softmax(sim_t2i.float(), dim=1), self_index, u[:, 1])
    text_states, attention_mask = pad_to_global_length(text_states), pad_to_global_length(attention_mask)
    all_texts = gather_with_grad(text_states)
    all_masks = gather_with_grad(attention_mask)
    local = torch.arange(b, device=image_states.device)
    if rank_and_world()[1] == 1:
        other_images, neg_rows = None, neg_image
    else:
        other_images, neg_rows = gather_with_grad(image_states).index_select(0, neg_image), local + b
    texts = torch.cat([text_states, all_texts.index_select(0, neg_text), text_states])
    masks = torch.cat([attention_mask, all_masks[neg_text], attention_mask])
    logits = itm_head(fuse_cls(texts, masks, torch.cat([local, local, neg_rows]), other_images))
    labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)]).to(logits.device)
    return F.cross_entropy(logits.float(), labels)

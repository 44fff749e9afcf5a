"""Image-text contrastive loss (ALBEF/CLIP InfoNCE, both directions) over the global batch, optionally
against ALBEF's momentum features and queues with momentum-distilled soft targets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..dist import gather_with_grad, global_offset
from .common import distilled_targets, soft_cross_entropy


@dataclass
class MomentumKeys:
    """ALBEF's contrastive keys: the momentum model's unit-norm features of this step's pairs and the
    queues of earlier steps' momentum features (all detached)."""

    image: torch.Tensor
    """[b, E] momentum image features of this rank's pairs (the distillation queries)."""
    text: torch.Tensor
    """[b, E] momentum text features of this rank's pairs."""
    all_image: torch.Tensor
    """[G, E] ``image`` of every rank, in rank order (the global batch)."""
    all_text: torch.Tensor
    """[G, E] ``text`` of every rank."""
    image_queue: torch.Tensor
    """[Q, E] momentum image features of earlier global batches (Q may be 0)."""
    text_queue: torch.Tensor
    """[Q, E] momentum text features of earlier global batches."""


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, temperature: torch.Tensor,
             momentum: Optional[MomentumKeys] = None, alpha: float = 0.0):
    """``image_feat``/``text_feat``: unit-norm [b, E] for this rank's pairs.

    Without ``momentum``, each local image is contrasted against every text of the global batch and
    vice versa (features gathered across ranks with gradients). With ``momentum`` (ALBEF), the keys are
    the momentum features of the global batch followed by the queue, [G + Q, E], and no gradient flows
    into them; with ``alpha`` > 0 the targets are ``distilled_targets`` of the momentum queries'
    similarities to the same keys (ALBEF eq. 3 with ITC_MoD), with ``alpha`` = 0 the one-hot positives.

    Returns (loss, sim_i2t [b, G], sim_t2i [b, G]) with G the global batch; the similarities (fp32,
    detached, the batch columns only) feed hard-negative mining."""
    if momentum is None:
        text_keys, image_keys = [gather_with_grad(text_feat).float()], [gather_with_grad(image_feat).float()]
    else:
        text_keys = [momentum.all_text.float(), momentum.text_queue.float()]
        image_keys = [momentum.all_image.float(), momentum.image_queue.float()]
    temperature = temperature.float()
    sim_i2t = similarities(image_feat, text_keys, temperature)
    sim_t2i = similarities(text_feat, image_keys, temperature)
    rows = image_feat.shape[0]
    targets = torch.arange(rows, device=image_feat.device) + global_offset(rows)
    if momentum is not None and alpha > 0:
        with torch.no_grad():
            soft_i2t = distilled_targets(similarities(momentum.image, text_keys, temperature), targets, alpha)
            soft_t2i = distilled_targets(similarities(momentum.text, image_keys, temperature), targets, alpha)
        loss = (soft_cross_entropy(sim_i2t, soft_i2t).mean() + soft_cross_entropy(sim_t2i, soft_t2i).mean()) / 2
    else:
        loss = (F.cross_entropy(sim_i2t, targets) + F.cross_entropy(sim_t2i, targets)) / 2
    batch = image_keys[0].shape[0]
    return loss, sim_i2t[:, :batch].detach(), sim_t2i[:, :batch].detach()


def similarities(queries: torch.Tensor, keys: list[torch.Tensor], temperature: torch.Tensor) -> torch.Tensor:
    """``queries @ cat(keys).T / temperature`` in fp32, one product per key block: the [b, Q] logits
    are small, a concatenated [G + Q, E] key matrix (65,536 queue rows) would be a large copy per call."""
    queries = queries.float()
    return torch.cat([queries @ block.t() for block in keys], dim=1) / temperature

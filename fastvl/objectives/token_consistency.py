"""EPIC's per-token image-text consistency loss (papers/004_4782e0e015295f89.txt, sec. 4.2, eq. 1-2 and 6).

The paper calls it "ITC"; here it is "token consistency" (ITC is image-text contrastive in fastvl).

Labels (eq. 6). With the original caption ``w`` and the corrupted one ``w̄`` (replacements at the
masked positions M), the inconsistent positions are ``T = {t in M : w̄_t != w_t}``. A replacement
that happens to equal the original token is *consistent*: the label is decided by comparing ids,
never by "was this position masked". Label 1 = consistent, 0 = inconsistent.

Loss (eq. 1-2). From the VLM's last fused hidden state of each token of (w̄, v), a linear head gives
a logit ``z_i = β^T h̄_i`` and ``D_i = sigmoid(z_i)`` = P(token i is consistent with the image)::

    per token  ℓ_i = -[y_i log D_i + (1 - y_i) log(1 - D_i)]      (binary cross-entropy, fp32)
    L = Σ_{real tokens i} ℓ_i / Ω,    Ω = number of real tokens in the global batch

i.e. eq. 2 summed over every real token (consistent *and* inconsistent — the point of the task), then
averaged per token over the global batch (``common.global_masked_mean``) so that the weight λ = 8
applies to a per-token loss whatever the caption lengths and the split over ranks.
Gradient: ``dL/dz_i = (sigmoid(z_i) - y_i) / Ω`` on real tokens, 0 on padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import global_masked_mean


def consistency_labels(original_ids: torch.Tensor, corrupted_ids: torch.Tensor) -> torch.Tensor:
    """Eq. 6: [B, L] float labels, 1 where ``corrupted_ids`` equals ``original_ids`` (consistent), 0 where
    a replacement differs (inconsistent). Padding rows get 1 but are never counted by the loss."""
    if original_ids.shape != corrupted_ids.shape:
        raise ValueError(f"consistency_labels: shapes differ, {tuple(original_ids.shape)} vs "
                         f"{tuple(corrupted_ids.shape)}")
    return (original_ids == corrupted_ids).float()


def token_consistency_loss(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Eq. 2 per token, averaged over the real tokens of the global batch.

    Args:
        logits: [B, L] z_i = β^T h̄_i (sigmoid(z_i) = P(consistent)).
        labels: [B, L] 1 = consistent, 0 = inconsistent (``consistency_labels``).
        real: [B, L] bool/int, True for real tokens (the attention mask); padding never counts.
    Returns:
        scalar fp32 loss.
    """
    if logits.shape != labels.shape or logits.shape != real.shape:
        raise ValueError(f"token_consistency_loss: logits {tuple(logits.shape)}, labels {tuple(labels.shape)} "
                         f"and real {tuple(real.shape)} must all be [B, L]")
    where = real.bool()
    per_token = F.binary_cross_entropy_with_logits(logits[where].float(), labels[where].float(), reduction="none")
    return global_masked_mean(per_token, per_token.numel())


@torch.no_grad()
def token_consistency_metrics(logits: torch.Tensor, labels: torch.Tensor, real: torch.Tensor,
                              masked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Monitoring numbers of this rank's micro-batch (fp32 scalars):

    - ``inconsistent_fraction``: |T| / |M|, the share of masked positions whose replacement differs from
      the original (the paper's Fig. 6a "ratio of inconsistent samples", per token);
    - ``token_consistency_acc``: accuracy of ``sigmoid(z) > 0.5`` over all real tokens;
    - ``inconsistent_recall``: accuracy over the inconsistent tokens only (Fig. 6b).
    Ratios with an empty denominator are 0."""
    where = real.bool()
    inconsistent = where & (labels < 0.5)
    predicted = (logits.float() > 0).float()
    correct = (predicted == labels.float()) & where
    masked_count = masked.bool().sum().clamp_min(1)
    return {
        "inconsistent_fraction": inconsistent.sum().float() / masked_count.float(),
        "token_consistency_acc": correct.sum().float() / where.sum().clamp_min(1).float(),
        "inconsistent_recall": (correct & inconsistent).sum().float() / inconsistent.sum().clamp_min(1).float(),
    }

"""Pixel masked image modeling (MaskVLM eq. 1, the MIM term; SimMIM's loss).

With per-patch predictions ``x̂`` and targets ``x`` (both [B, N, P], P = p*p*3 pixel values of a
patch in ``VisionTransformer.patchify`` order) and the patch mask ``m`` [B, N]::

    L = sum_{b,n: m[b,n]} sum_j |x̂[b,n,j] - x[b,n,j]|  /  Ω,     Ω = P * sum_{b,n} m[b,n]

i.e. the L1 distance over the masked pixels divided by their number Ω (each RGB value counted once,
as SimMIM does: its ``sum(|x̂ - x| * mask) / (sum(mask) * channels)``). Unmasked pixels contribute
nothing, to the value or to the gradient. Ω is counted over the *global* batch
(``common.global_masked_mean``), so the loss does not depend on how the batch is split over ranks.

Gradient: ``dL/dx̂[b,n,j] = m[b,n] * sign(x̂[b,n,j] - x[b,n,j]) / Ω`` (0 at ties, torch's sign).

Targets are the pixels as the model reads them (ImageNet-normalised); with ``normalize_target``
each target patch is instead standardised by its own mean and variance (MAE's ``norm_pix_loss``),
``(x - mean_j x) / sqrt(var_j x + eps)``, an option MaskVLM does not use. Computed in fp32.
"""
from __future__ import annotations

import torch

from .common import global_masked_mean

PATCH_NORM_EPS = 1e-6


def normalize_patches(patches: torch.Tensor, eps: float = PATCH_NORM_EPS) -> torch.Tensor:
    """Standardise each patch (last dim) by its own mean and (biased) variance, in fp32."""
    patches = patches.float()
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def pixel_mim_loss(pred: torch.Tensor, target: torch.Tensor, patch_mask: torch.Tensor, *,
                   normalize_target: bool = False) -> torch.Tensor:
    """L1 over the masked patches' pixels divided by the global number of masked pixel values.

    Args:
        pred: [B, N, P] predicted pixels per patch.
        target: [B, N, P] true pixels per patch (``patchify(images)``); no gradient flows into it.
        patch_mask: [B, N] bool, True = masked (the only patches that count).
        normalize_target: standardise each target patch first (MAE-style; off in MaskVLM).

    Returns:
        scalar fp32 loss (0 when nothing is masked anywhere).
    """
    if pred.shape != target.shape or pred.shape[:2] != patch_mask.shape:
        raise ValueError(f"pixel_mim_loss: pred {tuple(pred.shape)}, target {tuple(target.shape)} and "
                         f"mask {tuple(patch_mask.shape)} must be [B, N, P], [B, N, P], [B, N]")
    where = patch_mask.bool()
    target = target.detach()[where].float()
    if normalize_target:
        target = normalize_patches(target)
    error = (pred[where].float() - target).abs()
    return global_masked_mean(error, error.numel())

"""MAMO's masked-modeling regressions (papers/002_9cf33019e666e199.txt, eq. 1 and 2) and the
collapse monitor of its implicit target.

Both losses take the rows at the masked positions only: ``pred`` and ``target`` are [n, D] for this
rank's n masked positions (gathered by the recipe), and the mean is over the masked positions of the
*global* batch (``common.global_masked_mean``), so it does not depend on how the batch is split.
Computed in fp32; ``target`` is detached (a stop-gradient target).

- **MRM** (masked representation modeling, eq. 1): mean squared error between the online prediction
  ``p = h_mrm(g(x))`` and the target ``t = ḡ(y)`` (EMA projector of the EMA network's output)::

      L = (1 / Ω) Σ_rows (1 / D) Σ_j (p_j - t_j)^2,        Ω = number of masked rows (global)
      dL/dp_j = 2 (p_j - t_j) / (D Ω)

  With ``normalize=True`` both are first L2-normalised per row (BYOL's loss, 2 - 2 cos): then
  ``(1/D) Σ_j (p̂_j - t̂_j)^2 = (2 - 2 cos(p, t)) / D`` per row. The paper writes plain MSE; the
  normalised form is an option, off by default.

- **Feature MIM** (eq. 2): L1 between the prediction ``h_mim(x)`` and the EMA image encoder's feature
  at the masked patch::

      L = (1 / Ω) Σ_rows (1 / D) Σ_j |p_j - t_j|,           dL/dp_j = sign(p_j - t_j) / (D Ω)

- **Collapse monitor**: ``per_dimension_std(p)`` = mean over dimensions of the standard deviation
  of each dimension over the rows (population std). A collapsed predictor that outputs the same
  vector everywhere gives 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import global_masked_mean


def _check(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be [n, D]")


def mrm_loss(pred: torch.Tensor, target: torch.Tensor, *, normalize: bool = False) -> torch.Tensor:
    """Per-row mean squared error, averaged over the masked rows of the global batch (fp32).

    Args:
        pred: [n, D] online predictions h_mrm(g(x)) at this rank's masked positions.
        target: [n, D] target projections ḡ(y) at the same positions (detached here).
        normalize: L2-normalise both rows first (BYOL); off = the paper's plain MSE.
    """
    _check(pred, target, "mrm_loss")
    pred, target = pred.float(), target.detach().float()
    if normalize:
        pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
    per_row = (pred - target).pow(2).mean(dim=-1)
    return global_masked_mean(per_row, per_row.numel())


def feature_mim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row mean absolute error, averaged over the masked patches of the global batch (fp32).

    Args:
        pred: [n, Dv] h_mim of the online fused features at this rank's masked patches.
        target: [n, Dv] the EMA image encoder's features of the unmasked image there (detached).
    """
    _check(pred, target, "feature_mim_loss")
    per_row = (pred.float() - target.detach().float()).abs().mean(dim=-1)
    return global_masked_mean(per_row, per_row.numel())


@torch.no_grad()
def per_dimension_std(pred: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension (population) std of ``pred`` [n, D] over its rows, in
    fp32; 0 when there are fewer than 2 rows."""
    if pred.dim() != 2:
        raise ValueError(f"per_dimension_std: pred must be [n, D], got {tuple(pred.shape)}")
    if pred.shape[0] < 2:
        return pred.new_zeros((), dtype=torch.float32)
    return pred.float().std(dim=0, unbiased=False).mean()

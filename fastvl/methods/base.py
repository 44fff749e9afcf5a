"""What every recipe is: an nn.Module that turns a Batch into named losses.

A recipe owns its backbone, its masking policies and any auxiliary networks (EMA teacher,
generator, agent), so one ``state_dict`` checkpoints all of it. The trainer only relies on:

- ``forward(batch) -> dict``: ``"loss"`` (the weighted total, differentiable) plus one detached
  scalar per named loss and any extra metrics (``"temperature"``, ``"mrm_pred_std"``, ...);
- ``after_step(step)``: called after each optimizer step (EMA updates, agent updates, ...);
- ``scorer``: a ``RetrievalScorer`` the eval uses (ITC embeddings and the ITM re-ranker);
- ``rank_state()`` / ``load_rank_state()``: what differs between ranks, saved per rank.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ..config import ConfigError, RunConfig
from ..data.batch import Batch


class RetrievalScorer(Protocol):
    def image_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit-norm ITC embedding [B, E], encoder states to reuse for ITM [B, N, D])."""

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(unit-norm ITC embedding [B, E], encoder states to reuse for ITM [B, L, D])."""

    def itm_scores(self, image_states: torch.Tensor, text_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Probability that each (image, text) pair matches, [B]; inputs row-aligned."""


def temperature_parameter(value: float) -> nn.Parameter:
    """A learnable ITC temperature, held as shape [1]: ZeRO-3 cannot partition a 0-dim parameter
    (DeepSpeed 0.19.8 views each one as bytes). Older checkpoints with a 0-dim one still load
    (``Recipe._widen_scalar_parameters``)."""
    return nn.Parameter(torch.tensor([float(value)]))


class Recipe(nn.Module):
    """Base of all recipes: loss weighting and the hooks the trainer calls."""

    #: loss name -> default weight; config ``method.losses`` overrides per name.
    default_losses: dict[str, float] = {}

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        unknown = set(cfg.method.losses) - set(self.default_losses)
        if unknown:
            raise ConfigError(
                f"method.losses: {sorted(unknown)} not known to recipe '{cfg.method.name}' "
                f"(it has {sorted(self.default_losses)})"
            )
        self.loss_weights = {**self.default_losses, **cfg.method.losses}
        # the optimizer step, saved with the weights: random draws are seeded by it (exact resume)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.current_step = 0
        self.micro_batch = 0  # which micro-batch of the step this forward is (Engine.train_micro_batch)
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_step())
        self._register_load_state_dict_pre_hook(self._widen_scalar_parameters)

    def _sync_step(self) -> None:
        self.current_step = int(self.step)

    def _widen_scalar_parameters(self, state_dict, prefix, *args) -> None:
        """Checkpoints written before the temperature became [1]-shaped hold it 0-dim: load it as [1]."""
        for name, param in self.named_parameters():
            saved = state_dict.get(prefix + name)
            shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the full shape there
            if tuple(shape) == (1,) and isinstance(saved, torch.Tensor) and saved.dim() == 0:
                state_dict[prefix + name] = saved.reshape(1)

    @property
    def draw_step(self) -> int:
        """The key of this forward's random draws: the step, counted in micro-batches under gradient
        accumulation so that the micro-batches of one step do not share their masks (the step itself
        without accumulation)."""
        return self.current_step * self.cfg.train.grad_accum + self.micro_batch

    def uses(self, loss: str) -> bool:
        return self.loss_weights.get(loss, 0.0) > 0

    def total(self, losses: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor] | None = None) -> dict:
        """Weighted sum of ``losses`` under "loss", with each term detached for logging."""
        out = {name: value.detach() for name, value in losses.items()}
        out["loss"] = sum(self.loss_weights[name] * value for name, value in losses.items())
        if metrics:
            # copies: a metric may be a view of a parameter (the temperature), which the optimizer step
            # changes in place (ZeRO-0) or frees (ZeRO-3) before the row is logged
            out.update({name: value.detach().clone() for name, value in metrics.items()})
        policy = getattr(self, "text_masking", None)
        if hasattr(policy, "metrics"):  # a masking policy with its own report (the hosted curriculum)
            out.update({f"text_masking/{name}": value for name, value in policy.metrics().items()})
        return out

    def forward(self, batch: Batch) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_step(self, step: int, applied: bool = True) -> None:
        """Called after every optimizer step with the number of steps done and whether the weights
        changed (``applied`` is False when fp16's loss scaler skipped the step); recipes with EMA
        teachers or agents extend it (and call this)."""
        self.current_step = step
        self.step.fill_(step)

    def rank_state(self) -> dict:
        """What differs between the ranks of a multi-process run and must come back to the same rank on
        resume, by submodule name: each submodule's ``rank_state()`` (C-Mask's curriculum: its pending
        rollouts). Everything else is the same on every rank and travels in ``state_dict``, which
        ZeRO 0-2 write from rank 0 only; the trainer saves this per rank."""
        return {name: module.rank_state() for name, module in self.named_modules()
                if module is not self and hasattr(module, "rank_state")}

    def load_rank_state(self, state: dict) -> None:
        """Restore this rank's ``rank_state`` (after ``load_state_dict``, which brought rank 0's)."""
        modules = dict(self.named_modules())
        for name, part in state.items():
            modules[name].load_rank_state(part)

    @property
    def scorer(self) -> RetrievalScorer:
        raise NotImplementedError(f"{type(self).__name__} has no retrieval scorer")

"""The ALBEF baseline (Li et al., 2021, without momentum distillation): ITC + ITM + MLM.

- ITC: unimodal [CLS] projections, learnable temperature (clamped to [0.001, 0.5]), global batch.
- ITM: fused [CLS] -> 2-way head; one hard-negative text per image and one hard-negative image per
  text, drawn from softmax(ITC similarity) over the global batch in fp32 (guarded).
- MLM: the text masking policy (``method.text_masking``, BERT-style 15% with 80/10/10 by default)
  corrupts the caption; the fusion encoder reads it with the full image; loss at masked positions.

Other recipes reuse its pieces: ``encode``/``contrastive``/``matching``/``masked_lm`` are the
building blocks, so a recipe that adds objectives calls them rather than repeating them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import RunConfig
from ..data.batch import Batch
from ..dist import global_uniform
from ..masking import build_text_masking
from ..models.albef import AlbefModel
from ..objectives.itc import itc_loss
from ..objectives.itm import itm_loss
from ..objectives.mlm import mlm_loss
from .base import Recipe

ITM_STREAM = 2


class Albef(Recipe):
    default_losses = {"itc": 1.0, "itm": 1.0, "mlm": 1.0}

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.backbone = AlbefModel(cfg.model)
        self.temperature = nn.Parameter(torch.tensor(cfg.method.temperature))
        self.text_masking = build_text_masking(cfg, self)

    # -- building blocks ------------------------------------------------------------------------

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.backbone.encode_image(batch.images),
                self.backbone.encode_text(batch.input_ids, batch.attention_mask))

    def contrastive(self, image_states, text_states):
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        return itc_loss(self.backbone.image_feat(image_states), self.backbone.text_feat(text_states),
                        self.temperature)

    def fuse_cls(self, text_states, attention_mask, image_states) -> torch.Tensor:
        return self.backbone.fuse(text_states, attention_mask, image_states)[:, 0]

    def matching(self, image_states, text_states, attention_mask, sim_i2t, sim_t2i) -> torch.Tensor:
        if self.cfg.method.itm_negatives == "random":  # equal weights: uniform over the other pairs
            sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
        u = global_uniform(image_states.shape[0], (2,), seed=self.cfg.train.seed, step=self.draw_step,
                           stream=ITM_STREAM, device=image_states.device)
        return itm_loss(self.fuse_cls, self.backbone.itm_logits, image_states, text_states, attention_mask,
                        sim_i2t, sim_t2i, u)

    def alignment(self, batch: Batch, image_states, text_states) -> dict[str, torch.Tensor]:
        """The ITC and ITM losses this recipe uses (ITM's hard negatives come from ITC's similarities)."""
        if not (self.uses("itc") or self.uses("itm")):
            return {}
        itc, sim_i2t, sim_t2i = self.contrastive(image_states, text_states)
        losses = {"itc": itc} if self.uses("itc") else {}
        if self.uses("itm"):
            losses["itm"] = self.matching(image_states, text_states, batch.attention_mask, sim_i2t, sim_t2i)
        return losses

    def masked_lm(self, batch: Batch, image_states: torch.Tensor) -> torch.Tensor:
        masked = self.text_masking(batch, self.draw_step)
        states = self.backbone.encode_text(masked.input_ids, batch.attention_mask)
        fused = self.backbone.fuse(states, batch.attention_mask, image_states)
        where = masked.mask
        return mlm_loss(self.backbone.mlm_logits(fused[where]), masked.labels[where])

    # -- the recipe -----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict:
        image_states, text_states = self.encode(batch)
        losses = self.alignment(batch, image_states, text_states)
        if self.uses("mlm"):
            losses["mlm"] = self.masked_lm(batch, image_states)
        return self.total(losses, {"temperature": self.temperature})

    @property
    def scorer(self):
        return AlbefScorer(self)


class AlbefScorer:
    """ITC embeddings and ITM probabilities of an ALBEF-layout backbone, for retrieval and probes."""

    def __init__(self, recipe: Albef):
        self.recipe = recipe

    def image_embeddings(self, images):
        states = self.recipe.backbone.encode_image(images)
        return self.recipe.backbone.image_feat(states), states

    def text_embeddings(self, input_ids, attention_mask):
        states = self.recipe.backbone.encode_text(input_ids, attention_mask)
        return self.recipe.backbone.text_feat(states), states

    def itm_scores(self, image_states, text_states, attention_mask):
        logits = self.recipe.backbone.itm_logits(self.recipe.fuse_cls(text_states, attention_mask, image_states))
        return logits.float().softmax(dim=-1)[:, 1]

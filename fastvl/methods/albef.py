"""The ALBEF baseline (Li et al., 2021, "Align before Fuse"): ITC + ITM + MLM, with momentum
distillation and ITC queues as in the official implementation.

- ITC: unimodal [CLS] projections, learnable temperature (clamped to [0.001, 0.5]), global batch.
- ITM: fused [CLS] -> 2-way head; one hard-negative text per image and one hard-negative image per
  text, drawn from softmax(ITC similarity) over the global batch in fp32 (guarded).
- MLM: the text masking policy (``method.text_masking``, BERT-style 15% with 80/10/10 by default)
  corrupts the caption; the fusion encoder reads it with the full image; loss at masked positions.
- The ITM pairs and the MLM captions read the step's images through one ``fusion.ImageContext`` (each
  fusion layer's cross-attention keys/values of the B images, projected once; negatives name their
  image by index), and ITM computes the last fusion layer for the [CLS] row only: the outputs and
  gradients of separate passes, for ~12% fewer FLOPs per step at base size. The caption and its masked
  copy share one text-encoder pass (``AlbefModel.encode_captions``; online and momentum model).

Momentum distillation (``method.options``, see ``AlbefOptions``; ``momentum_distill`` is on in
configs/base_albef.json, as in ALBEF's pretraining, and off when not given):

- **Momentum model**: an EMA copy (``models.ema.EmaTeacher``, fp32 master, run under ``no_grad`` in the
  compute dtype and in eval mode) of the whole backbone, of which ALBEF's ``*_m`` parts are used: vision
  encoder, ``vision_proj``, text encoder, ``text_proj``, fusion encoder, MLM head. θ̄ <- m θ̄ + (1 - m) θ,
  m = ``momentum`` = 0.995, after every *applied* optimizer step (``after_step``; a step fp16's loss
  scaler skipped leaves it where it was).
- **ITC with queues**: keys are the momentum features of the global batch followed by two queues
  (``queue_size`` = 65,536 momentum image / text features of earlier batches, initialised, as in ALBEF,
  with random unit vectors); ITM's hard negatives still come from the batch columns. Once the step's
  backward has run (at ``after_step``, or as the next micro-batch's forward opens), the gathered global
  batch of momentum features is written at ``queue_ptr`` (wrapping around), so every rank holds the
  same queue and 1 process with batch 2b logs what 2 processes with b each log. The backward reads the
  queue the loss was computed against, in place (no copy of its 65,536 rows per step), so the write
  waits for it. Under gradient accumulation every micro-batch enqueues (each is a forward with its
  own keys).
  The queues and pointer are persistent buffers: they are in checkpoints and restored exactly.
- **Soft targets**: ITC targets ``alpha * softmax(sim_m / temp) + (1 - alpha) * one-hot`` with sim_m the
  momentum queries against the same keys; MLM ``(1 - alpha) * CE + alpha * soft CE`` against the
  momentum model's MLM distribution at the masked positions (its text encoder reads the same masked
  caption and its fusion encoder the momentum image states). alpha = 0.4, ramped linearly from 0 over
  the first ``alpha_warmup_steps`` optimizer steps (ALBEF ramps it over the first epoch; an epoch
  has no fixed length in a streamed dataset, so the ramp is given in steps).

Paper vs code (Li et al., 2021, sec. 3-4; not in papers/, read from the paper; the README's table):

- ViT-B/16 from DeiT ImageNet-1k weights, text = BERT-base layers 1-6, fusion = layers 7-12 -> preset
  "base" (``model.text_layers`` 6 / ``model.fusion_layers`` 6); weights: ``model.image_init`` /
  ``model.text_init``, unset in configs/base_albef.json (no DeiT-B or BERT-base offline here: it trains
  from scratch unless they are named).
- ITC projections to 256, learnable τ from 0.07 -> ``model.embed_dim`` 256, ``method.temperature`` 0.07.
- MLM 15%, 80/10/10 -> ``method.mlm_probability`` / ``method.mlm_replace``; ITM hard negatives ->
  ``method.itm_negatives`` "hard".
- momentum 0.995, queue 65,536, α = 0.4 -> ``momentum`` / ``queue_size`` / ``alpha``
  (``momentum_distill`` true in configs/base_albef.json); α's ramp over the first epoch (official code)
  -> ``alpha_warmup_steps`` (steps, not epochs).
- batch 512 (8 GPUs x 64), 30 epochs -> ``data.batch_size`` 64 per process, ``train.steps``.
- 256 px random crops in pre-training -> ``model.image_size`` 224 (the preset's; set 256 to match);
  crop scale (0.5, 1) and flip: the train transform.
- AdamW, wd 0.02, lr 1e-4 after 1,000 warm-up iterations, cosine to 1e-5 -> ``train.weight_decay``,
  ``lr``, ``warmup_steps``, ``schedule`` "cosine", ``min_lr_ratio`` 0.1; RandAugment(2, 7) without
  colour ops -> ``data.rand_augment`` "albef", ``rand_augment_ops`` 2, ``rand_augment_magnitude`` 7.

Where this differs from the official code, on purpose: the queries of this rank meet the momentum keys
of the *global* batch (ALBEF: its GPU's batch) so the result does not depend on the split; the
momentum model runs without dropout (ALBEF's runs in train mode); the EMA update follows the optimizer
step rather than opening the next forward (the same sequence of weights).

Every ZeRO stage 0-3 works, with or without distillation: every rank holds the same momentum copy
and queues (buffers, never partitioned); under stage 3 ``EmaTeacher.update`` gathers the partitioned
online weights, the tied MLM decoder is registered as an external parameter of the MLM head
(``AlbefModel.zero3_external_parameters``) and the temperature is [1]-shaped
(``base.temperature_parameter``). Tested: 2 processes at stage 3 log what 1 process at stage 0 logs.

Other recipes reuse its pieces: ``encode``/``contrastive``/``matching``/``masked_lm`` are the
building blocks, so a recipe that adds objectives calls them rather than repeating them. Those that do
not build an ALBEF backbone through ``Albef.__init__`` (MaskVLM, MAMO) have no momentum model
(``momentum_teacher`` is None) and their building blocks behave as without distillation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, RunConfig, build_section
from ..data.batch import Batch
from ..dist import gather_with_grad, global_uniform
from ..masking import build_text_masking
from ..models.albef import AlbefModel
from ..models.ema import EmaTeacher
from ..models.fusion import ImageContext
from ..objectives.itc import MomentumKeys, itc_loss
from ..objectives.itm import itm_loss
from ..objectives.mlm import mlm_loss
from .base import Recipe, temperature_parameter

ITM_STREAM = 2


@dataclass
class AlbefOptions:
    """``method.options`` of the ``albef`` recipe (with ``momentum_distill``: the ALBEF paper's pretraining)."""

    momentum_distill: bool = False
    """Keep the momentum model and ITC queues and distil from them (ALBEF; the albef configs set it);
    false = the plain ITC/ITM/MLM baseline (no copy, no queue). Off unless asked so that checkpoints
    saved without it still load and recipes mounting albef (EPIC's ``base``) keep their behaviour."""
    momentum: float = 0.995
    """EMA momentum m of the momentum model."""
    alpha: float = 0.4
    """Weight of the momentum model's distribution in the ITC and MLM targets; 0 keeps the momentum
    keys and queues but trains on one-hot targets."""
    alpha_warmup_steps: int = 0
    """alpha ramps linearly from 0 to ``alpha`` over this many optimizer steps (0 = no ramp)."""
    queue_size: int = 65536
    """Momentum features kept per modality as extra ITC negatives; 0 = the batch only. At least the
    global batch (the queue wraps around, so it need not be a multiple of it)."""

    def __post_init__(self):
        if not 0.0 < self.momentum < 1.0:
            raise ConfigError("method.options.momentum must be in (0, 1)")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("method.options.alpha must be in [0, 1]")
        if self.alpha_warmup_steps < 0:
            raise ConfigError("method.options.alpha_warmup_steps must be >= 0 (0 = no ramp)")
        if self.queue_size < 0:
            raise ConfigError("method.options.queue_size must be >= 0 (0 = no queue)")


class MomentumAlbef(nn.Module):
    """What ALBEF asks of its momentum model, as one forward over a backbone (``EmaTeacher`` copies
    this module, so the copy runs the same code on the EMA weights)."""

    def __init__(self, backbone: AlbefModel):
        super().__init__()
        self.backbone = backbone

    def forward(self, images, input_ids, attention_mask, masked_ids: Optional[torch.Tensor] = None,
                where: Optional[torch.Tensor] = None):
        """-> (image feat [b, E], text feat [b, E], MLM logits [n, V] at ``where`` of the fused
        ``masked_ids`` caption, or None without ``masked_ids``)."""
        backbone = self.backbone
        image_states = backbone.encode_image(images)
        text_states, masked_states = backbone.encode_captions(attention_mask, input_ids, masked_ids)
        mlm_logits = None
        if masked_ids is not None:
            fused = backbone.fuse(masked_states, attention_mask, image_states)
            mlm_logits = backbone.mlm_logits(fused[where])
        return backbone.image_feat(image_states), backbone.text_feat(text_states, attention_mask), mlm_logits


@dataclass
class MomentumTargets:
    """This forward's momentum outputs: ITC keys and, when distilling MLM, its teacher distribution."""

    keys: MomentumKeys
    mlm_probs: Optional[torch.Tensor]
    alpha: float


class Albef(Recipe):
    default_losses = {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    pending_keys: Optional[MomentumKeys] = None
    """This training forward's momentum keys, enqueued once its backward has run (``defer_enqueue``)."""

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.options = o = build_section(AlbefOptions, cfg.method.options, "method.options")
        self.backbone = AlbefModel(cfg.model)
        self.temperature = temperature_parameter(cfg.method.temperature)
        self.text_masking = build_text_masking(cfg, self)
        self.momentum_model: Optional[EmaTeacher] = None
        if o.momentum_distill:
            self.momentum_model = EmaTeacher({"albef": MomentumAlbef(self.backbone)}, o.momentum)
            embed_dim = self.backbone.vision_proj.out_features
            # ALBEF starts its queues with random unit vectors (they serve as negatives until overwritten)
            self.register_buffer("image_queue", nn.functional.normalize(torch.randn(o.queue_size, embed_dim), dim=-1))
            self.register_buffer("text_queue", nn.functional.normalize(torch.randn(o.queue_size, embed_dim), dim=-1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # -- momentum distillation ------------------------------------------------------------------

    @property
    def momentum_teacher(self) -> Optional[EmaTeacher]:
        """The EMA copy when distilling; None otherwise and in recipes built without ``Albef.__init__``
        (MaskVLM, MAMO), whose building blocks then run without distillation."""
        return getattr(self, "momentum_model", None)

    @property
    def alpha(self) -> float:
        """This step's distillation weight (ALBEF's linear warm-up, in optimizer steps)."""
        o = self.options
        if o.alpha_warmup_steps == 0:
            return o.alpha
        return o.alpha * min(1.0, self.current_step / o.alpha_warmup_steps)

    def momentum_targets(self, batch: Batch, masked=None) -> Optional[MomentumTargets]:
        """The momentum model's ITC keys (with the queues) and MLM distribution at ``masked`` (a
        ``TextMask``; no MLM pass without it or when alpha is 0). None when not distilling."""
        if self.momentum_teacher is None:
            return None
        alpha = self.alpha
        distil_mlm = masked is not None and alpha > 0
        image_m, text_m, mlm_logits_m = self.momentum_teacher(
            "albef", batch.images, batch.input_ids, batch.attention_mask,
            masked.input_ids if distil_mlm else None, masked.mask if distil_mlm else None)
        keys = MomentumKeys(image_m, text_m, gather_with_grad(image_m), gather_with_grad(text_m),
                            self.image_queue, self.text_queue)
        probs = mlm_logits_m.float().softmax(dim=-1) if distil_mlm else None
        return MomentumTargets(keys, probs, alpha)

    def defer_enqueue(self, keys: MomentumKeys) -> None:
        """Hold this forward's keys until its backward is done (``enqueue_pending``)."""
        size, rows = self.image_queue.shape[0], keys.all_image.shape[0]
        if rows > size > 0:
            raise ConfigError(f"method.options.queue_size={size} is smaller than the global batch ({rows}): "
                              f"raise it to at least {rows} or set it to 0 (no queue)")
        self.pending_keys = keys

    def enqueue_pending(self) -> None:
        keys, self.pending_keys = self.pending_keys, None
        if keys is not None:
            self.enqueue(keys)

    @torch.no_grad()
    def enqueue(self, keys: MomentumKeys) -> None:
        """Write the global batch of momentum features into the queues at ``queue_ptr`` (wrapping)."""
        size, rows = self.image_queue.shape[0], keys.all_image.shape[0]
        if size == 0:
            return
        where = (int(self.queue_ptr) + torch.arange(rows, device=self.image_queue.device)) % size
        self.image_queue[where] = keys.all_image.to(self.image_queue.dtype)
        self.text_queue[where] = keys.all_text.to(self.text_queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + rows) % size)

    # -- building blocks ------------------------------------------------------------------------

    def encode(self, batch: Batch, masked=None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(image states, caption states, states of the ``masked`` caption (a ``TextMask``) from the same
        text-encoder pass, or None without it)."""
        return (self.backbone.encode_image(batch.images),
                *self.backbone.encode_captions(batch.attention_mask, batch.input_ids,
                                               None if masked is None else masked.input_ids))

    def contrastive(self, image_states, text_states, attention_mask, momentum: Optional[MomentumTargets] = None):
        with torch.no_grad():
            self.temperature.clamp_(0.001, 0.5)
        keys, alpha = (None, 0.0) if momentum is None else (momentum.keys, momentum.alpha)
        return itc_loss(self.backbone.image_feat(image_states), self.backbone.text_feat(text_states, attention_mask),
                        self.temperature, keys, alpha)

    def fuse_cls(self, text_states, attention_mask, image_states, image_index=None) -> torch.Tensor:
        """The fused [CLS] [n, Dt] of text row i with image ``image_index[i]`` (default: i) of
        ``image_states`` (states, or their ``ImageContext``)."""
        return self.backbone.fuse(text_states, attention_mask, image_states, image_index=image_index, cls_only=True)

    def with_other_images(self, images, other_images: Optional[torch.Tensor]):
        """``images`` (states or an ``ImageContext``) followed by the states ``other_images``."""
        if other_images is None:
            return images
        if isinstance(images, ImageContext):
            return images.cat(self.backbone.image_context(other_images))
        return torch.cat([images, other_images])

    def matching(self, image_states, text_states, attention_mask, sim_i2t, sim_t2i, images=None) -> torch.Tensor:
        """ITM; ``images`` is what ``fuse_cls`` reads of this rank's images: their states (default) or
        an ``ImageContext`` of them that other fusion passes share."""
        if self.cfg.method.itm_negatives == "random":  # equal weights: uniform over the other pairs
            sim_i2t, sim_t2i = torch.zeros_like(sim_i2t), torch.zeros_like(sim_t2i)
        u = global_uniform(image_states.shape[0], (2,), seed=self.cfg.train.seed, step=self.draw_step,
                           stream=ITM_STREAM, device=image_states.device)
        images = image_states if images is None else images

        def fuse_pairs(texts, masks, image_index, other_images):
            return self.fuse_cls(texts, masks, self.with_other_images(images, other_images), image_index)

        return itm_loss(fuse_pairs, self.backbone.itm_logits, image_states, text_states, attention_mask,
                        sim_i2t, sim_t2i, u)

    def alignment(self, batch: Batch, image_states, text_states, momentum: Optional[MomentumTargets] = None,
                  images=None) -> dict[str, torch.Tensor]:
        """The ITC and ITM losses this recipe uses (ITM's hard negatives come from ITC's similarities);
        ``images`` as in ``matching``."""
        if not (self.uses("itc") or self.uses("itm")):
            return {}
        itc, sim_i2t, sim_t2i = self.contrastive(image_states, text_states, batch.attention_mask, momentum)
        losses = {"itc": itc} if self.uses("itc") else {}
        if self.uses("itm"):
            losses["itm"] = self.matching(image_states, text_states, batch.attention_mask, sim_i2t, sim_t2i, images)
        return losses

    def masked_lm(self, batch: Batch, image_states: torch.Tensor, masked=None,
                  momentum: Optional[MomentumTargets] = None, images=None, states=None) -> torch.Tensor:
        """MLM on ``masked`` (drawn here if not given), distilled from ``momentum.mlm_probs`` if any;
        ``images`` as in ``matching``; ``states``: the masked caption's text-encoder states, when
        ``encode`` already computed them."""
        masked = masked if masked is not None else self.text_masking(batch, self.draw_step)
        if states is None:
            states = self.backbone.encode_text(masked.input_ids, batch.attention_mask)
        fused = self.backbone.fuse(states, batch.attention_mask, image_states if images is None else images)
        where = masked.mask
        teacher, alpha = (None, 0.0) if momentum is None else (momentum.mlm_probs, momentum.alpha)
        return mlm_loss(self.backbone.mlm_logits(fused[where]), masked.labels[where], teacher, alpha)

    # -- the recipe -----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict:
        self.enqueue_pending()  # the previous micro-batch's keys: its backward is done
        masked = self.text_masking(batch, self.draw_step) if self.uses("mlm") else None
        image_states, text_states, masked_states = self.encode(batch, masked)
        momentum = self.momentum_targets(batch, masked)
        # the fusion's image keys/values, projected once for the ITM pairs and the MLM pass
        images = self.backbone.image_context(image_states) if self.uses("itm") and masked is not None else None
        losses = self.alignment(batch, image_states, text_states, momentum, images)
        if masked is not None:
            losses["mlm"] = self.masked_lm(batch, image_states, masked, momentum, images, masked_states)
        metrics = {"temperature": self.temperature.reshape(())}
        if momentum is not None:
            metrics["alpha"] = torch.tensor(momentum.alpha)
            if self.training:
                self.defer_enqueue(momentum.keys)
        return self.total(losses, metrics)

    def after_step(self, step: int, applied: bool = True) -> None:
        super().after_step(step, applied)
        self.enqueue_pending()
        if self.momentum_teacher is not None and applied:  # a skipped step left the weights as they were
            self.momentum_teacher.update()

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
        return self.recipe.backbone.text_feat(states, attention_mask), states

    def itm_scores(self, image_states, text_states, attention_mask):
        logits = self.recipe.backbone.itm_logits(self.recipe.fuse_cls(text_states, attention_mask, image_states))
        return logits.float().softmax(dim=-1)[:, 1]

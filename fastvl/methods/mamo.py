"""MAMO: masked multimodal modeling with implicit and explicit targets (Zhao et al., 2023;
papers/002_9cf33019e666e199.txt), over the ALBEF building blocks.

Paper -> code:

- **Architecture** (sec. 3.1, Fig. 2): ``models.mamo.MamoModel``: ViT image encoder, BERT text encoder
  (``model.text_layers``), and a fusion encoder of ``model.fusion_layers`` BERT self-attention layers
  over the *concatenation* ``[v_cls, v_1..v_N, w_cls, w_1..w_L]``. The image encoder of a masked view
  sees only the visible patches (``VisionTransformer`` ``keep_index``, MAE-style); the fusion input puts
  a shared learnable mask token at the masked positions and adds positional embeddings to the full set
  (``ConcatFusionEncoder.image_tokens``).
- **Two masked views** (sec. 3.2.1, 4.2): (Î, T): ``image_mask_ratio`` = 75% of the patches removed,
  exactly ``ceil(0.75 N)`` per image, uniformly at random (``masking.image.BlockImageMasking`` with
  1-patch blocks, ``global_uniform`` stream 3); (I, T̂): the text policy ``method.text_masking``
  (``build_text_masking(cfg, self)``, so C-Mask's curriculum can be plugged in) with the paper's 25% and
  80/10/10 set in configs/*_mamo.json (``method.mlm_probability`` / ``method.mlm_replace``; the
  MethodConfig defaults are ALBEF's 15%). Both views go through the fusion encoder in one batched call.
- **Target network** (sec. 3.2.1): ``self.teacher`` = ``models.ema.EmaTeacher`` over the image encoder,
  text encoder, fusion encoder and MRM projector; θ̄ <- α θ̄ + (1 - α) θ with α = ``momentum`` = 0.995
  after every optimizer step (``after_step``), no gradient, fed the *unmasked* pair (``targets``).
- **MRM** (eq. 1): MSE between ``mrm_predictor(mrm_projector(f_θ(view)))`` and the EMA projector of
  ``f_θ̄(I, T)`` at every masked position: the masked patches of (Î, T) (fused rows 1 + n) and the masked
  tokens of (I, T̂) (all chosen tokens, including the 10% random / 10% kept); the two view terms are
  summed as in eq. 1 (``objectives.mrm.mrm_loss``).
- **MIM** (eq. 2): L1 between ``mim_head`` of the online fused features of (Î, T) at the masked patches
  and the EMA image encoder's output features of the unmasked image there
  (``objectives.mrm.feature_mim_loss``).
- **MLM** (eq. 3): cross-entropy of the BERT LM head on the fused text rows of (I, T̂) at the masked
  tokens (``objectives.mlm.mlm_loss``).
- **ITC** (eq. 4) and **ITM** (eq. 5): ALBEF's ``contrastive`` (unimodal [CLS] projections, learnable
  temperature) and ``matching`` (one hard negative text per image and one image per text from
  softmax(ITC similarity), fp32, guarded) on the unmasked pair; ``fuse_cls`` reads the fused text [CLS].
- **Total** (eq. 6): MRM + MIM + MLM + ITC + ITM, every weight 1 (``default_losses``).
- **Ablations**: Table 5: ``method.losses`` (weight 0 switches a loss off; branches nobody needs are
  skipped, and without MRM and MIM no teacher is built). Table 6: ``mrm_modalities`` = "image" | "text" |
  "both". Table 7: ``mrm_predictor`` = false (prediction = projector output), ``momentum`` = 0 ("w/o
  EMA": the target is the online network of the current step under stop-gradient, no copy kept).
- **Collapse monitor**: metrics ``mrm_pred_std`` / ``mrm_target_std``, the mean per-dimension std of the
  MRM predictions / targets over this step's masked positions (``objectives.mrm.per_dimension_std``).

Paper vs code (sec. 3, 4.2; the README's table; configs/base_mamo.json):

- ViT-B/16 (pretrained) + BERT-base layers 1-6 (text) and 7-12 (fusion) -> preset "base"; weights:
  ``model.image_init`` / ``model.text_init``, unset (none offline: trains from scratch unless named).
- text 25%, 80/10/10 -> ``method.mlm_probability`` 0.25, ``method.mlm_replace`` [0.8, 0.1, 0.1];
  image 75% -> ``image_mask_ratio`` 0.75; EMA α = 0.995 -> ``momentum`` 0.995.
- MRM projector/predictor "MLPs with one hidden layer", MIM "MLP predictor" -> ``mrm_dim`` /
  ``mrm_hidden`` / ``mim_hidden`` (0 = text width; widths unstated); loss weights all 1 (eq. 6).
- batch 1536 (16 GPUs x 96), 30 epochs -> ``data.batch_size`` 96 per process, ``train.steps`` 101,600;
  224 px random crops -> ``model.image_size`` 224, the train transform.
- AdamW wd 0.01, lr 1e-4 after 2,500 warm-up iterations, linear decay to 1e-5 -> ``train.weight_decay``,
  ``lr``, ``warmup_steps``, ``schedule`` "linear", ``min_lr_ratio`` 0.1; RandAugment (settings unstated)
  -> ``data.rand_augment`` "albef" with ALBEF's N = 2, M = 7.

Choices where the paper is vague (each a default here; options where it is a real alternative):

1. MRM outputs are *not* normalised: the paper says MSE; ``mrm_normalize`` switches on BYOL's L2
   normalisation (2 - 2 cos). The target is the last fusion layer's output (after its LayerNorm).
2. Projector and predictors are ``Linear -> GELU -> Linear`` (no BatchNorm: per-token features with a
   variable number of masked rows); projector/predictor width ``mrm_dim``/``mrm_hidden`` and MIM hidden
   width ``mim_hidden`` default to the text width.
3. The MIM target is the EMA image encoder's *final* output (after its LayerNorm), un-normalised.
4. Fusion-input positions are a new learned table (like MAE's decoder), not the ViT's; the mask token
   lives in the fusion width; no modality-type embedding (the image positions tell the rows apart).
   With unequal widths a Linear maps image states to the text width first.
5. The ITM head reads the fused *text* [CLS] (ALBEF's convention; the paper says "the [CLS] token").
6. Dropout is off in the target network (the EMA copy runs in eval mode; with ``momentum`` 0 the online
   modules are switched to eval for the target pass).
7. The EMA is kept in fp32 whatever the training precision (a bf16 EMA at α = 0.995 would not move) and
   run in the training dtype; buffers of the online modules are copied, not averaged.
8. ITC/ITM use the unmasked pair only, and ITC has no momentum distillation or queue (the paper
   describes none; configs/base_albef.json's ALBEF has both).
9. The temperature is a [1]-shaped parameter (clamped to [0.001, 0.5]).

Every ZeRO stage 0-3 works. Under stage 3 the tied MLM decoder and the fusion input's mask token and
positions (read by ``image_tokens``, not a forward) are registered as external parameters
(``zero3_external_parameters`` of the models), and ``EmaTeacher.update`` gathers the partitioned
online parameters; the target network itself is kept whole (fp32 buffers, see ``models.ema``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError, RunConfig, build_section
from ..data.batch import Batch
from ..masking import build_text_masking
from ..masking.image import BlockImageMasking
from ..models.ema import EmaTeacher
from ..models.mamo import MamoModel
from ..objectives.mlm import mlm_loss
from ..objectives.mrm import feature_mim_loss, mrm_loss, per_dimension_std
from .albef import Albef, AlbefScorer
from .base import Recipe, temperature_parameter

IMAGE_MASK_STREAM = 3
"""``global_uniform`` stream of the patch-mask draws (text masking uses 1, ITM negatives 2)."""

MRM_MODALITIES = ("image", "text", "both")


@dataclass
class MamoOptions:
    """``method.options`` of the ``mamo`` recipe (defaults: the paper's settings)."""

    image_mask_ratio: float = 0.75
    """Fraction of image patches removed in the (Î, T) view (sec. 4.2: 75%; Fig. 6 tries others)."""
    momentum: float = 0.995
    """EMA momentum α of the target network (sec. 4.2). 0 = no EMA: the target is the online network
    under stop-gradient (Table 7, "w/o EMA update")."""
    mrm_modalities: str = "both"
    """Where MRM applies (Table 6): "image" (masked patches of (Î, T)), "text" (masked tokens of
    (I, T̂)) or "both" (eq. 1)."""
    mrm_predictor: bool = True
    """Use the asymmetric predictor h_mrm on the online side (Table 7, "w/o predictor" = false)."""
    mrm_normalize: bool = False
    """L2-normalise prediction and target before the MSE (BYOL). The paper writes plain MSE: off."""
    mrm_dim: int = 0
    """Output width of the MRM projector/predictor; 0 = the text width."""
    mrm_hidden: int = 0
    """Hidden width of the MRM projector/predictor; 0 = the text width."""
    mim_hidden: int = 0
    """Hidden width of the MIM predictor h_mim; 0 = the text width."""

    def __post_init__(self):
        if not 0.0 < self.image_mask_ratio < 1.0:
            raise ConfigError("method.options.image_mask_ratio must be in (0, 1)")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError("method.options.momentum must be in [0, 1) (0 = no EMA)")
        if self.mrm_modalities not in MRM_MODALITIES:
            raise ConfigError(f"method.options.mrm_modalities must be one of {', '.join(MRM_MODALITIES)}")
        for name in ("mrm_dim", "mrm_hidden", "mim_hidden"):
            if getattr(self, name) < 0:
                raise ConfigError(f"method.options.{name} must be >= 0 (0 = the text width)")


@dataclass
class MamoTargets:
    """What the target network makes of the unmasked pair (``Mamo.targets``); no gradient."""

    image_features: Optional[torch.Tensor]
    """[B, N, Dv] EMA image-encoder features of the patches (MIM targets), or None."""
    fused: Optional[torch.Tensor]
    """[B, 1+N+L, Dt] EMA fusion-encoder output (MRM targets before the EMA projector), or None."""


def gather_rows(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """states [B, T, D], index [B, M] -> the indexed rows, flattened to [B*M, D]."""
    picked = torch.gather(states, 1, index.unsqueeze(-1).expand(-1, -1, states.shape[-1]))
    return picked.reshape(-1, states.shape[-1])


class Mamo(Albef):
    default_losses = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "mrm": 1.0, "mim": 1.0}

    def __init__(self, cfg: RunConfig):
        # Albef.__init__ would build ALBEF's backbone; MAMO builds its own and reuses the rest
        Recipe.__init__(self, cfg)
        self.options = o = build_section(MamoOptions, cfg.method.options, "method.options")
        m = cfg.model
        self.backbone = MamoModel(m, mrm_dim=o.mrm_dim or m.text_width, mrm_hidden=o.mrm_hidden or m.text_width,
                                  mim_hidden=o.mim_hidden or m.text_width)
        self.temperature = temperature_parameter(cfg.method.temperature)
        self.text_masking = build_text_masking(cfg, self)
        grid = m.image_size // m.patch_size
        self.image_masking = BlockImageMasking(grid, o.image_mask_ratio, block=1, seed=cfg.train.seed,
                                               stream=IMAGE_MASK_STREAM)
        self.mrm_on = {v: self.uses("mrm") and o.mrm_modalities in (v, "both") for v in ("image", "text")}
        followed = {}
        if self.uses("mim") or self.uses("mrm"):
            followed["vision_encoder"] = self.backbone.vision_encoder
        if self.uses("mrm"):
            followed.update(text_encoder=self.backbone.text_encoder, fusion_encoder=self.backbone.fusion_encoder,
                            mrm_projector=self.backbone.mrm_projector)
        self.teacher = EmaTeacher(followed, o.momentum) if followed else None

    # -- views and targets ----------------------------------------------------------------------

    def patch_split(self, batch_size: int, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep_index [B, K], masked_index [B, M]) of step ``step``'s patch mask, each ascending;
        M = ceil(ratio * N), K = N - M."""
        patch_mask = self.image_masking(batch_size, step, device)
        order = torch.argsort(patch_mask.to(torch.int32), dim=1, stable=True)  # visible first, then masked
        visible = self.image_masking.num_patches - self.image_masking.masked_patches
        return order[:, :visible], order[:, visible:]

    @torch.no_grad()
    def targets(self, batch: Batch, *, image_features: bool = True, fused: bool = True) -> MamoTargets:
        """The target network f_θ̄ on the *unmasked* pair (I, T): EMA image features and/or the EMA
        fused sequence. No gradient; eval mode."""
        if self.teacher is None:
            raise RuntimeError("this MAMO configuration uses neither MRM nor MIM: there is no target network")
        image_states = self.teacher("vision_encoder", batch.images)
        fused_states = None
        if fused:
            text_states = self.teacher("text_encoder", batch.input_ids, batch.attention_mask)
            fused_states = self.teacher("fusion_encoder", image_states, text_states, batch.attention_mask)
        return MamoTargets(image_states[:, 1:] if image_features else None, fused_states)

    def fuse_cls(self, text_states, attention_mask, image_states, image_index=None) -> torch.Tensor:
        """ITM feature: the fused text [CLS] of text row i with image ``image_index[i]`` (default i), [n, Dt]."""
        if image_index is not None:
            image_states = image_states.index_select(0, image_index)
        return self.backbone.fuse_all(image_states, text_states, attention_mask)[:, self.backbone.text_offset]

    def _mrm_rows(self, rows: torch.Tensor) -> torch.Tensor:
        projected = self.backbone.mrm_projector(rows)
        return self.backbone.mrm_predictor(projected) if self.options.mrm_predictor else projected

    # -- the recipe -----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict:
        bb, step = self.backbone, self.draw_step
        aligning = self.uses("itc") or self.uses("itm")
        image_view = self.uses("mim") or self.mrm_on["image"]
        text_view = self.uses("mlm") or self.mrm_on["text"]
        image_states = bb.encode_image(batch.images) if aligning or text_view else None
        text_states = bb.encode_text(batch.input_ids, batch.attention_mask) if aligning or image_view else None

        losses = self.alignment(batch, image_states, text_states)
        metrics: dict[str, torch.Tensor] = {"temperature": self.temperature.reshape(())}
        if not (image_view or text_view):
            return self.total(losses, metrics)

        # the two masked views, fused in one call: (Î, T) then (I, T̂)
        tokens, texts = [], []
        if image_view:
            keep_index, masked_index = self.patch_split(len(batch), step, batch.images.device)
            visible_states = bb.encode_image(batch.images, keep_index=keep_index)
            tokens.append(bb.fusion_encoder.image_tokens(visible_states, keep_index))
            texts.append(text_states)
        if text_view:
            text_mask = self.text_masking(batch, step)
            tokens.append(bb.fusion_encoder.image_tokens(image_states))
            texts.append(bb.encode_text(text_mask.input_ids, batch.attention_mask))
        fused = bb.fusion_encoder.encode_tokens(torch.cat(tokens), torch.cat(texts),
                                                batch.attention_mask.repeat(len(tokens), 1))
        fused_views = fused.chunk(len(tokens))
        fused_image_view = fused_views[0] if image_view else None
        fused_text_view = fused_views[-1] if text_view else None

        needs_targets = self.uses("mim") or self.uses("mrm")
        targets = self.targets(batch, image_features=self.uses("mim"), fused=self.uses("mrm")) if needs_targets else None
        offset = bb.text_offset
        predictions, target_rows = [], []
        if image_view:
            rows = gather_rows(fused_image_view, masked_index + 1)
            if self.uses("mim"):
                losses["mim"] = feature_mim_loss(bb.mim_head(rows), gather_rows(targets.image_features, masked_index))
            if self.mrm_on["image"]:
                predictions.append(self._mrm_rows(rows))
                target_rows.append(self.teacher("mrm_projector", gather_rows(targets.fused, masked_index + 1)))
        if text_view:
            where = text_mask.mask
            rows = fused_text_view[:, offset:][where]
            if self.uses("mlm"):
                losses["mlm"] = mlm_loss(bb.mlm_logits(rows), text_mask.labels[where])
            if self.mrm_on["text"]:
                predictions.append(self._mrm_rows(rows))
                target_rows.append(self.teacher("mrm_projector", targets.fused[:, offset:][where]))
        if predictions:
            # eq. 1: the image-view and text-view terms are summed
            losses["mrm"] = sum(mrm_loss(p, t, normalize=self.options.mrm_normalize)
                                for p, t in zip(predictions, target_rows))
            metrics["mrm_pred_std"] = per_dimension_std(torch.cat(predictions))
            metrics["mrm_target_std"] = per_dimension_std(torch.cat(target_rows))
        return self.total(losses, metrics)

    def after_step(self, step: int, applied: bool = True) -> None:
        super().after_step(step, applied)
        if self.teacher is not None and applied:  # a skipped step left the student as it was
            self.teacher.update()

    @property
    def scorer(self):
        return AlbefScorer(self)

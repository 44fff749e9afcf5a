"""MaskVLM: joint masked vision and language modeling (Kwon et al., ICLR 2023;
papers/001_b8493e7dcfd561c7.txt), over the ALBEF building blocks.

Paper -> code:

- **Encoders and cross-modality encoders** (sec. 3.1, Fig. 3, A.2): ``models.maskvlm.MaskVLMModel``;
  f_im = ViT (pre-norm), f_txt = BERT (post-norm, ``text_encoder_layers`` deep, default the preset's
  whole BERT = ``model.text_layers + model.fusion_layers``), g_im / g_txt = ``cross_layers`` post-norm
  cross-attention blocks each (g_txt is the foundation's fusion encoder), g_im^de = ``decoder_layers``
  blocks + Linear to p*p*3 pixels, g_txt^de = the BERT LM head.
- **Text masking** (sec. 3.1, 4.1): ``method.text_masking = "random"`` with ``method.mlm_probability``
  and ``method.mlm_replace``; the paper's values are 0.3 and (1, 0, 0) — [MASK] only, no random/keep —
  and configs/*_maskvlm.json set them (the MethodConfig defaults are ALBEF's 0.15 / 0.8-0.1-0.1).
- **Image masking** (sec. 3.1, 4.1): ``masking.image.BlockImageMasking``, SimMIM random block masking,
  ``image_mask_ratio`` = 0.6 of the blocks, blocks of ``mask_block_patches`` x ``mask_block_patches``
  ViT patches (2 -> 32 px at 16 px patches; 16 px at the tiny preset's 8 px patches). Masked patches
  become the ViT's learned mask token and the encoder sees every position (``replace_mask``).
- **MLM** (eq. 1, first term): ``masked_lm`` (ALBEF's): phi_txt = g_txt^de(g_txt(f_im(I), f_txt(T_m)))
  — the masked text's encoder states as queries, the *unmasked* image's states as keys/values;
  cross-entropy at the masked tokens, averaged over the global batch's masked tokens.
- **MIM** (eq. 1, second term): ``masked_image_modeling``: phi_im = g_im^de(g_im(f_im(I_m), f_txt(T)))
  — the masked image's states as queries, the *unmasked* text's states as keys/values (in g_im and in
  the decoder's cross-attention); ``objectives.mim.pixel_mim_loss``: L1 over the masked pixels / their
  number Ω (every RGB value counted once, over the global batch).
- **ITC** (eq. 2): ALBEF's ``contrastive`` on the image [CLS] and text [START]=[CLS] projections, unit
  norm, learnable temperature, global batch.
- **ITM** (eq. 3): ``fuse_cls`` = z_im^cross * z_txt^cross, the [CLS] rows of g_im(v, w) and
  g_txt(w, v) (the last layer of each computed for the [CLS] query only, ``bert.BertStack``'s ``cls_only``:
  same value, less work); ALBEF's ``matching`` draws one hard-negative text per image and one hard-negative image
  per text from softmax(ITC similarity) (fp32, guarded) and applies ``itm_head`` (FC + softmax CE).
- **Total**: L = MLM + MIM + ITC + ITM (the paper uses no loss weighting: all weights 1); any subset is
  a config (``method.losses``, weight 0 = off: Table 5's ITC, ITC+ITM, MLM+MIM, ...). Encoder passes a
  subset does not need are skipped.

Paper vs code (sec. 3-4, A.2; the README's table; configs/base_maskvlm.json):

- ViT-B/16 (timm vit_base_patch16_224, ImageNet) + roberta-base, 12 + 12 layers; 3 cross blocks per side;
  3-block image decoder -> preset "base", ``text_encoder_layers`` 12, ``cross_layers`` 3,
  ``decoder_layers`` 3; weights: ``model.image_init`` / ``model.text_init``, unset (none offline).
  The text side is BERT (WordPiece, bert-base-uncased vocabulary, ``data.tokenizer``), not RoBERTa's
  BPE: fastvl has one text stack; a BERT-base checkpoint is the nearest stand-in.
- text 30%, [MASK] only -> ``method.mlm_probability`` 0.3, ``method.mlm_replace`` [1, 0, 0]; image 60%
  of 32 px blocks -> ``image_mask_ratio`` 0.6, ``mask_block_patches`` 2.
- ITC (eq. 2) *sums* the two directions; ``objectives.itc.itc_loss`` takes ALBEF's mean, so
  configs/base_maskvlm.json sets ``method.losses.itc`` 2 for eq. 2's sum. Loss weights otherwise all 1.
- batch 512 (16 GPUs x 32), 50 epochs on 4M -> ``data.batch_size`` 32 per process, ``train.steps``;
  224 px -> ``model.image_size``.
- AdamW wd 0.05, lr 3e-4 after 5 warm-up epochs, cosine to 3e-5 -> ``train.weight_decay``, ``lr``,
  ``warmup_steps`` (steps, not epochs), ``schedule`` "cosine", ``min_lr_ratio`` 0.1; the two encoders at
  1e-5 -> ``train.param_groups`` ``backbone.vision_encoder.*`` and ``backbone.text_encoder.*`` at
  ``lr_scale`` 1/30 (through the whole schedule: the paper does not say whether theirs decays);
  RandAugment (settings unstated) -> ``data.rand_augment`` "albef" with ALBEF's N = 2, M = 7.

Choices where the paper is vague (each is a default here, most are options):

1. Ω counts pixel *values* (pixels x 3 channels), SimMIM's normalisation; the reported loss is the
   mean absolute error per masked value.
2. MIM targets are the pixels the model reads (ImageNet-normalised), not per-patch normalised: the
   paper reconstructs "the original RGB pixels" and follows SimMIM, whose default is no per-patch
   norm. ``normalize_pixel_targets`` switches MAE's per-patch normalisation on.
3. Masked block count per image is exactly ceil(0.6 * number of blocks) (SimMIM's generator), not a
   Bernoulli draw per block.
4. The image decoder's cross-attention reads the text *encoder* features w (the same keys/values as
   g_im), since eq. 1 writes phi_im = g_im^de(g_im(f_im(I_m), f_txt(T))).
5. A cross-attention block is BERT's layer with cross-attention (self-attn, cross-attn, FFN, each
   post-norm); image-side blocks use the vision width/heads and a 4x FFN.
6. The token classifier is BERT's LM head (dense-GELU-LN + decoder tied to the word embeddings) rather
   than a bare FC: the paper initialises from RoBERTa, whose LM head has the same shape.
7. With unequal vision/text widths a Linear maps the image cross [CLS] to the text width before the
   product (not needed at the paper's 768/768).

Every ZeRO stage 0-3 works: under stage 3 the tied MLM decoder is registered as an external
parameter of the MLM head (``AlbefModel.zero3_external_parameters``); ``cls_only`` runs the last
layer's submodules through their own forwards, so ZeRO-3 gathers them as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import ConfigError, RunConfig, build_section
from ..data.batch import Batch
from ..masking import build_text_masking
from ..masking.image import BlockImageMasking
from ..models.maskvlm import MaskVLMModel
from ..objectives.mim import PATCH_NORM_EPS, pixel_mim_loss
from .albef import Albef, AlbefScorer
from .base import Recipe, temperature_parameter

IMAGE_MASK_STREAM = 3
"""``global_uniform`` stream of the image-mask draws (text masking uses 1, ITM negatives 2)."""


@dataclass
class MaskVLMOptions:
    """``method.options`` of the ``maskvlm`` recipe (defaults: the paper's settings)."""

    image_mask_ratio: float = 0.6
    """Fraction of masking blocks hidden per image (sec. 4.1: 60%, after SimMIM; Table 7 tries 0.5/0.7)."""
    mask_block_patches: int = 2
    """Side of a masking block in ViT patches (2: 32x32-pixel blocks over 16x16 patches)."""
    text_encoder_layers: Optional[int] = None
    """Depth of the text encoder f_txt; unset (null) = ``model.text_layers + model.fusion_layers`` (the
    whole BERT of the preset, as the paper's 12-layer RoBERTa)."""
    cross_layers: int = 3
    """Cross-attention blocks in each of the image and text cross-modality encoders (paper: 3)."""
    decoder_layers: int = 3
    """Cross-attention blocks in the image cross-modality decoder before its linear layer (paper: 3)."""
    normalize_pixel_targets: bool = False
    """Standardise each target patch by its own mean/variance before the L1 (MAE's norm_pix_loss).
    The paper reconstructs the original pixels: off."""

    def __post_init__(self):
        if not 0.0 < self.image_mask_ratio < 1.0:
            raise ConfigError("method.options.image_mask_ratio must be in (0, 1)")
        if self.mask_block_patches < 1:
            raise ConfigError("method.options.mask_block_patches must be >= 1")
        if self.text_encoder_layers is not None and self.text_encoder_layers < 1:
            raise ConfigError("method.options.text_encoder_layers must be >= 1 (or null: the preset's whole BERT)")
        if self.cross_layers < 1 or self.decoder_layers < 1:
            raise ConfigError("method.options.cross_layers and decoder_layers must be >= 1")


@dataclass
class Reconstruction:
    """What ``MaskVLM.reconstruct`` returns (images in the model's normalised space, [B, 3, S, S])."""

    patch_mask: torch.Tensor
    """[B, N] bool, True = masked patch."""
    masked: torch.Tensor
    """The input with masked patches zeroed (the dataset mean colour after denormalising)."""
    prediction: torch.Tensor
    """The decoder's pixels for every patch (un-normalised per patch when targets were normalised)."""
    pasted: torch.Tensor
    """Visible patches from the input, masked patches from the prediction."""


class MaskVLM(Albef):
    default_losses = {"itc": 1.0, "itm": 1.0, "mlm": 1.0, "mim": 1.0}

    def __init__(self, cfg: RunConfig):
        # Albef.__init__ would build ALBEF's backbone; this recipe builds its own and reuses the rest
        Recipe.__init__(self, cfg)
        self.options = build_section(MaskVLMOptions, cfg.method.options, "method.options")
        o, m = self.options, cfg.model
        grid = m.image_size // m.patch_size
        if grid % o.mask_block_patches:
            raise ConfigError(f"method.options.mask_block_patches={o.mask_block_patches} must divide the "
                              f"{grid}x{grid} patch grid (model.image_size / model.patch_size)")
        text_layers = m.text_layers + m.fusion_layers if o.text_encoder_layers is None else o.text_encoder_layers
        self.backbone = MaskVLMModel(m, text_layers=text_layers,
                                     cross_layers=o.cross_layers, decoder_layers=o.decoder_layers)
        self.temperature = temperature_parameter(cfg.method.temperature)
        self.text_masking = build_text_masking(cfg, self)
        self.image_masking = BlockImageMasking(grid, o.image_mask_ratio, o.mask_block_patches,
                                               seed=cfg.train.seed, stream=IMAGE_MASK_STREAM)

    # -- building blocks ------------------------------------------------------------------------

    def fuse_cls(self, text_states, attention_mask, image_states, image_index=None) -> torch.Tensor:
        """ITM feature z_im^cross * z_txt^cross [n, Dt] of text row i with image ``image_index[i]`` (default i)."""
        if image_index is not None:
            image_states = image_states.index_select(0, image_index)
        image_cls = self.backbone.cross_image_cls(image_states, text_states, attention_mask)
        text_cls = self.backbone.cross_text_cls(text_states, attention_mask, image_states)
        return self.backbone.itm_feature(image_cls, text_cls)

    def predict_pixels(self, images: torch.Tensor, patch_mask: torch.Tensor, text_states: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """phi_im(I_m, T): pixels per patch [B, N, p*p*3] from the masked image and the text states."""
        masked_states = self.backbone.encode_image(images, replace_mask=patch_mask)
        crossed = self.backbone.cross_image(masked_states, text_states, attention_mask)
        return self.backbone.decode_pixels(crossed, text_states, attention_mask)

    def masked_image_modeling(self, batch: Batch, text_states: torch.Tensor,
                              patch_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MIM loss of eq. 1 for this batch; ``text_states`` are f_txt of the caption (the unmasked
        one in the recipe). ``patch_mask`` defaults to this step's block mask."""
        if patch_mask is None:
            patch_mask = self.image_masking(len(batch), self.draw_step, batch.images.device)
        pred = self.predict_pixels(batch.images, patch_mask, text_states, batch.attention_mask)
        return pixel_mim_loss(pred, self.backbone.patchify(batch.images), patch_mask,
                              normalize_target=self.options.normalize_pixel_targets)

    # -- the recipe -----------------------------------------------------------------------------

    def forward(self, batch: Batch) -> dict:
        aligning = self.uses("itc") or self.uses("itm")
        image_states = self.backbone.encode_image(batch.images) if aligning or self.uses("mlm") else None
        text_states = (self.backbone.encode_text(batch.input_ids, batch.attention_mask)
                       if aligning or self.uses("mim") else None)
        losses = self.alignment(batch, image_states, text_states)
        if self.uses("mlm"):
            losses["mlm"] = self.masked_lm(batch, image_states)
        if self.uses("mim"):
            losses["mim"] = self.masked_image_modeling(batch, text_states)
        return self.total(losses, {"temperature": self.temperature.reshape(())})

    @property
    def scorer(self):
        return AlbefScorer(self)

    # -- looking at reconstructions -------------------------------------------------------------

    @torch.no_grad()
    def reconstruct(self, batch: Batch, step: Optional[int] = None) -> Reconstruction:
        """Mask ``batch.images`` with the draws of step ``step`` (default: this forward's ``draw_step``),
        reconstruct them from the masked images and the captions, and return the pieces of a picture."""
        step = self.draw_step if step is None else step
        images = batch.images
        patch_mask = self.image_masking(len(batch), step, images.device)
        text_states = self.backbone.encode_text(batch.input_ids, batch.attention_mask)
        pred = self.predict_pixels(images, patch_mask, text_states, batch.attention_mask).float()
        target = self.backbone.patchify(images).float()
        if self.options.normalize_pixel_targets:
            # predictions live in per-patch standardised space: put each patch back at the true
            # patch's mean and scale (MAE's visualisation; it borrows the masked patch's statistics)
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, unbiased=False, keepdim=True) + PATCH_NORM_EPS).sqrt()
            pred = pred * std + mean
        where = patch_mask.unsqueeze(-1)
        unpatchify = self.backbone.unpatchify
        return Reconstruction(patch_mask, unpatchify(torch.where(where, torch.zeros_like(target), target)),
                              unpatchify(pred), unpatchify(torch.where(where, pred, target)))

"""MaskVLM's network (Kwon et al., ICLR 2023, section 3 and appendix A.2, Figures 2, 3 and 7).

``MaskVLMModel`` is the ALBEF backbone re-cut into MaskVLM's parts plus the image-side pieces:

=========================  ===================================================  ===============================
paper                      here                                                 layers
=========================  ===================================================  ===============================
image encoder f_im         ``vision_encoder`` (ViT, pre-norm, SimMIM mask       ``model.vision_layers``
                           token via ``replace_mask``)
text encoder f_txt         ``text_encoder`` (BERT, post-norm)                   ``text_layers`` (the whole BERT:
                                                                                ALBEF's text + fusion depth)
text cross-modality        ``fusion_encoder`` (= ``text_cross_encoder``): BERT  ``cross_layers`` (paper: 3)
encoder g_txt              layers whose cross-attention reads the image
image cross-modality       ``image_cross_encoder``: the same post-norm BERT     ``cross_layers`` (paper: 3)
encoder g_im               layer at the vision width, cross-attending the text
image decoder g_im^de      ``image_decoder``: cross-attention blocks + a        ``decoder_layers`` (paper: 3)
                           Linear(Dv -> p*p*3) per patch
token classifier g_txt^de  ``mlm_head`` (BERT LM head, decoder tied to the      —
                           word embeddings)
ITC projections            ``vision_proj`` / ``text_proj`` (unit norm)          —
ITM head g^itm             ``itm_head`` on ``z_im^cross * z_txt^cross``         —
=========================  ===================================================  ===============================

A "cross-attention block" (Fig. 3b / 7c) is ``bert.BertLayer`` with its cross-attention:
``h = LN(x + SelfAttn(x)); h = LN(h + CrossAttn(h, other)); y = LN(h + FFN(h))`` — post-norm, queries
from this modality, keys/values ``Linear`` of the other modality's *encoder* features. The image-side
blocks use the vision width and heads and a 4x FFN (ViT's ratio); the text-side blocks are the
foundation's fusion layers.

ITM fuses the two [CLS] features by an element-wise product, which needs equal widths: when the vision
and text widths differ (the "small" preset), ``image_cross_to_text`` (Linear Dv -> Dt) maps the image
[CLS] first; at equal widths (the paper's 768/768, "tiny", "base") it is the identity.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .albef import AlbefModel
from .attention import name_attention_modules
from .bert import BertLayer, BertStack
from .init import init_weights
from .vit import VIT_MLP_RATIO


def image_cross_layers(cfg: ModelConfig, count: int) -> list[BertLayer]:
    """``count`` post-norm cross-attention blocks at the vision width reading text features."""
    return [BertLayer(cfg.vision_width, cfg.vision_heads, VIT_MLP_RATIO * cfg.vision_width, cfg.attention,
                      cfg.dropout, context_width=cfg.text_width) for _ in range(count)]


class ImageCrossEncoder(nn.Module):
    """g_im: ``forward(image_states [B, 1+N, Dv], text_states [B, L, Dt], attention_mask [B, L])
    -> [B, 1+N, Dv]``; image rows attend each other and the real text tokens (padding hidden)."""

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.encoder = BertStack(image_cross_layers(cfg, num_layers), cfg.grad_checkpointing)
        self.apply(init_weights)

    def forward(self, image_states: torch.Tensor, text_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        context_mask = None if attention_mask is None else attention_mask.bool()
        return self.encoder(image_states, None, context=text_states, context_mask=context_mask)


class ImageDecoder(nn.Module):
    """g_im^de: cross-attention blocks over g_im's output (reading the text features) and a linear map
    of every patch token to its p*p*3 pixels. ``forward(states [B, 1+N, Dv], text_states, attention_mask)
    -> [B, N, p*p*3]`` in ``VisionTransformer.patchify`` order (the [CLS] row is dropped)."""

    def __init__(self, cfg: ModelConfig, num_layers: int):
        super().__init__()
        self.blocks = ImageCrossEncoder(cfg, num_layers)
        self.to_pixels = nn.Linear(cfg.vision_width, cfg.patch_size * cfg.patch_size * 3)
        self.to_pixels.apply(init_weights)

    def forward(self, states: torch.Tensor, text_states: torch.Tensor,
                attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.to_pixels(self.blocks(states, text_states, attention_mask)[:, 1:])


class MaskVLMModel(AlbefModel):
    """ALBEF's backbone with a ``text_layers``-deep text encoder, a ``cross_layers``-deep fusion encoder
    (MaskVLM's text cross-modality encoder), and MaskVLM's ``image_cross_encoder``, ``image_decoder``
    and ``image_cross_to_text``. Everything ``AlbefModel`` offers (``encode_image`` with
    ``replace_mask``, ``encode_text``, ``fuse``, heads, the observer) works unchanged.

    ``cfg.text_init`` loads a BertModel into the text encoder (its first ``text_layers`` layers); the
    cross-modality encoders stay freshly initialised, as in the paper (there RoBERTa fills the 12-layer
    text encoder and the cross-modality encoders are new).
    """

    def __init__(self, cfg: ModelConfig, *, text_layers: int, cross_layers: int, decoder_layers: int):
        if min(text_layers, cross_layers, decoder_layers) < 1:
            raise ValueError("MaskVLM needs at least one text, cross-modality and decoder layer")
        super().__init__(dataclasses.replace(cfg, text_layers=text_layers, fusion_layers=cross_layers))
        self.image_cross_encoder = ImageCrossEncoder(cfg, cross_layers)
        self.image_decoder = ImageDecoder(cfg, decoder_layers)
        self.image_cross_to_text = (nn.Identity() if cfg.vision_width == cfg.text_width
                                    else nn.Linear(cfg.vision_width, cfg.text_width))
        self.image_cross_to_text.apply(init_weights)
        name_attention_modules(self)

    @property
    def text_cross_encoder(self) -> nn.Module:
        """g_txt (stored as ``fusion_encoder`` so ALBEF's ``fuse`` and BERT loading apply)."""
        return self.fusion_encoder

    def cross_image(self, image_states: torch.Tensor, text_states: torch.Tensor,
                    attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """g_im(v, w): image states [B, 1+N, Dv] attending the text states [B, L, Dt] -> [B, 1+N, Dv]."""
        return self.image_cross_encoder(image_states, text_states, attention_mask)

    def cross_image_cls(self, image_states: torch.Tensor, text_states: torch.Tensor,
                        attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """z_im^cross = ``cross_image(...)[:, 0]`` [B, Dv], the last layer computed for [CLS] only."""
        context_mask = None if attention_mask is None else attention_mask.bool()
        return self.image_cross_encoder.encoder(image_states, None, context=text_states, context_mask=context_mask,
                                                cls_only=True)

    def cross_text_cls(self, text_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                       image_states: torch.Tensor) -> torch.Tensor:
        """z_txt^cross = ``fuse(...)[:, 0]`` [B, Dt], the last layer computed for [CLS] only."""
        return self.fuse(text_states, attention_mask, image_states, cls_only=True)

    def decode_pixels(self, image_cross_states: torch.Tensor, text_states: torch.Tensor,
                      attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """g_im^de: g_im's output [B, 1+N, Dv] -> pixels per patch [B, N, p*p*3]."""
        return self.image_decoder(image_cross_states, text_states, attention_mask)

    def itm_feature(self, image_cross_cls: torch.Tensor, text_cross_cls: torch.Tensor) -> torch.Tensor:
        """``z_im^cross * z_txt^cross`` [n, Dt], the input of ``itm_logits``."""
        return self.image_cross_to_text(image_cross_cls) * text_cross_cls

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, p*p*3], the MIM target layout."""
        return self.vision_encoder.patchify(images)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder.unpatchify(patches)

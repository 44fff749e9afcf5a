"""ALBEF's fusion encoder: BERT layers that also cross-attend to the image.

Each layer is a ``bert.BertLayer`` with a ``crossattention`` block (new parameters, not in a BertModel
checkpoint): queries from the text, keys/values ``Linear(Dv -> Dt)`` of the image states. In ALBEF these
are BERT's upper layers (``text_layers .. text_layers + fusion_layers - 1``), and ``hf_bert.load_hf_bert``
loads them from there; here they are numbered from 0 (``encoder.layer.{j}``).

The image side of every cross-attention depends on the images alone, not on the text: an
``ImageContext`` holds it projected once (per layer the keys and values of M images), and any number of
passes read it, each text row picking its image by index. ALBEF fuses the same images with three sets
of texts (the ITM positives, their hard-negative texts, the masked captions) and their hard-negative
images are rows of the same batch: one projection instead of four (at base size 2 x 768 x 768 per
image token and layer, about half of a fusion pass's work).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from ..config import ModelConfig
from .attention import name_attention_modules
from .bert import BertStack, KeysValues, text_layers
from .init import init_weights


@dataclass
class ImageContext:
    """Cross-attention keys/values of M images for every fusion layer (``layers[j]``: [M, H, N, Dh] each)
    and their mask [M, N] bool (True = real image token) or None."""

    layers: list[KeysValues]
    mask: Optional[torch.Tensor] = None

    def rows(self, index: torch.Tensor) -> "ImageContext":
        """The context of images ``index`` [n] (repeats allowed; gradients add up in the shared rows)."""
        mask = None if self.mask is None else self.mask.index_select(0, index)
        return ImageContext([kv.rows(index) for kv in self.layers], mask)

    def cat(self, other: "ImageContext") -> "ImageContext":
        """This context's images followed by ``other``'s."""
        if (self.mask is None) != (other.mask is None):
            raise ValueError("both image contexts need a mask, or neither")
        layers = [KeysValues(torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values]))
                  for a, b in zip(self.layers, other.layers)]
        return ImageContext(layers, None if self.mask is None else torch.cat([self.mask, other.mask]))


class FusionEncoder(nn.Module):
    """``forward(text_states, attention_mask, image_states, image_mask=None, *, image_index=None,
    cls_only=False, attn_mask=None, kind=None, step=None) -> [B, L, Dt]`` ([B, Dt] with ``cls_only``).

    - text_states [B, L, Dt] (the text encoder's output), attention_mask [B, L] (1/True = real token);
    - image_states [M, N, Dv], or their ``ImageContext`` (``image_context``; it carries its own mask);
      image_mask [M, N] bool (True = real image token), default all real;
    - image_index [B] long: text row i reads image ``image_index[i]`` (default: image i, M = B);
    - cls_only: the fused [CLS] rows alone, the last layer computed for them only (``BertStack``);
    - attn_mask / kind / step restrict the text self-attention (the image is context: cross-attention
      rows see every real image token).

    With ``fusion_layers == 0`` it returns ``text_states`` unchanged.
    """

    def __init__(self, cfg: ModelConfig, num_layers: Optional[int] = None):
        super().__init__()
        count = cfg.fusion_layers if num_layers is None else num_layers
        self.encoder = BertStack(text_layers(cfg, count, context_width=cfg.vision_width), cfg.grad_checkpointing)
        self.apply(init_weights)
        name_attention_modules(self)

    def image_context(self, image_states: torch.Tensor, image_mask: Optional[torch.Tensor] = None) -> ImageContext:
        """Every layer's cross-attention keys and values of ``image_states`` [M, N, Dv]."""
        return ImageContext([layer.crossattention.self.project_context(image_states) for layer in self.encoder.layer],
                            None if image_mask is None else image_mask.bool())

    def forward(self, text_states: torch.Tensor, attention_mask: Optional[torch.Tensor],
                image_states: Union[torch.Tensor, ImageContext], image_mask: Optional[torch.Tensor] = None, *,
                image_index: Optional[torch.Tensor] = None, cls_only: bool = False,
                attn_mask=None, kind=None, step=None) -> torch.Tensor:
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        if isinstance(image_states, ImageContext):
            if image_mask is not None:
                raise ValueError("an ImageContext carries its own image mask: pass it to image_context")
            context = image_states
        elif image_index is None:  # one pass over its own images: each layer projects them as it runs
            return self.encoder(text_states, key_padding_mask, context=image_states,
                                context_mask=None if image_mask is None else image_mask.bool(),
                                cls_only=cls_only, attn_mask=attn_mask, kind=kind, step=step)
        else:
            context = self.image_context(image_states, image_mask)
        if image_index is not None:
            context = context.rows(image_index)
        return self.encoder(text_states, key_padding_mask, context=context.layers, context_mask=context.mask,
                            cls_only=cls_only, attn_mask=attn_mask, kind=kind, step=step)

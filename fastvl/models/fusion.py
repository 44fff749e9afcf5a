"""ALBEF's fusion encoder: BERT layers that also cross-attend to the image.

Each layer is a ``bert.BertLayer`` with a ``crossattention`` block (new parameters, not in a BertModel
checkpoint): queries from the text, keys/values ``Linear(Dv -> Dt)`` of the image states. In ALBEF these
are BERT's upper layers (``text_layers .. text_layers + fusion_layers - 1``), and ``hf_bert.load_hf_bert``
loads them from there; here they are numbered from 0 (``encoder.layer.{j}``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .attention import name_attention_modules
from .bert import BertStack, text_layers
from .init import init_weights


class FusionEncoder(nn.Module):
    """``forward(text_states, attention_mask, image_states, image_mask=None, *, attn_mask=None, kind=None,
    step=None) -> [B, L, Dt]``.

    - text_states [B, L, Dt] (the text encoder's output), attention_mask [B, L] (1/True = real token);
    - image_states [B, N, Dv]; image_mask [B, N] bool (True = real image token), default all real;
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

    def forward(self, text_states: torch.Tensor, attention_mask: Optional[torch.Tensor], image_states: torch.Tensor,
                image_mask: Optional[torch.Tensor] = None, *, attn_mask=None, kind=None, step=None) -> torch.Tensor:
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        context_mask = None if image_mask is None else image_mask.bool()
        return self.encoder(text_states, key_padding_mask, context=image_states, context_mask=context_mask,
                            attn_mask=attn_mask, kind=kind, step=step)

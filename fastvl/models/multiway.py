"""Single-stream multiway transformer (VLMo / BEiT-3 style), C-Mask's main model.

One sequence ``[image tokens | text tokens | (pseudo masks)]`` goes through ``layers`` pre-norm blocks:

    x = x + Attn(LN1(x))                     shared self-attention over every token of the sequence
    x = x + FFN_e(LN2_e(x))                  a feed-forward *expert* e per token:
                                             e = vision for image columns, text for text columns;
                                             in the top ``vl_layers`` blocks of a *fused* pass (image
                                             and text together) every token uses the vision-language
                                             expert e = vl instead.

Unimodal passes (image only / text only, used by ITC and by the C-Mask agent's shared layers) use the
modality experts in every block, as VLMo does. The image enters through a ViT patch embedding
(``Conv2d(p, p)`` + [CLS] + learned positions + a learned image-type vector), the text through BERT
embeddings (word + position + token type; ``position_ids`` let pseudo masks reuse the positions of
the tokens they stand for). Heads: BERT's MLM head tied to the word embeddings, ITC projections of
the image / text [CLS] of the unimodal passes.

Backward: plain autograd; expert routing is a column split (the layout keeps each modality
contiguous: image columns ``[0, text_start)``, text columns ``[text_start, S)``), so no gather.

Every attention module is an ``ObservedAttention`` named ``blocks.<i>.attn`` (C-Mask's reward reads
q/k/v of each layer through the observer) and accepts the generalized-LM ``kind``/``step`` rule.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig
from .attention import ObservableModel, ObservedAttention, merge_heads, name_attention_modules, split_heads
from .bert import BertEmbeddings
from .checkpointing import run_layer
from .heads import MlmHead, unit_projection
from .init import INIT_STD, init_weights

MULTIWAY_LN_EPS = 1e-6
EXPERTS = ("vision", "text")


class MultiwayAttention(ObservedAttention):
    """Shared multi-head self-attention: fused qkv projection, output projection."""

    def __init__(self, width: int, heads: int, backend: str, dropout: float):
        super().__init__(backend, dropout, is_cross=False)
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, key_padding_mask=None, kind=None, step=None):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = self.attend(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads),
                          key_padding_mask, None, kind, step)
        return self.proj(merge_heads(out))


class Expert(nn.Module):
    """LN -> Linear -> GELU -> Linear (the residual is added by the block)."""

    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=MULTIWAY_LN_EPS)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(F.gelu(self.fc1(self.norm(x)))))


class MultiwayBlock(nn.Module):
    """Pre-norm block with shared attention and modality experts (+ a VL expert when ``has_vl``)."""

    def __init__(self, width: int, heads: int, hidden: int, backend: str, dropout: float, has_vl: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=MULTIWAY_LN_EPS)
        self.attn = MultiwayAttention(width, heads, backend, dropout)
        self.drop = nn.Dropout(dropout)
        names = EXPERTS + (("vl",) if has_vl else ())
        self.experts = nn.ModuleDict({name: Expert(width, hidden, dropout) for name in names})

    def forward(self, x, text_start: int, key_padding_mask=None, kind=None, step=None, fused: bool = False):
        """x [B, S, W]; columns ``< text_start`` are image tokens, the rest text (or pseudo masks)."""
        x = x + self.drop(self.attn(self.norm1(x), key_padding_mask, kind, step))
        if fused and "vl" in self.experts:
            return x + self.experts["vl"](x)
        parts = []
        if text_start > 0:
            parts.append(self.experts["vision"](x[:, :text_start]))
        if text_start < x.shape[1]:
            parts.append(self.experts["text"](x[:, text_start:]))
        return x + (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))


class MultiwayModel(ObservableModel):
    """The multiway transformer of width ``cfg.text_width`` (heads ``cfg.text_heads``, FFN
    ``cfg.text_intermediate``), ``layers`` blocks of which the top ``vl_layers`` have a VL expert.

    =====================================================================  ============================
    ``embed_image(images)``                                               [B, 3, S, S] -> [B, 1+N, W]
    ``embed_text(input_ids, position_ids=None)``                          [B, L] -> [B, L, W]
    ``run(x, text_start, key_padding_mask, kind, step, fused, start, stop)``  blocks start..stop-1
    ``encode_image(images, capture=None)`` / ``encode_text(ids, mask, capture=None)``
                                                                          unimodal passes -> (final, captured)
    ``encode_joint(image_embeds, text_embeds, text_padding, kind, step)``  fused pass -> [B, S, W] (normed)
    ``image_feat`` / ``text_feat`` / ``mlm_logits``                         heads
    =====================================================================  ============================
    """

    def __init__(self, cfg: ModelConfig, layers: Optional[int] = None, vl_layers: int = 2):
        super().__init__()
        if cfg.image_init:
            raise ConfigError("model.image_init is not supported by the multiway backbone (C-Mask's "
                              "default method.options.backbone=multiway): its image rows run through the text "
                              "width's shared layers; unset model.image_init or set method.options.backbone=albef")
        self.cfg = cfg
        width = cfg.text_width
        self.width = width
        self.num_layers = cfg.text_layers + cfg.fusion_layers if layers is None else layers
        if not 0 <= vl_layers <= self.num_layers:
            raise ValueError(f"vl_layers ({vl_layers}) must be in [0, layers={self.num_layers}]")
        self.vl_layers = vl_layers
        self.patch_size = cfg.patch_size
        self.num_patches = cfg.num_patches
        self.patch_embed = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, width))
        self.image_type = nn.Parameter(torch.zeros(1, 1, width))
        self.text_embeddings = BertEmbeddings(cfg.vocab_size, width, cfg.max_positions, cfg.dropout)
        self.blocks = nn.ModuleList(
            MultiwayBlock(width, cfg.text_heads, cfg.text_intermediate, cfg.attention, cfg.dropout,
                          has_vl=i >= self.num_layers - vl_layers)
            for i in range(self.num_layers))
        self.norm = nn.LayerNorm(width, eps=MULTIWAY_LN_EPS)
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.mlm_head = MlmHead(width, cfg.vocab_size)
        self.apply(init_weights)
        for p in (self.cls_token, self.pos_embed, self.image_type):
            nn.init.trunc_normal_(p, std=INIT_STD, a=-2 * INIT_STD, b=2 * INIT_STD)
        name_attention_modules(self)

    def no_weight_decay(self) -> list[str]:
        return ["cls_token", "pos_embed", "image_type"]

    # -- embeddings -----------------------------------------------------------------------------

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        return torch.cat([cls, x], dim=1) + (self.pos_embed + self.image_type).to(x.dtype)

    def embed_text(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.text_embeddings(input_ids, position_ids)

    # -- passes ---------------------------------------------------------------------------------

    def run(self, x, text_start: int, key_padding_mask=None, kind=None, step=None, fused: bool = False,
            start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Blocks ``start .. stop-1`` on x [B, S, W] (no final norm)."""
        for block in self.blocks[start:stop]:
            x = run_layer(block, self.cfg.grad_checkpointing, x, text_start, key_padding_mask, kind, step, fused)
        return x

    def encode_image(self, images: torch.Tensor, capture: Optional[int] = None):
        """Image-only pass -> (normed states [B, 1+N, W], hidden after ``capture`` blocks or None)."""
        x = self.embed_image(images)
        n = x.shape[1]
        if capture is None:
            return self.norm(self.run(x, n)), None
        half = self.run(x, n, stop=capture)
        return self.norm(self.run(half, n, start=capture)), half

    def encode_text(self, input_ids, attention_mask, capture: Optional[int] = None):
        """Text-only pass -> (normed states [B, L, W], hidden after ``capture`` blocks or None)."""
        x = self.embed_text(input_ids)
        padding = attention_mask.bool()
        if capture is None:
            return self.norm(self.run(x, 0, padding)), None
        half = self.run(x, 0, padding, stop=capture)
        return self.norm(self.run(half, 0, padding, start=capture)), half

    def encode_joint(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_padding: torch.Tensor,
                     kind: Optional[torch.Tensor] = None, step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fused pass over ``[image | text]``; ``text_padding`` [B, T] (True = real); kind/step [B, T]
        for the text part (the image is CONTEXT). Returns normed states [B, N_img + T, W]."""
        b, n_img = image_embeds.shape[:2]
        x = torch.cat([image_embeds, text_embeds.to(image_embeds.dtype)], dim=1)
        padding = torch.cat([text_padding.new_ones(b, n_img), text_padding.bool()], dim=1)
        if kind is not None:
            kind = torch.cat([kind.new_zeros(b, n_img), kind], dim=1)  # CONTEXT = 0
            step = torch.cat([step.new_zeros(b, n_img), step], dim=1)
        return self.norm(self.run(x, n_img, padding, kind, step, fused=True))

    # -- heads ----------------------------------------------------------------------------------

    def image_feat(self, image_states):
        return unit_projection(self.vision_proj, image_states[:, 0])

    def text_feat(self, text_states):
        return unit_projection(self.text_proj, text_states[:, 0])

    def mlm_logits(self, states):
        return self.mlm_head(states, self.text_embeddings.word_embeddings.weight)

    def zero3_external_parameters(self):
        return [(self.mlm_head, self.text_embeddings.word_embeddings.weight)]

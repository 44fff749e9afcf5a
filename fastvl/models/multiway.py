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

Initialisation from unimodal checkpoints (C-Mask appendix C, VLMo's recipe), through the loaders of
``model.image_init`` (``vision_init.load_vision_checkpoint``) and ``model.text_init``
(``hf_bert.load_hf_bert``), each into a throw-away ViT / BERT of the multiway's shape whose weights are
then copied over:

==============================================  ============================================
ViT (``model.image_init``)                      multiway
==============================================  ============================================
patch embedding, [CLS], positions, final norm   ``patch_embed``, ``cls_token``, ``pos_embed``, ``norm``
block i: norm1, attention (qkv, proj)           ``blocks.i.norm1``, ``blocks.i.attn`` (shared by all tokens)
block i: norm2, MLP                             ``blocks.i.experts.vision`` (norm, fc1, fc2)
BERT (``model.text_init``)
embeddings                                      ``text_embeddings``
layer i: attention.output.LayerNorm,            ``blocks.i.experts.text`` (norm, fc1, fc2): the LayerNorm
intermediate.dense, output.dense                that normalises the FFN's input, as the pre-norm expert's does
cls.predictions (BertForMaskedLM)               ``mlm_head``
==============================================  ============================================

BERT's self-attention and its output.LayerNorm are not read (the attention is the ViT's; the output norm
has no place in a pre-norm block); the VL experts, ``image_type`` and the ITC projections keep their
initialisation (the VL expert is trained in VLMo's last stage, which C-Mask's pretraining stands for).
The LayerNorm epsilon stays ``MULTIWAY_LN_EPS``; the ViT must be plain (no LayerScale) with
``VIT_MLP_RATIO`` x width = ``model.text_intermediate``, as wide as ``model.text_width``, with as many
blocks and heads as the multiway (``method.options.layers``, ``model.text_heads``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig
from .attention import ObservableModel, ObservedAttention, merge_heads, name_attention_modules, split_heads
from .bert import BertEmbeddings, TextEncoder
from .checkpointing import run_layer
from .heads import MlmHead, unit_projection
from .hf_bert import load_hf_bert
from .init import INIT_STD, init_weights
from .vision_init import load_vision_checkpoint
from .vit import VIT_MLP_RATIO, VisionTransformer

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
        self.image_init_report = self.load_vision(cfg.image_init) if cfg.image_init else None
        self.text_init_report = self.load_text(cfg.text_init) if cfg.text_init else None
        name_attention_modules(self)

    # -- unimodal initialisation (see the module docstring) ---------------------------------------

    def _unimodal_shape(self) -> ModelConfig:
        """The config of a ViT / BERT of the multiway's width, depth and heads."""
        return dataclasses.replace(self.cfg, vision_width=self.width, vision_layers=self.num_layers,
                                   vision_heads=self.cfg.text_heads, text_layers=self.num_layers, fusion_layers=0,
                                   image_init=None, text_init=None)

    def load_vision(self, source):
        """Patch embedding, [CLS], positions, the shared attention and the vision experts from a ViT
        checkpoint (``model.image_init``); returns the loader's report."""
        shape = self._unimodal_shape()
        if shape.vision_layer_scale or VIT_MLP_RATIO * self.width != self.cfg.text_intermediate:
            raise ConfigError(f"model.image_init: the multiway backbone's vision experts are plain ViT MLPs of "
                              f"model.text_intermediate ({self.cfg.text_intermediate}) = {VIT_MLP_RATIO} x "
                              f"model.text_width ({self.width}) without LayerScale: set model.text_intermediate="
                              f"{VIT_MLP_RATIO * self.width} and model.vision_layer_scale=false, or use "
                              f"method.options.backbone=albef")
        vit = VisionTransformer(shape)
        try:
            report = load_vision_checkpoint(vit, source)
        except ConfigError as error:
            raise ConfigError(f"{error} (the multiway backbone's ViT has model.text_width, model.text_heads and "
                              f"method.options.layers for width, heads and depth)") from None
        names = {"patch_embed.weight": "patch_embed.weight", "patch_embed.bias": "patch_embed.bias",
                 "cls_token": "cls_token", "pos_embed": "pos_embed", "norm.weight": "norm.weight",
                 "norm.bias": "norm.bias"}
        for i in range(self.num_layers):
            for ours, theirs in (("norm1", "norm1"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                                 ("experts.vision.norm", "norm2"), ("experts.vision.fc1", "mlp.fc1"),
                                 ("experts.vision.fc2", "mlp.fc2")):
                for leaf in ("weight", "bias"):
                    names[f"blocks.{i}.{ours}.{leaf}"] = f"blocks.{i}.{theirs}.{leaf}"
        self._copy_from(vit, names)
        return report

    def load_text(self, folder):
        """Word/position/type embeddings, the text experts and (BertForMaskedLM) the MLM head from a BERT
        checkpoint (``model.text_init``); returns the loader's report."""
        shape = self._unimodal_shape()
        bert = TextEncoder(shape, self.num_layers)
        report = load_hf_bert(bert, None, folder, mlm_head=self.mlm_head)
        names = {f"text_embeddings.{name}": f"embeddings.{name}" for name, _ in bert.embeddings.named_parameters()}
        for i in range(self.num_layers):
            layer = f"encoder.layer.{i}"
            for ours, theirs in (("norm", "attention.output.LayerNorm"), ("fc1", "intermediate.dense"),
                                 ("fc2", "output.dense")):
                for leaf in ("weight", "bias"):
                    names[f"blocks.{i}.experts.text.{ours}.{leaf}"] = f"{layer}.{theirs}.{leaf}"
        self._copy_from(bert, names)
        return report

    @torch.no_grad()
    def _copy_from(self, source: nn.Module, names: dict[str, str]) -> None:
        """``names``: our parameter -> ``source``'s."""
        ours, theirs = dict(self.named_parameters()), dict(source.named_parameters())
        for name, source_name in names.items():
            ours[name].copy_(theirs[source_name])

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
        return self.mlm_head(states, self.text_embeddings.word_embeddings)

    def zero3_external_parameters(self):
        """The tied decoder reads the word embeddings, and ``embed_image`` (a method the recipe calls,
        not a forward) reads the image tokens (see ``AlbefModel.zero3_external_parameters``)."""
        return [(self.mlm_head, self.text_embeddings.word_embeddings.weight),
                *((None, p) for p in (self.cls_token, self.pos_embed, self.image_type))]

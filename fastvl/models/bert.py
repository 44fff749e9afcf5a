"""BERT-style text encoder whose parameter names are Hugging Face ``BertModel``'s.

Post-norm layers with exact (erf) GELU, as in BERT:

    h = LN(x + Dropout(Wo · SelfAttn(x)))                        attention.{self,output}
    h = LN(h + Dropout(Wc · CrossAttn(h, image)))                crossattention.{self,output} (fusion only)
    y = LN(h + Dropout(W2 · GELU(W1 · h)))                       intermediate.dense, output.{dense,LayerNorm}

``TextEncoder`` = ``embeddings`` + ``encoder.layer.{0..text_layers-1}`` (self-attention only); ALBEF's
fusion encoder (``fusion.FusionEncoder``) stacks the same ``BertLayer`` with the cross-attention block.
Parameter names inside a layer follow ``transformers``' BertLayer exactly, so a BertModel state dict maps
onto them key by key (``hf_bert.load_hf_bert``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import ObservedAttention, merge_heads, name_attention_modules, split_heads
from .checkpointing import run_layer
from .init import init_weights

BERT_LN_EPS = 1e-12
TYPE_VOCAB_SIZE = 2


class BertEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, vocab_size: int, width: int, max_positions: int, dropout: float,
                 type_vocab_size: int = TYPE_VOCAB_SIZE):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=BERT_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {length} tokens exceeds max_positions={self.position_embeddings.num_embeddings}")
        x = self.word_embeddings(input_ids)
        if position_ids is None:
            x = x + self.position_embeddings.weight[:length]
        else:
            x = x + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))

    def zero3_external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """``forward`` slices two child tables directly (no lookup for the default ids): under ZeRO-3
        they are gathered for this module's forward (see ``AlbefModel.zero3_external_parameters``)."""
        return [(self, self.position_embeddings.weight), (self, self.token_type_embeddings.weight)]


class KeysValues(NamedTuple):
    """A cross-attention's keys and values [B, H, N, Dh], projected beforehand
    (``BertSelfAttention.project_context``): passes over the same context then share the projection."""

    keys: torch.Tensor
    values: torch.Tensor

    def rows(self, index: torch.Tensor) -> "KeysValues":
        # index_select: its backward (index_add_) sums repeated rows faster on the CPU than indexing's
        return KeysValues(self.keys.index_select(0, index), self.values.index_select(0, index))


Context = Union[torch.Tensor, KeysValues]
"""What a cross-attention reads: the context states [B, N, C], or their projected ``KeysValues``."""


class BertSelfAttention(ObservedAttention):
    """query/key/value projections + attention. For cross-attention, key/value read ``context_width``
    features (the image width) and project them to the text width."""

    def __init__(self, width: int, heads: int, backend: str, dropout: float, context_width: Optional[int] = None):
        super().__init__(backend, dropout, is_cross=context_width is not None)
        if width % heads:
            raise ValueError(f"text width {width} must divide by heads {heads}")
        self.heads = heads
        kv_width = width if context_width is None else context_width
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(kv_width, width)
        self.value = nn.Linear(kv_width, width)

    def project_context(self, source: torch.Tensor) -> KeysValues:
        """Keys and values [B, H, Lk, Dh] of ``source`` [B, Lk, C]."""
        return KeysValues(split_heads(self.key(source), self.heads), split_heads(self.value(source), self.heads))

    def forward(self, hidden: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                context: Optional[Context] = None, *, attn_mask=None, kind=None, step=None) -> torch.Tensor:
        """hidden [B, Lq, W]; context [B, Lk, C] or its ``KeysValues`` (cross) or None (self); masks as
        in ``attention``."""
        q = split_heads(self.query(hidden), self.heads)
        k, v = context if isinstance(context, KeysValues) else self.project_context(
            hidden if context is None else context)
        return merge_heads(self.attend(q, k, v, key_padding_mask, attn_mask, kind, step))


class BertSelfOutput(nn.Module):
    """LN(input + Dropout(dense(hidden))) — shared by the attention output and the FFN output."""

    def __init__(self, in_width: int, width: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_width, width)
        self.LayerNorm = nn.LayerNorm(width, eps=BERT_LN_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class BertAttention(nn.Module):
    def __init__(self, width: int, heads: int, backend: str, dropout: float, context_width: Optional[int] = None):
        super().__init__()
        self.self = BertSelfAttention(width, heads, backend, dropout, context_width)
        self.output = BertSelfOutput(width, width, dropout)

    def forward(self, hidden, key_padding_mask=None, context=None, *, attn_mask=None, kind=None, step=None):
        attended = self.self(hidden, key_padding_mask, context, attn_mask=attn_mask, kind=kind, step=step)
        return self.output(attended, hidden)


class BertIntermediate(nn.Module):
    def __init__(self, width: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(width, intermediate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class BertLayer(nn.Module):
    """One post-norm BERT layer; with ``context_width`` it also cross-attends to a context (the image)."""

    def __init__(self, width: int, heads: int, intermediate: int, backend: str, dropout: float,
                 context_width: Optional[int] = None):
        super().__init__()
        self.attention = BertAttention(width, heads, backend, dropout)
        self.crossattention = (BertAttention(width, heads, backend, dropout, context_width)
                               if context_width is not None else None)
        self.intermediate = BertIntermediate(width, intermediate)
        self.output = BertSelfOutput(intermediate, width, dropout)

    def forward(self, hidden: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None, *,
                context: Optional[Context] = None, context_mask: Optional[torch.Tensor] = None,
                cls_only: bool = False, attn_mask=None, kind=None, step=None) -> torch.Tensor:
        """hidden [B, L, W]; key_padding_mask [B, L]; context [B, N, C] or its ``KeysValues``, with
        context_mask [B, N] (cross layers only); attn_mask / kind / step restrict the self-attention (see
        ``attention``). ``cls_only``: row 0 alone, [B, W], computed for that row only -- an output row
        depends on its own query row and on every key/value row, so the [CLS] query attends to all of
        ``hidden`` and the rest of the layer runs on that one row (restrictions are not applied)."""
        if cls_only:
            out = self.attention(hidden[:, :1], key_padding_mask, hidden)
        else:
            out = self.attention(hidden, key_padding_mask, attn_mask=attn_mask, kind=kind, step=step)
        if self.crossattention is not None:
            if context is None:
                raise ValueError("a fusion layer needs the image states (context)")
            out = self.crossattention(out, context_mask, context)
        out = self.output(self.intermediate(out), out)
        return out[:, 0] if cls_only else out


class BertStack(nn.Module):
    """``layer``: the ModuleList of BertLayers (named as BertModel's ``encoder.layer``); ``checkpointed``
    recomputes each layer's activations in the backward pass (``checkpointing.run_layer``).

    ``forward(hidden, key_padding_mask=None, *, context=None, context_mask=None, cls_only=False, attn_mask=None,
    kind=None, step=None)``: ``context`` is what every layer's cross-attention reads (states [B, N, C]), or
    a list with one entry per layer (e.g. each layer's projected ``KeysValues``). With ``cls_only`` it
    returns row 0 alone, [B, W], and computes the last layer for that row only (``BertLayer``'s ``cls_only``:
    ITM reads nothing else, and skips (L-1)/L of the last layer's work); the self-attention must then
    be unrestricted (no attn_mask / kind / step)."""

    def __init__(self, layers: list[BertLayer], checkpointed: bool = False):
        super().__init__()
        self.layer = nn.ModuleList(layers)
        self.checkpointed = checkpointed

    def forward(self, hidden, key_padding_mask=None, *, context=None, context_mask=None, cls_only=False,
                **restrictions) -> torch.Tensor:
        contexts = context if isinstance(context, list) else [context] * len(self.layer)
        if len(contexts) != len(self.layer):
            raise ValueError(f"{len(contexts)} contexts for {len(self.layer)} layers")
        if cls_only and any(value is not None for value in restrictions.values()):
            raise ValueError("cls_only needs unrestricted self-attention (no attn_mask / kind / step)")
        if cls_only and not len(self.layer):
            return hidden[:, 0]
        for j, (layer, layer_context) in enumerate(zip(self.layer, contexts)):
            hidden = run_layer(layer, self.checkpointed, hidden, key_padding_mask, context=layer_context,
                               context_mask=context_mask, cls_only=cls_only and j == len(self.layer) - 1,
                               **restrictions)
        return hidden


def text_layers(cfg: ModelConfig, count: int, context_width: Optional[int] = None) -> list[BertLayer]:
    return [BertLayer(cfg.text_width, cfg.text_heads, cfg.text_intermediate, cfg.attention, cfg.dropout,
                      context_width) for _ in range(count)]


class TextEncoder(nn.Module):
    """Embeddings + the first ``cfg.text_layers`` BERT layers (self-attention only).

    ``forward(input_ids, attention_mask, position_ids=None, token_type_ids=None, *, attn_mask=None,
    kind=None, step=None) -> [B, L, Dt]``:

    - input_ids [B, L] long; attention_mask [B, L] (1/True = real token; padding keys are hidden);
    - position_ids [B, L] long, default 0..L-1 (C-Mask's pseudo masks reuse the positions of the tokens
      they stand for);
    - attn_mask / kind / step: extra self-attention restrictions passed to every layer (``attention``).
    """

    def __init__(self, cfg: ModelConfig, num_layers: Optional[int] = None):
        super().__init__()
        self.width = cfg.text_width
        self.embeddings = BertEmbeddings(cfg.vocab_size, cfg.text_width, cfg.max_positions, cfg.dropout)
        self.encoder = BertStack(text_layers(cfg, cfg.text_layers if num_layers is None else num_layers),
                                 cfg.grad_checkpointing)
        self.apply(init_weights)
        name_attention_modules(self)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None, *,
                attn_mask=None, kind=None, step=None) -> torch.Tensor:
        hidden = self.embeddings(input_ids, position_ids, token_type_ids)
        key_padding_mask = None if attention_mask is None else attention_mask.bool()
        return self.encoder(hidden, key_padding_mask, attn_mask=attn_mask, kind=kind, step=step)

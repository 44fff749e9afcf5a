"""EPIC's auxiliary masked language model (the "generator", papers/004_4782e0e015295f89.txt, sec. 4.3).

A BERT-like MLM ``f_L`` that reads the masked caption ``w_mask`` (eq. 3) and proposes a replacement at
each masked position by sampling from its MLM softmax (eq. 4-5)::

    h^L = f_L(w_mask)                                           [B, L, W]
    p_MLM(w | h_i^L) = softmax_w(e(w)^T T(h_i^L) + b_w)         BERT's LM head, decoder tied to f_L's
                                                                own word embeddings e (eq. 4 + the
                                                                usual transform T and bias b)
    w̄_i ~ p_MLM(· | h_i^L)                                     at the masked positions only (eq. 5)

It never sees the image, so its guesses fit the language but not necessarily the picture — the
inconsistent tokens EPIC wants. It has its own embeddings (nothing is shared with the VLM), and the
sampled ids are integers, so no gradient can flow from the VLM's losses into it; it learns only from
L_GEN (eq. 7, the MLM cross-entropy at the masked positions, ``objectives.mlm.mlm_loss``).

``sample_from_logits`` does the draw in fp32 by inverting the CDF at one given uniform per row, so a
draw is a pure function of (logits, uniform): the recipe takes the uniforms from ``dist.global_uniform``
and the draws do not depend on how the batch is split over ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from .bert import TextEncoder
from .heads import MlmHead
from .hf_bert import BertLoadReport, load_hf_bert
from .init import init_weights


class MlmGenerator(nn.Module):
    """A BERT masked LM: ``text_encoder`` (embeddings + ``layers`` self-attention layers) and ``mlm_head``
    (decoder tied to ``text_encoder``'s word embeddings). Parameter names inside ``text_encoder`` are
    ``transformers``' BertModel names, so ``init`` (a BertModel folder or "minilm") loads key by key.

    Args:
        cfg: the run's model config; vocabulary, positions, attention backend and dropout come from it.
        layers / width / heads / intermediate: the generator's own shape.
        init: BertModel folder or "minilm" to start from (embeddings, the first ``layers`` layers and,
            when the checkpoint has one, its ``cls.predictions`` head); None = random init.
    """

    def __init__(self, cfg: ModelConfig, *, layers: int, width: int, heads: int, intermediate: int,
                 init: Optional[str] = None):
        super().__init__()
        if min(layers, width, heads, intermediate) < 1:
            raise ValueError("the generator needs at least one layer, head and unit of width")
        shape = dataclasses.replace(cfg, text_width=width, text_heads=heads, text_intermediate=intermediate,
                                    text_layers=layers, fusion_layers=0, text_init=None)
        self.text_encoder = TextEncoder(shape)
        self.mlm_head = MlmHead(width, cfg.vocab_size)
        self.mlm_head.apply(init_weights)
        self.init_report: Optional[BertLoadReport] = None
        if init:
            self.init_report = load_hf_bert(self.text_encoder, None, init, mlm_head=self.mlm_head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, L] ids (with [MASK] where it must guess) + [B, L] mask -> hidden states [B, L, W]."""
        return self.text_encoder(input_ids, attention_mask)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., W] -> MLM logits [..., V] (eq. 4 before the softmax)."""
        return self.mlm_head(hidden, self.text_encoder.embeddings.word_embeddings)

    def zero3_external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """The tied decoder reads the word embeddings outside their module (see ``AlbefModel``)."""
        return [(self.mlm_head, self.text_encoder.embeddings.word_embeddings.weight)]


def sample_from_logits(logits: torch.Tensor, u: torch.Tensor, low: int = 0, high: Optional[int] = None) -> torch.Tensor:
    """One token id per row of ``logits`` [n, V], drawn from softmax(logits) restricted to ids
    ``[low, high)``, by inverting the CDF at the uniforms ``u`` [n] (values in [0, 1)).

    Computed in fp32 without gradient. Guard: a row whose softmax is not a distribution (a NaN or +inf
    logit in range, e.g. an fp16 overflow upstream) is drawn uniformly over the range instead of
    failing; -inf logits are simply probability 0. Ids with probability 0 are never returned (the CDF
    is flat there and ``u`` is kept inside (0, 1)).
    """
    if logits.dim() != 2 or u.shape != logits.shape[:1]:
        raise ValueError(f"sample_from_logits: logits must be [n, V] and u [n], got {tuple(logits.shape)}, "
                         f"{tuple(u.shape)}")
    n, vocab = logits.shape
    high = vocab if high is None else high
    if not 0 <= low < high <= vocab:
        raise ValueError(f"sample_from_logits: need 0 <= low < high <= V, got low={low}, high={high}, V={vocab}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=logits.device)
    with torch.no_grad():
        probs = torch.softmax(logits.detach()[:, low:high].float(), dim=1)
        # row-level guard (cheap: [n], not [n, V]): NaN/inf logits make the whole row's softmax NaN
        total = probs.sum(dim=1)
        broken = ~torch.isfinite(total) | ~(total > 0)
        if bool(broken.any()):
            probs[broken] = 1.0 / (high - low)
        cdf = torch.cumsum(probs, dim=1)
        target = u.float().clamp(1e-6, 1.0 - 1e-6).unsqueeze(1) * cdf[:, -1:]
        index = torch.searchsorted(cdf, target).squeeze(1).clamp_max(high - low - 1)
        return index + low

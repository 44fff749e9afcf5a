"""Zero-shot image<->text retrieval: ITC similarity top-k, optionally re-ranked by the ITM head.

Encoding (``encode``) runs the recipe's ``scorer`` once over the evaluation data and keeps, per
sample, the unit-norm ITC embeddings and the encoder states the ITM head re-reads, plus the same for
every hard-negative caption the data carries (for the probes, probes.py).

Retrieval (``retrieval_metrics``), with N images and their captions:

- **Duplicate captions.** Rendered scenes often share a caption word for word. Captions are
  de-duplicated by token ids into U distinct texts. image->text ranks the U distinct texts (so a
  wrong caption that occurs 5 times takes one slot of the top K, not 5) and is correct at K when the
  image's own text is among the first K. text->image asks each distinct text once, and is correct at
  K when any image with that exact caption is among the first K images (they are all true matches).
- **Scores.** ITC: cosine similarity of the embeddings. With ``itm_rerank = k > 0`` the top k
  candidates of each query (by ITC) are re-ordered by the ITM match probability and stay ahead of the
  rest, which keep their ITC order (ALBEF's protocol).
- **Recall@K** = fraction of queries whose first correct item has rank < K; so R@1 <= R@5 <= R@10.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..data.batch import Batch


@dataclass
class EncodedTexts:
    feat: torch.Tensor
    """[M, E] unit-norm ITC embeddings."""
    states: torch.Tensor
    """[M, L, D] text-encoder states (zero-padded to a common L)."""
    mask: torch.Tensor
    """[M, L] attention mask."""
    ids: torch.Tensor
    """[M, L] token ids (0-padded), for de-duplication."""
    rows: torch.Tensor
    """[M] index of the sample (image) each text belongs to."""


@dataclass
class EncodedData:
    image_feat: torch.Tensor
    """[N, E] unit-norm ITC image embeddings."""
    image_states: torch.Tensor
    """[N, P, D] image-encoder states."""
    captions: EncodedTexts
    """The N true captions (rows = 0..N-1)."""
    negatives: dict[str, EncodedTexts] = field(default_factory=dict)
    """Hard-negative captions by type, for the samples that have them."""

    def __len__(self) -> int:
        return self.image_feat.shape[0]


def _pad_cat(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate [b, L_i, ...] tensors along dim 0 after zero-padding dim 1 to ``length``."""
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
        padded.append(F.pad(t, pad))
    return torch.cat(padded)


class _TextParts:
    def __init__(self):
        self.feat, self.states, self.mask, self.ids, self.rows = [], [], [], [], []

    def add(self, scorer, input_ids, attention_mask, rows, device):
        feat, states = scorer.text_embeddings(input_ids.to(device), attention_mask.to(device))
        self.feat.append(feat.float().cpu())
        self.states.append(states.float().cpu())
        self.mask.append(attention_mask.cpu())
        self.ids.append(input_ids.cpu())
        self.rows.append(rows)

    def build(self) -> Optional[EncodedTexts]:
        if not self.feat:
            return None
        length = max(m.shape[1] for m in self.mask)
        return EncodedTexts(torch.cat(self.feat), _pad_cat(self.states, length), _pad_cat(self.mask, length),
                            _pad_cat(self.ids, length), torch.cat(self.rows))


@torch.no_grad()
def encode(scorer, batches: Iterable[Batch], device: torch.device = torch.device("cpu"),
           max_samples: Optional[int] = None) -> EncodedData:
    """Run ``scorer`` over ``batches`` (at most ``max_samples`` samples). A negative row whose
    attention mask is all zero counts as absent."""
    image_feat, image_states = [], []
    captions, negatives = _TextParts(), {}
    seen = 0
    for batch in batches:
        if max_samples is not None and seen >= max_samples:
            break
        if max_samples is not None and seen + len(batch) > max_samples:
            batch = batch.slice(0, max_samples - seen)
        rows = torch.arange(seen, seen + len(batch))
        feat, states = scorer.image_embeddings(batch.images.to(device))
        image_feat.append(feat.float().cpu())
        image_states.append(states.float().cpu())
        captions.add(scorer, batch.input_ids, batch.attention_mask, rows, device)
        for kind, (ids, mask) in (batch.negatives or {}).items():
            present = mask.sum(dim=1) > 0
            if present.any():
                negatives.setdefault(kind, _TextParts()).add(scorer, ids[present], mask[present], rows[present], device)
        seen += len(batch)
    if seen == 0:
        raise ValueError("no evaluation samples")
    return EncodedData(torch.cat(image_feat), torch.cat(image_states), captions.build(),
                       {kind: parts.build() for kind, parts in negatives.items()})


def distinct_captions(texts: EncodedTexts) -> tuple[torch.Tensor, torch.Tensor]:
    """(first: [U] index of each distinct caption's first occurrence, group: [N] distinct id of every
    caption), comparing token ids up to the attention mask."""
    keys = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(texts.ids, texts.mask)]
    first_of: dict[tuple, int] = {}
    group = torch.empty(len(keys), dtype=torch.long)
    first = []
    for i, key in enumerate(keys):
        if key not in first_of:
            first_of[key] = len(first)
            first.append(i)
        group[i] = first_of[key]
    return torch.tensor(first, dtype=torch.long), group


@torch.no_grad()
def itm_pair_scores(scorer, data: EncodedData, texts: EncodedTexts, image_index: torch.Tensor,
                    text_index: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """ITM match probability of each (image_index[j], text_index[j]) pair, [J]."""
    out = []
    for start in range(0, len(image_index), batch_size):
        ii, ti = image_index[start:start + batch_size], text_index[start:start + batch_size]
        length = int(texts.mask[ti].sum(dim=1).max())  # trim shared padding
        scores = scorer.itm_scores(data.image_states[ii].to(device), texts.states[ti, :length].to(device),
                                   texts.mask[ti, :length].to(device))
        out.append(scores.float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def first_hit_rank(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """[Q] 0-based rank of the best-scored correct item per query; ``scores``/``correct`` [Q, G].
    Ties are broken against the query (a correct item tied with a wrong one ranks below it)."""
    best_correct = scores.masked_fill(~correct, float("-inf")).max(dim=1).values
    return (scores.masked_fill(correct, float("-inf")) >= best_correct[:, None]).sum(dim=1)


def rerank_scores(itc: torch.Tensor, k: int, itm_of_top: torch.Tensor) -> torch.Tensor:
    """Scores whose order is: the ITC top-``k`` of each row by ITM probability (``itm_of_top`` [Q, k],
    aligned with ``itc.topk(k)``), then everything else by ITC."""
    top = itc.topk(k, dim=1).indices
    scores = itc.clone()
    scores.scatter_(1, top, itc.max() + 1.0 + itm_of_top)  # ITM in [0, 1], lifted above every ITC score
    return scores


def recall_at(ranks: torch.Tensor, k_values: Iterable[int]) -> dict[str, float]:
    return {f"R@{k}": float((ranks < k).float().mean()) for k in k_values}


@torch.no_grad()
def retrieval_metrics(data: EncodedData, scorer, k_values=(1, 5, 10), itm_rerank: int = 16,
                      batch_size: int = 64, device: torch.device = torch.device("cpu")) -> dict:
    """Recall@K both ways, by ITC and (when ``itm_rerank`` > 0) by ITC + ITM re-ranking; see the
    module docstring for the protocol."""
    texts = data.captions
    first, group = distinct_captions(texts)
    n, u = len(data), len(first)
    sim = data.image_feat @ texts.feat[first].t()  # [N, U]
    i2t_correct = torch.zeros(n, u, dtype=torch.bool)
    i2t_correct[torch.arange(n), group] = True
    t2i_correct = i2t_correct.t().contiguous()  # [U, N]: every image whose caption is this text
    result = {"n_images": n, "n_captions": n, "n_distinct_captions": u,
              "itc": {"image_to_text": recall_at(first_hit_rank(sim, i2t_correct), k_values),
                      "text_to_image": recall_at(first_hit_rank(sim.t(), t2i_correct), k_values)}}
    if itm_rerank > 0:
        k = min(itm_rerank, u)
        top = sim.topk(k, dim=1).indices  # [N, k] distinct-caption ids per image
        itm = itm_pair_scores(scorer, data, texts, torch.arange(n).repeat_interleave(k), first[top].reshape(-1),
                              batch_size, device).reshape(n, k)
        i2t = first_hit_rank(rerank_scores(sim, k, itm), i2t_correct)
        k = min(itm_rerank, n)
        top = sim.t().topk(k, dim=1).indices  # [U, k] image ids per distinct caption
        itm = itm_pair_scores(scorer, data, texts, top.reshape(-1), first.repeat_interleave(k),
                              batch_size, device).reshape(u, k)
        t2i = first_hit_rank(rerank_scores(sim.t(), k, itm), t2i_correct)
        result["itm_rerank"] = {"k": itm_rerank, "image_to_text": recall_at(i2t, k_values),
                                "text_to_image": recall_at(t2i, k_values)}
    return result

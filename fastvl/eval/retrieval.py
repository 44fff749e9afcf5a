"""Zero-shot image<->text retrieval as COCO/Flickr Karpathy splits are scored (ALBEF's ``itm_eval``):
ITC similarity top-k, optionally re-ranked by the ITM head.

Encoding (``encode``) runs the recipe's ``scorer`` once over the evaluation data and keeps, per
image, the unit-norm ITC embeddings and the encoder states the ITM head re-reads, and the same for
each of its captions (an image has one or more: ``EvalBatch.caption_rows`` says whose) and for every
hard-negative caption the data carries (for the probes, probes.py). Under a launcher each rank
encodes its share of the images and ``gather_encoded`` joins them on every rank; the ITM scoring is
then split between the ranks again (``itm_pair_scores``), so the metrics come out the same on all.

Retrieval (``retrieval_metrics``), with N images and M captions:

- **Images** are grouped by image id (``group_images``): samples with the same ``image_id`` are one
  image whose captions are all of theirs (an annotation file with one caption per record); a sample
  without an id is an image of its own (the built-in data, converted shards without ids). COCO's
  Karpathy test split is 5,000 images with 25,010 captions; Flickr30K's 1,000 with 5,000.
- **image->text** is a hit at K when ANY of the image's captions is among the first K texts;
  **text->image** when the caption's image is among the first K images.
- **Duplicate captions.** Rendered scenes often share a caption word for word. Captions are
  de-duplicated by token ids into U distinct texts. image->text ranks the U distinct texts (so a
  wrong caption that occurs 5 times takes one slot of the top K, not 5); text->image asks each
  distinct text once, and is correct at K when any image with that exact caption is among the
  first K images (they are all true matches). Data without exact duplicates (COCO and Flickr have a
  handful) is scored exactly as ALBEF scores it: M text queries, every image's own captions correct.
- **Scores.** ITC: cosine similarity of the embeddings. With ``itm_rerank = k > 0`` the top k
  candidates of each query (by ITC) are re-ordered by the ITM match probability and stay ahead of the
  rest, which keep their ITC order (ALBEF's protocol).
- **Recall@K** = fraction of queries whose first correct item has rank < K; so R@1 <= R@5 <= R@10.
  Ties are broken against the query (ALBEF's argsort breaks them arbitrarily).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from ..data.batch import Batch
from ..data.loader import EvalBatch
from ..dist import rank_and_world


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
    """[M] index of the image each text belongs to."""


@dataclass
class EncodedData:
    image_feat: torch.Tensor
    """[N, E] unit-norm ITC image embeddings."""
    image_states: torch.Tensor
    """[N, P, D] image-encoder states."""
    captions: EncodedTexts
    """The M >= N true captions (``rows``: whose)."""
    image_ids: list[Optional[str]] = field(default_factory=list)
    """Per image: its image id, or None (an image of its own); see ``group_images``."""
    negatives: dict[str, EncodedTexts] = field(default_factory=dict)
    """Hard-negative captions by type, for the images that have them."""

    def __len__(self) -> int:
        return self.image_feat.shape[0]


def _pad_cat(tensors: list[torch.Tensor], length: int) -> torch.Tensor:
    """Concatenate [b, L_i, ...] tensors along dim 0 after zero-padding dim 1 to ``length``."""
    padded = []
    for t in tensors:
        pad = [0, 0] * (t.dim() - 2) + [0, length - t.shape[1]]
        padded.append(F.pad(t, pad))
    return torch.cat(padded)


def _cat_texts(parts: list[EncodedTexts], row_offsets: list[int]) -> EncodedTexts:
    """One ``EncodedTexts`` of ``parts``, whose rows are shifted by ``row_offsets``."""
    length = max(t.mask.shape[1] for t in parts)
    return EncodedTexts(torch.cat([t.feat for t in parts]), _pad_cat([t.states for t in parts], length),
                        _pad_cat([t.mask for t in parts], length), _pad_cat([t.ids for t in parts], length),
                        torch.cat([t.rows + offset for t, offset in zip(parts, row_offsets)]))


class _TextParts:
    def __init__(self):
        self.parts: list[EncodedTexts] = []

    def add(self, scorer, input_ids, attention_mask, rows, device):
        feat, states = scorer.text_embeddings(input_ids.to(device), attention_mask.to(device))
        self.parts.append(EncodedTexts(feat.float().cpu(), states.float().cpu(), attention_mask.cpu(),
                                       input_ids.cpu(), rows))

    def build(self) -> Optional[EncodedTexts]:
        return _cat_texts(self.parts, [0] * len(self.parts)) if self.parts else None


@torch.no_grad()
def encode(scorer, batches: Iterable[Batch], device: torch.device = torch.device("cpu"),
           progress: bool = False) -> Optional[EncodedData]:
    """Run ``scorer`` over ``batches``: ``Batch``es (one caption per image) or ``EvalBatch``es (any
    number). A negative row whose attention mask is all zero counts as absent. None when there is
    no batch (a rank whose share of the data is empty)."""
    from tqdm import tqdm

    image_feat, image_states, image_ids = [], [], []
    captions, negatives = _TextParts(), {}
    seen = 0
    for batch in tqdm(batches, desc="encode", unit="batch", disable=not progress):
        size = batch.images.shape[0]
        rows = torch.arange(seen, seen + size)
        feat, states = scorer.image_embeddings(batch.images.to(device))
        image_feat.append(feat.float().cpu())
        image_states.append(states.float().cpu())
        grouped = isinstance(batch, EvalBatch)
        caption_rows = rows[batch.caption_rows] if grouped else rows
        captions.add(scorer, batch.input_ids, batch.attention_mask, caption_rows, device)
        image_ids += batch.image_ids if grouped else [None] * size
        for kind, (ids, mask) in (batch.negatives or {}).items():
            present = mask.sum(dim=1) > 0
            if present.any():
                negatives.setdefault(kind, _TextParts()).add(scorer, ids[present], mask[present], rows[present], device)
        seen += size
    if seen == 0:
        return None
    return EncodedData(torch.cat(image_feat), torch.cat(image_states), captions.build(), image_ids,
                       {kind: parts.build() for kind, parts in negatives.items()})


def concat_encoded(parts: list[EncodedData]) -> EncodedData:
    """The images of ``parts`` one after the other (each part's caption and negative rows shifted)."""
    if len(parts) == 1:
        return parts[0]
    offsets = [0]
    for part in parts[:-1]:
        offsets.append(offsets[-1] + len(part))
    negatives = {}
    for kind in sorted({kind for part in parts for kind in part.negatives}):
        having = [(part.negatives[kind], offset) for part, offset in zip(parts, offsets) if kind in part.negatives]
        negatives[kind] = _cat_texts([texts for texts, _ in having], [offset for _, offset in having])
    return EncodedData(torch.cat([p.image_feat for p in parts]), torch.cat([p.image_states for p in parts]),
                       _cat_texts([p.captions for p in parts], offsets), [i for p in parts for i in p.image_ids],
                       negatives)


def gather_encoded(data: Optional[EncodedData]) -> EncodedData:
    """Every rank's ``encode`` output joined in rank order, on every rank (identity on one process).
    Raises ValueError when no rank has any sample."""
    import torch.distributed as dist

    _, world = rank_and_world()
    parts = [data]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, data)
    parts = [part for part in parts if part is not None]
    if not parts:
        raise ValueError("no evaluation samples")
    return concat_encoded(parts)


def group_images(data: EncodedData) -> EncodedData:
    """Images with the same image id merged into the first of them, which takes all their captions
    (and negatives); images without an id stay as they are."""
    first_of: dict[str, int] = {}
    keep, image_of = [], []
    for n, image_id in enumerate(data.image_ids):
        if image_id is not None and image_id in first_of:
            image_of.append(first_of[image_id])
            continue
        if image_id is not None:
            first_of[image_id] = len(keep)
        image_of.append(len(keep))
        keep.append(n)
    if len(keep) == len(data):
        return data
    keep, image_of = torch.tensor(keep), torch.tensor(image_of)
    return EncodedData(data.image_feat[keep], data.image_states[keep],
                       replace(data.captions, rows=image_of[data.captions.rows]),
                       [data.image_ids[n] for n in keep.tolist()],
                       {kind: replace(texts, rows=image_of[texts.rows]) for kind, texts in data.negatives.items()})


def distinct_captions(texts: EncodedTexts) -> tuple[torch.Tensor, torch.Tensor]:
    """(first: [U] index of each distinct caption's first occurrence, group: [M] distinct id of every
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
                    text_index: torch.Tensor, batch_size: int, device: torch.device,
                    progress: bool = False) -> torch.Tensor:
    """ITM match probability of each (image_index[j], text_index[j]) pair, [J]. Under a launcher
    every rank passes the same pairs, scores a contiguous share of them, and all get all scores."""
    import torch.distributed as dist
    from tqdm import tqdm

    rank, world = rank_and_world()
    share = math.ceil(len(image_index) / world)
    mine = slice(rank * share, (rank + 1) * share)
    image_index, text_index = image_index[mine], text_index[mine]
    out = [torch.empty(0)]
    for start in tqdm(range(0, len(image_index), batch_size), desc="ITM", unit="batch", disable=not progress):
        ii, ti = image_index[start:start + batch_size], text_index[start:start + batch_size]
        length = int(texts.mask[ti].sum(dim=1).max())  # trim shared padding
        scores = scorer.itm_scores(data.image_states[ii].to(device), texts.states[ti, :length].to(device),
                                   texts.mask[ti, :length].to(device))
        out.append(scores.float().cpu())
    scores = torch.cat(out)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, scores)
        scores = torch.cat(parts)
    return scores


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
    return {f"R@{k}": float((ranks < k).double().mean()) for k in k_values}


@torch.no_grad()
def retrieval_metrics(data: EncodedData, scorer, k_values=(1, 5, 10), itm_rerank: int = 16,
                      batch_size: int = 64, device: torch.device = torch.device("cpu"),
                      progress: bool = False) -> dict:
    """Recall@K both ways, by ITC and (when ``itm_rerank`` > 0) by ITC + ITM re-ranking, of images
    already grouped (``group_images``); see the module docstring for the protocol."""
    texts = data.captions
    first, group = distinct_captions(texts)
    n, u = len(data), len(first)
    sim = data.image_feat @ texts.feat[first].t()  # [N, U]
    i2t_correct = torch.zeros(n, u, dtype=torch.bool)
    i2t_correct[texts.rows, group] = True  # every distinct text among the image's captions
    t2i_correct = i2t_correct.t().contiguous()  # [U, N]: every image with this text among its captions
    result = {"n_images": n, "n_captions": len(group), "n_distinct_captions": u,
              "itc": {"image_to_text": recall_at(first_hit_rank(sim, i2t_correct), k_values),
                      "text_to_image": recall_at(first_hit_rank(sim.t(), t2i_correct), k_values)}}
    if itm_rerank > 0:
        k = min(itm_rerank, u)
        top = sim.topk(k, dim=1).indices  # [N, k] distinct-caption ids per image
        itm = itm_pair_scores(scorer, data, texts, torch.arange(n).repeat_interleave(k), first[top].reshape(-1),
                              batch_size, device, progress).reshape(n, k)
        i2t = first_hit_rank(rerank_scores(sim, k, itm), i2t_correct)
        k = min(itm_rerank, n)
        top = sim.t().topk(k, dim=1).indices  # [U, k] image ids per distinct caption
        itm = itm_pair_scores(scorer, data, texts, top.reshape(-1), first.repeat_interleave(k),
                              batch_size, device, progress).reshape(u, k)
        t2i = first_hit_rank(rerank_scores(sim.t(), k, itm), t2i_correct)
        result["itm_rerank"] = {"k": itm_rerank, "image_to_text": recall_at(i2t, k_values),
                                "text_to_image": recall_at(t2i, k_values)}
    return result

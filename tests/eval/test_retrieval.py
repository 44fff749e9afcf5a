"""Retrieval and probe metrics on stand-in scorers whose answers are known: a perfect scorer gets 1.0
everywhere (also with duplicate captions), a constant one gets no credit from ties, random ones give
sane recalls."""
import pytest
import torch

from fastvl.data.batch import Batch
from fastvl.eval.probes import probe_metrics
from fastvl.eval.retrieval import (distinct_captions, encode, first_hit_rank, recall_at, rerank_scores,
                                   retrieval_metrics)

CLS, SEP, BASE = 101, 102, 1000
E = 16


class PerfectScorer:
    """Sample i's image holds its caption id g_i in every pixel; its caption is [CLS] BASE+g_i [SEP].
    Embeddings are one-hot of g, the ITM probability is 1 for a match and 0 otherwise."""

    def image_embeddings(self, images):
        g = images[:, 0, 0, 0].long()
        feat = torch.nn.functional.one_hot(g, E).float()
        return feat, feat[:, None, :]

    def text_embeddings(self, input_ids, attention_mask):
        feat = torch.nn.functional.one_hot(input_ids[:, 1] - BASE, E).float()
        return feat, feat[:, None, :].expand(-1, input_ids.shape[1], -1)

    def itm_scores(self, image_states, text_states, attention_mask):
        return (image_states[:, 0] * text_states[:, 0]).sum(dim=-1)


class RandomScorer(PerfectScorer):
    def __init__(self, seed=0):
        self.g = torch.Generator().manual_seed(seed)

    def image_embeddings(self, images):
        feat = torch.nn.functional.normalize(torch.randn(len(images), E, generator=self.g), dim=-1)
        return feat, feat[:, None, :]

    def text_embeddings(self, input_ids, attention_mask):
        feat = torch.nn.functional.normalize(torch.randn(len(input_ids), E, generator=self.g), dim=-1)
        return feat, feat[:, None, :].expand(-1, input_ids.shape[1], -1)

    def itm_scores(self, image_states, text_states, attention_mask):
        return torch.rand(len(image_states), generator=self.g)


def caption(g: int, pad: int = 0):
    return [CLS, BASE + g, SEP] + [0] * pad


def batches(groups, batch_size=4, negatives=True):
    """Batches of the perfect-scorer world; negatives name another caption id (absent for sample 1)."""
    out = []
    for start in range(0, len(groups), batch_size):
        gs = groups[start:start + batch_size]
        images = torch.tensor(gs, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4).clone()
        pad = start % 3  # batches padded to different lengths
        ids = torch.tensor([caption(g, pad) for g in gs])
        mask = (ids != 0).long()
        negs = None
        if negatives:
            neg_ids = torch.tensor([caption((g + 1) % E, pad) for g in gs])
            neg_mask = (neg_ids != 0).long()
            if start == 0:
                neg_mask[1] = 0  # sample 1 has no negative of this type
            negs = {"relation_swap": (neg_ids, neg_mask), "shuffle": (neg_ids.clone(), (neg_ids != 0).long())}
        out.append(Batch(images, ids, mask, [f"k{start + i}" for i in range(len(gs))], negs))
    return out


@pytest.mark.parametrize("groups", [list(range(10)), [0, 1, 1, 2, 3, 3, 3, 4, 5, 5]], ids=["distinct", "duplicates"])
def test_perfect_scorer_gets_full_recall_and_probe_accuracy(groups):
    scorer = PerfectScorer()
    data = encode(scorer, batches(groups))
    result = retrieval_metrics(data, scorer, k_values=(1, 5, 10), itm_rerank=3)
    assert result["n_images"] == len(groups) and result["n_distinct_captions"] == len(set(groups))
    for block in ("itc", "itm_rerank"):
        for direction in ("image_to_text", "text_to_image"):
            assert result[block][direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    probes = probe_metrics(data, scorer)
    assert probes["relation_swap"] == {"n": len(groups) - 1, "itm_accuracy": 1.0, "itc_accuracy": 1.0}
    assert probes["shuffle"]["n"] == len(groups)


def test_duplicates_are_one_gallery_entry_and_any_matching_image_counts():
    data = encode(PerfectScorer(), batches([0, 1, 1, 2]))
    first, group = distinct_captions(data.captions)
    assert first.tolist() == [0, 1, 3] and group.tolist() == [0, 1, 1, 2]


def test_constant_scorer_gets_no_credit_from_ties():
    scores = torch.zeros(3, 4)
    correct = torch.eye(3, 4, dtype=torch.bool)
    assert first_hit_rank(scores, correct).tolist() == [3, 3, 3]
    assert recall_at(first_hit_rank(scores, correct), (1, 4)) == {"R@1": 0.0, "R@4": 1.0}


def test_rerank_reorders_only_the_itc_top_k():
    itc = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0]])
    itm_of_top = torch.tensor([[0.1, 0.2, 0.95]])  # for ITC ranks 0, 1, 2 (items 0, 1, 2)
    order = rerank_scores(itc, 3, itm_of_top).argsort(dim=1, descending=True)
    assert order.tolist() == [[2, 1, 0, 3, 4]]


def test_random_scorer_recalls_are_sane():
    scorer = RandomScorer()
    data = encode(scorer, batches(list(range(12)) + [3, 3, 7]))
    result = retrieval_metrics(data, scorer, k_values=(1, 5, 10, 100), itm_rerank=4)
    for block in ("itc", "itm_rerank"):
        for direction in ("image_to_text", "text_to_image"):
            r = result[block][direction]
            assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0
            assert r["R@100"] == 1.0  # K beyond the gallery
    for p in probe_metrics(data, scorer).values():
        assert 0.0 <= p["itm_accuracy"] <= 1.0 and 0.0 <= p["itc_accuracy"] <= 1.0


def test_encode_respects_max_samples():
    data = encode(PerfectScorer(), batches(list(range(10))), max_samples=6)
    assert len(data) == 6 and data.captions.states.shape[0] == 6
    assert data.negatives["shuffle"].rows.max() == 5

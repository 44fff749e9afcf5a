"""Retrieval and probe metrics on stand-in scorers whose answers are known: a perfect scorer gets 1.0
everywhere (also with duplicate captions and with 5 captions per image), one with known mistakes
gets exactly the recalls they cost, a constant one gets no credit from ties, random ones give sane
recalls, and splitting the images between ranks changes nothing."""
import pytest
import torch
import torch.nn.functional as F

from fastvl.data.batch import Batch
from fastvl.data.loader import EvalBatch
from fastvl.eval.probes import probe_metrics
from fastvl.eval.retrieval import (concat_encoded, distinct_captions, encode, first_hit_rank, gather_encoded,
                                   group_images, recall_at, rerank_scores, retrieval_metrics)

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


# ---- several captions per image (COCO/Flickr layout) ---------------------------------------------


class TableScorer:
    """Image i (its pixels hold i) embeds as ``image_table[i]``, caption t ([CLS] BASE+t [SEP]) as
    ``text_table[t]``; ITM is perfect: 1 when caption t belongs to the image (``text_image[t]``)."""

    def __init__(self, image_table, text_table, text_image):
        self.image_table = F.normalize(image_table, dim=-1)
        self.text_table = F.normalize(text_table, dim=-1)
        self.text_image, self.n = text_image, len(image_table)

    def image_embeddings(self, images):
        i = images[:, 0, 0, 0].long()
        return self.image_table[i], F.one_hot(i, self.n).float()[:, None, :]

    def text_embeddings(self, input_ids, attention_mask):
        t = input_ids[:, 1] - BASE
        return self.text_table[t], F.one_hot(self.text_image[t], self.n).float()[:, None, :].expand(-1, input_ids.shape[1], -1)

    def itm_scores(self, image_states, text_states, attention_mask):
        return (image_states[:, 0] * text_states[:, 0]).sum(dim=-1)


def grouped_batches(captions_of, image_ids=None, batch_size=2, order=None):
    """``EvalBatch``es of images ``order`` (default all) where image i has captions ``captions_of[i]``."""
    order = list(range(len(captions_of))) if order is None else order
    out = []
    for start in range(0, len(order), batch_size):
        images = order[start:start + batch_size]
        pixels = torch.tensor(images, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4).clone()
        ids = torch.tensor([caption(t) for i in images for t in captions_of[i]])
        rows = torch.tensor([row for row, i in enumerate(images) for _ in captions_of[i]])
        out.append(EvalBatch(pixels, ids, (ids != 0).long(), [f"k{i}" for i in images], None, caption_rows=rows,
                             image_ids=[None if image_ids is None else image_ids[i] for i in images]))
    return out


N_IMAGES, PER_IMAGE = 4, 5
CAPTIONS_OF = [list(range(i * PER_IMAGE, (i + 1) * PER_IMAGE)) for i in range(N_IMAGES)]  # 20 captions
TEXT_IMAGE = torch.arange(N_IMAGES).repeat_interleave(PER_IMAGE)


def perfect_table_scorer():
    eye = torch.eye(N_IMAGES)
    return TableScorer(eye, eye[TEXT_IMAGE], TEXT_IMAGE)


def metrics(scorer, batches_, itm_rerank=0):
    return retrieval_metrics(group_images(gather_encoded(encode(scorer, batches_))), scorer,
                             k_values=(1, 5, 10), itm_rerank=itm_rerank)


@pytest.mark.parametrize("itm_rerank", [0, 8])
def test_perfect_scorer_on_five_captions_per_image_gets_full_recall_both_ways(itm_rerank):
    result = metrics(perfect_table_scorer(), grouped_batches(CAPTIONS_OF), itm_rerank)
    assert (result["n_images"], result["n_captions"], result["n_distinct_captions"]) == (4, 20, 20)
    for block in ("itc", "itm_rerank") if itm_rerank else ("itc",):
        for direction in ("image_to_text", "text_to_image"):
            assert result[block][direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_rows_sharing_an_image_id_are_one_image_and_rows_without_ids_are_not():
    """20 rows, one caption each, 5 rows per image. With image ids they are 4 images of 5 captions
    (full recall); without, each row is its own image, which is what the old row-per-caption scoring
    did: each caption ties with the 4 copies of its image, ties go against it, text->image R@1 = 0."""
    one_each = [[t] for t in range(20)]
    scorer = perfect_table_scorer()
    row_scorer = TableScorer(scorer.image_table[TEXT_IMAGE], scorer.text_table, torch.arange(20))
    grouped = metrics(row_scorer, grouped_batches(one_each, image_ids=[f"img{i}" for i in TEXT_IMAGE.tolist()]))
    assert grouped["n_images"] == 4 and grouped["n_captions"] == 20
    assert grouped["itc"]["text_to_image"]["R@1"] == 1.0 and grouped["itc"]["image_to_text"]["R@1"] == 1.0
    rows = metrics(row_scorer, grouped_batches(one_each))
    assert rows["n_images"] == 20
    assert rows["itc"]["text_to_image"]["R@1"] == 0.0 and rows["itc"]["image_to_text"]["R@1"] == 0.0


def swapped_scorer():
    """The perfect scorer with two known mistakes: image 0 embeds as 0.6 e0 + 0.8 e1 (closer to image
    1's captions), caption 12 (of image 2) as 0.6 e2 + 0.8 e3 (closer to image 3)."""
    eye = torch.eye(N_IMAGES)
    image_table, text_table = eye.clone(), eye[TEXT_IMAGE].clone()
    image_table[0] = 0.6 * eye[0] + 0.8 * eye[1]
    text_table[12] = 0.6 * eye[2] + 0.8 * eye[3]
    return TableScorer(image_table, text_table, TEXT_IMAGE)


def test_known_mistakes_cost_exactly_their_ranks():
    result = metrics(swapped_scorer(), grouped_batches(CAPTIONS_OF), itm_rerank=8)
    # image 0: image 1's 5 captions (0.8) above its own (0.6): rank 5; the other 3 images rank 0
    assert result["itc"]["image_to_text"] == {"R@1": 0.75, "R@5": 0.75, "R@10": 1.0}
    # caption 12: image 3 (0.8) above image 2 (0.6): rank 1; the other 19 captions rank 0
    assert result["itc"]["text_to_image"] == {"R@1": 0.95, "R@5": 1.0, "R@10": 1.0}
    # the (perfect) ITM head re-orders each query's ITC top 8 / top 4, which hold the true matches
    for direction in ("image_to_text", "text_to_image"):
        assert result["itm_rerank"][direction] == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}


def test_rerank_depth_short_of_the_true_captions_leaves_the_miss():
    """Image 0's own captions sit at ITC ranks 5-9: a top-5 re-rank never sees them."""
    result = metrics(swapped_scorer(), grouped_batches(CAPTIONS_OF), itm_rerank=5)
    assert result["itm_rerank"]["image_to_text"] == {"R@1": 0.75, "R@5": 0.75, "R@10": 1.0}


def test_group_images_merges_by_id_and_keeps_the_first_image():
    scorer = perfect_table_scorer()
    data = encode(scorer, grouped_batches([[0, 1], [2], [3], [4]], image_ids=["a", None, "a", None]))
    grouped = group_images(data)
    assert len(grouped) == 3 and grouped.image_ids == ["a", None, None]
    assert grouped.captions.rows.tolist() == [0, 0, 1, 0, 2]
    assert torch.equal(grouped.image_feat, data.image_feat[[0, 1, 3]])


def test_ranks_sharing_the_images_give_the_same_metrics_as_one_process():
    """Rank r of 2 encodes images r, r+2, ... (the eval loader's split); the joined encodings score
    exactly as one process's."""
    g = torch.Generator().manual_seed(0)
    image_table, text_image = torch.randn(7, 6, generator=g), torch.arange(7).repeat_interleave(3)
    scorer = TableScorer(image_table, image_table[text_image] + 1.5 * torch.randn(21, 6, generator=g), text_image)
    captions_of = [[3 * i, 3 * i + 1, 3 * i + 2] for i in range(7)]
    whole = metrics(scorer, grouped_batches(captions_of), itm_rerank=3)
    parts = [encode(scorer, grouped_batches(captions_of, order=list(range(rank, 7, 2)))) for rank in range(2)]
    joined = concat_encoded(parts)
    assert len(joined) == 7 and joined.captions.rows.tolist() == [
        row for row, i in enumerate([0, 2, 4, 6, 1, 3, 5]) for _ in range(3)]
    split = retrieval_metrics(group_images(joined), scorer, k_values=(1, 5, 10), itm_rerank=3)
    assert split == whole
    assert 0.0 < whole["itc"]["text_to_image"]["R@1"] < 1.0  # a non-trivial case


def test_no_samples_anywhere_is_an_error():
    assert encode(PerfectScorer(), []) is None
    with pytest.raises(ValueError, match="no evaluation samples"):
        gather_encoded(None)

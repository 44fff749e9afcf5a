import math

import pytest
import torch
import torch.nn.functional as F

from fastvl.objectives.itc import itc_loss
from fastvl.objectives.itm import sample_by_weight
from fastvl.objectives.mlm import mlm_loss


def test_sample_by_weight_never_picks_excluded_and_follows_weights():
    torch.manual_seed(0)
    n, g = 20000, 4
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).expand(n, g)
    exclude = torch.zeros(n, dtype=torch.long)  # column 0 excluded: renormalised over 1..3
    idx = sample_by_weight(weights, exclude, torch.rand(n))
    assert (idx != 0).all()
    freq = torch.bincount(idx, minlength=g).float() / n
    expected = torch.tensor([0.0, 2 / 9, 3 / 9, 4 / 9])
    assert torch.allclose(freq, expected, atol=4 * math.sqrt(0.25 / n))


@pytest.mark.parametrize("bad", [0.0, float("nan"), float("inf"), -1.0])
def test_sample_by_weight_guards_degenerate_rows(bad):
    # fp16 similarities overflow to inf/nan; all-zero rows come from underflow: fall back to uniform
    weights = torch.full((5000, 3), bad)
    exclude = torch.full((5000,), 1)
    idx = sample_by_weight(weights, exclude, torch.rand(5000))
    assert set(idx.tolist()) == {0, 2}
    assert abs((idx == 0).float().mean().item() - 0.5) < 0.05


def test_sample_by_weight_extreme_uniforms_stay_valid():
    weights = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]]).repeat(2, 1)
    idx = sample_by_weight(weights, torch.tensor([1, 3]), torch.tensor([0.0, 1.0]))
    assert idx.tolist() == [3, 1]


def test_itc_matches_clip_formula_and_prefers_aligned_pairs():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(6, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    temp = torch.tensor(0.1)
    loss, sim_i2t, sim_t2i = itc_loss(img, txt, temp)
    logits = img @ txt.t() / 0.1
    expected = (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    assert torch.allclose(loss, expected, atol=1e-6)
    assert torch.allclose(sim_t2i, sim_i2t.t())
    aligned, _, _ = itc_loss(img, img.clone(), temp)
    assert aligned < loss


def test_mlm_loss_is_mean_over_masked_positions():
    logits = torch.randn(7, 11)
    targets = torch.randint(0, 11, (7,))
    assert torch.allclose(mlm_loss(logits, targets), F.cross_entropy(logits, targets), atol=1e-6)
    assert mlm_loss(logits[:0], targets[:0]).item() == 0.0


@pytest.mark.parametrize("negatives", ["hard", "random"])
def test_itm_negatives_are_drawn_by_similarity_or_uniformly(negatives, monkeypatch):
    """method.itm_negatives: "hard" hands ITM's sampler softmax(ITC similarity) weights, "random" equal
    weights (ALBEF's ablation without hard negatives)."""
    import fastvl.objectives.itm as itm
    from fastvl.config import load_config
    from fastvl.data.batch import Batch
    from fastvl.methods import build_method

    seen = []
    original = itm.sample_by_weight
    monkeypatch.setattr(itm, "sample_by_weight", lambda w, exclude, u: seen.append(w) or original(w, exclude, u))
    torch.manual_seed(0)
    recipe = build_method(load_config("configs/tiny_albef.json", [f"method.itm_negatives={negatives}"]))
    ids = torch.randint(1000, 2000, (6, 10))
    ids[:, 0], ids[:, -1] = 101, 102
    recipe(Batch(torch.randn(6, 3, 64, 64), ids, torch.ones_like(ids), []))
    assert len(seen) == 2  # image -> text and text -> image
    for weights in seen:
        spread = (weights.max(1).values - weights.min(1).values).max()
        assert (spread == 0) if negatives == "random" else (spread > 1e-3), weights


def test_albef_projects_each_image_once_for_all_its_fusion_passes():
    """ALBEF's ITM pairs (positives, hard-negative texts, hard-negative images) and its MLM pass read one
    ``ImageContext``: every fusion layer's cross-attention keys and values are computed for each of the
    step's B images once (not for 4 x B rows), in the online model and in the momentum model."""
    from fastvl.data.batch import Batch

    from .conftest import build_recipe

    recipe = build_recipe("configs/tiny_albef.json", momentum_distill=True).train()
    rows = {}

    def count(name):
        return lambda module, inputs, output: rows.__setitem__(name, rows.get(name, 0) + inputs[0].shape[0])

    online = recipe.backbone.fusion_encoder.encoder.layer
    teacher = recipe.momentum_teacher.shadow["albef"].backbone.fusion_encoder.encoder.layer
    for name, layers in (("online", online), ("momentum", teacher)):
        for j, layer in enumerate(layers):
            for part in ("key", "value"):
                getattr(layer.crossattention.self, part).register_forward_hook(count(f"{name}.{j}.{part}"))
    b = 6
    ids = torch.randint(1000, 2000, (b, 10))
    ids[:, 0], ids[:, -1] = 101, 102
    out = recipe(Batch(torch.randn(b, 3, 64, 64), ids, torch.ones_like(ids), []))
    assert {"itm", "mlm"} <= set(out)
    assert rows == {f"{name}.{j}.{part}": b for name in ("online", "momentum") for j in range(len(online))
                    for part in ("key", "value")}


@pytest.mark.parametrize("config", ["tiny_albef", "tiny_maskvlm", "tiny_mamo"])
def test_a_step_is_bitwise_reproducible_with_two_threads(config):
    """ITM gathers the hard negatives with repeats, and a repeated row's gradient is a sum: through
    ``index_select`` it is added in a fixed order, where advanced indexing's backward (``index_put``
    with accumulate) adds it in whatever order two threads happen to run (different last bits in 49 of
    50 passes, measured). With 2 threads, passes over the same batch give identical gradients."""
    from fastvl.data.batch import Batch

    from .conftest import build_recipe

    recipe = build_recipe(f"configs/{config}.json", "model.dropout=0.0").train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (32, 20), generator=g)
    ids[:, 0] = 101
    batch = Batch(torch.randn(32, 3, 64, 64, generator=g), ids, torch.ones_like(ids), [])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            recipe.zero_grad(set_to_none=True)
            recipe(batch)["loss"].backward()
            grads.append([p.grad.clone() for p in recipe.parameters() if p.grad is not None])
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other, strict=True))


def test_itm_gradients_through_repeated_negatives_are_bitwise_reproducible_with_two_threads():
    """Every row draws the same hard-negative text (one dominant similarity), so that text's gradient is
    a sum over the whole batch; with 2 threads it comes out with the same bits on every pass."""
    from fastvl.objectives.itm import itm_loss

    g = torch.Generator().manual_seed(0)
    b, length, width = 64, 20, 128
    images = torch.randn(b, 5, width, generator=g, requires_grad=True)
    texts = torch.randn(b, length, width, generator=g, requires_grad=True)
    mask = torch.ones(b, length, dtype=torch.long)
    sim = torch.zeros(b, b)
    sim[:, 0], sim[0, 1] = 50.0, 60.0  # every row's negative is text / image 0 (row 0's: 1)
    u = torch.rand(b, 2, generator=g)
    head = torch.nn.Linear(width, 2)

    def fuse_cls(t, m, image_index, other):
        return t[:, 0] * images.index_select(0, image_index)[:, 0]

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = [torch.autograd.grad(itm_loss(fuse_cls, head, images, texts, mask, sim, sim, u), texts)[0]
                 for _ in range(6)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])

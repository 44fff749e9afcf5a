"""EPIC: saliency from a frozen teacher (against a direct computation from the named layer's
projections, ALBEF and MAMO layouts), position sampling without replacement (and, at recipe level,
positions that follow the teacher's α), the generator's draws (replacements sampled from its softmax,
its weights loaded from ``model.text_init``), the consistency labels, gradient isolation of the
generator, the frozen teacher, the ablation switches, mounting on another base, and end-to-end runs
on the built-in data (losses fall; ZeRO-2 in bf16)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fastvl.config import ConfigError, load_config
from fastvl.data.batch import Batch
from fastvl.masking.saliency import SaliencyTeacher, load_teacher, masked_count, masked_softmax, sample_positions
from fastvl.masking.text import maskable_positions
from fastvl.methods import build_method
from fastvl.models.attention import split_heads
from fastvl.models.generator import sample_from_logits
from fastvl.objectives.token_consistency import (consistency_labels, token_consistency_loss,
                                                 token_consistency_metrics)
from fastvl.train.checkpoint import load_recipe
from tests.methods.conftest import build_recipe, quick_run, read_rows, recipe_config

CONFIG = "configs/tiny_epic.json"
B, L = 4, 12
PAD_ID, CLS_ID, SEP_ID, MASK_ID = 0, 101, 102, 103


def save_fresh(cfg_path, out, seed=0, *overrides):
    """A freshly built recipe saved as a consolidated checkpoint (a stand-in teacher)."""
    torch.manual_seed(seed)
    cfg = load_config(cfg_path, list(overrides))
    torch.save({"config": cfg.to_dict(), "step": 0, "state_dict": build_method(cfg).state_dict()}, out)
    return out


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_fresh("configs/tiny_albef.json", tmp_path_factory.mktemp("teacher") / "model_fp32.pt")


def epic_config(teacher, *overrides, **options):
    return recipe_config(CONFIG, f"method.options.teacher={teacher}", *overrides, **options)


def build(teacher, *overrides, seed=0, **options):
    return build_recipe(CONFIG, f"method.options.teacher={teacher}", *overrides, seed=seed, **options)


@pytest.fixture(scope="module")
def recipe(teacher_path):
    return build(teacher_path)


def make_batch(seed=0, b=B, length=L, image_size=64):
    """[CLS] words [SEP] [PAD]...: row lengths L, L-3, L-5, L-1 (then L)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones(b, length, dtype=torch.long)
    lengths = ([length, length - 3, length - 5, length - 1] + [length] * b)[:b]
    for i, n in enumerate(lengths):
        ids[i, n - 1] = SEP_ID
        ids[i, n:] = PAD_ID
        mask[i, n:] = 0
    return Batch(torch.randn(b, 3, image_size, image_size, generator=g), ids, mask)


def maskable(batch, recipe):
    return maskable_positions(batch.input_ids, batch.attention_mask, recipe.special)


# -- saliency (eq. 8) ------------------------------------------------------------------------------


def test_saliency_sums_to_one_over_real_tokens_and_is_zero_on_special_and_padding(recipe):
    batch = make_batch(1)
    allowed = maskable(batch, recipe)
    alpha = recipe.saliency(batch.images, batch.input_ids, batch.attention_mask, allowed)
    assert alpha.dtype == torch.float32 and alpha.shape == (B, L)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(B))
    assert (alpha[allowed] > 0).all()
    assert torch.equal(alpha[~allowed], torch.zeros(int((~allowed).sum())))
    special = (batch.input_ids == CLS_ID) | (batch.input_ids == SEP_ID) | (batch.attention_mask == 0)
    assert torch.equal(special, ~allowed)


def heads(x, n):
    return split_heads(x, n).float()


def test_saliency_equals_the_penultimate_cross_attention_scores(recipe, teacher_path):
    """ALBEF layout: image [CLS] key x text queries of fusion layer -2's cross-attention, computed here
    straight from that layer's projections on an untouched copy of the teacher."""
    teacher, _, _ = load_recipe(str(teacher_path))
    bb = teacher.backbone
    batch = make_batch(2)
    allowed = maskable(batch, recipe)
    with torch.no_grad():
        image = bb.encode_image(batch.images)
        hidden = bb.encode_text(batch.input_ids, batch.attention_mask)
        layers = bb.fusion_encoder.encoder.layer
        kpm = batch.attention_mask.bool()
        for layer in layers[:-2]:
            hidden = layer(hidden, kpm, context=image)
        penultimate = layers[-2]
        after_self = penultimate.attention(hidden, kpm)
        cross = penultimate.crossattention.self
        q = heads(cross.query(after_self), cross.heads)  # [B, H, L, d]
        k = heads(cross.key(image[:, :1]), cross.heads)  # [B, H, 1, d]
        scores = (q @ k.transpose(-1, -2)).squeeze(-1).mean(dim=1)
        expected = torch.where(allowed, scores, torch.tensor(float("-inf"))).softmax(dim=1)
        expected = torch.where(allowed, expected, torch.zeros_like(expected))
        alpha = recipe.saliency(batch.images, batch.input_ids, batch.attention_mask, allowed)
    torch.testing.assert_close(alpha, expected, atol=1e-6, rtol=1e-5)
    assert recipe.saliency.layout == "cross" and recipe.saliency.layer_index == len(layers) - 2
    # the teacher keeps only the layers it needs
    assert len(recipe.saliency.backbone.fusion_encoder.encoder.layer) == len(layers) - 1


def test_saliency_scale_and_guards():
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0], [float("nan"), float("inf"), 1.0, 2.0], [5.0, 5.0, 5.0, 5.0]])
    allowed = torch.tensor([[False, True, True, False], [True, True, False, False], [False, False, False, False]])
    alpha = masked_softmax(scores, allowed)
    torch.testing.assert_close(alpha[0], torch.tensor([0.0, 1 / (1 + math.e), math.e / (1 + math.e), 0.0]))
    torch.testing.assert_close(alpha[1], torch.tensor([0.5, 0.5, 0.0, 0.0]))  # nothing finite: uniform
    assert torch.equal(alpha[2], torch.zeros(4))  # no maskable token: no saliency


# -- positions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, ratio, m", [(20, 0.35, 7), (10, 0.35, 4), (6, 0.35, 3), (1, 0.35, 1), (0, 0.35, 0),
                                         (7, 0.15, 2), (9, 0.45, 5), (3, 1.0, 3)])
def test_masked_count_is_ceil_of_ratio_times_length(n, ratio, m):
    allowed = torch.zeros(1, 24, dtype=torch.bool)
    allowed[0, 1:1 + n] = True
    assert masked_count(allowed, ratio).tolist() == [m]


def test_sample_positions_count_support_and_determinism():
    g = torch.Generator().manual_seed(0)
    allowed = torch.rand(64, 20, generator=g) < 0.7
    allowed[:, 0] = True
    weights = torch.rand(64, 20, generator=g) * allowed
    weights[3] = float("nan")  # guarded: uniform over the allowed positions
    weights[5] = 0.0
    counts = masked_count(allowed, 0.35)
    u = torch.rand(64, 20, generator=g)
    chosen = sample_positions(weights, allowed, counts, u)
    assert torch.equal(chosen.sum(dim=1), counts)
    assert not (chosen & ~allowed).any()
    assert torch.equal(chosen, sample_positions(weights, allowed, counts, u))
    with pytest.raises(ValueError):
        sample_positions(weights, allowed, counts + 20, u)


def test_sample_positions_is_without_replacement_proportional_to_weights():
    """Inclusion probabilities of 2 draws without replacement (successive renormalised draws):
    P(i) = w_i + sum_{j != i} w_j w_i / (1 - w_j)."""
    w = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 40000
    u = torch.rand(n, 4, generator=torch.Generator().manual_seed(1))
    chosen = sample_positions(w.expand(n, 4), torch.ones(n, 4, dtype=torch.bool), torch.full((n,), 2), u)
    expected = torch.stack([w[i] + sum(w[j] * w[i] / (1 - w[j]) for j in range(4) if j != i) for i in range(4)])
    torch.testing.assert_close(chosen.float().mean(dim=0), expected, atol=0.01, rtol=0)


def test_positions_follow_saliency(recipe):
    """Over many draws, a position's first-pick frequency follows α (1 position per caption of 2)."""
    batch = make_batch(3)
    allowed = maskable(batch, recipe)
    alpha = recipe.saliency(batch.images, batch.input_ids, batch.attention_mask, allowed)
    n = 20000
    u = torch.rand(n, L, generator=torch.Generator().manual_seed(2))
    picks = sample_positions(alpha[:1].expand(n, L), allowed[:1].expand(n, L), torch.ones(n, dtype=torch.long), u)
    torch.testing.assert_close(picks.float().mean(dim=0), alpha[0], atol=0.01, rtol=0)


def test_positions_do_not_depend_on_padding(recipe):
    batch = make_batch(4)
    padded = Batch(batch.images, F.pad(batch.input_ids, (0, 6)), F.pad(batch.attention_mask, (0, 6)))
    a, b = recipe.corrupt(batch, step=5), recipe.corrupt(padded, step=5)
    assert torch.equal(a.positions, b.positions[:, :L]) and not b.positions[:, L:].any()
    assert torch.equal(a.input_ids, b.input_ids[:, :L])
    assert not torch.equal(a.positions, recipe.corrupt(batch, step=6).positions)


def inclusion_probabilities(weights, m):
    """P(i in M) when m positions are drawn one after another, each ∝ ``weights`` over those not yet drawn
    (sampling without replacement), by enumerating every ordered draw."""
    chosen_mass = [0.0] * len(weights)

    def visit(chosen, probability, left):
        if left == 0:
            for i in chosen:
                chosen_mass[i] += probability
            return
        rest = 1.0 - sum(weights[i] for i in chosen)
        for i, w in enumerate(weights):
            if i not in chosen and w > 0:
                visit(chosen + (i,), probability * w / rest, left - 1)

    visit((), 1.0, m)
    return torch.tensor(chosen_mass)


def test_recipe_positions_follow_the_teachers_saliency(tmp_path):
    """Recipe level: over 500 draws of ``Epic.positions`` per caption, each token's masking frequency
    equals its inclusion probability under sampling without replacement ∝ the teacher's α (enumerated
    exactly), and not the m/n of uniform positions. A sharper α (saliency_scale=10) and 16-px images keep
    the two apart and the 2,000 teacher rows cheap."""
    teacher = save_fresh("configs/tiny_albef.json", tmp_path / "teacher.pt", 0, "model.image_size=16")
    r = build(teacher, "model.image_size=16", saliency_scale=10.0)
    batch = make_batch(3, image_size=16)
    allowed = maskable(batch, r)
    alpha = r.saliency(batch.images, batch.input_ids, batch.attention_mask, allowed)
    counts = masked_count(allowed, r.options.mask_ratio)
    expected = torch.stack([inclusion_probabilities(alpha[i].tolist(), int(counts[i])) for i in range(B)])
    uniform = allowed.float() * (counts.float() / allowed.sum(dim=1).float()).unsqueeze(1)
    assert (expected - uniform).abs().max() > 0.3  # this teacher's α is far from uniform

    draws = 500
    repeated = Batch(batch.images.repeat(draws, 1, 1, 1), batch.input_ids.repeat(draws, 1),
                     batch.attention_mask.repeat(draws, 1))
    u = torch.rand(draws * B, L, generator=torch.Generator().manual_seed(4))
    positions, saliency = r.positions(repeated, u)
    torch.testing.assert_close(saliency[:B], alpha)
    frequency = positions.float().reshape(draws, B, L).mean(dim=0)
    torch.testing.assert_close(frequency, expected, atol=0.07, rtol=0)


def trimmed(batch, rows):
    """Rows of ``batch``, padded only to their own longest caption (as a rank's loader would)."""
    part = batch.slice(rows.start, rows.stop)
    length = int(part.attention_mask.sum(dim=1).max())
    return Batch(part.images, part.input_ids[:, :length], part.attention_mask[:, :length])


def two_rank_batch():
    """8 captions: the first 4 at most L - 4 tokens long, the last 4 up to L (padded to L together)."""
    short, full = make_batch(20, b=4, length=L - 4), make_batch(21, b=4, length=L)
    pad = (0, 4)
    return Batch(torch.cat([short.images, full.images]), torch.cat([F.pad(short.input_ids, pad), full.input_ids]),
                 torch.cat([F.pad(short.attention_mask, pad), full.attention_mask]))


def _rank_worker(rank, port, teacher, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    r = build(teacher)
    c = r.corrupt(trimmed(two_rank_batch(), slice(rank * 4, rank * 4 + 4)), step=3)
    losses = [torch.zeros(()) for _ in range(2)]
    dist.all_gather(losses, c.generator_loss.detach())
    out.put((rank, c.positions.numpy(), c.input_ids.numpy(), float(torch.stack(losses).mean())))
    dist.destroy_process_group()


def test_two_ranks_draw_what_one_process_draws(teacher_path):
    """Positions, replacements and L_GEN of 2 gloo ranks with 4 captions each (each padded to its own
    length) equal one process's with all 8."""
    import torch.multiprocessing as mp

    from ..two_ranks import free_port

    whole = two_rank_batch()
    single = build(teacher_path).corrupt(trimmed(whole, slice(0, 8)), step=3)
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(teacher_path), out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((rank, rest) for rank, *rest in (out.get(timeout=180) for _ in range(2)))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, (positions, ids, loss) in results.items():
        rows = slice(rank * 4, rank * 4 + 4)
        length = positions.shape[1]
        assert length == (L - 4 if rank == 0 else L)
        assert torch.equal(torch.from_numpy(positions), single.positions[rows, :length])
        assert not single.positions[rows, length:].any()
        assert torch.equal(torch.from_numpy(ids), single.input_ids[rows, :length])
        assert loss == pytest.approx(single.generator_loss.item(), rel=1e-5)


# -- the generator's draws and the labels (eq. 4-6) -------------------------------------------------


def test_sample_from_logits_matches_the_softmax_and_respects_the_range():
    logits = torch.tensor([[9.0, 0.0, 1.0, 2.0, -1.0, float("-inf"), 9.0]])
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(3))
    ids = sample_from_logits(logits.expand(n, 7), u, low=1, high=6)
    assert ids.min() >= 1 and ids.max() <= 4  # id 0 and 6 are out of range, id 5 has probability 0
    expected = torch.softmax(logits[0, 1:5], dim=0)
    freq = torch.bincount(ids, minlength=7)[1:5].float() / n
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)
    broken = torch.full((3, 7), float("nan"))
    assert ((sample_from_logits(broken, torch.tensor([0.0, 0.5, 0.999]), 1, 6) >= 1)).all()


def test_consistency_labels_follow_the_ids_not_the_mask():
    original = torch.tensor([[101, 5, 6, 7, 102, 0]])
    corrupted = torch.tensor([[101, 5, 9, 7, 102, 0]])
    assert consistency_labels(original, corrupted).tolist() == [[1, 1, 0, 1, 1, 1]]


def test_corruption_labels_match_the_replaced_positions(recipe):
    batch = make_batch(5, b=8, length=16)
    c = recipe.corrupt(batch, step=3)
    ids = batch.input_ids
    assert torch.equal(c.labels, (c.input_ids == ids).float())
    assert torch.equal(c.input_ids[~c.positions], ids[~c.positions])  # only M is touched
    assert not (c.labels[~c.positions] < 0.5).any()
    assert not (c.positions & ~maskable(batch, recipe)).any()
    assert torch.equal(c.positions.sum(dim=1), masked_count(maskable(batch, recipe), 0.35))
    assert (c.input_ids[c.positions] >= recipe.replacement_ids[0]).all()  # no special ids proposed
    # a fresh generator guesses wrong almost everywhere: inconsistent tokens at a non-trivial rate
    assert (c.labels[c.positions] < 0.5).float().mean() > 0.5


def test_replacements_equal_to_the_original_are_consistent(recipe, monkeypatch):
    """Force the generator's draw to return the original token at every other masked position."""
    import fastvl.methods.epic as epic_module

    batch = make_batch(6, b=8, length=16)
    positions = recipe.corrupt(batch, step=0).positions
    originals = batch.input_ids[positions]
    keep = torch.arange(originals.numel()) % 2 == 0
    real_sample = epic_module.sample_from_logits

    def sample_keeping_some(logits, u, low, high):
        return torch.where(keep, originals, real_sample(logits, u, low, high))

    monkeypatch.setattr(epic_module, "sample_from_logits", sample_keeping_some)
    c = recipe.corrupt(batch, step=0)
    assert torch.equal(c.positions, positions)
    labels = c.labels[positions]
    assert (labels[keep] == 1).all()  # masked but unchanged: consistent (eq. 6)
    changed = c.input_ids[positions] != originals
    assert torch.equal(labels[~keep] == 0, changed[~keep])


def test_replacements_are_sampled_from_the_generator():
    """Recipe level: a generator whose MLM softmax is forced (transform output 0, so logits = the decoder
    bias) to put 1/4 on one ordinary id and 3/4 on another proposes only those two, at those rates — a
    uniformly random replacement would almost never hit either, an argmax would give only the second."""
    r = build_method(recipe_config(CONFIG, "method.options.teacher=null", masking="random"))
    first, second = 2500, 2600  # outside the captions' ids (1000-1999): every replacement is inconsistent
    with torch.no_grad():
        transform = r.generator.mlm_head.transform
        transform.LayerNorm.weight.zero_()
        transform.LayerNorm.bias.zero_()
        r.generator.mlm_head.bias.fill_(-1e4)
        r.generator.mlm_head.bias[first] = 0.0
        r.generator.mlm_head.bias[second] = math.log(3.0)
    batch = make_batch(17, b=32, length=24)
    replacements, labels = [], []
    for step in range(4):
        c = r.corrupt(batch, step=step)
        replacements.append(c.input_ids[c.positions])
        labels.append(c.labels[c.positions])
    replacements, labels = torch.cat(replacements), torch.cat(labels)
    assert replacements.numel() > 800
    assert set(replacements.unique().tolist()) == {first, second}
    assert (replacements == second).float().mean().item() == pytest.approx(0.75, abs=0.06)
    assert not labels.any()


def test_token_consistency_loss_and_metrics():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, -2.0, 1.0, 0.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]])
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    loss = token_consistency_loss(logits, labels, real)
    where = real.bool()
    expected = F.binary_cross_entropy_with_logits(logits[where], labels[where])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    grad = (torch.sigmoid(logits.detach()) - labels) * where / where.sum()
    torch.testing.assert_close(logits.grad, grad)
    masked = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    m = token_consistency_metrics(logits.detach(), labels, real, masked)
    assert m["inconsistent_fraction"].item() == pytest.approx(3 / 3)
    # predictions (z > 0): [1, 0, 1 | x] and [0, 0, 1, 0]; 4 of 7 real tokens right
    assert m["token_consistency_acc"].item() == pytest.approx(4 / 7)
    assert m["inconsistent_recall"].item() == pytest.approx(2 / 3)


# -- gradients and the frozen teacher ---------------------------------------------------------------


def grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


def nonzero(grad):
    return grad is not None and grad.abs().sum() > 0


def test_generator_learns_only_from_l_gen(teacher_path):
    r = build(teacher_path).train()
    batch = make_batch(7)
    # every loss but L_GEN: the generator must receive nothing
    r.loss_weights["gen"] = 0.0
    out = r(batch)
    assert "gen" not in out and "generator_mlm" in out
    out["loss"].backward()
    assert all(not nonzero(g) for g in grads(r.generator).values())
    assert nonzero(r.consistency_head.weight.grad)
    assert nonzero(r.base.backbone.text_encoder.embeddings.word_embeddings.weight.grad)
    # L_GEN alone: only the generator receives gradient
    r.zero_grad(set_to_none=True)
    r.loss_weights["gen"] = 1.0
    r.corrupt(batch).generator_loss.backward()
    assert nonzero(r.generator.text_encoder.embeddings.word_embeddings.weight.grad)
    assert all(nonzero(g) for g in grads(r.generator).values())
    others = {n: g for n, g in grads(r).items() if not n.startswith("generator.")}
    assert all(g is None for g in others.values())
    assert not list(r.saliency.parameters())


def test_teacher_stays_frozen_through_training(teacher_path):
    r = build(teacher_path).train()
    assert not r.saliency.training and not r.saliency.backbone.training
    assert all(not m.training for m in r.saliency.modules())
    before = {n: b.clone() for n, b in r.saliency.named_buffers()}
    # not stored in checkpoints: only the fingerprint of the teacher's weights
    assert {n for n in r.state_dict() if n.startswith("saliency.")} == {"saliency.fingerprint"}
    optimizer = torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        out = r(make_batch(10 + step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        r.after_step(step + 1)
    after = dict(r.saliency.named_buffers())
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not r.saliency.backbone.training
    assert r.current_step == r.base.current_step == 3


def test_loading_next_to_a_changed_teacher_warns(tmp_path, teacher_path):
    import warnings

    state = build(teacher_path).state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(teacher_path).load_state_dict(state)  # the same teacher: silent
    other = save_fresh("configs/tiny_albef.json", tmp_path / "model_fp32.pt", 1)  # other weights, same shapes
    changed = build(other)
    assert int(changed.saliency.fingerprint) != int(state["saliency.fingerprint"])
    with pytest.warns(RuntimeWarning, match="different saliency teacher"):
        changed.load_state_dict(state)


def test_image_encoder_runs_once_and_its_states_are_reused(teacher_path):
    r = build(teacher_path)  # eval mode: no dropout, so both paths must agree exactly
    calls = []
    handle = r.base.backbone.vision_encoder.register_forward_hook(lambda m, a, o: calls.append(o))
    try:
        batch = make_batch(8)
        with torch.no_grad():
            out = r(batch)
            assert len(calls) == 1  # the base's pass is the only one
            c = r.corrupt(batch)
            logits = r.consistency_logits(r.base.backbone.encode_image(batch.images), c.input_ids,
                                          batch.attention_mask)
            loss = token_consistency_loss(logits, c.labels, batch.attention_mask)
    finally:
        handle.remove()
    torch.testing.assert_close(out["token_consistency"], loss)


# -- configuration and switches ---------------------------------------------------------------------


def test_teacher_errors(tmp_path, teacher_path):
    with pytest.raises(ConfigError, match="needs a teacher"):
        build_method(load_config(CONFIG, ["method.options.teacher=null"]))
    with pytest.raises(ConfigError, match="checkpoint not found"):
        build(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="unknown base recipe"):
        build(teacher_path, base="clip")
    with pytest.raises(ConfigError, match="unknown config key"):
        build(teacher_path, mask_rate=0.3)
    other = save_fresh("configs/tiny_albef.json", tmp_path / "other.pt", 0, "model.image_size=32")
    with pytest.raises(ConfigError, match="image_size"):
        build(other)


def test_random_positions_need_no_teacher():
    r = build_method(load_config(CONFIG, ["method.options.teacher=null", 'method.options.masking="random"']))
    assert r.saliency is None
    c = r.corrupt(make_batch(9))
    assert c.saliency is None
    assert torch.equal(c.positions.sum(dim=1), masked_count(maskable(make_batch(9), r), 0.35))


def test_random_replacement_switch(teacher_path):
    r = build(teacher_path, replacement="random").train()
    assert r.generator is None and "gen" not in r.loss_weights
    batch = make_batch(11, b=8, length=16)
    c = r.corrupt(batch)
    assert c.generator_loss is None
    low, high = r.replacement_ids
    assert ((c.input_ids[c.positions] >= low) & (c.input_ids[c.positions] < high)).all()
    out = r(batch)
    assert "gen" not in out and torch.isfinite(out["loss"])


def test_frozen_generator_switch(teacher_path):
    r = build(teacher_path, generator_training="frozen").train()
    assert not r.generator.training and "gen" not in r.loss_weights
    assert not any(p.requires_grad for p in r.generator.parameters())
    out = r(make_batch(12))
    assert "gen" not in out and "generator_mlm" in out
    out["loss"].backward()
    assert all(p.grad is None for p in r.generator.parameters())


def test_mask_ratio_switch(teacher_path):
    r = build(teacher_path, mask_ratio=0.15)
    batch = make_batch(13, b=8, length=24)
    assert torch.equal(r.corrupt(batch).positions.sum(dim=1), masked_count(maskable(batch, r), 0.15))


def test_generator_shape_and_minilm_init(teacher_path):
    r = build(teacher_path, generator_layers=2, generator_width=384, generator_heads=12,
              generator_intermediate=1536, generator_init="minilm")
    report = r.generator.init_report
    assert len(r.generator.text_encoder.encoder.layer) == 2
    assert any(n.startswith("text_encoder.encoder.layer.1.") for n in report.loaded)
    assert "text_encoder.embeddings.word_embeddings.weight" in report.loaded
    c = r.corrupt(make_batch(14))
    assert torch.isfinite(c.generator_loss)


def tiny_masked_lm_folder(folder):
    """A random transformers BertForMaskedLM shaped like the tiny preset's text + fusion stack (4 layers,
    128 wide), saved offline to ``folder``: a stand-in for the pretrained text encoder."""
    import transformers

    config = transformers.BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=512, max_position_embeddings=512, layer_norm_eps=1e-12)
    torch.manual_seed(5)
    model = transformers.BertForMaskedLM(config).eval()
    model.save_pretrained(folder)
    return model


def test_generator_starts_from_the_text_encoders_checkpoint(tmp_path, teacher_path):
    """generator_init="model" loads ``model.text_init`` (the paper: the VLM's pretrained text encoder with
    its MLM head): every tensor of the checkpoint is in the generator, and its MLM logits are
    transformers' on a masked caption."""
    hf = tiny_masked_lm_folder(tmp_path / "bert")
    r = build(teacher_path, f"model.text_init={tmp_path / 'bert'}", generator_init="model")
    generator = r.generator
    assert len(generator.text_encoder.encoder.layer) == 4  # text_layers + fusion_layers
    assert not generator.init_report.fresh
    ours = dict(generator.named_parameters())
    for key, value in hf.state_dict().items():
        if key.startswith("bert.") and "position_ids" not in key:
            assert torch.equal(ours["text_encoder." + key[len("bert."):]], value), key
        elif key.startswith("cls.predictions.") and ".decoder." not in key:
            assert torch.equal(ours["mlm_head." + key[len("cls.predictions."):]], value), key
    batch = make_batch(18)
    masked_ids = batch.input_ids.clone()
    masked_ids[:, 2:5] = MASK_ID
    with torch.no_grad():
        logits = generator.logits(generator(masked_ids, batch.attention_mask))
        reference = hf(input_ids=masked_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits[real], reference[real], atol=1e-4, rtol=1e-4)


def test_a_generator_left_random_by_the_model_init_warns(teacher_path):
    with pytest.warns(RuntimeWarning, match="generator starts from random weights"):
        build(teacher_path, generator_init="model")
    # the base config names the pretrained text encoder, so its generator (init "model") starts from it
    base = load_config("configs/base_epic.json")
    assert base.model.text_init and base.method.options["generator_init"] == "model"


def test_epic_mounts_on_mamo_with_a_mamo_teacher(tmp_path):
    """MAMO + EPIC is a config; the single-stream teacher reads image [CLS] query x text keys."""
    mamo = json.load(open("configs/tiny_mamo.json"))["method"]["options"]
    teacher = save_fresh("configs/tiny_mamo.json", tmp_path / "mamo.pt")
    r = build(teacher, base="mamo", base_options=mamo).train()
    assert r.saliency.layout == "concat"
    assert set(r.loss_weights) == {"itc", "itm", "mlm", "mrm", "mim", "token_consistency", "gen"}
    batch = make_batch(15)
    out = r(batch)
    assert {"mrm", "mim", "token_consistency", "gen"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert r.consistency_head.weight.grad is not None

    # eq. 8 on the concatenation, straight from the penultimate self-attention's projections
    reference, _, _ = load_recipe(str(teacher))
    bb = reference.backbone
    with torch.no_grad():
        image = bb.encode_image(batch.images)
        text = bb.encode_text(batch.input_ids, batch.attention_mask)
        fusion = bb.fusion_encoder
        hidden = torch.cat([fusion.image_tokens(image), text], dim=1)
        kpm = torch.cat([torch.ones(B, 1 + fusion.num_patches, dtype=torch.bool), batch.attention_mask.bool()], dim=1)
        for layer in fusion.encoder.layer[:-2]:
            hidden = layer(hidden, kpm)
        attn = fusion.encoder.layer[-2].attention.self
        q = heads(attn.query(hidden[:, :1]), attn.heads)
        k = heads(attn.key(hidden[:, fusion.text_offset:]), attn.heads)
        scores = (q @ k.transpose(-1, -2)).squeeze(2).mean(dim=1)
        allowed = maskable(batch, r)
        alpha = r.saliency(batch.images, batch.input_ids, batch.attention_mask, allowed)
    torch.testing.assert_close(alpha, masked_softmax(scores, allowed), atol=1e-6, rtol=1e-5)


# -- end to end on the built-in data ------------------------------------------------------------------


def run_config(synth, teacher, out_dir, *overrides):
    return epic_config(teacher, *quick_run(synth, out_dir, *overrides))


def test_losses_fall_on_builtin_data(synth, teacher_path, tmp_path):
    from fastvl.train.loop import train

    cfg = run_config(synth, teacher_path, tmp_path / "run", "train.steps=30", "train.lr=5e-4", "train.precision=fp32")
    rows = read_rows(train(cfg, progress=False).metrics)
    assert len(rows) == 30

    def mean(name, part):
        return sum(r[name] for r in part) / len(part)

    first, last = rows[:5], rows[-5:]
    assert mean("gen", last) < 0.9 * mean("gen", first)  # the generator learns the captions' language
    assert mean("mlm", last) < 0.9 * mean("mlm", first)
    assert mean("token_consistency", last) < mean("token_consistency", first)
    assert mean("token_consistency_acc", last) > 0.6
    assert mean("loss", last) < mean("loss", first)
    # even after fitting the corpus, the generator still makes inconsistent tokens
    assert mean("inconsistent_fraction", last) > 0.2
    assert all(0 < r["inconsistent_fraction"] <= 1 for r in rows)


def test_zero2_bf16_and_reload(synth, teacher_path, tmp_path):
    """DeepSpeed ZeRO-2 in bf16 on CPU; the checkpoint reloads (teacher from its path, not the file)."""
    from fastvl.train.loop import train

    cfg = run_config(synth, teacher_path, tmp_path / "run", "train.steps=3", "train.lr=1e-4", "train.precision=bf16",
                     "train.zero_stage=2", "data.batch_size=4")
    rows = read_rows(train(cfg, progress=False).metrics)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "bf16" and run["zero_stage"] == 2
    assert set(run["loss_names"]) == {"itc", "itm", "mlm", "token_consistency", "gen"}
    assert len(rows) == 3
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "itc", "itm", "mlm", "token_consistency", "gen"))
    recipe, _, step = load_recipe(str(tmp_path / "run"))
    assert step == 3 and recipe.saliency is not None
    assert recipe.scorer.recipe is recipe.base
    # an EPIC run can itself be the next run's teacher
    teacher = SaliencyTeacher(load_teacher(str(tmp_path / "run"), cfg))
    batch = make_batch(16)
    allowed = maskable(batch, recipe)
    alpha = teacher(batch.images, batch.input_ids, batch.attention_mask, allowed)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(B))

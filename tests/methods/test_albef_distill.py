"""ALBEF's momentum distillation and ITC queues (fastvl/methods/albef.py): the queue advances by the
global batch and wraps, the soft targets follow ALBEF's formulas (independent references here) and
change the loss only when alpha > 0, the momentum model follows the EMA rule after applied steps only,
the queues survive checkpoint/resume exactly, and 2 processes log what 1 process logs."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastvl.config import ConfigError, load_config
from fastvl.data.batch import Batch
from fastvl.objectives.itc import MomentumKeys, itc_loss
from fastvl.objectives.mlm import mlm_loss
from fastvl.train.checkpoint import CONSOLIDATED, read_weights
from fastvl.train.loop import train
from fastvl.train.metrics import read_metrics

from ..train.test_distributed import LAUNCHER, RankOrderedLoader, clean_env
from ..two_ranks import free_port
from .conftest import build_recipe, quick_run

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny_albef.json")
LOSSES = ("loss", "itc", "itm", "mlm")


def random_batch(rows: int, seed: int, length: int = 10) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (rows, length), generator=g)
    ids[:, 0] = 101  # [CLS]
    return Batch(torch.randn(rows, 3, 64, 64, generator=g), ids, torch.ones_like(ids), [f"k{i}" for i in range(rows)])


def distilling(**options):
    """The tiny ALBEF with distillation on, no alpha ramp, no dropout (so train mode is deterministic)."""
    return build_recipe(TINY, "model.dropout=0.0", **{"momentum_distill": True, "alpha_warmup_steps": 0, **options})


def online_features(recipe, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image, text, _ = recipe.encode(batch)
        return recipe.backbone.image_feat(image), recipe.backbone.text_feat(text)


# ------------------------------------------------------------------------------------------------
# the queue


def test_queue_advances_by_the_batch_and_wraps_around():
    recipe = distilling(queue_size=6).train()
    first, second = random_batch(4, seed=1), random_batch(4, seed=2)
    # before any update the momentum model is an exact copy: its features are the online ones
    image_1, text_1 = online_features(recipe, first)
    image_2, text_2 = online_features(recipe, second)
    initial = recipe.image_queue.clone()
    torch.testing.assert_close(initial.norm(dim=-1), torch.ones(6))  # ALBEF: random unit vectors

    recipe(first)  # the write waits for the backward, which reads the queue the loss saw
    assert int(recipe.queue_ptr) == 0 and torch.equal(recipe.image_queue, initial)
    recipe.after_step(1)
    assert int(recipe.queue_ptr) == 4
    torch.testing.assert_close(recipe.image_queue[:4], image_1)
    torch.testing.assert_close(recipe.text_queue[:4], text_1)
    assert torch.equal(recipe.image_queue[4:], initial[4:])

    recipe(second)  # rows 4, 5, then wraps to 0, 1
    recipe(first)  # under gradient accumulation, the next micro-batch's forward writes them
    assert int(recipe.queue_ptr) == 2
    torch.testing.assert_close(recipe.image_queue[[4, 5, 0, 1]], image_2)
    torch.testing.assert_close(recipe.text_queue[[4, 5, 0, 1]], text_2)
    torch.testing.assert_close(recipe.image_queue[2:4], image_1[2:])

    recipe.eval()(first)  # writes the last training forward's keys, and holds none of its own
    assert int(recipe.queue_ptr) == 0
    recipe(first)
    recipe.after_step(2)
    assert int(recipe.queue_ptr) == 0


def test_queue_smaller_than_the_global_batch_is_refused():
    recipe = distilling(queue_size=3).train()
    with pytest.raises(ConfigError, match=r"method.options.queue_size=3 is smaller than the global batch \(4\)"):
        recipe(random_batch(4, seed=1))


def test_the_queue_is_a_source_of_negatives():
    """The second forward sees the first batch's features in the queue: its ITC loss is the one computed
    against [batch ; queue] keys (reference: plain cross-entropy over the concatenated keys)."""
    recipe = distilling(queue_size=8, alpha=0.0).train()
    recipe(random_batch(4, seed=1))
    recipe.after_step(1)
    batch = random_batch(4, seed=2)
    image, text = online_features(recipe, batch)
    keys_text = torch.cat([text, recipe.text_queue])
    keys_image = torch.cat([image, recipe.image_queue])
    t = recipe.temperature.detach()
    labels = torch.arange(4)
    expected = (F.cross_entropy(image @ keys_text.t() / t, labels) + F.cross_entropy(text @ keys_image.t() / t, labels)) / 2
    torch.testing.assert_close(recipe(batch)["itc"], expected)


# ------------------------------------------------------------------------------------------------
# the soft targets


def test_itc_soft_targets_match_albef():
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g), dim=-1)
    image, text, image_m, text_m = unit(5, 8), unit(5, 8), unit(5, 8), unit(5, 8)
    queue_i, queue_t = unit(7, 8), unit(7, 8)
    t, alpha = torch.tensor(0.1), 0.4
    keys = MomentumKeys(image_m, text_m, image_m, text_m, queue_i, queue_t)
    loss, sim_i2t, sim_t2i = itc_loss(image, text, t, keys, alpha)
    # reference, one row at a time: q = alpha * p_m + (1 - alpha) * y, loss = -sum q log p
    all_t, all_i = torch.cat([text_m, queue_t]), torch.cat([image_m, queue_i])
    total = 0.0
    for row in range(5):
        for query, query_m, keys_ in ((image[row], image_m[row], all_t), (text[row], text_m[row], all_i)):
            p = torch.exp(query @ keys_.t() / t)
            p = p / p.sum()
            p_m = torch.exp(query_m @ keys_.t() / t)
            p_m = p_m / p_m.sum()
            q = alpha * p_m
            q[row] += 1 - alpha
            total = total - (q * p.log()).sum() / 2
    torch.testing.assert_close(loss, total / 5)
    # hard-negative mining sees the batch columns only
    assert sim_i2t.shape == sim_t2i.shape == (5, 5)
    torch.testing.assert_close(sim_i2t, image @ text_m.t() / t)


def test_mlm_distillation_mixes_hard_and_soft_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, teacher = torch.randn(6, 11, generator=g), torch.randn(6, 11, generator=g).softmax(-1)
    labels = torch.randint(0, 11, (6,), generator=g)
    log_p = logits.log_softmax(-1)
    hard = -log_p[torch.arange(6), labels].mean()
    soft = -(teacher * log_p).sum(-1).mean()
    torch.testing.assert_close(mlm_loss(logits, labels, teacher, 0.4), 0.6 * hard + 0.4 * soft)
    assert torch.equal(mlm_loss(logits, labels, teacher, 0.0), mlm_loss(logits, labels))


def test_alpha_zero_is_exactly_the_plain_loss_and_alpha_changes_it():
    """A fresh momentum model equals the online one, so with no queue and alpha = 0 every loss equals
    the recipe without distillation bit for bit; alpha = 0.4 changes ITC and MLM (ITM: same negatives)."""
    batch = random_batch(6, seed=3)
    plain = build_recipe(TINY, "model.dropout=0.0", momentum_distill=False)(batch)
    hard = distilling(queue_size=0, alpha=0.0)(batch)
    soft = distilling(queue_size=0, alpha=0.4)(batch)
    for name in LOSSES:
        assert torch.equal(hard[name], plain[name]), name
    assert soft["itm"] == plain["itm"]
    assert soft["itc"] != plain["itc"] and soft["mlm"] != plain["mlm"]


def test_alpha_ramps_over_the_warmup_steps():
    recipe = distilling(alpha_warmup_steps=10)
    seen = []
    for step in (0, 5, 10, 20):
        recipe.current_step = step
        seen.append(recipe.alpha)
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.4])


def test_without_distillation_nothing_extra_is_built():
    recipe = build_recipe(TINY, momentum_distill=False)
    assert recipe.momentum_model is None and recipe(random_batch(4, seed=1)).keys() == {*LOSSES, "temperature"}
    assert not any("queue" in name or name.startswith("momentum") for name in recipe.state_dict())


# ------------------------------------------------------------------------------------------------
# the momentum model


def test_momentum_model_moves_by_the_ema_rule_after_applied_steps_only():
    recipe = distilling(momentum=0.9).train()
    teacher = recipe.momentum_model
    optimizer = torch.optim.SGD(recipe.parameters(), lr=0.5)
    recipe(random_batch(4, seed=1))["loss"].backward()
    before = {path: buffer.clone() for path, buffer, _ in teacher.pairs("albef")}
    optimizer.step()
    online = {path: param.detach().clone() for path, _, param in teacher.pairs("albef")}
    recipe.after_step(1, applied=True)
    moved = 0
    for path, buffer, _ in teacher.pairs("albef"):
        torch.testing.assert_close(buffer, 0.9 * before[path] + 0.1 * online[path], rtol=0, atol=1e-6)
        moved += not torch.equal(buffer, before[path])
    assert moved > 0
    held = {path: buffer.clone() for path, buffer, _ in teacher.pairs("albef")}
    recipe.after_step(2, applied=False)  # fp16's loss scaler skipped the step: the copy holds
    assert all(torch.equal(buffer, held[path]) for path, buffer, _ in teacher.pairs("albef"))
    assert int(recipe.step) == 2


# ------------------------------------------------------------------------------------------------
# training runs



def test_queues_and_momentum_model_resume_exactly(synth, tmp_path, single_thread):
    """4 steps straight == 2 steps, resume, 2 more: losses logged and every tensor saved (weights,
    momentum copy, queues, pointer) equal bit for bit; the 12-entry queue wraps at batch 8."""
    extra = ["data.batch_size=8", "train.steps=4", "train.save_every=2", "train.keep_last=1", "model.dropout=0.1",
             "method.options.momentum_distill=true", "method.options.queue_size=12",
             "method.options.alpha_warmup_steps=2"]
    straight = load_config(TINY, quick_run(synth, tmp_path / "straight", *extra))
    split = load_config(TINY, quick_run(synth, tmp_path / "split", *extra))
    train(straight, progress=False)
    assert train(split, stop_at=2, progress=False).step == 2
    split.train.resume = True
    assert train(split, progress=False).step == 4
    a, b = read_weights(tmp_path / "straight" / CONSOLIDATED)[0], read_weights(tmp_path / "split" / CONSOLIDATED)[0]
    assert a.keys() == b.keys() and {"image_queue", "text_queue", "queue_ptr"} <= a.keys()
    assert int(a["queue_ptr"]) == (4 * 8) % 12
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [[r[k] for k in (*LOSSES, "alpha")] for r in rows_a] == [[r[k] for k in (*LOSSES, "alpha")] for r in rows_b]


@pytest.mark.skipif(not LAUNCHER.exists(), reason="the deepspeed launcher is not installed next to this interpreter")
def test_two_processes_log_what_one_process_logs(synth, tmp_path):
    """2 ranks x 4 == 1 process x 8 (batch in rank order): the queues enqueue the gathered global batch,
    so the queue contents (wrapping at 12) and every loss agree."""
    common = ["train.steps=3", "train.zero_stage=2", "train.precision=fp32", "data.max_text_len=12",
              "method.options.momentum_distill=true", "method.options.queue_size=12",
              "method.options.alpha_warmup_steps=0"]
    one = load_config(TINY, quick_run(synth, tmp_path / "one", "data.batch_size=8", *common))
    train(one, build_loader=RankOrderedLoader, progress=False)
    command = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "fastvl.train",
               "--config", TINY, "--set", *quick_run(synth, tmp_path / "two", "data.batch_size=4", *common)]
    done = subprocess.run(command, cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows_one, rows_two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["samples_seen"] for r in rows_two] == [r["samples_seen"] for r in rows_one] == [8, 16, 24]
    for name in (*LOSSES, "temperature"):
        assert [r[name] for r in rows_two] == pytest.approx([r[name] for r in rows_one], rel=1e-4, abs=1e-5), name
    queues_one, queues_two = read_weights(tmp_path / "one" / CONSOLIDATED)[0], read_weights(tmp_path / "two" / CONSOLIDATED)[0]
    assert int(queues_one["queue_ptr"]) == int(queues_two["queue_ptr"]) == (3 * 8) % 12
    for name in ("image_queue", "text_queue"):
        torch.testing.assert_close(queues_two[name], queues_one[name], rtol=1e-4, atol=1e-5)

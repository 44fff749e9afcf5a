"""C-Mask: the generalized LM has no leakage (random spans and orders, both backbones), its MLM/LM
special cases, the reward equals the materialised-attention computation and leaves the main model's
gradients alone, the sampled masks meet the quota inside the words, PPO moves the policy the right
way (advantage and entropy), the agent never trains the backbone, checkpoint/resume restores the
agent, its optimizer and the pending rollout (by state_dict and through the trainer), options are
validated, and end-to-end runs on the built-in data (losses fall; ZeRO-2 in bf16)."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastvl.config import ConfigError, load_config
from fastvl.data.batch import Batch
from fastvl.masking.curriculum import RewardMeter, episode_return
from fastvl.methods import build_method
from fastvl.objectives.glm import build_glm_inputs
from fastvl_kernels import CONTEXT, ORIGINAL, PSEUDO, permutation_mask, sample_spans
from tests.methods.conftest import build_recipe, quick_run, read_rows, recipe_config

CONFIG = "configs/tiny_cmask.json"
B, L = 4, 14
MASK_ID, CLS_ID, SEP_ID = 103, 101, 102


def cmask_config(*overrides, **options):
    return recipe_config(CONFIG, *overrides, **options)


def build(*overrides, seed=0, **options):
    return build_recipe(CONFIG, *overrides, seed=seed, **options)


def make_batch(seed=0, b=B, size=64, length=L):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones(b, length, dtype=torch.long)
    lengths = [length, length - 3, length - 6, length - 1][:b] + [length] * max(0, b - 4)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = SEP_ID
        ids[i, n:] = 0
        mask[i, n:] = 0
    return Batch(torch.randn(b, 3, size, size, generator=g), ids, mask)


def random_spans(batch, seed, order="random"):
    """A random span mask with a random (or given) order over the words of ``batch``."""
    g = torch.Generator().manual_seed(seed)
    words = batch.attention_mask.sum(1) - 2
    b, length = batch.input_ids.shape
    p, s = torch.rand(b, length - 1, generator=g), torch.rand(b, length - 1, generator=g)
    sample = sample_spans(p, s, words, 0.5, seed, order=order, order_scores=torch.randn(b, length - 1, generator=g))
    mask = torch.zeros(b, length, dtype=torch.bool)
    step = torch.zeros(b, length, dtype=torch.long)
    mask[:, 1:], step[:, 1:] = sample.mask, sample.step
    return mask, step


# -- generalized LM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["multiway", "albef"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pseudo_masks_never_see_what_they_predict(backbone, seed):
    """Changing the original tokens of steps >= s leaves every pseudo-mask output of step <= s unchanged
    (they predict those tokens or come before them), and does change some later pseudo mask."""
    recipe = build(backbone=backbone, seed=seed)
    batch = make_batch(seed)
    mask, step = random_spans(batch, seed)
    cut = max(2, int(step.max()) // 2)
    changed_ids = torch.where(mask & (step >= cut), torch.randint(3000, 4000, batch.input_ids.shape), batch.input_ids)
    outputs = []
    for ids in (batch.input_ids, changed_ids):
        glm = build_glm_inputs(ids, batch.attention_mask, mask, step, mask_id=MASK_ID)
        image_states = recipe.backbone.encode_image(batch.images) if backbone == "albef" else None
        with torch.no_grad():
            states, _ = recipe.generalized_lm(batch, glm, image_states)
        outputs.append((glm, states))
    (glm, before), (_, after) = outputs
    pseudo = glm.kind == PSEUDO
    early = pseudo & glm.attention_mask & (glm.step <= cut)
    late = pseudo & glm.attention_mask & (glm.step > cut)
    assert early.any() and late.any()
    torch.testing.assert_close(after[early], before[early], rtol=0, atol=1e-5)
    assert (after[late] - before[late]).abs().amax() > 1e-3


def test_glm_layout_pseudo_masks():
    ids = torch.tensor([[CLS_ID, 11, 12, 13, 14, SEP_ID, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0, 0]], dtype=torch.bool)
    step = torch.tensor([[0, 2, 2, 0, 1, 0, 0]])
    glm = build_glm_inputs(ids, attn, mask, step, mask_id=MASK_ID)
    assert glm.input_ids.tolist() == [[CLS_ID, 11, 12, 13, 14, SEP_ID, 0, MASK_ID, MASK_ID, MASK_ID]]
    assert glm.position_ids[0, 7:].tolist() == [1, 2, 4]  # same positions as the tokens they stand for
    assert glm.kind[0].tolist() == [CONTEXT, ORIGINAL, ORIGINAL, CONTEXT, ORIGINAL, CONTEXT, CONTEXT, PSEUDO, PSEUDO, PSEUDO]
    assert glm.step[0, 7:].tolist() == [2, 2, 1]
    assert glm.labels[0, 7:].tolist() == [11, 12, 14] and (glm.labels[0, :7] == -100).all()
    assert glm.attention_mask[0].tolist() == [True] * 6 + [False] + [True] * 3
    # visibility of pseudo mask for token 11 (step 2): context, the step-1 original (14), its own step's pseudos
    kind, st = glm.kind[0], glm.step[0]
    visible = permutation_mask(kind[None], st[None])[0, 7] & glm.attention_mask[0]
    assert visible.nonzero().flatten().tolist() == [0, 3, 4, 5, 7, 8]


def test_vanilla_mlm_and_left_to_right_are_configurations():
    ids = torch.tensor([[CLS_ID, 11, 12, 13, SEP_ID]])
    attn = torch.ones_like(ids)
    mask = torch.tensor([[0, 1, 0, 1, 0]], dtype=torch.bool)
    mlm = build_glm_inputs(ids, attn, mask, mask.long(), mask_id=MASK_ID, pseudo=False)
    assert mlm.input_ids.tolist() == [[CLS_ID, MASK_ID, 12, MASK_ID, SEP_ID]]
    assert (mlm.kind == CONTEXT).all() and mlm.labels.tolist() == [[-100, 11, -100, 13, -100]]
    # left-to-right: every word its own span, steps = positions -> a pseudo mask sees exactly the words before it
    words = torch.tensor([3])
    sample = sample_spans(torch.ones(1, 4), torch.zeros(1, 4), words, 1.0, 0, order="left_to_right")
    full_mask, full_step = torch.zeros(1, 5, dtype=torch.bool), torch.zeros(1, 5, dtype=torch.long)
    full_mask[:, 1:], full_step[:, 1:] = sample.mask, sample.step
    assert full_step[0].tolist() == [0, 1, 2, 3, 0]
    lm = build_glm_inputs(ids, attn, full_mask, full_step, mask_id=MASK_ID)
    kind, st = lm.kind[0], lm.step[0]
    for row, predicted in zip(range(5, 8), (1, 2, 3)):
        seen = permutation_mask(kind[None], st[None])[0, row, :5].nonzero().flatten().tolist()
        assert seen == [0] + list(range(1, predicted)) + [4]


def test_recipe_configurations(tmp_path):
    with pytest.raises(ConfigError, match="backbone"):
        build(backbone="dual")
    with pytest.raises(ConfigError, match="order='single'"):
        build(objective="mlm")
    with pytest.raises(ConfigError, match="quota"):
        build(quota=0.0)
    recipe = build(objective="mlm", mask_selection="random", spans="none", order="single", quota=0.15).train()
    batch = make_batch(0)
    out = recipe(batch)
    assert math.isfinite(float(out["glm"]))
    assert not recipe.curriculum.pending  # nothing learned: no rollouts queued
    # the curriculum policy needs a recipe that provides shared features
    with pytest.raises(ConfigError, match="curriculum"):
        build_method(load_config("configs/tiny_albef.json", ["method.text_masking=curriculum"]))


# -- the reward -----------------------------------------------------------------------------------


def materialized_layer_rewards(captured, n_image, glm, topk=8):
    """Eq. 4 from the dense attention matrix of each observed layer: [layers, B, T]."""
    b = glm.input_ids.shape[0]
    kind = torch.cat([torch.full((b, n_image), CONTEXT), glm.kind.long()], 1)
    step = torch.cat([torch.zeros(b, n_image, dtype=torch.long), glm.step.long()], 1)
    real = torch.cat([torch.ones(b, n_image, dtype=torch.bool), glm.attention_mask], 1)
    visible = permutation_mask(kind, step) & real[:, None, :]
    layers = []
    for q, k, v in captured:
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(-1)
        a = probs[:, :, n_image:, :n_image] * v[:, :, None, :n_image].norm(dim=-1)  # [B, H, T, I]
        ratio = a / a.mean(-1, keepdim=True)
        per_head = ratio.topk(topk, dim=-1).values.mean(-1)
        layers.append((per_head.mean(1) * glm.attention_mask).double())
    return torch.stack(layers)


@pytest.mark.parametrize("mode", ["none", "batch"])
def test_reward_equals_materialized_attention(mode):
    recipe = build("model.attention=\"eager\"", reward_layer_norm=mode, seed=3)
    batch = make_batch(3)
    mask, step = random_spans(batch, 3, order="random")
    glm = build_glm_inputs(batch.input_ids, batch.attention_mask, mask, step, mask_id=MASK_ID)
    captured = []
    bb = recipe.backbone
    image = bb.embed_image(batch.images)
    meter = RewardMeter(image.shape[1], glm.attention_mask, 8)

    def both(name, q, k, v, kpm):
        captured.append((q.detach().double(), k.detach().double(), v.detach().double()))
        meter(name, q, k, v, kpm)

    with torch.no_grad(), bb.observing(both):
        bb.encode_joint(image, bb.embed_text(glm.input_ids, glm.position_ids), glm.attention_mask, glm.kind, glm.step)
    assert len(captured) == bb.num_layers
    expected_layers = materialized_layer_rewards(captured, image.shape[1], glm)
    torch.testing.assert_close(meter.stacked().double(), expected_layers, rtol=1e-4, atol=1e-5)

    caption = torch.zeros_like(glm.attention_mask)
    caption[:, :L] = batch.attention_mask.bool()
    reward, returns = recipe.curriculum.compute_return(meter, glm.predict, caption, update_scale=False)
    norm = torch.ones(len(captured), dtype=torch.double) if mode == "none" else \
        expected_layers.sum((1, 2)) / glm.attention_mask.sum()
    expected_r = (expected_layers / norm[:, None, None]).mean(0)
    expected_g = (expected_r * glm.predict).sum(1) + (expected_r * caption).sum(1) / caption.sum(1)
    torch.testing.assert_close(reward.double(), expected_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(returns.double(), expected_g, rtol=1e-4, atol=1e-5)


def test_running_layer_normalisation():
    rewards = torch.rand(3, 2, 5) + 0.5
    rows = torch.ones(2, 5, dtype=torch.bool)
    scale = torch.tensor([2.0, 1.0, 4.0])
    reward, _ = episode_return(rewards, rows, rows, rows, "running", scale)
    torch.testing.assert_close(reward, (rewards / scale[:, None, None]).mean(0))


def test_reward_does_not_disturb_the_main_gradients():
    batch = make_batch(5)
    grads = []
    for observe in (False, True):
        recipe = build(seed=5).train()
        mask, step = random_spans(batch, 5)
        glm = build_glm_inputs(batch.input_ids, batch.attention_mask, mask, step, mask_id=MASK_ID)
        states, meter = recipe.generalized_lm(batch, glm) if observe else _without_observer(recipe, batch, glm)
        states[glm.predict].float().pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in recipe.backbone.parameters() if p.grad is not None]))
        if observe:
            assert len(meter.layers) == recipe.backbone.num_layers
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def _without_observer(recipe, batch, glm):
    bb = recipe.backbone
    image = bb.embed_image(batch.images)
    states = bb.encode_joint(image, bb.embed_text(glm.input_ids, glm.position_ids), glm.attention_mask, glm.kind, glm.step)
    return states[:, image.shape[1]:], None


# -- the agent -----------------------------------------------------------------------------------


def test_sampled_masks_meet_the_quota_inside_the_words():
    recipe = build(seed=1)
    batch = make_batch(1, b=6)
    _, image_feats, text_feats, _ = recipe.shared_features(batch, need_itc=False)
    choice = recipe.curriculum.select(image_feats, text_feats, batch.attention_mask, step=7)
    words = batch.attention_mask.sum(1) - 2
    assert choice.mask.sum(1).tolist() == torch.ceil(words * 0.5).long().tolist()
    position = torch.arange(batch.input_ids.shape[1])
    inside = (position >= 1) & (position <= words[:, None])
    assert not (choice.mask & ~inside).any()  # never [CLS], [SEP] or padding
    assert ((choice.step >= 1) == choice.mask).all()
    again = recipe.curriculum.select(image_feats, text_feats, batch.attention_mask, step=7)
    assert torch.equal(again.mask, choice.mask) and torch.equal(again.step, choice.step)  # seeded by the step


def rollout_for(recipe, seed=2):
    batch = make_batch(seed)
    _, image_feats, text_feats, _ = recipe.shared_features(batch, need_itc=False)
    return recipe.curriculum.select(image_feats, text_feats, batch.attention_mask, step=seed).rollout


def chosen_log_prob(curriculum, rollout):
    from fastvl_kernels import span_action_log_prob

    with torch.no_grad():
        out = curriculum.run_agent(rollout.image_feats, rollout.text_feats, rollout.text_padding)
        p, s, q = curriculum.distributions(out, rollout.lengths)
        return span_action_log_prob(p, s, rollout.lengths, curriculum.options.quota, rollout.sample,
                                    order_scores=q, order=curriculum.options.order)


@pytest.mark.parametrize("pack_rows", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("layers", [0, 1, 3])
@pytest.mark.parametrize("image_rows", ["fixed", "updated"])
@pytest.mark.parametrize("image_width, image_input, expected_input", [
    (32, "norm", "norm"), (32, "linear", "linear"), (24, "norm", "linear")])
def test_agent_computes_exactly_the_caption_rows_of_its_layer_stack(layers, pack_rows, image_rows, image_width,
                                                                    image_input, expected_input):
    """The agent runs only what its heads read: the caption rows (packed: only the real ones), the image
    rows as keys/values (image_in folded into their projection: a LayerNorm's scale and shift always, a
    Linear with one layer). The outputs must equal those of the plain stack of joint layers over
    [image | text], where "fixed" keeps the image rows as they entered and "updated" carries them on,
    with padded words excluded as keys; and so must the gradients of every agent parameter (PPO trains
    through this path). The image enters through a Linear where its width differs from the agent's."""
    from fastvl.masking.curriculum import MaskingAgent

    torch.manual_seed(layers)
    agent = MaskingAgent(image_width, 16, 32, 4, 64, layers, image_rows, image_input).eval()
    assert agent.image_input == expected_input
    assert isinstance(agent.image_in, torch.nn.LayerNorm if expected_input == "norm" else torch.nn.Linear)
    with torch.no_grad():  # away from the initial values (unit norms, zero biases), which could hide a fold
        for p in agent.parameters():
            p.add_(0.1 * torch.randn_like(p))
    agent.pack_rows = pack_rows
    n_image = 5
    image, text = torch.randn(3, n_image, image_width), torch.randn(3, 7, 16)
    text_padding = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 6 + [0]]).bool()
    masked = torch.tensor([3.0, 2.0, 3.0])
    out = agent(image, text, text_padding, masked)
    x = torch.cat([agent.image_in(image) + agent.modality[0], agent.text_in(text) + agent.modality[1]], 1)
    padding = torch.cat([torch.ones(3, n_image, dtype=torch.bool), text_padding], 1)
    for layer in agent.layers:
        updated = layer(x, padding)
        x = updated if image_rows == "updated" else torch.cat([x[:, :n_image], updated[:, n_image:]], 1)
    caption = x[:, n_image:]
    start, cont, order = agent.action_heads(caption).unbind(-1)
    real = text_padding.float().unsqueeze(-1)
    per_token, offset = agent.value_head((caption * real).sum(1) / real.sum(1)).unbind(-1)
    value = masked * per_token + offset
    for got, want in zip((out.start_logits, out.cont_logits, out.order_scores), (start, cont, order)):
        torch.testing.assert_close(got[text_padding], want[text_padding], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.value, value, rtol=1e-5, atol=1e-5)

    def grads(start, cont, order, value):
        weights = torch.randn(3, *start.shape, generator=torch.Generator().manual_seed(1))
        loss = sum((w * t)[text_padding].sum() for w, t in zip(weights, (start, cont, order))) + value.sum()
        return torch.autograd.grad(loss, list(agent.parameters()), materialize_grads=True)

    names = [name for name, _ in agent.named_parameters()]
    got = grads(out.start_logits, out.cont_logits, out.order_scores, out.value)
    for name, g, w in zip(names, got, grads(start, cont, order, value)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=name)
    if layers > 1:  # the two modes are different functions of the same weights
        other = "updated" if image_rows == "fixed" else "fixed"
        agent.image_rows = other
        assert not torch.allclose(agent(image, text, text_padding, masked).start_logits, out.start_logits)


def build_agent_in(precision, **options):
    """A recipe whose agent computes in ``precision``; fp16 starts its loss scale where this agent's
    gradients do not overflow, so its first update is not skipped (skipping is tested on its own)."""
    recipe = build(seed=4, agent_precision=precision, **options)
    if precision == "fp16":
        recipe.curriculum.loss_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    return recipe


@pytest.mark.parametrize("precision, layers", [("fp32", 1), ("bf16", 1), ("fp16", 1), ("fp32", 3)],
                         ids=["fp32", "bf16", "fp16", "fp32-3-layers"])
def test_ppo_with_positive_advantage_raises_the_chosen_action(precision, layers):
    options = dict(entropy_coef=0.0, value_coef=0.0, agent_lr=1e-3, agent_layers=layers)
    recipe = build_agent_in(precision, **options)
    rollout = rollout_for(recipe)
    before, _ = chosen_log_prob(recipe.curriculum, rollout)
    with torch.no_grad():
        value = recipe.curriculum.run_agent(rollout.image_feats, rollout.text_feats, rollout.text_padding).value
    rollout.returns = value.float() + 1.0  # A = +1 for every row
    stats = recipe.curriculum.ppo_update(rollout)
    after, _ = chosen_log_prob(recipe.curriculum, rollout)
    assert (after > before).all()
    assert float(stats["agent_clip_fraction"]) == 0.0  # first epoch: ratio 1
    # and, from the same start, a negative advantage lowers it
    recipe = build_agent_in(precision, **options)
    rollout.returns = value.float() - 1.0
    recipe.curriculum.ppo_update(rollout)
    lowered, _ = chosen_log_prob(recipe.curriculum, rollout)
    assert lowered.mean() < before.mean()


def test_agent_precision_resolves_per_device(monkeypatch):
    from fastvl import precision
    from fastvl.masking.curriculum import agent_compute_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for supported, on_cuda, on_cpu in ((True, torch.bfloat16, torch.bfloat16), (False, torch.float16, None)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0) if supported else (7, 5))
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: supported)
        assert agent_compute_dtype("auto", cuda) == on_cuda
        assert agent_compute_dtype("auto", cpu) == on_cpu  # fp32 where bf16 would be emulated
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        assert agent_compute_dtype(name, cpu) == agent_compute_dtype(name, cuda) == dtype
    with pytest.raises(ConfigError, match="agent_precision"):
        build(agent_precision="fp8")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_agent_computes_in_half_and_keeps_fp32_weights(precision):
    """The agent's layers run in the half dtype (its heads' outputs say so) both when it samples and
    when it learns; its weights and Adam state stay fp32; the sampler's log-prob is the one PPO
    recomputes from the same parameters (ratio 1), so the half-precision path is self-consistent."""
    recipe = build_agent_in(precision, agent_lr=1e-3)
    curriculum = recipe.curriculum
    seen = []
    curriculum.agent.action_heads.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    rollout = rollout_for(recipe)
    log_prob, _ = chosen_log_prob(curriculum, rollout)
    torch.testing.assert_close(log_prob, rollout.sample.log_prob, rtol=1e-5, atol=1e-5)
    rollout.returns = torch.randn(rollout.lengths.shape[0])
    before = [p.detach().clone() for p in curriculum.agent.parameters()]
    curriculum.ppo_update(rollout)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen == [half] * 3  # sampling, the check above, the PPO forward
    assert all(p.dtype == torch.float32 for p in curriculum.agent.parameters())
    assert all(v.dtype == torch.float32 for s in curriculum.agent_optimizer.state.values()
               for k, v in s.items() if k != "step")
    assert all(not torch.equal(a, b) for a, b in zip(before, curriculum.agent.parameters()))


def test_fp16_agent_skips_an_overflowed_update_and_backs_off_its_loss_scale():
    recipe = build(seed=4, agent_precision="fp16", agent_lr=1e-3)
    curriculum = recipe.curriculum
    curriculum.loss_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # every gradient overflows fp16
    rollout = rollout_for(recipe)
    rollout.returns = torch.randn(rollout.lengths.shape[0])
    before = [p.detach().clone() for p in curriculum.agent.parameters()]
    curriculum.ppo_update(rollout)
    assert all(torch.equal(a, b) for a, b in zip(before, curriculum.agent.parameters()))
    assert curriculum.loss_scaler.get_scale() == 2.0 ** 59


def test_ppo_leaves_out_rows_without_a_finite_return():
    """A row whose return overflowed (fp16) must not reach the agent: the gradient equals the gradient
    of the other rows alone, and the weights stay finite."""
    import dataclasses

    from fastvl_kernels import SpanSample

    rollout = rollout_for(build(seed=5))
    with torch.no_grad():
        rollout.returns = torch.randn(rollout.lengths.shape[0])
    poisoned = dataclasses.replace(rollout, returns=rollout.returns.clone())
    poisoned.returns[0] = float("nan")
    rest = dataclasses.replace(
        rollout, image_feats=rollout.image_feats[1:], text_feats=rollout.text_feats[1:],
        text_padding=rollout.text_padding[1:], lengths=rollout.lengths[1:],
        sample=SpanSample(*(t[1:] for t in rollout.sample)),
        returns=rollout.returns[1:])
    agents = []
    for r in (poisoned, rest):
        recipe = build(seed=5, agent_lr=1e-3)
        stats = recipe.curriculum.ppo_update(r)
        assert all(torch.isfinite(v) for v in stats.values())
        assert all(torch.isfinite(p).all() for p in recipe.curriculum.agent.parameters())
        agents.append({n: p.grad for n, p in recipe.curriculum.agent.named_parameters()})
    for name, grad in agents[0].items():
        torch.testing.assert_close(grad, agents[1][name], rtol=1e-4, atol=1e-7, msg=name)


def test_running_scale_ignores_a_non_finite_layer():
    recipe = build(seed=3)
    curriculum = recipe.curriculum
    rows = torch.ones(2, 3, dtype=torch.bool)
    meter = RewardMeter(0, rows)
    meter.layers = [torch.full((2, 3), 2.0), torch.full((2, 3), 4.0)]
    curriculum.compute_return(meter, rows, rows, update_scale=True)
    torch.testing.assert_close(curriculum.reward_scale, torch.tensor([2.0, 4.0]))
    meter.layers = [torch.full((2, 3), float("inf")), torch.full((2, 3), 8.0)]
    curriculum.compute_return(meter, rows, rows, update_scale=True)
    m = curriculum.options.reward_norm_momentum
    torch.testing.assert_close(curriculum.reward_scale, torch.tensor([2.0, m * 4.0 + (1 - m) * 8.0]))


@pytest.mark.parametrize("seed", [1, 2, 3, 6])
def test_entropy_bonus_raises_the_policy_entropy(seed):
    """At the paper's learning rate (the default, 1e-4). The claim is first-order, and Adam's first step
    moves every weight by the learning rate whatever its gradient: at 1e-3 one step overshoots for
    some seeds."""
    recipe = build(seed=seed, entropy_coef=0.1, value_coef=0.0)
    curriculum = recipe.curriculum
    rollout = rollout_for(recipe, seed=seed)
    with torch.no_grad():
        rollout.returns = curriculum.run_agent(rollout.image_feats, rollout.text_feats, rollout.text_padding).value
    _, before = chosen_log_prob(curriculum, rollout)
    curriculum.ppo_update(rollout)  # advantage 0: only the entropy term moves the policy
    _, after = chosen_log_prob(curriculum, rollout)
    assert after.mean() > before.mean()


def test_value_follows_the_returns_growth_with_the_masked_count():
    """G sums the reward over the masked tokens, so it grows with the caption. Trained on captions of
    11-14 tokens with G = 2 m + 1 (m = the quota's count), V predicts G for captions of 7-20 tokens it
    never saw: the value head scales by m instead of guessing the length from a mean-pooled state."""
    from fastvl_kernels.span_sampling import quota_counts

    recipe = build(seed=4, entropy_coef=0.0, value_coef=1.0, agent_lr=1e-2)
    curriculum = recipe.curriculum

    def rollout_with_return(batch, step):
        _, image_feats, text_feats, _ = recipe.shared_features(batch, need_itc=False)
        rollout = curriculum.select(image_feats, text_feats, batch.attention_mask, step=step).rollout
        masked = quota_counts(rollout.lengths, curriculum.options.quota, batch.attention_mask.shape[1] - 1)
        rollout.returns = 2.0 * masked.float() + 1.0
        return rollout

    train = [rollout_with_return(make_batch(seed), seed) for seed in range(3)]
    for update in range(60):
        curriculum.ppo_update(train[update % len(train)])
    for length in (10, 20):
        unseen = rollout_with_return(make_batch(9, length=length), 9)
        with torch.no_grad():
            value = curriculum.run_agent(unseen.image_feats, unseen.text_feats, unseen.text_padding).value
        torch.testing.assert_close(value, unseen.returns, atol=0.5, rtol=0.0)


def test_agent_never_trains_the_backbone_and_learns_one_batch_behind():
    recipe = build(seed=7, update_delay=1).train()
    backbone_before = {k: v.clone() for k, v in recipe.backbone.state_dict().items()}
    agent_before = {k: v.clone() for k, v in recipe.curriculum.agent.state_dict().items()}
    recipe(make_batch(1))
    recipe.after_step(1)
    assert len(recipe.curriculum.pending) == 1  # batch 1's rollout waits for step 2
    assert all(torch.equal(v, agent_before[k]) for k, v in recipe.curriculum.agent.state_dict().items())
    recipe(make_batch(2))
    recipe.after_step(2)
    assert len(recipe.curriculum.pending) == 1 and recipe.curriculum.pending[0].step == 1
    assert any(not torch.equal(v, agent_before[k]) for k, v in recipe.curriculum.agent.state_dict().items())
    assert all(torch.equal(v, backbone_before[k]) for k, v in recipe.backbone.state_dict().items())
    assert all(p.grad is None for p in recipe.backbone.parameters())  # no main-model gradient from the agent
    assert not any(n.startswith("curriculum") for n, _ in recipe.named_parameters())  # DeepSpeed never sees it


@pytest.mark.parametrize("delay", [0, 1])
def test_ppo_starts_from_the_parameters_that_sampled_the_following_batch(delay, monkeypatch):
    """The schedule: with update_delay=1 the update on batch t-1's rollout starts from the parameters
    that sampled batch t (so it can run beside the main model's step t); with 0 the update on batch t
    starts from the parameters that sampled batch t. A step logs the statistics of an update that
    finished before it sampled."""
    recipe = build(seed=7, update_delay=delay).train()
    curriculum = recipe.curriculum
    flat = lambda: torch.cat([p.detach().flatten().clone() for p in curriculum.agent.parameters()])  # noqa: E731
    sampled_with, learned_from = {}, {}
    select, ppo_update = type(curriculum).select, type(curriculum).ppo_update

    def recording_select(self, image_feats, text_feats, attention_mask, step, random=False):
        if not random:  # not the random-mask diagnostic
            sampled_with[step] = flat()
        return select(self, image_feats, text_feats, attention_mask, step, random=random)

    def recording_update(self, rollout):
        learned_from[rollout.step] = flat()
        return ppo_update(self, rollout)

    monkeypatch.setattr(type(curriculum), "select", recording_select)
    monkeypatch.setattr(type(curriculum), "ppo_update", recording_update)
    logged = []
    for step in range(4):
        logged.append(float(recipe(make_batch(step))["agent_value_loss"]))
        recipe.after_step(step + 1)
    assert sorted(learned_from) == list(range(4 - delay))
    for step, params in learned_from.items():
        assert torch.equal(params, sampled_with[step + delay])
    assert logged[:1 + delay] == [0.0] * (1 + delay) and all(v > 0 for v in logged[1 + delay:])


def test_gradient_accumulation_every_micro_batch_is_a_batch_for_the_agent(monkeypatch):
    """With train.grad_accum=2 each micro-batch has its own draw key (its masks differ from its sibling's
    on the same captions) and the agent learns one micro-batch behind."""
    recipe = build("train.grad_accum=2", seed=7).train()
    curriculum = recipe.curriculum
    learned, masks = [], []
    ppo_update, select = type(curriculum).ppo_update, type(curriculum).select

    def recording_update(self, rollout):
        learned.append(rollout.step)
        return ppo_update(self, rollout)

    def recording_select(self, *args, **kwargs):
        choice = select(self, *args, **kwargs)
        if choice.rollout is not None:  # not the random-mask diagnostic
            masks.append(choice.mask)
        return choice

    monkeypatch.setattr(type(curriculum), "ppo_update", recording_update)
    monkeypatch.setattr(type(curriculum), "select", recording_select)
    batch = make_batch(3)
    for step in range(2):
        for micro in range(2):
            recipe.micro_batch = micro
            recipe(batch)
        recipe.after_step(step + 1)
    assert learned == [0, 1, 2] and [ro.step for ro in curriculum.pending] == [3]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[2], masks[3])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_state_dict_restores_agent_optimizer_and_pending_rollout(precision):
    recipe = build(seed=8, agent_precision=precision).train()
    for step in range(3):
        recipe(make_batch(step))
        recipe.after_step(step + 1)
    state = recipe.state_dict()
    fresh = build(seed=99, agent_precision=precision).train()
    fresh.load_state_dict(state)
    a, b = recipe.curriculum, fresh.curriculum
    if precision == "fp16":  # the loss scale moved (the first updates overflow at torch's initial scale)
        assert a.loss_scaler.state_dict() == b.loss_scaler.state_dict()
        assert a.loss_scaler.get_scale() < torch.amp.GradScaler("cpu").get_scale()
    else:
        assert a.loss_scaler is None and b.loss_scaler is None
    for (k, v), (_, w) in zip(a.agent.state_dict().items(), b.agent.state_dict().items()):
        assert torch.equal(v, w), k
    sa, sb = a.agent_optimizer.state_dict(), b.agent_optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for key in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(sa["state"][key][name]), torch.as_tensor(sb["state"][key][name]))
    assert len(a.pending) == len(b.pending) == 1
    for x, y in zip(a.pending[0].sample, b.pending[0].sample):
        assert torch.equal(x, y)
    assert torch.equal(a.pending[0].returns, b.pending[0].returns)
    torch.testing.assert_close(a.reward_scale, b.reward_scale)
    # both continue identically: same masks, same PPO update
    batch = make_batch(10)
    out_a, out_b = recipe(batch), fresh(batch)
    for name in ("loss", "reward", "policy_entropy"):
        torch.testing.assert_close(out_a[name], out_b[name])
    recipe.after_step(4)
    fresh.after_step(4)
    for (k, v), (_, w) in zip(a.agent.state_dict().items(), b.agent.state_dict().items()):
        torch.testing.assert_close(v, w)


def test_each_rank_resumes_its_own_rollout():
    """ZeRO 0-2 write the module state (with rank 0's pending rollout in the agent's extra state) from
    rank 0 only; the trainer saves every rank's ``rank_state`` beside it. A rank that loads rank 0's
    module state and then its own rank state has rank 0's agent (the same on every rank in a real
    run) and its own rollout, reward scale and metrics."""
    rank0, rank1 = build(seed=8).train(), build(seed=8).train()
    for step in range(2):  # each rank sees its own slice of the data
        rank0(make_batch(step))
        rank1(make_batch(10 + step))
        for recipe in (rank0, rank1):
            recipe.after_step(step + 1)
    module_state, own = rank0.state_dict(), rank1.rank_state()
    assert set(own) == {"curriculum"}
    resumed = build(seed=99).train()
    resumed.load_state_dict(module_state)
    resumed.load_rank_state(own)
    mine, theirs, got = rank1.curriculum, rank0.curriculum, resumed.curriculum
    for (name, w), v in zip(theirs.agent.state_dict().items(), got.agent.state_dict().values()):
        assert torch.equal(w, v), name
    assert len(got.pending) == 1 and got.pending[0].step == mine.pending[0].step
    for x, y in zip(got.pending[0].sample, mine.pending[0].sample):
        assert torch.equal(x, y)
    assert torch.equal(got.pending[0].text_feats, mine.pending[0].text_feats)
    assert not torch.equal(got.pending[0].text_feats, theirs.pending[0].text_feats)
    torch.testing.assert_close(got.reward_scale, mine.reward_scale)
    assert float(got.last_metrics["agent_value_loss"]) == float(mine.last_metrics["agent_value_loss"])


def test_a_checkpoint_from_before_the_count_scaled_value_head_loads_with_its_value():
    """Checkpoints whose value head had one output (V = head(state)) load with a = 0, b = that V: the
    agent values every state as before, and PPO continues from the padded Adam moments. The agent
    computes in fp32 here so the hook's V and the agent's match exactly on CPUs with native bf16 too."""
    recipe = build(seed=8, agent_precision="fp32").train()
    for step in range(2):
        recipe(make_batch(step))
    curriculum = recipe.curriculum
    old = curriculum.agent_state()
    for name in ("value_head.2.weight", "value_head.2.bias"):  # keep b's row, as an old one-output head
        old["agent"][name] = old["agent"][name][1:].clone()
    names = [name for name, _ in curriculum.agent.named_parameters()]
    for name in ("value_head.2.weight", "value_head.2.bias"):
        moment = old["optimizer"]["state"][names.index(name)]
        for key in ("exp_avg", "exp_avg_sq"):
            moment[key] = moment[key][1:].clone()
    pooled_value = {}

    def capture(module, args, out):  # the old V: the head's single output on the pooled state
        pooled_value["v"] = torch.nn.functional.linear(args[0], old["agent"]["value_head.2.weight"],
                                                       old["agent"]["value_head.2.bias"]).squeeze(-1)

    fresh = build(seed=99, agent_precision="fp32").train()
    fresh.curriculum.load_agent_state(old)
    fresh.curriculum.agent.value_head[2].register_forward_hook(capture)
    rollout = fresh.curriculum.pending[0]
    with torch.no_grad():
        value = fresh.curriculum.run_agent(rollout.image_feats, rollout.text_feats, rollout.text_padding).value
    torch.testing.assert_close(value, pooled_value["v"])
    rollout.returns = torch.randn_like(rollout.returns)
    fresh.curriculum.ppo_update(rollout)  # the padded moments fit the parameters
    assert all(torch.isfinite(p).all() for p in fresh.curriculum.agent.parameters())


@pytest.mark.parametrize("option, trained, asked, options", [
    ("agent_image_rows", "updated", "fixed", dict(agent_layers=2)),
    ("agent_image_input", "linear", "norm", {}),
])
def test_an_agent_resumes_only_in_the_mode_it_was_trained_in(option, trained, asked, options):
    """With fixed or updated image rows the same weights compute a different function, and a LayerNorm
    and a Linear image input have different weights: a checkpoint names its mode, and one from before
    the option (joint layers, a Linear) stops with the option to set rather than loading silently or
    failing on a shape."""
    state = build(seed=3, **options, **{option: trained}).curriculum.agent_state()
    assert state[option] == trained
    with pytest.raises(ConfigError, match=f"{option}='{trained}'"):
        build(seed=4, **options, **{option: asked}).curriculum.load_agent_state(state)
    del state[option]  # as written before the option existed
    with pytest.raises(ConfigError, match=f"{option}='{trained}'"):
        build(seed=4, **options, **{option: asked}).curriculum.load_agent_state(state)
    resumed = build(seed=4, **options, **{option: trained}).curriculum
    resumed.load_agent_state(state)
    for name, value in resumed.agent.state_dict().items():
        assert torch.equal(value, state["agent"][name]), name
    same = build(seed=3, **options, **{option: asked}).curriculum.agent_state()
    assert same[option] == asked
    build(seed=4, **options, **{option: asked}).curriculum.load_agent_state(same)


def test_a_one_layer_agent_resumes_in_either_image_row_mode():
    """With one layer fixed and updated image rows are the same function: both load."""
    one_layer = build(seed=3, agent_layers=1, agent_image_rows="updated").curriculum.agent_state()
    build(seed=4, agent_layers=1, agent_image_rows="fixed").curriculum.load_agent_state(one_layer)


# -- composition: the curriculum as MAMO's text-view policy ------------------------------------------


def test_curriculum_drives_mamos_text_view():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny_mamo.json", ["method.text_masking=curriculum", "method.losses.mrm=0",
                                                 "method.losses.mim=0", "method.losses.itm=0"])
    recipe = build_method(cfg).train()
    policy = recipe.text_masking
    assert policy.host is recipe and not any(n.startswith("text_masking") for n, _ in recipe.named_parameters())
    agent_before = {k: v.clone() for k, v in policy.agent.state_dict().items()}
    optimizer = torch.optim.AdamW(recipe.parameters(), lr=1e-4)
    batch = make_batch(0)
    words = batch.attention_mask.sum(1) - 2
    for step in range(3):
        out = recipe(batch)
        assert math.isfinite(float(out["mlm"]))
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
        recipe.after_step(step + 1)
        choice_mask = policy.armed[0].mask
        assert choice_mask.sum(1).tolist() == torch.ceil(words * cfg.method.mlm_probability).long().tolist()
        # the one-shot observer saw exactly the text view's fused pass and disarmed itself
        assert len(policy.armed[1].layers) == len(policy._fusion_attention())
        assert all(m.observer is None for m in recipe.backbone.modules() if hasattr(m, "observer"))
    # episodes 1 and 2 were closed by the following calls and learned right after those calls sampled
    # (update_delay=1); episode 3 waits for its reward
    assert not policy.pending and policy.armed is not None and "agent_value_loss" in policy.last_metrics
    # the host logs the policy's report: the return of the episode closed at step 3, the PPO statistics
    logged = {k.split("/", 1)[1]: v for k, v in out.items() if k.startswith("text_masking/")}
    assert set(logged) == {"reward", "agent_value_loss", "agent_policy_loss", "agent_entropy",
                           "agent_clip_fraction", "agent_advantage"}
    assert float(logged["reward"]) > 0 and float(logged["agent_value_loss"]) > 0
    assert any(not torch.equal(v, agent_before[k]) for k, v in policy.agent.state_dict().items())
    assert "text_masking._extra_state" in recipe.state_dict()


# -- SCS ----------------------------------------------------------------------------------------------


def test_scs_is_one_without_image_interaction_and_below_one_with_it():
    from fastvl.eval.scs import scs_mask, swapped_context_similarity

    batches = [make_batch(0), make_batch(1)]
    blind = build("model.fusion_layers=0", backbone="albef")  # fusion = identity: text never sees the image
    result = swapped_context_similarity(blind, batches, MASK_ID)
    assert result["scs"] == pytest.approx(1.0, abs=1e-5) and result["tokens"] >= len(batches) * B
    for backbone in ("multiway", "albef"):
        assert swapped_context_similarity(build(backbone=backbone), batches, MASK_ID)["scs"] < 1 - 1e-5  # tiny at init, but real
    mask = scs_mask(batches[0].attention_mask, 0.15, torch.Generator().manual_seed(0))
    words = batches[0].attention_mask.sum(1) - 2
    position = torch.arange(L)
    assert (mask.sum(1) >= 1).all() and not (mask & ((position < 1) | (position > words[:, None]))).any()


# -- reward headroom ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["multiway", "albef"])
def test_reward_headroom_measures_the_spread_of_random_masks(backbone):
    from fastvl.eval.reward_headroom import reward_headroom

    batches = [make_batch(0), make_batch(1)]
    result = reward_headroom(build(backbone=backbone, seed=3), batches, masks=4)
    assert result["captions"] == 2 * B and result["masks"] == 4
    assert result["worst_over_mean"] < 1 < result["best_over_mean"]  # the draws differ, and so do their returns
    assert result["spread"] > 0 and result["learned_over_random"] > 0
    assert not result["agent_restored"]  # a fresh agent: no reward scale yet
    assert reward_headroom(build(backbone=backbone, seed=3), batches, masks=4) == result  # seeded draws
    one = reward_headroom(build(backbone=backbone, seed=3), batches, masks=1)
    assert one["best_over_mean"] == one["worst_over_mean"] == 1 and one["spread"] == 0


def test_reward_headroom_names_a_recipe_without_an_agent():
    from fastvl.eval.reward_headroom import reward_headroom

    with pytest.raises(ConfigError, match="C-Mask checkpoint"):
        reward_headroom(build_recipe("configs/tiny_albef.json"), [make_batch(0)])


# -- end to end on the built-in data ------------------------------------------------------------------


def run_config(synth, out_dir, *overrides):
    return cmask_config(*quick_run(synth, out_dir, *overrides))


def test_losses_fall_on_builtin_data(synth, tmp_path):
    from fastvl.train.loop import train

    cfg = run_config(synth, tmp_path / "run", "train.steps=30", "train.lr=5e-4", "train.precision=fp32",
                     "method.options.random_reward_every=5")
    rows = read_rows(train(cfg, progress=False).metrics)
    assert len(rows) == 30

    def mean(name, part):
        return sum(r[name] for r in part) / len(part)

    first, last = rows[:5], rows[-5:]
    assert mean("glm", last) < 0.85 * mean("glm", first)
    assert mean("itc", last) < mean("itc", first)
    assert all(math.isfinite(r[k]) for r in rows for k in ("reward", "reward_random", "policy_entropy",
                                                           "agent_value_loss", "agent_clip_fraction"))
    assert rows[-1]["agent_value_loss"] > 0  # the agent has been learning


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_resume_restores_the_agent(synth, tmp_path, grad_accum):
    """3 steps straight vs 2 steps + resume: the third step's losses and agent metrics match. With
    gradient accumulation the agent learns one micro-batch behind, so the checkpoint holds the last
    micro-batch's rollout and the draw keys count micro-batches."""
    from fastvl.train.loop import train

    common = ("train.steps=3", "train.precision=fp32", "data.batch_size=4", "method.options.random_reward_every=1",
              f"train.grad_accum={grad_accum}")
    straight = read_rows(train(run_config(synth, tmp_path / "a", *common), progress=False).metrics)
    train(run_config(synth, tmp_path / "b", *common, "train.save_every=1"), progress=False, stop_at=2)
    resumed = read_rows(train(run_config(synth, tmp_path / "b", *common, "train.resume=true"), progress=False).metrics)
    saved = torch.load(tmp_path / "b" / "step_2" / "mp_rank_00_model_states.pt", weights_only=False)
    assert len(saved["ranks"][0]["recipe"]["curriculum"]["pending"]) == 1  # the rank's rollout, saved per rank
    last_straight, last_resumed = straight[-1], [r for r in resumed if r["step"] == 3][0]
    for name in ("loss", "glm", "reward", "policy_entropy", "agent_value_loss", "agent_policy_loss"):
        assert last_resumed[name] == pytest.approx(last_straight[name], rel=1e-4, abs=1e-5), name


def test_two_process_resume_matches_a_straight_run(synth, tmp_path):
    """2 processes through the deepspeed launcher (ZeRO-2): 4 steps straight vs 2 steps, then resume to
    4. Each rank's pending rollout and reward scale must come back to that rank (rank 1 learning from
    rank 0's rollout changes the averaged PPO update at step 3, and so step 4's masks and losses)."""
    import subprocess

    from tests.train.test_distributed import LAUNCHER, clean_env
    from tests.two_ranks import free_port

    if not LAUNCHER.exists():
        pytest.skip("the deepspeed launcher is not installed next to this interpreter")
    root = Path(__file__).resolve().parents[2]

    def launch(out_dir, *overrides):
        sets = quick_run(synth, out_dir, "data.batch_size=4", "train.precision=fp32", "train.zero_stage=2",
                         "train.warmup_steps=1", "train.min_lr_ratio=1.0",  # the LR does not depend on train.steps
                         "method.options.random_reward_every=1", *overrides)
        command = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "fastvl.train",
                   "--config", CONFIG, "--set", *sets]
        done = subprocess.run(command, cwd=root, env=clean_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return read_rows(out_dir / "metrics.jsonl")

    straight = launch(tmp_path / "a", "train.steps=4")
    launch(tmp_path / "b", "train.steps=2", "train.save_every=2")
    resumed = launch(tmp_path / "b", "train.steps=4", "train.resume=true")
    assert '"world_size": 2' in (tmp_path / "b" / "run.json").read_text()
    last_straight, last_resumed = straight[-1], resumed[-1]
    assert last_straight["step"] == last_resumed["step"] == 4
    for name in ("loss", "glm", "itc", "reward", "reward_random", "policy_entropy", "agent_value_loss",
                 "agent_policy_loss"):
        assert last_resumed[name] == pytest.approx(last_straight[name], rel=1e-4, abs=1e-5), name


def test_zero2_bf16_and_scs_cli(synth, tmp_path, capsys):
    """A bf16 main model under ZeRO-2 with a bf16 agent (what CUDA runs by default), then SCS."""
    from fastvl.train.loop import train

    cfg = run_config(synth, tmp_path / "run", "train.steps=3", "train.lr=1e-4", "train.precision=bf16",
                     "train.zero_stage=2", "data.batch_size=4", "method.options.update_delay=0",
                     'method.options.agent_precision="bf16"')
    result = train(cfg, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "bf16" and run["zero_stage"] == 2
    rows = read_rows(result.metrics)
    assert len(rows) == 3
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "itc", "glm", "reward", "agent_value_loss"))
    assert rows[-1]["agent_value_loss"] > 0
    # SCS from the ZeRO-2 checkpoint (its fp32 reconstruction has no agent state: evaluation does not need it)
    from fastvl.eval.scs import main

    assert main(["--checkpoint", str(tmp_path / "run" / "step_3"), "--data", str(synth / "heldout"),
                 "--samples", "8", "--batch-size", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < printed["scs"] <= 1 and printed["tokens"] >= 2
    # reward headroom from the same checkpoint: it has no agent state, and says so
    from fastvl.eval import reward_headroom

    assert reward_headroom.main(["--checkpoint", str(tmp_path / "run" / "step_3"), "--data", str(synth / "heldout"),
                                 "--samples", "8", "--batch-size", "4", "--masks", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["captions"] == 8 and printed["agent_restored"] is False
    assert printed["worst_over_mean"] <= 1 <= printed["best_over_mean"]

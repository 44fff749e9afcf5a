"""C-Mask's per-span agent (``method.options.agent_passes="per_span"``): one agent pass per span with
the masked positions tagged; the masks meet the quota, the log-prob stored at sampling is the one PPO
recomputes (ratio 1 before an update), with the tags switched off it is the once-per-batch action's
log-prob under ``span_action_log_prob`` (an independent oracle), PPO moves it the right way, and a
checkpoint names its mode."""
import pytest
import torch

from fastvl.config import ConfigError
from fastvl_kernels import span_action_log_prob
from tests.methods.test_cmask import build, make_batch

ORDERS = ["learned", "random", "left_to_right", "single"]


def per_span_rollout(recipe, seed=1, b=6):
    batch = make_batch(seed, b=b)
    _, image_feats, text_feats, _ = recipe.shared_features(batch, need_itc=False)
    return batch, recipe.curriculum.select(image_feats, text_feats, batch.attention_mask, step=7)


def recomputed(curriculum, rollout):
    return curriculum.per_span_passes(rollout.image_feats, rollout.text_feats, rollout.text_padding,
                                      rollout.lengths, rollout.sample)


@pytest.mark.parametrize("order", ORDERS)
def test_per_span_masks_meet_the_quota_and_ppo_recomputes_the_sampled_log_prob(order):
    recipe = build(seed=1, agent_passes="per_span", order=order)
    batch, choice = per_span_rollout(recipe)
    words = batch.attention_mask.sum(1) - 2
    assert choice.mask.sum(1).tolist() == torch.ceil(words * 0.5).long().tolist()
    position = torch.arange(batch.input_ids.shape[1])
    assert not (choice.mask & ~((position >= 1) & (position <= words[:, None]))).any()
    assert ((choice.step >= 1) == choice.mask).all()
    with torch.no_grad():
        log_prob, entropy, _ = recomputed(recipe.curriculum, choice.rollout)
    torch.testing.assert_close(log_prob, choice.rollout.sample.log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, choice.entropy, rtol=1e-5, atol=1e-5)
    _, again = per_span_rollout(recipe)
    assert torch.equal(again.mask, choice.mask) and torch.equal(again.step, choice.step)  # seeded by the step


@pytest.mark.parametrize("order", ORDERS)
def test_without_tags_every_pass_is_the_first_and_the_log_prob_is_the_one_pass_actions(order):
    """Tag vector 0: every pass computes the same p, s, q, so the per-span trajectory's log-prob and
    entropy must be the kernel's ``span_action_log_prob`` of the same action under that one pass."""
    recipe = build(seed=2, agent_passes="per_span", order=order)
    curriculum = recipe.curriculum
    with torch.no_grad():
        curriculum.agent.tag.zero_()
    _, choice = per_span_rollout(recipe, seed=3)
    ro = choice.rollout
    with torch.no_grad():
        p, s, q = curriculum.distributions(curriculum.run_agent(ro.image_feats, ro.text_feats, ro.text_padding),
                                           ro.lengths)
        oracle = span_action_log_prob(p, s, ro.lengths, 0.5, ro.sample, order_scores=q, order=order)
    torch.testing.assert_close(ro.sample.log_prob, oracle[0].float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ro.sample.entropy, oracle[1].float(), rtol=1e-5, atol=1e-4)


def test_each_pass_sees_the_spans_chosen_before_it():
    recipe = build(seed=2, agent_passes="per_span")
    _, choice = per_span_rollout(recipe)
    ro, curriculum = choice.rollout, recipe.curriculum
    first_span = torch.nn.functional.pad(ro.sample.span_id == 1, (1, 0))
    with torch.no_grad():
        untagged = curriculum.run_agent(ro.image_feats, ro.text_feats, ro.text_padding).start_logits
        tagged = curriculum.run_agent(ro.image_feats, ro.text_feats, ro.text_padding, first_span).start_logits
    assert not torch.allclose(untagged, tagged)


def test_per_span_ppo_with_positive_advantage_raises_the_chosen_action():
    options = dict(agent_passes="per_span", entropy_coef=0.0, value_coef=0.0, agent_lr=1e-3)
    recipe = build(seed=4, **options)
    _, choice = per_span_rollout(recipe, seed=2)
    ro = choice.rollout
    with torch.no_grad():
        before, _, value = recomputed(recipe.curriculum, ro)
    ro.returns = value + 1.0
    stats = recipe.curriculum.ppo_update(ro)
    assert float(stats["agent_clip_fraction"]) == 0.0  # ratio 1: the update read the sampling log-probs
    with torch.no_grad():
        after, _, _ = recomputed(recipe.curriculum, ro)
    assert (after > before).all()


def test_an_agent_resumes_only_with_its_number_of_passes():
    per_span = build(seed=3, agent_passes="per_span").curriculum.agent_state()
    assert per_span["agent_passes"] == "per_span"
    with pytest.raises(ConfigError, match="agent_passes='per_span'"):
        build(seed=4).curriculum.load_agent_state(per_span)
    build(seed=4, agent_passes="per_span").curriculum.load_agent_state(per_span)
    with pytest.raises(ConfigError, match="agent_passes must be one of"):
        build(agent_passes="twice")

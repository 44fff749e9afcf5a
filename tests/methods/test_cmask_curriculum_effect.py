"""C-Mask's curriculum effect, shown where the mask choice matters, and pinned at the recipe level.

The constructed case: captions in which three words are named by the image (ids below
``IMAGE_WORDS``, at random places) and the rest are text filler. Their per-token reward is what a
trained main model's attention gives such words (eq. 4's image flow): 1 for an image-named word, 0.1
for filler. The agent sees only the words' features (a fixed embedding per id), so it has to learn
which ids draw on the image. PPO, through the policy's own ``select`` / ``finish`` / ``learn`` cycle,
must lift the return of its masks well above that of random same-quota masks within a bounded number
of updates; before learning it is random's."""
import pytest
import torch

from fastvl.masking.curriculum import CurriculumMasking, CurriculumOptions, episode_return
from tests.methods.test_cmask import build, make_batch

WIDTH, BATCH, LENGTH, VOCAB, IMAGE_ROWS = 64, 32, 14, 50, 8
IMAGE_WORDS, NAMED = 10, 3  # ids < IMAGE_WORDS are named by the image; NAMED of them per caption
UPDATES = 60


def constructed_batch(step: int):
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(IMAGE_WORDS, VOCAB, (BATCH, LENGTH), generator=g)
    places = torch.rand(BATCH, LENGTH - 2, generator=g).argsort(1)[:, :NAMED] + 1  # words only
    ids.scatter_(1, places, torch.randint(0, IMAGE_WORDS, (BATCH, NAMED), generator=g))
    return ids, torch.ones(BATCH, LENGTH, dtype=torch.long), torch.randn(BATCH, IMAGE_ROWS, WIDTH, generator=g)


def constructed_return(ids, attention_mask, choice):
    reward = torch.where(ids < IMAGE_WORDS, 1.0, 0.1)
    reward[:, 0] = reward[:, -1] = 0.1  # [CLS] / [SEP]
    caption = attention_mask.bool()
    return episode_return(reward[None], caption, choice.mask, caption, mode="none")[1]


@pytest.mark.parametrize("agent_passes", ["once", "per_span"])
def test_ppo_lifts_the_return_above_random_masks_where_the_mask_matters(agent_passes):
    torch.manual_seed(0)
    # quota 25%: 3 of the 12 words, as many as the image names; lr 1e-3 (paper 1e-4) bounds the updates
    options = CurriculumOptions(quota=0.25, agent_layers=1, agent_lr=1e-3, agent_passes=agent_passes,
                                agent_precision="fp32")
    policy = CurriculumMasking(options, image_width=WIDTH, text_width=WIDTH, width=WIDTH, heads=4,
                               intermediate=4 * WIDTH, seed=0).train()
    embedding = torch.randn(VOCAB, WIDTH)
    learned, random = [], []
    for step in range(UPDATES):
        ids, attention_mask, image = constructed_batch(step)
        choice = policy.select(image, embedding[ids], attention_mask, step)  # learns from step-1's rollout
        returns = constructed_return(ids, attention_mask, choice)
        policy.finish(choice, returns)
        baseline = policy.select(image, embedding[ids], attention_mask, step, random=True)
        learned.append(returns.mean())
        random.append(constructed_return(ids, attention_mask, baseline).mean())
    first, last = slice(0, 5), slice(UPDATES - 10, UPDATES)
    assert torch.stack(learned[first]).mean() < 1.2 * torch.stack(random[first]).mean()  # untrained: random
    assert torch.stack(learned[last]).mean() > 1.5 * torch.stack(random[last]).mean()


@pytest.mark.parametrize("agent_passes", ["once", "per_span"])
def test_learned_mask_selection_samples_the_recipes_masks_from_p(monkeypatch, agent_passes):
    """Through the recipe's forward: with p peaked on one word (start logit +30 there, single-token
    spans, one token per caption), every caption masks that word. Uniform starts would hit it about
    once in ten captions."""
    recipe = build(seed=0, spans="none", order="single", quota=0.05,  # 1 of <= 20 words
                   agent_passes=agent_passes).train()
    target = 3
    agent = recipe.curriculum.agent

    def peaked(module, args, out):
        out.start_logits[:, target] += 30.0
        return out

    agent.register_forward_hook(peaked)
    chosen = []
    original = recipe.glm_inputs
    monkeypatch.setattr(recipe, "glm_inputs", lambda batch, choice: chosen.append(choice.mask) or original(batch, choice))
    batch = make_batch(0, b=8)
    recipe(batch)
    mask = chosen[0]
    assert mask.sum(1).tolist() == [1] * 8
    assert mask[:, target].all()

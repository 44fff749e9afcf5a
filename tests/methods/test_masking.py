import torch

from fastvl.data.tokenizer import SpecialIds
from fastvl.masking.text import IGNORE_INDEX, RandomTextMasking

SPECIAL = SpecialIds(pad=0, cls=101, sep=102, mask=103, unk=100, vocab_size=30522)


def captions(b=64, length=24):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (b, length), generator=g)
    lengths = torch.randint(6, length + 1, (b,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids[:, 0] = SPECIAL.cls
    ids[torch.arange(b), lengths - 1] = SPECIAL.sep
    ids[mask == 0] = SPECIAL.pad
    return ids, mask


def test_random_masking_rates_and_special_tokens():
    ids, mask = captions(b=2000)
    out = RandomTextMasking(SPECIAL, 0.15, (0.8, 0.1, 0.1), seed=0)(ids, mask, step=3)
    chosen = out.labels != IGNORE_INDEX
    maskable = mask.bool() & (ids != SPECIAL.cls) & (ids != SPECIAL.sep)
    assert not (chosen & ~maskable).any(), "special tokens and padding are never masked"
    rate = chosen.sum() / maskable.sum()
    assert abs(rate.item() - 0.15) < 0.01
    as_mask = (out.input_ids == SPECIAL.mask) & chosen
    kept = (out.input_ids == ids) & chosen
    assert abs(as_mask.sum().item() / chosen.sum().item() - 0.8) < 0.02
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.02  # random replacements rarely equal the original
    assert torch.equal(out.labels[chosen], ids[chosen])
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
    assert (out.input_ids[chosen & ~as_mask & ~kept] > SPECIAL.mask).all()


def test_masking_depends_on_step_and_seed_only():
    ids, mask = captions()
    policy = RandomTextMasking(SPECIAL, 0.3, (1.0, 0.0, 0.0), seed=1)
    a, b, c = policy(ids, mask, step=5), policy(ids, mask, step=5), policy(ids, mask, step=6)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_micro_batches_of_one_step_get_their_own_masks():
    """With gradient accumulation a recipe's forward keys its draws by ``draw_step`` (the step counted
    in micro-batches): two micro-batches of one step mask the same captions differently, the same
    micro-batch of the same step the same way."""
    from fastvl.data.batch import Batch

    from .conftest import build_recipe

    recipe = build_recipe("configs/tiny_albef.json", "train.grad_accum=2")
    ids, mask = captions(b=8, length=24)
    batch = Batch(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ids, mask)
    policy, seen = recipe.text_masking, []

    def recording(batch, step):
        out = policy(batch, step)
        seen.append((step, out.labels))
        return out

    recipe.text_masking = recording
    recipe.current_step = 5
    with torch.no_grad():
        for micro in (0, 1, 0):
            recipe.micro_batch = micro
            recipe(batch)
    assert [step for step, _ in seen] == [10, 11, 10]
    assert torch.equal(seen[0][1], seen[2][1]) and not torch.equal(seen[0][1], seen[1][1])

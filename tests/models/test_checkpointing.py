"""``model.grad_checkpointing``: every recipe computes the same losses and gradients with its layer
stacks checkpointed (dropout on, so the RNG replay matters), and checkpointing keeps less memory."""
from pathlib import Path

import pytest
import torch

from fastvl.data.batch import Batch
from fastvl.models.checkpointing import run_layer

from ..methods.conftest import build_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPES = {
    "albef": ("tiny_albef.json", {}),
    "maskvlm": ("tiny_maskvlm.json", {}),
    "mamo": ("tiny_mamo.json", {}),
    "epic": ("tiny_epic.json", {"masking": "random"}),
    "cmask": ("tiny_cmask.json", {}),
}


def _batch(b=4, length=12, size=64):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1000, 2000, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 8:], ids[1, 7], ids[1, 8:] = 0, 102, 0
    return Batch(torch.randn(b, 3, size, size, generator=g), ids, mask)


def _losses_and_grads(name: str, checkpointed: bool):
    config, options = RECIPES[name]
    recipe = build_recipe(str(CONFIGS / config), "model.dropout=0.1", f"model.grad_checkpointing={str(checkpointed).lower()}",
                          seed=0, **options).train()
    torch.manual_seed(1)
    with _SavedBytes() as saved:
        out = recipe(_batch())
    out["loss"].backward()
    losses = {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    grads = {n: p.grad for n, p in recipe.named_parameters() if p.grad is not None}
    return losses, grads, saved.bytes


class _SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the bytes autograd keeps for the backward pass (parameters included)."""

    def __init__(self):
        self.bytes = 0

        def pack(t):
            self.bytes += t.numel() * t.element_size()
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_checkpointed_stacks_give_the_same_losses_and_gradients(name):
    plain_losses, plain_grads, plain_saved = _losses_and_grads(name, False)
    losses, grads, saved = _losses_and_grads(name, True)
    print(f"{name}: kept for backward {saved / 2**20:.1f} vs {plain_saved / 2**20:.1f} MiB")
    assert saved < 0.6 * plain_saved
    assert losses.keys() == plain_losses.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], plain_losses[key], rtol=1e-6, atol=1e-6, msg=key)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for key in grads:
        torch.testing.assert_close(grads[key], plain_grads[key], rtol=1e-5, atol=1e-6, msg=key)


def test_without_autograd_recording_a_layer_runs_plainly():
    layer = torch.nn.Linear(8, 8)
    with torch.no_grad(), _SavedBytes() as saved:
        out = run_layer(layer, True, torch.randn(2, 8))
    assert saved.bytes == 0 and out.grad_fn is None

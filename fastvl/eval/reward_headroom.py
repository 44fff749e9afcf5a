"""Reward headroom of C-Mask's agent: how much the choice of mask moves the episode return G on some
data, and where the checkpoint's learned policy lands.

For every caption, G (the recipe's own reward: eq. 4 through the model's attention, section 3.3's
return, the checkpoint's running layer scale) of ``masks`` random masks of the agent's quota (uniform
starts, the run's span and order modes, as the ``reward_random`` diagnostic draws them) and of one
mask sampled by the learned policy. Reported, as means over captions:

- ``best_over_mean``: best random G / mean random G, what a policy that always found the best of
  ``masks`` random masks would gain (near 1: the reward barely depends on the mask, so the agent has
  little to learn);
- ``worst_over_mean`` and ``spread`` (standard deviation of the random G over their mean);
- ``learned_over_random``: the learned policy's G / mean random G;
- ``agent_restored``: False when the checkpoint holds no agent state (a ZeRO 1-3 fp32
  reconstruction keeps parameters only), so the "learned" policy is an untrained one.

    python -m fastvl.eval.reward_headroom --checkpoint RUN_DIR --data data/synth/heldout [--samples 64 --masks 16]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Optional, Sequence

import torch
from tqdm import tqdm

from ..config import ConfigError
from ..data.batch import Batch


@torch.no_grad()
def reward_headroom(recipe, batches: Iterable[Batch], masks: int = 16, seed: int = 0,
                    progress: bool = False) -> dict:
    """The module docstring's statistics over ``batches`` (``masks`` >= 1 random masks per caption)."""
    if not hasattr(recipe, "episode_returns"):
        raise ConfigError("reward headroom needs a C-Mask checkpoint (method.name='cmask')")
    if masks < 1:
        raise ConfigError("--masks must be at least 1")
    recipe.eval()
    agent_restored = recipe.curriculum.reward_scale is not None  # set by every trained step, saved with the agent
    randoms, learned = [], []
    draw = seed * 1_000_003
    for batch in tqdm(batches, desc="reward headroom", unit="batch", disable=not progress):
        _, *features = recipe.shared_features(batch, need_itc=False)  # the same for every mask of the batch
        per_mask = []
        for _ in range(masks):
            per_mask.append(recipe.episode_returns(batch, *features, draw, random=True))
            draw += 1
        randoms.append(torch.stack(per_mask))  # [masks, B]
        learned.append(recipe.episode_returns(batch, *features, draw, random=False))
        draw += 1
    if not randoms:
        raise ConfigError("reward headroom read no batch")
    g = torch.cat(randoms, 1)
    mean = g.mean(0)
    keep = mean > 0  # captions without words have G = 0 for every mask
    if not keep.any():
        raise ConfigError("every caption's return is 0 (no words to mask?)")
    g, mean, learned_g = g[:, keep], mean[keep], torch.cat(learned)[keep]
    spread = g.std(0, correction=0) / mean
    return {"captions": int(keep.sum()), "masks": masks, "random_return": float(mean.mean()),
            "learned_return": float(learned_g.mean()),
            "best_over_mean": float((g.amax(0) / mean).mean()), "worst_over_mean": float((g.amin(0) / mean).mean()),
            "spread": float(spread.mean()), "learned_over_random": float((learned_g / mean).mean()),
            "agent_restored": agent_restored}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvl.eval.reward_headroom",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="a C-Mask run directory, step_<N> folder, model.safetensors or an exported folder")
    parser.add_argument("--data", required=True, help="image-caption data (shards folder or JSONL)")
    parser.add_argument("--samples", type=int, default=64, help="samples read at most")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--masks", type=int, default=16, help="random masks per caption")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .loading import recipe_and_batches

        if args.samples < 1 or args.batch_size < 1:
            raise ConfigError("--samples and --batch-size must be at least 1")
        recipe, _, step, batches = recipe_and_batches(args.checkpoint, args.data, args.samples, args.batch_size)
        result = reward_headroom(recipe, batches, args.masks, args.seed, progress=True)
    except ConfigError as error:
        print(f"python -m fastvl.eval.reward_headroom: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "step": step, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

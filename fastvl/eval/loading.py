"""What every checkpoint-reading eval CLI starts from: the recipe a checkpoint was trained with and
batches of some other data in eval order."""
from __future__ import annotations


def recipe_and_batches(checkpoint: str, data: str, samples: int, batch_size: int):
    """(recipe in eval mode, its config, its step, batches of at most ``samples`` samples of ``data``:
    the eval transform (``eval.resize``), no shuffling, no hard negatives, no loader workers)."""
    from ..data.loader import build_loader
    from ..train.checkpoint import load_recipe

    recipe, cfg, step = load_recipe(checkpoint)
    cfg.data.eval, cfg.data.batch_size, cfg.data.num_workers = data, batch_size, 0
    return recipe, cfg, step, build_loader(cfg, "eval", max_samples=samples, with_negatives=False)

"""Recipes by name. A recipe = backbone + masking policy + objectives + loss weights."""
from __future__ import annotations

from ..config import ConfigError, RunConfig
from .base import Recipe


def _lazy(module: str, name: str):
    def load():
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{module}"), name)

    return load


RECIPES = {
    "albef": _lazy("albef", "Albef"),
    "maskvlm": _lazy("maskvlm", "MaskVLM"),
    "mamo": _lazy("mamo", "Mamo"),
    "epic": _lazy("epic", "Epic"),
    "cmask": _lazy("cmask", "CMask"),
}


def build_method(cfg: RunConfig) -> Recipe:
    if cfg.method.name not in RECIPES:
        raise ConfigError(f"method.name: unknown recipe '{cfg.method.name}' (known: {', '.join(sorted(RECIPES))})")
    recipe = RECIPES[cfg.method.name]()(cfg)
    freeze(recipe, cfg.train.freeze)
    return recipe


def freeze(recipe: Recipe, prefixes: tuple[str, ...]) -> None:
    """Turn off ``requires_grad`` for the parameters under each name prefix (``train.freeze``)."""
    params = dict(recipe.named_parameters())
    for prefix in prefixes:
        matched = [p for name, p in params.items() if name == prefix or name.startswith(prefix + ".")]
        if not matched:
            tops = sorted({".".join(name.split(".")[:2]) for name in params})
            raise ConfigError(f"train.freeze: no parameter of recipe '{recipe.cfg.method.name}' is named "
                              f"{prefix!r} or starts with '{prefix}.' (e.g. {', '.join(tops)})")
        for param in matched:
            param.requires_grad_(False)

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
    return RECIPES[cfg.method.name]()(cfg)

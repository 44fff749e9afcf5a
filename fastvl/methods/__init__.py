"""Recipes by name. A recipe = backbone + masking policy + objectives + loss weights."""
from __future__ import annotations

from ..config import ConfigError, RunConfig
from .base import Recipe


def _albef():
    from .albef import Albef

    return Albef


RECIPES = {"albef": _albef}


def build_method(cfg: RunConfig) -> Recipe:
    if cfg.method.name not in RECIPES:
        raise ConfigError(f"method.name: unknown recipe '{cfg.method.name}' (known: {', '.join(sorted(RECIPES))})")
    return RECIPES[cfg.method.name]()(cfg)

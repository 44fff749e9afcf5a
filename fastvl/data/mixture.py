"""Dataset mixtures: ``data.train`` as a list of sources with weights.

``data.train`` is either one path (a folder, glob / brace pattern, file or URL: one source) or a list
of ``{"path": ..., "weight": w, "name": optional}`` entries. A mixture is read by the streaming
reader (``fastvl.data.streaming``, local shards included): each source keeps its own shard order,
shuffle buffer and position, and every sample is drawn from source ``i`` with probability
``w_i / sum(w)`` by a seeded generator, so the mix, like the order, is a pure function of the seed
and resumes exactly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..config import ConfigError

ENTRY_KEYS = ("path", "weight", "name")


@dataclass(frozen=True)
class TrainSource:
    path: Union[str, list]
    """What ``data.train`` names for this source: a folder, glob / brace pattern, file or URL (or a list)."""
    weight: float = 1.0
    name: str = "0"
    """Label of the source in the checkpoint and the metrics log (``data/source/<name>``)."""


def is_mixture(spec: Any) -> bool:
    """True when ``data.train`` is a list of ``{"path", "weight"}`` entries."""
    return isinstance(spec, (list, tuple)) and any(isinstance(entry, dict) for entry in spec)


def train_sources(spec: Any, where: str = "data.train") -> list[TrainSource]:
    """``data.train`` as sources; a ``ConfigError`` naming ``where`` and the entry for anything else
    than a path or a list of ``{"path": str | [str], "weight": positive number, "name": str}``."""
    if isinstance(spec, (str, os.PathLike)):
        return [TrainSource(os.fspath(spec), 1.0, "0")]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"{where} must be a path or a non-empty list of {{\"path\": ..., \"weight\": ...}} "
                          f"entries, got {spec!r}")
    if not is_mixture(spec):  # a plain list of paths: one source, as ShardSource reads it
        if not all(isinstance(item, (str, os.PathLike)) for item in spec):
            raise ConfigError(f"{where}: a list must hold either paths or {{\"path\", \"weight\"}} entries")
        return [TrainSource([os.fspath(item) for item in spec], 1.0, "0")]
    sources = []
    for i, entry in enumerate(spec):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be a {{\"path\": ..., \"weight\": ...}} mapping, got {entry!r}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise ConfigError(f"{at}: unknown key(s) {unknown} (known: {', '.join(ENTRY_KEYS)})")
        path = entry.get("path")
        if not (isinstance(path, str) and path) and not (
                isinstance(path, list) and path and all(isinstance(p, str) for p in path)):
            raise ConfigError(f"{at}.path must be a path or a list of paths, got {path!r}")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{at}.weight must be a positive number, got {weight!r}")
        name = entry.get("name", str(i))
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{at}.name must be a non-empty string without '/', got {name!r}")
        sources.append(TrainSource(path, float(weight), name))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: source names must differ, got {names}")
    return sources


class SourceMixer:
    """Which source each next sample comes from: source ``i`` with probability ``w_i / sum(w)``, from
    a generator of (seed, reader), so the draws are reproducible and resumable (``state_dict``)."""

    def __init__(self, weights: list[float], seed: int, reader: int):
        self.cumulative = np.cumsum(np.asarray(weights, dtype=np.float64) / float(sum(weights)))
        self.rng = np.random.default_rng([seed, reader, 0x313])

    def next(self) -> int:
        if len(self.cumulative) == 1:
            return 0
        return min(int(np.searchsorted(self.cumulative, self.rng.random(), side="right")), len(self.cumulative) - 1)

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state

"""Reading pretrained weights from disk, for the loaders of ``model.text_init`` and ``model.image_init``.

Only tensors are ever read: ``.safetensors`` files hold nothing else, and pickled ``.pth``/``.bin`` files
go through ``torch.load(weights_only=True)``, which refuses any pickle that would build an arbitrary
object (and so could run code). Nothing is fetched from a hub.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ConfigError


def read_tensor_file(path: Path, setting: str) -> dict[str, torch.Tensor]:
    """The state dict in one file; a ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper is opened.
    ``setting`` (the config key that named the file) starts every error message."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler's refusal of anything but tensors and containers
        raise ConfigError(f"{setting}: {path} is not a plain tensor state dict; it is read with "
                          f"torch.load(weights_only=True), which refused it: {error}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(wrapper), dict):
            loaded = loaded[wrapper]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ConfigError(f"{setting}: {path} does not hold a state dict of tensors")
    return loaded


def read_folder_tensors(folder: Path, setting: str) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face model folder: ``model.safetensors``, its shards
    (``model.safetensors.index.json``) or ``pytorch_model.bin``."""
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ConfigError(f"{setting}: {folder} holds no model.safetensors or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_tensor_file(path, setting))
    return state

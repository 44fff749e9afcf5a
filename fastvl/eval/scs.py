"""Swapped-context similarity (SCS, C-Mask Fig. 1a): how much masked-token representations depend on
the image.

For a caption with masked words (BERT-style [MASK] in place, ``mask_probability`` of the words, at
least one per caption, drawn from a seeded generator) the fused representation ``h_t(image)`` of
every masked position ``t`` is computed twice: with the true image and with a *swapped* image (the
batch's images rolled by one, so every caption gets another sample's image). Then

    SCS = mean over masked tokens of cos(h_t(true image), h_t(swapped image))

A model whose masked-token predictions ignore the image scores 1; lower means more cross-modal
interaction. Works for recipes whose ``backbone`` is a ``MultiwayModel`` (fused pass over
``[image | text]``) or an ``AlbefModel`` (text encoder + fusion encoder), i.e. cmask on either
backbone and the ALBEF-layout recipes.

    python -m fastvl.eval.scs --checkpoint RUN_DIR --data data/synth/heldout [--samples 256]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..data.batch import Batch
from ..models.albef import AlbefModel
from ..models.multiway import MultiwayModel


def masked_fused_states(backbone, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Fused states [n, W] at the ``mask`` [B, L] positions, with [MASK] in place."""
    ids = torch.where(mask, torch.full_like(input_ids, mask_id), input_ids)
    if isinstance(backbone, MultiwayModel):
        image = backbone.embed_image(images)
        states = backbone.encode_joint(image, backbone.embed_text(ids), attention_mask.bool())[:, image.shape[1]:]
    elif isinstance(backbone, AlbefModel):
        image_states = backbone.encode_image(images)
        states = backbone.fuse(backbone.encode_text(ids, attention_mask), attention_mask, image_states)
    else:
        raise ConfigError(f"SCS needs a multiway or ALBEF backbone, got {type(backbone).__name__}")
    return states[mask]


def scs_mask(attention_mask: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random words (columns 1 .. n-2 of [CLS] words [SEP]), ``probability`` each, at least one per caption."""
    b, length = attention_mask.shape
    words = attention_mask.long().sum(1) - 2
    position = torch.arange(length)
    inside = (position >= 1) & (position <= words.cpu()[:, None])
    u = torch.rand(b, length, generator=generator)
    mask = inside & (u < probability)
    # guarantee one masked word per caption with words: the word with the smallest draw
    first = torch.where(inside, u, 2.0).argmin(1)
    mask[torch.arange(b), first] |= words.cpu() > 0
    return mask.to(attention_mask.device)


@torch.no_grad()
def swapped_context_similarity(recipe, batches: Iterable[Batch], mask_id: int, mask_probability: float = 0.15,
                               seed: int = 0) -> dict:
    """{"scs": mean cosine (true vs swapped image) over masked tokens, "tokens": count, "scs_std": std}."""
    recipe.eval()
    backbone = recipe.backbone
    dtype = next(backbone.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    cosines = []
    for batch in batches:
        if len(batch) < 2:
            continue
        mask = scs_mask(batch.attention_mask, mask_probability, generator)
        images = batch.images.to(dtype)
        true = masked_fused_states(backbone, images, batch.input_ids, batch.attention_mask, mask, mask_id)
        swapped = masked_fused_states(backbone, images.roll(1, dims=0), batch.input_ids, batch.attention_mask, mask,
                                      mask_id)
        cosines.append(F.cosine_similarity(true.float(), swapped.float(), dim=-1))
    if not cosines:
        raise ConfigError("SCS needs batches of at least 2 samples")
    values = torch.cat(cosines)
    return {"scs": float(values.mean()), "scs_std": float(values.std()) if values.numel() > 1 else 0.0,
            "tokens": int(values.numel())}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvl.eval.scs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True,
                        help="run directory, step_<N> folder, model.safetensors or an exported folder")
    parser.add_argument("--data", required=True, help="image-caption data (shards folder or JSONL)")
    parser.add_argument("--samples", type=int, default=256, help="samples read at most")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--mask-probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..masking import special_tokens
        from .loading import recipe_and_batches

        if args.samples < 2 or args.batch_size < 2:
            raise ConfigError("--samples and --batch-size must be at least 2")
        if not 0.0 < args.mask_probability < 1.0:
            raise ConfigError("--mask-probability must be in (0, 1)")
        recipe, cfg, step, batches = recipe_and_batches(args.checkpoint, args.data, args.samples, args.batch_size)
        result = swapped_context_similarity(recipe, batches, special_tokens(cfg).mask, args.mask_probability,
                                            args.seed)
    except ConfigError as error:
        print(f"python -m fastvl.eval.scs: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "step": step, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

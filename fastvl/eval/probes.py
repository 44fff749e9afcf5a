"""ARO-style probes: does the model prefer an image's true caption over a hard negative of it?

For each negative type the data carries (the built-in data: ``relation_swap`` — the two objects
exchanged around the relation; ``attribute_swap`` — attributes exchanged between the objects;
``shuffle`` — the caption's words shuffled), over the samples that have one:

    accuracy_ITM = mean_i [ p_ITM(image_i, caption_i) > p_ITM(image_i, negative_i) ]
    accuracy_ITC = mean_i [ cos(image_i, caption_i)  > cos(image_i, negative_i) ]

Ties count as failures (a model that cannot tell them apart is not credited). Chance is 0.5; a
bag-of-words model sits near 0.5 on relation_swap and shuffle (Yuksekgonul et al., ARO). With several
captions per image, caption_i is the image's first caption (the one the negatives are made from).
"""
from __future__ import annotations

import torch

from .retrieval import EncodedData, itm_pair_scores


@torch.no_grad()
def probe_metrics(data: EncodedData, scorer, batch_size: int = 64, device: torch.device = torch.device("cpu")) -> dict:
    """{negative type: {"n", "itm_accuracy", "itc_accuracy"}} (see the module docstring)."""
    if not data.negatives:
        return {}
    captions = data.captions
    n, m = len(data), len(captions.rows)
    first_caption = torch.full((n,), m).scatter_reduce(0, captions.rows, torch.arange(m), "amin")
    true_itm = itm_pair_scores(scorer, data, captions, torch.arange(n), first_caption, batch_size, device)
    true_itc = (data.image_feat * captions.feat[first_caption]).sum(dim=1)
    out = {}
    for kind, negative in sorted(data.negatives.items()):
        rows = negative.rows
        neg_itm = itm_pair_scores(scorer, data, negative, rows, torch.arange(len(rows)), batch_size, device)
        neg_itc = (data.image_feat[rows] * negative.feat).sum(dim=1)
        out[kind] = {"n": int(len(rows)),
                     "itm_accuracy": float((true_itm[rows] > neg_itm).float().mean()),
                     "itc_accuracy": float((true_itc[rows] > neg_itc).float().mean())}
    return out

"""Activation checkpointing of layer stacks (``model.grad_checkpointing``).

A checkpointed layer keeps only its input during the forward pass and recomputes its activations in
the backward pass: activation memory drops from one set per layer to one per stack, for one more
forward of each layer. Outputs and gradients are those of the plain stack (dropout included: the RNG
state is replayed). Attention observers are not called again by the recomputation: every observer is
installed for one forward (``ObservableModel.observing``, C-Mask's one-shot reward observer) and gone
by the time the backward pass runs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def run_layer(layer: nn.Module, checkpointed: bool, *args, **kwargs):
    """``layer(*args, **kwargs)``, checkpointed when asked and autograd is recording."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)

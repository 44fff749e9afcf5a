"""An exponential-moving-average (EMA) teacher: a frozen copy of some online submodules whose weights
follow the online weights, ``θ̄ <- m θ̄ + (1 - m) θ`` after every optimizer step (BYOL, MAMO's target
network, momentum encoders in general).

``EmaTeacher({"vision_encoder": model.vision_encoder, ...}, momentum=0.995)``:

- ``teacher(name, *args, **kwargs)`` runs the copy of ``name``'s forward with the EMA weights, under
  ``torch.no_grad`` and in eval mode (no dropout in the targets);
- ``teacher.update()`` (call it after each optimizer step) moves the EMA weights towards the online
  ones at exactly the configured rate; no gradient is ever taken through the teacher.

Storage, and why it is correct under DeepSpeed:

- Every parameter of a copy is re-registered as a **persistent fp32 buffer** under its own name
  (``shadow.<name>.<path>``, e.g. ``shadow.vision_encoder.blocks.0.attn.qkv.weight``). Buffers are in
  the recipe's ``state_dict`` (so DeepSpeed saves and restores them with the module, and
  ``zero_to_fp32`` keeps them: it restores every name listed in the checkpoint's buffer names), they
  are never handed to an optimizer, never receive gradients, are never ZeRO-partitioned (ZeRO-3
  partitions parameters only), and DeepSpeed 0.19 casts *parameters* to bf16/fp16 but leaves buffers
  in fp32. The fp32 master matters: with m = 0.995 an update moves a weight by 0.005 of its distance
  to the online weight, far below half a bf16 ulp, so a bf16 EMA would not move at all. If an older
  DeepSpeed (blanket ``module.half()``) lowers them anyway, they are upcast again before the next
  update and before loading a state dict (the loss is one rounding of the initial copy).
- The forward runs in the online module's dtype: in fp32 on the buffers themselves, otherwise through
  ``torch.func.functional_call`` with a low-precision copy of the buffers, refreshed (``_foreach_copy_``,
  no reallocation) after every update and after a state dict is loaded. That copy is not saved.
- ZeRO stages 1 and 2 leave every rank with the full, identical online parameters after the step, so
  every rank computes the identical EMA. Under ZeRO-3 the online parameters are partitioned; ``update``
  then gathers them (``deepspeed.zero.GatheredParameters``, read-only) a group of at most
  ``GATHER_NUMEL`` elements at a time, and the teacher keeps a full fp32 copy per rank.
- Why the teacher is kept whole under ZeRO-3 rather than partitioned like the student: it runs a
  forward on every rank at every step, so a partitioned teacher would be all-gathered in full at every
  step (the student's forward traffic again) to save one fp32 copy of the followed modules per rank;
  kept whole, its only traffic is the update's gather. It is buffers, which ZeRO-3 never partitions,
  so nothing has to be registered with DeepSpeed, and its checkpoints are the same at every stage.

``momentum == 0`` is "no EMA" (MAMO Table 7): no copy is kept and the teacher *is* the online
network, run under ``no_grad`` in eval mode (stop-gradient), so ``update`` has nothing to do.

The online modules are referenced, not registered as submodules, so their parameters appear once in
``state_dict``/``parameters()`` (under their owner's name).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are persistent fp32 buffers of the same names."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, param in list(sub._parameters.items()):
            del sub._parameters[name]
            if param is not None:
                sub.register_buffer(name, param.detach().float().clone(), persistent=True)
    clone.eval()
    return clone


def _first_floating_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


GATHER_NUMEL = 1 << 24
"""Under ZeRO-3 the EMA update gathers the online parameters in groups of at most this many elements
(64 MB in fp32; a larger single parameter is its own group), so the update never holds the whole
partitioned model at once."""


def _gather_groups(params: list[nn.Parameter], budget: int) -> Iterator[list[int]]:
    """Consecutive index groups of ``params`` of at most ``budget`` elements (full sizes, ZeRO-3's
    ``ds_numel`` when partitioned)."""
    group, size = [], 0
    for i, p in enumerate(params):
        numel = getattr(p, "ds_numel", p.numel())
        if group and size + numel > budget:
            yield group
            group, size = [], 0
        group.append(i)
        size += numel
    if group:
        yield group


def _gathered(params: list[nn.Parameter]):
    """Under ZeRO-3 (parameters carry ``ds_id``), gather them for reading (``modifier_rank=None``: no
    rank writes, nothing is scattered back); otherwise nothing to do."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class EmaTeacher(nn.Module):
    """Frozen EMA copies of named online modules (see the module docstring).

    Args:
        online: name -> online module; names become ``shadow.<name>`` in the state dict.
        momentum: m in [0, 1); 0 keeps no copy (the teacher is the online network, stop-gradient).
    """

    def __init__(self, online: dict[str, nn.Module], momentum: float):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        # a plain dict, not submodules: the online weights stay owned (and saved) by their module
        object.__setattr__(self, "_online", dict(online))
        self.shadow = nn.ModuleDict()
        if self.momentum > 0:
            for name, module in online.items():
                self.shadow[name] = frozen_copy(module)
        # name -> {buffer path: low-precision copy of the fp32 buffer}; rebuilt lazily
        self._compute: dict[str, dict[str, torch.Tensor]] = {}
        self._stale: set[str] = set(self.shadow.keys())
        self._register_load_state_dict_pre_hook(self._before_load)
        self.register_load_state_dict_post_hook(lambda module, _: module._mark_stale())

    # -- reading ----------------------------------------------------------------------------------

    @property
    def keeps_copy(self) -> bool:
        return self.momentum > 0

    def online(self, name: str) -> nn.Module:
        return self._online[name]

    def pairs(self, name: str) -> Iterator[tuple[str, torch.Tensor, nn.Parameter]]:
        """(path, EMA fp32 buffer, online parameter) for every parameter of online module ``name``."""
        shadow = self.shadow[name]
        for path, param in self._online[name].named_parameters():
            yield path, shadow.get_buffer(path), param

    def forward(self, name: str, *args, **kwargs):
        """Run the teacher copy of ``name`` (``no_grad``, eval mode) in the online module's dtype."""
        online = self._online[name]
        with torch.no_grad():
            if not self.keeps_copy:
                was_training = online.training
                online.eval()
                try:
                    return online(*args, **kwargs)
                finally:
                    online.train(was_training)
            shadow = self.shadow[name]
            dtype = _first_floating_dtype(online)
            if dtype == torch.float32:
                return shadow(*args, **kwargs)
            return torch.func.functional_call(shadow, self._low_precision(name, dtype), args, kwargs, strict=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.shadow.eval()  # targets never use dropout
        return self

    # -- updating ---------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, momentum: float | None = None) -> None:
        """θ̄ <- m θ̄ + (1 - m) θ for every teacher tensor (fp32 arithmetic), online buffers copied."""
        if not self.keeps_copy:
            return
        m = self.momentum if momentum is None else float(momentum)
        self._ensure_fp32()
        for name, online in self._online.items():
            pairs = list(self.pairs(name))
            masters, params = [buffer for _, buffer, _ in pairs], [param for _, _, param in pairs]
            for group in _gather_groups(params, GATHER_NUMEL):
                with _gathered([params[i] for i in group]):
                    targets = [masters[i] for i in group]
                    sources = [params[i].detach().to(masters[i].dtype) for i in group]
                    # θ̄ + (1 - m)(θ - θ̄): one pass over the weights where mul + add take two
                    torch._foreach_lerp_(targets, sources, 1.0 - m)
            shadow = self.shadow[name]
            for path, buffer in online.named_buffers():
                shadow.get_buffer(path).copy_(buffer)
        self._mark_stale()

    # -- dtype bookkeeping ------------------------------------------------------------------------

    def _mark_stale(self) -> None:
        self._stale = set(self.shadow.keys())

    def _ensure_fp32(self) -> None:
        for name in self.shadow:
            shadow = self.shadow[name]
            for path, _ in self._online[name].named_parameters():
                owner_path, _, leaf = path.rpartition(".")
                owner = shadow.get_submodule(owner_path) if owner_path else shadow
                buffer = owner._buffers[leaf]
                if buffer.dtype != torch.float32:
                    owner._buffers[leaf] = buffer.float()

    def _before_load(self, *args, **kwargs) -> None:
        # restore fp32 masters into fp32 storage even if something lowered the buffers meanwhile
        self._ensure_fp32()

    def _low_precision(self, name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The ``dtype`` copy of ``name``'s EMA buffers, refreshed if an update or a load happened."""
        paths, masters = zip(*[(path, buffer) for path, buffer, _ in self.pairs(name)])
        cache = self._compute.get(name)
        fits = cache is not None and all(
            cache[p].dtype == dtype and cache[p].device == b.device for p, b in zip(paths, masters))
        if not fits:
            self._compute[name] = {p: b.to(dtype) for p, b in zip(paths, masters)}
        elif name in self._stale:
            torch._foreach_copy_([cache[p] for p in paths], list(masters))
        self._stale.discard(name)
        return self._compute[name]

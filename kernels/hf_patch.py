"""Drop-in use: record C-Mask's reward (eq. 4) per attention layer of a Hugging Face model.

A small, reversible patch in the spirit of Liger-Kernel's ``apply_*`` helpers, but with hooks instead
of rebinding the library's globals, and undone when the ``with`` block ends::

    from fastvl_kernels.hf_patch import collect_rewards

    # single-stream model whose first 197 positions are image tokens, text after them
    with collect_rewards(model, sources=slice(0, 197)) as rewards:
        model(inputs_embeds=x, attention_mask=mask)
    rewards["encoder.layer.3.attention.self"]        # [B, H, T_text] float32

    # ALBEF-style fusion: text queries cross-attend to image embeddings
    with collect_rewards(model, sources="encoder") as rewards:
        model(input_ids, attention_mask=text_mask, encoder_hidden_states=image_embeds)

Which modules: every attention module with ``query``/``key``/``value`` (BERT and its relatives) or
``q_proj``/``k_proj``/``v_proj`` (ViT in transformers 5) linear projections and a
``num_attention_heads`` attribute. Forward hooks on the three projections keep their (detached)
outputs for the duration of the module's forward; a forward hook on the module then computes
``value_weighted_topk_reward`` from them. Nothing the model computes or differentiates changes: the
projections' outputs are only read, and the reward carries no gradient.

Padding comes from the ``attention_mask`` (and, for ``sources="encoder"``, ``encoder_attention_mask``)
the model is called with, as 2-D [B, L] masks (1 = real token). Each forward overwrites the dict's
entries. This reads q/k/v as the projections produce them; a model that rotates q/k after projecting
(RoPE) would need the rotation applied first, which this helper does not do.
"""
import inspect
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .reward import value_weighted_topk_reward

_PROJECTION_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def _projections(module: nn.Module) -> Optional[tuple[nn.Linear, nn.Linear, nn.Linear]]:
    if not hasattr(module, "num_attention_heads"):
        return None
    for names in _PROJECTION_NAMES:
        layers = [getattr(module, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return tuple(layers)
    return None


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules ``collect_rewards`` can hook, by qualified name."""
    return {name: m for name, m in model.named_modules() if _projections(m) is not None}


def _positions(selector: Union[slice, Tensor], length: int) -> Tensor:
    """Positions picked by ``selector`` among ``length``, as a CPU index tensor (no device sync)."""
    index = torch.arange(length)
    return index[selector] if isinstance(selector, slice) else index[selector.cpu()]


def _take(x: Tensor, dim: int, positions: Tensor) -> Tensor:
    """``x`` restricted to ``positions`` along ``dim``: a view when they are a contiguous run."""
    n = positions.numel()
    if n and int(positions[-1]) - int(positions[0]) + 1 == n and bool((positions.diff() == 1).all()):
        return x.narrow(dim, int(positions[0]), n)
    return x.index_select(dim, positions.to(x.device))


@contextmanager
def collect_rewards(
    model: nn.Module,
    sources: Union[slice, Tensor, str],
    queries: Optional[Union[slice, Tensor]] = None,
    *,
    topk: int = 8,
    impl: str = "auto",
    layers: Optional[Callable[[str], bool]] = None,
) -> Iterator[dict[str, Tensor]]:
    """Within the ``with`` block, every forward of ``model`` records the reward of each hooked
    attention layer into the yielded dict (qualified module name -> [B, H, T] float32).

    Args:
        model: a Hugging Face (or any) model containing BERT- or ViT-style attention modules.
        sources: which keys are the source (image) tokens. A slice or index tensor over the key
            positions of *self*-attention layers (cross-attention layers are then skipped), or
            ``"encoder"``: every key of *cross*-attention layers (self-attention layers skipped).
        queries: which query positions get a reward. Default: every position that is not a source
            (self-attention) or every position (cross-attention).
        topk, impl: passed to :func:`value_weighted_topk_reward`.
        layers: optional predicate on the module name choosing which layers to hook.

    Self-attention rewards also pass the non-source keys as ``extra_k`` so that the reference
    implementation forms the softmax over every key, as the layer does.
    """
    wants_cross = isinstance(sources, str)
    if wants_cross and sources != "encoder" or not (wants_cross or isinstance(sources, (slice, Tensor))):
        raise ValueError(f"collect_rewards: sources must be a slice, an index tensor or 'encoder', got {sources!r}")
    modules = {n: m for n, m in attention_modules(model).items() if layers is None or layers(n)}
    if not modules:
        raise ValueError("collect_rewards: the model has no BERT/ViT-style attention module to hook")

    rewards: dict[str, Tensor] = {}
    masks: dict[str, Optional[Tensor]] = {}
    handles = []
    forward_signature = inspect.signature(model.forward)

    def capture_masks(_module, args, kwargs):
        try:
            bound = forward_signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        for name in ("attention_mask", "encoder_attention_mask"):
            mask = bound.get(name)
            masks[name] = mask != 0 if isinstance(mask, Tensor) and mask.dim() == 2 else None

    handles.append(model.register_forward_pre_hook(capture_masks, with_kwargs=True))

    for name, module in modules.items():
        captured: dict[str, Tensor] = {}

        def keep(role, captured=captured):
            def hook(_linear, args, output):
                captured[role] = output.detach()
                captured[role + "_input"] = args[0]
            return hook

        for role, linear in zip(("q", "k", "v"), _projections(module)):
            handles.append(linear.register_forward_hook(keep(role)))

        def record(mod, _args, _output, name=name, captured=captured):
            if not {"q", "k", "v"} <= captured.keys():
                return
            is_cross = captured["k_input"] is not captured["q_input"]
            q_flat, k_flat, v_flat = captured["q"], captured["k"], captured["v"]
            captured.clear()
            if is_cross != wants_cross:
                return
            heads = mod.num_attention_heads
            split = lambda x: x.view(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
            q_all, k_all, v_all = split(q_flat), split(k_flat), split(v_flat)  # [B, H, L, D]
            n_query, n_key = q_all.shape[2], k_all.shape[2]
            scale = getattr(mod, "scaling", q_all.shape[-1] ** -0.5)
            query_pad = masks.get("attention_mask")

            if is_cross:
                src_idx = torch.arange(n_key)
                key_pad = masks.get("encoder_attention_mask")
                qry_idx = _positions(queries if queries is not None else slice(None), n_query)
            else:
                src_idx = _positions(sources, n_key)
                key_pad = query_pad
                qry_idx = None if queries is None else _positions(queries, n_query)
            is_source = torch.zeros(n_key, dtype=torch.bool)
            is_source[src_idx] = True
            other_idx = torch.arange(n_key)[~is_source]
            if qry_idx is None:  # self-attention default: every position that is not a source
                qry_idx = torch.arange(n_query)[~is_source[:n_query]]

            extra_k = _take(k_all, 2, other_idx) if other_idx.numel() else None
            rewards[name] = value_weighted_topk_reward(
                _take(q_all, 2, qry_idx),
                _take(k_all, 2, src_idx),
                _take(v_all, 2, src_idx),
                extra_k=extra_k,
                source_mask=None if key_pad is None else _take(key_pad, 1, src_idx),
                extra_mask=None if key_pad is None or extra_k is None else _take(key_pad, 1, other_idx),
                query_mask=None if query_pad is None else _take(query_pad, 1, qry_idx),
                scale=scale,
                topk=topk,
                impl=impl,
            )

        handles.append(module.register_forward_hook(record))

    try:
        yield rewards
    finally:
        for handle in handles:
            handle.remove()

"""The one attention entry point of fastvl's models, routed to a backend by name.

``attention(q, k, v, ...)`` computes, per batch ``b`` and head ``h``::

    S = scale * q @ k^T                      [Lq, Lk], scale = 1/sqrt(D) by default
    S[i, j] = -inf where key j is not visible to query i
    P = softmax_j(S)        (rows with no visible key: P = 0, so the output row is 0, not NaN)
    out = dropout(P) @ v                     [Lq, D]

and its gradients are the usual ones (dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)),
dQ = scale dS K, dK = scale dS^T Q); a row with no visible key gets zero gradient.

Visibility is the AND of three optional masks:

- ``key_padding_mask`` [B, Lk] bool, True = real token (padding keys are hidden from every query);
- ``attn_mask`` [B or 1, 1 or H, Lq, Lk] bool, True = may attend;
- ``kind``/``step`` [B, L] ints (self-attention only, Lq == Lk == L): the generalized-LM
  (permutation-order) rule of DESIGN.md. Image tokens and ordinary text are CONTEXT; with all tokens
  CONTEXT the rule is plain bidirectional attention. The rule has one definition, in the kernels
  package: ``fastvl_kernels.encode_rule`` turns kind/step into four codes per token and
  ``EncodedRule.visible`` compares them. Every backend reads those codes -- the dense masks of
  eager/sdpa/xformers (``permutation_dense_mask``), flex's ``mask_mod`` and the Triton kernel --
  and ``fastvl_kernels.permutation_mask``, the rule written out case by case, is the oracle the
  tests hold them to.

Backends (``backend=``):

=========  ============================================================================================
eager      matmul + fp32 softmax + matmul; the reference every other backend is tested against.
sdpa       ``torch.nn.functional.scaled_dot_product_attention`` with a bool mask (no mask when none is
           given, so CUDA can pick its flash kernel).
flex       FlexAttention with a ``BlockMask`` built from a ``mask_mod`` closing over the masks (the
           kind/step rule's codes are compared per (q, kv) inside the mask, never stored densely by
           us; ``flex_block_mask``).
           Compiled on CUDA. On CPU it runs the unfused eager path and is **forward-only**: PyTorch has
           no FlexAttention backward on CPU, so calling it on CPU with inputs that require grad (grad
           mode on) raises ``AttentionBackendError`` before any work. No attention dropout.
xformers   ``xformers.ops.memory_efficient_attention`` with an additive bias; **CUDA only** (the
           installed xformers has no CPU kernels): CPU tensors raise ``AttentionBackendError``. xformers
           is imported only when this backend runs.
triton     ``fastvl_kernels.permutation_attention`` (mask computed on the fly from kind/step + key
           padding, memory O(L)) for self-attention-shaped calls (Lq == Lk) without ``attn_mask`` and
           without dropout; anything else (cross-attention with Lq != Lk, a general ``attn_mask``,
           dropout > 0) falls back to ``sdpa``. Raises ``AttentionBackendError`` when the kernel is not
           available. The kernel also empties the *query* rows of padded tokens (output 0).
=========  ============================================================================================

Padded query rows: in self-attention, the output rows of padding tokens are backend-dependent — eager,
sdpa, flex and xformers compute them against the real keys (as Hugging Face BERT does), the triton
kernel returns 0. Padding never reaches a real token's output (padded keys are hidden), so nothing
downstream may read those rows (losses use real positions only), and their gradient is zero.

Attention modules derive from ``ObservedAttention``: they hold the backend name, the attention dropout,
a ``name`` (their path in the model) and an ``observer`` hook, called as
``observer(name, q, k, v, key_padding_mask)`` with q [B, H, Lq, D], k/v [B, H, Lk, D] just before the
attention runs (C-Mask's reward reads q/k/v, EPIC the [CLS] -> text scores). It costs one ``is None``
test when unset.
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

import fastvl_kernels
from fastvl_kernels import CONTEXT, encode_rule

BACKENDS = ("eager", "sdpa", "flex", "xformers", "triton")

Observer = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]], None]


class AttentionBackendError(RuntimeError):
    """An attention backend cannot run these inputs on this device (named in the message)."""


# ---------------------------------------------------------------------------------------------
# the permutation (generalized LM) rule


def permutation_dense_mask(kind: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The kind/step rule as a dense bool mask [B, 1, L, L] (True = may attend), from the kernels'
    encoding (``fastvl_kernels.encode_rule``). Padding is not part of it: callers AND the key padding
    mask in, so padded query rows still see the real keys (module docstring)."""
    return encode_rule(kind, step).dense().unsqueeze(1)


# ---------------------------------------------------------------------------------------------
# masks


def _check_inputs(q, k, v, key_padding_mask, attn_mask, kind, step) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention: q, k, v must be [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, lq, d = q.shape
    if k.shape[:2] != (b, h) or k.shape[3] != d or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: k/v must be [B, H, Lk, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    lk = k.shape[2]
    if key_padding_mask is not None and key_padding_mask.shape != (b, lk):
        raise ValueError(f"attention: key_padding_mask must be [B, Lk] = [{b}, {lk}], got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        if attn_mask.dim() != 4 or attn_mask.shape[0] not in (1, b) or attn_mask.shape[1] not in (1, h) \
                or attn_mask.shape[2:] != (lq, lk):
            raise ValueError(f"attention: attn_mask must be [B or 1, H or 1, Lq, Lk] with B={b}, H={h}, "
                             f"Lq={lq}, Lk={lk}, got {tuple(attn_mask.shape)}")
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attention: attn_mask must be bool (True = may attend), got {attn_mask.dtype}")
    if (kind is None) != (step is None):
        raise ValueError("attention: kind and step go together (both [B, L]) or not at all")
    if kind is not None:
        if lq != lk:
            raise ValueError(f"attention: kind/step describe a self-attention sequence, but Lq={lq} != Lk={lk}")
        if kind.shape != (b, lk) or step.shape != (b, lk):
            raise ValueError(f"attention: kind/step must be [B, L] = [{b}, {lk}], got {tuple(kind.shape)}, {tuple(step.shape)}")


def _dense_mask(key_padding_mask, attn_mask, kind, step) -> Optional[torch.Tensor]:
    """AND of the given masks, broadcastable to [B, H, Lq, Lk]; None when there is no mask."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        mask = attn_mask if mask is None else mask & attn_mask
    if kind is not None:
        rule = permutation_dense_mask(kind, step)
        mask = rule if mask is None else mask & rule
    return mask


def _open_empty_rows(mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Rows with no visible key would be softmax(-inf...) = NaN (and NaN gradients). Let such rows see
    every key (finite softmax) and return ``has_key`` so the caller zeroes their output afterwards; the
    zeroing also zeroes their gradient."""
    if mask is None:
        return None, None
    has_key = mask.any(dim=-1, keepdim=True)
    return mask | ~has_key, has_key


def _zero_empty_rows(out: torch.Tensor, has_key: Optional[torch.Tensor]) -> torch.Tensor:
    return out if has_key is None else out.masked_fill(~has_key, 0.0)


# ---------------------------------------------------------------------------------------------
# backends


def _eager(q, k, v, mask, dropout_p, scale):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs.to(v.dtype), v)


def _sdpa(q, k, v, mask, dropout_p, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


_compiled_flex = None


def _flex_function(device: torch.device):
    """Compiled FlexAttention on CUDA (the fused kernel); the eager path elsewhere."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


class _BlockMaskCache:
    """The last few BlockMasks, keyed by the identity (weak reference + version counter) of the mask
    tensors they were built from: a layer stack passes the same mask objects to every layer, so the
    block mask is built once per forward instead of once per layer. Only the same, unmodified tensor
    objects match (``is`` + version counter), so an in-place edit of a mask rebuilds it. The cached
    block masks keep their (small) mask tensors alive until evicted."""

    def __init__(self, size: int = 4):
        self.size = size
        self.entries: list[tuple[tuple, list, object]] = []

    @staticmethod
    def _identity(tensors):
        return [(None if t is None else weakref.ref(t), None if t is None else t._version) for t in tensors]

    @staticmethod
    def _same(identity, tensors) -> bool:
        for (ref, version), t in zip(identity, tensors):
            if t is None:
                if ref is not None:
                    return False
            elif ref is None or ref() is not t or version != t._version:
                return False
        return True

    def get(self, shape: tuple, tensors: tuple, build: Callable[[], object]):
        for key, identity, block_mask in self.entries:
            if key == shape and self._same(identity, tensors):
                return block_mask
        block_mask = build()
        self.entries = [(shape, self._identity(tensors), block_mask)] + self.entries[: self.size - 1]
        return block_mask


_block_masks = _BlockMaskCache()


def flex_block_mask(batch: int, heads: int, lq: int, lk: int, device: torch.device, *,
                    key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                    kind: Optional[torch.Tensor] = None, step: Optional[torch.Tensor] = None):
    """The FlexAttention ``BlockMask`` of these masks: its ``mask_mod`` is
    the AND of the key padding, ``attn_mask`` and the kind/step rule (``EncodedRule.visible`` on the
    codes of ``encode_rule``). Per-head only when ``attn_mask`` varies by head."""
    from torch.nn.attention.flex_attention import create_block_mask

    full_mask = attn_mask.expand(batch, heads, lq, lk) if attn_mask is not None else None
    rule = encode_rule(kind, step) if kind is not None else None

    def mask_mod(b_idx, h_idx, q_idx, kv_idx):
        visible = kv_idx >= 0
        if key_padding_mask is not None:
            visible = visible & key_padding_mask[b_idx, kv_idx]
        if full_mask is not None:
            visible = visible & full_mask[b_idx, h_idx, q_idx, kv_idx]
        if rule is not None:
            visible = visible & rule.visible(b_idx, q_idx, kv_idx)
        return visible

    return create_block_mask(mask_mod, batch, _block_mask_heads(attn_mask, heads), lq, lk, device=device)


def _block_mask_heads(attn_mask: Optional[torch.Tensor], heads: int) -> Optional[int]:
    """Heads of the BlockMask: one per head only when ``attn_mask`` varies by head, else None (shared)."""
    return heads if (attn_mask is not None and attn_mask.shape[1] > 1) else None


def _flex(q, k, v, key_padding_mask, attn_mask, kind, step, dropout_p, scale):
    if dropout_p > 0:
        raise AttentionBackendError("attention backend 'flex' has no attention dropout; set model.dropout=0 "
                                    "or use 'sdpa'/'eager'")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise AttentionBackendError(
            "attention backend 'flex' is forward-only on CPU: PyTorch's FlexAttention has no CPU backward. "
            "Run it under torch.no_grad() (eval/inference), or use 'sdpa' or 'eager' to train on CPU.")
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    block_mask = None
    if key_padding_mask is not None or attn_mask is not None or kind is not None:
        block_mask = _block_masks.get(
            (b, _block_mask_heads(attn_mask, h), lq, lk, q.device), (key_padding_mask, attn_mask, kind, step),
            lambda: flex_block_mask(b, h, lq, lk, q.device, key_padding_mask=key_padding_mask,
                                    attn_mask=attn_mask, kind=kind, step=step))
    flex = _flex_function(q.device)
    with warnings.catch_warnings():
        # on CPU the unfused path is the documented behaviour of this backend, not news per call
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = flex(q, k, v, block_mask=block_mask, scale=scale)
    # FlexAttention already returns 0 for rows with no visible key
    return out


def _xformers(q, k, v, mask, dropout_p, scale):
    if q.device.type != "cuda":
        raise AttentionBackendError(
            f"attention backend 'xformers' needs CUDA tensors: the installed xformers has no CPU kernels "
            f"(got device {q.device}); use 'sdpa' or 'eager' on CPU")
    try:
        import xformers.ops as xops
    except Exception as error:  # a broken binary raises more than ImportError
        raise AttentionBackendError(f"attention backend 'xformers' could not import xformers.ops: {error}") from error
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    bias = None
    if mask is not None:
        # xformers wants an additive bias whose rows start on 16-byte-aligned offsets: allocate a
        # padded last dim and slice it. One copy per head of the mask only, broadcast over the rest.
        mask_heads = mask.shape[1] if mask.dim() == 4 else 1
        padded = (lk + 7) // 8 * 8
        storage = torch.zeros(b, mask_heads, lq, padded, device=q.device, dtype=q.dtype)
        bias = storage[..., :lk]
        bias.masked_fill_(~mask.expand(b, mask_heads, lq, lk), float("-inf"))
        bias = bias.expand(b, h, lq, lk)
    try:
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_bias=bias, p=dropout_p, scale=scale)
    except NotImplementedError as error:  # e.g. a tensor bias on GPUs newer than cutlass's kernels cover
        raise AttentionBackendError(
            f"attention backend 'xformers' has no kernel for this call on this GPU ({q.dtype}, "
            f"{'with' if bias is not None else 'without'} a padding bias): {str(error).splitlines()[0]}; "
            f"use 'sdpa'") from error
    return out.transpose(1, 2)


def _triton_kernel():
    op = fastvl_kernels.permutation_attention
    if op is None:
        raise AttentionBackendError("attention backend 'triton' needs fastvl_kernels.permutation_attention, "
                                    "which this build of fastvl_kernels does not provide; use 'sdpa'")
    return op


# ---------------------------------------------------------------------------------------------
# the entry point


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_mask: Optional[torch.Tensor] = None,
    kind: Optional[torch.Tensor] = None,
    step: Optional[torch.Tensor] = None,
    backend: str = "sdpa",
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Scaled dot-product attention through ``backend`` (see the module docstring for the math).

    Args:
        q: [B, H, Lq, D]; k, v: [B, H, Lk, D].
        key_padding_mask: [B, Lk] bool, True = real key (other dtypes are read as != 0).
        attn_mask: [B or 1, 1 or H, Lq, Lk] bool, True = may attend.
        kind, step: [B, L] int per-token generalized-LM roles (CONTEXT/ORIGINAL/PSEUDO from
            ``fastvl_kernels``) and factorization steps; self-attention only (Lq == Lk == L).
        backend: "eager" | "sdpa" | "flex" | "xformers" | "triton".
        dropout_p: attention-probability dropout, applied as given (callers pass 0 in eval mode).
        scale: score scale, default 1/sqrt(D).

    Returns:
        [B, H, Lq, D] in q's dtype; rows whose query sees no key are exactly 0.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention: backend must be one of {BACKENDS}, got {backend!r}")
    _check_inputs(q, k, v, key_padding_mask, attn_mask, kind, step)
    if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
        key_padding_mask = key_padding_mask != 0
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])

    if backend == "triton":
        if attn_mask is None and dropout_p == 0.0 and q.shape == k.shape == v.shape:
            op = _triton_kernel()
            if kind is None:
                # everything CONTEXT: plain bidirectional attention with key padding
                kind = torch.full(q.shape[:1] + q.shape[2:3], CONTEXT, dtype=torch.int32, device=q.device)
                step = torch.zeros_like(kind)
            return op(q, k, v, kind, step, key_padding_mask, scale=scale)
        backend = "sdpa"  # cross-attention, a general mask or dropout: the documented fallback

    if backend == "flex":
        return _flex(q, k, v, key_padding_mask, attn_mask, kind, step, dropout_p, scale)

    mask, has_key = _open_empty_rows(_dense_mask(key_padding_mask, attn_mask, kind, step))
    if backend == "eager":
        out = _eager(q, k, v, mask, dropout_p, scale)
    elif backend == "sdpa":
        out = _sdpa(q, k, v, mask, dropout_p, scale)
    else:
        out = _xformers(q, k, v, mask, dropout_p, scale)
    return _zero_empty_rows(out, has_key)


# ---------------------------------------------------------------------------------------------
# modules


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    b, length, width = x.shape
    return x.view(b, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


class ObservedAttention(nn.Module):
    """Base of every attention module (self and cross).

    Attributes:
        backend: attention backend name (see ``attention``).
        attn_dropout: dropout on the attention probabilities, used in training mode only.
        is_cross: True for cross-attention (queries from text, keys/values from the image).
        name: the module's path in its model (set by ``name_attention_modules``); passed to the observer.
        observer: None, or ``fn(name, q, k, v, key_padding_mask)`` called on every forward with
            q [B, H, Lq, D], k/v [B, H, Lk, D] and the key padding mask [B, Lk] bool (or None).
    """

    def __init__(self, backend: str, attn_dropout: float, is_cross: bool):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.attn_dropout = attn_dropout
        self.is_cross = is_cross
        self.name = ""
        self.observer: Optional[Observer] = None

    def attend(self, q, k, v, key_padding_mask=None, attn_mask=None, kind=None, step=None) -> torch.Tensor:
        """Notify the observer, then ``attention`` with this module's backend and dropout."""
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            key_padding_mask = key_padding_mask != 0
        if self.observer is not None:
            self.observer(self.name, q, k, v, key_padding_mask)
        return attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, kind=kind, step=step,
                         backend=self.backend, dropout_p=self.attn_dropout if self.training else 0.0)


class ObservableModel(nn.Module):
    """A model whose attention modules can be watched: ``set_observer`` / ``observing`` install
    ``fn(name, q, k, v, key_padding_mask)`` on every ``ObservedAttention`` it contains (the C-Mask reward
    meter reads the main model's attention this way)."""

    def attention_modules(self) -> Iterator[ObservedAttention]:
        """Every attention module (self and cross), in module order."""
        return (m for m in self.modules() if isinstance(m, ObservedAttention))

    def set_observer(self, fn: Optional[Observer]) -> None:
        """Install ``fn`` on every attention module (None removes it)."""
        for module in self.attention_modules():
            module.observer = fn

    @contextlib.contextmanager
    def observing(self, fn: Observer):
        """``with model.observing(fn): ...`` — ``set_observer(fn)`` for the block, then remove it."""
        self.set_observer(fn)
        try:
            yield self
        finally:
            self.set_observer(None)


def name_attention_modules(root: nn.Module, prefix: str = "") -> None:
    """Set ``name`` of every ``ObservedAttention`` under ``root`` to its path (``prefix`` + dotted name)."""
    for name, module in root.named_modules(prefix=prefix):
        if isinstance(module, ObservedAttention):
            module.name = name


def set_attention_backend(root: nn.Module, backend: str) -> None:
    """Switch every attention module under ``root`` to ``backend`` (e.g. 'flex' for inference)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    for module in root.modules():
        if isinstance(module, ObservedAttention):
            module.backend = backend

"""The attention entry point: every backend that runs on CPU agrees with a naive per-row oracle, masks
compose, rows with no visible key give 0 (and zero gradients), and the CUDA-only / forward-only
backends refuse CPU work with a message naming the problem."""
import math

import pytest
import torch

import fastvl_kernels
from fastvl.models.attention import (
    AttentionBackendError,
    attention,
    flex_block_mask,
    permutation_dense_mask,
)
from fastvl_kernels import CONTEXT, ORIGINAL, PSEUDO, permutation_mask

HAS_PERM_KERNEL = fastvl_kernels.permutation_attention is not None


def rule_oracle(kind_q: int, step_q: int, kind_k: int, step_k: int) -> bool:
    """DESIGN.md's generalized-LM rule, written out case by case."""
    if kind_k == CONTEXT:
        return True
    if kind_k == ORIGINAL:
        return (kind_q == ORIGINAL and step_q >= step_k) or (kind_q == PSEUDO and step_q > step_k)
    return kind_q == PSEUDO and step_q == step_k


def naive_attention(q, k, v, visible: torch.Tensor) -> torch.Tensor:
    """Row-by-row softmax over the visible keys in float64; a row with no visible key is 0.
    ``visible`` [B, H, Lq, Lk] bool."""
    b, h, lq, d = q.shape
    out = torch.zeros(b, h, lq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                keys = visible[bi, hi, i].nonzero().flatten()
                if keys.numel() == 0:
                    continue
                scores = (k[bi, hi, keys].double() @ q[bi, hi, i].double()) / math.sqrt(d)
                out[bi, hi, i] = scores.softmax(0) @ v[bi, hi, keys].double()
    return out


def make_case(name: str, seed: int = 0):
    """(q, k, v, kwargs, visible [B, H, Lq, Lk]) for a named masking case; odd lengths on purpose."""
    g = torch.Generator().manual_seed(seed)
    b, h, d = 2, 3, 16
    lq = lk = 13
    if name == "cross_padding":
        lq, lk = 7, 19
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, d, generator=g)
    visible = torch.ones(b, h, lq, lk, dtype=torch.bool)
    kwargs = {}
    if name in ("padding", "cross_padding", "padding_kind_step", "empty_batch_item"):
        kpm = torch.ones(b, lk, dtype=torch.bool)
        kpm[1, lk - 4:] = False
        if name == "empty_batch_item":
            kpm[1] = False
        kwargs["key_padding_mask"] = kpm
        visible &= kpm[:, None, None, :]
    if name in ("attn_mask_batch", "attn_mask_heads"):
        shape = (b, 1, lq, lk) if name == "attn_mask_batch" else (1, h, lq, lk)
        mask = torch.rand(shape, generator=g) > 0.4
        mask[0, 0, 2] = False  # a row that sees nothing
        kwargs["attn_mask"] = mask
        visible &= mask
    if name in ("kind_step", "padding_kind_step"):
        kind = torch.randint(0, 3, (b, lq), generator=g, dtype=torch.int32)
        step = torch.randint(0, 4, (b, lq), generator=g, dtype=torch.int32)
        kind[:, 0] = CONTEXT
        kwargs["kind"], kwargs["step"] = kind, step
        rule = torch.tensor([[[rule_oracle(int(kind[bi, i]), int(step[bi, i]), int(kind[bi, j]), int(step[bi, j]))
                               for j in range(lk)] for i in range(lq)] for bi in range(b)])
        visible &= rule[:, None]
    return q, k, v, kwargs, visible


CASES = ["none", "padding", "cross_padding", "empty_batch_item", "attn_mask_batch", "attn_mask_heads",
         "kind_step", "padding_kind_step"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_dense_backends_match_oracle_forward_and_backward(case, backend):
    q, k, v, kwargs, visible = make_case(case)
    expected = naive_attention(q, k, v, visible)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kwargs)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    empty_rows = ~visible.any(-1)
    assert torch.all(out[empty_rows] == 0)

    # gradients against the eager reference; rows with no key get exactly zero gradient
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q_ref, k_ref, v_ref = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = attention(q_ref, k_ref, v_ref, backend="eager", **kwargs)
    ref_grads = torch.autograd.grad(ref, (q_ref, k_ref, v_ref), grad_out)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.all(grads[0][empty_rows] == 0)


@pytest.mark.parametrize("case", CASES)
def test_flex_forward_matches_oracle(case):
    q, k, v, kwargs, visible = make_case(case, seed=1)
    with torch.no_grad():
        out = attention(q, k, v, backend="flex", **kwargs)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, visible), atol=1e-5, rtol=1e-5)
    assert torch.all(out[~visible.any(-1)] == 0)


def test_flex_refuses_backward_on_cpu():
    q, k, v, kwargs, _ = make_case("padding")
    q.requires_grad_()
    with pytest.raises(AttentionBackendError, match="forward-only on CPU"):
        attention(q, k, v, backend="flex", **kwargs)


def test_flex_refuses_dropout():
    q, k, v, _, _ = make_case("none")
    with torch.no_grad(), pytest.raises(AttentionBackendError, match="dropout"):
        attention(q, k, v, backend="flex", dropout_p=0.1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_xformers_refuses_cpu_tensors():
    q, k, v, kwargs, _ = make_case("padding")
    with pytest.raises(AttentionBackendError, match="needs CUDA tensors.*no CPU kernels"):
        attention(q, k, v, backend="xformers", **kwargs)


def padded_query_rows(q, k, kwargs) -> torch.Tensor:
    """[B, 1, Lq] bool: query rows of padding tokens in self-attention (their output is backend-dependent)."""
    kpm = kwargs.get("key_padding_mask")
    if kpm is None or q.shape[2] != k.shape[2]:
        return torch.zeros(q.shape[0], 1, q.shape[2], dtype=torch.bool)
    return ~kpm[:, None, :]


@pytest.mark.skipif(not HAS_PERM_KERNEL, reason="fastvl_kernels.permutation_attention not available in this build")
@pytest.mark.parametrize("case", CASES)
def test_triton_backend_matches_eager(case):
    """Self-attention cases run the permutation kernel; cross-attention and attn_mask fall back to sdpa.
    Real query rows must agree; padded query rows are 0 from the kernel and carry no gradient."""
    q, k, v, kwargs, visible = make_case(case, seed=2)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend="triton", **kwargs)
    padded = padded_query_rows(q, k, kwargs).expand(out.shape[:3])
    expected = naive_attention(q, k, v, visible)
    torch.testing.assert_close(out.double()[~padded], expected[~padded], atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out).masked_fill(padded[..., None], 0.0)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q_ref, k_ref, v_ref = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref_grads = torch.autograd.grad(attention(q_ref, k_ref, v_ref, backend="eager", **kwargs),
                                    (q_ref, k_ref, v_ref), grad_out)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(HAS_PERM_KERNEL, reason="checks the message when the kernel is missing")
def test_triton_backend_without_kernel_says_so():
    q, k, v, kwargs, _ = make_case("padding")
    with pytest.raises(AttentionBackendError, match="permutation_attention"):
        attention(q, k, v, backend="triton", **kwargs)


def test_triton_backend_falls_back_to_sdpa_for_cross_attention_without_kernel_call():
    """Cross-attention never needs the kernel, so it runs whether or not the kernel exists."""
    q, k, v, kwargs, visible = make_case("cross_padding")
    out = attention(q, k, v, backend="triton", **kwargs)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, visible), atol=1e-5, rtol=1e-5)


def test_permutation_rule_special_cases():
    length = 6
    positions = torch.arange(length)
    ones = torch.ones(1, length, dtype=torch.long)
    # all context: bidirectional
    bidirectional = permutation_dense_mask(ones * CONTEXT, ones * 0)[0, 0]
    assert bidirectional.all()
    # all originals stepped by position: causal LM
    causal = permutation_dense_mask(ones * ORIGINAL, positions[None])[0, 0]
    assert torch.equal(causal, torch.tril(torch.ones(length, length, dtype=torch.bool)))
    # a context prefix of 2, then originals: prefix LM
    kind = torch.tensor([[CONTEXT, CONTEXT, ORIGINAL, ORIGINAL, ORIGINAL, ORIGINAL]])
    prefix = permutation_dense_mask(kind, positions[None])[0, 0]
    expected = torch.tril(torch.ones(length, length, dtype=torch.bool))
    expected[:, :2] = True
    assert torch.equal(prefix, expected)
    # pseudo masks see context + earlier-step originals + same-step pseudos, never their own original
    kind = torch.tensor([[CONTEXT, ORIGINAL, ORIGINAL, PSEUDO, PSEUDO]])
    step = torch.tensor([[0, 1, 2, 1, 2]])
    mask = permutation_dense_mask(kind, step)[0, 0]
    assert mask[3].tolist() == [True, False, False, True, False]
    assert mask[4].tolist() == [True, True, False, False, True]
    assert mask[0].tolist() == [True, False, False, False, False]


def test_encoded_rule_matches_oracle_exhaustively():
    """Every (query, key) pair of roles, in one sequence holding each (kind, step) once: the dense mask
    the backends use (from the kernels' encoding) is the rule written out case by case."""
    values = [(kind, step) for kind in (CONTEXT, ORIGINAL, PSEUDO) for step in range(4)]
    kind = torch.tensor([[kind for kind, _ in values]])
    step = torch.tensor([[step for _, step in values]])
    want = torch.tensor([[rule_oracle(*query, *key) for key in values] for query in values])
    assert torch.equal(permutation_dense_mask(kind, step)[0, 0], want)
    assert torch.equal(permutation_mask(kind, step)[0], want)


def test_dense_mask_is_the_kernel_packages_oracle():
    g = torch.Generator().manual_seed(3)
    kind = torch.randint(0, 3, (3, 11), generator=g, dtype=torch.int32)
    step = torch.randint(0, 5, (3, 11), generator=g, dtype=torch.int32)
    assert torch.equal(permutation_dense_mask(kind, step)[:, 0], permutation_mask(kind, step))


def permutation_case(batch: int, heads: int, length: int, dim: int, seed: int):
    """(q, k, v, kind, step, key_padding_mask) of a C-Mask-like sequence: a CONTEXT prefix (the image),
    then text tokens of random roles and steps; every row but the first padded at a random length."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, length, dim, generator=g) for _ in range(3))
    kind = torch.randint(0, 3, (batch, length), generator=g, dtype=torch.int32)
    kind[:, : max(1, length // 3)] = CONTEXT
    step = torch.randint(0, 6, (batch, length), generator=g, dtype=torch.int32)
    real = torch.arange(length)[None, :] < torch.randint(1, length + 1, (batch, 1), generator=g)
    real[0] = True
    return q, k, v, kind, step, real


FLEX_SHAPES = [(1, 1, 5, 8), (2, 3, 33, 16), (2, 2, 130, 32), (3, 1, 257, 16)]  # L past FlexAttention's 128 blocks


@pytest.mark.parametrize("shape", FLEX_SHAPES)
def test_flex_matches_eager_for_permutation_masks_with_padding(shape):
    q, k, v, kind, step, real = permutation_case(*shape, seed=sum(shape))
    masks = {"kind": kind, "step": step, "key_padding_mask": real}
    with torch.no_grad():
        out = attention(q, k, v, backend="flex", **masks)
        torch.testing.assert_close(out, attention(q, k, v, backend="eager", **masks), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", FLEX_SHAPES)
def test_flex_block_mask_dense_form_is_the_permutation_mask(shape):
    """The BlockMask flex runs on: its mask_mod evaluated at every pair is ``permutation_mask`` with the
    padded keys hidden, and its block map lists exactly the (query block, key block) tiles that hold a
    visible pair (a skipped tile hides nothing visible)."""
    from torch.nn.attention.flex_attention import create_mask

    batch, heads, length, _ = shape
    _, _, _, kind, step, real = permutation_case(*shape, seed=sum(shape))
    block_mask = flex_block_mask(batch, heads, length, length, torch.device("cpu"), key_padding_mask=real,
                                 kind=kind, step=step)
    want = permutation_mask(kind, step) & real[:, None, :]
    dense = create_mask(block_mask.mask_mod, batch, 1, length, length, device="cpu")[:, 0]
    assert torch.equal(dense, want)
    size = block_mask.BLOCK_SIZE
    blocks = -(-length // size[0]), -(-length // size[1])
    padded = torch.zeros(batch, blocks[0] * size[0], blocks[1] * size[1], dtype=torch.bool)
    padded[:, :length, :length] = want
    live = padded.view(batch, blocks[0], size[0], blocks[1], size[1]).any(4).any(2)
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), live)


def test_bad_inputs_are_named():
    q, k, v, _, _ = make_case("none")
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask must be bool"):
        attention(q, k, v, attn_mask=torch.ones(1, 1, 13, 13))
    with pytest.raises(ValueError, match="kind and step go together"):
        attention(q, k, v, kind=torch.zeros(2, 13, dtype=torch.long))


@pytest.mark.parametrize("case", CASES)
def test_triton_routing_with_a_stand_in_kernel(monkeypatch, case):
    """The routing of the 'triton' backend, independent of the kernel: self-attention-shaped calls
    without attn_mask reach ``permutation_attention(q, k, v, kind, step, key_padding_mask, scale=...)``
    (all-CONTEXT kind when none is given); cross-attention and attn_mask fall back to sdpa."""
    calls = []

    def stand_in(q, k, v, kind, step, key_padding_mask=None, *, scale=None, return_lse=False, impl="auto"):
        calls.append((kind.clone(), step.clone(), key_padding_mask, scale))
        return attention(q, k, v, key_padding_mask=key_padding_mask, kind=kind, step=step, scale=scale,
                         backend="eager")

    monkeypatch.setattr(fastvl_kernels, "permutation_attention", stand_in)
    q, k, v, kwargs, visible = make_case(case, seed=4)
    out = attention(q, k, v, backend="triton", **kwargs)
    torch.testing.assert_close(out.double(), naive_attention(q, k, v, visible), atol=1e-5, rtol=1e-5)
    uses_kernel = "attn_mask" not in kwargs and q.shape[2] == k.shape[2]
    assert len(calls) == int(uses_kernel)
    if uses_kernel:
        kind, step, kpm, scale = calls[0]
        assert scale == pytest.approx(1 / math.sqrt(q.shape[-1]))
        assert kpm is kwargs.get("key_padding_mask")
        if "kind" in kwargs:
            assert torch.equal(kind, kwargs["kind"]) and torch.equal(step, kwargs["step"])
        else:
            assert torch.all(kind == CONTEXT) and kind.shape == (q.shape[0], q.shape[2])


def test_flex_block_mask_is_rebuilt_when_a_mask_changes_in_place():
    q, k, v, kwargs, _ = make_case("padding", seed=5)
    kpm = kwargs["key_padding_mask"]
    with torch.no_grad():
        first = attention(q, k, v, backend="flex", key_padding_mask=kpm)
        assert torch.equal(attention(q, k, v, backend="flex", key_padding_mask=kpm), first)
        kpm[0, 3:] = False
        torch.testing.assert_close(attention(q, k, v, backend="flex", key_padding_mask=kpm),
                                   attention(q, k, v, backend="eager", key_padding_mask=kpm), atol=1e-5, rtol=1e-5)

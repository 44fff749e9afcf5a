"""Permutation-order attention: every implementation against the dense-mask reference (forward, lse
and dq/dk/dv), the rule's special cases against torch SDPA, no leakage into pseudo-mask rows, rows
that see nothing, the tile-skipping summaries, and torch.compile.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py on machines
without CUDA) on small shapes with 16 x 16 tiles, so that short sequences still span several tiles
and exercise the skipping; the C++ kernel is also run with small tiles for the same reason.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import on CPU-only machines


import pytest
import torch
import torch.nn.functional as F

from fastvl_kernels import perm_attention as pa
from fastvl_kernels._cpp import cpp_op
from fastvl_kernels._triton import triton_runs_on
from fastvl_kernels.perm_attention import CONTEXT, ORIGINAL, PSEUDO

HAS_CPP_OP = cpp_op("permutation_attention_fwd") is not None
TRITON_ON_CPU = triton_runs_on(torch.device("cpu"))
needs_cpp = pytest.mark.skipif(not HAS_CPP_OP, reason="C++ extension not built (pip install --no-build-isolation -e .)")
needs_triton = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton interpreter off: TRITON_INTERPRET=1 must be set before triton is first imported")


# --------------------------------------------------------------------------------------------------
# Inputs.
# --------------------------------------------------------------------------------------------------
def unilm_layout(batch: int, seq_len: int, gen: torch.Generator, mask_ratio: float = 0.3,
                 pad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """UniLMv2-style rows: context tokens, masked spans kept as ORIGINAL tokens in place, one PSEUDO
    token per masked token appended at the end with the same step, spans ordered randomly. With
    ``pad`` each row pads a random tail of its body (the pseudo tokens after it stay real)."""
    kind = torch.zeros(batch, seq_len, dtype=torch.long)
    step = torch.zeros(batch, seq_len, dtype=torch.long)
    real = torch.ones(batch, seq_len, dtype=torch.bool)
    n_mask = max(1, int(mask_ratio * seq_len / (1 + mask_ratio)))
    n_body = seq_len - n_mask
    randint = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    for b in range(batch):
        n_real_body = n_body - (randint(0, max(1, n_body // 4)) if pad else 0)
        taken, spans = set(), []
        while len(taken) < n_mask:
            start, length = randint(0, n_real_body), randint(1, 4)
            span = [p for p in range(start, min(start + length, n_real_body)) if p not in taken]
            span = span[: n_mask - len(taken)]
            if span:
                spans.append(span)
                taken.update(span)
        order = torch.randperm(len(spans), generator=gen) + 1
        slot = n_body
        for span, s in zip(spans, order.tolist()):
            for p in span:
                kind[b, p], step[b, p] = ORIGINAL, s
                kind[b, slot], step[b, slot] = PSEUDO, s
                slot += 1
        real[b, n_real_body:n_body] = False
    return kind, step, real


def random_rule(batch: int, seq_len: int, gen: torch.Generator, pad: bool = True):
    """Arbitrary kinds and steps (pseudo tokens without originals, repeated steps...) and padding."""
    kind = torch.randint(0, 3, (batch, seq_len), generator=gen)
    step = torch.randint(0, 6, (batch, seq_len), generator=gen)
    real = torch.rand(batch, seq_len, generator=gen) > 0.15 if pad else None
    return kind, step, real


def qkv(batch, heads, seq_len, head_dim, dtype, gen):
    return [torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(dtype) for _ in range(3)]


# --------------------------------------------------------------------------------------------------
# Oracles and comparison.
# --------------------------------------------------------------------------------------------------
def reference_with_grads(q, k, v, kind, step, real, grad_out, scale=None):
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, lse = pa.permutation_attention_reference(*leaves, kind, step, real, scale=scale, return_lse=True)
    grads = torch.autograd.grad(out, leaves, grad_out.float())
    return out.detach(), lse.detach(), grads


def same_dtype_naive(q, k, v, kind, step, real, grad_out):
    """Dense masked attention computed in the inputs' own dtype (flash-attention's yardstick for
    low-precision tolerances): its error against the fp32 oracle bounds what rounding alone costs."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    qq, kk, vv = leaves
    mask = pa.permutation_mask(kind, step, real)[:, None]
    scores = (qq @ kk.transpose(-1, -2)) * qq.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    empty = ~mask.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1) * mask
    out = probs @ vv
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


def assert_close_verbose(actual, expected, atol, rtol, what):
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    bad = (actual - expected).abs() > atol + rtol * expected.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        err = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (max abs err {err:.3g}); "
                             f"first at {idx}")


def assert_within_rounding(actual, oracle, naive, what, factor=2.0, floor=2e-3):
    """Kernel error vs the fp32 oracle at most ``factor`` x the same-dtype naive run's error (+ floor)."""
    kernel_err = (actual.float() - oracle.float()).abs().max().item()
    naive_err = (naive.float() - oracle.float()).abs().max().item()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    assert kernel_err <= factor * naive_err + floor, (
        f"{what}: error {kernel_err:.3g} > {factor} x same-dtype error {naive_err:.3g} + {floor}")


# --------------------------------------------------------------------------------------------------
# Implementations under test: raw forward/backward with chosen tile sizes.
# --------------------------------------------------------------------------------------------------
def run_cpp(q, k, v, kind, step, real, grad_out, scale, blocks):
    fwd, bwd = cpp_op("permutation_attention_fwd"), cpp_op("permutation_attention_bwd")
    out, lse = fwd(q, k, v, kind, step, real, scale, *blocks)
    grads = bwd(grad_out, q, k, v, out, lse, kind, step, real, scale, *blocks)
    return out, lse, grads


def run_triton(q, k, v, kind, step, real, grad_out, scale, blocks):
    from fastvl_kernels.perm_attention_triton import perm_attention_bwd_triton, perm_attention_fwd_triton

    rule = pa.encode_rule(kind, step, real)
    out, lse = perm_attention_fwd_triton(q, k, v, rule, scale, *blocks)
    grads = perm_attention_bwd_triton(grad_out, q, k, v, out, lse, rule, scale, *blocks)
    return out, lse, grads


def run_public(impl):
    def run(q, k, v, kind, step, real, grad_out, scale, blocks):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = pa.permutation_attention(*leaves, kind, step, real, scale=scale, return_lse=True, impl=impl)
        grads = torch.autograd.grad(out, leaves, grad_out)
        return out.detach(), lse, grads
    return run


RUNNERS = {
    "cpp": pytest.param(run_cpp, marks=needs_cpp, id="cpp"),
    "triton": pytest.param(run_triton, marks=needs_triton, id="triton"),
    "sdpa": pytest.param(run_public("sdpa"), id="sdpa"),
    "reference_op": pytest.param(run_public("reference"), id="reference_op"),
}


# --------------------------------------------------------------------------------------------------
# Correctness against the reference.
# --------------------------------------------------------------------------------------------------
SHAPES = [(1, 1, 37, 16), (2, 3, 50, 32), (2, 2, 24, 64)]


@pytest.mark.parametrize("layout", ["unilm", "random"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}L{}D{}".format(*s))
@pytest.mark.parametrize("runner", [RUNNERS["cpp"], RUNNERS["sdpa"], RUNNERS["reference_op"]])
def test_fp32_matches_reference(runner, shape, layout):
    batch, heads, seq_len, head_dim = shape
    gen = torch.Generator().manual_seed(seq_len * 7 + head_dim)
    if layout == "unilm":
        kind, step, real = unilm_layout(batch, seq_len, gen, pad=batch > 1)
    else:
        kind, step, real = random_rule(batch, seq_len, gen)
    q, k, v = qkv(batch, heads, seq_len, head_dim, torch.float32, gen)
    grad_out = torch.randn(q.shape, generator=gen)
    scale = 0.3
    out_ref, lse_ref, grads_ref = reference_with_grads(q, k, v, kind, step, real, grad_out, scale)
    # C++: small tiles (several per row, so skipping and partial tiles happen) and the defaults.
    for blocks in ((8, 16), (0, 0)) if runner is run_cpp else ((0, 0),):
        out, lse, grads = runner(q, k, v, kind, step, real, grad_out, scale, blocks)
        assert_close_verbose(out, out_ref, 1e-5, 1e-4, f"out {blocks}")
        assert_close_verbose(lse, lse_ref, 1e-5, 1e-5, f"lse {blocks}")
        for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close_verbose(g, g_ref, 2e-5, 1e-4, f"{name} {blocks}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 37, 16), (2, 2, 50, 32), (1, 2, 20, 64)],
                         ids=lambda s: "B{}H{}L{}D{}".format(*s))
def test_triton_matches_reference(shape, dtype):
    batch, heads, seq_len, head_dim = shape
    gen = torch.Generator().manual_seed(seq_len + head_dim)
    kind, step, real = unilm_layout(batch, seq_len, gen, pad=batch > 1)
    q, k, v = qkv(batch, heads, seq_len, head_dim, dtype, gen)
    grad_out = torch.randn(q.shape, generator=gen).to(dtype)
    out, lse, grads = run_triton(q, k, v, kind, step, real, grad_out, head_dim**-0.5, (16, 16))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    out_ref, lse_ref, grads_ref = reference_with_grads(q, k, v, kind, step, real, grad_out)
    if dtype == torch.float32:
        assert_close_verbose(out, out_ref, 1e-5, 1e-4, "out")
        assert_close_verbose(lse, lse_ref, 1e-5, 1e-5, "lse")
        for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close_verbose(g, g_ref, 2e-5, 1e-4, name)
    else:
        out_naive, grads_naive = same_dtype_naive(q, k, v, kind, step, real, grad_out)
        assert_within_rounding(out, out_ref, out_naive, "out")
        assert_close_verbose(lse, lse_ref, 1e-2, 1e-3, "lse")
        for name, g, g_ref, g_naive in zip(("dq", "dk", "dv"), grads, grads_ref, grads_naive):
            assert_within_rounding(g, g_ref, g_naive, name)


@needs_triton
def test_triton_through_public_api():
    """impl='triton' on CPU tensors (interpreter) through the registered op and autograd, default tiles,
    q/k/v as strided [B, L, H, D] memory."""
    gen = torch.Generator().manual_seed(3)
    kind, step, real = random_rule(2, 40, gen)
    q, k, v = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(2, 2, 40, 32, torch.float32, gen)]
    grad_out = torch.randn(q.shape, generator=gen)
    out, lse, grads = run_public("triton")(q, k, v, kind, step, real, grad_out, None, None)
    out_ref, lse_ref, grads_ref = reference_with_grads(q, k, v, kind, step, real, grad_out)
    assert_close_verbose(out, out_ref, 1e-5, 1e-4, "out")
    assert_close_verbose(lse, lse_ref, 1e-5, 1e-5, "lse")
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close_verbose(g, g_ref, 2e-5, 1e-4, name)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpp_low_precision(dtype):
    gen = torch.Generator().manual_seed(11)
    kind, step, real = unilm_layout(2, 50, gen, pad=True)
    q, k, v = qkv(2, 3, 50, 32, dtype, gen)
    grad_out = torch.randn(q.shape, generator=gen).to(dtype)
    for blocks in ((8, 16), (0, 0)):
        out, lse, grads = run_cpp(q, k, v, kind, step, real, grad_out, 32**-0.5, blocks)
        assert out.dtype == dtype and lse.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
        out_ref, lse_ref, grads_ref = reference_with_grads(q, k, v, kind, step, real, grad_out)
        out_naive, grads_naive = same_dtype_naive(q, k, v, kind, step, real, grad_out)
        assert_within_rounding(out, out_ref, out_naive, f"out {blocks}")
        assert_close_verbose(lse, lse_ref, 1e-4, 1e-4, f"lse {blocks}")  # fp32 math on rounded inputs
        for name, g, g_ref, g_naive in zip(("dq", "dk", "dv"), grads, grads_ref, grads_naive):
            assert_within_rounding(g, g_ref, g_naive, f"{name} {blocks}")


def test_sdpa_fp16():
    gen = torch.Generator().manual_seed(12)
    kind, step, real = unilm_layout(2, 37, gen, pad=True)
    q, k, v = qkv(2, 2, 37, 16, torch.float16, gen)
    grad_out = torch.randn(q.shape, generator=gen).half()
    out, lse, grads = run_public("sdpa")(q, k, v, kind, step, real, grad_out, None, None)
    out_ref, _, grads_ref = reference_with_grads(q, k, v, kind, step, real, grad_out)
    out_naive, grads_naive = same_dtype_naive(q, k, v, kind, step, real, grad_out)
    assert_within_rounding(out, out_ref, out_naive, "out")
    for name, g, g_ref, g_naive in zip(("dq", "dk", "dv"), grads, grads_ref, grads_naive):
        assert_within_rounding(g, g_ref, g_naive, name)


# --------------------------------------------------------------------------------------------------
# The rule: encoding, special cases, visualiser.
# --------------------------------------------------------------------------------------------------
def test_encoding_matches_dense_rule():
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        kind, step, real = random_rule(3, 29, gen)
        rule = pa.encode_rule(kind, step, real)
        encoded = ((rule.key_req[:, None, :] <= rule.query_thr[:, :, None])
                   | (rule.key_pid[:, None, :] == rule.query_pid[:, :, None]))
        assert torch.equal(encoded, pa.permutation_mask(kind, step, real))


def test_describe_mask_grid():
    grid = pa.describe_mask(torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([0, 0, 2, 1, 2, 1]))
    assert grid.splitlines() == [
        "    c  c  O2 O1 P2 P1",
        "c   #  #  .  .  .  .",
        "c   #  #  .  .  .  .",
        "O2  #  #  #  #  .  .",
        "O1  #  #  .  #  .  .",
        "P2  #  #  .  #  #  .",
        "P1  #  #  .  .  .  #",
    ]


def _special_cases(seq_len: int):
    """(name, kind, step, equivalent dense mask built by hand [L, L]) for one row."""
    pos = torch.arange(seq_len)
    causal = pos[:, None] >= pos[None, :]
    cases = [("bidirectional", torch.zeros(seq_len, dtype=torch.long), torch.zeros(seq_len, dtype=torch.long),
              torch.ones(seq_len, seq_len, dtype=torch.bool))]
    # MLM with [MASK] ids in place: attention is plain bidirectional; the ids live in the embeddings.
    cases.append(("mlm", torch.zeros(seq_len, dtype=torch.long), torch.zeros(seq_len, dtype=torch.long),
                  torch.ones(seq_len, seq_len, dtype=torch.bool)))
    cases.append(("causal", torch.full((seq_len,), ORIGINAL), pos + 1, causal))
    prefix = seq_len // 3
    kind = torch.where(pos < prefix, CONTEXT, ORIGINAL)
    step = torch.where(pos < prefix, 0, pos - prefix + 1)
    prefix_mask = (pos[None, :] < prefix) | causal
    cases.append(("prefix_lm", kind, step, prefix_mask))
    # Pseudo-only MLM: every masked position is a pseudo mask of one step, no originals: the masks
    # see the context and each other, the context sees only the context.
    is_mask = pos % 3 == 1
    kind = torch.where(is_mask, PSEUDO, CONTEXT)
    step = is_mask.long()
    pseudo_mask = ~is_mask[None, :] | (is_mask[:, None] & is_mask[None, :])
    cases.append(("pseudo_only_mlm", kind, step, pseudo_mask))
    return cases


SPECIAL_IMPLS = [pytest.param("reference", id="reference"), pytest.param("sdpa", id="sdpa"),
                 pytest.param("cpp", marks=needs_cpp, id="cpp"),
                 pytest.param("triton", marks=needs_triton, id="triton")]


@pytest.mark.parametrize("impl", SPECIAL_IMPLS)
def test_special_cases_match_sdpa(impl):
    seq_len, heads, head_dim = 45, 2, 16
    gen = torch.Generator().manual_seed(5)
    for name, kind, step, dense in _special_cases(seq_len):
        kind, step = kind[None].expand(2, -1), step[None].expand(2, -1)
        assert torch.equal(pa.permutation_mask(kind, step)[0], dense), name
        q, k, v = [t.requires_grad_() for t in qkv(2, heads, seq_len, head_dim, torch.float32, gen)]
        if name == "causal":
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        grad_out = torch.randn(expected.shape, generator=gen)
        grads_expected = torch.autograd.grad(expected, (q, k, v), grad_out)
        out = pa.permutation_attention(q, k, v, kind, step, impl=impl)
        runs = [("public", out, torch.autograd.grad(out, (q, k, v), grad_out))]
        # Small tiles as well: fully visible tiles (no masking) and skipped ones both occur.
        small = {"cpp": (run_cpp, (8, 16)), "triton": (run_triton, (16, 16))}.get(impl)
        if small is not None:
            tiled_out, _, tiled_grads = small[0](q.detach(), k.detach(), v.detach(), kind, step, None, grad_out,
                                                 head_dim**-0.5, small[1])
            runs.append(("small tiles", tiled_out, tiled_grads))
        for run, out, grads in runs:
            assert_close_verbose(out, expected, 1e-5, 1e-4, f"{name} {run} out")
            for gname, g, g_exp in zip(("dq", "dk", "dv"), grads, grads_expected):
                assert_close_verbose(g, g_exp, 2e-5, 1e-4, f"{name} {run} {gname}")


def test_tile_summaries_are_sound_and_skip_causal():
    gen = torch.Generator().manual_seed(9)
    for kind, step, real in [random_rule(2, 70, gen), unilm_layout(2, 70, gen, pad=True)]:
        for block_m, block_n in ((8, 8), (16, 32), (64, 64)):
            live = pa.tile_live_map(kind, step, real, block_m=block_m, block_n=block_n)
            dense = pa.permutation_mask(kind, step, real)
            pad_m, pad_n = -70 % block_m, -70 % block_n
            blocks = F.pad(dense, (0, pad_n, 0, pad_m)).reshape(2, live.shape[1], block_m, live.shape[2], block_n)
            any_visible = blocks.any(4).any(2)
            assert not (any_visible & ~live).any(), "a skipped tile holds a visible pair"
    # Left-to-right order at L=1024, 64 x 64 tiles: exactly the strict upper triangle is skipped.
    seq_len = 1024
    kind = torch.full((1, seq_len), ORIGINAL)
    step = torch.arange(1, seq_len + 1)[None]
    live = pa.tile_live_map(kind, step, block_m=64, block_n=64)[0]
    assert torch.equal(live, torch.ones(16, 16, dtype=torch.bool).tril())
    assert pa.permutation_tile_skip_fraction(kind, step) == pytest.approx(120 / 256)


# --------------------------------------------------------------------------------------------------
# No leakage; rows that see nothing.
# --------------------------------------------------------------------------------------------------
LEAK_IMPLS = [pytest.param("reference", id="reference"), pytest.param("sdpa", id="sdpa"),
              pytest.param("cpp", marks=needs_cpp, id="cpp"), pytest.param("triton", marks=needs_triton, id="triton")]


@pytest.mark.parametrize("impl", LEAK_IMPLS)
def test_pseudo_rows_do_not_see_what_they_predict(impl):
    """Changing the ORIGINAL tokens of steps >= s (their q, k, v) leaves the outputs of the PSEUDO rows
    of step s unchanged (and those of context rows), for random span orders; rows of later steps,
    which may see them, do change (so the check is not vacuous)."""
    seq_len = 40 if impl == "triton" else 60
    gen = torch.Generator().manual_seed(21)
    kind, step, real = unilm_layout(2, seq_len, gen, mask_ratio=0.4)
    q, k, v = qkv(2, 2, seq_len, 16, torch.float32, gen)
    base = pa.permutation_attention(q, k, v, kind, step, real, impl=impl)
    checked_change = False
    for s in range(1, int(step.max()) + 1):
        changed = (kind == ORIGINAL) & (step >= s)
        if not changed.any():
            continue
        noise = changed[:, None, :, None] * 10.0
        q2, k2, v2 = (t + noise * torch.randn(t.shape, generator=gen) for t in (q, k, v))
        out = pa.permutation_attention(q2, k2, v2, kind, step, real, impl=impl)
        frozen = ((kind == PSEUDO) & (step == s)) | (kind == CONTEXT)
        rows = frozen[:, None, :].expand(-1, 2, -1)
        torch.testing.assert_close(out[rows], base[rows], atol=1e-6, rtol=0, msg=f"leak at step {s}")
        later = ((kind == PSEUDO) & (step > s))[:, None, :].expand(-1, 2, -1)
        if later.any():
            checked_change |= bool(((out[later] - base[later]).abs() > 1e-3).any())
    assert checked_change


@pytest.mark.parametrize("impl", LEAK_IMPLS)
def test_rows_that_see_nothing(impl):
    """Padded query rows, and a sample whose every token is padding: output 0, lse 0, finite grads,
    zero gradient into those rows' q."""
    seq_len = 33
    gen = torch.Generator().manual_seed(4)
    kind, step, _ = unilm_layout(2, seq_len, gen)
    real = torch.ones(2, seq_len, dtype=torch.bool)
    real[0, 5:9] = False
    real[1] = False
    q, k, v = [t.requires_grad_() for t in qkv(2, 2, seq_len, 16, torch.float32, gen)]
    out, lse = pa.permutation_attention(q, k, v, kind, step, real, impl=impl, return_lse=True)
    empty = (~real)[:, None, :].expand(-1, 2, -1)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[empty], torch.zeros_like(lse[empty]))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    (out * torch.randn(out.shape, generator=gen)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty]))
    assert torch.equal(k.grad[empty], torch.zeros_like(k.grad[empty]))  # padded keys are seen by no one


# --------------------------------------------------------------------------------------------------
# Registration, compile, dispatch, validation.
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [pytest.param("cpp", marks=needs_cpp), "sdpa", "reference"])
def test_opcheck(impl):
    gen = torch.Generator().manual_seed(2)
    kind, step, real = random_rule(2, 19, gen)
    # [B, L, H, D] memory viewed as [B, H, L, D], as a model's projections produce them
    q, k, v = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
               for t in qkv(2, 2, 19, 16, torch.float32, gen)]
    torch.library.opcheck(torch.ops.fastvl_kernels.permutation_attention_fwd.default,
                          (q, k, v, kind, step, real, 0.25, impl))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile(backend):
    gen = torch.Generator().manual_seed(8)
    kind, step, real = unilm_layout(2, 30, gen, pad=True)
    q, k, v = qkv(2, 2, 30, 16, torch.float32, gen)

    def loss(q, k, v):
        out, lse = pa.permutation_attention(q, k, v, kind, step, real, return_lse=True)
        return (out.square().sum() + lse.sum()), out

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    leaves_eager = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_comp = [t.clone().requires_grad_() for t in (q, k, v)]
    value_eager, out_eager = loss(*leaves_eager)
    value_comp, out_comp = compiled(*leaves_comp)
    value_eager.backward()
    value_comp.backward()
    torch.testing.assert_close(out_comp, out_eager)
    for a, b in zip(leaves_comp, leaves_eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_dispatch_and_validation():
    gen = torch.Generator().manual_seed(1)
    kind, step, real = random_rule(1, 8, gen)
    q, k, v = qkv(1, 1, 8, 16, torch.float32, gen)
    assert pa._choose_impl("auto", q) in ("cpp", "sdpa")
    assert pa._choose_impl("sdpa", q) == "sdpa"
    with pytest.raises(ValueError, match="impl"):
        pa.permutation_attention(q, k, v, kind, step, impl="flash")
    with pytest.raises(ValueError, match="kind"):
        pa.permutation_attention(q, k, v, kind.float(), step)
    with pytest.raises(ValueError, match="kind values"):
        pa.permutation_attention(q, k, v, kind + 3, step)
    with pytest.raises(ValueError, match="step"):
        pa.permutation_attention(q, k, v, torch.ones_like(kind), step - 10)
    with pytest.raises(ValueError, match="key_padding_mask"):
        pa.permutation_attention(q, k, v, kind, step, real.long())
    with pytest.raises(ValueError, match="q, k, v"):
        pa.permutation_attention(q, k[:, :, :4], v, kind, step)
    if not TRITON_ON_CPU:
        with pytest.raises(RuntimeError, match="Triton"):
            pa.permutation_attention(q, k, v, kind, step, impl="triton")


@needs_cpp
def test_cpp_rejects_bad_blocks_and_kinds():
    gen = torch.Generator().manual_seed(1)
    kind, step, real = random_rule(1, 8, gen)
    q, k, v = qkv(1, 1, 8, 16, torch.float32, gen)
    fwd = cpp_op("permutation_attention_fwd")
    with pytest.raises(RuntimeError, match="multiples of 8"):
        fwd(q, k, v, kind, step, real, 0.25, 12, 16)
    with pytest.raises(RuntimeError, match="kind must be"):
        fwd(q, k, v, kind + 3, step, None, 0.25)

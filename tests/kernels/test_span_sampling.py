"""Tests of span-mask sampling (fastvl_kernels.sample_spans) and its differentiable log-prob.

Every implementation is checked for the sample's invariants, determinism, edge cases, agreement of
its log_prob/entropy with ``span_action_log_prob``, and its *law*: empirical frequencies over many
rows of one batch against probabilities computed exactly here (chi-square tests). The Triton kernel
runs in the interpreter (TRITON_INTERPRET=1), where one row costs tens of milliseconds, so its
statistical tests use fewer rows; it is also checked draw for draw against the C++ kernel, which
uses the same Philox stream.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import: CPU-only machines

import math
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch

from fastvl_kernels import span_sampling as ss
from fastvl_kernels._cpp import cpp_op
from fastvl_kernels._triton import HAS_TRITON, triton_runs_on
from fastvl_kernels.span_sampling import (
    SpanSample,
    quota_counts,
    sample_spans,
    sample_spans_reference,
    span_action_log_prob,
)

HAS_CPP_OP = cpp_op("sample_spans") is not None
TRITON_ON_CPU = triton_runs_on(torch.device("cpu"))
needs_cpp = pytest.mark.skipif(not HAS_CPP_OP, reason="C++ extension not built: pip install --no-build-isolation -e .")
needs_triton = pytest.mark.skipif(
    not TRITON_ON_CPU, reason="Triton interpreter off: TRITON_INTERPRET=1 must be set before triton is first imported")
IMPLS = ["reference", pytest.param("cpp", marks=needs_cpp), pytest.param("triton", marks=needs_triton)]
ORDERS = ["learned", "left_to_right", "random", "single"]
# Rows per statistical test: the interpreter is ~1000x slower per row than the C++ kernel.
N_STAT = {"reference": 20000, "cpp": 20000, "triton": 300}


def draw(impl, p, s, lengths, quota, seed, g=None, order="learned") -> SpanSample:
    return sample_spans(p, s, lengths, quota, seed, order_scores=g, order=order, impl=impl)


def make_inputs(B, L, seed=0, dtype=torch.float32, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(B, L, generator=gen)
    p[torch.rand(B, L, generator=gen) < 0.2] = 0.0  # some impossible starts
    s = torch.rand(B, L, generator=gen)
    g = torch.randn(B, L, generator=gen)
    if lengths is None:
        lengths = torch.randint(0, L + 1, (B,), generator=gen)
    return p.to(dtype), s.to(dtype), g.to(dtype), lengths


def check_invariants(out: SpanSample, lengths: torch.Tensor, counts: torch.Tensor, order: str) -> None:
    """Quota met exactly, nothing past the length, spans are contiguous runs numbered 1..K, steps
    constant per span and a permutation of 1..K (all 1 for "single", by start for left_to_right)."""
    B, L = out.mask.shape
    assert out.mask.dtype == torch.bool and out.span_id.dtype == torch.int64 and out.step.dtype == torch.int64
    assert out.log_prob.shape == (B,) and out.log_prob.dtype == torch.float32
    assert out.entropy.shape == (B,) and out.entropy.dtype == torch.float32
    assert torch.isfinite(out.log_prob).all() and torch.isfinite(out.entropy).all()
    assert torch.equal(out.mask, out.span_id > 0)
    assert torch.equal(out.mask, out.step > 0)
    assert torch.equal(out.mask.sum(1), counts)
    pos = torch.arange(L)
    assert not (out.mask & (pos >= lengths[:, None])).any()
    assert (out.log_prob <= 1e-5).all() and (out.entropy >= -1e-5).all()
    for b in range(B):
        sid, step = out.span_id[b], out.step[b]
        n_spans = int(sid.max())
        span_steps, starts = [], []
        for k in range(1, n_spans + 1):
            where = (sid == k).nonzero().flatten()
            assert len(where) > 0, f"row {b}: span ids not numbered 1..K"
            assert int(where[-1] - where[0]) + 1 == len(where), f"row {b}: span {k} is not a contiguous run"
            assert step[where].unique().numel() == 1, f"row {b}: span {k} has several steps"
            span_steps.append(int(step[where[0]]))
            starts.append(int(where[0]))
        if order == "single":
            assert all(t == 1 for t in span_steps)
        else:
            assert sorted(span_steps) == list(range(1, n_spans + 1)), f"row {b}: steps {span_steps}"
        if order == "left_to_right":
            assert [t for _, t in sorted(zip(starts, span_steps))] == list(range(1, n_spans + 1))


def chi2_pvalue(observed: dict, probs: dict, n: int) -> float:
    """Pearson chi-square p-value of counts ``observed[cell]`` against ``n * probs[cell]``; cells
    expected below 5 (and any observed cell missing from ``probs``) are pooled into one."""
    assert set(observed) <= set(probs), f"impossible outcomes drawn: {set(observed) - set(probs)}"
    big = [c for c in probs if n * probs[c] >= 5]
    obs = [observed.get(c, 0) for c in big]
    exp = [n * probs[c] for c in big]
    rest_exp = n - sum(exp)
    if rest_exp > 1e-9:
        obs.append(n - sum(obs))
        exp.append(rest_exp)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


# --------------------------------------------------------------------------------------------
# Invariants, determinism, edge cases
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sample_invariants(impl, order, dtype):
    B, L = 7, 13  # odd L: not a power of two
    p, s, g, _ = make_inputs(B, L, seed=1, dtype=dtype)
    lengths = torch.tensor([13, 0, 1, 12, 5, 9, 13])
    for quota in (0.5, 4):
        out = draw(impl, p, s, lengths, quota, seed=11, g=g, order=order)
        check_invariants(out, lengths, quota_counts(lengths, quota, L), order)


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_sample_other_seed_other_sample(impl):
    p, s, g, lengths = make_inputs(6, 12, seed=2, lengths=torch.full((6,), 12))
    a = draw(impl, p, s, lengths, 0.5, seed=5, g=g)
    b = draw(impl, p, s, lengths, 0.5, seed=5, g=g)
    c = draw(impl, p, s, lengths, 0.5, seed=6, g=g)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(a.span_id, c.span_id)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_inputs_sample_like_their_fp32_values(impl):
    p, s, g, lengths = make_inputs(5, 10, seed=3)
    p16, s16, g16 = p.half(), s.half(), g.half()
    a = draw(impl, p16, s16, lengths, 0.5, seed=9, g=g16)
    b = draw(impl, p16.float(), s16.float(), lengths, 0.5, seed=9, g=g16.float())
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_certain_span(impl):
    # One possible start (2) and s = 1 everywhere: one span 2..5 with probability 1.
    L = 9
    p = torch.zeros(1, L)
    p[0, 2] = 0.7
    s = torch.ones(1, L)
    lengths = torch.tensor([8])
    out = draw(impl, p, s, lengths, 4, seed=0, g=torch.randn(1, L))
    assert out.span_id[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert out.step[0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, 0]
    assert out.log_prob.abs().item() < 1e-6 and out.entropy.abs().item() < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_span_hits_the_end_then_restarts(impl):
    # Start forced at the last valid token: the span stops at the end (no decision) and a second
    # span must start among the rest.
    L = 6
    p = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 5.0]])
    s = torch.ones(1, L)
    out = draw(impl, p, s, torch.tensor([5]), 2, seed=3, order="left_to_right")
    assert out.span_id[0, 4] == 1 and int(out.mask[0].sum()) == 2 and int(out.span_id.max()) == 2
    assert out.mask[0, 5].item() is False


@pytest.mark.parametrize("impl", IMPLS)
def test_quota_larger_than_sequence_masks_every_valid_token(impl):
    p, s, g, _ = make_inputs(3, 8, seed=4)
    lengths = torch.tensor([8, 3, 6])
    out = draw(impl, p, s, lengths, 100, seed=1, g=g, order="single")
    assert torch.equal(out.mask, torch.arange(8) < lengths[:, None])
    check_invariants(out, lengths, lengths, "single")


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_and_nonfinite_start_probs_fall_back_to_uniform(impl):
    L = 7
    p = torch.zeros(4, L)
    p[1] = float("nan")
    p[2, :3] = float("inf")  # non-finite entries are dropped; the rest are 0 -> uniform
    p[3] = torch.tensor([0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0])  # one usable start, then uniform
    s = torch.zeros(4, L)  # spans of length 1
    lengths = torch.tensor([7, 7, 5, 7])
    out = draw(impl, p, s, lengths, 3, seed=2, order="random")
    check_invariants(out, lengths, torch.tensor([3, 3, 3, 3]), "random")
    assert out.span_id[3, 3] == 1
    # All starts uniform: log-prob = log(1/7 * 1/6 * 1/5) + log(1/3!) (Bernoulli s=0 terms are 0).
    expected = -math.log(7 * 6 * 5) - math.log(6)
    assert out.log_prob[0].item() == pytest.approx(expected, abs=1e-5)
    assert out.entropy[0].item() == pytest.approx(-expected, abs=1e-5)
    lp, ent = span_action_log_prob(p, s, lengths, 3, out, order="random")
    torch.testing.assert_close(lp, out.log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, out.entropy, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_of_one_and_empty_row(impl):
    p, s, g, _ = make_inputs(1, 5, seed=5)
    out = draw(impl, p, s, torch.tensor([5]), 0.4, seed=0, g=g)
    check_invariants(out, torch.tensor([5]), torch.tensor([2]), "learned")
    out = draw(impl, p, s, torch.tensor([0]), 0.4, seed=0, g=g)
    assert not out.mask.any() and out.log_prob.item() == 0.0 and out.entropy.item() == 0.0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,L", [(0, 5), (3, 0), (2, 1)])
def test_degenerate_shapes(impl, B, L):
    p, s, g, _ = make_inputs(B, L)
    lengths = torch.full((B,), L)
    out = draw(impl, p, s, lengths, 0.5, seed=1, g=g)
    assert out.mask.shape == (B, L) and out.log_prob.shape == (B,)
    assert torch.equal(out.mask.sum(1), quota_counts(lengths, 0.5, L))
    lp, ent = span_action_log_prob(p, s, lengths, 0.5, out, order_scores=g)
    torch.testing.assert_close(lp, out.log_prob)
    torch.testing.assert_close(ent, out.entropy)


def test_quota_counts():
    lengths = torch.tensor([0, 1, 7, 20, 40])
    assert quota_counts(lengths, 0.5, 40).tolist() == [0, 1, 4, 10, 20]
    assert quota_counts(lengths, 0.15, 40).tolist() == [0, 1, 2, 3, 6]  # 0.15 * 20 is 3, not 4
    assert quota_counts(lengths, 1.0, 40).tolist() == [0, 1, 7, 20, 40]
    assert quota_counts(lengths, 3, 40).tolist() == [0, 1, 3, 3, 3]
    assert quota_counts(torch.tensor([50]), 100, 40).tolist() == [40]  # lengths clamp to L
    for bad in (0.0, 1.5, -1, True):
        with pytest.raises((ValueError, TypeError)):
            quota_counts(lengths, bad, 40)


def test_input_errors():
    p, s, g, lengths = make_inputs(2, 6)
    with pytest.raises(ValueError, match="order_scores"):
        sample_spans(p, s, lengths, 0.5, 0)
    with pytest.raises(ValueError, match="order must be"):
        sample_spans(p, s, lengths, 0.5, 0, order="backwards")
    with pytest.raises(ValueError, match="cont_probs"):
        sample_spans(p, s[:, :5], lengths, 0.5, 0, order="single")
    with pytest.raises(ValueError):
        sample_spans(p, s, lengths, 0.5, 0, impl="cuda")


def test_reference_entry_point_is_the_reference_impl():
    p, s, g, lengths = make_inputs(5, 9, seed=6)
    a = sample_spans_reference(p, s, lengths, 0.5, 21, order_scores=g)
    b = sample_spans(p, s, lengths, 0.5, 21, order_scores=g, impl="reference")
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@needs_cpp
@needs_triton
@pytest.mark.parametrize("order", ORDERS)
def test_cpp_and_triton_draw_the_same_samples(order):
    # Same Philox stream and the same inverse-CDF rule: identical samples, log-probs to fp32 rounding.
    p, s, g, lengths = make_inputs(12, 11, seed=7)
    a = draw("cpp", p, s, lengths, 0.5, seed=1234, g=g, order=order)
    b = draw("triton", p, s, lengths, 0.5, seed=1234, g=g, order=order)
    for name in ("mask", "span_id", "step"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# log_prob / entropy: sampler vs the differentiable recomputation, and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("order", ORDERS)
def test_log_prob_and_entropy_match_recomputation(impl, order):
    p, s, g, lengths = make_inputs(8, 12, seed=8)
    lengths[0] = 12
    for quota in (0.6, 3):
        out = draw(impl, p, s, lengths, quota, seed=77, g=g, order=order)
        lp, ent = span_action_log_prob(p, s, lengths, quota, out, order_scores=g, order=order)
        assert lp.dtype == torch.float32 and ent.dtype == torch.float32
        torch.testing.assert_close(lp, out.log_prob, rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ent, out.entropy, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("order", ["learned", "random", "left_to_right"])
def test_span_action_log_prob_gradcheck(order):
    gen = torch.Generator().manual_seed(9)
    B, L = 3, 6
    # Away from 0/1 so that finite differences stay inside the distribution's support.
    p = (0.1 + torch.rand(B, L, generator=gen)).double()
    s = (0.1 + 0.8 * torch.rand(B, L, generator=gen)).double()
    g = torch.randn(B, L, generator=gen).double()
    lengths = torch.tensor([6, 5, 4])
    sample = sample_spans_reference(p.float(), s.float(), lengths, 3, 5, order_scores=g.float(), order=order)
    assert int(sample.span_id.max()) >= 2  # several spans: the start, refusal and PL terms all appear

    def fn(p, s, g):
        return span_action_log_prob(p, s, lengths, 3, sample, order_scores=g, order=order)

    inputs = tuple(x.clone().requires_grad_() for x in (p, s, g))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_span_action_log_prob_gradients_finite_at_boundaries():
    # Zero/NaN start probs (uniform guard), s at exactly 0 and 1, padding: gradients must stay finite.
    p = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.0, 0.0], [0.0] * 6, [float("nan"), 1.0, 2.0, 0.0, 1.0, 1.0]])
    s = torch.tensor([[0.0, 1.0, 1.0, 0.3, 0.0, 1.0], [0.5] * 6, [1.0, 0.0, 0.9, 1.0, 0.2, 0.0]])
    g = torch.randn(3, 6)
    lengths = torch.tensor([5, 6, 6])
    sample = sample_spans_reference(p, s, lengths, 3, 1, order_scores=g)
    inputs = [x.clone().requires_grad_() for x in (p, s, g)]
    lp, ent = span_action_log_prob(*inputs[:2], lengths, 3, sample, order_scores=inputs[2])
    torch.testing.assert_close(lp, sample.log_prob, rtol=1e-5, atol=1e-5)
    (lp.sum() + ent.sum()).backward()
    for x in inputs:
        assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# The law of the sample: exact probabilities vs empirical frequencies over one big batch
# --------------------------------------------------------------------------------------------


def first_span_law(p, s, length, n):
    """Exact P(first start = i, first span length = l) for one row (first span: nothing masked)."""
    w = torch.where(torch.isfinite(p) & (p > 0), p, torch.zeros_like(p))[:length].double()
    start = w / w.sum()
    law = {}
    for i in range(length):
        reach = 1.0  # P(span reaches length l | start i)
        for l in range(1, min(n, length - i) + 1):
            j = i + l  # next position after a span of length l
            stop = 1.0 if (j >= length or l == n) else 1.0 - float(s[j])
            law[(i, l)] = float(start[i]) * reach * stop
            if j < length:
                reach *= float(s[j])
    return law


@pytest.mark.parametrize("impl", IMPLS)
def test_first_start_and_span_length_frequencies(impl):
    N, L, length, n = N_STAT[impl], 6, 5, 3
    p = torch.tensor([0.3, 0.0, 1.0, 0.5, 0.2, 4.0])  # position 5 is padding
    s = torch.tensor([0.9, 0.7, 0.4, 0.8, 0.5, 0.9])
    out = draw(impl, p.expand(N, L), s.expand(N, L), torch.full((N,), length), n, seed=101, order="single")
    first = out.span_id == 1
    starts = first.int().argmax(1)
    sizes = first.sum(1)
    observed = Counter(zip(starts.tolist(), sizes.tolist()))
    law = first_span_law(p, s, length, n)
    assert chi2_pvalue(observed, law, N) > 1e-4
    # Marginals, with a tolerance of 5 binomial standard deviations per cell.
    for name, values, exact in (
        ("start", starts, {i: sum(v for (a, _), v in law.items() if a == i) for i in range(length)}),
        ("length", sizes, {l: sum(v for (_, b), v in law.items() if b == l) for l in range(1, n + 1)}),
    ):
        for key, prob in exact.items():
            freq = (values == key).double().mean().item()
            assert abs(freq - prob) <= 5 * math.sqrt(prob * (1 - prob) / N) + 1e-9, (name, key, freq, prob)


@pytest.mark.parametrize("impl", IMPLS)
def test_plackett_luce_first_choice_frequencies(impl):
    # Every valid token is its own span (s = 0, quota = length): the first step is softmax(g).
    N, L = min(N_STAT[impl], 250), 4  # 11 decisions per row: fewer rows in the interpreter
    g = torch.tensor([0.5, -1.0, 1.2, 0.0])
    out = draw(impl, torch.ones(N, L), torch.zeros(N, L), torch.full((N,), L), L, seed=202,
               g=g.expand(N, L), order="learned")
    first = (out.step == 1).int().argmax(1)
    observed = Counter(first.tolist())
    law = dict(enumerate(torch.softmax(g.double(), 0).tolist()))
    assert chi2_pvalue(observed, law, N) > 1e-4


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("order", ["learned", "random"])
def test_composite_action_law_and_entropy_estimator(impl, order):
    """Each distinct outcome (spans, sampling order, factorization order) appears with frequency
    exp(log_prob): the sampler and its log-prob describe the same law. The mean of the entropy
    estimator matches the exact joint entropy -sum P log P (chain rule)."""
    N, L = N_STAT[impl], 5
    p = torch.tensor([0.1, 0.4, 0.2, 0.3, 0.9])
    s = torch.tensor([0.5, 0.6, 0.3, 0.8, 0.9])
    g = torch.tensor([0.5, -1.0, 1.5, 0.0, 2.0])
    P, S, G, lengths = p.expand(N, L), s.expand(N, L), g.expand(N, L), torch.full((N,), 4)
    out = draw(impl, P, S, lengths, 2, seed=303, g=G, order=order)
    lp, _ = span_action_log_prob(P, S, lengths, 2, out, order_scores=G, order=order)
    keys = [tuple(a) + tuple(b) for a, b in zip(out.span_id.tolist(), out.step.tolist())]
    prob = {}
    for key, value in zip(keys, lp.double().exp().tolist()):
        prob.setdefault(key, value)
    assert sum(prob.values()) > 0.995  # the observed outcomes carry (almost) all the mass
    assert chi2_pvalue(Counter(keys), prob, N) > 1e-4
    joint_entropy = -sum(q * math.log(q) for q in prob.values())
    est = out.entropy.double()
    assert abs(est.mean().item() - joint_entropy) < 5 * est.std().item() / math.sqrt(N) + 0.01


@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_left_to_right_and_single_orders_add_nothing_to_the_law(impl):
    # The same seed gives the same spans whatever the deterministic order; only steps differ.
    p, s, g, lengths = make_inputs(50, 10, seed=10)
    a = draw(impl, p, s, lengths, 0.5, seed=4, order="left_to_right")
    b = draw(impl, p, s, lengths, 0.5, seed=4, order="single")
    assert torch.equal(a.span_id, b.span_id)
    torch.testing.assert_close(a.log_prob, b.log_prob, rtol=0, atol=0)
    torch.testing.assert_close(a.entropy, b.entropy, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Custom op: fake impl, torch.compile, the CUDA compile of the Triton kernel
# --------------------------------------------------------------------------------------------


def test_opcheck_custom_op():
    p, s, g, lengths = make_inputs(4, 7, seed=11)
    counts = quota_counts(lengths, 0.5, 7)
    for impl in ("reference",) + (("cpp",) if HAS_CPP_OP else ()):
        torch.library.opcheck(ss._sample_spans_op, (p, s, lengths, counts, g, 3, "learned", impl))


def test_torch_compile_matches_eager():
    p, s, g, lengths = make_inputs(6, 10, seed=12)

    def fn(p, s, lengths, g, seed):
        out = sample_spans(p, s, lengths, 0.5, seed, order_scores=g)
        return out.mask, out.span_id, out.step, out.log_prob, out.entropy

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    for seed in (42, 43, 2**40):  # the seed turns into a symbolic int after the first recompile
        for x, y in zip(compiled(p, s, lengths, g, seed), fn(p, s, lengths, g, seed)):
            assert torch.equal(x, y)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernel_compiles_for_cuda():
    # No GPU here: compile the real (non-interpreted) kernel to a cubin for sm_80 in a clean process.
    script = textwrap.dedent("""
        import os
        os.environ.pop("TRITON_INTERPRET", None)
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastvl_kernels import span_sampling as ss
        sig = {n: "*fp32" for n in ("p_ptr", "s_ptr", "g_ptr")}
        sig.update({"lengths_ptr": "*i64", "counts_ptr": "*i64", "mask_ptr": "*i1", "span_id_ptr": "*i64",
                    "step_ptr": "*i64", "log_prob_ptr": "*fp32", "entropy_ptr": "*fp32", "seed": "i64",
                    "n_cols": "i32", "stride_p": "i32", "stride_s": "i32", "stride_g": "i32", "stride_out": "i32"})
        for order in range(4):
            src = ASTSource(fn=ss._sample_spans_kernel, signature=sig,
                            constexprs={"ORDER": order, "BLOCK_L": 64, "BLOCK_D": 128})
            compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32))
            assert len(compiled.asm["cubin"]) > 0
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

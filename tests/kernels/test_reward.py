"""value_weighted_topk_reward: the reference against a brute force with materialized attention, the
C++ and Triton (interpreter) kernels against the reference, no-grad behaviour, torch.compile, and the
Hugging Face drop-in helper.

Low-precision inputs follow flash-attention's rule: the kernel's error against an fp32 run on the same
(rounded) inputs must be at most twice the error of the PyTorch reference run in that dtype.
"""
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastvl_kernels import value_weighted_topk_reward, value_weighted_topk_reward_reference
from fastvl_kernels._cpp import cpp_op
from fastvl_kernels._triton import triton_runs_on

HAS_CPP_OP = cpp_op("value_weighted_topk_reward") is not None
needs_cpp = pytest.mark.skipif(not HAS_CPP_OP, reason="C++ extension (fastvl_kernels._C) not built")
needs_triton = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before fastvl_kernels is imported",
)


def make_inputs(B, H, T, I, D, J=0, *, pad_sources=False, pad_queries=False, dtype=torch.float32, seed=0):
    """Random q/k/v (+ extra keys) with value norms spread over ~[0.3, 3] and optional padding.

    Padding leaves sample 0 with at least three valid sources and, when B > 1, sample 1 with a
    single valid source, so top-k with k > #valid is exercised."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g)
    k = torch.randn(B, H, I, D, generator=g)
    v = torch.randn(B, H, I, D, generator=g) * (0.3 + 2.7 * torch.rand(B, H, I, 1, generator=g)) / math.sqrt(D)
    inputs = {"q": q, "k": k, "v": v}
    if J:
        inputs["extra_k"] = torch.randn(B, H, J, D, generator=g)
    if pad_sources:
        source_mask = torch.rand(B, I, generator=g) > 0.3
        source_mask[0, :3] = True
        if B > 1:
            source_mask[1] = False
            source_mask[1, I // 2] = True
        inputs["source_mask"] = source_mask
        if J:
            extra_mask = torch.rand(B, J, generator=g) > 0.3
            extra_mask[:, 0] = True
            inputs["extra_mask"] = extra_mask
    if pad_queries:
        query_mask = torch.rand(B, T, generator=g) > 0.3
        query_mask[:, 0] = True
        query_mask[0, -1] = False
        inputs["query_mask"] = query_mask
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}


def assert_close(actual, expected, atol, rtol, what=""):
    """allclose that says how many entries differ, the worst one and where it is."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = ~torch.isclose(actual, expected, atol=atol, rtol=rtol)
    if bad.any():
        err = (actual - expected).abs().where(bad, torch.zeros_like(actual))
        worst = tuple(int(i) for i in torch.nonzero(err == err.max())[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} entries differ; worst at {worst}: "
            f"{actual[worst].item():.7g} vs {expected[worst].item():.7g}"
        )


def brute_force(q, k, v, *, extra_k=None, source_mask=None, extra_mask=None, query_mask=None, topk=8, scale=None):
    """Eq. 4 with the full attention matrix in float64, one row at a time in Python."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    I = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    keys = k if extra_k is None else torch.cat([k, extra_k.double()], dim=2)
    visible = torch.ones(B, keys.shape[2], dtype=torch.bool)
    if source_mask is not None:
        visible[:, :I] = source_mask
    if extra_mask is not None:
        visible[:, I:] = extra_mask
    out = torch.zeros(B, H, T, dtype=torch.float64)
    for b in range(B):
        valid = [i for i in range(I) if visible[b, i]]
        if not valid:
            continue
        for h in range(H):
            scores = (q[b, h] @ keys[b, h].T) * scale
            attention = torch.softmax(scores.masked_fill(~visible[b], -math.inf), dim=-1)  # [T, I + J]
            norms = v[b, h].norm(dim=-1)
            for t in range(T):
                if query_mask is not None and not query_mask[b, t]:
                    continue
                a = [float(attention[t, i] * norms[i]) for i in valid]
                mean = sum(a) / len(a)
                top = sorted(a, reverse=True)[: min(topk, len(a))]
                out[b, h, t] = sum(x / mean for x in top) / len(top)
    return out.float()


# ------------------------------------------------------------------------------------------------
# The reference is the oracle: check it against the brute force first.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("B, H, T, I, D, J", [(1, 1, 5, 13, 16, 0), (2, 3, 5, 13, 16, 7), (2, 2, 4, 40, 8, 5)])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("topk", [1, 8, 20])
def test_reference_matches_brute_force(B, H, T, I, D, J, padding, topk):
    x = make_inputs(B, H, T, I, D, J, pad_sources=padding, pad_queries=padding, seed=B * 100 + I + topk)
    expected = brute_force(**x, topk=topk)
    assert_close(value_weighted_topk_reward_reference(**x, topk=topk), expected, 1e-5, 1e-5, "reference")


def test_reference_uses_given_lse_and_the_normaliser_cancels():
    x = make_inputs(2, 2, 6, 13, 16, J=9, pad_sources=True, seed=3)
    scale = 16**-0.5
    all_scores = torch.cat([x["q"] @ x["k"].transpose(-1, -2), x["q"] @ x["extra_k"].transpose(-1, -2)], -1) * scale
    visible = torch.cat([x["source_mask"], x["extra_mask"]], 1)[:, None, None, :]
    lse = torch.logsumexp(all_scores.masked_fill(~visible, -math.inf), dim=-1)
    with_extra = value_weighted_topk_reward_reference(**x)
    with_lse = value_weighted_topk_reward_reference(x["q"], x["k"], x["v"], lse=lse, source_mask=x["source_mask"])
    sources_only = value_weighted_topk_reward_reference(x["q"], x["k"], x["v"], source_mask=x["source_mask"])
    assert_close(with_lse, with_extra, 1e-5, 1e-5, "lse vs extra_k")
    assert_close(sources_only, with_extra, 1e-5, 1e-5, "normaliser cancels")


def test_reward_bounds_and_simple_cases():
    """R = 1 for uniform attention and equal norms; R = n / k for attention on one source."""
    q = torch.zeros(1, 1, 2, 4)
    q[0, 0, 1, 0] = 1e3  # row 1 attends (numerically) only to source 0
    k = torch.zeros(1, 1, 6, 4)
    k[0, 0, 0, 0] = 1.0
    v = torch.ones(1, 1, 6, 4)
    for impl in ["reference"] + (["cpp"] if HAS_CPP_OP else []):
        r = value_weighted_topk_reward(q, k, v, topk=2, impl=impl)
        assert_close(r[0, 0], torch.tensor([1.0, 6 / 2]), 1e-5, 1e-5, impl)


# ------------------------------------------------------------------------------------------------
# C++ kernel.
# ------------------------------------------------------------------------------------------------
CPP_SHAPES = [  # B, H, T, I, D, J
    (1, 1, 5, 197, 64, 0),
    (2, 3, 5, 13, 16, 7),
    (2, 2, 40, 197, 64, 40),
    (3, 2, 70, 29, 32, 0),  # T spans two 64-row work items with a ragged tail
    (1, 1, 1, 1, 16, 0),
]


@needs_cpp
@pytest.mark.parametrize("B, H, T, I, D, J", CPP_SHAPES)
@pytest.mark.parametrize("pad_sources, pad_queries", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("topk", [8, 3, 40, 300])
def test_cpp_matches_reference_fp32(B, H, T, I, D, J, pad_sources, pad_queries, topk):
    x = make_inputs(B, H, T, I, D, J, pad_sources=pad_sources, pad_queries=pad_queries, seed=T * I + topk)
    expected = value_weighted_topk_reward_reference(**x, topk=topk)
    actual = value_weighted_topk_reward(**x, topk=topk, impl="cpp")
    assert actual.dtype == torch.float32 and not actual.requires_grad
    assert_close(actual, expected, 1e-5, 2e-5, "cpp fp32")


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, H, T, I, D, J", [(1, 1, 5, 197, 64, 0), (2, 3, 5, 13, 16, 7), (2, 2, 40, 197, 64, 40)])
@pytest.mark.parametrize("padding", [False, True])
def test_cpp_low_precision_error_within_twice_torch(dtype, B, H, T, I, D, J, padding):
    x = make_inputs(B, H, T, I, D, J, pad_sources=padding, pad_queries=padding, dtype=dtype, seed=I + T)
    exact = value_weighted_topk_reward_reference(**{n: t.float() if t.is_floating_point() else t for n, t in x.items()})
    torch_err = (value_weighted_topk_reward_reference(**x) - exact).abs().max().item()
    kernel_err = (value_weighted_topk_reward(**x, impl="cpp") - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-5, f"{dtype}: kernel error {kernel_err:.3g} vs torch {torch_err:.3g}"


@needs_cpp
def test_cpp_strided_inputs_and_mask_edge_cases():
    """Non-contiguous q/k/v (as produced by view + transpose in attention layers), a sample without
    any valid source, and zero value vectors."""
    B, H, T, I, D = 3, 2, 9, 21, 16
    q = torch.randn(B, T, H, D).transpose(1, 2)
    kv = torch.randn(B, I, 2, H, D)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    v[1, :, :5] = 0.0  # zero value vectors never make the top-k of a row that has others
    v[2] = 0.0  # every value zero: every a is 0, the reward is defined as 0
    source_mask = torch.ones(B, I, dtype=torch.bool)
    source_mask[0] = False  # no source token at all
    expected = value_weighted_topk_reward_reference(q, k, v, source_mask=source_mask)
    actual = value_weighted_topk_reward(q, k, v, source_mask=source_mask, impl="cpp")
    assert not q.is_contiguous() and not k.is_contiguous()
    assert_close(actual, expected, 1e-5, 2e-5, "cpp strided")
    assert (actual[0] == 0).all() and (actual[2] == 0).all()


# ------------------------------------------------------------------------------------------------
# Triton kernel, in the interpreter on CPU (kept small: the interpreter is slow).
# ------------------------------------------------------------------------------------------------
TRITON_CASES = [  # B, H, T, I, D, J, pad_sources, pad_queries, topk
    (1, 1, 5, 13, 16, 0, False, False, 8),
    (2, 1, 5, 13, 16, 7, True, True, 8),
    (1, 1, 5, 197, 64, 0, False, False, 8),
    (2, 1, 17, 197, 64, 40, True, True, 8),
    (2, 1, 5, 197, 16, 0, True, False, 3),
    (2, 1, 5, 13, 16, 0, True, False, 300),  # topk > I: every valid source
    (1, 1, 3, 70, 16, 0, False, False, 12),  # k not a power of two, I > 64: two tiles
]


@needs_triton
@pytest.mark.parametrize("B, H, T, I, D, J, pad_sources, pad_queries, topk", TRITON_CASES)
def test_triton_matches_reference_fp32(B, H, T, I, D, J, pad_sources, pad_queries, topk):
    x = make_inputs(B, H, T, I, D, J, pad_sources=pad_sources, pad_queries=pad_queries, seed=T + I + topk)
    expected = value_weighted_topk_reward_reference(**x, topk=topk)
    assert_close(value_weighted_topk_reward(**x, topk=topk, impl="triton"), expected, 1e-5, 2e-5, "triton fp32")


@needs_triton
@pytest.mark.parametrize("B, H, T, I, D, J, padding", [(2, 1, 5, 13, 16, 7, True), (1, 1, 17, 197, 64, 0, False)])
def test_triton_fp16_error_within_twice_torch(B, H, T, I, D, J, padding):
    x = make_inputs(B, H, T, I, D, J, pad_sources=padding, pad_queries=padding, dtype=torch.float16, seed=7)
    exact = value_weighted_topk_reward_reference(**{n: t.float() if t.is_floating_point() else t for n, t in x.items()})
    torch_err = (value_weighted_topk_reward_reference(**x) - exact).abs().max().item()
    kernel_err = (value_weighted_topk_reward(**x, impl="triton") - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + 1e-5, f"fp16: kernel error {kernel_err:.3g} vs torch {torch_err:.3g}"


@needs_triton
def test_triton_strided_inputs_and_empty_sample():
    B, H, T, I, D = 2, 2, 5, 13, 16
    q = torch.randn(B, T, H, D).transpose(1, 2)
    k = torch.randn(B, I, H, D).transpose(1, 2)
    v = torch.randn(B, I, H, D).transpose(1, 2)
    source_mask = torch.ones(B, I, dtype=torch.bool)
    source_mask[1] = False
    expected = value_weighted_topk_reward_reference(q, k, v, source_mask=source_mask)
    actual = value_weighted_topk_reward(q, k, v, source_mask=source_mask, impl="triton")
    assert_close(actual, expected, 1e-5, 2e-5, "triton strided")
    assert (actual[1] == 0).all()


@needs_triton
def test_triton_rejects_topk_wider_than_its_registers():
    x = make_inputs(1, 1, 3, 197, 16, seed=0)
    with pytest.raises(ValueError, match="topk=100"):
        value_weighted_topk_reward(**x, topk=100, impl="triton")


# ------------------------------------------------------------------------------------------------
# Autograd, dispatch, registration, validation.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_no_grad_and_callers_backward_unaffected(impl):
    B, H, T, I, D = 2, 2, 5, 13, 16
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(B, H, n, D, generator=g, requires_grad=True) for n in (T + I, T + I, T + I)]

    def attention_loss(with_reward):
        q, k, v = (x * 1.5 for x in leaves)  # non-leaf inputs, as in a model
        out = F.scaled_dot_product_attention(q, k, v)
        if with_reward:
            reward = value_weighted_topk_reward(q[:, :, :T], k[:, :, T:], v[:, :, T:], extra_k=k[:, :, :T], impl=impl)
            assert not reward.requires_grad and reward.grad_fn is None
        return (out**2).sum()

    grads = []
    for with_reward in (False, True):
        for leaf in leaves:
            leaf.grad = None
        attention_loss(with_reward).backward()
        grads.append([leaf.grad.clone() for leaf in leaves])
    for plain, hooked in zip(*grads):
        torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


def test_auto_dispatch_on_cpu():
    x = make_inputs(1, 2, 4, 13, 16, seed=1)
    auto = value_weighted_topk_reward(**x)
    chosen = "cpp" if HAS_CPP_OP else "reference"
    assert_close(auto, value_weighted_topk_reward(**x, impl=chosen), 0, 0, "auto")


def test_registered_op_passes_opcheck():
    x = make_inputs(2, 2, 5, 13, 16, J=4, pad_sources=True, pad_queries=True, seed=2)
    op = torch.ops.fastvl_kernels.value_weighted_topk_reward.default
    args = (x["q"], x["k"], x["v"], None, x["extra_k"], x["source_mask"], x["extra_mask"], x["query_mask"], 0.25, 8, "auto")
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_torch_compile_fullgraph(backend):
    x = make_inputs(2, 2, 5, 13, 16, J=4, pad_sources=True, pad_queries=True, seed=4)

    def step(q, k, v, extra_k, source_mask, query_mask):
        reward = value_weighted_topk_reward(q * 2.0, k, v, extra_k=extra_k, source_mask=source_mask,
                                            query_mask=query_mask, scale=0.125)
        return reward.mean(dim=1) + 1.0

    args = (x["q"], x["k"], x["v"], x["extra_k"], x["source_mask"], x["query_mask"])
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    assert_close(compiled(*args), step(*args), 1e-6, 1e-6, "compiled")


def test_input_validation():
    x = make_inputs(2, 1, 3, 5, 16, seed=0)
    with pytest.raises(ValueError, match="source_mask"):
        value_weighted_topk_reward(**x, source_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="topk"):
        value_weighted_topk_reward(**x, topk=0)
    with pytest.raises(ValueError, match="k must be"):
        value_weighted_topk_reward(x["q"], x["k"][:, :, :, :8], x["v"])
    with pytest.raises(ValueError, match="impl"):
        value_weighted_topk_reward(**x, impl="cuda")


# ------------------------------------------------------------------------------------------------
# Hugging Face drop-in.
# ------------------------------------------------------------------------------------------------
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers not installed")


def _tiny_bert(**overrides):
    import transformers

    config = transformers.BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, **overrides,
    )
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_folder_imported_as_kernels_is_the_same_package():
    """From the repository root this folder is also importable as plain ``kernels`` (transformers
    imports any ``kernels`` it finds). A second copy would redefine the ops and free the first
    registration under its callers; the import must hand out ``fastvl_kernels`` itself."""
    script = (
        "import gc, sys, torch, fastvl_kernels, kernels\n"
        "assert kernels is fastvl_kernels, kernels\n"
        "assert not [m for m in sys.modules if m.startswith('kernels.')]\n"
        "gc.collect()\n"
        "q = torch.randn(1, 2, 3, 4)\n"
        "print(fastvl_kernels.value_weighted_topk_reward(q, q, q, topk=2).shape)\n"
    )
    repo_root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch.Size([1, 2, 3])"


@needs_transformers
def test_hf_bert_self_attention_rewards_match_reference():
    from fastvl_kernels.hf_patch import collect_rewards

    model = _tiny_bert()
    n_image, n_text, B = 6, 5, 3
    input_ids = torch.randint(1, 60, (B, n_image + n_text))
    attention_mask = torch.ones(B, n_image + n_text, dtype=torch.long)
    attention_mask[1, -2:] = 0  # padded text
    attention_mask[2, 2:n_image] = 0  # padded image tokens
    with torch.no_grad():
        plain = model(input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hooks_before = _hook_count(model)  # transformers keeps its own output-capturing hooks
        with collect_rewards(model, sources=slice(0, n_image)) as rewards:
            assert _hook_count(model) > hooks_before
            patched = model(input_ids, attention_mask=attention_mask)
    assert _hook_count(model) == hooks_before
    torch.testing.assert_close(patched.last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)
    assert sorted(rewards) == [f"encoder.layer.{i}.attention.self" for i in range(2)]

    valid = attention_mask.bool()
    for i, layer in enumerate(model.encoder.layer):
        attn = layer.attention.self
        hidden = plain.hidden_states[i]
        split = lambda t: t.view(B, -1, 4, 8).transpose(1, 2)  # noqa: E731
        with torch.no_grad():
            q, k, v = split(attn.query(hidden)), split(attn.key(hidden)), split(attn.value(hidden))
        expected = value_weighted_topk_reward_reference(
            q[:, :, n_image:], k[:, :, :n_image], v[:, :, :n_image], extra_k=k[:, :, n_image:],
            source_mask=valid[:, :n_image], extra_mask=valid[:, n_image:], query_mask=valid[:, n_image:],
        )
        got = rewards[f"encoder.layer.{i}.attention.self"]
        assert got.shape == (B, 4, n_text)
        assert_close(got, expected, 1e-5, 2e-5, f"layer {i}")
        assert (got[1, :, -2:] == 0).all()


@needs_transformers
def test_hf_bert_cross_attention_and_training_backward_unaffected():
    from fastvl_kernels.hf_patch import collect_rewards

    model = _tiny_bert(is_decoder=True, add_cross_attention=True).train()
    B, n_text, n_image = 2, 5, 7
    input_ids = torch.randint(1, 60, (B, n_text))
    image = torch.randn(B, n_image, 32, requires_grad=True)
    image_mask = torch.ones(B, n_image, dtype=torch.long)
    image_mask[1, -3:] = 0

    def loss_and_grad(patch):
        model.zero_grad()
        image.grad = None
        if patch:
            with collect_rewards(model, sources="encoder") as rewards:
                out = model(input_ids, encoder_hidden_states=image, encoder_attention_mask=image_mask)
        else:
            rewards, out = None, model(input_ids, encoder_hidden_states=image, encoder_attention_mask=image_mask)
        out.last_hidden_state.pow(2).sum().backward()
        return rewards, image.grad.clone(), model.encoder.layer[0].crossattention.self.key.weight.grad.clone()

    _, image_grad, weight_grad = loss_and_grad(False)
    hooks_before = _hook_count(model)
    rewards, image_grad_patched, weight_grad_patched = loss_and_grad(True)
    torch.testing.assert_close(image_grad_patched, image_grad, rtol=0, atol=0)
    torch.testing.assert_close(weight_grad_patched, weight_grad, rtol=0, atol=0)
    assert _hook_count(model) == hooks_before
    assert sorted(rewards) == [f"encoder.layer.{i}.crossattention.self" for i in range(2)]

    # Layer 0's cross-attention: queries from the self-attention block's output.
    captured = {}

    def keep_input(_module, args, kwargs):
        captured["h"] = args[0] if args else kwargs["hidden_states"]

    handle = model.encoder.layer[0].crossattention.self.register_forward_pre_hook(keep_input, with_kwargs=True)
    with torch.no_grad():
        model(input_ids, encoder_hidden_states=image, encoder_attention_mask=image_mask)
    handle.remove()
    cross = model.encoder.layer[0].crossattention.self
    split = lambda t: t.view(B, -1, 4, 8).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        q, k, v = split(cross.query(captured["h"])), split(cross.key(image)), split(cross.value(image))
    expected = value_weighted_topk_reward_reference(q, k, v, source_mask=image_mask.bool())
    assert_close(rewards["encoder.layer.0.crossattention.self"], expected, 1e-5, 2e-5, "cross-attention")


@needs_transformers
def test_hf_vit_rewards_cls_to_patches():
    import transformers

    from fastvl_kernels.hf_patch import collect_rewards

    config = transformers.ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1,
        num_attention_heads=4, intermediate_size=64, attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = model(pixels, output_hidden_states=True)
        hooks_before = _hook_count(model)
        with collect_rewards(model, sources=slice(1, None), queries=slice(0, 1), topk=2) as rewards:
            model(pixels)
    assert _hook_count(model) == hooks_before
    (name, got), = rewards.items()
    attn = model.get_submodule(name)
    split = lambda t: t.view(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
    hidden = model.layers[0].layernorm_before(plain.hidden_states[0])
    with torch.no_grad():
        q, k, v = split(attn.q_proj(hidden)), split(attn.k_proj(hidden)), split(attn.v_proj(hidden))
    expected = value_weighted_topk_reward_reference(q[:, :, :1], k[:, :, 1:], v[:, :, 1:], extra_k=k[:, :, :1], topk=2)
    assert got.shape == (2, 4, 1)
    assert_close(got, expected, 1e-5, 2e-5, "vit")

"""What a GPU would show and the interpreter's usual small tests do not: launch grids past CUDA's
axis limits, address offsets past 2^31 elements, tiles below tl.dot's minimum of 16, inputs with
arbitrary strides. Checked on CPU: grids by the launch-config functions, huge offsets with views of a
sparse memory-mapped file (4 GiB of address space, a few pages touched) both under the interpreter and
compiled for sm_80 with 64-bit stride arguments.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first triton import on CPU-only machines

import subprocess
import sys
import textwrap

import pytest
import torch

from fastvl_kernels import (
    permutation_attention,
    permutation_attention_reference,
    value_weighted_topk_reward,
    value_weighted_topk_reward_reference,
)
from fastvl_kernels._triton import HAS_TRITON, MAX_GRID, check_grid, ptxas_path, triton_runs_on

needs_triton = pytest.mark.skipif(
    not triton_runs_on(torch.device("cpu")),
    reason="Triton interpreter off: TRITON_INTERPRET=1 must be set before triton is first imported")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_grid_puts_batch_times_heads_on_the_unbounded_axis():
    from fastvl_kernels.perm_attention_triton import grid

    programs = grid(8192, 16, 512, 64)  # B * H = 131072 > 65535
    assert programs == (131072, 8)
    check_grid(programs, "fwd")
    assert MAX_GRID[1] == MAX_GRID[2] == 65535
    with pytest.raises(ValueError, match="grid axis 1 has 131072 programs, over CUDA's limit of 65535"):
        check_grid(grid(1, 1, 2**23, 64), "fwd")


@needs_triton
def test_tiles_below_the_dot_minimum_are_refused():
    from fastvl_kernels.perm_attention import encode_rule
    from fastvl_kernels.perm_attention_triton import perm_attention_fwd_triton

    q = torch.randn(1, 1, 32, 16)
    rule = encode_rule(torch.zeros(1, 32, dtype=torch.long), torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="block_m=8 must be a power of two >= 16"):
        perm_attention_fwd_triton(q, q, q, rule, 0.25, 8, 16)
    with pytest.raises(ValueError, match="block_n=24 must be a power of two >= 16"):
        perm_attention_fwd_triton(q, q, q, rule, 0.25, 16, 24)


@needs_triton
def test_small_head_dim_and_strided_last_dim_match_reference():
    """Head dim 8 (padded to tl.dot's 16 inside) and q/k/v whose last dimension has stride 2."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, seq_len, head_dim = 2, 2, 24, 8
    q, k, v = [torch.randn(batch, heads, seq_len, 2 * head_dim, generator=gen)[..., ::2] for _ in range(3)]
    kind = torch.randint(0, 3, (batch, seq_len), generator=gen)
    step = torch.randint(0, 4, (batch, seq_len), generator=gen)
    grad_out = torch.randn(batch, heads, seq_len, head_dim, generator=gen)

    def run(impl, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        if impl == "reference":
            out = permutation_attention_reference(*leaves, kind, step)
        else:
            out = permutation_attention(*leaves, kind, step, impl=impl)
        out.backward(grad_out)
        return [out] + [t.grad for t in leaves]

    for got, want in zip(run("triton", (q, k, v)), run("reference", [t.contiguous() for t in (q, k, v)])):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    values = torch.randn(batch, heads, 13, 2 * head_dim, generator=gen)[..., ::2]
    keys = torch.randn(batch, heads, 13, head_dim, generator=gen)
    torch.testing.assert_close(value_weighted_topk_reward(q, keys, values, topk=4, impl="triton"),
                               value_weighted_topk_reward_reference(q, keys, values, topk=4), rtol=1e-4, atol=1e-5)


# One script, two modes: "interpret" runs the kernels on views whose batch stride times the batch index
# passes 2^31 elements (an int32 offset would wrap and read elsewhere, or crash: hence a child process);
# "compile" compiles them for sm_80 with a batch stride of 2^31 itself (64-bit stride arguments).
HUGE_OFFSETS = textwrap.dedent("""
    import sys, tempfile, torch
    from fastvl_kernels import (permutation_attention, permutation_attention_reference,
                                value_weighted_topk_reward, value_weighted_topk_reward_reference)
    from fastvl_kernels._triton import compile_for

    mode = sys.argv[1]
    batch, heads, seq_len, head_dim = (3, 1, 16, 16) if mode == "interpret" else (2, 1, 16, 16)
    batch_stride = 2**30 + 2**10 if mode == "interpret" else 2**31  # elements
    per_tensor = heads * seq_len * head_dim
    n_elements = (batch - 1) * batch_stride + 4 * per_tensor
    backing = tempfile.NamedTemporaryFile()
    backing.truncate(2 * n_elements)  # sparse: only the pages the views touch are ever written
    memory = torch.from_file(backing.name, shared=True, size=n_elements, dtype=torch.float16)
    gen = torch.Generator().manual_seed(0)
    dense = [torch.randn(batch, heads, seq_len, head_dim, generator=gen).half() for _ in range(4)]
    huge = []
    for i, t in enumerate(dense):
        view = memory.as_strided(t.shape, (batch_stride, seq_len * head_dim, head_dim, 1), i * per_tensor)
        view.copy_(t)
        huge.append(view)
    kind = torch.randint(0, 3, (batch, seq_len), generator=gen)
    step = torch.randint(0, 4, (batch, seq_len), generator=gen)

    def attention(q, k, v):
        q, k, v = [t.detach().requires_grad_() for t in (q, k, v)]
        out = permutation_attention(q, k, v, kind, step, impl="triton")
        out.float().sum().backward()
        return [out, q.grad, k.grad, v.grad]

    def reward(q, k, v):
        return value_weighted_topk_reward(q, k, v, topk=4, impl="triton")

    if mode == "compile":
        with compile_for(80) as reports:
            attention(*huge[:3])
            reward(*huge[:3])
        for r in reports:
            print(r.kernel, r.signature["stride_qb"], r.spill_bytes)
            assert r.signature["stride_qb"] == "i64" and r.spill_bytes == 0, r
        assert len(reports) == 4
    else:
        for got, want in zip(attention(*huge[:3]), attention(*dense[:3])):
            assert torch.equal(got, want), "attention on huge offsets differs"
        assert torch.equal(reward(*huge[:3]), reward(*dense[:3])), "reward on huge offsets differs"
        ref = permutation_attention_reference(*[t.float() for t in dense[:3]], kind, step)
        torch.testing.assert_close(attention(*huge[:3])[0].float(), ref, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(reward(*huge[:3]), value_weighted_topk_reward_reference(
            *[t.float() for t in dense[:3]], topk=4), rtol=2e-2, atol=2e-2)
    print("ok")
""")


def _run_huge_offsets(mode: str, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-c", HUGE_OFFSETS, mode], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), (
        f"exit {res.returncode} (negative: killed by a signal, e.g. a wrapped offset)\n{res.stdout[-2000:]}"
        f"\n{res.stderr[-3000:]}")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_offsets_past_2_31_elements_under_the_interpreter():
    _run_huge_offsets("interpret", interpret=True)


@pytest.mark.skipif(ptxas_path() is None, reason="ptxas is absent (triton/backends/nvidia/bin): cannot compile")
def test_64_bit_strides_compile_for_sm80_without_spills():
    _run_huge_offsets("compile", interpret=False)

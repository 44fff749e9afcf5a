"""Benchmark: value-weighted attention top-k reward (C-Mask eq. 4) on CPU.

Shape from issue 3: B32 H12 T40 text rows, I197 image keys plus J40 text keys (extra_k), D64, top-8.
Providers: the eager PyTorch reference (the baseline: it materializes [B, H, T, I + J]) and the C++
kernel (fp32, and bf16 inputs). Goal: C++ >= 5x faster and >= 10x less peak extra memory.

    cd /work/main && python -m bench.bench_reward
"""
import torch

from fastvl_kernels import value_weighted_topk_reward, value_weighted_topk_reward_reference
from fastvl_kernels._cpp import cpp_op

from .harness import run_cases

OP = "value_weighted_topk_reward"


def make_case(B=32, H=12, T=40, I=197, J=40, D=64, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, extra_k = (torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (T, I, I, J))
    source_mask = torch.ones(B, I, dtype=torch.bool)
    query_mask = torch.rand(B, T, generator=g) > 0.1  # some padded text rows, as in a real batch
    return dict(q=q, k=k, v=v, extra_k=extra_k, source_mask=source_mask, query_mask=query_mask)


def main() -> None:
    B, H, T, I, J, D = 32, 12, 40, 197, 40, 64
    shape = f"B{B} H{H} T{T} I{I} J{J} D{D} top8"
    x = make_case(B, H, T, I, J, D)
    x_bf16 = {n: t.bfloat16() if t.is_floating_point() else t for n, t in x.items()}
    cases = {"reference": lambda: value_weighted_topk_reward_reference(**x)}
    if cpp_op(OP) is None:
        print("C++ extension not built (pip install --no-build-isolation -e .): reference only")
    else:
        torch.testing.assert_close(value_weighted_topk_reward(**x, impl="cpp"),
                                   value_weighted_topk_reward_reference(**x), rtol=2e-5, atol=1e-5)
        cases["cpp"] = lambda: value_weighted_topk_reward(**x, impl="cpp")
        cases["cpp_bf16_inputs"] = lambda: value_weighted_topk_reward(**x_bf16, impl="cpp")
    rows = run_cases(OP, shape, cases, baseline="reference", reps=20, warmup=3)
    for row in rows:
        if row["provider"] == "cpp":
            print(f"\ncpp vs eager reference: {row['speedup_vs_reference']:.1f}x faster (goal >= 5x), "
                  f"{row.get('memory_ratio_vs_reference', float('nan')):.0f}x less peak extra memory (goal >= 10x)")


if __name__ == "__main__":
    main()

"""Benchmark span-mask sampling (C-Mask eq. 2): the C++ kernel vs the PyTorch reference loop.

Case of issue 3: B=256, L=40, quota 50%, learned (Plackett-Luce) order. Goal: C++ >= 20x faster
than the reference. Also times ``span_action_log_prob`` forward + backward (the PPO ratio's
recomputation) on the same sample.

    python -m bench.bench_span_sampling [--batch 256] [--length 40] [--quota 0.5] [--order learned]
"""
import argparse

import torch

from bench.harness import run_cases
from fastvl_kernels._cpp import cpp_op
from fastvl_kernels.span_sampling import sample_spans, span_action_log_prob


def make_case(B: int, L: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    start_probs = torch.softmax(torch.randn(B, L, generator=gen), -1)
    cont_probs = torch.sigmoid(torch.randn(B, L, generator=gen))
    order_scores = torch.randn(B, L, generator=gen)
    lengths = torch.randint(L // 2, L + 1, (B,), generator=gen)
    lengths[0] = L
    return start_probs, cont_probs, order_scores, lengths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--length", type=int, default=40)
    ap.add_argument("--quota", type=float, default=0.5)
    ap.add_argument("--order", default="learned")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--memory", action="store_true", help="also measure peak extra memory (slow)")
    args = ap.parse_args(argv)
    B, L = args.batch, args.length
    p, s, g, lengths = make_case(B, L)
    shape = f"B{B} L{L} quota{args.quota} {args.order}"

    def sampler(impl):
        return lambda: sample_spans(p, s, lengths, args.quota, 1, order_scores=g, order=args.order, impl=impl)

    cases = {"reference": sampler("reference")}
    if cpp_op("sample_spans") is not None:
        cases["cpp"] = sampler("cpp")
        threads = torch.get_num_threads()
        if threads > 1:
            def cpp_one_thread():
                torch.set_num_threads(1)
                try:
                    return sampler("cpp")()
                finally:
                    torch.set_num_threads(threads)
            cases["cpp_1thread"] = cpp_one_thread
    else:
        print("C++ extension not built: only the reference is timed")
    run_cases("sample_spans", shape, cases, baseline="reference", reps=args.reps,
              measure_memory=args.memory)

    sample = sample_spans(p, s, lengths, args.quota, 1, order_scores=g, order=args.order)
    leaves = [x.clone().requires_grad_() for x in (p, s, g)]

    def log_prob_fwd_bwd():
        lp, ent = span_action_log_prob(leaves[0], leaves[1], lengths, args.quota, sample,
                                       order_scores=leaves[2], order=args.order)
        (lp.sum() + 0.1 * ent.sum()).backward()

    run_cases("span_action_log_prob", shape, {"torch_fwd_bwd": log_prob_fwd_bwd}, baseline="torch_fwd_bwd",
              reps=args.reps, measure_memory=args.memory)


if __name__ == "__main__":
    main()

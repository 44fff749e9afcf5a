"""Compile every Triton kernel of fastvl_kernels for real GPUs (no GPU needed) and print its registers,
spills and compile time against the budget in ``compile_budget.py``::

    python -m fastvl_kernels.compile_report                 # sm_80 and sm_90, fp32 / fp16 / bf16
    python -m fastvl_kernels.compile_report --targets 90 --json

Each case calls a public function with ``impl="triton"`` on small CPU tensors inside
``_triton.compile_for``, so the kernels are compiled through the launch code users run (tile choice,
strides, specialisation). The kernels must be compiled, not interpreted: run from a shell with
``TRITON_INTERPRET=1``, the module restarts itself without it.
Exit status 1 when a kernel is over budget.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from fastvl_kernels import permutation_attention, sample_spans, value_weighted_topk_reward
from fastvl_kernels._triton import INTERPRET, CompileReport, compile_for
from fastvl_kernels.compile_budget import BUDGET, DTYPES, TARGETS, over_budget

BATCH, HEADS, SEQ_LEN = 2, 2, 96  # shapes only set the specialisation: tiles depend on dtype and head dim


def _perm_attention(head_dim: int) -> Callable[[torch.dtype], None]:
    def run(dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(0)
        q, k, v = [torch.randn(BATCH, HEADS, SEQ_LEN, head_dim, generator=gen).to(dtype).requires_grad_()
                   for _ in range(3)]
        kind = torch.randint(0, 3, (BATCH, SEQ_LEN), generator=gen)
        step = torch.randint(0, 4, (BATCH, SEQ_LEN), generator=gen)
        permutation_attention(q, k, v, kind, step, impl="triton").sum().backward()  # fwd, dk/dv, dq

    return run


def _reward(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    n_text, n_image, head_dim = 40, 197, 64  # BERT text rows over ViT-B/16 patches + CLS
    q = torch.randn(BATCH, HEADS, n_text, head_dim, generator=gen).to(dtype)
    k, v = [torch.randn(BATCH, HEADS, n_image, head_dim, generator=gen).to(dtype) for _ in range(2)]
    value_weighted_topk_reward(q, k, v, source_mask=torch.ones(BATCH, n_image, dtype=torch.bool),
                               query_mask=torch.ones(BATCH, n_text, dtype=torch.bool), topk=8, impl="triton")


def _span_sampling(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    start, cont, scores = [torch.rand(BATCH, SEQ_LEN, generator=gen).to(dtype) for _ in range(3)]
    sample_spans(start, cont, torch.full((BATCH,), SEQ_LEN), 0.15, 0, order_scores=scores, impl="triton")


# case name -> a call of the public API that launches the case's kernels.
CASES: dict[str, Callable[[torch.dtype], None]] = {
    "perm_attention_d64": _perm_attention(64),
    "perm_attention_d128": _perm_attention(128),
    "reward_d64_top8": _reward,
    "span_sampling_learned": _span_sampling,
}


@dataclass(frozen=True)
class Row:
    case: str
    dtype: str  # "fp32", "fp16", "bf16"
    report: CompileReport

    @property
    def key(self) -> tuple[str, str, str, str]:
        return self.case, self.report.kernel, self.dtype, self.report.target


def compile_all(targets=TARGETS, dtypes=DTYPES, cases=tuple(CASES), progress: bool = False) -> list[Row]:
    rows = []
    for capability in targets:
        for dtype_name in dtypes:
            for case in cases:
                with compile_for(capability) as reports:
                    CASES[case](DTYPES[dtype_name])
                rows += [Row(case, dtype_name, report) for report in reports]
                if progress:
                    seconds = sum(r.seconds for r in reports)
                    print(f"compiled {case} {dtype_name} sm_{capability} in {seconds:.1f} s", file=sys.stderr,
                          flush=True)
    return rows


def format_table(rows: list[Row]) -> str:
    header = (f"{'case':22} {'kernel':27} {'dtype':5} {'target':6} {'blocks':18} {'warps':>5} {'stages':>6} "
              f"{'regs':>4} {'budget':>6} {'spill B':>7} {'smem KB':>7} {'compile s':>9}")
    lines = [header, "-" * len(header)]
    for row in rows:
        r = row.report
        # the row/column block sizes (BLOCK_M x BLOCK_N, BLOCK_T x BLOCK_I, BLOCK_L), not the padded head dims
        tiles = "x".join(str(v) for k, v in r.constexprs.items()
                         if k.startswith("BLOCK") and k not in ("BLOCK_D", "BLOCK_DV"))
        budget = BUDGET.get(row.key)
        lines.append(
            f"{row.case:22} {r.kernel:27} {row.dtype:5} {r.target:6} {tiles:18} {r.num_warps:5d} {r.num_stages:6d} "
            f"{r.registers:4d} {budget.max_registers if budget else '-':>6} {r.spill_bytes:7d} "
            f"{r.shared_bytes / 1024:7.1f} {r.seconds:9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS), help="compute capabilities")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    if INTERPRET:  # the kernels were defined as interpreted functions: start again without the flag
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "fastvl_kernels.compile_report",
                                   *(sys.argv[1:] if argv is None else argv)], env)
    rows = compile_all(args.targets, args.dtypes, progress=not args.json)
    if args.json:
        print(json.dumps([dict(case=r.case, dtype=r.dtype, report=asdict(r.report)) for r in rows]))
        return 0
    print(format_table(rows))
    problems = [msg for row in rows if (msg := over_budget(row.key, row.report))]
    print("\n".join(problems) if problems else "all kernels within budget")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Every Triton kernel compiled for real GPUs (sm_80, sm_90) on this GPU-less machine, in fp32, fp16 and
bf16, through the launch code users run (public functions on CPU tensors inside ``compile_for``), with
the registers and spill bytes reported by Triton's bundled ptxas checked against compile_budget.py.

The kernels in this process are interpreted (TRITON_INTERPRET=1, tests/conftest.py), so the compiling
runs once, in a child process (``python -m fastvl_kernels.compile_report --json``); the tests below
read its rows. Run with ``-s`` to see the table and the compile time of every kernel.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastvl_kernels._triton import CompileReport, ptxas_path
from fastvl_kernels.compile_budget import BUDGET, DTYPES, TARGETS, over_budget

pytestmark = pytest.mark.skipif(
    ptxas_path() is None,
    reason="ptxas is absent (Triton's NVIDIA backend ships it under triton/backends/nvidia/bin): nothing to "
           "compile for a GPU with")


@pytest.fixture(scope="module")
def rows():
    from fastvl_kernels.compile_report import Row

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-m", "fastvl_kernels.compile_report", "--json"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return [Row(r["case"], r["dtype"], CompileReport(**r["report"])) for r in json.loads(res.stdout)]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t}")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_kernel_compiles_within_budget(rows, dtype, target):
    mine = [row for row in rows if row.dtype == dtype and row.report.target == f"sm_{target}"]
    expected = {key for key in BUDGET if key[2] == dtype and key[3] == f"sm_{target}"}
    assert {row.key for row in mine} == expected, "compiled kernels and budget rows differ"
    for row in mine:
        r = row.report
        print(f"\n{row.case:22} {r.kernel:27} {dtype} {r.target}: {r.registers} registers, {r.spill_bytes} B "
              f"spilled, compiled in {r.seconds:.2f} s", end="")
    problems = [msg for row in mine if (msg := over_budget(row.key, row.report))]
    assert not problems, "\n".join(problems)


def test_budget_table(rows):
    from fastvl_kernels.compile_report import format_table

    print("\n" + format_table(rows))
    print(f"{len(rows)} kernels compiled in {sum(r.report.seconds for r in rows):.1f} s")
    assert all(row.report.spill_bytes == 0 for row in rows)
    assert len({row.key for row in rows}) == len(rows) == len(BUDGET)


def test_compiled_with_the_launch_codes_tiles_for_each_target(rows):
    """The tiles in the compiled kernels are those the launch code picks for that dtype and GPU, so the
    target reached the launch code (fp32 and fp16 differ, and so do sm_80 and sm_90 at head dim 128)."""
    from fastvl_kernels.perm_attention_triton import tile_config
    from fastvl_kernels.reward import reward_tiles

    checked = 0
    for row in rows:
        r, dtype, capability = row.report, DTYPES[row.dtype], int(row.report.target[3:])
        if row.case.startswith("perm_attention_d"):
            kernel = {"_perm_attn_fwd_kernel": "fwd", "_perm_attn_bwd_dkdv_kernel": "dkdv",
                      "_perm_attn_bwd_dq_kernel": "dq"}[r.kernel]
            tiles = tile_config(kernel, dtype, int(row.case.rsplit("d", 1)[1]), capability)
            own, streamed = ("BLOCK_N", "BLOCK_M") if kernel == "dkdv" else ("BLOCK_M", "BLOCK_N")
            assert (r.constexprs[own], r.constexprs[streamed]) == (tiles.block_own, tiles.block_streamed), row.key
        elif row.case.startswith("reward"):
            tiles = reward_tiles(dtype, capability)
            assert r.constexprs["BLOCK_I"] == tiles.block_sources, row.key
        else:
            continue
        assert (r.num_warps, r.num_stages) == (tiles.num_warps, tiles.num_stages), row.key
        assert r.constexprs["IEEE_DOT"] == (dtype == torch.float32), row.key
        checked += 1
    assert checked == len(rows) - len(DTYPES) * len(TARGETS)  # all but span sampling (one per dtype and GPU)

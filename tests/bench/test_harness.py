"""The benchmark harness's call meter: where a run's time and FLOPs go."""
import json
import sys
import time
import types

import pytest
import torch
import torch.nn.functional as F

from bench.harness import CallMeter, median_ci95, save_rows, time_interleaved


@pytest.fixture
def toy_module(monkeypatch):
    module = types.ModuleType("toy_timed")

    def nap(ms):
        time.sleep(ms / 1e3)

    def product(a, b):
        return a @ b

    class Worker:
        def work(self):
            module.nap(20)
            module.nap(10)

        def compute(self):
            module.product(torch.ones(4, 8), torch.ones(8, 16))  # 2 * 4 * 8 * 16 = 1024 FLOPs
            module.product(torch.ones(2, 3), torch.ones(3, 5))  # 60
            q = torch.ones(1, 2, 6, 4)  # attention outside the targets: 2 products of 2*1*2*6*6*4 = 576 each
            F.scaled_dot_product_attention(q, q, q)

    module.nap, module.product, module.Worker = nap, product, Worker
    monkeypatch.setitem(sys.modules, "toy_timed", module)
    return module


def test_call_meter_times_per_step_after_the_warmup(toy_module):
    meter = CallMeter(["toy_timed:Worker.work", "toy_timed:nap"])
    worker = toy_module.Worker()
    step = meter.wrap("run", worker.work, skip=1)
    for _ in range(3):
        step()
    worker.work()  # outside a wrapped step: not counted
    assert meter.steps == {"run": 2}
    per_step = meter.per_step("run")
    assert per_step["toy_timed:Worker.work"] >= 30  # both naps
    assert 30 <= per_step["toy_timed:nap"] <= per_step["toy_timed:Worker.work"]  # nested calls count in both
    assert meter.per_step("other") == {"toy_timed:Worker.work": 0.0, "toy_timed:nap": 0.0}


def test_call_meter_counts_flops_inside_targets_and_cpu_attention(toy_module):
    meter = CallMeter(["toy_timed:Worker.compute", "toy_timed:product"])
    worker = toy_module.Worker()
    total = meter.count_flops("run", worker.compute)
    assert total == 1024 + 60 + 2 * 576  # the CPU attention kernel counts like the CUDA ones
    assert meter.flops["run"] == {"toy_timed:Worker.compute": total, "toy_timed:product": 1084}
    assert meter.ms == {}  # counting is not timing
    worker.compute()  # outside a count: nothing added
    assert meter.flops["run"]["toy_timed:product"] == 1084


def test_call_meter_names_a_malformed_target():
    with pytest.raises(ValueError, match="module:Qualified.name"):
        CallMeter(["toy_timed.nap"])


def test_median_interval_brackets_the_median_and_narrows_with_more_rounds():
    spread = [0.9, 1.0, 1.1, 1.2, 0.95, 1.05, 1.15, 0.85]
    lo, hi = median_ci95(spread)
    assert min(spread) <= lo < 1.025 < hi <= max(spread)  # 1.025 is the sample median
    lo_many, hi_many = median_ci95(spread * 16)
    assert lo <= lo_many < hi_many <= hi and hi_many - lo_many < (hi - lo) / 2
    assert median_ci95([1.03] * 5) == (1.03, 1.03)


def test_time_interleaved_pairs_each_round_against_the_first_callable():
    timing = time_interleaved({"fast": lambda: time.sleep(0.002), "slow": lambda: time.sleep(0.02)}, warmup=0, reps=6)
    assert timing["fast"]["ratio"] == 1.0 and timing["fast"]["ratio_ci95"] == (1.0, 1.0)
    lo, hi = timing["slow"]["ratio_ci95"]
    assert 3 < lo <= timing["slow"]["ratio"] <= hi  # 10x asleep; late wake-ups of a busy machine cannot reach 3x


def test_rows_go_to_the_results_folder_the_environment_names(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTVL_BENCH_RESULTS", str(tmp_path / "rows"))
    save_rows("toy_op", [{"provider": "a", "ms": 1.0}, {"provider": "b", "ms": 2.0}])
    save_rows("toy_op", [{"provider": "c", "ms": 3.0}])  # appended
    lines = (tmp_path / "rows" / "toy_op.jsonl").read_text().splitlines()
    assert [json.loads(line)["provider"] for line in lines] == ["a", "b", "c"]

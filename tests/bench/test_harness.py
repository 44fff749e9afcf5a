"""The benchmark harness's call timer: where a run's time goes."""
import sys
import time
import types

import pytest

from bench.harness import CallTimer


@pytest.fixture
def toy_module(monkeypatch):
    module = types.ModuleType("toy_timed")

    def nap(ms):
        time.sleep(ms / 1e3)

    class Worker:
        def work(self):
            module.nap(20)
            module.nap(10)

    module.nap, module.Worker = nap, Worker
    monkeypatch.setitem(sys.modules, "toy_timed", module)
    return module


def test_call_timer_counts_per_step_after_the_warmup(toy_module):
    timer = CallTimer(["toy_timed:Worker.work", "toy_timed:nap"])
    worker = toy_module.Worker()
    step = timer.wrap("run", worker.work, skip=1)
    for _ in range(3):
        step()
    worker.work()  # outside a wrapped step: not counted
    assert timer.steps == {"run": 2}
    per_step = timer.per_step("run")
    assert per_step["toy_timed:Worker.work"] >= 30  # both naps
    assert 30 <= per_step["toy_timed:nap"] <= per_step["toy_timed:Worker.work"]  # nested calls count in both
    assert timer.per_step("other") == {"toy_timed:Worker.work": 0.0, "toy_timed:nap": 0.0}


def test_call_timer_names_a_malformed_target():
    with pytest.raises(ValueError, match="module:Qualified.name"):
        CallTimer(["toy_timed.nap"])

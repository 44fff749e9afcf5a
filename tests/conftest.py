"""Test-wide setup: no GPU here, so Triton kernels run in the interpreter on CPU tensors, and
nothing may reach a model hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: one OpenMP thread each (torch reads it at
    # import), inherited by the processes a test starts (DeepSpeed's launcher, spawned ranks)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def bench_results_outside_the_checkout(tmp_path_factory):
    """Benchmarks that tests run (also in child processes) append their rows here, not to bench/results."""
    os.environ["FASTVL_BENCH_RESULTS"] = str(tmp_path_factory.mktemp("bench_results"))


@pytest.fixture
def single_thread(monkeypatch):
    """For bit-for-bit comparisons of two training runs at one thread, where no torch CPU kernel can add
    in thread order. (The one such kernel found at 2 threads, the backward of ITM's gather with repeated
    rows, is gone -- tests/methods/test_objectives.py checks whole steps at 2 threads -- but torch makes
    no such promise for every kernel.) OMP_NUM_THREADS keeps ``init_distributed`` from raising the count
    again."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

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


@pytest.fixture
def single_thread(monkeypatch):
    """For bit-for-bit comparisons of two training runs: with 2 OpenMP threads some torch CPU backward
    kernels are not run-to-run reproducible (measured: the tiny ViT's gradients from its final LayerNorm
    on, and the ITM backward, differ in the last bits in about 1 of 15 identical passes; never with 1
    thread in 60). OMP_NUM_THREADS keeps ``init_distributed`` from raising the count again."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Two gloo processes on this machine, for tests of what ranks compute together."""
import socket

import torch.multiprocessing as mp


def spawn_two_ranks(worker, n_results: int) -> list:
    """Run ``worker(rank, port, queue)`` in 2 processes (spawned: the worker must be importable); return
    the ``n_results`` items they put on the queue, after both exited cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in range(n_results)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"a rank exited with code {p.exitcode}"
    return results

"""Two gloo processes on this machine, for tests of what ranks compute together."""
import random
import socket
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    """A port that binds now, for a rendezvous that processes started later will bind. Drawn below the
    kernel's ephemeral range: a port the kernel handed out for ``bind(0)`` and got back is soon handed
    to the next process asking (another pytest-xdist worker's run), before ours binds it again."""
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    draw = random.SystemRandom()
    for _ in range(100):
        port = draw.randrange(10_000, max(first_ephemeral, 10_001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 10000-{first_ephemeral}")


def spawn_two_ranks(worker, n_results: int) -> list:
    """Run ``worker(rank, port, queue)`` in 2 processes (spawned: the worker must be importable); return
    the ``n_results`` items they put on the queue, after both exited cleanly."""
    port = free_port()
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

"""Training metrics: a window of per-step values averaged over steps and ranks, written as JSONL rows.

Each row of ``RUN_DIR/metrics.jsonl`` is one log step::

    {"step": 20, "epoch": 0, "samples_seen": 640, "lr": 0.0003, "loss": 7.9, "itc": 2.1, ...,
     "samples_per_s": 51.2, "step_time_s": 0.62, "peak_mem_mb": 812.0, "peak_mem_kind": "cpu_max_rss"}

Losses and recipe metrics are the mean over the window's micro-batches and over ranks (so a 2-process
run logs the same numbers as 1 process with the same global batch). ``samples_per_s`` is the global
batch throughput over the window; ``step_time_s`` the mean wall time of one optimizer step;
``peak_mem_mb`` the CUDA allocator's peak on GPU, the process's peak resident set on CPU.
"""
from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError

BOOKKEEPING = ("step", "epoch", "samples_seen", "lr", "samples_per_s", "step_time_s", "peak_mem_mb",
               "peak_mem_kind", "loss_scale")


class MetricWindow:
    """Sums of every scalar a recipe returns, plus step timing, since the last log row."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.seconds = 0.0
        self.steps = 0
        self.samples = 0

    def add_micro_batch(self, outputs: dict) -> None:
        for name, value in outputs.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.detach().float().reshape(())
                self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.count += 1

    def add_step(self, seconds: float, samples: int) -> None:
        self.seconds += seconds
        self.steps += 1
        self.samples += samples

    def reduce(self) -> dict[str, float]:
        """Window means, averaged over ranks (a collective: every rank calls it at the same step)."""
        names = sorted(self.sums)
        if not names:
            return {}
        values = torch.stack([self.sums[n] for n in names]).cpu() / max(1, self.count)
        if dist.is_initialized() and dist.get_world_size() > 1:
            values = values.to(_comm_device())
            dist.all_reduce(values)
            values = values.cpu() / dist.get_world_size()
        return {n: float(v) for n, v in zip(names, values)}

    def throughput(self) -> dict[str, float]:
        return {"samples_per_s": self.samples / self.seconds if self.seconds > 0 else 0.0,
                "step_time_s": self.seconds / max(1, self.steps)}


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """``values`` summed over ranks (a collective when several processes run: every rank calls it at the
    same step, with the same names)."""
    names = sorted(values)
    if not names or not (dist.is_initialized() and dist.get_world_size() > 1):
        return values
    total = torch.tensor([values[n] for n in names], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total)
    return dict(zip(names, total.cpu().tolist()))


def peak_memory() -> tuple[float, str]:
    """(MiB, kind): the CUDA caching allocator's peak, or on CPU the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


class MetricsWriter:
    """Appends rows to ``metrics.jsonl`` on rank 0, and with ``tensorboard`` every numeric value of a row
    as a scalar ``train/<name>`` at its step in ``<folder>/tensorboard``. On resume from ``resume_step``
    the rows logged after that step (by a run that went on past its last checkpoint) are dropped first,
    from both, so each reads as one uninterrupted run."""

    def __init__(self, path: Path, enabled: bool, resume_step: Optional[int] = None, tensorboard: bool = False):
        self.path = Path(path)
        self.enabled = enabled
        self.board = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = read_metrics(self.path)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resume_step))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("train.report_to=tensorboard needs the tensorboard package "
                                  "(pip install tensorboard)") from None
            purge = None if resume_step is None else resume_step + 1
            self.board = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=purge)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for name, value in row.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{name}", value, row["step"])
            self.board.flush()

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def format_postfix(values: dict[str, float], names: list[str], samples_per_s: float) -> dict[str, str]:
    """Progress-bar postfix: the named losses to 3 significant digits and the throughput."""
    postfix = {n: f"{values[n]:.3g}" for n in names if n in values}
    postfix["samples/s"] = f"{samples_per_s:.1f}"
    return postfix

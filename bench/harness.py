"""Shared benchmark harness: time a case, measure its peak extra memory, print and save rows.

A benchmark script only builds its cases (a callable per provider) and calls ``run_cases``; rows
are printed as a table and appended as JSON lines to ``bench/results/<op>.jsonl`` keyed by op,
provider, shape and machine (``$FASTVL_BENCH_RESULTS/<op>.jsonl`` when that is set: the tests set it to
a temporary folder, so a test that runs a benchmark leaves nothing in the checkout).
"""
import functools
import importlib
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def cuda_in_use() -> bool:
    """Whether this process has work on a CUDA device (CUDA present and initialised)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def sync_device() -> None:
    """Wait for every queued CUDA kernel (no-op when CUDA is not in use). Call it before reading a host
    clock around GPU work: kernels run asynchronously, so without it the clock times their launches."""
    if cuda_in_use():
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], warmup: int = 2, reps: int = 10) -> dict:
    """Time of ``fn()`` in milliseconds: median and 20th/80th percentiles over ``reps`` runs. With CUDA
    in use, each run is timed with CUDA events recorded after a full synchronisation (so earlier work
    is not counted) and read after the end event completed; otherwise by the host clock."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if cuda_in_use():
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return _summary(samples, "ms")


def time_interleaved(fns: dict[str, Callable[[], object]], warmup: int = 2, reps: int = 10) -> dict[str, dict]:
    """``time_ms`` for several callables measured in rounds: each round runs every callable once, the
    order rotating per round. Drifts of a shared machine then hit every callable alike, and the paired
    per-round ratios against the first callable (``ratio``: median, ``ratio_p20``, ``ratio_p80``) are
    steadier than a ratio of medians taken minutes apart. ``ratio_ci95`` is a 95% interval of that
    median (``median_ci95``): whether the rounds were enough to resolve a difference of a few percent."""
    from tqdm.auto import tqdm

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples = {name: [] for name in names}
    ratios = {name: [] for name in names}
    with tqdm(total=reps, desc="rounds", unit="round", dynamic_ncols=True, disable=reps < 2) as bar:
        for r in range(reps):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(time_ms(fns[name], warmup=0, reps=1)["ms"])
            for name in names:
                ratios[name].append(samples[name][-1] / samples[names[0]][-1])
            bar.set_postfix({name: f"{statistics.median(ratios[name]):.3f}x" for name in names[1:]}, refresh=False)
            bar.update()
    return {name: {**_summary(samples[name], "ms"), **_summary(ratios[name], "ratio"),
                   "ratio_ci95": median_ci95(ratios[name])} for name in names}


def median_ci95(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values`` (seeded, so a rerun prints the same)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def _summary(values: list[float], key: str) -> dict:
    q = statistics.quantiles(values, n=5) if len(values) >= 2 else values * 4
    return {key: statistics.median(values), f"{key}_p20": q[0], f"{key}_p80": q[-1]}


class CallMeter:
    """Host wall time, or FLOPs, spent inside named functions per step of each labelled callable:
    where a run's time and arithmetic go. ``targets`` are ``module:Qualified.name`` (a function or a
    method), patched where named (a function imported by name elsewhere must be named there); nested
    calls count in both. ``wrap(label, fn, skip)`` times the calls made during ``fn()`` after its first
    ``skip`` calls (the warm-up). With CUDA in use each timed call is bracketed by synchronisations, so
    it is charged its GPU work, not its launches -- which also serialises work that would otherwise
    overlap (a side stream), so step times measured while metering are not the overlapped ones.
    ``count_flops(label, fn)`` runs ``fn()`` once under torch's ``FlopCounterMode``."""

    def __init__(self, targets: list[str]):
        self.targets = list(targets)
        self.ms: dict[str, dict[str, float]] = {}
        self.steps: dict[str, int] = {}
        self.flops: dict[str, dict[str, int]] = {}
        self.active: str | None = None
        self.counter = None  # the FlopCounterMode of a running count_flops
        for target in targets:
            module, _, qualname = target.partition(":")
            if not qualname:
                raise ValueError(f"--time-calls wants module:Qualified.name, got {target!r}")
            owner = importlib.import_module(module)
            *path, name = qualname.split(".")
            for part in path:
                owner = getattr(owner, part)
            setattr(owner, name, self._metered(target, getattr(owner, name)))

    def _metered(self, target: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def metered(*args, **kwargs):
            if self.active is None:
                return fn(*args, **kwargs)
            label, counter = self.active, self.counter
            if counter is None:
                sync_device()
            start = time.perf_counter() if counter is None else counter.get_total_flops()
            try:
                return fn(*args, **kwargs)
            finally:
                if counter is None:
                    sync_device()
                    per_target = self.ms.setdefault(label, {})
                    per_target[target] = per_target.get(target, 0.0) + (time.perf_counter() - start) * 1e3
                else:
                    self.flops[label][target] += counter.get_total_flops() - start
        return metered

    def wrap(self, label: str, fn: Callable[[], object], skip: int = 0) -> Callable[[], object]:
        calls = [0]

        def counted():
            calls[0] += 1
            if calls[0] <= skip:
                return fn()
            self.active, self.steps[label] = label, self.steps.get(label, 0) + 1
            try:
                return fn()
            finally:
                self.active = None
        return counted

    def per_step(self, label: str) -> dict[str, float]:
        """Mean ms per counted step inside each target (0 for targets not called)."""
        steps = max(self.steps.get(label, 0), 1)
        return {target: self.ms.get(label, {}).get(target, 0.0) / steps for target in self.targets}

    def count_flops(self, label: str, fn: Callable[[], object]) -> int:
        """FLOPs of one ``fn()``, and of the calls inside each target (``self.flops[label]``). Counted:
        matrix products, convolutions and scaled-dot-product attention (CPU kernels included);
        custom ops such as ``fastvl_kernels``' count 0."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
        self.flops[label] = dict.fromkeys(self.targets, 0)
        self.active, self.counter = label, counter
        try:
            with counter:
                fn()
        finally:
            self.active, self.counter = None, None
        return counter.get_total_flops()


def _cpu_attention_flops() -> dict:
    """torch's FLOP counter knows the CUDA attention kernels; the CPU flash kernel does the same
    arithmetic."""
    from torch.utils import flop_counter

    aten = torch.ops.aten

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def peak_extra_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated by ``fn()`` above what was allocated before it ran.

    On CUDA, the caching allocator's peak counter. On CPU, torch's profiler records every
    allocation and free; the running sum of those events gives the peak.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()}-{os.cpu_count()}cpu-{torch.get_num_threads()}threads"


def run_cases(op: str, shape: str, cases: dict, baseline: str, reps: int = 10, warmup: int = 2,
              device: str = "cpu", measure_memory: bool = True) -> list[dict]:
    """Time and measure each ``cases[provider]()``; print a table with ratios against ``baseline``."""
    rows = []
    for provider, fn in cases.items():
        row = {"op": op, "provider": provider, "shape": shape, "machine": machine(),
               "torch": torch.__version__, **time_ms(fn, warmup=warmup, reps=reps)}
        if measure_memory:
            row["peak_extra_bytes"] = peak_extra_bytes(fn, device)
        rows.append(row)
    base = next(r for r in rows if r["provider"] == baseline)
    for r in rows:
        r["speedup_vs_" + baseline] = base["ms"] / r["ms"]
        if measure_memory and r["peak_extra_bytes"]:
            r["memory_ratio_vs_" + baseline] = base["peak_extra_bytes"] / r["peak_extra_bytes"]
    print_table(rows)
    save_rows(op, rows)
    return rows


def print_table(rows: list[dict]) -> None:
    cols = ["op", "provider", "shape", "ms", "ms_p20", "ms_p80", "samples_per_s", "peak_extra_bytes", "gflop"]
    cols += sorted({k for r in rows for k in r if k.startswith(("speedup_vs_", "memory_ratio_vs_", "overhead_"))})
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if isinstance(v, tuple):  # an interval
            return "-".join(fmt(x) for x in v)
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    table = [cols] + [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    for line in table:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths)))


def save_rows(op: str, rows: list[dict]) -> None:
    out = Path(os.environ.get("FASTVL_BENCH_RESULTS") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{op}.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

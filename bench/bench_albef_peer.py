"""fastvl's ALBEF step against the peer's (Salesforce LAVIS ``AlbefPretrain``), side by side.

Both sides do ALBEF's pretraining step at the same shapes: ViT-B/16 at 224 px, 6 text + 6 fusion
BERT-base layers, batch 8, 30-token captions without padding, momentum distillation (alpha 0.4) and
65,536-entry ITC queues, fp32, AdamW. fastvl runs ``configs/base_albef.json`` in one process
(``train.zero_stage=0``: one process has nothing to partition); the peer runs
``../shared/peer/lavis_step.py`` in its own virtualenv (set up by ``../shared/peer/setup_lavis.sh``).

    python -m bench.bench_albef_peer --peer-python /path/lavis-venv/bin/python --rounds 3 --steps 3
    ... --fastvl fp32 train.precision=fp32 --fastvl bf16 train.precision=bf16    # the default runs

Each ``--fastvl LABEL [KEY=VALUE ...]`` is a fastvl run with its own overrides: fp32 does the peer's
arithmetic; bf16 is what ``train.precision=auto`` picks on a CPU with native bf16 (the peer has no CPU
bf16 path). Nothing runs at once: each round runs the peer and every fastvl run once, each in a fresh
process (``--warmup`` untimed steps first), in an order that rotates per round. A round's ratio is the
peer's median step time over the run's; the table gives the median of the rounds' ratios and their range.
Also per side: GFLOP per step (torch's ``FlopCounterMode``, one extra step), GFLOP/s, peak RSS; and the
CPU's limit for this work: the very matrix products of one fastvl step (recorded with their shapes
and replayed on random data), timed bare in a loop.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.harness import sync_device

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO.parent / "shared" / "peer" / "lavis_step.py"
FASTVL_CONFIG = "configs/base_albef.json"
# the peer's shapes: a random batch of 30-token captions (no padding), one process, fp32
FASTVL_OVERRIDES = ["data.train=none", "train.zero_stage=0", "train.precision=fp32"]
CAPTION_TOKENS = 30


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# -- the fastvl side (a child process) ---------------------------------------------------------

def fastvl_step(batch: int, overrides: list[str]):
    from bench.bench_train_step import build_run
    from fastvl.train.engine import device_for, init_distributed
    from fastvl.train.loop import quiet_deepspeed

    quiet_deepspeed()
    _, world, local_rank = init_distributed()
    args = argparse.Namespace(text_len=CAPTION_TOKENS)
    _, step = build_run("fastvl", FASTVL_CONFIG, FASTVL_OVERRIDES + [f"data.batch_size={batch}"] + overrides,
                        args, world, device_for(local_rank))
    return step


MATMULS = {"mm", "addmm", "bmm", "baddbmm"}


def record_matmuls(step) -> list[tuple[str, tuple, torch.dtype]]:
    """(op, operand shapes, dtype) of every matrix product in one call of ``step``, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._overloadpacket.__name__
            if name in MATMULS:
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                calls.append((name, tuple(tuple(a.shape) for a in tensors), tensors[-1].dtype))
            return func(*args, **(kwargs or {}))

    with Recorder():
        step()
    return calls


def matmul_flops(op: str, shapes: tuple) -> int:
    if op in ("mm", "addmm"):
        (m, k), (_, n) = shapes[-2:]
        return 2 * m * k * n
    (b, m, k), (_, _, n) = shapes[-2:]
    return 2 * b * m * k * n


def bare_matmul_loop(calls: list[tuple[str, tuple, torch.dtype]], reps: int = 3) -> dict:
    """Time the recorded products bare (``torch.mm`` / ``torch.bmm`` on random operands of their dtype)."""
    operands = {}
    for _, shapes, dtype in calls:
        a, b = shapes[-2:]
        operands.setdefault((a, b, dtype), (torch.randn(a, dtype=dtype), torch.randn(b, dtype=dtype)))
    mm = {2: torch.mm, 3: torch.bmm}

    def loop():
        for _, shapes, dtype in calls:
            a, b = operands[shapes[-2], shapes[-1], dtype]
            mm[a.dim()](a, b)

    loop()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        loop()
        times.append(time.perf_counter() - t)
    flops = sum(matmul_flops(op, shapes) for op, shapes, _ in calls)
    return {"gflop": flops / 1e9, "s": statistics.median(times), "gflop_per_s": flops / 1e9 / statistics.median(times)}


def run_fastvl(args) -> None:
    """Child: time fastvl's step; print the peer's line format."""
    torch.set_num_threads(args.threads)
    step = fastvl_step(args.batch, args.overrides)
    for _ in range(args.warmup):
        step()
    times = []
    for i in range(args.steps):
        sync_device()
        t = time.perf_counter()
        step()
        sync_device()
        times.append(time.perf_counter() - t)
        print(f"step {i}: {times[-1]:.3f}s", flush=True)
    print(f"per_step_s {' '.join(f'{x:.3f}' for x in times)}")
    extra = ""
    if args.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        from bench.harness import _cpu_attention_flops

        counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
        with counter:
            step()
        print(f"FLOPS fastvl gflop_per_step {counter.get_total_flops() / 1e9:.1f}")
        bare = bare_matmul_loop(record_matmuls(step))
        extra = (f" matmul_gflop {bare['gflop']:.1f} bare_matmul_s {bare['s']:.3f} "
                 f"bare_matmul_gflop_per_s {bare['gflop_per_s']:.1f}")
    print(f"RESULT fastvl median_step_s {statistics.median(times):.3f} min {min(times):.3f} max {max(times):.3f} "
          f"n {len(times)} peak_rss_mb {peak_rss_mb():.0f} threads {torch.get_num_threads()}{extra}", flush=True)


# -- the parent: alternate the sides ------------------------------------------------------------

def parse_result(text: str, side: str) -> dict:
    """The ``RESULT``, ``per_step_s`` and ``FLOPS`` lines of a side's output."""
    found = re.search(rf"^RESULT {side} (.*)$", text, re.M)
    if not found:
        raise RuntimeError(f"{side} printed no RESULT line; its output ends with:\n{text[-3000:]}")
    fields = found.group(1).split()
    row = {}
    for key, value in zip(fields[::2], fields[1::2]):
        try:
            row[key] = float(value)
        except ValueError:
            row[key] = value
    steps = re.search(r"^per_step_s (.*)$", text, re.M)
    row["per_step_s"] = [float(x) for x in steps.group(1).split()] if steps else []
    flops = re.search(rf"^FLOPS {side} gflop_per_step (\S+)", text, re.M)
    if flops:
        row["gflop"] = float(flops.group(1))
    return row


def run_side(side: str, args, count_flops: bool) -> dict:
    """One fresh process of ``side`` ("lavis" or a ``--fastvl`` label): its parsed RESULT row."""
    if side == "lavis":
        cmd = [args.peer_python, str(args.peer_script), str(args.steps), "--warmup", str(args.warmup),
               "--batch", str(args.batch), "--threads", str(args.threads), "--fastvl-python", sys.executable]
    else:
        cmd = [sys.executable, "-m", "bench.bench_albef_peer", "--fastvl-child", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads),
               "--overrides", *args.runs[side]]
    if count_flops:
        cmd.append("--count-flops")
    t = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    row = parse_result(done.stdout, "lavis" if side == "lavis" else "fastvl")
    print(f"  {side}: median {row['median_step_s']:.2f} s per step ({', '.join(f'{x:.2f}' for x in row['per_step_s'])}), "
          f"process {time.perf_counter() - t:.0f} s", flush=True)
    return row


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="python of the peer's virtualenv (../shared/peer/setup_lavis.sh)")
    parser.add_argument("--peer-script", type=Path, default=PEER_SCRIPT)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--fastvl", dest="fastvl_runs", action="append", nargs="+", metavar="LABEL [KEY=VALUE]",
                        help="a fastvl run (default: fp32 train.precision=fp32, bf16 train.precision=bf16)")
    parser.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fastvl-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fastvl_child:
        run_fastvl(args)
        return {}
    if not args.peer_python:
        parser.error("--peer-python is required: the python of the LAVIS virtualenv (../shared/peer/setup_lavis.sh)")
    if not args.peer_script.exists():
        parser.error(f"peer script {args.peer_script} not found (../shared/peer/lavis_step.py); pass --peer-script")

    args.runs = {label: overrides for label, *overrides in
                 (args.fastvl_runs or [["fp32", "train.precision=fp32"], ["bf16", "train.precision=bf16"]])}
    if "lavis" in args.runs or len(args.runs) != len(args.fastvl_runs or args.runs):
        parser.error("--fastvl labels must differ from each other and from 'lavis'")
    sides = ["lavis", *args.runs]
    rounds = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        # the first round also counts FLOPs (one extra step each, not timed)
        rounds.append({side: run_side(side, args, count_flops=(r == 0)) for side in order})
    summary = {}
    print()
    print(f"{'run':8} {'s/step':>7} {'GFLOP/step':>11} {'GFLOP/s':>8} {'peak RSS MB':>12} "
          f"{'LAVIS time / this (median, range of rounds)':>44}")
    for side in sides:
        secs = statistics.median(rd[side]["median_step_s"] for rd in rounds)
        gflop = rounds[0][side].get("gflop", float("nan"))
        ratios = [rd["lavis"]["median_step_s"] / rd[side]["median_step_s"] for rd in rounds]
        summary[side] = {"s_per_step": secs, "gflop": gflop, "gflop_per_s": gflop / secs,
                         "peak_rss_mb": max(rd[side]["peak_rss_mb"] for rd in rounds),
                         "speedup_median": statistics.median(ratios), "speedups": ratios}
        interval = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"
        print(f"{side:8} {secs:7.2f} {gflop:11.1f} {gflop / secs:8.1f} {summary[side]['peak_rss_mb']:12.0f} "
              f"{interval:>44}")
    for side in args.runs:
        bare = rounds[0][side]
        if "bare_matmul_gflop_per_s" in bare:
            summary[side]["bare_matmul"] = {k: bare[k] for k in ("matmul_gflop", "bare_matmul_s",
                                                                 "bare_matmul_gflop_per_s")}
            print(f"{side}: its {bare['matmul_gflop']:.0f} GFLOP of matrix products replayed bare (same shapes "
                  f"and dtypes): {bare['bare_matmul_s']:.2f} s, {bare['bare_matmul_gflop_per_s']:.1f} GFLOP/s")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()

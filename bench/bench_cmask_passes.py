"""C-Mask's agent passes side by side: ``agent_passes="once"`` (one agent pass per batch) against
``"per_span"`` (one per span, the paper's loop). Reports, per mode:

1. step time and FLOPs of one optimizer step (``bench.bench_train_step`` with ``--count-flops``, the
   runs interleaved, per_span's overhead against once; also the ms and GFLOP inside the agent's
   ``select`` and ``ppo_update``);
2. the learned-vs-random reward on the built-in data: a short training run per mode on ``data.train``
   with the random-mask return measured every step (``random_reward_every=1``), and the mean of
   ``reward`` / ``reward_random`` over the second half of the run.

    OMP_NUM_THREADS=1 python -m bench.bench_cmask_passes                       # tiny, built-in data
    python -m bench.bench_cmask_passes --config configs/base_cmask.json --set data.batch_size=8 \
        model.attention=sdpa --steps 8 --train-steps 0                         # base: cost only

Appends one JSON row per mode to bench/results/cmask_passes.jsonl (the step rows also go to
train_step.jsonl).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.bench_train_step import main as bench_train_step
from bench.harness import machine, print_table, save_rows

MODES = ("once", "per_span")
AGENT_CALLS = ["fastvl.masking.curriculum:CurriculumMasking.select",
               "fastvl.masking.curriculum:CurriculumMasking.ppo_update"]


def reward_ratio(config: str, mode: str, overrides: list[str], steps: int, out_dir: Path) -> dict:
    """Mean reward, reward_random and their ratio over the second half of a ``steps``-step run."""
    from fastvl.config import load_config
    from fastvl.train.loop import train

    cfg = load_config(config, overrides + [f"method.options.agent_passes={mode}", "method.options.random_reward_every=1",
                                           f"train.steps={steps}", "train.log_every=1", "train.save_every=0",
                                           "train.resume=false", f"train.output_dir={out_dir / mode}"])
    train(cfg, progress=True)
    rows = [json.loads(line) for line in (out_dir / mode / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r and "reward_random" in r][steps // 2:]
    learned = sum(r["reward"] for r in rows) / len(rows)
    random = sum(r["reward_random"] for r in rows) / len(rows)
    return {"reward": learned, "reward_random": random, "reward_learned_over_random": learned / random,
            "reward_steps": f"{steps // 2 + 1}..{steps}"}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_cmask.json")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--train-steps", type=int, default=60, help="steps of each reward run (0: no reward runs)")
    args = parser.parse_args(argv)
    timing = bench_train_step(
        [*(arg for mode in MODES for arg in ("--run", mode, args.config, f"method.options.agent_passes={mode}")),
         *(["--set", *args.overrides] if args.overrides else []), "--steps", str(args.steps), "--no-memory",
         "--count-flops", "--time-calls", *AGENT_CALLS])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, step_row in zip(MODES, timing):
            row = {"op": "cmask_agent_passes", "provider": mode, "shape": step_row["shape"], "machine": machine(),
                   "ms": step_row["ms"], "gflop": step_row["gflop"],
                   "overhead_time_vs_once": step_row["overhead_time_vs_once"],
                   "overhead_flops_vs_once": step_row["overhead_flops_vs_once"],
                   "ms_per_step_in": step_row["ms_per_step_in"], "gflop_in": step_row["gflop_in"]}
            if args.train_steps:
                row.update(reward_ratio(args.config, mode, args.overrides, args.train_steps, Path(tmp)))
            rows.append(row)
    print_table([{k: v for k, v in r.items() if not isinstance(v, dict)} for r in rows])
    for row in rows:
        print(json.dumps(row))
    save_rows("cmask_passes", rows)
    return rows


if __name__ == "__main__":
    main()

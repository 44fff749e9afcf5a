"""End-to-end training step: samples/s, median step time and peak memory of one optimizer step
(forward + backward + DeepSpeed step) for one or more runs, side by side in one process, with overheads
(run / first run) against the first run — the baseline every method's overhead is measured against.
The runs are built first and timed in interleaved rounds (``harness.time_interleaved``); the time
overhead is the median of the per-round ratios, with its 20th-80th percentiles and a 95% bootstrap
interval of the median (it narrows with ``--steps``, the number of rounds).

    python -m bench.bench_train_step                                   # the tiny ALBEF baseline
    python -m bench.bench_train_step --run albef configs/tiny_albef.json \\
        --run maskvlm configs/tiny_maskvlm.json --set data.batch_size=16
    python -m bench.bench_train_step --run random configs/tiny_cmask.json method.options.mask_selection=random \\
        --run agent configs/tiny_cmask.json

``--run LABEL CONFIG [KEY=VALUE ...]`` adds a run (its own overrides); ``--set KEY=VALUE ...`` applies
to every run. One process. Each run's batch is the first batch of its ``data.train`` when that path
exists (else a seeded random batch of the same shape), reused every step, so the number is the model
+ optimizer cost without data loading; each step advances the recipe's step counter (``after_step``)
as training does. Prints a table and one JSON row per run, appended to bench/results/train_step.jsonl.
``--time-calls module:Qualified.name ...`` also reports the ms per step each run spends inside those
functions (where an overhead goes; ``harness.CallMeter``). ``--count-flops`` counts each run's FLOPs of
one step (and inside the ``--time-calls`` functions): a hardware-independent share, e.g. of the work a
GPU side stream could hide.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.harness import CallMeter, machine, peak_extra_bytes, print_table, save_rows, time_interleaved
from fastvl.config import load_config
from fastvl.data.batch import Batch

DEFAULT_RUN = ["albef", "configs/tiny_albef.json"]


def fixed_batch(cfg, text_len: int) -> tuple[Batch, str]:
    if Path(cfg.data.train).exists():
        from fastvl.data.loader import build_loader

        return next(iter(build_loader(cfg, "train"))), "data"
    g = torch.Generator().manual_seed(0)
    b, size = cfg.data.batch_size, cfg.data.image_size
    ids = torch.randint(1000, cfg.model.vocab_size, (b, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return Batch(torch.randn(b, 3, size, size, generator=g), ids, torch.ones_like(ids), []), "random"


def build_run(label: str, config: str, overrides: list[str], args, world: int, device):
    """(row metadata, one training step) of a run; the step reuses one batch and advances the step counter."""
    from fastvl.methods import build_method
    from fastvl.train.engine import build_engine
    from fastvl.train.loop import seed_everything, to_engine

    cfg = load_config(config, overrides + ["train.save_every=0", "train.resume=false"])
    seed_everything(cfg.train.seed)
    engine = build_engine(cfg, build_method(cfg), world, device)
    batch, source = fixed_batch(cfg, args.text_len)
    batch = to_engine(batch, engine)
    steps_done = [0]
    samples = cfg.data.batch_size * cfg.train.grad_accum * world

    def step():
        for micro in range(cfg.train.grad_accum):
            _, applied = engine.train_micro_batch(batch, micro)
        steps_done[0] += 1
        engine.recipe.after_step(steps_done[0], applied)

    row = {"op": "train_step", "provider": label,
           "shape": f"{cfg.method.name} {cfg.model.preset} b{samples} L{batch.input_ids.shape[1]} "
                    f"{engine.precision} zero{cfg.train.zero_stage}",
           "config": config, "overrides": overrides, "batch_source": source, "machine": machine(),
           "torch": torch.__version__, "optimizer": engine.optimizer_name,
           "samples": samples}
    return row, step


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", dest="runs", action="append", nargs="+", metavar="LABEL CONFIG [KEY=VALUE]",
                        help="a run to measure; the first is the baseline (default: albef configs/tiny_albef.json)")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides for every run")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--text-len", type=int, default=24, help="caption tokens of the random batch")
    parser.add_argument("--no-memory", action="store_true", help="skip the (slow on CPU) profiler memory pass")
    parser.add_argument("--time-calls", nargs="+", default=[], metavar="MODULE:QUALNAME",
                        help="also report the ms per step spent inside these functions or methods, e.g. "
                             "fastvl.masking.curriculum:CurriculumMasking.ppo_update (nested calls count in both)")
    parser.add_argument("--count-flops", action="store_true",
                        help="also count the FLOPs of one step per run (torch's FlopCounterMode), and inside the "
                             "--time-calls functions")
    args = parser.parse_args(argv)
    runs = args.runs or [DEFAULT_RUN]
    if any(len(run) < 2 for run in runs):
        parser.error("--run needs a label and a config file: --run LABEL CONFIG [KEY=VALUE ...]")
    shared = [item for group in args.overrides for item in group]

    from fastvl.train.engine import device_for, init_distributed
    from fastvl.train.loop import quiet_deepspeed

    quiet_deepspeed()
    _, world, local_rank = init_distributed()
    device = device_for(local_rank)
    labels = [label for label, *_ in runs]
    if len(set(labels)) != len(labels):
        parser.error(f"--run labels must differ, got {labels}")
    built = {label: build_run(label, config, shared + extra, args, world, device) for label, config, *extra in runs}
    calls = CallMeter(args.time_calls)
    timing = time_interleaved({label: calls.wrap(label, step, skip=args.warmup) for label, (_, step) in built.items()},
                              warmup=args.warmup, reps=args.steps)
    rows = []
    base = labels[0]
    for label, (row, step) in built.items():
        t = timing[label]
        row.update(ms=t["ms"], ms_p20=t["ms_p20"], ms_p80=t["ms_p80"], samples_per_s=row.pop("samples") / t["ms"] * 1e3)
        row[f"overhead_time_vs_{base}"] = t["ratio"]
        row[f"overhead_time_vs_{base}_p20"], row[f"overhead_time_vs_{base}_p80"] = t["ratio_p20"], t["ratio_p80"]
        row[f"overhead_time_vs_{base}_ci95"] = t["ratio_ci95"]
        if args.time_calls:
            row["ms_per_step_in"] = calls.per_step(label)
        if args.count_flops:
            row["gflop"] = calls.count_flops(label, step) / 1e9
            row[f"overhead_flops_vs_{base}"] = row["gflop"] / rows[0]["gflop"] if rows else 1.0
            if args.time_calls:
                row["gflop_in"] = {target: flops / 1e9 for target, flops in calls.flops[label].items()}
        rows.append(row)
        if not args.no_memory:
            row["peak_extra_bytes"] = peak_extra_bytes(step, device.type)
            row[f"overhead_memory_vs_{base}"] = row["peak_extra_bytes"] / rows[0]["peak_extra_bytes"]
    print_table(rows)
    for row in rows:
        for target, ms in row.get("ms_per_step_in", {}).items():
            print(f"  {row['provider']}: {ms:.2f} ms per step in {target}")
        for target, gflop in row.get("gflop_in", {}).items():
            print(f"  {row['provider']}: {gflop:.3f} GFLOP of {row['gflop']:.3f} per step in {target}")
    for row in rows:
        print(json.dumps(row))
    save_rows("train_step", rows)
    return rows


if __name__ == "__main__":
    main()

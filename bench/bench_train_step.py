"""End-to-end training step: samples/s, median step time and peak memory of one optimizer step
(forward + backward + DeepSpeed step) for a config and a method — the baseline every method's
overhead is measured against.

    python -m bench.bench_train_step [--config configs/tiny_albef.json] [--method albef]
                                     [--set data.batch_size=64 ...] [--steps 20] [--warmup 3]

One process. The batch is the first batch of ``data.train`` when that path exists (else a random
batch of the same shape: images, captions of ``--text-len`` tokens), reused every step so the number
is the model + optimizer cost without data loading. Prints one JSON row and appends it to
bench/results/train_step.jsonl (bench/harness.py).
"""
from __future__ import annotations

import argparse
import json
import resource
from pathlib import Path

import torch

from bench.harness import machine, peak_extra_bytes, save_rows, time_ms
from fastvl.config import load_config
from fastvl.data.batch import Batch


def fixed_batch(cfg, text_len: int) -> tuple[Batch, str]:
    if Path(cfg.data.train).exists():
        from fastvl.data.loader import build_loader

        return next(iter(build_loader(cfg, "train"))), "data"
    g = torch.Generator().manual_seed(0)
    b, size = cfg.data.batch_size, cfg.data.image_size
    ids = torch.randint(1000, cfg.model.vocab_size, (b, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return Batch(torch.randn(b, 3, size, size, generator=g), ids, torch.ones_like(ids), []), "random"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_albef.json")
    parser.add_argument("--method", default=None, help="recipe name (method.name), default: the config's")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--text-len", type=int, default=24, help="caption tokens of the random batch")
    parser.add_argument("--no-memory", action="store_true", help="skip the (slow on CPU) profiler memory pass")
    args = parser.parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    if args.method:
        overrides.append(f"method.name={args.method}")
    cfg = load_config(args.config, overrides + ["train.save_every=0", "train.resume=false"])

    from fastvl.methods import build_method
    from fastvl.train.engine import build_engine, device_for, init_distributed
    from fastvl.train.loop import _quiet_deepspeed, _to_device, seed_everything

    _quiet_deepspeed()
    _, world, local_rank = init_distributed()
    device = device_for(local_rank)
    seed_everything(cfg.train.seed)
    engine = build_engine(cfg, build_method(cfg), world, device)
    batch, source = fixed_batch(cfg, args.text_len)
    batch = _to_device(batch, engine)
    steps_done = [0]

    def step():
        for _ in range(cfg.train.grad_accum):
            engine.backward_and_step(engine.ds(batch)["loss"])
        steps_done[0] += 1
        engine.recipe.after_step(steps_done[0])

    timing = time_ms(step, warmup=args.warmup, reps=args.steps)
    samples = cfg.data.batch_size * cfg.train.grad_accum * world
    row = {"op": "train_step", "provider": cfg.method.name,
           "shape": f"{cfg.model.preset} b{samples} L{batch.input_ids.shape[1]} {engine.precision} zero{cfg.train.zero_stage}",
           "config": args.config, "overrides": overrides, "batch_source": source, "machine": machine(),
           "torch": torch.__version__, "optimizer": engine.optimizer_name, **timing,
           "samples_per_s": samples / (timing["ms"] / 1e3)}
    if not args.no_memory:
        row["peak_extra_bytes"] = peak_extra_bytes(step, device.type)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(row))
    save_rows("train_step", [row])
    return row


if __name__ == "__main__":
    main()

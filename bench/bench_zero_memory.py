"""Memory per rank at each ZeRO stage: 2 processes (gloo on CPU, NCCL on GPUs) train one recipe for a
few steps at each stage, and each rank reports what it holds.

    python -m bench.bench_zero_memory                                   # base ALBEF, stages 0-3
    python -m bench.bench_zero_memory --config configs/base_mamo.json --stages 2 3 --set data.batch_size=4

Per stage and rank:

- ``tensors_gb``: the bytes of every tensor storage alive in the process after the last step (each
  storage counted once): parameters or their ZeRO partitions, gradients, optimizer state, buffers (EMA
  teachers, ITC queues). What ZeRO partitions, read off the tensors, independent of the allocator.
- ``peak_gb``: the peak of the memory the process held during the stage (on CPU the peak resident set,
  VmHWM; on CUDA ``max_memory_allocated``), including activations and the all-gathered parameters
  of ZeRO-3, the Python interpreter and the libraries.

Each stage runs in fresh processes (a process's peak cannot be reset reliably after a larger stage),
on a fixed random batch of ``data.batch_size`` samples per rank, in fp32 unless ``--set`` says
otherwise. ZeRO-3 runs with the bucket sizes fastvl derives from the model width
(``fastvl.train.engine.zero3_buckets``) unless ``--set train.deepspeed=...`` overrides them. Prints a
table and one JSON row per stage and rank, appended to bench/results/zero_memory.jsonl.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import time
import warnings
from typing import Optional

import torch

from bench.harness import machine, save_rows, sync_device

DEFAULTS = ["data.batch_size=2", "train.precision=fp32", "data.num_workers=0", "train.save_every=0",
            "train.resume=false"]


def live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage reachable from Python objects (parameters, gradients,
    optimizer state, buffers, ZeRO's flat partitions)."""
    seen, total = set(), 0
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and not obj.is_meta]
    for obj in tensors:
        storage = obj.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if storage.data_ptr() and key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (peak memory needs Linux)")


def random_batch(cfg, text_len: int):
    from fastvl.data.batch import Batch

    g = torch.Generator().manual_seed(0)
    b, size = cfg.data.batch_size, cfg.model.image_size
    ids = torch.randint(1000, cfg.model.vocab_size, (b, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return Batch(torch.randn(b, 3, size, size, generator=g), ids, torch.ones_like(ids), [])


def _rank_worker(rank: int, world: int, port: int, config: str, overrides: list[str], steps: int, text_len: int,
                 out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from fastvl.config import load_config
    from fastvl.methods import build_method
    from fastvl.train.engine import build_engine, device_for, init_distributed
    from fastvl.train.loop import quiet_deepspeed, seed_everything, to_engine

    try:
        quiet_deepspeed()
        init_distributed()
        device = device_for(rank)
        cfg = load_config(config, overrides)
        seed_everything(cfg.train.seed)
        engine = build_engine(cfg, build_method(cfg), world, device)
        batch = to_engine(random_batch(cfg, text_len), engine)
        engine.recipe.train()
        sync_device()
        started = time.perf_counter()
        for step in range(1, steps + 1):
            _, applied = engine.train_micro_batch(batch, 0)
            engine.recipe.after_step(step, applied)
        sync_device()
        seconds = (time.perf_counter() - started) / steps
        gc.collect()
        out.put({"rank": rank, "tensors_gb": live_tensor_bytes() / 1e9, "peak_gb": peak_bytes(device) / 1e9,
                 "s_per_step": seconds, "precision": engine.precision,
                 "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.recipe.parameters())})
    except Exception as error:  # reported by the parent, which would otherwise wait for the queue
        out.put({"rank": rank, "error": f"{type(error).__name__}: {error}"})
        raise


def measure_stage(config: str, overrides: list[str], stage: int, world: int, steps: int, text_len: int) -> list[dict]:
    """Spawn ``world`` fresh processes that train at ZeRO ``stage``; their rows, by rank."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    args = (world, port, config, overrides + [f"train.zero_stage={stage}"], steps, text_len, out)
    procs = [ctx.Process(target=_rank_worker, args=(rank, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    rows = sorted((out.get() for _ in procs), key=lambda row: row["rank"])
    for p in procs:
        p.join()
    errors = [row["error"] for row in rows if "error" in row]
    if errors:
        raise RuntimeError(f"ZeRO-{stage}: {errors[0]}")
    return rows


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/base_albef.json")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="training steps per stage (the optimizer state "
                        "exists after the first)")
    parser.add_argument("--text-len", type=int, default=30, help="caption tokens of the random batch")
    parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help=f"config overrides after the defaults {' '.join(DEFAULTS)}")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    rows = []
    for stage in tqdm(args.stages, desc="ZeRO stages", unit="stage"):
        for row in measure_stage(args.config, DEFAULTS + args.overrides, stage, args.processes, args.steps,
                                 args.text_len):
            rows.append({"op": "zero_memory", "provider": f"zero{stage}", "stage": stage,
                         "shape": f"{args.config} x{args.processes} {' '.join(args.overrides)}".strip(),
                         "machine": machine(), "torch": torch.__version__, **row})
    print(f"{'stage':<6}{'rank':<6}{'tensors GB':>12}{'peak GB':>10}{'s/step':>9}")
    for row in rows:
        print(f"{row['stage']:<6}{row['rank']:<6}{row['tensors_gb']:>12.2f}{row['peak_gb']:>10.2f}{row['s_per_step']:>9.1f}")
    for row in rows:
        print(json.dumps(row))
    save_rows("zero_memory", rows)
    return rows


if __name__ == "__main__":
    main()

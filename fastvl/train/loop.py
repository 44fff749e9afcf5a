"""The training loop: parse nothing, build everything, run steps, checkpoint, log.

``train(cfg)`` is the whole job for one process of a (possibly 1-process) DeepSpeed run:

1. start-up checks that stop with one ``ConfigError`` (data path, fp16 without CUDA, ZeRO-3 support,
   an empty dataset — the last one at the first read);
2. the recipe (``fastvl.methods.build_method``) wrapped by ``engine.build_engine``;
3. resume from ``output_dir/latest`` when ``train.resume`` (model, optimizer, LR schedule, step,
   samples seen, data position and RNG of every rank);
4. steps of ``grad_accum`` micro-batches each, ``recipe.after_step(step)`` after every optimizer step;
5. a JSONL row every ``log_every`` steps, a checkpoint every ``save_every`` steps (keeping
   ``keep_last``), and at the end a final checkpoint, consolidated fp32 weights and the loss plot.
"""
from __future__ import annotations

import glob
import json
import logging
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch

from ..config import ConfigError, RunConfig
from ..data.batch import Batch
from . import checkpoint as ckpt
from .engine import Engine, build_engine, device_for, init_distributed, resolve_precision
from .metrics import MetricsWriter, MetricWindow, format_postfix, peak_memory, sum_over_ranks

LoaderFactory = Callable[[RunConfig, str, int, int, int], Iterable[Batch]]
"""``(cfg, split, rank, world_size, epoch) -> iterable of Batch`` with ``state_dict()`` /
``load_state_dict()`` giving its position within the epoch (``fastvl.data.build_loader``)."""


class EndOfData(Exception):
    """``train.max_epochs`` passes over the data are done (or a finite loader ran out)."""


class DataStream:
    """The rank's training batches with a resumable position.

    ``fastvl.data`` train loaders are infinite (epochs run on into each other) and report the epoch
    of their next sample as ``loader.epoch``; the stream stops at ``train.max_epochs`` from that. A
    finite loader (a stand-in) ends the run when it runs out; one that yields nothing at all is an
    empty dataset."""

    def __init__(self, factory: LoaderFactory, cfg: RunConfig, rank: int, world_size: int):
        self.cfg = cfg
        self.loader = factory(cfg, "train", rank, world_size, 0)
        self.iterator: Optional[Iterator[Batch]] = None
        self.yielded = 0

    @property
    def epoch(self) -> int:
        return int(getattr(self.loader, "epoch", 0))

    def next(self) -> Batch:
        max_epochs = self.cfg.train.max_epochs
        if max_epochs and self.epoch >= max_epochs:
            raise EndOfData
        try:
            # a torch DataLoader seeds its workers from the global torch RNG when its iterator starts,
            # which happens at different steps in a straight and a resumed run: keep the training RNG
            # stream (dropout, ...) out of it
            with torch.random.fork_rng(devices=[]):
                if self.iterator is None:
                    self.iterator = iter(self.loader)
                batch = next(self.iterator)
        except StopIteration:
            if self.yielded == 0:
                raise ConfigError(f"data.train: no samples in {self.cfg.data.train}") from None
            raise EndOfData from None
        self.yielded += 1
        return batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def log_metrics(self) -> dict[str, float]:
        """The loader's scalars for the metrics log (per-source sample counts of a mixture), if any,
        summed over ranks (a collective, like ``MetricWindow.reduce``)."""
        return sum_over_ranks(getattr(self.loader, "log_metrics", dict)())

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self.iterator = None  # a new iterator starts at the restored position
        self.yielded = max(self.yielded, 1)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Optional[Path]
    metrics: Path
    consolidated: Optional[Path]
    plot: Optional[Path]
    last_row: Optional[dict]


def check_data_path(spec, key: str) -> None:
    """Stop at start-up when a local data path names nothing (a folder, a file or a glob of shards);
    ``spec`` may be a mixture. URLs, ``pipe:`` commands and brace patterns are checked by the loader."""
    from ..data.mixture import train_sources
    from ..data.streaming import is_remote

    for source in train_sources(spec, key):
        for path in [source.path] if isinstance(source.path, str) else source.path:
            if is_remote(path) or "{" in path:
                continue
            if any(c in path for c in "*?["):
                if not glob.glob(path):
                    raise ConfigError(f"{key}: no files match {path}")
            elif not Path(path).exists():
                raise ConfigError(f"{key}: path not found: {path}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _default_recipe(cfg: RunConfig):
    from ..methods import build_method

    return build_method(cfg)


def _default_loader(cfg: RunConfig, split: str, rank: int, world_size: int, epoch: int):
    from ..data.loader import build_loader

    return build_loader(cfg, split, rank, world_size, epoch)


def quiet_deepspeed() -> None:
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train(cfg: RunConfig, *, build_recipe: Callable[[RunConfig], torch.nn.Module] = _default_recipe,
          build_loader: LoaderFactory = _default_loader, stop_at: Optional[int] = None,
          progress: bool = True) -> TrainResult:
    """Run (or continue) the training of ``cfg`` in this process; see the module docstring.

    ``stop_at`` ends the run after that many optimizer steps in total, with a checkpoint, as an
    interruption would (the LR schedule still spans ``train.steps``); used to test exact resume.
    ``build_recipe`` / ``build_loader`` replace the recipe registry and the data loaders."""
    check_data_path(cfg.data.train, "data.train")
    quiet_deepspeed()
    rank, world, local_rank = init_distributed()
    device = device_for(local_rank)
    resolve_precision(cfg.train.precision, device)  # fp16 on CPU stops here, before any work
    run_dir = Path(cfg.train.output_dir)
    is_main = rank == 0

    stream = DataStream(build_loader, cfg, rank, world)  # a missing path or empty dataset stops here
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    engine = build_engine(cfg, build_recipe(cfg), world, device)
    recipe = engine.recipe
    seed_everything(cfg.train.seed + rank)  # independent dropout etc. per rank

    resumed = ckpt.load_latest_checkpoint(engine.ds, run_dir) if cfg.train.resume else None
    step, samples_seen = 0, 0
    if resumed is not None:
        step, samples_seen = resumed["step"], resumed["samples_seen"]
        stream.load_state_dict(resumed["rank"]["data"])
        recipe.load_rank_state(resumed["rank"].get("recipe", {}))  # absent in older checkpoints
        # the recipe's own step counter came back with its state_dict

    global_batch = cfg.data.batch_size * cfg.train.grad_accum * world
    if resumed is not None and is_main:
        ckpt.warn_on_new_global_batch(resumed, global_batch, cfg.train.steps)
    loss_names = ["loss"] + sorted(getattr(recipe, "loss_weights", {}))
    config_dict = cfg.to_dict()
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        (run_dir / "run.json").write_text(json.dumps({
            "precision": engine.precision, "optimizer": engine.optimizer_name, "world_size": world,
            "device": str(device), "zero_stage": cfg.train.zero_stage, "global_batch": global_batch,
            "loss_names": loss_names[1:], "resumed_from_step": step if resumed else None,
        }, indent=2) + "\n")
    writer = MetricsWriter(run_dir / "metrics.jsonl", is_main, resume_step=step if resumed else None,
                           tensorboard="tensorboard" in cfg.train.report_to)

    bar = None
    if progress and is_main:
        from tqdm.auto import tqdm

        # redirected to a file (a launcher log), redraw every 30 s instead of flooding it
        bar = tqdm(total=cfg.train.steps, initial=step, desc="train", dynamic_ncols=True,
                   mininterval=0.1 if sys.stderr.isatty() else 30.0)

    total = cfg.train.steps if stop_at is None else min(cfg.train.steps, stop_at)
    window, last_row = MetricWindow(), None
    last_saved = run_dir / ckpt.tag_for(step) if resumed is not None else None
    recipe.train()
    while step < total:
        started = time.perf_counter()
        lr = engine.lr()
        try:
            for micro in range(cfg.train.grad_accum):
                outputs, applied = engine.train_micro_batch(to_engine(stream.next(), engine), micro)
                window.add_micro_batch(outputs)
        except EndOfData:
            break
        step += 1
        samples_seen += global_batch
        recipe.after_step(step, applied)
        window.add_step(time.perf_counter() - started, global_batch)

        if step % cfg.train.log_every == 0 or step == total:
            last_row = _log_row(window, step, stream.epoch, samples_seen, lr, engine, stream.log_metrics())
            writer.write(last_row)
            if bar is not None:
                bar.set_postfix(format_postfix(last_row, loss_names, last_row["samples_per_s"]), refresh=False)
            window = MetricWindow()
        if bar is not None:
            bar.update(1)
        if cfg.train.save_every and step % cfg.train.save_every == 0:
            last_saved = _save(engine, cfg, step, samples_seen, stream)
    if bar is not None:
        bar.close()
    if window.steps:  # steps since the last row (the data ran out mid-window)
        last_row = _log_row(window, step, stream.epoch, samples_seen, engine.lr(), engine, stream.log_metrics())
        writer.write(last_row)
    writer.close()

    if last_saved is None or last_saved.name != ckpt.tag_for(step):
        last_saved = _save(engine, cfg, step, samples_seen, stream) if step > 0 else None
    consolidated = plot = None
    finished = step >= cfg.train.steps or stop_at is None
    if finished and last_saved is not None:
        consolidated = ckpt.save_consolidated(engine, run_dir, step, config_dict)
    if is_main and last_row is not None:
        from .plot import plot_run

        plot = plot_run(run_dir)
    result = TrainResult(run_dir, step, last_saved, run_dir / "metrics.jsonl", consolidated, plot, last_row)
    if is_main:
        print(f"done: {step} steps")
        print(f"checkpoint: {last_saved}" + (f"  (fp32 weights: {consolidated})" if consolidated else ""))
        print(f"metrics:    {result.metrics}")
        print(f"plot:       {plot}")
    return result


def to_engine(batch: Batch, engine: Engine) -> Batch:
    batch = batch.to(engine.device, non_blocking=True)
    if batch.images.dtype != engine.dtype:
        batch.images = batch.images.to(engine.dtype)  # DeepSpeed keeps the module in the compute dtype
    return batch


def _log_row(window: MetricWindow, step: int, epoch: int, samples_seen: int, lr: float, engine: Engine,
             data: dict[str, float]) -> dict:
    """``data``: the loader's own scalars, summed over ranks (per-source sample counts of a mixture)."""
    memory, kind = peak_memory()
    row = {"step": step, "epoch": epoch, "samples_seen": samples_seen, "lr": lr, **window.reduce(),
           **window.throughput(), "peak_mem_mb": memory, "peak_mem_kind": kind, **data}
    scale = current_loss_scale(engine.ds.optimizer) if engine.precision == "fp16" else None
    if scale is not None:
        row["loss_scale"] = float(scale)
    return row


def current_loss_scale(optimizer) -> Optional[float]:
    """The dynamic loss scale of a DeepSpeed fp16 optimizer: the stage-0 wrappers keep it in
    ``loss_scale_config.cur_scale``, the ZeRO optimizers in ``cur_scale``; None for any other."""
    config = getattr(optimizer, "loss_scale_config", None)
    scale = getattr(config, "cur_scale", None) if config is not None else getattr(optimizer, "cur_scale", None)
    return None if scale is None else float(scale)


def _save(engine: Engine, cfg: RunConfig, step: int, samples_seen: int, stream: DataStream) -> Path:
    return ckpt.save_checkpoint(engine.ds, Path(cfg.train.output_dir), step,
                                {"samples_seen": samples_seen, "config": cfg.to_dict()},
                                {"data": stream.state_dict(), "recipe": engine.recipe.rank_state()},
                                cfg.train.keep_last)

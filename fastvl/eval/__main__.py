"""``fastvl eval --checkpoint RUN_DIR[/step_N | /model.safetensors] | EXPORT_DIR --data PATH [--set k=v ...]``

Rebuilds the recipe from the config saved with the checkpoint (no DeepSpeed engine: consolidated fp32
weights, or the DeepSpeed files read directly), encodes every image of PATH with all of its captions
(or the first ``eval.max_samples``, which is then printed) and reports zero-shot retrieval R@K by the
COCO/Flickr protocol (retrieval.py) and the ARO-style probes (probes.py) as a JSON file (default
``RUN_DIR/eval_<data name>.json``) and a printed table. PATH is shards, a JSONL file or an ALBEF-style
.json annotation file (``--set data.image_root=DIR`` when its image paths are relative to DIR).
``--config`` / ``--set`` may change only the ``data`` and ``eval`` sections (batch size, K values,
re-rank depth, resize, ...).

Under a launcher (``torchrun``/``deepspeed`` setting ``WORLD_SIZE`` > 1) every rank encodes its share
of the images and scores its share of the ITM pairs; all ranks compute the metrics, rank 0 writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, RunConfig, _parse_override, config_from_dict, merge, read_config_file
from ..dist import rank_and_world
from .probes import probe_metrics
from .retrieval import encode, gather_encoded, group_images, retrieval_metrics

EDITABLE_SECTIONS = ("data", "eval")


def eval_config(saved: dict, config_path: Optional[str], overrides: list[str], data: str) -> RunConfig:
    """The checkpoint's config with the ``data``/``eval`` sections of ``config_path`` and
    ``overrides`` applied, and ``data.eval = data``."""
    changes: dict = {}
    if config_path is not None:
        changes = {k: v for k, v in read_config_file(config_path).items() if k in EDITABLE_SECTIONS}
    for text in overrides:
        keys, value = _parse_override(text)
        if keys[0] not in EDITABLE_SECTIONS:
            raise ConfigError(f"--set {text}: only data.* and eval.* can change at evaluation "
                              f"(the model comes from the checkpoint)")
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        changes = merge(changes, nested)
    changes = merge(changes, {"data": {"eval": data}})
    return config_from_dict(merge(saved, changes))


def evaluate(recipe, batches, cfg: RunConfig, device: torch.device = torch.device("cpu"),
             progress: bool = False) -> dict:
    """Retrieval and probe metrics of ``recipe.scorer`` over ``batches`` (this rank's share of the data
    under a launcher)."""
    started = time.perf_counter()
    data = group_images(gather_encoded(encode(recipe.scorer, batches, device, progress)))
    batch_size = 4 * cfg.data.batch_size  # ITM pairs need no gradients: bigger batches, fewer calls
    result = {"retrieval": retrieval_metrics(data, recipe.scorer, cfg.eval.k_values, cfg.eval.itm_rerank,
                                             batch_size, device, progress),
              "probes": probe_metrics(data, recipe.scorer, batch_size, device)}
    result["seconds"] = time.perf_counter() - started
    return result


def format_table(result: dict) -> str:
    r = result["retrieval"]
    ks = list(r["itc"]["image_to_text"])
    lines = [f"retrieval: {r['n_images']} images, {r['n_captions']} captions ({r['n_distinct_captions']} distinct)",
             f"  {'direction':<15}{'scores':<18}" + "".join(f"{k:>8}" for k in ks)]
    blocks = [("ITC", r["itc"])]
    if "itm_rerank" in r:
        blocks.append((f"ITC+ITM top-{r['itm_rerank']['k']}", r["itm_rerank"]))
    for direction in ("image_to_text", "text_to_image"):
        for name, block in blocks:
            values = block[direction]
            lines.append(f"  {direction.replace('_to_', '->'):<15}{name:<18}" + "".join(f"{values[k]:8.3f}" for k in ks))
    probes = result["probes"]
    if probes:
        lines.append("probes: true caption scored above the hard negative (chance 0.5)")
        lines.append(f"  {'negative':<18}{'n':>6}{'ITM':>8}{'ITC':>8}")
        for kind, p in probes.items():
            lines.append(f"  {kind:<18}{p['n']:>6}{p['itm_accuracy']:8.3f}{p['itc_accuracy']:8.3f}")
    else:
        lines.append("probes: the data has no hard negatives")
    return "\n".join(lines)


def _default_output(checkpoint: Path, data: str) -> Path:
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    if run_dir.name.startswith("step_"):
        run_dir = run_dir.parent
    name = Path(data.rstrip("/")).stem or "data"
    return run_dir / f"eval_{name}.json"


def main(argv: Optional[list[str]] = None, prog: str = "fastvl eval") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True,
                        help="RUN_DIR, RUN_DIR/step_N, a weights file or a folder written by fastvl export")
    parser.add_argument("--data", required=True,
                        help="folder/glob of *.tar shards, a .jsonl file or an ALBEF-style .json annotation file")
    parser.add_argument("--config", default=None, help="JSON whose data/eval sections override the checkpoint's")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override data.* / eval.* fields, e.g. --set eval.itm_rerank=32")
    parser.add_argument("--out", default=None, help="JSON output (default RUN_DIR/eval_<data name>.json)")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    try:
        result = run(args.checkpoint, args.data, args.config, overrides, args.out)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    if "output" in result:  # rank 0
        print(format_table(result))
        print(f"results: {result['output']}")
    return 0


def cap_message(evaluated: int, available: int) -> Optional[str]:
    """The line saying that ``eval.max_samples`` leaves images out, or None when it does not."""
    if evaluated >= available:
        return None
    return f"evaluating {evaluated} of {available} images (eval.max_samples; 0 = all)"


def run(checkpoint: str, data: str, config_path: Optional[str] = None, overrides: Optional[list[str]] = None,
        out: Optional[str] = None) -> dict:
    """Load, evaluate, write the JSON (rank 0); returns the result (on rank 0 with its path under
    "output")."""
    from ..data.loader import build_loader
    from ..train.checkpoint import load_recipe, resolve_checkpoint, saved_config
    from ..train.loop import check_data_path

    check_data_path(data, "--data")
    kind, where = resolve_checkpoint(checkpoint)
    cfg = eval_config(saved_config(kind, where), config_path, overrides or [], data)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from ..train.engine import init_distributed

        init_distributed()
    rank, world = rank_and_world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    recipe, cfg, step = load_recipe(checkpoint, cfg, device)
    loader = build_loader(cfg, "eval", rank, world, 0, with_negatives=True, all_captions=True)
    message = cap_message(loader.num_samples, len(loader.source))
    if message and rank == 0:
        print(message)
    result = {"checkpoint": str(where), "step": step, "data": data, "method": cfg.method.name,
              "data_samples": len(loader.source),
              **evaluate(recipe, loader, cfg, device, progress=rank == 0)}
    if rank != 0:
        return result
    path = Path(out) if out else _default_output(Path(checkpoint), data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    result["output"] = str(path)
    return result


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastvl.eval"))

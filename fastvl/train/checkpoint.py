"""Checkpoints: DeepSpeed's own save/load for training, plain files for everything that reads them.

Layout of a run directory::

    RUN_DIR/config.json            the resolved RunConfig
    RUN_DIR/metrics.jsonl          one row per log step (metrics.py)
    RUN_DIR/run.json               what was resolved at start-up (precision, optimizer, loss names, ...)
    RUN_DIR/step_<N>/...           DeepSpeed checkpoints (model, optimizer, LR schedule; client state)
    RUN_DIR/latest                 DeepSpeed's pointer to the newest step_<N>
    RUN_DIR/model_fp32.pt          consolidated fp32 weights + config, written at the end of training

The client state of a checkpoint holds what DeepSpeed does not know about: the step, samples seen,
the resolved config, and per rank the data-stream position, the recipe's ``rank_state`` (C-Mask's
pending rollouts) and the RNG states (python, numpy, torch CPU and CUDA), gathered from every rank
because ZeRO stages 0-2 write the client state from rank 0 only. Everything else a recipe carries (EMA
teacher, agent, step counter) is the same on every rank and lives in its ``state_dict``.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig, config_from_dict

CONSOLIDATED = "model_fp32.pt"
TAG_PATTERN = re.compile(r"^step_(\d+)$")


def tag_for(step: int) -> str:
    return f"step_{step}"


# ---------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather_objects(obj) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# training checkpoints (DeepSpeed)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step_<N> checkpoint in ``run_dir``, oldest first."""
    found = []
    for path in Path(run_dir).glob("step_*"):
        match = TAG_PATTERN.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(ds_engine, run_dir: Path, step: int, state: dict, rank_state: dict, keep_last: int) -> Path:
    """Save through ``ds_engine.save_checkpoint`` (collective: every rank calls it), then keep only
    the newest ``keep_last`` checkpoints. ``state`` is shared; ``rank_state`` is this rank's
    (gathered into ``client_state["ranks"]``)."""
    client_state = {**state, "step": step, "ranks": _gather_objects({**rank_state, "rng": rng_state()})}
    tag = tag_for(step)
    ds_engine.save_checkpoint(str(run_dir), tag=tag, client_state=client_state)
    _barrier()
    if _rank() == 0 and keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return Path(run_dir) / tag


def load_latest_checkpoint(ds_engine, run_dir: Path) -> Optional[dict]:
    """Restore model, optimizer and LR schedule from ``run_dir/latest``; return the client state with
    ``"rank"`` set to this rank's part, or None when there is no checkpoint. This rank's RNG is set."""
    if not (Path(run_dir) / "latest").is_file():
        return None
    path, client_state = ds_engine.load_checkpoint(str(run_dir), load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
    if path is None:
        return None
    ranks = client_state["ranks"]
    if len(ranks) != _world():
        raise ConfigError(
            f"checkpoint {path} was written by {len(ranks)} processes; resuming with {_world()} would not "
            f"continue the same data order — resume with the same world size or use a new train.output_dir")
    mine = ranks[_rank()]
    set_rng_state(mine["rng"])
    return {**client_state, "rank": mine}


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def save_consolidated(engine, run_dir: Path, step: int, config: dict) -> Optional[Path]:
    """Write ``RUN_DIR/model_fp32.pt`` = {"config", "step", "state_dict"} with fp32 weights, readable
    without DeepSpeed. In fp32 with ZeRO 0-2 every rank holds the full fp32 module; otherwise the
    fp32 master weights are assembled from the DeepSpeed checkpoint of ``step`` (which must exist)."""
    path = Path(run_dir) / CONSOLIDATED
    full_module = engine.precision == "fp32" and engine.ds_config["zero_optimization"]["stage"] < 3
    if _rank() == 0:
        if full_module:
            state_dict = {k: v.detach().cpu().clone() for k, v in engine.recipe.state_dict().items()}
        else:
            state_dict = fp32_state_dict_from_checkpoint(Path(run_dir) / tag_for(step), engine.recipe)
        torch.save({"config": config, "step": step, "state_dict": state_dict}, path)
    _barrier()
    return path


# ---------------------------------------------------------------------------------------------
# reading checkpoints without an engine


def _model_states_file(step_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (step_dir / name).is_file():
            return step_dir / name
    raise ConfigError(f"{step_dir} is not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt)")


def fp32_state_dict_from_checkpoint(step_dir: Path, recipe: Optional[torch.nn.Module] = None) -> dict:
    """fp32 weights of a DeepSpeed checkpoint folder, without an engine or a process group.

    - ZeRO 0-2 in fp32: the full module is in the model-states file.
    - ZeRO 0 in bf16/fp16: the module there is low precision; the fp32 master copies are the
      optimizer's ``fp32_groups`` (one list per parameter group, in group order), matched to names
      through ``engine.parameter_groups(recipe)`` — the grouping the trainer used.
    - ZeRO 1-3 otherwise: DeepSpeed's zero_to_fp32 assembles the fp32 partitions."""
    step_dir = Path(step_dir)
    states = torch.load(_model_states_file(step_dir), map_location="cpu", weights_only=False)
    ds_config = states.get("ds_config", {})
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    reduced = any(ds_config.get(k, {}).get("enabled", False) for k in ("fp16", "bf16"))
    module = {k: v.float() if v.is_floating_point() else v for k, v in (states.get("module") or {}).items()}
    if stage < 3 and not reduced:
        return module
    if stage == 0:
        optimizer = states.get("optimizer") or {}
        # DeepSpeed's unfused fp16/bf16 optimizer keeps a list per group, the fused one a flat buffer
        masters = optimizer.get("fp32_groups", optimizer.get("fp32_groups_flat"))
        if recipe is None or masters is None:
            raise ConfigError(f"{step_dir}: a ZeRO-0 bf16/fp16 checkpoint needs the recipe to name its fp32 master weights")
        from .engine import parameter_groups

        names = {id(p): n for n, p in recipe.named_parameters()}
        for group, fp32 in zip(parameter_groups(recipe, weight_decay=1.0), masters):
            if isinstance(fp32, torch.Tensor):
                fp32 = fp32.split([p.numel() for p in group["params"]])
            for param, master in zip(group["params"], fp32):
                module[names[id(param)]] = master.float().reshape(param.shape).clone()
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def _load_consolidated(path: Path) -> dict:
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or "state_dict" not in saved or "config" not in saved:
        raise ConfigError(f"{path} is not a fastvl consolidated checkpoint (needs 'state_dict' and 'config')")
    return saved


def saved_config(kind: str, where: Path) -> dict:
    """The resolved config saved with a checkpoint (``resolve_checkpoint``'s answer)."""
    if kind == "consolidated":
        return _load_consolidated(where)["config"]
    states = torch.load(_model_states_file(where), map_location="cpu", weights_only=False)
    if "config" not in states:
        raise ConfigError(f"{where}: checkpoint has no fastvl config in its client state")
    return states["config"]


def resolve_checkpoint(path: str) -> tuple[str, Path]:
    """What ``path`` names: ("consolidated", file) for RUN_DIR/model_fp32.pt or such a file, or
    ("deepspeed", step folder) for RUN_DIR/step_<N> or a run directory with only DeepSpeed checkpoints
    (its ``latest``)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if p.is_file():
        return "consolidated", p
    if (p / CONSOLIDATED).is_file():
        return "consolidated", p / CONSOLIDATED
    if TAG_PATTERN.match(p.name) and p.is_dir():
        return "deepspeed", p
    if (p / "latest").is_file():
        return "deepspeed", p / (p / "latest").read_text().strip()
    found = list_checkpoints(p)
    if found:
        return "deepspeed", found[-1][1]
    raise ConfigError(f"no checkpoint in {path} (expected {CONSOLIDATED}, step_<N>/ or a 'latest' file)")


def load_recipe(path: str, cfg: Optional[RunConfig] = None, device: torch.device = torch.device("cpu")):
    """Rebuild the recipe a checkpoint was trained with and load its fp32 weights (strict). ``path``:
    a run directory, a step_<N> folder or a consolidated file. ``cfg`` replaces the saved config (it
    must describe the same model). Returns (recipe in eval mode, cfg, step)."""
    from ..methods import build_method

    kind, where = resolve_checkpoint(path)
    if kind == "consolidated":
        saved = _load_consolidated(where)
        step = int(saved.get("step", -1))
    else:
        step = int(TAG_PATTERN.match(where.name).group(1))
    cfg = cfg if cfg is not None else config_from_dict(saved_config(kind, where))
    recipe = build_method(cfg)
    state_dict = saved["state_dict"] if kind == "consolidated" else fp32_state_dict_from_checkpoint(where, recipe)
    missing, unexpected = recipe.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match recipe '{cfg.method.name}': "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return recipe.to(device).eval(), cfg, step

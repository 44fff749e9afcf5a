"""Checkpoints: DeepSpeed's own save/load for training, plain files for everything that reads them.

Layout of a run directory::

    RUN_DIR/config.json            the resolved RunConfig
    RUN_DIR/metrics.jsonl          one row per log step (metrics.py)
    RUN_DIR/run.json               what was resolved at start-up (precision, optimizer, loss names, ...)
    RUN_DIR/step_<N>/...           DeepSpeed checkpoints (model, optimizer, LR schedule; client state)
    RUN_DIR/latest                 DeepSpeed's pointer to the newest step_<N>
    RUN_DIR/step_<N>_universal/    step_<N> converted to DeepSpeed's universal format, written when a
                                   ZeRO 1-2 run resumes on another number of processes
    RUN_DIR/model.safetensors      consolidated fp32 weights, written at the end of training (config and
                                   step in the safetensors metadata)

The client state of a checkpoint holds what DeepSpeed does not know about: the step, samples seen,
the resolved config, and per rank the data-stream position, the recipe's ``rank_state`` (C-Mask's
pending rollouts) and the RNG states (python, numpy, torch CPU and CUDA), gathered from every rank
because ZeRO stages 0-2 write the client state from rank 0 only. Everything else a recipe carries (EMA
teacher, agent, step counter) is the same on every rank and lives in its ``state_dict``.

Reading is safe for files a user did not write: ``.safetensors`` files hold tensors only, and every
pickle fastvl reads outside DeepSpeed's own resume (an old ``model_fp32.pt``, a DeepSpeed checkpoint
handed to ``fastvl eval``) goes through ``torch.load(weights_only=True)`` with an allowlist of the few
data classes DeepSpeed checkpoints hold; anything else is refused with a ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..config import ConfigError, RunConfig, config_from_dict
from ..dist import barrier

CONSOLIDATED = "model.safetensors"
LEGACY_CONSOLIDATED = "model_fp32.pt"
"""Pickled {"config", "step", "state_dict"} written before the safetensors format; read weights-only."""
TAG_PATTERN = re.compile(r"^step_(\d+)$")

log = logging.getLogger("fastvl.train")


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


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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
    barrier()
    if _rank() == 0 and keep_last > 0:
        for _, old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(f"{old.name}_universal"), ignore_errors=True)
    barrier()
    return Path(run_dir) / tag


def load_latest_checkpoint(ds_engine, run_dir: Path) -> Optional[dict]:
    """Restore model, optimizer and LR schedule from ``run_dir/latest``; return the client state with
    ``"rank"`` set to this rank's part, or None when there is no checkpoint.

    With the world size it was written with, each rank gets its own part back and its RNG is set.
    With another one (a job restarted on fewer or more processes), each rank gets the data position of
    the rank with its number (rank 0's when there was none), from which the loader keeps the global
    sample position (``fastvl.data.loader``); RNG states and the recipe's ``rank_state`` (per-rank
    pending work, e.g. C-Mask's rollouts of that rank's slice of the batch) start fresh, with a
    warning. ZeRO 1-3 partition the optimizer state by rank and DeepSpeed cannot repartition it: a
    ZeRO 1-2 checkpoint is first converted to DeepSpeed's universal format, which any world size
    loads; ZeRO-3 is refused (``universal_checkpoint``)."""
    latest = Path(run_dir) / "latest"
    if not latest.is_file():
        return None
    universal = universal_checkpoint(Path(run_dir) / latest.read_text().strip(), _world())
    with _loading_universal(ds_engine, universal is not None):
        path, client_state = ds_engine.load_checkpoint(str(run_dir), tag=universal.name if universal else None,
                                                       load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        return None
    ranks, rank, world = client_state["ranks"], _rank(), _world()
    if len(ranks) == world:
        mine = ranks[rank]
        set_rng_state(mine["rng"])
        return {**client_state, "rank": mine}
    dropped = sorted({name for part in ranks for name, value in part.get("recipe", {}).items() if value})
    if rank == 0:
        log.warning("resuming %s, written by %d processes, on %d: the data continues from its global sample "
                    "position; per-rank random states start fresh%s", path, len(ranks), world,
                    f"; per-rank recipe state is dropped ({', '.join(dropped)})" if dropped else "")
    return {**client_state, "rank": {"data": ranks[min(rank, len(ranks) - 1)]["data"]}}


def warn_on_new_global_batch(resumed: dict, global_batch: int, total_steps: int) -> None:
    """Say what changes when a run resumes with another global batch (processes x data.batch_size x
    train.grad_accum) than the checkpoint's: the data continues from its sample position and the
    step count (LR schedule, recipe schedules, train.steps) from its step, so the steps left read a
    different number of samples each."""
    saved = resumed.get("config", {})
    old = saved.get("data", {}).get("batch_size", 0) * saved.get("train", {}).get("grad_accum", 0) * len(resumed["ranks"])
    if not old or old == global_batch:
        return
    step, left = resumed["step"], max(total_steps - resumed["step"], 0)
    warnings.warn(f"resuming step {step} with a global batch of {global_batch} samples instead of {old}: the data "
                  f"continues after sample {resumed['samples_seen']} and the step count (LR schedule, train.steps="
                  f"{total_steps}) from step {step}, so the {left} steps left read {left * global_batch} samples "
                  f"instead of {left * old}; keep processes x data.batch_size x train.grad_accum at {old} to "
                  f"continue the same run")


def checkpoint_world_size(step_dir: Path) -> Optional[int]:
    """Processes that wrote the partitioned (ZeRO 1-3) optimizer state of a checkpoint folder, one
    ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` file each; None when it has no such files
    (ZeRO-0: every rank holds the whole optimizer state, so any world size can load it)."""
    return len(list(Path(step_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))) or None


def universal_checkpoint(step_dir: Path, world: int) -> Optional[Path]:
    """The universal-format copy of ``step_dir`` (``<step_dir>_universal``, next to it) when it holds
    ZeRO 1-2 optimizer state partitioned over another number of processes than ``world``; None when
    DeepSpeed can load ``step_dir`` itself; ZeRO-3 is refused. Rank 0 converts it once with DeepSpeed's
    ``ds_to_universal`` (the whole model and optimizer state pass through its memory); the other ranks
    wait, and a later resume reuses the copy."""
    saved = checkpoint_world_size(step_dir)
    if saved is None or saved == world:
        return None
    if any(step_dir.glob("zero_pp_rank_*_mp_rank_00_model_states.pt")):  # ZeRO-3 writes one per rank
        raise ConfigError(
            f"{step_dir} is a train.zero_stage=3 checkpoint of {saved} processes and this run has {world}: DeepSpeed "
            f"0.19's universal-checkpoint load of ZeRO-3 does not continue the same run (the Adam state it restores "
            f"gives losses that drift from a straight run within 2 steps). Resume with {saved} processes, or start a "
            f"new train.output_dir from its weights (stages 0-2 resume on any number of processes)")
    universal = step_dir.with_name(f"{step_dir.name}_universal")
    failure = None
    if _rank() == 0 and not universal.is_dir():
        log.warning("%s holds ZeRO optimizer state partitioned over %d processes and this run has %d: converting "
                    "it to DeepSpeed's universal format in %s", step_dir, saved, world, universal)
        try:
            _convert_to_universal(step_dir, universal)
        except Exception as error:  # every rank must stop, not wait for a conversion that never ends
            failure = f"{type(error).__name__}: {error}"
    failure = _from_rank_zero(failure)
    if failure is not None:
        raise ConfigError(
            f"{step_dir} holds ZeRO optimizer state partitioned over {saved} processes and this run has {world}; "
            f"converting it to a universal checkpoint failed ({failure}). Resume with {saved} processes, or start a "
            f"new train.output_dir from its weights (train.zero_stage=0 checkpoints resume on any number of processes)")
    return universal


def _convert_to_universal(step_dir: Path, universal: Path) -> None:
    """``python -m deepspeed.checkpoint.ds_to_universal`` in this process, written to a scratch folder
    renamed at the end, so an interrupted conversion is never taken for a finished one. fastvl's
    modules carry no universal-checkpoint metadata (that describes tensor-parallel slicing), hence
    ``inject_missing_state``; one worker, because the machine's cores are the training's."""
    from argparse import Namespace
    from contextlib import redirect_stdout
    from io import StringIO

    from deepspeed.checkpoint import ds_to_universal

    scratch = universal.with_name(universal.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    with redirect_stdout(StringIO()) as printed:
        ds_to_universal.main(Namespace(input_folder=str(step_dir), output_folder=str(scratch), num_extract_workers=1,
                                       num_merge_workers=1, keep_temp_folder=False, strict=True,
                                       inject_missing_state=True))
    log.debug("ds_to_universal: %s", printed.getvalue())
    scratch.rename(universal)
    (universal.parent / "latest_universal").write_text(universal.name)  # ds_to_universal named the scratch one


def _from_rank_zero(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextmanager
def _loading_universal(ds_engine, universal: bool):
    """DeepSpeed loads a universal checkpoint (per-parameter fp32 weights and optimizer moments, split
    on load for this world size) when its config's ``checkpoint.load_universal`` is set; set it for
    this one load only, so later saves and loads stay DeepSpeed's ordinary ones."""
    before = ds_engine._config.load_universal_checkpoint
    ds_engine._config.load_universal_checkpoint = before or universal
    try:
        yield
    finally:
        ds_engine._config.load_universal_checkpoint = before


def save_consolidated(engine, run_dir: Path, step: int, config: dict) -> Optional[Path]:
    """Write ``RUN_DIR/model.safetensors``: the recipe's fp32 state dict, with the config and the step in
    the metadata, readable without DeepSpeed (``load_recipe``). In fp32 with ZeRO 0-2 every rank holds
    the full fp32 module; otherwise the fp32 master weights are assembled from the DeepSpeed checkpoint
    of ``step`` (which must exist)."""
    path = Path(run_dir) / CONSOLIDATED
    full_module = engine.precision == "fp32" and engine.ds_config["zero_optimization"]["stage"] < 3
    if _rank() == 0:
        if full_module:
            state_dict = engine.recipe.state_dict()
        else:
            state_dict = fp32_state_dict_from_checkpoint(Path(run_dir) / tag_for(step), engine.recipe,
                                                         tuple(config["train"].get("param_groups", ())))
        write_weights(path, state_dict, config, step, layer_norm_eps=json.dumps(layer_norm_eps(engine.recipe)))
    barrier()
    return path


def write_weights(path: Path, state_dict: dict, config: dict, step: int, **metadata: str) -> Path:
    """Save ``state_dict`` as safetensors (each tensor a contiguous CPU copy: tied or shared tensors
    are stored once per name) with ``config`` (JSON), ``step`` and the string ``metadata``."""
    from safetensors.torch import save_file

    tensors = {name: value.detach().cpu().contiguous().clone() for name, value in state_dict.items()}
    save_file(tensors, str(path), metadata={"format": "fastvl", "config": json.dumps(config), "step": str(step),
                                            **metadata})
    return Path(path)


def read_weights(path: Path) -> tuple[dict, dict]:
    """(state dict, metadata) of a safetensors file written by ``write_weights``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a readable safetensors file: {error}") from None
    if "config" not in metadata:
        raise ConfigError(f"{path} is not a fastvl checkpoint (no 'config' in its safetensors metadata)")
    return state_dict, metadata


# ---------------------------------------------------------------------------------------------
# reading checkpoints without an engine


def _data_classes_of_checkpoints() -> list:
    """The non-tensor classes fastvl's DeepSpeed checkpoints hold: numpy arrays (the numpy RNG state
    in the client state) and, in ZeRO 1-3 optimizer files, DeepSpeed's fragment addresses, loss
    scaler and stage enum. Plain data: allowing them lets ``weights_only=True`` read the files."""
    import numpy

    core = numpy._core if hasattr(numpy, "_core") else numpy.core  # numpy 2 renamed numpy.core
    allowed = [numpy.ndarray, numpy.dtype, core.multiarray._reconstruct]
    allowed += [type(numpy.dtype(kind)) for kind in (numpy.uint32, numpy.int64, numpy.float64)]
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return allowed
    return allowed + [fragment_address, LossScaler, ZeroStageEnum]


def refused_pickle(path, error: Exception) -> ConfigError:
    """The error for a pickle that ``weights_only=True`` would not read (it names a class or callable)."""
    lines = str(error).strip().splitlines()
    return ConfigError(f"refused to read {path}: it holds a pickle with more than tensors and plain data "
                       f"({lines[0] if lines else type(error).__name__}); fastvl never unpickles arbitrary "
                       f"objects from a checkpoint — use a fastvl export (fastvl export RUN --out DIR) or a "
                       f".safetensors file")


def safe_torch_load(path, **kwargs):
    """``torch.load(path, weights_only=True)`` allowing only ``_data_classes_of_checkpoints``; a file
    that needs anything else (a pickle that would run code) is refused with a ``ConfigError``."""
    kwargs = {"map_location": "cpu", **kwargs, "weights_only": True}
    try:
        with torch.serialization.safe_globals(_data_classes_of_checkpoints()):
            return torch.load(path, **kwargs)
    except pickle.UnpicklingError as error:
        raise refused_pickle(path, error) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ConfigError(f"cannot read {path} as a PyTorch checkpoint: {error}") from None


class _TorchWithSafeLoad:
    """``torch`` with ``load`` = ``safe_torch_load``."""

    load = staticmethod(safe_torch_load)

    def __getattr__(self, name):
        return getattr(torch, name)


@contextmanager
def _zero_to_fp32_reads_safely():
    """DeepSpeed's zero_to_fp32 calls ``torch.load(weights_only=False)``; within this block its module
    sees a ``torch`` whose ``load`` is ``safe_torch_load`` (only that module's name is rebound)."""
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _TorchWithSafeLoad()
    try:
        yield
    finally:
        zero_to_fp32.torch = original


def _model_states_file(step_dir: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (step_dir / name).is_file():
            return step_dir / name
    raise ConfigError(f"{step_dir} is not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt)")


def fp32_state_dict_from_checkpoint(step_dir: Path, recipe: Optional[torch.nn.Module] = None,
                                    param_groups: tuple[dict, ...] = ()) -> dict:
    """fp32 weights of a DeepSpeed checkpoint folder, without an engine or a process group.

    - ZeRO 0-2 in fp32: the full module is in the model-states file.
    - ZeRO 0 in bf16/fp16: the module there is low precision; the fp32 master copies are the
      optimizer's ``fp32_groups`` (one list per parameter group, in group order), matched to names
      through ``engine.parameter_groups(recipe, ..., param_groups)`` — the grouping the trainer used
      (``param_groups``: the run's ``train.param_groups``).
    - ZeRO 1-3 otherwise: DeepSpeed's zero_to_fp32 assembles the fp32 partitions."""
    step_dir = Path(step_dir)
    states = safe_torch_load(_model_states_file(step_dir))
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
        for group, fp32 in zip(parameter_groups(recipe, 1.0, param_groups), masters):
            if isinstance(fp32, torch.Tensor):
                fp32 = fp32.split([p.numel() for p in group["params"]])
            for param, master in zip(group["params"], fp32):
                module[names[id(param)]] = master.float().reshape(param.shape).clone()
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with _zero_to_fp32_reads_safely():
        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)


def _load_consolidated(path: Path) -> dict:
    """{"config", "step", "state_dict"} of a consolidated file: safetensors (with ``layer_norm_eps`` when
    it is an export), or an old pickled ``model_fp32.pt`` read weights-only."""
    if path.suffix == ".safetensors":
        state_dict, metadata = read_weights(path)
        config = json.loads(metadata["config"])
        if metadata.get("export") == "1":  # an exported folder carries its own tokenizer files
            config["data"]["tokenizer"] = str(path.parent)
        return {"config": config, "step": int(metadata.get("step", -1)), "state_dict": state_dict,
                "layer_norm_eps": json.loads(metadata.get("layer_norm_eps", "{}"))}
    saved = safe_torch_load(path)
    if not isinstance(saved, dict) or "state_dict" not in saved or "config" not in saved:
        raise ConfigError(f"{path} is not a fastvl consolidated checkpoint (needs 'state_dict' and 'config')")
    return saved


def saved_config(kind: str, where: Path) -> dict:
    """The resolved config saved with a checkpoint (``resolve_checkpoint``'s answer)."""
    if kind == "consolidated":
        return _load_consolidated(where)["config"]
    states = safe_torch_load(_model_states_file(where))
    if "config" not in states:
        raise ConfigError(f"{where}: checkpoint has no fastvl config in its client state")
    return states["config"]


def resolve_checkpoint(path: str) -> tuple[str, Path]:
    """What ``path`` names: ("consolidated", file) for a weights file, an exported folder or a run
    directory with final weights (model.safetensors, or an old model_fp32.pt), or ("deepspeed", step
    folder) for RUN_DIR/step_<N> or a run directory with only DeepSpeed checkpoints (its ``latest``)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    if p.is_file():
        return "consolidated", p
    for name in (CONSOLIDATED, LEGACY_CONSOLIDATED):
        if (p / name).is_file():
            return "consolidated", p / name
    if TAG_PATTERN.match(p.name) and p.is_dir():
        return "deepspeed", p
    if (p / "latest").is_file():
        return "deepspeed", p / (p / "latest").read_text().strip()
    found = list_checkpoints(p)
    if found:
        return "deepspeed", found[-1][1]
    raise ConfigError(f"no checkpoint in {path} (expected {CONSOLIDATED}, {LEGACY_CONSOLIDATED}, step_<N>/ "
                      f"or a 'latest' file)")


def layer_norm_eps(module: torch.nn.Module) -> dict[str, float]:
    """Every LayerNorm's epsilon by module name (a pretrained init may set it; the config does not say)."""
    return {name: sub.eps for name, sub in module.named_modules() if isinstance(sub, torch.nn.LayerNorm)}


def set_layer_norm_eps(module: torch.nn.Module, eps_by_name: dict[str, float]) -> None:
    """Give the named LayerNorms of ``module`` their epsilon (what a pretrained init set and the
    config does not say)."""
    modules = dict(module.named_modules())
    for name, eps in eps_by_name.items():
        if not isinstance(modules.get(name), torch.nn.LayerNorm):
            raise ConfigError(f"the checkpoint sets the epsilon of LayerNorm '{name}', which the rebuilt model lacks")
        modules[name].eps = eps


def load_recipe(path: str, cfg: Optional[RunConfig] = None, device: torch.device = torch.device("cpu")):
    """Rebuild the recipe a checkpoint was trained with and load its fp32 weights (strict). ``path``:
    a run directory, a step_<N> folder, a consolidated file or an exported folder (``fastvl export``).
    ``cfg`` replaces the saved config (it must describe the same model). Returns (recipe in eval mode,
    cfg, step).

    A weights file that records its LayerNorm epsilons (what fastvl writes since they were added) holds
    everything a pretrained init set, so the recipe is built without reading ``model.text_init`` /
    ``model.image_init`` again: a run evaluates where those files are gone."""
    from ..methods import build_method

    kind, where = resolve_checkpoint(path)
    saved = _load_consolidated(where) if kind == "consolidated" else None
    if saved is not None:
        step = int(saved.get("step", -1))
        config = saved["config"]
    else:
        step = int(TAG_PATTERN.match(where.name).group(1))
        config = saved_config(kind, where)
    cfg = cfg if cfg is not None else config_from_dict(config)
    eps = (saved or {}).get("layer_norm_eps")
    recipe = build_method(without_pretrained_inits(cfg) if eps else cfg)
    state_dict = (saved["state_dict"] if saved is not None
                  else fp32_state_dict_from_checkpoint(where, recipe, cfg.train.param_groups))
    try:  # a module's serialized extra state (C-Mask's agent) is read weights-only too
        missing, unexpected = recipe.load_state_dict(state_dict, strict=False)
    except pickle.UnpicklingError as error:
        raise refused_pickle(path, error) from None
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match recipe '{cfg.method.name}': "
                          f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    set_layer_norm_eps(recipe, eps or {})
    return recipe.to(device).eval(), cfg, step


def without_pretrained_inits(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model.text_init`` and ``model.image_init`` unset (the weights come from a checkpoint)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_init=None, image_init=None))

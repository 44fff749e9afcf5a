"""model.image_init: timm state dicts and Hugging Face ViT / DeiT / DINOv2 folders load into fastvl's ViT
and give the source model's features; positions and patch kernels are resized as stated; mismatches stop
with one message naming the setting.

timm itself is not importable here (it needs torchvision, which has no build for this torch), so the timm
cases write state dicts in timm's documented VisionTransformer key layout and compare against an
independent plain-torch forward of those tensors (``timm_reference``). The Hugging Face cases compare
against transformers' own models.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fastvl.config import ConfigError, ModelConfig
from fastvl.models import AlbefModel, VisionTransformer
from fastvl.models.vision_init import load_vision_checkpoint, patch_resize_matrix, resample_patch_kernel

transformers = pytest.importorskip("transformers")

WIDTH, DEPTH, HEADS = 32, 2, 2
TOLERANCE = dict(atol=1e-5, rtol=0)


def vit_config(image_size: int, patch_size: int, **overrides) -> ModelConfig:
    fields = dict(preset="tiny", image_size=image_size, patch_size=patch_size, vision_width=WIDTH,
                  vision_layers=DEPTH, vision_heads=HEADS)
    return ModelConfig(**(fields | overrides))


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved off its default init (LayerNorm scales off 1, biases and LayerScale off
    their constants), so a misplaced tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def load(cfg: ModelConfig, source) -> tuple[VisionTransformer, object]:
    vit = VisionTransformer(cfg).eval()
    return vit, load_vision_checkpoint(vit, source, verbose=False)


# ---------------------------------------------------------------------------------------------
# timm: state dicts in its documented layout, reference forward in plain torch


def timm_state(patch: int, grid: int, *, distilled=False, layer_scale=False, seed=0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, mean=0.0):
        return mean + 0.1 * torch.randn(*shape, generator=gen)

    prefix = 2 if distilled else 1
    state = {"cls_token": rand(1, 1, WIDTH), "pos_embed": rand(1, prefix + grid * grid, WIDTH),
             "patch_embed.proj.weight": rand(WIDTH, 3, patch, patch), "patch_embed.proj.bias": rand(WIDTH)}
    if distilled:
        state["dist_token"] = rand(1, 1, WIDTH)
    for i in range(DEPTH):
        b = f"blocks.{i}."
        state |= {b + "norm1.weight": rand(WIDTH, mean=1.0), b + "norm1.bias": rand(WIDTH),
                  b + "attn.qkv.weight": rand(3 * WIDTH, WIDTH), b + "attn.qkv.bias": rand(3 * WIDTH),
                  b + "attn.proj.weight": rand(WIDTH, WIDTH), b + "attn.proj.bias": rand(WIDTH),
                  b + "norm2.weight": rand(WIDTH, mean=1.0), b + "norm2.bias": rand(WIDTH),
                  b + "mlp.fc1.weight": rand(4 * WIDTH, WIDTH), b + "mlp.fc1.bias": rand(4 * WIDTH),
                  b + "mlp.fc2.weight": rand(WIDTH, 4 * WIDTH), b + "mlp.fc2.bias": rand(WIDTH)}
        if layer_scale:
            state |= {b + "ls1.gamma": rand(WIDTH, mean=0.5), b + "ls2.gamma": rand(WIDTH, mean=0.5)}
    state |= {"norm.weight": rand(WIDTH, mean=1.0), "norm.bias": rand(WIDTH),
              "head.weight": rand(10, WIDTH), "head.bias": rand(10)}
    if distilled:
        state |= {"head_dist.weight": rand(10, WIDTH), "head_dist.bias": rand(10)}
    return state


def timm_reference(state: dict[str, torch.Tensor], x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer forward_features (class token, no distillation token), written out."""
    def ln(h, name):
        return F.layer_norm(h, (WIDTH,), state[name + ".weight"], state[name + ".bias"], eps=1e-6)

    def linear(h, name):
        return F.linear(h, state[name + ".weight"], state[name + ".bias"])

    w = state["patch_embed.proj.weight"]
    h = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    h = torch.cat([state["cls_token"].expand(len(x), -1, -1), h], dim=1) + pos
    b, t, _ = h.shape
    for i in range(DEPTH):
        p = f"blocks.{i}."
        q, k, v = linear(ln(h, p + "norm1"), p + "attn.qkv").reshape(b, t, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        out = linear(attn.transpose(1, 2).reshape(b, t, WIDTH), p + "attn.proj")
        h = h + out * state.get(p + "ls1.gamma", 1.0)
        out = linear(F.gelu(linear(ln(h, p + "norm2"), p + "mlp.fc1")), p + "mlp.fc2")
        h = h + out * state.get(p + "ls2.gamma", 1.0)
    return ln(h, "norm")


@pytest.mark.parametrize("layer_scale", [False, True])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_vit_matches_reference(tmp_path, fmt, layer_scale):
    state = timm_state(patch=8, grid=4, layer_scale=layer_scale)
    path = tmp_path / f"vit.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    vit, report = load(vit_config(32, 8, vision_layer_scale=layer_scale), path)
    assert report.fresh == ["mask_token"] and report.resized == []
    assert sorted(report.unused) == ["head.bias", "head.weight"]
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), timm_reference(state, x, state["pos_embed"]), **TOLERANCE)


def test_timm_deit_distilled_drops_the_distillation_token(tmp_path):
    state = timm_state(patch=8, grid=4, distilled=True, seed=1)
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)  # DeiT's releases wrap the state dict
    vit, report = load(vit_config(32, 8), path)
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= set(report.unused)
    # reference: the same tensors without the distillation token and its position row (row 1)
    pos = torch.cat([state["pos_embed"][:, :1], state["pos_embed"][:, 2:]], dim=1)
    x = images(32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), timm_reference(state, x, pos), **TOLERANCE)


@pytest.mark.parametrize("old_grid, new_grid", [(6, 4), (4, 7)])
def test_timm_positions_resized_as_timm_does(tmp_path, old_grid, new_grid):
    state = timm_state(patch=8, grid=old_grid, seed=2)
    save_file(state, str(tmp_path / "vit.safetensors"))
    vit, report = load(vit_config(8 * new_grid, 8), tmp_path / "vit.safetensors")
    assert report.resized == [f"pos_embed: grid {old_grid}x{old_grid} -> {new_grid}x{new_grid} (bicubic, antialias=True)"]

    # reference: timm's resample_abs_pos_embed call, made here on the reshaped grid
    grid = state["pos_embed"][:, 1:].reshape(1, old_grid, old_grid, WIDTH).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=True)
    pos = torch.cat([state["pos_embed"][:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, WIDTH)], dim=1)
    torch.testing.assert_close(vit.pos_embed.detach(), pos, atol=1e-6, rtol=0)
    # timm's resize and not transformers' (antialiased bicubic has another kernel, growing or shrinking)
    plain = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    assert (plain.permute(0, 2, 3, 1).reshape(1, -1, WIDTH) - pos[:, 1:]).abs().max() > 1e-2
    x = images(8 * new_grid, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), timm_reference(state, x, pos), **TOLERANCE)


# ---------------------------------------------------------------------------------------------
# patch size: FlexiViT's pseudo-inverse resize


def test_enlarged_patch_kernel_sees_a_resized_patch_as_the_old_kernel_saw_the_original():
    old, new = 4, 8
    kernel = torch.randn(WIDTH, 3, old, old, generator=torch.Generator().manual_seed(3))
    resampled = resample_patch_kernel(kernel, new)
    patches = torch.randn(5, 3, old, old, generator=torch.Generator().manual_seed(4))
    enlarged = F.interpolate(patches.double(), size=(new, new), mode="bilinear", align_corners=False,
                             antialias=True).float()
    torch.testing.assert_close(F.conv2d(enlarged, resampled), F.conv2d(patches, kernel), atol=1e-5, rtol=1e-5)
    # a constant image gives the same embedding at either patch size
    torch.testing.assert_close(resampled.sum(dim=(2, 3)), kernel.sum(dim=(2, 3)), atol=1e-5, rtol=1e-5)


def test_resize_matrix_is_torch_bilinear_resize():
    patch = torch.randn(1, 1, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    by_matrix = patch_resize_matrix(5, 3) @ patch.flatten()
    direct = F.interpolate(patch, size=(3, 3), mode="bilinear", align_corners=False, antialias=True).flatten()
    torch.testing.assert_close(by_matrix, direct)


def test_patch_size_change_is_resampled_and_reported(tmp_path):
    state = timm_state(patch=4, grid=4, seed=6)
    save_file(state, str(tmp_path / "vit.safetensors"))
    vit, report = load(vit_config(32, 8), tmp_path / "vit.safetensors")  # patch 4 -> 8, grid stays 4x4
    assert report.resized == ["patch_embed.weight: patch 4 -> 8 (pseudo-inverse resize)"]
    torch.testing.assert_close(vit.patch_embed.weight.detach(), resample_patch_kernel(state["patch_embed.proj.weight"], 8))


# ---------------------------------------------------------------------------------------------
# Hugging Face folders against transformers' own models


def hf_vit_config(**overrides):
    return transformers.ViTConfig(**(dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                          intermediate_size=4 * WIDTH, image_size=32, patch_size=8) | overrides))


def hf_dinov2_config(**overrides):
    return transformers.Dinov2Config(**(dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                             mlp_ratio=4, image_size=28, patch_size=7) | overrides))


@pytest.mark.parametrize("layout", ["save_pretrained", "classifier", "in-memory names"])
def test_hf_vit_matches_transformers(tmp_path, layout):
    with_head = layout == "classifier"
    if with_head:  # keys under "vit." plus a classifier, no mask token
        hf = perturbed(transformers.ViTForImageClassification(hf_vit_config(num_labels=5)))
        reference = hf.vit
    else:
        reference = hf = perturbed(transformers.ViTModel(hf_vit_config(), use_mask_token=True))
    if layout == "in-memory names":  # transformers 5's own names (layers.N.attention.q_proj, ...)
        hf.config.save_pretrained(tmp_path)
        assert "layers.0.attention.q_proj.weight" in hf.state_dict()
        save_file(dict(hf.state_dict()), str(tmp_path / "model.safetensors"))
    else:  # the classic names (encoder.layer.N.attention.attention.query, ...)
        hf.save_pretrained(tmp_path)
    vit, report = load(vit_config(32, 8, vision_ln_eps=1e-12), tmp_path)
    assert report.fresh == (["mask_token"] if with_head else [])
    expected_unused = {"classifier.weight", "classifier.bias"} if with_head else {"pooler.dense.weight", "pooler.dense.bias"}
    assert set(report.unused) == expected_unused
    x = images(32)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference(pixel_values=x).last_hidden_state, **TOLERANCE)
        if with_head:
            return
        mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.5
        torch.testing.assert_close(vit(x, replace_mask=mask),
                                   reference(pixel_values=x, bool_masked_pos=mask).last_hidden_state, **TOLERANCE)


def test_hf_deit_matches_vit_without_its_distillation_token(tmp_path):
    config = transformers.DeiTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                     intermediate_size=4 * WIDTH, image_size=32, patch_size=8)
    deit = perturbed(transformers.DeiTForImageClassificationWithTeacher(config), seed=1)
    deit.save_pretrained(tmp_path)
    vit, report = load(vit_config(32, 8, vision_ln_eps=1e-12), tmp_path)
    assert "deit.embeddings.distillation_token" in report.unused
    assert {"cls_classifier.weight", "distillation_classifier.weight"} <= set(report.unused)
    # reference: transformers' ViTModel holding DeiT's weights minus the distillation token and its position
    state = {k[len("deit."):]: v for k, v in deit.state_dict().items() if k.startswith("deit.")}
    pos = state["embeddings.position_embeddings"]
    state["embeddings.position_embeddings"] = torch.cat([pos[:, :1], pos[:, 2:]], dim=1)
    del state["embeddings.distillation_token"]
    reference = transformers.ViTModel(hf_vit_config(), add_pooling_layer=False).eval()
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == []
    x = images(32, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), reference(pixel_values=x).last_hidden_state, **TOLERANCE)


@pytest.mark.parametrize("layout", ["safetensors", "pytorch_model.bin", "backbone prefix"])
def test_hf_dinov2_matches_transformers(tmp_path, layout):
    hf = perturbed(transformers.Dinov2Model(hf_dinov2_config()), seed=2)
    if layout == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        state = dict(hf.state_dict())
        if layout == "backbone prefix":  # as inside a larger model: the ViT under backbone.*, a head beside it
            state = {f"backbone.{k}": v for k, v in state.items()} | {"decoder.weight": torch.ones(3, WIDTH)}
            save_file(state, str(tmp_path / "model.safetensors"))
        else:
            torch.save(state, tmp_path / "pytorch_model.bin")
    vit, report = load(vit_config(28, 7, vision_layer_scale=True), tmp_path)
    assert report.fresh == [] and report.resized == []  # DINOv2's mask token loads
    assert report.unused == (["decoder.weight"] if layout == "backbone prefix" else [])
    x = images(28, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(vit(x), hf(pixel_values=x).last_hidden_state, **TOLERANCE)
        mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.5
        torch.testing.assert_close(vit(x, replace_mask=mask), hf(pixel_values=x, bool_masked_pos=mask).last_hidden_state,
                                   **TOLERANCE)


@pytest.mark.parametrize("kind, image_size", [("dinov2", 42), ("vit", 24)])
def test_hf_positions_resized_as_transformers_does(tmp_path, kind, image_size):
    """Against transformers' own interpolate_pos_encoding at the new image size (grid 4 -> 6 and 4 -> 3)."""
    if kind == "dinov2":
        hf, patch, extra = perturbed(transformers.Dinov2Model(hf_dinov2_config()), seed=3), 7, dict(vision_layer_scale=True)
    else:
        hf, patch, extra = perturbed(transformers.ViTModel(hf_vit_config()), seed=3), 8, dict(vision_ln_eps=1e-12)
    hf.save_pretrained(tmp_path)
    vit, report = load(vit_config(image_size, patch, **extra), tmp_path)
    grid = image_size // patch
    assert report.resized == [f"pos_embed: grid 4x4 -> {grid}x{grid} (bicubic, antialias=False)"]
    x = images(image_size, seed=3)
    with torch.no_grad():
        theirs = hf(pixel_values=x, interpolate_pos_encoding=True) if kind == "vit" else hf(pixel_values=x)
        torch.testing.assert_close(vit(x), theirs.last_hidden_state, **TOLERANCE)


def test_albef_model_loads_image_init(tmp_path):
    hf = perturbed(transformers.Dinov2Model(hf_dinov2_config()), seed=4)
    hf.save_pretrained(tmp_path)
    model = AlbefModel(vit_config(28, 7, vision_layer_scale=True, image_init=str(tmp_path))).eval()
    assert model.image_init_report is not None and model.image_init_report.fresh == []
    x = images(28, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(x), hf(pixel_values=x).last_hidden_state, **TOLERANCE)


# ---------------------------------------------------------------------------------------------
# refusals


def test_mismatched_architecture_names_every_setting(tmp_path):
    transformers.Dinov2Model(hf_dinov2_config(hidden_size=48, num_attention_heads=4)).save_pretrained(tmp_path)
    cfg = vit_config(28, 7, vision_ln_eps=1e-12)  # width 32, no LayerScale, eps 1e-12
    with pytest.raises(ConfigError) as caught:
        load(cfg, tmp_path)
    message = str(caught.value)
    for part in ("model.image_init", "model.vision_width: checkpoint 48 vs model 32",
                 "model.vision_layer_scale: checkpoint True vs model False", "model.vision_ln_eps: checkpoint 1e-06",
                 "model.vision_heads: checkpoint 4 vs model 2"):
        assert part in message


def test_timm_width_mismatch_names_vision_width(tmp_path):
    save_file(timm_state(patch=8, grid=4), str(tmp_path / "vit.safetensors"))
    with pytest.raises(ConfigError, match="model.vision_width: checkpoint 32 vs model 64"):
        load(vit_config(32, 8, vision_width=64), tmp_path / "vit.safetensors")


def test_register_tokens_are_refused(tmp_path):
    state = timm_state(patch=8, grid=4) | {"reg_token": torch.zeros(1, 4, WIDTH)}
    save_file(state, str(tmp_path / "vit.safetensors"))
    with pytest.raises(ConfigError, match="4 register tokens"):
        load(vit_config(32, 8), tmp_path / "vit.safetensors")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2_with_registers", "num_register_tokens": 4}))
    with pytest.raises(ConfigError, match="register tokens"):
        load(vit_config(32, 8), folder)


def test_unmappable_tensors_are_refused(tmp_path):
    state = timm_state(patch=8, grid=4) | {"norm_pre.weight": torch.ones(WIDTH)}  # CLIP-style pre-norm
    save_file(state, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ConfigError, match="no place for: norm_pre.weight"):
        load(vit_config(32, 8), tmp_path / "clip.safetensors")


PAYLOAD_RAN = []


class Payload:
    def __reduce__(self):
        return PAYLOAD_RAN.append, ("ran",)


def test_pickled_objects_are_never_unpickled(tmp_path):
    torch.save({"cls_token": torch.zeros(1, 1, WIDTH), "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="weights_only=True"):
        load(vit_config(32, 8), tmp_path / "evil.pth")
    assert PAYLOAD_RAN == []

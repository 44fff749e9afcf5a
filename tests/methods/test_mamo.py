"""MAMO (fastvl/methods/mamo.py) and its pieces: the EMA teacher (models/ema.py), the concatenation
fusion encoder (models/mamo.py), the MRM / feature-MIM losses (objectives/mrm.py), and the recipe through
the real trainer (losses fall, collapse monitor, exact resume of the target network, ZeRO-2 + bf16)."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvl.config import ConfigError, load_config
from fastvl.data.batch import Batch
from fastvl.methods import build_method
from fastvl.methods.mamo import Mamo, gather_rows
from fastvl.models.ema import EmaTeacher
from fastvl.models.mamo import MamoModel
from fastvl.objectives.mrm import feature_mim_loss, mrm_loss, per_dimension_std
from fastvl.train.checkpoint import load_recipe, read_weights
from fastvl.train.engine import check_zero3_support
from fastvl.train.loop import train
from fastvl.train.metrics import read_metrics

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_mamo.json"
BASE = Path(__file__).resolve().parents[2] / "configs" / "base_mamo.json"


def tiny_cfg(*overrides: str):
    return load_config(str(TINY), list(overrides))


def make_batch(b: int = 4, length: int = 12, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 3000, (b, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones(b, length, dtype=torch.long)
    mask[0, length - 3:] = 0
    ids[0, length - 3:] = 0
    ids[0, length - 4] = 102
    return Batch(torch.randn(b, 3, 64, 64, generator=g), ids, mask)


def build(*overrides: str) -> Mamo:
    torch.manual_seed(0)
    return build_method(tiny_cfg(*overrides))


def options(**values) -> str:
    import json

    return "method.options=" + json.dumps(values)


# ---------------------------------------------------------------------------------------------
# EMA teacher


def small_online() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


def test_ema_update_moves_at_exactly_the_configured_rate():
    online = small_online()
    teacher = EmaTeacher({"net": online}, momentum=0.9)
    start = {path: buffer.clone() for path, buffer, _ in teacher.pairs("net")}
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    target = {path: p.detach().clone() for path, p in online.named_parameters()}
    teacher.update()
    for path, buffer, _ in teacher.pairs("net"):
        torch.testing.assert_close(buffer, 0.9 * start[path] + 0.1 * target[path], rtol=0, atol=1e-6)
    for _ in range(4):  # online fixed: the distance shrinks by m per update, (θ̄_k - θ) = m^k (θ̄_0 - θ)
        teacher.update()
    for path, buffer, _ in teacher.pairs("net"):
        torch.testing.assert_close(buffer - target[path], 0.9 ** 5 * (start[path] - target[path]), rtol=0, atol=1e-6)
    # an explicit momentum overrides the configured one for that call
    before = {path: buffer.clone() for path, buffer, _ in teacher.pairs("net")}
    teacher.update(momentum=0.5)
    for path, buffer, _ in teacher.pairs("net"):
        torch.testing.assert_close(buffer, 0.5 * before[path] + 0.5 * target[path], rtol=0, atol=1e-6)


def test_ema_receives_no_gradient_and_is_not_a_parameter():
    online = small_online()
    holder = nn.Module()
    holder.online, holder.teacher = online, EmaTeacher({"net": online}, momentum=0.99)
    names = [n for n, _ in holder.named_parameters()]
    assert names and all(n.startswith("online.") for n in names)  # online weights appear once
    assert all(n.startswith("teacher.shadow.net.") for n, _ in holder.named_buffers())
    x = torch.randn(5, 4)
    target = holder.teacher("net", x)
    assert not target.requires_grad
    loss = F.mse_loss(online(x), target + 1.0)
    loss.backward()
    assert all(p.grad is not None for p in online.parameters())
    assert all(b.grad is None and not b.requires_grad for b in holder.teacher.buffers())
    # the teacher is an exact copy before any update, in eval mode whatever the holder's mode
    holder.train()
    assert not holder.teacher.shadow.training
    torch.testing.assert_close(holder.teacher("net", x), online(x).detach())


def test_ema_keeps_fp32_masters_and_runs_in_the_online_dtype():
    """A bf16 EMA at m = 0.995 would not move (the step is below half an ulp); the fp32 master does,
    and the forward runs in bf16 with a copy refreshed after every update."""
    online = small_online()
    teacher = EmaTeacher({"net": online}, momentum=0.995)
    online.to(torch.bfloat16)  # what DeepSpeed does to parameters (buffers stay fp32)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(0.01)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    before = teacher("net", x)
    assert before.dtype == torch.bfloat16
    masters_before = [b.clone() for _, b, _ in teacher.pairs("net")]
    teacher.update()
    for (_, master, param), old in zip(teacher.pairs("net"), masters_before):
        assert master.dtype == torch.float32
        torch.testing.assert_close(master, 0.995 * old + 0.005 * param.float(), rtol=0, atol=1e-6)
        assert not torch.equal(master, old)
    shadow_fp32 = copy.deepcopy(teacher.shadow["net"])
    torch.testing.assert_close(teacher("net", x).float(), shadow_fp32(x.float()), rtol=2e-2, atol=2e-2)
    # the low-precision copy is refreshed after every update: pull the EMA onto the online weights
    teacher.update(momentum=0.0)
    with torch.no_grad():
        assert torch.equal(teacher("net", x), online(x))
        assert not torch.equal(online(x), before)


def test_ema_state_dict_round_trip_refreshes_the_low_precision_copy():
    online = small_online()
    teacher = EmaTeacher({"net": online}, momentum=0.9)
    online.to(torch.bfloat16)
    x = torch.randn(3, 4, dtype=torch.bfloat16)
    teacher("net", x)  # builds the bf16 copy
    state = {k: v + 0.5 for k, v in teacher.state_dict().items()}
    teacher.load_state_dict(state)
    assert all(b.dtype == torch.float32 for b in teacher.buffers())
    reference = copy.deepcopy(teacher.shadow["net"])
    torch.testing.assert_close(teacher("net", x), reference(x.float()).bfloat16(), rtol=2e-2, atol=2e-2)


def test_ema_zero_momentum_is_the_online_network_under_stop_gradient():
    online = small_online()
    teacher = EmaTeacher({"net": online}, momentum=0.0)
    assert len(teacher.state_dict()) == 0 and not teacher.keeps_copy
    x = torch.randn(5, 4)
    out = teacher("net", x)
    assert not out.requires_grad
    torch.testing.assert_close(out, online(x))
    online.train()
    teacher("net", x)
    assert online.training  # the mode is restored after the target pass
    with pytest.raises(ValueError, match="momentum"):
        EmaTeacher({"net": online}, momentum=1.0)


# ---------------------------------------------------------------------------------------------
# losses


def test_mrm_and_feature_mim_losses_and_gradients():
    pred = torch.randn(6, 5, requires_grad=True)
    target = torch.randn(6, 5)
    loss = mrm_loss(pred, target)
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())
    loss.backward()
    torch.testing.assert_close(pred.grad, 2 * (pred - target).detach() / pred.numel())
    normalized = mrm_loss(pred, target, normalize=True)
    cosine = F.cosine_similarity(pred, target, dim=-1)
    torch.testing.assert_close(normalized, ((2 - 2 * cosine) / 5).mean())
    pred.grad = None
    l1 = feature_mim_loss(pred, target)
    torch.testing.assert_close(l1, (pred - target).abs().mean())
    l1.backward()
    torch.testing.assert_close(pred.grad, torch.sign(pred - target).detach() / pred.numel())
    assert mrm_loss(pred[:0], target[:0]) == 0  # nothing masked anywhere
    with pytest.raises(ValueError):
        mrm_loss(pred, target[:, :3])


def test_per_dimension_std_detects_collapse():
    x = torch.randn(100, 8) * torch.arange(1, 9)
    torch.testing.assert_close(per_dimension_std(x), x.std(dim=0, unbiased=False).mean())
    assert per_dimension_std(torch.ones(10, 8) * 3.0) == 0
    assert per_dimension_std(torch.randn(1, 8)) == 0


# ---------------------------------------------------------------------------------------------
# model and views


def test_concat_fusion_places_mask_tokens_and_positions():
    recipe = build()
    fusion = recipe.backbone.fusion_encoder
    keep, masked = recipe.patch_split(3, step=7, device=torch.device("cpu"))
    n = recipe.backbone.cfg.num_patches
    assert masked.shape == (3, math.ceil(0.75 * n)) and keep.shape == (3, n - math.ceil(0.75 * n))
    assert all(set(k.tolist()).isdisjoint(m.tolist()) and len(set(k.tolist()) | set(m.tolist())) == n
               for k, m in zip(keep, masked))
    assert not torch.equal(masked, recipe.patch_split(3, step=8, device=torch.device("cpu"))[1])
    visible = torch.randn(3, 1 + keep.shape[1], recipe.backbone.cfg.vision_width)
    tokens = fusion.image_tokens(visible, keep)
    assert tokens.shape == (3, 1 + n, fusion.width)
    positions = fusion.image_positions[0].detach()
    torch.testing.assert_close(tokens[:, 0], visible[:, 0] + positions[0])
    torch.testing.assert_close(gather_rows(tokens, keep + 1), (visible[:, 1:] + positions[keep + 1]).reshape(-1, fusion.width))
    torch.testing.assert_close(gather_rows(tokens, masked + 1),
                               (fusion.mask_token[0].detach() + positions[masked + 1]).reshape(-1, fusion.width))


def test_image_encoder_sees_only_visible_patches():
    recipe = build()
    seen = []
    handle = recipe.backbone.vision_encoder.blocks[0].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        recipe(make_batch())
    handle.remove()
    n = recipe.backbone.cfg.num_patches
    visible = n - math.ceil(0.75 * n)
    # online full image (ITC/ITM + text view) and the masked view; the target's ViT is a separate copy
    assert sorted(seen) == [1 + visible, 1 + n]


def test_fuse_keeps_albefs_contract_and_scorer_works():
    recipe = build().eval()
    batch = make_batch()
    bb = recipe.backbone
    with torch.no_grad():
        image, text = bb.encode_image(batch.images), bb.encode_text(batch.input_ids, batch.attention_mask)
        fused_text = bb.fuse(text, batch.attention_mask, image)
        assert fused_text.shape == text.shape
        full = bb.fuse_all(image, text, batch.attention_mask)
        torch.testing.assert_close(fused_text, full[:, bb.text_offset:])
        # all-CONTEXT kind/step is plain bidirectional attention
        kind = torch.zeros_like(batch.input_ids, dtype=torch.int32)
        torch.testing.assert_close(bb.fuse(text, batch.attention_mask, image, kind=kind, step=kind), fused_text,
                                   rtol=1e-5, atol=1e-5)
        scorer = recipe.scorer
        image_feat, image_states = scorer.image_embeddings(batch.images)
        text_feat, text_states = scorer.text_embeddings(batch.input_ids, batch.attention_mask)
        scores = scorer.itm_scores(image_states, text_states, batch.attention_mask)
    assert image_feat.shape == text_feat.shape == (4, bb.cfg.embed_dim)
    assert scores.shape == (4,) and bool(((scores >= 0) & (scores <= 1)).all())
    with pytest.raises(NotImplementedError):
        bb.fuse(text, batch.attention_mask, image, attn_mask=torch.ones(1, 1, 12, 12, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------
# the target network and the recipe


def perturb_teacher(recipe: Mamo, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for buffer in recipe.teacher.buffers():
            buffer.add_(torch.randn(buffer.shape, generator=g) * scale)


def ema_network(recipe: Mamo) -> MamoModel:
    """An independent model holding the teacher's weights (its vision/text/fusion/projector)."""
    model = copy.deepcopy(recipe.backbone)
    state = {f"{name}.{path}": buffer for name in recipe.teacher.shadow
             for path, buffer in recipe.teacher.shadow[name].state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.startswith(tuple(recipe.teacher.shadow)) for k in missing)
    return model.eval()


def test_mrm_and_mim_targets_are_the_ema_network_on_the_unmasked_pair():
    recipe = build()
    perturb_teacher(recipe)  # the teacher now differs from the online network
    batch = make_batch()
    bb = recipe.backbone

    # 1. what the teacher is fed: the clean images and captions, whatever the step's masks are
    calls = []
    original = recipe.teacher.forward

    def recording(name, *args, **kwargs):
        out = original(name, *args, **kwargs)
        calls.append((name, args, out))
        return out

    recipe.teacher.forward = recording
    outputs = {}
    for step in (3, 11):
        recipe.current_step = step
        with torch.no_grad():
            outputs[step] = recipe(batch)
    recipe.teacher.forward = original
    by_step = [calls[:len(calls) // 2], calls[len(calls) // 2:]]
    for step_calls in by_step:
        fed = {name: args for name, args, _ in step_calls}
        assert torch.equal(fed["vision_encoder"][0], batch.images)
        assert torch.equal(fed["text_encoder"][0], batch.input_ids)
    for (name_a, _, out_a), (name_b, _, out_b) in zip(*by_step):
        if name_a != "mrm_projector":  # the projector is applied to the rows each step's mask selects
            assert name_a == name_b and torch.equal(out_a, out_b)
    assert outputs[3]["mrm"] != outputs[11]["mrm"]  # the masks (and so the losses) did change

    # 2. the targets equal an independent copy of the EMA network run on the clean pair
    reference = ema_network(recipe)
    targets = recipe.targets(batch)
    with torch.no_grad():
        ref_image = reference.encode_image(batch.images)
        ref_text = reference.encode_text(batch.input_ids, batch.attention_mask)
        ref_fused = reference.fuse_all(ref_image, ref_text, batch.attention_mask)
    torch.testing.assert_close(targets.image_features, ref_image[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(targets.fused, ref_fused, rtol=1e-5, atol=1e-5)

    # 3. the losses of step 11 are those targets at the step's masked positions
    step = 11
    with torch.no_grad():
        keep, masked = recipe.patch_split(len(batch), step, batch.images.device)
        text_mask = recipe.text_masking(batch, step)
        image_states = bb.encode_image(batch.images)
        text_states = bb.encode_text(batch.input_ids, batch.attention_mask)
        image_view = bb.fuse_all(bb.encode_image(batch.images, keep_index=keep), text_states, batch.attention_mask, keep)
        text_view = bb.fuse_all(image_states, bb.encode_text(text_mask.input_ids, batch.attention_mask),
                                batch.attention_mask)
        image_rows = gather_rows(image_view, masked + 1)
        text_rows = text_view[:, bb.text_offset:][text_mask.mask]
        predict = lambda rows: bb.mrm_predictor(bb.mrm_projector(rows))  # noqa: E731
        target_image = reference.mrm_projector(gather_rows(ref_fused, masked + 1))
        target_text = reference.mrm_projector(ref_fused[:, bb.text_offset:][text_mask.mask])
        expected_mrm = mrm_loss(predict(image_rows), target_image) + mrm_loss(predict(text_rows), target_text)
        expected_mim = feature_mim_loss(bb.mim_head(image_rows), gather_rows(ref_image[:, 1:], masked))
    torch.testing.assert_close(outputs[step]["mrm"], expected_mrm, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(outputs[step]["mim"], expected_mim, rtol=1e-4, atol=1e-6)


def test_recipe_teacher_gets_no_gradient_and_follows_after_step():
    recipe = build(options(momentum=0.9))
    names = {n for n, _ in recipe.named_parameters()}
    assert not any(n.startswith("teacher.") for n in names)
    assert set(recipe.teacher.shadow) == {"vision_encoder", "text_encoder", "fusion_encoder", "mrm_projector"}
    out = recipe(make_batch())
    out["loss"].backward()
    assert all(b.grad is None and not b.requires_grad for b in recipe.teacher.buffers())
    bb = recipe.backbone
    for module in (bb.mrm_predictor, bb.mrm_projector, bb.mim_head, bb.fusion_encoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.requires_grad)
    # an optimizer step, then after_step: the EMA moves by exactly 1 - m of the distance
    before = {path: b.clone() for path, b, _ in recipe.teacher.pairs("fusion_encoder")}
    with torch.no_grad():
        for p in recipe.parameters():
            if p.grad is not None:
                p.sub_(0.01 * p.grad.sign())
    recipe.after_step(1)
    assert recipe.current_step == 1
    for path, buffer, param in recipe.teacher.pairs("fusion_encoder"):
        torch.testing.assert_close(buffer, 0.9 * before[path] + 0.1 * param.detach(), rtol=0, atol=1e-6)
    # a step fp16's loss scaler skipped (applied=False): the step counts, the teacher stays
    moved = {path: b.clone() for path, b, _ in recipe.teacher.pairs("fusion_encoder")}
    recipe.after_step(2, applied=False)
    assert recipe.current_step == 2
    assert all(torch.equal(b, moved[path]) for path, b, _ in recipe.teacher.pairs("fusion_encoder"))


@pytest.mark.parametrize("losses,modalities,teacher_parts,keys", [
    ({"mrm": 0.0, "mim": 0.0}, "both", None, {"itc", "itm", "mlm"}),
    ({"mrm": 0.0}, "both", {"vision_encoder"}, {"itc", "itm", "mlm", "mim"}),
    ({"itc": 0.0, "itm": 0.0, "mlm": 0.0, "mim": 0.0}, "image", "all", {"mrm"}),
    ({"itc": 0.0, "itm": 0.0, "mlm": 0.0, "mim": 0.0}, "text", "all", {"mrm"}),
])
def test_loss_switches(losses, modalities, teacher_parts, keys):
    import json

    recipe = build(f"method.losses={json.dumps(losses)}", options(mrm_modalities=modalities))
    if teacher_parts is None:
        assert recipe.teacher is None
    else:
        expected = {"vision_encoder", "text_encoder", "fusion_encoder", "mrm_projector"} if teacher_parts == "all" else teacher_parts
        assert set(recipe.teacher.shadow) == expected
    seen = []
    hook = recipe.backbone.fusion_encoder.encoder.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
    out = recipe(make_batch())
    hook.remove()
    assert {k for k in out if k in Mamo.default_losses} == keys
    assert ("mrm_pred_std" in out) == ("mrm" in keys)
    if keys == {"mrm"}:
        assert seen == [4]  # only the one masked view is fused (no ITM, no other view)
    out["loss"].backward()


def test_without_predictor_and_without_ema():
    recipe = build(options(mrm_predictor=False, momentum=0.0))
    assert recipe.teacher is not None and not recipe.teacher.keeps_copy
    assert not any(k.startswith("teacher.") for k in recipe.state_dict())
    out = recipe(make_batch())
    out["loss"].backward()
    assert all(p.grad is None for p in recipe.backbone.mrm_predictor.parameters())
    # momentum 0: the target is the online network of this step (eval mode, no gradient)
    batch = make_batch()
    targets = recipe.targets(batch)
    recipe.eval()
    with torch.no_grad():
        bb = recipe.backbone
        image = bb.encode_image(batch.images)
        fused = bb.fuse_all(image, bb.encode_text(batch.input_ids, batch.attention_mask), batch.attention_mask)
    assert not targets.fused.requires_grad
    torch.testing.assert_close(targets.fused, fused)
    torch.testing.assert_close(targets.image_features, image[:, 1:])


def test_options_are_validated():
    for bad in (options(mrm_modalities="audio"), options(momentum=1.0), options(image_mask_ratio=0.0),
                options(mrm_dim=-1), options(not_a_setting=1)):
        with pytest.raises(ConfigError):
            build(bad)
    with pytest.raises(ConfigError, match="method.losses"):
        build('method.losses={"mae": 1.0}')
    check_zero3_support(build())  # a [1]-shaped temperature: ZeRO-3 can partition every parameter
    recipe = build(options(mrm_dim=32, mrm_hidden=48, mim_hidden=40))
    assert recipe.backbone.mrm_predictor.fc2.out_features == 32
    assert recipe.backbone.mim_head.fc1.out_features == 40
    assert recipe.text_masking.masking.probability == 0.25  # the paper's text ratio, from the config
    base = load_config(str(BASE))
    assert base.method.name == "mamo" and base.model.preset == "base" and base.method.mlm_probability == 0.25


# ---------------------------------------------------------------------------------------------
# through the real trainer on the built-in data


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from fastvl.data.synthetic import generate

    out = tmp_path_factory.mktemp("mamo_synth")
    generate(out, train=160, heldout=16, seed=0, image_size=64, shard_size=80, progress=False)
    return out


def trainer_cfg(data: Path, out: Path, *extra: str):
    return tiny_cfg(f"data.train={data / 'train'}", f"data.eval={data / 'heldout'}", f"train.output_dir={out}",
                    "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=64", "train.steps=30",
                    "train.warmup_steps=3", "train.log_every=1", "train.save_every=0", "train.precision=fp32",
                    *extra)


def test_losses_fall_and_the_collapse_monitor_stays_up(synth, tmp_path):
    result = train(trainer_cfg(synth, tmp_path), progress=False)
    rows = read_metrics(result.metrics)
    assert len(rows) == 30
    first, last = rows[:5], rows[-5:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    for key in ("loss", "mlm", "mim", "mrm"):
        assert mean(last, key) < mean(first, key), key
    assert all(math.isfinite(r[k]) for r in rows for k in ("itc", "itm"))
    monitor = [r["mrm_pred_std"] for r in rows]
    assert min(monitor) > 1e-4 and min(monitor) >= 0.5 * monitor[0]
    assert all(r["mrm_target_std"] > 1e-3 for r in rows)


def teacher_state(weights: dict) -> dict:
    return {k: v for k, v in weights.items() if k.startswith("teacher.")}



@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (2, "bf16")])
def test_resume_restores_the_target_network_exactly(synth, tmp_path, zero_stage, precision, single_thread):
    extra = ["train.steps=4", "train.save_every=2", f"train.zero_stage={zero_stage}", f"train.precision={precision}"]
    straight = train(trainer_cfg(synth, tmp_path / "straight", *extra), progress=False)
    assert train(trainer_cfg(synth, tmp_path / "split", *extra), stop_at=2, progress=False).step == 2
    resumed = train(trainer_cfg(synth, tmp_path / "split", *extra), progress=False)
    assert resumed.step == 4
    a, b = read_weights(straight.consolidated)[0], read_weights(resumed.consolidated)[0]
    assert a.keys() == b.keys() and teacher_state(a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    teacher = teacher_state(a)
    assert all(v.dtype == torch.float32 for v in teacher.values())
    # the target is its own state: it lags the online network (a fresh copy at resume would equal it)
    online = a["backbone.fusion_encoder.encoder.layer.0.output.dense.weight"]
    ema = teacher["teacher.shadow.fusion_encoder.encoder.layer.0.output.dense.weight"]
    assert not torch.allclose(online, ema)
    rows_a, rows_b = read_metrics(straight.metrics), read_metrics(resumed.metrics)
    assert [r["mrm"] for r in rows_a] == [r["mrm"] for r in rows_b]
    if precision == "bf16":
        # the DeepSpeed step folder (ZeRO-2, bf16) reads back with the fp32 target network
        recipe, _, step = load_recipe(str(tmp_path / "split" / "step_4"))
        assert step == 4
        for name, value in teacher.items():
            assert torch.equal(recipe.state_dict()[name], value), name


def test_ema_teacher_under_zero3_gathers_the_online_parameters(tmp_path, monkeypatch):
    """A recipe with an EMA teacher under ZeRO-3: the update gathers the partitioned online
    weights, so the teacher ends where ZeRO-0's does."""
    import fastvl.models.ema as ema_module
    from tests.train.conftest import StandInLoader, StandInRecipe, stand_in_config

    partitioned = []
    gathered = ema_module._gathered
    monkeypatch.setattr(ema_module, "_gathered",
                        lambda params: partitioned.append(any(hasattr(p, "ds_id") for p in params)) or gathered(params))

    class EmaStandIn(StandInRecipe):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.teacher = EmaTeacher({"image": self.image}, momentum=0.8)

        def forward(self, batch):
            out = super().forward(batch)
            out["teacher_norm"] = self.teacher("image", batch.images).float().norm()
            return out

        def after_step(self, step, applied=True):
            super().after_step(step, applied)
            self.teacher.update()

    runs = {}
    for stage in (0, 3):
        (tmp_path / str(stage)).mkdir()
        cfg = stand_in_config(tmp_path / str(stage), f"train.zero_stage={stage}", "train.steps=4",
                              'method.options={"scalar_shape": "[1]", "dropout": 0.0}')
        result = train(cfg, build_recipe=EmaStandIn, build_loader=StandInLoader, progress=False)
        runs[stage] = (read_weights(result.consolidated)[0], read_metrics(result.metrics))
        assert partitioned and all(flag == (stage == 3) for flag in partitioned)  # ZeRO-3 did partition them
        partitioned.clear()
    teacher0, teacher3 = teacher_state(runs[0][0]), teacher_state(runs[3][0])
    assert teacher0 and teacher0.keys() == teacher3.keys()
    for name in teacher0:
        torch.testing.assert_close(teacher3[name], teacher0[name], rtol=0, atol=1e-5)
    assert [r["teacher_norm"] for r in runs[0][1]] == pytest.approx([r["teacher_norm"] for r in runs[3][1]], rel=1e-5)
    assert not torch.allclose(teacher0["teacher.shadow.image.1.weight"], runs[0][0]["image.1.weight"])

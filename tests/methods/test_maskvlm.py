"""MaskVLM: block image masking, the pixel MIM loss, which inputs each branch reads (observed with
hooks and by swapping them), the ITM product, loss switches, the scorer, and end-to-end runs on the
built-in data (losses fall; ZeRO-2 in bf16; the reconstruction grid from a checkpoint)."""
import json
import math

import pytest
import torch
from PIL import Image

from fastvl.config import ConfigError
from fastvl.data.batch import Batch
from fastvl.data.transforms import IMAGENET_MEAN
from fastvl.masking.image import BlockImageMasking, blocks_to_patches, patches_to_pixels
from fastvl.methods import build_method
from fastvl.objectives.mim import normalize_patches, pixel_mim_loss
from tests.methods.conftest import build_recipe, quick_run, read_rows, recipe_config

CONFIG = "configs/tiny_maskvlm.json"
B, L = 4, 12
MASK_ID, CLS_ID, SEP_ID = 103, 101, 102


def maskvlm_config(*overrides, **options):
    return recipe_config(CONFIG, *overrides, **options)


def build(*overrides, seed=0, **options):
    return build_recipe(CONFIG, *overrides, seed=seed, **options)


@pytest.fixture(scope="module")
def recipe():
    return build()


def make_batch(seed=0, b=B, size=64):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (b, L), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones(b, L, dtype=torch.long)
    lengths = [L, L - 3, L - 5, L - 1][:b] + [L] * max(0, b - 4)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = SEP_ID
        ids[i, n:] = 0
        mask[i, n:] = 0
    return Batch(torch.randn(b, 3, size, size, generator=g), ids, mask)


# -- image masking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("grid, masked_blocks", [(8, 10), (14, 30), (6, 6)])
def test_block_masking_count_and_2x2_structure(grid, masked_blocks):
    """tiny: 8x8 patches -> 16 blocks, ceil(0.6*16)=10; base: 14x14 -> 49 blocks, 30; small: 6x6 -> 9, 6."""
    masking = BlockImageMasking(grid, ratio=0.6, block=2, seed=5)
    mask = masking(64, step=3, device=torch.device("cpu"))
    assert mask.shape == (64, grid * grid) and mask.dtype == torch.bool
    assert masking.masked_blocks == masked_blocks == math.ceil(0.6 * (grid // 2) ** 2)
    assert (mask.sum(dim=1) == 4 * masked_blocks).all()
    blocks = mask.view(64, grid // 2, 2, grid // 2, 2)
    # every 2x2 block of patches is all masked or all visible
    assert torch.equal(blocks.amin(dim=(2, 4)), blocks.amax(dim=(2, 4)))
    assert torch.equal(mask, masking(64, step=3, device=torch.device("cpu")))  # deterministic per step
    assert not torch.equal(mask, masking(64, step=4, device=torch.device("cpu")))
    assert len({tuple(row.tolist()) for row in mask}) > 32  # images get different masks


def test_block_masking_is_uniform_over_blocks():
    masking = BlockImageMasking(8, ratio=0.6, block=2, seed=1)
    blocks = masking.block_mask(4000, step=0, device=torch.device("cpu")).float()
    torch.testing.assert_close(blocks.mean(dim=0), torch.full((16,), 10 / 16), atol=0.03, rtol=0)


def test_block_and_pixel_upsampling():
    block_mask = torch.tensor([[True, False, False, True]])
    patches = blocks_to_patches(block_mask, blocks_per_side=2, block=2)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(patches.view(4, 4), expected)
    pixels = patches_to_pixels(patches, patch_size=3)
    assert pixels.shape == (1, 1, 12, 12)
    assert torch.equal(pixels[0, 0, ::3, ::3], expected)


def test_bad_mask_blocks_are_refused():
    with pytest.raises(ValueError):
        BlockImageMasking(8, block=3)
    with pytest.raises(ValueError):
        BlockImageMasking(8, ratio=1.0)
    with pytest.raises(ConfigError, match="mask_block_patches"):
        build(mask_block_patches=3)
    with pytest.raises(ConfigError, match="unknown config key"):
        build(image_mask_rate=0.5)
    with pytest.raises(ConfigError, match="image_mask_ratio"):
        build(image_mask_ratio=0.0)


def test_text_masking_is_30_percent_mask_only(recipe):
    ids = torch.randint(1000, 2000, (256, 40), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    masked = recipe.text_masking(Batch(torch.zeros(256, 3, 1, 1), ids, torch.ones_like(ids)), step=0)
    chosen = masked.mask
    assert torch.equal(masked.input_ids[chosen], torch.full_like(masked.input_ids[chosen], MASK_ID))
    assert torch.equal(masked.input_ids[~chosen], ids[~chosen])
    assert torch.equal(masked.labels[chosen], ids[chosen])
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert abs(chosen[:, 1:-1].float().mean().item() - 0.3) < 0.01


# -- the MIM objective ------------------------------------------------------------------------------


def test_mim_loss_is_l1_over_masked_pixels_only():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 10, 12, generator=g, requires_grad=True)
    target = torch.randn(3, 10, 12, generator=g)
    mask = torch.rand(3, 10, generator=g) < 0.5
    loss = pixel_mim_loss(pred, target, mask)
    omega = int(mask.sum()) * 12
    expected = ((pred - target).abs() * mask.unsqueeze(-1)).sum() / omega
    torch.testing.assert_close(loss, expected)

    changed = target.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 12, generator=g) * 100
    assert torch.equal(pixel_mim_loss(pred, changed, mask), loss)  # unmasked targets change nothing
    changed[mask] += 1.0
    assert not torch.allclose(pixel_mim_loss(pred, changed, mask), loss)

    loss.backward()
    expected_grad = torch.sign(pred.detach() - target) * mask.unsqueeze(-1) / omega
    torch.testing.assert_close(pred.grad, expected_grad)


def test_mim_loss_with_per_patch_normalised_targets():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(2, 6, 48, generator=g), 3 + 2 * torch.randn(2, 6, 48, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    normed = (target - target.mean(-1, keepdim=True)) / (target.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(normalize_patches(target), normed)
    torch.testing.assert_close(pixel_mim_loss(pred, target, mask, normalize_target=True),
                               (pred - normed)[mask].abs().mean())
    changed = target.clone()
    changed[~mask] = -target[~mask] * 7
    assert torch.equal(pixel_mim_loss(pred, changed, mask, normalize_target=True),
                       pixel_mim_loss(pred, target, mask, normalize_target=True))


def test_mim_loss_of_an_empty_mask_is_zero():
    pred = torch.randn(2, 4, 3, requires_grad=True)
    loss = pixel_mim_loss(pred, torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(pred.grad, torch.zeros_like(pred))


def test_recipe_mim_prediction_never_sees_masked_pixels(recipe):
    """SimMIM encoding: masked patches are the mask token, so their pixels only enter as the target."""
    batch = make_batch(1)
    patch_mask = recipe.image_masking(B, 0, torch.device("cpu"))
    pixel_mask = patches_to_pixels(patch_mask, recipe.cfg.model.patch_size).expand_as(batch.images)
    with torch.no_grad():
        text = recipe.backbone.encode_text(batch.input_ids, batch.attention_mask)
        pred = recipe.predict_pixels(batch.images, patch_mask, text, batch.attention_mask)
        repainted = torch.where(pixel_mask, torch.randn_like(batch.images), batch.images)
        torch.testing.assert_close(recipe.predict_pixels(repainted, patch_mask, text, batch.attention_mask), pred)
        visible_changed = torch.where(pixel_mask, batch.images, torch.randn_like(batch.images))
        assert not torch.allclose(recipe.predict_pixels(visible_changed, patch_mask, text, batch.attention_mask), pred)
        loss = recipe.masked_image_modeling(batch, text, patch_mask)
        assert not torch.allclose(recipe.masked_image_modeling(Batch(repainted, batch.input_ids, batch.attention_mask),
                                                               text, patch_mask), loss)
        torch.testing.assert_close(loss, pixel_mim_loss(pred, recipe.backbone.patchify(batch.images), patch_mask))


# -- which inputs each branch reads ---------------------------------------------------------------


def record_calls(recipe):
    """Forward hooks on the encoders, cross-modality encoders and decoder: (name, args, kwargs, output)."""
    calls, handles = [], []
    model = recipe.backbone
    for name in ("vision_encoder", "text_encoder", "fusion_encoder", "image_cross_encoder", "image_decoder"):
        def hook(module, args, kwargs, output, name=name):
            calls.append((name, args, kwargs, output))
        handles.append(getattr(model, name).register_forward_hook(hook, with_kwargs=True))
    return calls, handles


def test_branches_read_the_right_inputs(recipe):
    """MLM: masked text x full image; MIM: masked image x full text (observed with hooks)."""
    batch = make_batch(2)
    calls, handles = record_calls(recipe)
    try:
        with torch.no_grad():
            out = recipe(batch)
    finally:
        for h in handles:
            h.remove()
    assert {"itc", "itm", "mlm", "mim"} <= set(out)
    vision = [(args, out_) for name, args, _, out_ in calls if name == "vision_encoder"]
    full_image = [o for args, o in vision if len(args) < 2 or args[1] is None]
    masked_image = [(args[1], o) for args, o in vision if len(args) > 1 and args[1] is not None]
    assert len(full_image) == 1 and len(masked_image) == 1
    (replace_mask, masked_image), (full_image,) = masked_image[0], full_image
    assert torch.equal(replace_mask, recipe.image_masking(B, recipe.current_step, torch.device("cpu")))

    text = [(args[0], o) for name, args, _, o in calls if name == "text_encoder"]
    full_text = [o for ids, o in text if torch.equal(ids, batch.input_ids)]
    masked_text = [o for ids, o in text if (ids == MASK_ID).any()]
    assert len(full_text) == 1 and len(masked_text) == 1
    full_text, masked_text = full_text[0], masked_text[0]

    fusion = [(args[0], args[2]) for name, args, _, _ in calls if name == "fusion_encoder"]
    mlm_calls = [image for text_states, image in fusion if text_states is masked_text]
    assert len(mlm_calls) == 1 and mlm_calls[0] is full_image  # MLM cross-attends the *full* image
    assert all(image is not masked_image for _, image in fusion)

    image_cross = [(args[0], args[1]) for name, args, _, _ in calls if name == "image_cross_encoder"]
    decoder = [args[1] for name, args, _, _ in calls if name == "image_decoder"]
    mim_calls = [text_states for image, text_states in image_cross if image is masked_image]
    assert len(mim_calls) == 1 and mim_calls[0] is full_text  # MIM cross-attends the *full* text
    assert len(decoder) == 1 and decoder[0] is full_text
    assert all(text_states is not masked_text for _, text_states in image_cross)


def test_swapping_branch_inputs_changes_the_losses(recipe):
    """The recipe's MLM/MIM equal the full-other-modality computations and differ from swapped ones."""
    batch = make_batch(3)
    model = recipe.backbone
    with torch.no_grad():
        out = recipe(batch)
        patch_mask = recipe.image_masking(B, recipe.current_step, torch.device("cpu"))
        full_image = model.encode_image(batch.images)
        masked_image = model.encode_image(batch.images, replace_mask=patch_mask)
        full_text = model.encode_text(batch.input_ids, batch.attention_mask)
        masked_ids = recipe.text_masking(batch, recipe.current_step).input_ids
        masked_text = model.encode_text(masked_ids, batch.attention_mask)

        # the branches are deterministic, so a different result can only come from the swapped input;
        # at initialisation the losses barely depend on the other modality, so the branch outputs
        # (MLM-side fused text states, MIM pixel predictions) are compared too
        mlm = recipe.masked_lm(batch, full_image)
        assert torch.equal(mlm, recipe.masked_lm(batch, full_image))
        torch.testing.assert_close(out["mlm"], mlm)
        swapped_mlm = recipe.masked_lm(batch, masked_image)  # MLM fed the masked image
        assert swapped_mlm.item() != mlm.item()
        fused = model.fuse(masked_text, batch.attention_mask, full_image)
        swapped_fused = model.fuse(masked_text, batch.attention_mask, masked_image)
        assert (fused - swapped_fused).abs().max() > 1e-2

        mim = recipe.masked_image_modeling(batch, full_text)
        assert torch.equal(mim, recipe.masked_image_modeling(batch, full_text))
        torch.testing.assert_close(out["mim"], mim)
        swapped_mim = recipe.masked_image_modeling(batch, masked_text)  # MIM fed the masked text
        assert swapped_mim.item() != mim.item()
        pred = recipe.predict_pixels(batch.images, patch_mask, full_text, batch.attention_mask)
        swapped_pred = recipe.predict_pixels(batch.images, patch_mask, masked_text, batch.attention_mask)
        assert (pred - swapped_pred).abs().max() > 1e-3


def test_itm_feature_is_the_product_of_both_cross_cls(recipe):
    batch = make_batch(4)
    model = recipe.backbone
    with torch.no_grad():
        image = model.encode_image(batch.images)
        text = model.encode_text(batch.input_ids, batch.attention_mask)
        feature = recipe.fuse_cls(text, batch.attention_mask, image)
        image_cls = model.cross_image(image, text, batch.attention_mask)[:, 0]
        text_cls = model.fuse(text, batch.attention_mask, image)[:, 0]
        torch.testing.assert_close(feature, image_cls * text_cls)
        assert model.itm_logits(feature).shape == (B, 2)


def test_cls_only_last_layer_matches_the_full_stack_with_gradients():
    """ITM's [CLS]-only last layer gives the full stacks' row 0, and the same gradients."""
    recipe = build(seed=1).train()
    batch = make_batch(8)
    model = recipe.backbone

    def grads_of(fn):
        recipe.zero_grad(set_to_none=True)
        image = model.encode_image(batch.images)
        text = model.encode_text(batch.input_ids, batch.attention_mask)
        value = fn(image, text)
        (value * torch.linspace(-1, 1, value.numel()).view_as(value)).sum().backward()
        return value.detach(), {n: p.grad.clone() for n, p in recipe.named_parameters() if p.grad is not None}

    mask = batch.attention_mask
    for fast, full in [
        (lambda i, t: model.cross_image_cls(i, t, mask), lambda i, t: model.cross_image(i, t, mask)[:, 0]),
        (lambda i, t: model.cross_text_cls(t, mask, i), lambda i, t: model.fuse(t, mask, i)[:, 0]),
    ]:
        fast_value, fast_grads = grads_of(fast)
        full_value, full_grads = grads_of(full)
        torch.testing.assert_close(fast_value, full_value, atol=1e-5, rtol=1e-5)
        assert fast_grads.keys() == full_grads.keys()
        for name in full_grads:
            torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_scorer(recipe):
    batch = make_batch(5)
    scorer = recipe.scorer
    with torch.no_grad():
        image_feat, image_states = scorer.image_embeddings(batch.images)
        text_feat, text_states = scorer.text_embeddings(batch.input_ids, batch.attention_mask)
        scores = scorer.itm_scores(image_states, text_states, batch.attention_mask)
        logits = recipe.backbone.itm_logits(recipe.fuse_cls(text_states, batch.attention_mask, image_states))
    torch.testing.assert_close(image_feat.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(B))
    torch.testing.assert_close(scores, logits.float().softmax(-1)[:, 1])
    assert ((scores > 0) & (scores < 1)).all()


def test_widths_can_differ():
    """'small'-like widths: the image cross [CLS] is mapped to the text width before the product."""
    recipe = build("model.vision_width=96", "model.vision_heads=2", cross_layers=1, decoder_layers=1)
    assert isinstance(recipe.backbone.image_cross_to_text, torch.nn.Linear)
    out = recipe(make_batch(6))
    assert torch.isfinite(out["loss"])


# -- loss switches (Table 5) -----------------------------------------------------------------------

TABLE5 = [("itc",), ("itc", "itm"), ("mlm", "mim"), ("itc", "itm", "mlm"), ("itc", "itm", "mlm", "mim"), ("mim",)]


@pytest.mark.parametrize("enabled", TABLE5, ids=["+".join(s) for s in TABLE5])
def test_loss_switches(enabled):
    weights = {name: (1.0 if name in enabled else 0.0) for name in ("itc", "itm", "mlm", "mim")}
    recipe = build(f"method.losses={json.dumps(weights)}", cross_layers=1, decoder_layers=1).train()
    calls, handles = record_calls(recipe)
    try:
        out = recipe(make_batch(7))
    finally:
        for h in handles:
            h.remove()
    assert set(out) - {"loss", "temperature"} == set(enabled)
    torch.testing.assert_close(out["loss"].detach(), sum(out[name] for name in enabled))
    out["loss"].backward()
    graded = {name for name, p in recipe.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    def touched(prefix):
        return any(name.startswith(prefix) for name in graded)

    assert touched("backbone.image_decoder.") == ("mim" in enabled)
    assert touched("backbone.mlm_head.transform.") == ("mlm" in enabled)
    assert touched("backbone.itm_head.") == ("itm" in enabled)
    assert touched("backbone.vision_proj.") == ("itc" in enabled)
    # encoder passes follow the switches: the full image for ITC/ITM/MLM, the masked one for MIM
    vision_calls = sum(name == "vision_encoder" for name, *_ in calls)
    needs_full_image = bool({"itc", "itm", "mlm"} & set(enabled))
    assert vision_calls == needs_full_image + ("mim" in enabled)


# -- end to end on the built-in data ------------------------------------------------------------------


def run_config(synth, out_dir, *overrides):
    return maskvlm_config(*quick_run(synth, out_dir, *overrides))


def test_losses_fall_on_builtin_data(synth, tmp_path):
    from fastvl.train.loop import train

    cfg = run_config(synth, tmp_path / "run", "train.steps=30", "train.lr=3e-4", "train.precision=fp32")
    result = train(cfg, progress=False)
    rows = read_rows(result.metrics)
    assert len(rows) == 30

    def mean(name, part):
        return sum(r[name] for r in part) / len(part)

    first, last = rows[:5], rows[-5:]
    # the reconstruction losses learn real structure in 30 steps
    assert mean("mlm", last) < 0.95 * mean("mlm", first)
    assert mean("mim", last) < 0.9 * mean("mim", first)
    # the alignment losses fall to (not yet below) chance in 30 steps, as ALBEF's do on this data:
    # ITC -> log(batch), ITM -> entropy of its 1:2 positive/negative labels
    assert mean("itc", last) < mean("itc", first) and mean("itc", last) < math.log(16) + 0.05
    itm_chance = -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3)
    assert mean("itm", last) < mean("itm", first) and mean("itm", last) < itm_chance + 0.02
    assert mean("loss", last) < mean("loss", first)


def test_zero2_bf16_and_reconstruction_grid(synth, tmp_path):
    """DeepSpeed ZeRO-2 in bf16 on CPU, then the grid CLI on its checkpoint."""
    from fastvl.eval.reconstruct import MIN_CELL, PAD, main
    from fastvl.train.loop import train

    # bf16 is emulated on this CPU (~10x slower than fp32): a small batch keeps the run short
    cfg = run_config(synth, tmp_path / "run", "train.steps=3", "train.lr=1e-4", "train.precision=bf16",
                     "train.zero_stage=2", "data.batch_size=4")
    result = train(cfg, progress=False)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["precision"] == "bf16" and run["zero_stage"] == 2
    rows = read_rows(result.metrics)
    assert len(rows) == 3
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "itc", "itm", "mlm", "mim"))

    out = tmp_path / "grid.png"
    assert main(["--checkpoint", str(tmp_path / "run"), "--data", str(synth / "heldout"), "--out", str(out),
                 "--samples", "3"]) == 0
    grid = Image.open(out)
    cell = MIN_CELL  # 64 px images are upscaled 2x
    assert grid.size == (3 * (cell + PAD) + PAD, 3 * (cell + PAD) + PAD)
    # the masked column shows masked patches in the dataset mean colour, where the mask says
    mask = build_method(cfg).image_masking(3, 0, torch.device("cpu"))
    patch = cell // 8
    masked_index = int(mask[0].nonzero()[0])
    r, c = divmod(masked_index, 8)
    pixel = grid.getpixel((PAD + (cell + PAD) + c * patch + patch // 2, PAD + r * patch + patch // 2))
    assert all(abs(p - round(255 * m)) <= 1 for p, m in zip(pixel, IMAGENET_MEAN))


def test_zero2_with_a_loss_subset(synth, tmp_path):
    """A Table 5 row leaves parameters without gradients (ITC/ITM heads here); ZeRO-2 must cope."""
    from fastvl.train.loop import train

    weights = json.dumps({"itc": 0.0, "itm": 0.0, "mlm": 1.0, "mim": 1.0})
    cfg = run_config(synth, tmp_path / "run", "train.steps=2", "train.precision=fp32", "train.zero_stage=2",
                     f"method.losses={weights}", "method.options.cross_layers=1", "method.options.decoder_layers=1")
    rows = read_rows(train(cfg, progress=False).metrics)
    assert [set(r) >= {"mlm", "mim"} and "itc" not in r for r in rows] == [True, True]

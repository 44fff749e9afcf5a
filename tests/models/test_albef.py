"""The ALBEF backbone: shapes, the observer hook, kind/step and position routing, backend agreement at
model level, and gradients reaching every parameter in an ITC + ITM + MLM-like step."""
import pytest
import torch
import torch.nn.functional as F

import fastvl_kernels
from fastvl.config import ModelConfig
from fastvl.models import AlbefModel, set_attention_backend
from fastvl_kernels import CONTEXT, ORIGINAL, PSEUDO

B, L = 3, 10


@pytest.fixture(scope="module")
def cfg():
    return ModelConfig(preset="tiny", attention="sdpa")


@pytest.fixture(scope="module")
def model(cfg):
    torch.manual_seed(0)
    return AlbefModel(cfg).eval()


def batch(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=g)
    input_ids = torch.randint(1000, 2000, (B, L), generator=g)
    input_ids[:, 0] = 101
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, 7:] = 0
    attention_mask[2, 4:] = 0
    return images, input_ids, attention_mask


def test_shapes(model, cfg):
    images, ids, mask = batch(cfg)
    with torch.no_grad():
        image_states = model.encode_image(images)
        text_states = model.encode_text(ids, mask)
        fused = model.fuse(text_states, mask, image_states)
        assert image_states.shape == (B, 1 + cfg.num_patches, cfg.vision_width)
        assert text_states.shape == (B, L, cfg.text_width)
        assert fused.shape == (B, L, cfg.text_width)
        for feat in (model.image_feat(image_states), model.text_feat(text_states)):
            assert feat.shape == (B, cfg.embed_dim)
            torch.testing.assert_close(feat.norm(dim=-1), torch.ones(B))
        assert model.mlm_logits(fused).shape == (B, L, cfg.vocab_size)
        assert model.mlm_logits(fused[mask.bool()]).shape == (int(mask.sum()), cfg.vocab_size)
        assert model.itm_logits(fused).shape == (B, 2)
        torch.testing.assert_close(model.itm_logits(fused[:, 0]), model.itm_logits(fused))


def test_observer_sees_every_attention_module_with_right_shapes(model, cfg):
    images, ids, mask = batch(cfg)
    seen = {}

    def observer(name, q, k, v, key_padding_mask):
        seen[name] = (q.shape, k.shape, v.shape, None if key_padding_mask is None else key_padding_mask.clone())

    with torch.no_grad(), model.observing(observer):
        model.fuse(model.encode_text(ids, mask), mask, model.encode_image(images))
    assert all(m.observer is None for m in model.attention_modules())

    dv, dt = cfg.vision_width // cfg.vision_heads, cfg.text_width // cfg.text_heads
    n = 1 + cfg.num_patches
    expected = {}
    for i in range(cfg.vision_layers):
        shape = (B, cfg.vision_heads, n, dv)
        expected[f"vision_encoder.blocks.{i}.attn"] = (shape, shape, shape, None)
    text_shape = (B, cfg.text_heads, L, dt)
    for i in range(cfg.text_layers):
        expected[f"text_encoder.encoder.layer.{i}.attention.self"] = (text_shape,) * 3 + (mask.bool(),)
    for i in range(cfg.fusion_layers):
        expected[f"fusion_encoder.encoder.layer.{i}.attention.self"] = (text_shape,) * 3 + (mask.bool(),)
        image_shape = (B, cfg.text_heads, n, dt)
        expected[f"fusion_encoder.encoder.layer.{i}.crossattention.self"] = (text_shape, image_shape, image_shape, None)
    assert set(seen) == set(expected)
    for name, (q, k, v, kpm) in expected.items():
        got = seen[name]
        assert (got[0], got[1], got[2]) == (q, k, v), name
        assert (got[3] is None and kpm is None) or torch.equal(got[3], kpm), name


def test_kind_step_routes_to_text_and_fusion_self_attention(model, cfg):
    """All ORIGINAL with step = position is a causal LM: outputs at i ignore tokens after i, in both
    the text and the fusion encoders, while the image stays visible."""
    images, ids, mask = batch(cfg)
    mask = torch.ones_like(mask)
    kind = torch.full((B, L), ORIGINAL)
    step = torch.arange(L).expand(B, L)
    changed = ids.clone()
    changed[:, 6:] = 1500
    with torch.no_grad():
        image_states = model.encode_image(images)

        def run(tokens):
            text = model.encode_text(tokens, mask, kind=kind, step=step)
            return text, model.fuse(text, mask, image_states, kind=kind, step=step)

        text_a, fused_a = run(ids)
        text_b, fused_b = run(changed)
        torch.testing.assert_close(text_a[:, :6], text_b[:, :6])
        torch.testing.assert_close(fused_a[:, :6], fused_b[:, :6])
        assert not torch.allclose(text_a[:, 6:], text_b[:, 6:])
        # without the rule the change leaks backwards
        assert not torch.allclose(model.encode_text(ids, mask)[:, :6], model.encode_text(changed, mask)[:, :6])


def test_pseudo_masks_reuse_positions(model, cfg):
    """C-Mask's pseudo masks carry the positions of the tokens they stand for."""
    _, ids, mask = batch(cfg)
    with torch.no_grad():
        default = model.encode_text(ids, mask)
        explicit = model.encode_text(ids, mask, torch.arange(L).expand(B, L))
        torch.testing.assert_close(default, explicit)
        # a sequence [context..., original@2, pseudo@2]: the pseudo mask row reads position 2
        kind = torch.full((B, L), CONTEXT)
        step = torch.zeros(B, L, dtype=torch.long)
        kind[:, 2], step[:, 2] = ORIGINAL, 1
        kind[:, -1], step[:, -1] = PSEUDO, 1
        positions = torch.arange(L).expand(B, L).clone()
        positions[:, -1] = 2
        full = torch.ones_like(mask)
        out = model.encode_text(ids, full, positions, kind=kind, step=step)
        moved = model.encode_text(ids, full, kind=kind, step=step)
        assert not torch.allclose(out[:, -1], moved[:, -1])
        torch.testing.assert_close(out[:, :2], moved[:, :2])


HAS_PERM_KERNEL = fastvl_kernels.permutation_attention is not None
BACKENDS_HERE = ["eager", "flex"] + (["triton"] if HAS_PERM_KERNEL else [])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_backends_agree_at_model_level(cfg, backend):
    """Same weights, same padded batch with kind/step: every CPU backend gives the sdpa output at the
    real text positions (the triton kernel zeroes padded query rows, the others compute them)."""
    torch.manual_seed(0)
    model = AlbefModel(cfg).eval()
    images, ids, mask = batch(cfg)
    kind = torch.randint(0, 3, (B, L), generator=torch.Generator().manual_seed(4))
    kind[:, 0] = CONTEXT
    step = torch.randint(0, 3, (B, L), generator=torch.Generator().manual_seed(5))

    def forward():
        with torch.no_grad():
            image_states = model.encode_image(images)
            text = model.encode_text(ids, mask, kind=kind, step=step)
            return image_states, model.fuse(text, mask, image_states, kind=kind, step=step)

    image_ref, fused_ref = forward()
    set_attention_backend(model, backend)
    image_states, fused = forward()
    real = mask.bool()
    torch.testing.assert_close(image_states, image_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[real], fused_ref[real], atol=1e-5, rtol=1e-5)
    if backend != "triton":
        torch.testing.assert_close(fused, fused_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_PERM_KERNEL, reason="fastvl_kernels.permutation_attention not available in this build")
def test_triton_backend_trains_like_sdpa(cfg):
    """Gradients of an MLM-like loss at real positions through the permutation kernel equal sdpa's."""
    images, ids, mask = batch(cfg)
    kind = torch.full((B, L), ORIGINAL)
    step = torch.arange(L).expand(B, L)
    grads = {}
    for backend in ("sdpa", "triton"):
        torch.manual_seed(0)
        model = AlbefModel(cfg).train()
        set_attention_backend(model, backend)
        image_states = model.encode_image(images)
        fused = model.fuse(model.encode_text(ids, mask, kind=kind, step=step), mask, image_states, kind=kind, step=step)
        real = mask.bool()
        F.cross_entropy(model.mlm_logits(fused[real]), ids[real]).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["triton"].keys()
    for name, want in grads["sdpa"].items():
        torch.testing.assert_close(grads["triton"][name], want, atol=2e-5, rtol=1e-4, msg=name)


def test_gradients_reach_every_parameter(cfg):
    """An ITC + ITM + MLM-like step (with a SimMIM-style replaced image for the mask token) trains
    every parameter of the tiny backbone."""
    torch.manual_seed(0)
    model = AlbefModel(cfg).train()
    images, ids, mask = batch(cfg)
    replace = torch.zeros(B, cfg.num_patches, dtype=torch.bool)
    replace[:, ::5] = True
    image_states = model.encode_image(images, replace_mask=replace)
    text_states = model.encode_text(ids, mask)
    sim = model.image_feat(image_states) @ model.text_feat(text_states).T / 0.07
    targets = torch.arange(B)
    itc = (F.cross_entropy(sim, targets) + F.cross_entropy(sim.T, targets)) / 2
    negatives = torch.roll(torch.arange(B), 1)
    fused = model.fuse(torch.cat([text_states, text_states[negatives]]), torch.cat([mask, mask[negatives]]),
                       torch.cat([image_states, image_states]))
    itm = F.cross_entropy(model.itm_logits(fused), torch.cat([torch.ones(B), torch.zeros(B)]).long())
    masked = ids.clone()
    masked[:, 2] = 103
    mlm_fused = model.fuse(model.encode_text(masked, mask), mask, image_states)
    mlm = F.cross_entropy(model.mlm_logits(mlm_fused[:, 2]), ids[:, 2])
    (itc + itm + mlm).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_mean_text_pooling_reads_the_real_tokens_only(cfg):
    torch.manual_seed(0)
    model = AlbefModel(ModelConfig(preset="tiny", text_pooling="mean")).eval()
    _, ids, mask = batch(cfg)
    ids, mask = ids[:2].clone(), mask[:2].clone()
    mask[1, 5:] = 0
    with torch.no_grad():
        states = model.encode_text(ids, mask)
        feat = model.text_feat(states, mask)
        expected = F.normalize(model.text_proj(states[1, :5].mean(0)), dim=-1)
        torch.testing.assert_close(feat[1], expected)
        # what sits in the padded rows does not matter; the [CLS] row alone is not what is read
        states[1, 5:] = 100.0
        torch.testing.assert_close(model.text_feat(states, mask)[1], expected)
        assert not torch.allclose(feat[1], F.normalize(model.text_proj(states[1, 0]), dim=-1))
    with pytest.raises(ValueError, match="text_pooling='mean' needs the attention mask"):
        model.text_feat(states)


def test_cmask_refuses_mean_text_pooling():
    from fastvl.config import ConfigError, load_config
    from fastvl.methods import build_method

    from pathlib import Path

    config = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cmask.json"),
                         ["model.text_pooling=mean"])
    with pytest.raises(ConfigError, match="C-Mask's ITC reads the text \\[CLS\\] row"):
        build_method(config)


def _fusion_inputs(cfg, model, rows=5, seed=1):
    """Text states for ``rows`` texts, B image states, and which image each text reads (repeats)."""
    images, ids, mask = batch(cfg, seed)
    image_states = model.encode_image(images)
    text_states = model.encode_text(ids, mask)
    pick = torch.tensor([0, 2, 2, 1, 0])[:rows]
    return text_states[pick % B], mask[pick % B], image_states, torch.tensor([1, 1, 0, 2, 1])[:rows]


def _grads(model, *tensors):
    return [t.grad.clone() for t in tensors] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_an_image_context_gives_what_repeated_images_give(cfg):
    """Fusing texts with images named by index through one projected ``ImageContext`` (what ALBEF's ITM
    and MLM passes share) gives the outputs and gradients of fusing them with the images repeated."""
    torch.manual_seed(0)
    model = AlbefModel(cfg).eval()
    text_states, mask, image_states, index = _fusion_inputs(cfg, model)
    text_states, image_states = text_states.detach().requires_grad_(), image_states.detach().requires_grad_()
    weights = torch.randn(len(index), L, cfg.text_width)

    repeated = model.fuse(text_states, mask, image_states[index])
    (repeated * weights).sum().backward()
    expected = _grads(model, text_states, image_states)
    model.zero_grad(set_to_none=True)
    text_states.grad = image_states.grad = None

    context = model.image_context(image_states)
    assert [kv.keys.shape for kv in context.layers] == [(B, cfg.text_heads, 1 + cfg.num_patches,
                                                         cfg.text_width // cfg.text_heads)] * cfg.fusion_layers
    shared = model.fuse(text_states, mask, context, image_index=index)
    (shared * weights).sum().backward()
    torch.testing.assert_close(shared, repeated)
    for got, want in zip(_grads(model, text_states, image_states), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_cls_only_is_row_zero_of_the_full_fusion(cfg):
    """``cls_only`` computes the last fusion layer for [CLS] alone: the same row and the same gradients."""
    torch.manual_seed(0)
    model = AlbefModel(cfg).eval()
    text_states, mask, image_states, index = _fusion_inputs(cfg, model)
    text_states = text_states.detach().requires_grad_()
    weights = torch.randn(len(index), cfg.text_width)
    full = model.fuse(text_states, mask, image_states.detach(), image_index=index)[:, 0]
    (full * weights).sum().backward()
    expected = _grads(model, text_states)
    model.zero_grad(set_to_none=True)
    text_states.grad = None
    cls = model.fuse(text_states, mask, image_states.detach(), image_index=index, cls_only=True)
    (cls * weights).sum().backward()
    torch.testing.assert_close(cls, full)
    for got, want in zip(_grads(model, text_states), expected, strict=True):
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="cls_only"):
        model.fuse(text_states, mask, image_states, image_index=index, cls_only=True,
                   attn_mask=torch.ones(1, 1, L, L, dtype=torch.bool))


def test_an_image_context_brings_its_own_mask(model, cfg):
    text_states, mask, image_states, index = _fusion_inputs(cfg, model)
    image_mask = torch.ones(B, 1 + cfg.num_patches, dtype=torch.bool)
    image_mask[1, 5:] = False
    with torch.no_grad():
        want = model.fuse(text_states, mask, image_states[index], image_mask[index])
        got = model.fuse(text_states, mask, model.image_context(image_states, image_mask), image_index=index)
        torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="its own image mask"):
            model.fuse(text_states, mask, model.image_context(image_states), image_mask, image_index=index)


def test_captions_encoded_in_one_pass_match_separate_passes(model, cfg):
    _, ids, mask = batch(cfg)
    masked_ids = ids.clone()
    masked_ids[:, 2:4] = 103  # [MASK]
    together = model.encode_captions(mask, ids, masked_ids)
    apart = (model.encode_text(ids, mask), model.encode_text(masked_ids, mask))
    assert len(together) == 2
    for one_pass, own_pass in zip(together, apart):
        real = mask.bool()  # padded rows are not read downstream (attention module docstring)
        torch.testing.assert_close(one_pass[real], own_pass[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[0][real], together[1][real])  # each caption kept its own rows
    single, no_masked = model.encode_captions(mask, ids)
    torch.testing.assert_close(single, apart[0], rtol=0, atol=0)
    assert no_masked is None

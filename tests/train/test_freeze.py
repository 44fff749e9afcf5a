"""``train.freeze``: parameters under a name prefix keep their initial values through training, get no
gradient, and read back from a bf16 checkpoint (whose fp32 masters exist only for trained parameters)."""
from pathlib import Path

import pytest
import torch

from fastvl.config import ConfigError, load_config
from fastvl.methods import build_method
from fastvl.train.checkpoint import load_recipe
from fastvl.train.loop import seed_everything, train

from .conftest import tiny_overrides

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_albef.json"
FROZEN = "backbone.vision_encoder"


def test_frozen_tower_keeps_its_weights_and_the_rest_trains(synth_data, tmp_path):
    cfg = load_config(str(TINY), tiny_overrides(synth_data, tmp_path, "train.steps=3", "train.precision=bf16",
                                                f"train.freeze=[\"{FROZEN}\"]", "train.save_every=3"))
    seed_everything(cfg.train.seed)
    initial = {k: v.clone() for k, v in build_method(cfg).state_dict().items()}
    train(cfg, progress=False)
    trained, _, _ = load_recipe(str(tmp_path / "step_3"))
    params = dict(trained.named_parameters())
    assert all(not p.requires_grad for n, p in params.items() if n.startswith(FROZEN + "."))
    for name, value in trained.state_dict().items():
        # frozen weights went through DeepSpeed's bf16 module copy: equal to their init at bf16 precision
        if name.startswith(FROZEN + "."):
            torch.testing.assert_close(value, initial[name].bfloat16().float(), atol=0, rtol=0)
    moved = [n for n in params if not n.startswith(FROZEN + ".") and not torch.equal(params[n], initial[n])]
    assert any(n.startswith("backbone.text_encoder.") for n in moved)
    assert any(n.startswith("backbone.vision_proj.") for n in moved)


def test_freeze_names_what_it_cannot_find():
    cfg = load_config(str(TINY), ["train.freeze=[\"backbone.vision\"]"])
    with pytest.raises(ConfigError, match=r"train.freeze: no parameter .* 'backbone.vision'.*backbone.vision_encoder"):
        build_method(cfg)

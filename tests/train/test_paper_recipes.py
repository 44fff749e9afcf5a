"""The base configs carry their papers' optimisation recipes (schedule, learning rates per module, AdamW
epsilon), and MaskVLM's per-module rates reach the parameters the paper names."""
from pathlib import Path

import pytest

from fastvl.config import load_config
from fastvl.methods import build_method
from fastvl.train.engine import lr_factor, parameter_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _peak_and_end(train) -> tuple[float, float]:
    return train.lr * lr_factor(train.warmup_steps, train), train.lr * lr_factor(train.steps, train)


@pytest.mark.parametrize("config,schedule,warmup,peak,end,eps", [
    ("base_albef.json", "cosine", 1000, 1e-4, 1e-5, 1e-8),    # ALBEF sec. 4 (via EPIC's "official ALBEF")
    ("base_epic.json", "cosine", 1000, 1e-4, 1e-5, 1e-8),     # EPIC app. F: ALBEF as in its official code
    ("base_mamo.json", "linear", 2500, 1e-4, 1e-5, 1e-8),     # MAMO sec. 4.1
    ("base_maskvlm.json", "cosine", 1000, 3e-4, 3e-5, 1e-8),  # MaskVLM sec. 4.1
    ("base_cmask.json", "cosine", 10000, 5e-4, 0.0, 1e-6),    # C-Mask app. E, pre-training table
])
def test_base_configs_follow_their_papers_schedules(config, schedule, warmup, peak, end, eps):
    train = load_config(str(CONFIGS / config)).train
    assert (train.schedule, train.warmup_steps, train.adam_eps) == (schedule, warmup, eps)
    assert _peak_and_end(train) == pytest.approx((peak, end))
    if schedule == "linear":  # halfway through the decay: halfway between peak and end
        middle = train.warmup_steps + (train.steps - train.warmup_steps) // 2
        assert train.lr * lr_factor(middle, train) == pytest.approx((peak + end) / 2, rel=1e-3)


def test_maskvlm_encoders_train_at_1e5_and_the_new_modules_at_3e4():
    cfg = load_config(str(CONFIGS / "base_maskvlm.json"), ["model.preset=tiny", "method.options.text_encoder_layers=2",
                                                         "method.options.cross_layers=1", "method.options.decoder_layers=1"])
    recipe = build_method(cfg)
    names = {id(p): n for n, p in recipe.named_parameters()}
    rates = {names[id(p)]: cfg.train.lr * g["lr_scale"] for g in parameter_groups(recipe, 0.05, cfg.train.param_groups)
             for p in g["params"]}
    assert rates.keys() == {n for n, p in recipe.named_parameters() if p.requires_grad}
    for name, lr in rates.items():
        encoder = name.startswith(("backbone.vision_encoder.", "backbone.text_encoder."))
        assert lr == pytest.approx(1e-5 if encoder else 3e-4, rel=1e-5), name
    assert any(n.startswith("backbone.image_cross_encoder.") for n in rates)

"""The training loop through DeepSpeed in this process (1 rank): checkpoints, exact resume, gradient
accumulation, precision, ZeRO stages, metrics and the run directory. Mechanics use the stand-in
recipe (conftest.py); exact resume and bf16 also run the real tiny ALBEF on the built-in data."""
import json
import math
from pathlib import Path

import pytest
import torch

from fastvl.config import config_from_dict, load_config
from fastvl.train.checkpoint import CONSOLIDATED, list_checkpoints, load_recipe, read_weights
from fastvl.train.loop import current_loss_scale, train
from fastvl.train.metrics import read_metrics

from .conftest import StandInLoader, StandInRecipe, stand_in_config, tiny_overrides

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_albef.json"
LOSS_KEYS = ("loss", "itc", "itm", "mlm")


def _stand_in(cfg, **kwargs):
    return train(cfg, build_recipe=StandInRecipe, build_loader=StandInLoader, progress=False, **kwargs)


def _weights(run_dir: Path) -> dict:
    return read_weights(run_dir / CONSOLIDATED)[0]


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max()}"
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def test_run_directory_checkpoints_and_metrics(tmp_path):
    cfg = stand_in_config(tmp_path, "train.steps=6", "train.save_every=2", "train.keep_last=2", "train.log_every=2")
    result = _stand_in(cfg)
    run = tmp_path / "run"
    assert result.step == 6 and result.checkpoint == run / "step_6"
    assert [step for step, _ in list_checkpoints(run)] == [4, 6]  # keep_last=2
    assert (run / "latest").read_text().strip() == "step_6"
    assert config_from_dict(json.loads((run / "config.json").read_text())) == cfg
    info = json.loads((run / "run.json").read_text())
    assert info["precision"] == "fp32" and info["optimizer"] == "torch_adamw_fused" and info["loss_names"] == ["contrast", "recon"]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:
        for key in ("epoch", "samples_seen", "lr", "loss", "contrast", "recon", "scale", "samples_per_s",
                    "step_time_s", "peak_mem_mb"):
            assert key in row and math.isfinite(row[key]), key
    assert rows[-1]["samples_seen"] == 6 * 8
    assert result.plot == run / "loss.png" and result.plot.read_bytes()[:4] == b"\x89PNG"
    # the consolidated weights are the module's, in safetensors with the config and step as metadata
    state_dict, metadata = read_weights(run / CONSOLIDATED)
    assert result.consolidated == run / CONSOLIDATED
    assert int(metadata["step"]) == 6 and config_from_dict(json.loads(metadata["config"])) == cfg
    assert all(v.dtype != torch.bfloat16 for v in state_dict.values())


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (2, "fp32"), (1, "bf16")])
def test_stand_in_resume_is_exact(tmp_path, zero_stage, precision):
    common = [f"train.zero_stage={zero_stage}", f"train.precision={precision}", "train.steps=8", "train.save_every=4"]
    straight = stand_in_config(tmp_path / "a", *common)
    resumed = stand_in_config(tmp_path / "b", *common)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _stand_in(straight)
    assert _stand_in(resumed, stop_at=4).step == 4
    assert not (tmp_path / "b" / "run" / CONSOLIDATED).exists()  # interrupted: no final weights yet
    assert _stand_in(resumed).step == 8
    _assert_same_weights(_weights(tmp_path / "a" / "run"), _weights(tmp_path / "b" / "run"))
    rows_a = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    assert [(r["loss"], r["lr"]) for r in rows_a] == [(r["loss"], r["lr"]) for r in rows_b]


def test_param_groups_and_schedule_reach_the_optimizer_and_resume(tmp_path, monkeypatch):
    """The optimizer's groups carry lr * lr_scale * the schedule at every step, and a run resumed from
    its step-4 checkpoint sees the same group settings as a straight one."""
    from fastvl.train.engine import Engine, lr_factor

    seen = []
    original = Engine.train_micro_batch

    def recording(self, batch, micro):
        seen.append([(round(g["lr"], 12), g["lr_scale"], g["weight_decay"], len(g["params"]))
                     for g in self.ds.optimizer.param_groups])
        return original(self, batch, micro)

    monkeypatch.setattr(Engine, "train_micro_batch", recording)
    common = ["train.steps=8", "train.save_every=4", "train.schedule=linear", "train.min_lr_ratio=0.25",
              'train.param_groups=[{"params": "decoder.*", "lr_scale": 0.1, "weight_decay": 0.3}]']
    runs = {}
    for name, stops in (("straight", [None]), ("resumed", [4, None])):
        (tmp_path / name).mkdir()
        cfg = stand_in_config(tmp_path / name, *common)
        seen.clear()
        for stop in stops:
            _stand_in(cfg, stop_at=stop)
        runs[name] = list(seen)
    assert runs["straight"] == runs["resumed"] and len(runs["straight"]) == 8
    t = cfg.train
    for step, groups in enumerate(runs["straight"]):
        lr = t.lr * lr_factor(step, t)
        # unmatched matrices, unmatched no-decay params, the decoder's weight, the decoder's bias
        assert groups == [(round(lr, 12), 1.0, t.weight_decay, 1), (round(lr, 12), 1.0, 0.0, 5),
                          (round(lr * 0.1, 12), 0.1, 0.3, 1), (round(lr * 0.1, 12), 0.1, 0.0, 1)]
    rows = read_metrics(tmp_path / "straight" / "run" / "metrics.jsonl")
    assert [r["lr"] for r in rows] == pytest.approx([t.lr * lr_factor(s, t) for s in range(8)])


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    """2 micro-batches of 4 accumulate to the update of one batch of 8 (a per-sample loss only:
    the contrastive loss depends on the batch composition)."""
    only_recon = ["method.options={\"dropout\": 0.0}", "method.losses={\"contrast\": 0.0}", "train.steps=4"]
    (tmp_path / "big").mkdir(), (tmp_path / "accum").mkdir()
    big = _stand_in(stand_in_config(tmp_path / "big", "data.batch_size=8", *only_recon))
    accum = _stand_in(stand_in_config(tmp_path / "accum", "data.batch_size=4", "train.grad_accum=2", *only_recon))
    assert big.last_row["samples_seen"] == accum.last_row["samples_seen"] == 32
    _assert_same_weights(_weights(big.run_dir), _weights(accum.run_dir), atol=1e-5)  # Adam magnifies rounding


def test_max_epochs_stops_the_run(tmp_path):
    result = _stand_in(stand_in_config(tmp_path, "train.steps=100", "train.max_epochs=1"))
    assert result.step == StandInLoader.NUM_SAMPLES // 8
    assert result.consolidated is not None


def test_zero3_runs_and_matches_zero0(tmp_path):
    """ZeRO-3 works for a recipe without 0-dim parameters: same losses and (consolidated through
    DeepSpeed's zero_to_fp32) the same weights as ZeRO-0."""
    vector = ["method.options={\"scalar_shape\": \"[1]\", \"dropout\": 0.0}", "train.steps=4"]
    (tmp_path / "z0").mkdir(), (tmp_path / "z3").mkdir()
    z0 = _stand_in(stand_in_config(tmp_path / "z0", "train.zero_stage=0", *vector))
    z3 = _stand_in(stand_in_config(tmp_path / "z3", "train.zero_stage=3", *vector))
    rows0, rows3 = read_metrics(z0.metrics), read_metrics(z3.metrics)
    assert [r["loss"] for r in rows0] == pytest.approx([r["loss"] for r in rows3], rel=1e-5)
    _assert_same_weights(_weights(z0.run_dir), _weights(z3.run_dir), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the real tiny ALBEF on the built-in data



def test_albef_resume_20_steps_equals_10_resume_10(synth_data, tmp_path, single_thread):
    """Exact resume: 20 steps straight == 10 steps, a new engine resuming from the checkpoint, 10 more
    (model, optimizer, LR schedule, data position, RNG incl. dropout). Parameters equal bit for bit."""
    extra = ["train.steps=20", "train.save_every=10", "train.keep_last=1", "model.dropout=0.1", "train.warmup_steps=4"]
    straight = load_config(str(TINY), tiny_overrides(synth_data, tmp_path / "straight", *extra))
    split = load_config(str(TINY), tiny_overrides(synth_data, tmp_path / "split", *extra))
    train(straight, progress=False)
    assert train(split, stop_at=10, progress=False).step == 10
    assert train(split, progress=False).step == 20
    assert [s for s, _ in list_checkpoints(tmp_path / "split")] == [20]
    _assert_same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "split"))
    rows_a, rows_b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "split" / "metrics.jsonl")
    assert [[r[k] for k in LOSS_KEYS] for r in rows_a] == [[r[k] for k in LOSS_KEYS] for r in rows_b]


def test_albef_bf16_on_cpu(synth_data, tmp_path):
    cfg = load_config(str(TINY), tiny_overrides(synth_data, tmp_path, "train.precision=bf16", "train.steps=3",
                                                "train.zero_stage=2"))
    result = train(cfg, progress=False)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["precision"] == "bf16"
    rows = read_metrics(result.metrics)
    assert len(rows) == 3 and all(math.isfinite(r[k]) for r in rows for k in LOSS_KEYS)
    weights = _weights(tmp_path)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    # the DeepSpeed step folder reads without an engine and gives the same fp32 master weights
    recipe, _, step = load_recipe(str(tmp_path / "step_3"))
    assert step == 3
    _assert_same_weights({k: v for k, v in recipe.state_dict().items()}, weights)


def test_loss_scale_is_read_from_either_kind_of_deepspeed_fp16_optimizer():
    """Stage 0 keeps the dynamic scale in ``loss_scale_config.cur_scale``, ZeRO 1-2 in ``cur_scale``."""
    from types import SimpleNamespace

    assert current_loss_scale(SimpleNamespace(loss_scale_config=SimpleNamespace(cur_scale=2.0**16))) == 65536.0
    assert current_loss_scale(SimpleNamespace(cur_scale=1024)) == 1024.0
    assert current_loss_scale(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)) is None


def test_after_step_hears_whether_the_step_was_applied(tmp_path, monkeypatch):
    """fp16's loss scaler can skip a step (DeepSpeed's ``was_step_applied``, read at the accumulation
    boundary only): the recipe's ``after_step`` gets that flag (MAMO's EMA then holds still)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    verdicts = iter([True, False, True])
    monkeypatch.setattr(DeepSpeedEngine, "was_step_applied", lambda self: next(verdicts))
    seen = []

    class Recording(StandInRecipe):
        def after_step(self, step, applied=True):
            super().after_step(step, applied)
            seen.append((step, applied))

    train(stand_in_config(tmp_path, "train.steps=3", "train.grad_accum=2"), build_recipe=Recording,
          build_loader=StandInLoader, progress=False)
    assert seen == [(1, True), (2, False), (3, True)]


def test_micro_batches_of_one_step_draw_with_their_own_keys(tmp_path):
    """Under gradient accumulation the draw key counts micro-batches (step * grad_accum + micro), so the
    micro-batches of one step do not share their masks; without accumulation it is the step."""
    keys = []

    class Recording(StandInRecipe):
        def forward(self, batch):
            keys.append(self.draw_step)
            return super().forward(batch)

    for name, accum, expected in (("accum", 2, [0, 1, 2, 3, 4, 5]), ("plain", 1, [0, 1, 2])):
        keys.clear()
        (tmp_path / name).mkdir()
        train(stand_in_config(tmp_path / name, "train.steps=3", f"train.grad_accum={accum}"), build_recipe=Recording,
              build_loader=StandInLoader, progress=False)
        assert keys == expected, name

"""``train.deepspeed`` (a user's DeepSpeed config merged over fastvl's) and ``train.report_to``
(TensorBoard event files of the metrics rows)."""
import json
import warnings

import pytest
import torch

from fastvl.config import ConfigError
from fastvl.train.engine import build_engine, deepspeed_config, init_distributed, warn_single_process_zero
from fastvl.train.loop import train
from fastvl.train.metrics import read_metrics

from .conftest import StandInLoader, StandInRecipe, stand_in_config


def _config(tmp_path, user, *overrides):
    return stand_in_config(tmp_path, f"train.deepspeed={json.dumps(user)}", *overrides)


def test_user_keys_merge_over_the_generated_config(tmp_path):
    user = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345, "offload_optimizer": {"device": "cpu"}},
            "csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "x"},
            "steps_per_print": 7, "train_micro_batch_size_per_gpu": 8}
    cfg = _config(tmp_path, user, "train.zero_stage=2")
    config = deepspeed_config(cfg, "fp32", world_size=2)
    assert config["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345, "offload_optimizer": {"device": "cpu"}}
    assert config["csv_monitor"]["job_name"] == "x" and config["steps_per_print"] == 7
    assert config["train_batch_size"] == 16  # fastvl's own keys stay


def test_a_file_is_read_into_the_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"allgather_bucket_size": 999}}))
    cfg = stand_in_config(tmp_path, f"train.deepspeed={path}")
    path.unlink()  # the saved config holds the content: nothing reads the file again
    assert cfg.train.deepspeed == {"zero_optimization": {"allgather_bucket_size": 999}}
    assert deepspeed_config(cfg, "fp32", 1)["zero_optimization"]["allgather_bucket_size"] == 999


@pytest.mark.parametrize("user,message", [
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage = 3, but train.zero_stage gives 0"),
    ({"train_micro_batch_size_per_gpu": 4}, r"train_micro_batch_size_per_gpu = 4, but data.batch_size gives 8"),
    ({"gradient_clipping": 0.5}, r"gradient_clipping = 0.5, but train.grad_clip gives 1.0"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled = true, but train.precision \(resolved: fp32\) gives false"),
    ({"optimizer": {"type": "Adam"}}, r"optimizer is set, but .*fastvl builds the optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, r"scheduler is set, but .*fastvl builds the schedule"),
])
def test_keys_fastvl_decides_must_agree(tmp_path, user, message):
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(_config(tmp_path, user), "fp32", 1)


def test_bad_values_stop_at_load(tmp_path):
    with pytest.raises(ConfigError, match="train.deepspeed: cannot read .*missing.json"):
        stand_in_config(tmp_path, f"train.deepspeed={tmp_path / 'missing.json'}")
    with pytest.raises(ConfigError, match=r"train.report_to: unknown destination\(s\) \['wandb'\]"):
        stand_in_config(tmp_path, 'train.report_to=["wandb"]')


def test_deepspeed_reads_the_merged_config(tmp_path):
    cfg = _config(tmp_path, {"zero_optimization": {"reduce_bucket_size": 4096}}, "train.zero_stage=1")
    init_distributed()
    engine = build_engine(cfg, StandInRecipe(cfg), 1, torch.device("cpu"))
    assert engine.ds.zero_optimization_stage() == 1 and engine.ds.zero_reduce_bucket_size() == 4096


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_the_metrics_rows_and_resume_drops_what_came_after(tmp_path):
    overrides = ('train.report_to=["tensorboard"]', "train.steps=6", "train.save_every=2", "train.log_every=1")
    cfg = stand_in_config(tmp_path, *overrides)
    run = tmp_path / "run"
    # the first attempt goes on to step 3 after its last checkpoint (step 2), then a resume from step 2
    train(cfg, build_recipe=StandInRecipe, build_loader=StandInLoader, progress=False, stop_at=3)
    (run / "step_3").rename(run / "step_3_lost")
    (run / "latest").write_text("step_2")
    train(cfg, build_recipe=StandInRecipe, build_loader=StandInLoader, progress=False)
    rows = read_metrics(run / "metrics.jsonl")
    scalars = _scalars(run)
    for name in ("loss", "contrast", "recon", "lr"):
        assert [step for step, _ in scalars[f"train/{name}"]] == [1, 2, 3, 4, 5, 6]
        assert [value for _, value in scalars[f"train/{name}"]] == pytest.approx([r[name] for r in rows], rel=1e-6)


@pytest.mark.parametrize("stage,world,user,warns", [
    (2, 1, None, True), (0, 1, None, False), (2, 2, None, False),
    (2, 1, {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, False),
])
def test_single_process_zero_warns_unless_it_offloads(tmp_path, stage, world, user, warns):
    overrides = [f"train.zero_stage={stage}"] + ([f"train.deepspeed={json.dumps(user)}"] if user else [])
    cfg = stand_in_config(tmp_path, *overrides)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_single_process_zero(cfg, world)
    assert [str(w.message).startswith(f"train.zero_stage={stage} with 1 process") for w in caught] == ([True] if warns else [])


def _gradients_after_backward(engine, batch):
    torch.manual_seed(0)  # the same dropout draw
    engine.ds.zero_grad()
    engine.ds.backward(engine.ds(batch)["loss"])
    return [p.grad.clone() for p in engine.recipe.parameters()]


def test_one_process_without_zero_skips_the_identity_allreduce(tmp_path, monkeypatch):
    init_distributed()
    cfg = stand_in_config(tmp_path, "train.zero_stage=0")
    engine = build_engine(cfg, StandInRecipe(cfg), 1, torch.device("cpu"))
    batch = next(iter(StandInLoader(cfg, "train", 0, 1, 0)))
    calls = []
    flatten = engine.ds.flatten
    monkeypatch.setattr(engine.ds, "flatten", lambda tensors: calls.append(len(tensors)) or flatten(tensors))
    skipped = _gradients_after_backward(engine, batch)
    assert calls == []  # no gradient was flattened into a bucket
    engine.ds.enable_backward_allreduce = True  # DeepSpeed's default: flatten, reduce, copy back
    reduced = _gradients_after_backward(engine, batch)
    assert calls and all(torch.equal(a, b) for a, b in zip(skipped, reduced))
    # a ZeRO stage reduces in the same hook: it keeps it
    staged = stand_in_config(tmp_path, "train.zero_stage=1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the single-process ZeRO warning
        assert build_engine(staged, StandInRecipe(staged), 1, torch.device("cpu")).ds.enable_backward_allreduce

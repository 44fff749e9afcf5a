"""A ZeRO checkpoint written by 2 processes resumes on 1: its optimizer state, partitioned by rank, is
converted to DeepSpeed's universal format next to it and the run continues as a straight 1-process
run with the same global batch would (losses and Adam moments). ZeRO-3, whose universal load does not
continue the same run in DeepSpeed 0.19, is refused."""
import json

import pytest
import torch

from fastvl.config import ConfigError, load_config
from fastvl.train.checkpoint import checkpoint_world_size
from fastvl.train.loop import train

from ..two_ranks import spawn_two_ranks
from .conftest import IMAGE_SIZE, StandInRecipe
from .test_resume_world_size import KeyRecordingLoader, _two_rank_worker

# The reconstruction loss alone, without dropout: a per-sample mean with no random draws, so 2 ranks x 4
# samples and 1 x 8 take the same gradient and the runs can be compared step by step.
SAME_GRADIENT_ON_ANY_WORLD = ["method.losses.contrast=0", "method.options.dropout=0.0"]
# fastvl recipes keep learnable scalars [1]-shaped (methods.base); ds_to_universal cannot merge 0-dim ones.
SCALARS_AS_RECIPES_KEEP_THEM = ["method.options.scalar_shape=[1]"]


def zero_overrides(data, out_dir, *extra):
    return [f"data.train={data / 'train'}", f"train.output_dir={out_dir}", f"data.image_size={IMAGE_SIZE}",
            f"model.image_size={IMAGE_SIZE}", "data.num_workers=0", "data.shuffle_buffer=16", "train.steps=6",
            "train.warmup_steps=2", "train.log_every=1", "train.save_every=0", "train.lr=0.01",
            *SAME_GRADIENT_ON_ANY_WORLD, *SCALARS_AS_RECIPES_KEEP_THEM, *extra]


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as rows:
        return [row["loss"] for row in map(json.loads, rows) if "loss" in row]


def optimizer_state(step_dir):
    """(fp32 master weights, Adam state) of a 1-process ZeRO 1/2 checkpoint: flat tensors in one layout."""
    saved = torch.load(next(step_dir.glob("*zero_pp_rank_0_mp_rank_00_optim_states.pt")), weights_only=False)
    state = saved["optimizer_state_dict"]
    return state["single_partition_of_fp32_groups"], state["base_optimizer_state"]["state"]


@pytest.mark.parametrize("stage, precision, tolerance", [(1, "fp32", 1e-5), (2, "fp32", 1e-5), (2, "bf16", 1e-2)])
def test_zero_checkpoint_of_two_processes_resumes_on_one_through_the_universal_format(
        synth_data, tmp_path, monkeypatch, stage, precision, tolerance):
    straight = tmp_path / "straight"
    train(load_config(None, zero_overrides(synth_data, straight, f"train.zero_stage={stage}", "data.batch_size=8",
                                           f"train.precision={precision}")),
          build_recipe=StandInRecipe, build_loader=KeyRecordingLoader, progress=False)

    moved = tmp_path / "moved"
    monkeypatch.setenv("FASTVL_TEST_OVERRIDES", json.dumps(zero_overrides(
        synth_data, moved, f"train.zero_stage={stage}", "data.batch_size=4", f"train.precision={precision}")))
    assert sorted(spawn_two_ranks(_two_rank_worker, 2)) == [(0, 3), (1, 3)]
    assert checkpoint_world_size(moved / "step_3") == 2
    result = train(load_config(None, zero_overrides(synth_data, moved, f"train.zero_stage={stage}", "data.batch_size=8",
                                                    f"train.precision={precision}")),
                   build_recipe=StandInRecipe, build_loader=KeyRecordingLoader, progress=False)
    assert result.step == 6
    assert (moved / "step_3_universal" / "zero").is_dir()

    assert losses(moved) == pytest.approx(losses(straight), abs=tolerance)
    (weights, moments), (weights_ref, moments_ref) = optimizer_state(moved / "step_6"), optimizer_state(straight / "step_6")
    for flat, flat_ref in zip(weights, weights_ref):
        torch.testing.assert_close(flat, flat_ref, atol=tolerance, rtol=0)
    assert moments.keys() == moments_ref.keys()
    for group in moments:
        assert int(moments[group]["step"]) == int(moments_ref[group]["step"]) == 6
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(moments[group][name], moments_ref[group][name], atol=tolerance, rtol=0)


def test_zero3_checkpoint_on_another_world_size_is_refused(synth_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("FASTVL_TEST_OVERRIDES", json.dumps(zero_overrides(
        synth_data, run, "train.zero_stage=3", "data.batch_size=4", "train.precision=fp32")))
    assert sorted(spawn_two_ranks(_two_rank_worker, 2)) == [(0, 3), (1, 3)]
    with pytest.raises(ConfigError, match=r"step_3 is a train.zero_stage=3 checkpoint of 2 processes and this run "
                                          r"has 1: .*Resume with 2 processes"):
        train(load_config(None, zero_overrides(synth_data, run, "train.zero_stage=3", "data.batch_size=8",
                                               "train.precision=fp32")),
              build_recipe=StandInRecipe, build_loader=KeyRecordingLoader, progress=False)
    assert not (run / "step_3_universal").exists()

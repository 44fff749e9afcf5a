"""bench.bench_cmask_passes runs end to end at toy scale and reports both agent modes: per_span spends
more agent FLOPs than once (one pass per span), and each mode's learned/random reward is their ratio."""
import math

from bench.bench_cmask_passes import main


def test_reports_step_cost_and_reward_of_both_modes(tmp_path, monkeypatch):
    from fastvl.data.synthetic import generate

    generate(tmp_path / "synth", train=16, heldout=4, seed=0, image_size=64, shard_size=16, progress=False)
    monkeypatch.setattr("bench.harness.save_rows", lambda op, rows: None)
    monkeypatch.setattr("bench.bench_cmask_passes.save_rows", lambda op, rows: None)
    monkeypatch.setattr("bench.bench_train_step.save_rows", lambda op, rows: None)
    once, per_span = main(["--set", f"data.train={tmp_path / 'synth' / 'train'}", "data.batch_size=4",
                           "data.num_workers=0", "train.warmup_steps=1", "--steps", "1", "--train-steps", "2"])
    assert (once["provider"], per_span["provider"]) == ("once", "per_span")
    select = "fastvl.masking.curriculum:CurriculumMasking.select"
    assert per_span["gflop_in"][select] > once["gflop_in"][select]
    for row in (once, per_span):
        assert math.isclose(row["reward_learned_over_random"], row["reward"] / row["reward_random"])

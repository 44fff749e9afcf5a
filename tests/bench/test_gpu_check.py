"""The CPU-side parts of bench/gpu_check.py: the refusal without CUDA, argument parsing, the table, the
exit status, the verdicts on a training run's metrics and on kernel errors, and the train and overlap
sections' processes run in fp32 on CPU (the kernel, bench and DALI checks need a GPU)."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.gpu_check import Failed, Row, Skip

REPO = Path(__file__).resolve().parents[2]


def test_refuses_without_cuda_before_any_work():
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2
    assert "needs one NVIDIA GPU" in done.stderr and "Nothing was run" in done.stderr
    assert done.stdout == ""


def test_main_refuses_without_cuda_and_runs_no_section(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "SECTIONS", {name: pytest.fail for name in gpu_check.SECTION_ORDER})
    assert gpu_check.main(["--only", "kernels"]) == 2


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.only == list(gpu_check.SECTION_ORDER) and args.steps == 20 and args.out is None
    args = gpu_check.parse_args(["--only", "train", "kernels", "--steps", "8", "--out", "/tmp/x"])
    assert args.only == ["kernels", "train"]  # always in the documented order
    assert args.steps == 8 and args.out == "/tmp/x"
    for bad in (["--only", "gpu"], ["--steps", "3"], ["--steps", "many"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(bad)
        assert exit_info.value.code == 2


def test_table_lists_every_row_with_its_status_and_counts():
    rows = [Row("kernels: a fp32", "pass", "max rel err out 1.0e-07", 1.25),
            Row("train: epic fp16 20 steps", "FAIL", "loss 5.1 -> 5.3: not falling", 40.0),
            Row("dali: mixed decoder", "skip", "DALI does not import", 0.0)]
    lines = gpu_check.format_table(rows).splitlines()
    cells = [re.split(r"\s{2,}", line) for line in lines[:4]]
    assert cells == [["check", "status", "s", "detail"],
                     ["kernels: a fp32", "pass", "1.2", "max rel err out 1.0e-07"],
                     ["train: epic fp16 20 steps", "FAIL", "40.0", "loss 5.1 -> 5.3: not falling"],
                     ["dali: mixed decoder", "skip", "0.0", "DALI does not import"]]
    assert len({line.index(status) for line, status in zip(lines, ("status", "pass", "FAIL", "skip"))}) == 1
    assert lines[-1] == "1 pass, 1 FAIL, 1 skip"


def test_run_row_turns_outcomes_into_statuses():
    def fail():
        raise Failed("numbers")

    def skip():
        raise Skip("why")

    def crash():
        raise RuntimeError("CUDA error: an illegal memory access\nmore")

    assert [(r.status, r.detail) for r in (gpu_check.run_row("a", lambda: "ok"), gpu_check.run_row("b", fail),
                                           gpu_check.run_row("c", skip), gpu_check.run_row("d", crash))] == [
        ("pass", "ok"), ("FAIL", "numbers"), ("skip", "why"), ("FAIL", "RuntimeError: CUDA error: an illegal memory access")]


@pytest.mark.parametrize("statuses, code", [(["pass", "skip"], 0), (["pass", "FAIL", "skip"], 1), ([], 0)])
def test_a_failing_row_makes_the_exit_status_nonzero(monkeypatch, capsys, statuses, code):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")
    rows = [Row(f"row {i}", status) for i, status in enumerate(statuses)]
    monkeypatch.setattr(gpu_check, "SECTIONS", {name: (lambda ctx: rows) if name == "kernels" else pytest.fail
                                                for name in gpu_check.SECTION_ORDER})
    assert gpu_check.main(["--only", "kernels"]) == code
    assert "Stand-in GPU" in capsys.readouterr().out


def test_a_section_that_raises_is_a_failed_row(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Stand-in GPU")

    def broken(ctx):
        raise ImportError("no module named triton")

    monkeypatch.setattr(gpu_check, "SECTIONS", {**gpu_check.SECTIONS, "bench": broken})
    assert gpu_check.main(["--only", "bench"]) == 1
    assert "bench  FAIL" in capsys.readouterr().out


def metrics(losses, scales=None):
    return [{"step": i + 1, "loss": loss, **({} if scales is None else {"loss_scale": scales[i]})}
            for i, loss in enumerate(losses)]


def test_training_verdicts():
    falling = [6.0, 5.8, 5.9, 5.5, 5.2, 5.0, 4.9, 4.8]
    assert gpu_check.judge_training(metrics(falling), "bf16") == "loss 5.900 -> 4.850 (8 steps)"
    assert "loss scale 8192" in gpu_check.judge_training(metrics(falling, [65536.0] * 7 + [8192.0]), "fp16")
    with pytest.raises(Failed, match="not falling"):
        gpu_check.judge_training(metrics(falling[::-1]), "bf16")
    with pytest.raises(Failed, match="non-finite loss at step 3"):
        gpu_check.judge_training(metrics(falling[:2] + [math.nan] + falling[3:]), "bf16")
    with pytest.raises(Failed, match="loss scale collapsed"):
        gpu_check.judge_training(metrics(falling, [65536.0] * 7 + [1.0]), "fp16")
    with pytest.raises(Failed, match="only 3 metrics rows"):
        gpu_check.judge_training(metrics(falling[:3]), "bf16")


def test_relative_errors_scale_by_the_reference():
    want = torch.tensor([100.0, -50.0, 0.0])
    assert gpu_check.relative_errors({"out": (want + 0.001, want)}, 1e-4).startswith("max rel err out 1.0e-05")
    with pytest.raises(Failed, match="out 1.0e-02"):
        gpu_check.relative_errors({"out": (want + 1.0, want)}, 1e-4)
    with pytest.raises(Failed, match="nan"):
        gpu_check.relative_errors({"out": (torch.full((3,), math.nan), want)}, 1e-4)


def test_train_and_overlap_sections_run_their_commands_on_cpu(tmp_path):
    """The processes the train and overlap sections start (``fastvl.cli train``, ``bench.bench_train_step``)
    and the parsing of what they write, run here in fp32 on CPU: only the precision differs on a GPU."""
    ctx = gpu_check.Context(gpu_check.parse_args(["--steps", "8", "--data", str(tmp_path / "none"),
                                                  "--out", str(tmp_path)]))
    with pytest.raises(Skip, match="albef fp32 run"):
        gpu_check.train_method(ctx, "epic", "fp32")  # its saliency teacher has not run yet
    for method in ("albef", "epic"):
        detail = gpu_check.train_method(ctx, method, "fp32")
        assert re.fullmatch(r"loss \d+\.\d{3} -> \d+\.\d{3} \(8 steps\)", detail), detail
    assert ctx.data() == tmp_path / "synth"  # generated, as --data held no shards
    ctx.args.steps = 2
    detail = gpu_check.check_overlap(ctx)
    assert re.fullmatch(r"step \d+\.\d ms with random masks, \d+\.\d ms with the agent: \d+\.\d\dx "
                        r"\(95% CI \d+\.\d\d-\d+\.\d\d\)", detail), detail

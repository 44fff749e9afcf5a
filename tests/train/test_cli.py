"""Entry points: ``python -m fastvl.train`` (1 process, sets up its own process group), the ``fastvl``
command's subcommands, and bad input — each stops at start-up with one message and exit code 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastvl import cli
from fastvl.train.__main__ import main as train_main

from .conftest import StandInLoader, StandInRecipe, stand_in_config, tiny_overrides
from .test_distributed import clean_env

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny_albef.json"


def test_python_m_fastvl_train_runs_one_process(synth_data, tmp_path):
    overrides = tiny_overrides(synth_data, tmp_path / "run", "train.steps=2")
    done = subprocess.run([sys.executable, "-m", "fastvl.train", "--config", str(TINY), "--set", *overrides],
                          cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint: {tmp_path / 'run' / 'step_2'}" in done.stdout
    assert f"metrics:    {tmp_path / 'run' / 'metrics.jsonl'}" in done.stdout
    assert f"plot:       {tmp_path / 'run' / 'loss.png'}" in done.stdout
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 1


def test_bad_config_file_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"stepz": 3}}))
    done = subprocess.run([sys.executable, "-m", "fastvl.train", "--config", str(bad)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m fastvl.train: error: unknown config key 'train.stepz'")


def _stand_in_main(tmp_path, *overrides):
    cfg = stand_in_config(tmp_path)  # the defaults the stand-ins need, as --set arguments
    base = [f"data.train={cfg.data.train}", f"train.output_dir={cfg.train.output_dir}", "data.batch_size=8",
            "train.steps=2", "train.precision=fp32"]
    return train_main(["--set", *base, *overrides], prog="fastvl train", build_recipe=StandInRecipe,
                      build_loader=StandInLoader)


@pytest.mark.parametrize("overrides,message", [
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["data.batch_size=\"8\""], "data.batch_size must be an integer, got str '8'"),
    (["train.lr=fast"], "train.lr must be a number, got str 'fast'"),
    (["data.train=/no/such/folder"], "data.train: path not found: /no/such/folder"),
    (["train.precision=fp16"], "train.precision=fp16 needs a CUDA GPU"),
    (["train.zero_stage=3"], "train.zero_stage=3 cannot partition the 0-dim parameter(s) scale"),
])
def test_bad_input_stops_at_start_up_with_one_message(tmp_path, capsys, overrides, message):
    assert _stand_in_main(tmp_path, *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastvl train: error: ") and message in err[-1], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained


def test_empty_dataset_stops_at_start_up(tmp_path, capsys):
    import tarfile

    empty = tmp_path / "empty"
    empty.mkdir()
    tarfile.open(empty / "shard-000000.tar", "w").close()
    code = train_main(["--config", str(TINY), "--set", f"data.train={empty}", f"train.output_dir={tmp_path / 'run'}"],
                      prog="fastvl train")
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastvl train: error: data.train:") and "empty dataset" in err[-1], err


def test_fastvl_command_routes_plot_and_data(tmp_path, capsys):
    result_dir = tmp_path / "run"
    from fastvl.train.loop import train

    train(stand_in_config(tmp_path, "train.steps=3"), build_recipe=StandInRecipe, build_loader=StandInLoader,
          progress=False)
    (result_dir / "loss.png").unlink()
    assert cli.main(["plot", str(result_dir)]) == 0
    assert (result_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2
    # two runs on shared panels
    other = tmp_path / "other"
    other.mkdir()
    train(stand_in_config(other, "train.steps=3", "train.lr=0.001"), build_recipe=StandInRecipe,
          build_loader=StandInLoader, progress=False)
    assert cli.main(["plot", str(result_dir), str(other / "run")]) == 0
    assert (result_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["plot", str(result_dir), str(tmp_path / "nothing")]) == 2

    assert cli.main(["data", "synth", "--out", str(tmp_path / "synth"), "--train", "3", "--heldout", "2", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "synth").iterdir()) == ["heldout", "info.json", "train"]
    assert cli.main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err

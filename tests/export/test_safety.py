"""Nothing a user downloads is unpickled: checkpoints whose pickle would run code (an object whose
``__reduce__`` writes a marker file) are refused by ``fastvl eval`` (exit 2) and ``fastvl.load``
(ConfigError), and the marker never appears. Old model_fp32.pt files still load (weights-only)."""
import io
import pickle

import pytest
import torch

import fastvl
from fastvl import cli
from fastvl.config import ConfigError
from fastvl.train.checkpoint import CONSOLIDATED, LEGACY_CONSOLIDATED, load_recipe, write_weights
from tests.methods.conftest import build_recipe

from .conftest import TINY_ALBEF


class Payload:
    """Unpickling this creates ``marker`` (stands for any code an attacker would run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.fixture(scope="module")
def albef():
    return build_recipe(TINY_ALBEF, seed=2)


def pickled_checkpoint(recipe, marker) -> dict:
    return {"config": recipe.cfg.to_dict(), "step": 1, "state_dict": recipe.state_dict(), "note": Payload(marker)}


def test_the_payload_runs_when_unpickled(albef, tmp_path):
    """Control: the crafted file really executes code under a plain unpickle."""
    path = tmp_path / "evil.pt"
    torch.save(pickled_checkpoint(albef, tmp_path / "control"), path)
    torch.load(path, weights_only=False)
    assert (tmp_path / "control").exists()


def evil_file(albef, tmp_path, marker):
    path = tmp_path / "evil.pt"
    torch.save(pickled_checkpoint(albef, marker), path)
    return path


def evil_run_dir(albef, tmp_path, marker):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(pickled_checkpoint(albef, marker), run / LEGACY_CONSOLIDATED)
    return run


def evil_step_folder(albef, tmp_path, marker):
    step = tmp_path / "run" / "step_3"
    step.mkdir(parents=True)
    states = {"module": albef.state_dict(), "ds_config": {}, "config": albef.cfg.to_dict(), "args": Payload(marker)}
    torch.save(states, step / "mp_rank_00_model_states.pt")
    return step


def evil_extra_state(_, tmp_path, marker):
    """A safetensors file is tensors only, but C-Mask's agent state is a serialized tensor inside it."""
    recipe = build_recipe("configs/tiny_cmask.json")
    state = recipe.state_dict()
    (key,) = [k for k in state if k.endswith("_extra_state")]
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    state[key] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    path = tmp_path / CONSOLIDATED
    write_weights(path, state, recipe.cfg.to_dict(), 1)
    return path


CRAFTED = [evil_file, evil_run_dir, evil_step_folder, evil_extra_state]


@pytest.mark.parametrize("craft", CRAFTED, ids=lambda f: f.__name__)
def test_eval_refuses_code_executing_pickles(craft, albef, tmp_path, capsys):
    marker = tmp_path / "pwned"
    checkpoint = craft(albef, tmp_path, marker)
    assert cli.main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "refused to read" in err and "never unpickles" in err
    assert not marker.exists()


@pytest.mark.parametrize("craft", CRAFTED, ids=lambda f: f.__name__)
def test_load_refuses_code_executing_pickles(craft, albef, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = craft(albef, tmp_path, marker)
    with pytest.raises(ConfigError, match="refused to read"):
        fastvl.load(checkpoint)
    assert not marker.exists()


def test_old_pickled_weights_still_load(albef, tmp_path):
    """model_fp32.pt as the trainer wrote it before safetensors (config a plain dict) reads weights-only."""
    path = tmp_path / LEGACY_CONSOLIDATED
    torch.save({"config": albef.cfg.to_dict(), "step": 7, "state_dict": albef.state_dict()}, path)
    recipe, cfg, step = load_recipe(str(tmp_path))
    assert step == 7 and cfg == albef.cfg
    for name, value in albef.state_dict().items():
        assert torch.equal(recipe.state_dict()[name], value), name


def test_a_non_checkpoint_file_is_named(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        fastvl.load(path)

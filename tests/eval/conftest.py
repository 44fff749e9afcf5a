"""Eval tests reuse the trainer tests' built-in toy dataset and train one tiny run per session."""
import pytest

from tests.train.conftest import synth_data, tiny_overrides  # noqa: F401  (fixture re-export)

from pathlib import Path

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_albef.json"


@pytest.fixture(scope="session")
def tiny_run(synth_data, tmp_path_factory):  # noqa: F811
    """A 4-step tiny ALBEF run (checkpoints at steps 2 and 4, consolidated fp32 weights)."""
    from fastvl.config import load_config
    from fastvl.train.loop import train

    out = tmp_path_factory.mktemp("tiny_run")
    train(load_config(str(TINY), tiny_overrides(synth_data, out, "train.steps=4", "train.save_every=2")), progress=False)
    return out

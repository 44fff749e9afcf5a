"""THE FOUNDATION'S KEY TEST: 30 optimizer steps of the tiny ALBEF baseline on the built-in data, through
the whole stack (synthetic shards -> loader -> ALBEF recipe -> DeepSpeed engine -> metrics.jsonl),
lower every loss: mean of the last 5 logged steps < mean of the first 5, for the total and for ITC,
ITM and MLM each."""
import math
from pathlib import Path

from fastvl.config import load_config
from fastvl.train.loop import train
from fastvl.train.metrics import read_metrics

from .conftest import tiny_overrides

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny_albef.json"


def test_foundation_30_steps_of_tiny_albef_lower_every_loss(synth_data, tmp_path):
    cfg = load_config(str(TINY), tiny_overrides(synth_data, tmp_path, "train.steps=30", "data.batch_size=16",
                                                "train.warmup_steps=5"))
    result = train(cfg, progress=False)
    rows = read_metrics(result.metrics)
    assert [r["step"] for r in rows] == list(range(1, 31))
    for name in ("loss", "itc", "itm", "mlm"):
        values = [r[name] for r in rows]
        assert all(math.isfinite(v) for v in values), name
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert last < first, f"{name}: first 5 steps {first:.4f}, last 5 steps {last:.4f}"

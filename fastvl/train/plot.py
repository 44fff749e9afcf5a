"""``fastvl plot RUN_DIR``: a PNG of a run's loss curves (and LR / other recipe metrics).

Panels against the step: the total loss; every named loss of the recipe (log scale, so a 0.6 ITM
loss and a 10 MLM loss both show their trend); the learning rate; one panel per other metric the
recipe logs (temperature, ...). The loss names come from
``RUN_DIR/run.json`` (written by the trainer); without it every non-bookkeeping column whose name
is "loss" or one of the usual loss names is treated as a loss.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..config import ConfigError
from .metrics import BOOKKEEPING, read_metrics


def _loss_names(run_dir: Path, columns: list[str]) -> list[str]:
    info = run_dir / "run.json"
    if info.is_file():
        names = json.loads(info.read_text()).get("loss_names", [])
        return ["loss"] + [n for n in names if n in columns and n != "loss"]
    return [c for c in columns if c == "loss" or c.startswith("loss") or c in ("itc", "itm", "mlm")]


def plot_run(run_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Write the PNG (default ``RUN_DIR/loss.png``) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"no metrics.jsonl in {run_dir}")
    rows = read_metrics(metrics)
    if not rows:
        raise ConfigError(f"{metrics} has no rows yet")
    columns = [c for c in rows[-1] if c not in BOOKKEEPING and isinstance(rows[-1][c], (int, float))]
    losses = _loss_names(run_dir, columns)
    others = [c for c in columns if c not in losses]
    steps = [r["step"] for r in rows]

    parts = [n for n in losses if n != "loss"]
    panels = [("loss", ["loss"])] + ([("losses (log)", parts)] if parts else []) + [("lr", ["lr"])]
    panels += [(name, [name]) for name in others]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.0 + 2.0 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, (label, names) in zip(axes, panels):
        for name in names:
            ax.plot(steps, [r.get(name, float("nan")) for r in rows], label=name)
        ax.set_ylabel(label)
        if len(names) > 1:
            ax.set_yscale("log")
            ax.legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"{run_dir.name}: {', '.join(losses)}")
    axes[-1].set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvl plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a training output directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="PNG path (default RUN_DIR/loss.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except ConfigError as error:
        print(f"fastvl plot: error: {error}", file=sys.stderr)
        return 2
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``fastvl plot RUN_DIR [RUN_DIR ...]``: a PNG of runs' loss curves (and LR / other recipe metrics).

One panel per column against the step: the total loss, every named loss of the recipe, the learning
rate, then every other metric the recipe logs (temperature, ...); several runs share the panels, one
line each, so a change (pretrained init, a recipe option) reads off one picture. The loss names come
from ``RUN_DIR/run.json`` (written by the trainer); without it every non-bookkeeping column whose name
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


def _read_run(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"no metrics.jsonl in {run_dir}")
    rows = read_metrics(metrics)
    if not rows:
        raise ConfigError(f"{metrics} has no rows yet")
    return rows


def plot_run(run_dirs, out: Optional[str | Path] = None) -> Path:
    """Write the PNG of one run (a path) or several (a list; default ``out``: the first run's
    ``loss.png``, or ``compare.png`` for several) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(r) for r in run_dirs]
    runs = {run_dir: _read_run(run_dir) for run_dir in run_dirs}
    panels: list[str] = []
    for run_dir, rows in runs.items():
        columns = [c for c in rows[-1] if c not in BOOKKEEPING and isinstance(rows[-1][c], (int, float))]
        losses = _loss_names(run_dir, columns)
        for name in losses + ["lr"] + [c for c in columns if c not in losses]:
            if name not in panels:
                panels.append(name)

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 1.0 + 1.8 * len(panels)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, name in zip(axes, panels):
        for run_dir, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r.get(name, float("nan")) for r in rows], label=run_dir.name)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title(" vs ".join(run_dir.name for run_dir in runs))
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    default = run_dirs[0] / ("loss.png" if len(run_dirs) == 1 else "compare.png")
    out = Path(out) if out is not None else default
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvl plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir",
                        help="training output directories (each holds metrics.jsonl); several share the panels")
    parser.add_argument("--out", default=None,
                        help="PNG path (default RUN_DIR/loss.png; with several runs the first's compare.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dirs, args.out)
    except ConfigError as error:
        print(f"fastvl plot: error: {error}", file=sys.stderr)
        return 2
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastvl.train --config configs/x.json [--set section.field=value ...]`` (one process), or
``deepspeed --num_gpus N --module fastvl.train --config ...`` (N processes; the launcher's
``--local_rank`` is accepted and ignored, the rank comes from the environment)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..config import ConfigError, load_config


def build_parser(prog: str = "python -m fastvl.train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Pretrain a fastvl recipe through DeepSpeed.")
    parser.add_argument("--config", default=None, help="JSON config (configs/*.json); defaults apply without it")
    parser.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set train.steps=50 data.batch_size=8 (value parsed as JSON)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[list[str]] = None, prog: str = "python -m fastvl.train", **train_kwargs) -> int:
    """Parse, train, report; a config problem is one line on stderr and exit code 2.
    ``train_kwargs`` go to ``fastvl.train.loop.train`` (tests pass their own loaders)."""
    args = build_parser(prog).parse_args(argv)
    overrides = [item for group in args.overrides for item in group]
    try:
        cfg = load_config(args.config, overrides)
        from .loop import train

        train(cfg, **train_kwargs)
    except ConfigError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def close_process_group() -> None:
    """End of a training process: tear the process group down (not done by ``main`` itself, so
    tests can call it repeatedly in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    code = main()
    close_process_group()
    sys.exit(code)

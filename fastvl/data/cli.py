"""``fastvl data <command>``: data tools.

  synth     write the built-in rendered-scene dataset (train + held-out splits) as tar shards
  convert   a folder of images + a captions file (CSV, JSONL or ALBEF-style JSON) -> checked tar shards
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from . import convert, synthetic


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastvl data", description="data tools")
    commands = parser.add_subparsers(dest="command", required=True)
    synthetic.build_parser(commands.add_parser("synth", help="generate the built-in rendered-scene dataset",
                                               description=synthetic.__doc__.split("\n\n")[0]))
    convert.build_parser(commands.add_parser("convert", help="folder of images + captions CSV/JSONL/JSON -> shards",
                                             description=convert.__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    if args.command == "synth":
        return synthetic.run(args)
    if args.command == "convert":
        return convert.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

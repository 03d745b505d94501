"""The embedded default model: a small Qwen2-VL captioner shipped inside the package.

It was trained here on generated pictures and clips of coloured shapes (see its model
card, ``assets/default_model/README.md``, and ``training/`` in the repository), so
``make demo`` and ``mmengine serve`` work on a machine that cannot reach a model hub.
"""

from __future__ import annotations

from pathlib import Path


def default_model_path() -> str:
    """The folder of the embedded default checkpoint (HF hub layout), as a string.

    The folder ships as package data, so this holds for editable and wheel installs.
    """
    return str(Path(__file__).resolve().parent / "assets" / "default_model")

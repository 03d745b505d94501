"""Read a checkpoint's image / video processor settings in either file layout.

Hub repositories ship preprocessor_config.json (image) and, for newer Qwen models,
video_preprocessor_config.json; transformers 5 nests both inside processor_config.json
and writes no standalone files. As in transformers, the nested entry wins, then the
standalone file; a video processor without its own settings falls back to the image
processor's file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ProcessorConfigs:
    """The processor settings found in one checkpoint folder."""

    image: dict[str, Any] | None  # image processor settings, if any
    video: dict[str, Any] | None  # video processor settings, if the checkpoint has its own
    processor: dict[str, Any] = field(default_factory=dict)  # top-level processor_config.json


def _load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else None


def read_processor_configs(model_dir: str | Path) -> ProcessorConfigs:
    """Read image / video processor settings from a local checkpoint folder.

    Args:
        model_dir: Folder holding processor_config.json and/or the standalone files.

    Returns:
        The settings; `video` is None when the checkpoint has no video settings of its
        own (Qwen2VLPreprocessor.from_config then reuses the image settings, as HF does).
    """
    folder = Path(model_dir)
    processor = _load(folder / "processor_config.json") or {}
    image = processor.get("image_processor") or _load(folder / "preprocessor_config.json")
    video = processor.get("video_processor") or _load(folder / "video_preprocessor_config.json")
    top = {k: v for k, v in processor.items() if k not in ("image_processor", "video_processor")}
    return ProcessorConfigs(image=image, video=video, processor=top)

"""mmengine: a multimodal (vision-language) LLM inference engine."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmengine.llm import LLM
    from mmengine.outputs import CompletionOutput, Logprob, RequestOutput
    from mmengine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]
__version__ = "0.1.0"

# Imported on first use: `import mmengine.scheduler` or `mmengine --help` need not load
# torch, transformers and the engine (seconds of start-up).
_LAZY = {
    "LLM": "mmengine.llm",
    "SamplingParams": "mmengine.sampling_params",
    "RequestOutput": "mmengine.outputs",
    "CompletionOutput": "mmengine.outputs",
    "Logprob": "mmengine.outputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmengine' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

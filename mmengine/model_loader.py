"""Find a checkpoint, read its config (either layout) and stream its safetensors weights."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mmengine.config import ModelSpec

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# Text decoders this engine runs, by the text config's model_type.
SUPPORTED_TEXT_MODELS = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen2_vl_text",  # transformers-5 names of the Qwen2-VL family's text config
    "qwen2_5_vl_text",
)
_QWEN2_FAMILY = ("qwen2", "qwen2_vl", "qwen2_5_vl", "qwen2_vl_text", "qwen2_5_vl_text")


def resolve_model_path(model: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id looked up in the local HF cache (then the hub)."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a HuggingFace checkpoint")
        return path
    if path.exists() or model.startswith((".", "/")):
        raise FileNotFoundError(f"model path {model!r} is not a checkpoint folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface_hub comes with transformers
        raise FileNotFoundError(f"{model!r} is not a local folder") from e
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    try:
        return Path(
            snapshot_download(
                model, revision=revision, allow_patterns=patterns, local_files_only=True
            )
        )
    except Exception:
        if offline:
            raise FileNotFoundError(
                f"model {model!r} is neither a local folder nor in the HF cache "
                "(HF_HUB_OFFLINE is set, so it was not downloaded)"
            ) from None
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"could not find model {model!r} locally or download it from the hub: {e}"
        ) from None


def read_config(path: Path) -> dict[str, Any]:
    with open(path / "config.json") as f:
        return json.load(f)


def text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields from the flat hub layout or the nested transformers-5 one."""
    merged = dict(cfg)
    nested = cfg.get("text_config")
    if isinstance(nested, dict):
        merged.update(nested)
    return merged


def _rope_params(tc: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = tc.get("rope_parameters") if isinstance(tc.get("rope_parameters"), dict) else None
    scaling = tc.get("rope_scaling") if isinstance(tc.get("rope_scaling"), dict) else None
    theta = tc.get("rope_theta") or (params or {}).get("rope_theta") or 10000.0
    merged: dict[str, Any] = {}
    if params:
        merged.update({k: v for k, v in params.items() if k != "rope_theta"})
    if scaling:
        merged.update(scaling)
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    return float(theta), (merged or None)


def _eos_ids(path: Path, cfg: dict[str, Any], tc: dict[str, Any]) -> list[int]:
    ids: list[int] = []

    def add(v: Any) -> None:
        if isinstance(v, int):
            ids.append(v)
        elif isinstance(v, list):
            ids.extend(int(x) for x in v)

    gen = path / "generation_config.json"
    if gen.is_file():
        with open(gen) as f:
            add(json.load(f).get("eos_token_id"))
    if not ids:
        add(tc.get("eos_token_id"))
        add(cfg.get("eos_token_id"))
    return sorted(set(ids))


def load_model_spec(path: Path) -> ModelSpec:
    """Normalize config.json into the decoder's shape."""
    cfg = read_config(path)
    tc = text_config(cfg)
    model_type = cfg.get("model_type", "")
    text_type = tc.get("model_type", model_type) if "text_config" in cfg else model_type
    if text_type not in SUPPORTED_TEXT_MODELS:
        raise ValueError(
            f"model_type {text_type!r} is not supported (supported: {', '.join(SUPPORTED_TEXT_MODELS)})"
        )
    archs = cfg.get("architectures") or [""]
    num_heads = int(tc["num_attention_heads"])
    hidden = int(tc["hidden_size"])
    theta, scaling = _rope_params(tc)
    mrope = None
    if scaling and "mrope_section" in scaling:
        mrope = [int(x) for x in scaling["mrope_section"]]
    tie = cfg.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or tc.get("torch_dtype") or "float32")
    return ModelSpec(
        architecture=archs[0],
        model_type=model_type,
        text_model_type=text_type,
        hidden_size=hidden,
        num_layers=int(tc["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(tc.get("num_key_value_heads") or num_heads),
        head_dim=int(tc.get("head_dim") or hidden // num_heads),
        intermediate_size=int(tc["intermediate_size"]),
        vocab_size=int(tc["vocab_size"]),
        rms_norm_eps=float(tc.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(tc.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(tie),
        qkv_bias=text_type in _QWEN2_FAMILY or bool(tc.get("attention_bias")),
        qk_norm=text_type == "qwen3",
        mrope_section=mrope,
        rope_scaling=scaling,
        eos_token_ids=_eos_ids(path, cfg, tc),
        dtype=dtype,
        hf_config=cfg,
        sliding_window=_sliding_window(tc),
    )


def _sliding_window(tc: dict[str, Any]) -> int | None:
    """The attention window if some layers attend only to their last N keys (Mistral-7B
    v0.1: 4096), else None. Qwen2-style configs name a window but use it only with
    ``use_sliding_window``; transformers 5 may list ``layer_types`` instead."""
    window = tc.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None
    layer_types = tc.get("layer_types")
    if isinstance(layer_types, list):
        return window if "sliding_attention" in layer_types else None
    if "use_sliding_window" in tc:
        return window if tc["use_sliding_window"] else None
    return window


def resolve_dtype(requested: str, spec: ModelSpec, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return _DTYPES[requested]
    dtype = _DTYPES.get(spec.dtype, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32  # fp16 matmuls on CPU are slow and lossy
    return dtype


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


class LazyWeights(Mapping[str, torch.Tensor]):
    """Checkpoint tensors by name, read from their safetensors file on access."""

    def __init__(self, path: Path) -> None:
        self._where: dict[str, Path] = {}
        for file in safetensors_files(path):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    self._where[name] = file

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor in the checkpoint, one file at a time."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, f.get_tensor(name)


# Prefixes under which checkpoints store the language model, longest first. Hub Qwen2-VL
# uses "model."; transformers-5 VLMs "model.language_model."; hub LLaVA
# "language_model.model." and "language_model.lm_head.".
_LM_PREFIXES = (
    ("model.language_model.", ""),
    ("language_model.model.", ""),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", ""),
    ("model.", ""),
    ("lm_head.", "lm_head."),
)


def llm_weight_name(name: str) -> str | None:
    """Map a checkpoint tensor name to the decoder's (``layers.0.mlp...``), or None."""
    if name.startswith(("visual.", "model.visual.", "vision_tower.", "model.vision_tower.")):
        return None
    if "multi_modal_projector." in name:
        return None
    for prefix, repl in _LM_PREFIXES:
        if name.startswith(prefix):
            return repl + name[len(prefix) :]
    return None

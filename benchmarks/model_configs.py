"""Published configs of real models, for benchmarks with random weights (no download)."""

from __future__ import annotations

import json
from pathlib import Path

# Qwen2.5-VL-3B-Instruct's text model (BENCHMARKS.md), as a plain Qwen2 decoder: the W1
# text shape runs on it.
QWEN25_3B_TEXT = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 2048,
    "intermediate_size": 11008,
    "num_hidden_layers": 36,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "use_sliding_window": False,
}

CONFIGS = {"qwen2.5-3b": QWEN25_3B_TEXT}


def write_config_dir(name: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIGS[name], indent=1))
    return out


def num_params(cfg: dict) -> int:
    h, i, l_, v = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")
    )
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    per_layer = h * (h + 2 * kv) + (h + 2 * kv) + h * h + 3 * h * i + 2 * h
    return l_ * per_layer + v * h * (1 if cfg["tie_word_embeddings"] else 2) + h

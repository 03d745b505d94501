"""Engine configuration: what the user chooses, and what is derived from the checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

# EngineConfig.extra: switches of the GPU path, mostly for A/B benchmarks (`--extra
# KEY=VALUE` on the command line). Unknown keys and values of the wrong kind are refused,
# so a typo cannot go unnoticed; EngineConfig stores each value in its kind.
GEMV_MAX_ROWS = 8  # mmkernels/gemv.MAX_ROWS (not imported here: that would load Triton)


@dataclass(frozen=True)
class ExtraOption:
    kind: type  # bool, int or str
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None  # the allowed values, if not any of the kind


EXTRA_OPTIONS: dict[str, ExtraOption] = {
    "torch_compile": ExtraOption(bool, True, "GPU: torch.compile the decoder layers"),
    "compile_whole_model": ExtraOption(
        bool,
        True,
        "GPU, with torch_compile: compile all decoder layers as one graph (one compiled call "
        "a step) instead of each layer as its own call",
    ),
    "norm_triton_op": ExtraOption(
        bool,
        True,
        "GPU, with torch_compile: the residual add + RMSNorm as a triton_op that the compiled "
        "code launches itself (less host time per step launched from the host; off: an "
        "opaque custom op)",
    ),
    "cuda_graphs": ExtraOption(bool, True, "GPU: replay decode steps as CUDA graphs"),
    "mixed_graph_max_tokens": ExtraOption(
        int,
        1024,
        "GPU, with cuda_graphs: steps that carry prompt chunks (text only) and at most this "
        "many tokens in all replay CUDA graphs captured at bucketed token counts, instead "
        "of being launched kernel by kernel from the host (0: never)",
        (0, 16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048),
    ),
    "mixed_graph_multimodal": ExtraOption(
        bool,
        False,
        "GPU, with mixed_graph_max_tokens > 0, vision-language models: steps with image or "
        "video rows replay the mixed-step graphs too (correct on GPU, but no serving gain "
        "measured: session 18, benchmarks/RESULTS.md W2)",
    ),
    # Default 1: at one row a Qwen2.5-3B decode step on an H200 ran 8% faster (CUDA graph
    # 2.73 -> 2.51 ms). At 2-8 rows the tensor-core tiles beat cuBLAS on three of four
    # projections alone, but their fused RMSNorm costs 4-10 us a projection, and the decode
    # graphs were slower with them (B=2 / 4 / 8: 2.784 / 2.830 / 2.943 ms vs cuBLAS 2.597 /
    # 2.677 / 2.771, H200, session 11, benchmarks/ab_decode_graphs.py).
    "gemv_max_tokens": ExtraOption(
        int,
        1,
        "GPU: steps of at most this many tokens run each decoder layer as fused "
        "skinny-matmul launches (0 turns it off)",
        tuple(range(GEMV_MAX_ROWS + 1)),
    ),
    "gemv_rope": ExtraOption(
        bool,
        True,
        "GPU, with gemv_max_tokens > 0: rotary and the K/V-cache write run in the QKV "
        "projection's launch",
    ),
    "gemv_norm_out": ExtraOption(
        bool,
        False,
        "GPU, with gemv_max_tokens > 0: o_proj's launch also writes gate_up's RMSNorm input "
        "(its last program normalizes the rows), so gate_up runs without a fused norm "
        "(A/B option; not yet timed in the engine)",
    ),
    "mlp_flow": ExtraOption(
        bool,
        False,
        "GPU, one-token steps on the gemv path: o_proj, the post-attention norm, gate_up "
        "and down as one dataflow launch (mmkernels/mlp_flow.py; experimental, not yet "
        "timed in the engine)",
    ),
    "kernel_warmup": ExtraOption(
        bool,
        True,
        "GPU: at start-up, compile every attention and sampling kernel variant a step can "
        "reach, so that none compiles mid-run (off: faster first start, stalls later)",
    ),
    "compile_encoder": ExtraOption(bool, True, "GPU: torch.compile the vision encoder"),
    "vision_segment_kernel": ExtraOption(
        bool, False, "vision window attention through the Triton segment kernel"
    ),
    "load_format": ExtraOption(
        str,
        "auto",
        "'dummy': random weights of the checkpoint's shapes, nothing read (benchmarks)",
        ("auto", "dummy"),
    ),
}
_TRUE, _FALSE = ("true", "1", "on", "yes"), ("false", "0", "off", "no")


def parse_extra_value(key: str, value: Any) -> Any:
    """`value` of EngineConfig.extra[key] in its option's kind; ValueError naming the key
    and what it takes otherwise. Booleans also take 0/1 and true/false/on/off/yes/no."""
    opt = EXTRA_OPTIONS.get(key)
    if opt is None:
        raise ValueError(f"unknown extra option {key!r}; known: {', '.join(sorted(EXTRA_OPTIONS))}")
    parsed: Any = None
    if opt.kind is bool:
        text = str(value).strip().lower() if isinstance(value, (bool, int, str)) else None
        parsed = True if text in _TRUE else False if text in _FALSE else None
        what = "true or false (also 1/0, on/off, yes/no)"
    elif opt.kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            parsed = value
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            parsed = int(value)
        what = "an integer"
    else:
        parsed = value if isinstance(value, str) else None
        what = "a string"
    if parsed is not None and opt.choices is not None and parsed not in opt.choices:
        parsed = None
        what = "one of " + ", ".join(str(c) for c in opt.choices)
    if parsed is None:
        raise ValueError(f"extra option {key} takes {what}; got {value!r}")
    return parsed


@dataclass
class EngineConfig:
    """Every engine option; ``LLM(...)`` keyword arguments and CLI flags map onto these."""

    model: str  # local checkpoint folder or HF hub id (resolved in the local HF cache)
    tokenizer: str | None = None  # defaults to ``model``
    dtype: str = "auto"  # "auto" (from the config), "float32", "bfloat16", "float16"
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:N"
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    block_size: int = 16  # tokens per KV block
    num_kv_blocks: int | None = None  # KV pool size; default: sized from memory
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory the engine may use
    cpu_kv_cache_gib: float = 1.0  # KV pool budget on CPU when num_kv_blocks is unset
    max_num_seqs: int = 256  # running requests per step
    max_num_batched_tokens: int | None = None  # LLM tokens per step (default by device)
    enable_prefix_caching: bool = True
    max_num_encoder_tokens: int = 16384  # vision-encoder output rows per step
    encoder_store_mib: int = 1024  # embeddings awaiting prefill, held in the engine
    mm_embedding_cache_gib: float = 2.0  # LRU cache of encoder outputs by content hash
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 16, "video": 2})
    num_input_workers: int = 1  # input-processing processes (0: in a frontend thread)
    seed: int = 0  # seed of unseeded sampling
    enforce_eager: bool = False  # GPU: no CUDA graphs, no torch.compile
    # Plan and launch step N+1 before waiting for step N's tokens (None: on for GPUs, off
    # on CPU, where nothing runs concurrently with the host anyway).
    async_scheduling: bool | None = None
    # Engine core in its own process (False: in-process, to debug). None: True, unless the
    # environment variable MMENGINE_MULTIPROCESS is 0/false/no.
    multiprocess: bool | None = None
    # torch CPU threads of the engine-core process (None: min(4, the frontend's setting) on
    # a GPU, the frontend's setting on the CPU; see core_client.default_core_threads)
    cpu_threads: int | None = None
    revision: str | None = None
    log_stats_interval_s: float = 10.0  # how often the engine core logs its state
    extra: dict[str, Any] = field(default_factory=dict)  # keys of EXTRA_OPTIONS only

    def extra_option(self, key: str) -> Any:
        """The value of an EXTRA_OPTIONS switch: the one set in ``extra``, else its default."""
        return self.extra.get(key, EXTRA_OPTIONS[key].default)

    def __post_init__(self) -> None:
        if self.multiprocess is None:
            env = os.environ.get("MMENGINE_MULTIPROCESS", "").strip().lower()
            self.multiprocess = env not in _FALSE
        self.extra = {k: parse_extra_value(k, v) for k, v in self.extra.items()}
        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be auto/float32/bfloat16/float16, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError("num_kv_blocks must be at least 2")
        if not 0.05 <= self.gpu_memory_utilization <= 0.99:
            raise ValueError("gpu_memory_utilization must be in [0.05, 0.99]")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelSpec:
    """The LLM decoder's shape, normalized from either config.json layout."""

    architecture: str  # e.g. "Qwen2ForCausalLM", "Qwen2VLForConditionalGeneration"
    model_type: str  # e.g. "qwen2", "qwen2_vl", "llava"
    text_model_type: str  # "llama", "qwen2", "qwen3", ...
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 family
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k
    mrope_section: list[int] | None  # Qwen2-VL family: [t, h, w] frequency sections
    rope_scaling: dict[str, Any] | None
    eos_token_ids: list[int]
    dtype: str  # the checkpoint's dtype ("float32", "bfloat16", ...)
    hf_config: dict[str, Any]  # the raw config.json (the vision stage reads its own part)
    # Layers attend only to their last this-many keys (Mistral-7B-v0.1); not implemented,
    # so the engine caps the context at it (where windowed = full attention).
    sliding_window: int | None = None

    @property
    def is_multimodal(self) -> bool:
        return "vision_config" in self.hf_config

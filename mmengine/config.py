"""Engine configuration: what the user chooses, and what is derived from the checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

# EngineConfig.extra: switches of the GPU path, mostly for A/B benchmarks (`--extra
# KEY=VALUE` on the command line). Any other key is refused, so a typo cannot go unnoticed.
GEMV_ROWS = 8  # kernels/gemv.MAX_ROWS (not imported here: that would load Triton)
EXTRA_OPTIONS: dict[str, str] = {
    "torch_compile": "GPU: torch.compile the decoder layers (default true)",
    "cuda_graphs": "GPU: replay decode steps as CUDA graphs (default true)",
    "gemv_max_tokens": "GPU: steps of at most this many tokens (0-8) run each decoder layer "
    "as fused skinny-matmul launches (default 1; 0 turns it off)",
    "gemv_rope": "that path applies rotary and writes K/V in the QKV launch (default 1)",
    "compile_encoder": "GPU: torch.compile the vision encoder (default true)",
    "vision_segment_kernel": "vision attention through the Triton segment kernel (default false)",
    "load_format": "'dummy': random weights of the checkpoint's shapes (benchmarks)",
}


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
    multiprocess: bool = True  # engine core in its own process (False: in-process, to debug)
    # torch CPU threads of the engine-core process (None: min(4, the frontend's setting) on
    # a GPU, the frontend's setting on the CPU; see core_client.default_core_threads)
    cpu_threads: int | None = None
    revision: str | None = None
    log_stats_interval_s: float = 10.0  # how often the engine core logs its state
    extra: dict[str, Any] = field(default_factory=dict)  # keys of EXTRA_OPTIONS only

    def __post_init__(self) -> None:
        if os.environ.get("MMENGINE_MULTIPROCESS", "").lower() in ("0", "false", "no"):
            self.multiprocess = False
        unknown = sorted(set(self.extra) - set(EXTRA_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown extra option(s) {unknown}; known: {', '.join(sorted(EXTRA_OPTIONS))}"
            )
        gemv = self.extra.get("gemv_max_tokens", 0)
        if not isinstance(gemv, int) or isinstance(gemv, bool) or not 0 <= gemv <= GEMV_ROWS:
            raise ValueError(
                f"extra gemv_max_tokens must be an integer 0-{GEMV_ROWS}, got {gemv!r}"
            )
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

    @property
    def is_multimodal(self) -> bool:
        return "vision_config" in self.hf_config

"""Attention over the paged KV cache: per-step metadata and the backends that use it.

The model's attention layers read the current step's ``AttentionMetadata`` through a
guarded context (``with forward_context(meta): model(...)``), never a bare global.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and KV blocks are in this step's packed batch."""

    query_start_loc: torch.Tensor  # int32 [B+1]: sequence b's queries are rows qsl[b]:qsl[b+1]
    seq_lens: torch.Tensor  # int32 [B]: KV length after this step (context + queries)
    block_tables: torch.Tensor  # int32 [B, max_blocks]: padded with block 0 (the null block)
    slot_mapping: torch.Tensor  # int64 [T]: cache slot of each query token's K/V (-1: skip)
    max_query_len: int
    max_seq_len: int
    # Split-KV programs per sequence (None: the kernel chooses). Decode steps use powers
    # of two so that few kernel variants get compiled (one per distinct split count).
    num_kv_splits: int | None = None


_CURRENT: ContextVar[AttentionMetadata | None] = ContextVar("mmengine_attn_meta", default=None)


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    token = _CURRENT.set(meta)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_metadata() -> AttentionMetadata:
    meta = _CURRENT.get()
    if meta is None:
        raise RuntimeError("attention called outside forward_context(...)")
    return meta


def paged_attention_forward(
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,  # [T, Hk, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    scale: float,
) -> torch.Tensor:  # [T, Hq, D]
    """Write this step's K/V into the cache, then attend over each sequence's pages."""
    from mmkernels.kv_cache import write_kv_cache

    meta = current_metadata()
    write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
    return _attend(q, key_cache, value_cache, scale, meta)


def rotary_paged_attention_forward(
    qkv: torch.Tensor,  # [T, (Hq + 2 Hk) D]: the fused QKV projection's output
    positions: torch.Tensor,  # [T], or [3, T] with mrope_section
    cos_sin_cache: torch.Tensor,  # [max_position, D] fp32
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hk, D]
    value_cache: torch.Tensor,
    scale: float,
    num_heads: int,
    mrope_section: list[int] | None,
) -> torch.Tensor:  # [T, Hq, D]
    """Rotary on q and k, K/V into the cache (one fused kernel), then paged attention."""
    from mmkernels.rotary_kv import rotary_write_kv

    meta = current_metadata()
    t, d, hk = qkv.shape[0], key_cache.shape[-1], key_cache.shape[2]
    q = qkv[:, : num_heads * d].view(t, num_heads, d)
    k = qkv[:, num_heads * d : (num_heads + hk) * d].view(t, hk, d)
    v = qkv[:, (num_heads + hk) * d :].view(t, hk, d)
    q = rotary_write_kv(
        q,
        k,
        v,
        positions,
        cos_sin_cache,
        key_cache,
        value_cache,
        meta.slot_mapping,
        mrope_section=mrope_section,
    )
    return _attend(q, key_cache, value_cache, scale, meta)


def gemv_rope_attention_forward(
    x: torch.Tensor,  # [T, hidden]: the residual stream (T <= the GEMV's row limit)
    weight: torch.Tensor,  # [(Hq + 2 Hk) D, hidden]: the fused QKV projection
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,  # the input RMSNorm's weight
    eps: float,
    positions: torch.Tensor,  # [T], or [3, T] with mrope_section
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
    num_heads: int,
    mrope_section: list[int] | None,
) -> torch.Tensor:  # [T, Hq, D]
    """Norm, QKV projection, rotary and the K/V cache write in one GEMV launch
    (`mmkernels.gemv.gemv_qkv_rope`), then paged attention: a few-token step's attention
    half of a decoder layer in two or three launches."""
    from mmkernels.gemv import gemv_qkv_rope

    meta = current_metadata()
    q = gemv_qkv_rope(
        x,
        weight,
        bias,
        norm_weight=norm_weight,
        eps=eps,
        positions=positions,
        cos_sin_cache=cos_sin_cache,
        key_cache=key_cache,
        value_cache=value_cache,
        slot_mapping=meta.slot_mapping,
        num_q_heads=num_heads,
        mrope_section=mrope_section,
    )
    return _attend(q, key_cache, value_cache, scale, meta)


def _attend(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
    meta: AttentionMetadata,
) -> torch.Tensor:
    from mmkernels.paged_attention import paged_attention

    splits = (
        meta.num_kv_splits
        if meta.num_kv_splits is not None
        else decode_kv_splits(q, key_cache, meta)
    )
    return paged_attention(
        q,
        key_cache,
        value_cache,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        scale=scale,
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
        num_kv_splits=splits,
        # The in-launch merge is within -3..+5% of the two-launch one up to 8 splits and
        # 2-18% behind beyond, where its last program merges alone (H100 sweep,
        # benchmarks/RESULTS.md "Split merge fused into the split kernel"): the kernel's
        # default (None) fuses up to its FUSED_MERGE_MAX_SPLITS. Steps where the kernel
        # picks the split count (not pure decodes) keep the two-launch merge.
        fused_merge=None if splits is not None else False,
    )


def decode_kv_splits(
    q: torch.Tensor, key_cache: torch.Tensor, meta: AttentionMetadata
) -> int | None:
    """On CUDA: for pure decode batches the kernel's split choice (a power of two), which
    then also fuses the split merge into the launch; 1 for every other batch.

    A batch of chunks of 2-8 tokens (a prefix hit leaving a few tokens, a prompt's tail)
    is not split: the kernel's own choice would split it, but each split count is a
    kernel variant, and this rare step would need ~20 more compiled at start-up (see
    mmengine/warmup.py; ~1.5 s each on an H200) to save ~1-2 ms once. None on the CPU."""
    if not q.is_cuda:
        return None
    if meta.max_query_len != 1:
        return 1
    from mmkernels.paged_attention import choose_num_kv_splits

    return choose_num_kv_splits(
        num_q_blocks=meta.block_tables.shape[0],
        num_kv_heads=key_cache.shape[2],
        max_query_len=1,
        max_seq_len=meta.max_seq_len,
        sm_count=_sm_count(q.device),
        head_size=q.shape[-1],
    )


_SM: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index or 0
    if idx not in _SM:
        _SM[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM[idx]


# torch.compile sees attention as one opaque op that writes the KV cache and returns
# the output; the step's metadata reaches it through the forward context above.
@torch.library.custom_op("mmengine::paged_attention", mutates_args=("key_cache", "value_cache"))
def paged_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return paged_attention_forward(q, k, v, key_cache, value_cache, scale)


@paged_attention_op.register_fake
def _paged_attention_fake(q, k, v, key_cache, value_cache, scale):  # noqa: ANN001, ANN202
    return torch.empty_like(q)


# The same with rotary and the cache write fused in front, taking the QKV projection's
# output whole: views of it passed to a kernel that mutates them (the unfused rotary) made
# the compiler copy them, five kernels per layer.
@torch.library.custom_op(
    "mmengine::rotary_paged_attention", mutates_args=("key_cache", "value_cache")
)
def rotary_paged_attention_op(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
    num_heads: int,
    mrope_section: list[int] | None,
) -> torch.Tensor:
    return rotary_paged_attention_forward(
        qkv, positions, cos_sin_cache, key_cache, value_cache, scale, num_heads, mrope_section
    )


@rotary_paged_attention_op.register_fake
def _rotary_paged_attention_fake(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    scale: float,
    num_heads: int,
    mrope_section: list[int] | None,
) -> torch.Tensor:
    return qkv.new_empty((qkv.shape[0], num_heads, key_cache.shape[-1]))


# The few-token path's norm + QKV projection + rotary + cache write + attention as one
# opaque op: the forward itself, registered.
gemv_rope_paged_attention_op = torch.library.custom_op(
    "mmengine::gemv_rope_paged_attention", mutates_args=("key_cache", "value_cache")
)(gemv_rope_attention_forward)


@gemv_rope_paged_attention_op.register_fake
def _gemv_rope_paged_attention_fake(x, weight, bias, norm_weight, eps, positions, cos_sin,  # noqa: ANN001, ANN202
                                    key_cache, value_cache, scale, num_heads, mrope_section):  # fmt: skip
    return x.new_empty((x.shape[0], num_heads, key_cache.shape[-1]))

"""Scatter this step's keys and values into the paged KV cache.

Token t goes to slot slot_mapping[t] = block_id * block_size + offset of the cache; a
negative slot marks a padding row (a CUDA-graph batch padded past its real tokens), which is
skipped.
"""

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, use_triton


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_cache_blk,  # shared by key_cache and value_cache
    stride_cache_pos,
    stride_cache_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    # 64-bit: block id × block stride overflows int32 on large caches.
    cache_base = (slot // BLOCK_SIZE) * stride_cache_blk + (slot % BLOCK_SIZE) * stride_cache_pos

    offs_h = tl.arange(0, HEADS_PAD)[:, None]
    offs_d = tl.arange(0, HEAD_PAD)[None, :]
    mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_SIZE)
    cache_offset = cache_base + offs_h * stride_cache_head + offs_d  # [HEADS_PAD, HEAD_PAD]

    k = tl.load(key_ptr + token * stride_k_tok + offs_h * stride_k_head + offs_d, mask=mask)
    tl.store(key_cache_ptr + cache_offset, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + offs_h * stride_v_head + offs_d, mask=mask)
    tl.store(value_cache_ptr + cache_offset, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    use_triton_kernel: bool | None = None,
) -> None:
    """Writes key/value rows into their cache slots, in place.

    Args:
        key: [num_tokens, num_kv_heads, head_size]; the last dim must be contiguous (token
            and head strides may be anything, e.g. a slice of a fused QKV output).
        value: like key.
        key_cache: [num_blocks, block_size, num_kv_heads, head_size].
        value_cache: same shape and strides as key_cache.
        slot_mapping: int64 [num_tokens]; slot = block_id * block_size + offset, < 0 to
            skip the row.
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.
    """
    if not use_triton(key, use_triton_kernel):
        write_kv_cache_torch(key, value, key_cache, value_cache, slot_mapping)
        return
    check_launchable(_write_kv_cache_kernel, key)
    num_tokens, num_kv_heads, head_size = key.shape
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("key_cache and value_cache need equal strides and a contiguous last dim")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous last dim")
    if num_tokens == 0:
        return
    heads_pad = next_power_of_2(num_kv_heads)
    head_pad = next_power_of_2(head_size)
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        HEADS_PAD=heads_pad,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=key_cache.shape[1],
        # One token's K and V: 2 KB to 32 KB; more warps only help the largest.
        num_warps=4 if heads_pad * head_pad <= 2048 else 8,
    )


def write_kv_cache_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain-torch reference of `write_kv_cache` (same arguments, in place)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[keep].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[keep].to(value_cache.dtype)

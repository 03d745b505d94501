"""Rotary embedding of q and k fused with the KV-cache write, one token per program.

Each program reads its token's q, k and v heads (strided views of the fused QKV
projection's output, left unmodified), writes q rotated into a new contiguous tensor, and
writes k rotated and v as they are into the token's cache slot (none for a negative slot:
CUDA-graph padding rows). It replaces `apply_rotary` (in place on q and k) followed by
`write_kv_cache`: one launch per layer instead of two, and under torch.compile no copies
around them. A Triton kernel that mutates views of an intermediate makes the compiler
materialize those views: the decode graph of Qwen2.5-3B had five clone kernels per layer
for it (H200 profile, benchmarks/RESULTS.md "Decode step").

Rotation and rounding are `apply_rotary`'s (the same helper), so q and the cached k are
bit-identical to the unfused path. Only full-width rotary (rotary dim = head size) is fused;
the models that use this path all have it.
"""

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, pdl_supported, use_triton
from mmkernels.kv_cache import write_kv_cache_torch
from mmkernels.rotary import _check_args, _rotate_heads, _token_cos_sin, apply_rotary_torch


# stride_pos_row (the token count of M-RoPE positions) changes every step: not specialized.
@triton.jit(do_not_specialize=["stride_pos_row"])
def _rotary_write_kv_kernel(
    q_ptr,  # [num_tokens, num_q_heads, head_size]
    k_ptr,  # [num_tokens, num_kv_heads, head_size]
    v_ptr,  # [num_tokens, num_kv_heads, head_size]
    q_out_ptr,  # [num_tokens, num_q_heads, head_size]: q rotated
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size] (any strides)
    value_cache_ptr,  # same strides as key_cache
    slot_mapping_ptr,  # [num_tokens] int64; < 0: no cache write
    positions_ptr,  # [num_tokens] int64, or [3, num_tokens] with IS_MROPE
    cos_sin_ptr,  # [max_position, head_size] fp32: cos | sin
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_qo_tok,
    stride_qo_head,
    stride_cache_blk,
    stride_cache_pos,
    stride_cache_head,
    stride_pos_row,
    stride_cs_pos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    HALF: tl.constexpr,  # head_size // 2
    HALF_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_MROPE: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the QKV projection
    MROPE_END_T: tl.constexpr,
    MROPE_END_H: tl.constexpr,
):
    if USE_PDL:  # wait for the kernel before (it wrote q/k/v), let the next one start
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _token_cos_sin(
        positions_ptr,
        cos_sin_ptr,
        token,
        stride_pos_row,
        stride_cs_pos,
        HALF,
        HALF_PAD,
        IS_MROPE,
        MROPE_END_T,
        MROPE_END_H,
    )
    _rotate_heads(
        q_ptr + token * stride_q_tok,
        q_out_ptr + token * stride_qo_tok,
        stride_q_head,
        stride_qo_head,
        cos,
        sin,
        NUM_Q_HEADS,
        Q_HEADS_PAD,
        HALF,
        HALF_PAD,
    )
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        # 64-bit: block id × block stride overflows int32 on large caches.
        cache = (slot // BLOCK_SIZE) * stride_cache_blk + (slot % BLOCK_SIZE) * stride_cache_pos
        _rotate_heads(
            k_ptr + token * stride_k_tok,
            key_cache_ptr + cache,
            stride_k_head,
            stride_cache_head,
            cos,
            sin,
            NUM_KV_HEADS,
            KV_HEADS_PAD,
            HALF,
            HALF_PAD,
        )
        offs_h = tl.arange(0, KV_HEADS_PAD)[:, None]
        offs_d = tl.arange(0, HEAD_PAD)[None, :]
        mask = (offs_h < NUM_KV_HEADS) & (offs_d < HEAD_SIZE)
        v = tl.load(v_ptr + token * stride_v_tok + offs_h * stride_v_head + offs_d, mask=mask)
        tl.store(
            value_cache_ptr + cache + offs_h * stride_cache_head + offs_d,
            v.to(value_cache_ptr.dtype.element_ty),
            mask=mask,
        )


def rotary_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    mrope_section: list[int] | None = None,
    use_triton_kernel: bool | None = None,
) -> torch.Tensor:
    """Rotates q and k by their tokens' positions; writes the rotated k and v into the cache.

    Args:
        q: [T, num_q_heads, head_size]; last dim contiguous, other strides free (e.g. a
            view of a fused QKV output). Not modified.
        k: [T, num_kv_heads, head_size], like q. Not modified.
        v: [T, num_kv_heads, head_size], like q. Not modified.
        positions: int64 [T], or [3, T] (temporal, height, width) with mrope_section.
        cos_sin_cache: [max_position, head_size] float32 from `build_cos_sin_cache`.
        key_cache: [num_blocks, block_size, num_kv_heads, head_size], last dim contiguous.
        value_cache: same shape and strides as key_cache.
        slot_mapping: int64 [T]; slot = block_id * block_size + offset, < 0 to skip.
        mrope_section: Qwen2-VL's section sizes summing to head_size / 2; None for 1-D rope.
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.

    Returns:
        q rotated, a new contiguous [T, num_q_heads, head_size] tensor.
    """
    _check_args(q, positions, cos_sin_cache, q.shape[-1], mrope_section)
    if not use_triton(q, use_triton_kernel):
        return rotary_write_kv_torch(
            q,
            k,
            v,
            positions,
            cos_sin_cache,
            key_cache,
            value_cache,
            slot_mapping,
            mrope_section=mrope_section,
        )
    check_launchable(_rotary_write_kv_kernel, q)
    if any(t.stride(-1) != 1 for t in (q, k, v, key_cache, cos_sin_cache)):
        raise ValueError("q, k, v, the caches and cos_sin_cache need a contiguous last dim")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache need equal strides")
    num_tokens, num_q_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    q_out = torch.empty((num_tokens, num_q_heads, head_size), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    half = head_size // 2
    sections = mrope_section if mrope_section is not None else [half, 0, 0]
    q_heads_pad = next_power_of_2(num_q_heads)
    pdl = pdl_supported(q, q.shape[0])
    _rotary_write_kv_kernel[(num_tokens,)](
        q,
        k,
        v,
        q_out,
        key_cache,
        value_cache,
        slot_mapping,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        positions.stride(0) if mrope_section is not None else 0,
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=q_heads_pad,
        KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_SIZE=head_size,
        HEAD_PAD=next_power_of_2(head_size),
        HALF=half,
        HALF_PAD=next_power_of_2(half),
        BLOCK_SIZE=key_cache.shape[1],
        IS_MROPE=mrope_section is not None,
        USE_PDL=pdl,
        MROPE_END_T=sections[0],
        MROPE_END_H=sections[0] + sections[1],
        num_warps=4 if q_heads_pad * next_power_of_2(half) <= 2048 else 8,
        # As in apply_rotary: no fma contraction of the separately rounded products.
        enable_fp_fusion=False,
        launch_pdl=pdl,
    )
    return q_out


def rotary_write_kv_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    mrope_section: list[int] | None = None,
) -> torch.Tensor:
    """Plain-torch reference of `rotary_write_kv`: rotate copies of q and k
    (`apply_rotary_torch`), then `write_kv_cache_torch`."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device).copy_(q)
    k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device).copy_(k)
    apply_rotary_torch(q_out, k_rot, positions, cos_sin_cache, mrope_section=mrope_section)
    write_kv_cache_torch(k_rot, v, key_cache, value_cache, slot_mapping)
    return q_out

"""Attention within short packed segments (the vision towers' windows), one program per
(segment, head) holding the whole segment.

Qwen2.5-VL attends within 64-patch windows in 28 of its 32 vision blocks. The general
variable-length flash kernel tiles queries by 128 rows, so a 64-token window fills half a
tile and pays a full tile's setup. On an H200 its 32 calls took 37 ms of a 214 ms tower
forward for 13 images (benchmarks/RESULTS.md, session 5); the 4 full-attention blocks
should account for ~10 ms of that, leaving ~27 ms for the windows, whose bytes need ~5 ms
(an estimate, not yet measured against this kernel; hence off by default). Here
each program loads its segment's q, k and v once (≤ 128 tokens), computes the scores in one
matmul, a plain softmax (the whole row is in registers: no running max), and writes the
output once.

Rounding follows flash attention: scores and softmax in float32, probabilities cast to the
input dtype for the second matmul, accumulation in float32.
"""

import math

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, use_triton

MAX_SEGMENT = 128  # longest segment the kernel holds in one program


@triton.jit
def _segment_attention_kernel(
    qkv_ptr,  # [N, 3, H, D]: last dim contiguous
    out_ptr,  # [N, H * D] contiguous
    cu_seqlens_ptr,  # [S + 1] int32 segment boundaries
    stride_tok,
    stride_which,
    stride_head,
    scale_log2,  # softmax scale * log2(e)
    num_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seg = tl.program_id(0)
    head = tl.program_id(1)
    start = tl.load(cu_seqlens_ptr + seg).to(tl.int64)
    n = tl.load(cu_seqlens_ptr + seg + 1).to(tl.int64) - start
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n
    mask = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = (start + offs_n).to(tl.int64)
    base = qkv_ptr + rows[:, None] * stride_tok + head * stride_head + offs_d[None, :]
    q = tl.load(base, mask=mask, other=0.0)
    k = tl.load(base + stride_which, mask=mask, other=0.0)
    v = tl.load(base + 2 * stride_which, mask=mask, other=0.0)
    scores = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_N, BLOCK_N] float32, log2 units
    scores = tl.where(mask_n[None, :], scores, float("-inf"))
    scores = scores - tl.max(scores, axis=1)[:, None]
    p = tl.math.exp2(scores)
    denom = tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v)  # float32
    out = acc / denom[:, None]
    dst = out_ptr + rows[:, None] * (num_heads * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def supports(max_len: int, head_dim: int) -> bool:
    """Whether `segment_attention` can take segments this long with this head size."""
    return 0 < max_len <= MAX_SEGMENT and head_dim <= 256


def segment_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    *,
    use_triton_kernel: bool | None = None,
) -> torch.Tensor:
    """Non-causal attention where each token attends only within its segment.

    Args:
        qkv: [N, 3, H, D] queries, keys and values of the packed tokens (last dim
            contiguous); segments are consecutive runs of tokens.
        cu_seqlens: [S + 1] int32 boundaries on qkv's device (0, then cumulative lengths;
            no empty segments).
        max_len: the longest segment (at most MAX_SEGMENT for the kernel).
        use_triton_kernel: force the Triton kernel or the torch reference; None takes
            Triton on CUDA tensors (or when MMENGINE_FORCE_TRITON=1).

    Returns:
        [N, H * D] in qkv's dtype, in packed token order.
    """
    num_tokens, three, num_heads, head_dim = qkv.shape
    if three != 3:
        raise ValueError(f"qkv must be [N, 3, H, D], got {tuple(qkv.shape)}")
    if not use_triton(qkv, use_triton_kernel):
        return segment_attention_torch(qkv, cu_seqlens)
    check_launchable(_segment_attention_kernel, qkv)
    if not supports(max_len, head_dim):
        raise ValueError(f"segments up to {MAX_SEGMENT} tokens and head_dim <= 256 only")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    out = torch.empty(num_tokens, num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    num_segments = cu_seqlens.numel() - 1
    if num_tokens == 0 or num_segments == 0:
        return out
    block_n = max(16, next_power_of_2(max_len))
    _segment_attention_kernel[(num_segments, num_heads)](
        qkv,
        out,
        cu_seqlens,
        qkv.stride(0),
        qkv.stride(1),
        qkv.stride(2),
        math.log2(math.e) / math.sqrt(head_dim),
        num_heads,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        BLOCK_D=max(16, next_power_of_2(head_dim)),
        # A 128 x 128 float32 score tile needs twice the threads to stay in registers.
        num_warps=4 if block_n <= 64 else 8,
    )
    return out


def segment_attention_torch(qkv: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference: softmax(q k^T / sqrt(D)) v per segment, in float32."""
    num_tokens, _, num_heads, head_dim = qkv.shape
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.float32, device=qkv.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        q, k, v = (qkv[a:b, i].float().transpose(0, 1) for i in range(3))  # [H, n, D]
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        out[a:b] = (weights @ v).transpose(0, 1)
    return out.reshape(num_tokens, num_heads * head_dim).to(qkv.dtype)

"""Neox-style (rotate-half) rotary position embedding, 1-D or Qwen2-VL M-RoPE, in place.

`x_rot = x * cos + rotate_half(x) * sin` on the first `rotary_dim` channels of every head;
the rest of the head (partial rotary) is left as it is. With M-RoPE, frequency i takes its
position from the temporal, height or width row of `positions` according to which part of
`mrope_section` it falls in, as HF's Qwen2-VL rotary embedding recomposes its frequencies.

Rounding follows HF's `apply_rotary_pos_emb`: cos/sin are cast to the activation dtype, and
each product and the sum are rounded to it, so bf16 results match HF's bit for bit.
"""

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, use_triton


def build_cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The [max_position, rotary_dim] table of cos (first half) and sin (second half).

    Computed the way HF's default rope computes its cos/sin in float32:
    inv_freq = 1 / base^(arange(0, rotary_dim, 2) / rotary_dim) and
    freqs = position.float() * inv_freq, so the values are identical on the same device.

    Args:
        rotary_dim: rotated channels per head (even).
        max_position: number of positions in the table.
        base: rope theta.
        dtype: dtype of the returned table (computed in float32).
        device: where to compute it (HF computes on the model's device).

    Returns:
        [max_position, rotary_dim] tensor: cos(freqs) | sin(freqs).
    """
    if rotary_dim % 2 != 0:
        raise ValueError(f"rotary_dim {rotary_dim} must be even")
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (float(base) ** (exponent / rotary_dim))  # [rotary_dim / 2]
    positions = torch.arange(max_position, dtype=torch.int64, device=device).float()
    freqs = positions[:, None] * inv_freq[None, :]  # [max_position, rotary_dim / 2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype)


@triton.jit
def rotate_pair(x1, x2, cos, sin, dtype: tl.constexpr):
    """(x1, x2) rotated by (cos, sin) (fp32, broadcastable), the way HF's eager bf16/fp16
    rotary rounds: the table values rounded to the activation dtype first (its
    cos.to(x.dtype)), then x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1),
    each product and the sum rounded to `dtype`. Returns fp32 values already rounded."""
    c = cos.to(dtype).to(tl.float32)
    s = sin.to(dtype).to(tl.float32)
    o1 = (x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)
    o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
    return o1.to(dtype).to(tl.float32), o2.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(
    src_ptr,  # the token's first head: [num_heads, head_size] at src_stride_head
    dst_ptr,  # where the rotated heads go (src_ptr itself to rotate in place)
    src_stride_head,
    dst_stride_head,
    cos,  # [HALF_PAD] fp32
    sin,  # [HALF_PAD] fp32
    NUM_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
):
    dtype = src_ptr.dtype.element_ty
    offs_h = tl.arange(0, HEADS_PAD)[:, None]
    offs_i = tl.arange(0, HALF_PAD)[None, :]
    mask = (offs_h < NUM_HEADS) & (offs_i < HALF)
    first = src_ptr + offs_h * src_stride_head + offs_i  # [HEADS_PAD, HALF_PAD]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    o1, o2 = rotate_pair(x1, x2, cos[None, :], sin[None, :], dtype)
    out = dst_ptr + offs_h * dst_stride_head + offs_i
    tl.store(out, o1.to(dtype).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(out + HALF, o2.to(dtype).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _token_cos_sin(
    positions_ptr,  # [num_tokens] int64, or [3, num_tokens] (t, h, w rows) with IS_MROPE
    cos_sin_ptr,  # [max_position, 2 * HALF] fp32: cos | sin
    token,
    stride_pos_row,
    stride_cs_pos,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    IS_MROPE: tl.constexpr,
    MROPE_END_T: tl.constexpr,
    MROPE_END_H: tl.constexpr,
):
    """(cos, sin) of the token's position, [HALF_PAD] fp32 each; with M-RoPE frequency i
    takes its position from the t, h or w row by the section it falls in."""
    offs_i = tl.arange(0, HALF_PAD)
    i_valid = offs_i < HALF
    if IS_MROPE:
        pos_t = tl.load(positions_ptr + token)
        pos_h = tl.load(positions_ptr + stride_pos_row + token)
        pos_w = tl.load(positions_ptr + 2 * stride_pos_row + token)
        pos = tl.where(offs_i < MROPE_END_T, pos_t, tl.where(offs_i < MROPE_END_H, pos_h, pos_w))
    else:
        pos = tl.load(positions_ptr + token)
    row = cos_sin_ptr + pos.to(tl.int64) * stride_cs_pos
    cos = tl.load(row + offs_i, mask=i_valid, other=0.0).to(tl.float32)
    sin = tl.load(row + HALF + offs_i, mask=i_valid, other=0.0).to(tl.float32)
    return cos, sin


# stride_pos_row is the token count of M-RoPE positions: left unspecialized, or each new
# divisibility class of the step size would compile another variant mid-run.
@triton.jit(do_not_specialize=["stride_pos_row"])
def _rotary_kernel(
    q_ptr,  # [num_tokens, num_q_heads, head_size], rotated in place
    k_ptr,  # [num_tokens, num_k_heads, head_size], rotated in place
    positions_ptr,  # [num_tokens] int64, or [3, num_tokens] (t, h, w rows) with IS_MROPE
    cos_sin_ptr,  # [max_position, 2 * HALF] fp32: cos | sin
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_pos_row,  # between the t, h and w rows of M-RoPE positions
    stride_cs_pos,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HALF_PAD: tl.constexpr,
    IS_MROPE: tl.constexpr,
    MROPE_END_T: tl.constexpr,  # frequencies [0, END_T) use the temporal position,
    MROPE_END_H: tl.constexpr,  # [END_T, END_H) the height one, the rest the width one
):
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
    q_row = q_ptr + token * stride_q_tok
    k_row = k_ptr + token * stride_k_tok
    _rotate_heads(
        q_row,
        q_row,
        stride_q_head,
        stride_q_head,
        cos,
        sin,
        NUM_Q_HEADS,
        Q_HEADS_PAD,
        HALF,
        HALF_PAD,
    )
    _rotate_heads(
        k_row,
        k_row,
        stride_k_head,
        stride_k_head,
        cos,
        sin,
        NUM_K_HEADS,
        K_HEADS_PAD,
        HALF,
        HALF_PAD,
    )


def _check_args(
    q: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    rotary_dim: int | None,
    mrope_section: list[int] | None,
) -> int:
    """Validates the arguments and returns rotary_dim."""
    cache_dim = cos_sin_cache.shape[-1]
    rotary_dim = cache_dim if rotary_dim is None else rotary_dim
    if rotary_dim != cache_dim or rotary_dim > q.shape[-1] or rotary_dim % 2 != 0:
        raise ValueError(
            f"rotary_dim {rotary_dim} must be even, equal the cache's last dim {cache_dim} "
            f"and fit the head size {q.shape[-1]}"
        )
    if mrope_section is not None:
        if positions.dim() != 2 or positions.shape[0] != 3 or len(mrope_section) != 3:
            raise ValueError("M-RoPE needs positions [3, T] and a 3-part mrope_section")
        if sum(mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to rotary_dim / 2")
    elif positions.dim() != 1:
        raise ValueError("1-D rope needs positions [T] (pass mrope_section for [3, T])")
    return rotary_dim


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    rotary_dim: int | None = None,
    mrope_section: list[int] | None = None,
    use_triton_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place by their tokens' positions.

    Args:
        q: [T, num_q_heads, head_size]; the last dim must be contiguous.
        k: [T, num_k_heads, head_size]; the last dim must be contiguous.
        positions: int64 [T], or [3, T] (temporal, height, width) with mrope_section.
        cos_sin_cache: [max_position, rotary_dim] float32 from `build_cos_sin_cache`.
        rotary_dim: rotated channels per head; None means the cache's width. The channels
            past it are left unchanged.
        mrope_section: Qwen2-VL's section sizes, e.g. [16, 24, 24], summing to
            rotary_dim / 2; None for 1-D rope.
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.

    Returns:
        (q, k), the same tensors, rotated.
    """
    if not use_triton(q, use_triton_kernel):
        return apply_rotary_torch(
            q, k, positions, cos_sin_cache, rotary_dim=rotary_dim, mrope_section=mrope_section
        )
    check_launchable(_rotary_kernel, q)
    rotary_dim = _check_args(q, positions, cos_sin_cache, rotary_dim, mrope_section)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dim")
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return q, k
    half = rotary_dim // 2
    sections = mrope_section if mrope_section is not None else [half, 0, 0]
    q_heads_pad = next_power_of_2(q.shape[1])
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        positions.stride(0) if mrope_section is not None else 0,
        cos_sin_cache.stride(0),
        NUM_Q_HEADS=q.shape[1],
        NUM_K_HEADS=k.shape[1],
        Q_HEADS_PAD=q_heads_pad,
        K_HEADS_PAD=next_power_of_2(k.shape[1]),
        HALF=half,
        HALF_PAD=next_power_of_2(half),
        IS_MROPE=mrope_section is not None,
        MROPE_END_T=sections[0],
        MROPE_END_H=sections[0] + sections[1],
        # One token's q heads: 32 heads × 64 pairs = 2048 pairs at most for our models.
        num_warps=4 if q_heads_pad * next_power_of_2(half) <= 2048 else 8,
        # Without this, LLVM contracts the rounded products and their sum into one bf16
        # fma, which rounds once where HF rounds three times.
        enable_fp_fusion=False,
    )
    return q, k


def apply_rotary_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    rotary_dim: int | None = None,
    mrope_section: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `apply_rotary`: HF's rotate-half formula, in place."""
    rotary_dim = _check_args(q, positions, cos_sin_cache, rotary_dim, mrope_section)
    half = rotary_dim // 2
    cos_sin = cos_sin_cache[positions].float()  # [T, rotary_dim] or [3, T, rotary_dim]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    if mrope_section is not None:
        # Section j of the frequencies takes row j (t, h, w) of the positions.
        cos = torch.cat([c[j] for j, c in enumerate(cos.split(mrope_section, dim=-1))], dim=-1)
        sin = torch.cat([s[j] for j, s in enumerate(sin.split(mrope_section, dim=-1))], dim=-1)
    cos = torch.cat((cos, cos), dim=-1)[:, None, :]  # [T, 1, rotary_dim]
    sin = torch.cat((sin, sin), dim=-1)[:, None, :]
    for x in (q, k):
        x_rot = x[..., :rotary_dim]
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        rotated = x_rot * c + torch.cat((-x2, x1), dim=-1) * s
        x_rot.copy_(rotated)
    return q, k

"""RMSNorm with an optional fused residual add, rounding exactly where HF's Llama/Qwen2 do.

HF computes `weight * (x_fp32 * rsqrt(mean(x_fp32²) + eps)).to(input_dtype)`, and the
decoder layer adds the residual in the input dtype first. The kernel performs each of those
roundings at the same point, so bf16 results agree with HF's to the last bit except where
the fp32 variance itself differs in its last bits (different summation order).
"""

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, use_triton


@triton.jit
def _rms_norm_kernel(
    out_ptr,  # [num_rows, hidden] contiguous
    new_residual_ptr,  # [num_rows, hidden] contiguous, HAS_RESIDUAL only
    x_ptr,  # [outer, inner, hidden]: rows are (outer, inner) pairs
    residual_ptr,  # [outer, inner, hidden], HAS_RESIDUAL only
    weight_ptr,  # [hidden]
    eps,
    num_inner,
    stride_x_outer,
    stride_x_inner,
    stride_r_outer,
    stride_r_inner,
    HIDDEN: tl.constexpr,
    BLOCK_H: tl.constexpr,  # HIDDEN rounded up to a power of two
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    outer = row // num_inner
    inner = row % num_inner
    offs = tl.arange(0, BLOCK_H)
    mask = offs < HIDDEN

    x = tl.load(
        x_ptr + outer * stride_x_outer + inner * stride_x_inner + offs, mask=mask, other=0.0
    )
    if HAS_RESIDUAL:
        r = tl.load(
            residual_ptr + outer * stride_r_outer + inner * stride_r_inner + offs,
            mask=mask,
            other=0.0,
        )
        # HF adds in the input dtype: round the sum before normalizing it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * HIDDEN + offs, x, mask=mask)

    x_f32 = x.to(tl.float32)
    variance = tl.sum(x_f32 * x_f32, 0) / HIDDEN
    x_normed = (x_f32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * x_normed.to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] -> [outer, inner, hidden] without copying when the strides allow."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)
    return t.flatten(0, -3) if t.dim() > 3 else t


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    *,
    use_triton_kernel: bool | None = None,
    launcher: object = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF-exact RMSNorm over the last dim, optionally after adding a residual.

    Args:
        x: [..., hidden] (e.g. [T, hidden], or [T, heads, head_dim] for Qwen3's q/k norm);
            the last dim must be contiguous for the kernel (others are copied first).
        weight: [hidden].
        eps: variance epsilon.
        residual: optional tensor of x's shape and dtype.
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.
        launcher: what launches the kernel: None for the `@triton.jit` function itself, or
            `torch.library.wrap_triton(_rms_norm_kernel)` inside a `torch.library.triton_op`
            (then torch.compile puts the launch in its own generated code).

    Returns:
        `out` without a residual; `(out, new_residual)` with one, where
        `new_residual = x + residual` (in x's dtype) and `out = rmsnorm(new_residual)`.
        `out` has the promoted dtype of x and weight, as in HF.
    """
    if not use_triton(x, use_triton_kernel):
        return rms_norm_torch(x, weight, eps, residual)
    check_launchable(_rms_norm_kernel, x)

    hidden = x.shape[-1]
    x3 = _as_3d(x)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError("residual must have x's shape and dtype")
        r3 = _as_3d(residual)
        new_residual = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    else:
        r3 = x3
        new_residual = out  # never written: HAS_RESIDUAL is False
    num_rows = x3.shape[0] * x3.shape[1]
    if num_rows == 0:
        return out if residual is None else (out, new_residual)

    block_h = next_power_of_2(hidden)
    # One row per program; wide rows get more warps so each thread keeps ~8-16 elements.
    num_warps = min(max(block_h // 512, 1), 16)
    kernel = _rms_norm_kernel if launcher is None else launcher
    kernel[(num_rows,)](  # type: ignore[index]
        out,
        new_residual,
        x3,
        r3,
        weight,
        eps,
        x3.shape[1],
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        HIDDEN=hidden,
        BLOCK_H=block_h,
        HAS_RESIDUAL=residual is not None,
        num_warps=num_warps,
    )
    return out if residual is None else (out, new_residual)


def rms_norm_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of `rms_norm`: HF's LlamaRMSNorm, op for op."""
    if residual is not None:
        x = residual + x
        new_residual = x
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    out = weight * h.to(input_dtype)
    return out if residual is None else (out, new_residual)

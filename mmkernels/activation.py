"""SiLU-and-multiply of a fused gate/up projection: out = silu(x[..., :I]) * x[..., I:].

Rounds where HF's `down_proj(act_fn(gate_proj(x)) * up_proj(x))` does: silu in fp32 rounded
to the input dtype, then the product rounded again.
"""

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, use_triton

_BLOCK = 1024  # elements of the output row per program


@triton.jit
def _silu_and_mul_kernel(
    out_ptr,  # [num_rows, inter] contiguous
    x_ptr,  # [num_rows, 2 * inter]: gate half, then up half
    inter,
    stride_x_row,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    x_row = x_ptr + row * stride_x_row
    gate = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + offs, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, use_triton_kernel: bool | None = None) -> torch.Tensor:
    """silu(gate) * up of a fused [gate | up] projection.

    Args:
        x: [..., 2 * inter]; the last dim must be contiguous for the kernel (rows may be
            strided; other layouts are copied first).
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.

    Returns:
        [..., inter] in x's dtype.
    """
    if not use_triton(x, use_triton_kernel):
        return silu_and_mul_torch(x)
    check_launchable(_silu_and_mul_kernel, x)
    if x.shape[-1] % 2 != 0:
        raise ValueError(f"last dim {x.shape[-1]} is not even")
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 or x.stride(-1) != 1 else x
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    num_rows = x2.shape[0]
    if num_rows == 0 or inter == 0:
        return out
    block = min(_BLOCK, next_power_of_2(inter))
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        out,
        x2,
        inter,
        x2.stride(0),
        BLOCK=block,
        num_warps=4,
    )
    return out


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch reference of `silu_and_mul`, as HF's MLP computes it."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up

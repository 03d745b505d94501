"""`mmengine::gemv`: the skinny-matmul kernel as one opaque op for torch.compile.

Decode steps of a few tokens run each projection of a decoder layer through
`kernels/gemv.py`, with the RMSNorms, the SiLU-and-mul and the residual adds fused into the
projections around them (four launches around attention instead of ~nine). Under torch.compile the
compiler must not look inside, or it would re-split the fused kernel into its torch ops.
"""

from __future__ import annotations

import torch

from kernels.gemv import gemv


@torch.library.custom_op("mmengine::gemv", mutates_args=())
def gemv_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    gated: bool,
) -> torch.Tensor:
    return gemv(x, weight, bias, residual=residual, norm_weight=norm_weight, eps=eps, gated=gated)


@gemv_op.register_fake
def _gemv_fake(x, weight, bias, residual, norm_weight, eps, gated):  # noqa: ANN001, ANN202
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    return x.new_empty((x.shape[0], n))


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    as_custom_op: bool = False,
) -> torch.Tensor:
    """`gemv` called directly (eager) or through the custom op (under torch.compile)."""
    if as_custom_op:
        return torch.ops.mmengine.gemv(x, weight, bias, residual, norm_weight, eps, gated)
    return gemv(
        x,
        weight,
        bias,
        residual=residual,
        norm_weight=norm_weight,
        eps=eps,
        gated=gated,
    )

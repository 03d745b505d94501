"""Decoder-layer kernels as opaque ops for torch.compile (attention's are in attention.py).

- `mmengine::gemv`: decode steps of one token run each projection of a decoder layer
  through `mmkernels/gemv.py`, with the RMSNorms, the SiLU-and-mul and the residual adds
  fused into the projections around them (four launches around attention instead of
  ~nine). The compiler must not look inside, or it would re-split the fused kernel.
- `mmengine::gemv_norm_out` (`extra={"gemv_norm_out": 1}`): o_proj's GEMV that also
  writes the post-attention RMSNorm of its output, so gate_up runs without a norm.
- `mmengine::mlp_flow` (`extra={"mlp_flow": 1}`): o_proj -> norm -> gate_up -> down of a
  one-token step as one dataflow launch (`mmkernels/mlp_flow.py`).
- `mmengine::add_rms_norm`: the residual add + RMSNorm between projections. As torch ops
  the compiler fuses `o_proj(x) + residual` into `addmm(residual, x, W, out=buf)`, and
  ATen's addmm with a separate `out` first copies the residual into it: one extra
  hidden-size copy per projection (0.76 ms of an 81 ms 8 x 1024 prefill step on an H100,
  36 `memcpy32_post` launches per decode graph). Opaque, the add stays in the norm kernel.
- `mmengine::add_rms_norm_triton` (`norm_triton_op`, on by default under torch.compile on
  CUDA): the same kernel as a `torch.library.triton_op`. torch.compile traces into it and
  launches the kernel from its generated code, so a step launched from the host skips the
  custom-op dispatch and Triton's Python launcher twice a layer: a 256-token prefill step
  launched in 13.7 ms against 18.9 (H100, session 17, `benchmarks/bench_step_host.py`).
  Inductor still cannot see an add in it to fold into the matmul.
"""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from mmkernels.gemv import NormOut, gemv, gemv_norm_out
from mmkernels.mlp_flow import mlp_flow
from mmkernels.rms_norm import _rms_norm_kernel, rms_norm


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


# The counter is mutated only while the kernel runs (0 before and after), so the op is
# declared pure: a declared mutation would make the compiler copy it around every call.
@torch.library.custom_op("mmengine::gemv_norm_out", mutates_args=())
def gemv_norm_out_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    counter: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return gemv_norm_out(x, weight, residual=residual, norm_out=NormOut(norm_weight, eps, counter))


@gemv_norm_out_op.register_fake
def _gemv_norm_out_fake(x, weight, residual, norm_weight, eps, counter):  # noqa: ANN001, ANN202
    out = x.new_empty((x.shape[0], weight.shape[0]))
    return out, torch.empty_like(out)


def fused_linear_norm_out(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    counter: torch.Tensor,
    as_custom_op: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gemv_norm_out` (o_proj + residual, and the RMSNorm of the result for gate_up),
    called directly (eager) or through the custom op (under torch.compile)."""
    if as_custom_op:
        return torch.ops.mmengine.gemv_norm_out(x, weight, residual, norm_weight, eps, counter)
    return gemv_norm_out(x, weight, residual=residual, norm_out=NormOut(norm_weight, eps, counter))


# As gemv_norm_out: the counters are 0 before and after, so the op is declared pure.
@torch.library.custom_op("mmengine::mlp_flow", mutates_args=())
def mlp_flow_op(
    x: torch.Tensor,
    o_weight: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    counters: torch.Tensor,
) -> torch.Tensor:
    return mlp_flow(x, o_weight, residual, norm_weight, eps, gate_up_weight, down_weight, counters)


@mlp_flow_op.register_fake
def _mlp_flow_fake(x, o_weight, residual, *args):  # noqa: ANN001, ANN002, ANN202
    return torch.empty_like(residual)


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


@torch.library.custom_op("mmengine::add_rms_norm", mutates_args=())
def add_rms_norm_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, new_residual = rms_norm(x, weight, eps, residual)
    return out, new_residual


@add_rms_norm_op.register_fake
def _add_rms_norm_fake(x, residual, weight, eps):  # noqa: ANN001, ANN202
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return out, torch.empty_like(x)


_RMS_NORM_LAUNCHER = wrap_triton(_rms_norm_kernel)


@triton_op("mmengine::add_rms_norm_triton", mutates_args=())
def add_rms_norm_triton_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out, new_residual = rms_norm(
        x, weight, eps, residual, use_triton_kernel=True, launcher=_RMS_NORM_LAUNCHER
    )
    return out, new_residual


def fused_mlp_flow(*args: torch.Tensor | float, as_custom_op: bool = False) -> torch.Tensor:
    """`mlp_flow(x, o_weight, residual, norm_weight, eps, gate_up_weight, down_weight,
    counters)` called directly (eager) or through the custom op (under torch.compile)."""
    if as_custom_op:
        return torch.ops.mmengine.mlp_flow(*args)
    return mlp_flow(*args)

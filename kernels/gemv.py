"""Skinny matmul for decode steps of a few tokens, with the decoder's neighbours fused in.

At batch 1-8 a projection reads its whole weight to produce a handful of outputs, so its
time is the weight's bytes over memory bandwidth plus launch latency. cuBLAS reaches that
for the big projections but not for the small ones (a 2048 x 2048 o_proj at ~36% of the read
rate on an H200), and the RMSNorm, SiLU-and-mul and residual-add kernels between the
projections each cost a launch of their own. `gemv` computes `x @ weight.T` with each
program owning a few output columns for all rows of x (at one row a loop on CUDA cores over
1024-wide K tiles; at 2-8 rows tensor-core tiles with x padded to 16 rows), and optionally:

- an RMSNorm of x first (`norm_weight`): each program reads its x rows whole (a few KB) to
  get their rms, then normalizes the chunks as it streams them;
- a bias, added in fp32 before the single rounding (as cuBLAS's bias epilogue does);
- SiLU-and-mul of a fused [gate | up] weight (`gated`): a program owns columns j of the gate
  half and j of the up half, and writes silu(gate) * up;
- a residual add (`residual`): out = residual + x @ weight.T.

Roundings fall where HF's decoder layer puts them (norm output, matmul output, silu, the
product, the residual sum each rounded to the activation dtype), so the result equals the
torch reference up to the matmul's summation order.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._dispatch import check_launchable, next_power_of_2, pdl_supported, use_triton
from kernels.activation import silu_and_mul_torch
from kernels.rms_norm import rms_norm_torch

MAX_ROWS = 8  # rows of x the kernel takes; more go to the regular matmul
# Rows up to which the engine uses it by default: at one row a Qwen2.5-3B decode step on an
# H200 ran 8% faster (CUDA graph 2.73 -> 2.51 ms). At 2-8 rows the tensor-core tiles beat
# cuBLAS on three of four projections alone, but their fused RMSNorm still costs 3.5-15 us
# (H200, session 10, benchmarks/bench_gemv.py), so more rows stay opt-in.
DEFAULT_MAX_ROWS = 1


@triton.jit
def _gemv_kernel(
    out_ptr,  # [M, N] (row stride stride_om)
    x_ptr,  # [M, K] (row stride stride_xm, K contiguous)
    w_ptr,  # [N, K] contiguous; [2N, K] when GATED (gate rows, then up rows)
    bias_ptr,  # [N] (or [2N] when GATED), HAS_BIAS only
    residual_ptr,  # [M, N] (row stride stride_rm), HAS_RESIDUAL only
    norm_w_ptr,  # [K], HAS_NORM only
    eps,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_rm,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the kernel before
    DOT: tl.constexpr,  # tensor-core tiles (tl.dot, BLOCK_M >= 16) instead of a row loop
    NUM_STAGES: tl.constexpr,  # DOT: software-pipeline depth of its loops (else None)
    DOT_PRECISION: tl.constexpr,  # DOT: "ieee" for fp32 inputs (tests), else "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * K

    # The weights do not depend on the kernel before: fetch the first tile, then wait for
    # that kernel's output (x) to be complete and visible (a no-op without PDL). (The DOT
    # loop leaves its loads to Triton's pipeliner.)
    if not DOT:
        w_mask = mask_n[:, None] & (offs_k0 < K)[None, :]
        w_next = tl.load(w_rows + offs_k0[None, :], mask=w_mask, other=0.0)
        if GATED:
            wu_next = tl.load(w_rows + N * K + offs_k0[None, :], mask=w_mask, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    if HAS_NORM:  # the rms of each whole x row, before any chunk is used
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        # DOT: pipelined like its weight loop (at the DOT tiles' narrow K this is K /
        # BLOCK_K load steps; the fused norm cost 3.5-15 us there in session 10's H200
        # sweep, before this). The row loop passes NUM_STAGES None: the compiler's default,
        # as with a plain range.
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k0 + offs_k0
            xk = tl.load(
                x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0
            ).to(tl.float32)
            sum_sq += tl.sum(xk * xk, 1)
        inv_rms = tl.rsqrt(sum_sq / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if DOT:  # rows padded to 16 (zeros), each weight tile multiplied on tensor cores
        for k0 in tl.range(0, K, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k0 + offs_k0
            mask_k = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            xk = tl.load(
                x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            if HAS_NORM:  # the same roundings as the row loop below
                nw = tl.load(norm_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                xk = (xk.to(tl.float32) * inv_rms[:, None]).to(dtype).to(tl.float32)
                xk = (nw[None, :] * xk).to(dtype)
            acc = tl.dot(xk, tl.trans(w), acc, input_precision=DOT_PRECISION)
            if GATED:
                wu = tl.load(
                    w_rows + N * K + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0,
                )
                acc_up = tl.dot(xk, tl.trans(wu), acc_up, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < K
            w = w_next.to(tl.float32)
            if GATED:
                wu = wu_next.to(tl.float32)
            # Next tile's loads go out before this tile's math (fully masked after the last).
            next_k = offs_k + BLOCK_K
            w_mask = mask_n[:, None] & (next_k < K)[None, :]
            w_next = tl.load(w_rows + next_k[None, :], mask=w_mask, other=0.0)
            if GATED:
                wu_next = tl.load(w_rows + N * K + next_k[None, :], mask=w_mask, other=0.0)
            xk = tl.load(
                x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
            )
            xk = xk.to(tl.float32)
            if HAS_NORM:  # HF: weight * (x * rsqrt(var + eps)).to(dtype), rounded again
                nw = tl.load(norm_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                xk = (xk * inv_rms[:, None]).to(dtype).to(tl.float32)
                xk = (nw[None, :] * xk).to(dtype).to(tl.float32)
            for m in tl.static_range(BLOCK_M):  # each weight tile is read once for all rows
                row = offs_m[:, None] == m
                xm = tl.sum(tl.where(row, xk, 0.0), 0)
                acc = tl.where(row, acc + tl.sum(w * xm[None, :], 1)[None, :], acc)
                if GATED:
                    acc_up = tl.where(row, acc_up + tl.sum(wu * xm[None, :], 1)[None, :], acc_up)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up_bias = tl.load(bias_ptr + N + offs_n, mask=mask_n, other=0.0)
            acc_up += up_bias.to(tl.float32)[None, :]
    y = acc.to(dtype).to(tl.float32)
    if GATED:  # silu rounded, up rounded, their product rounded (as silu_and_mul)
        y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32)
        y = (y * acc_up.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        r_ptrs = residual_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


class GemvConfig(NamedTuple):
    """How `gemv` launches: output columns and K width per tile, warps; with `dot`, the
    tensor-core variant (rows padded to 16, `num_stages` weight tiles in flight)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    dot: bool = False


def launch_config(rows: int, n: int, k: int, gated: bool = False) -> GemvConfig:
    """The launch of `gemv` for `rows` x rows of width k and n output columns (per half of a
    `gated` weight).

    From an H200 sweep of Qwen2.5-3B's projections (benchmarks/bench_gemv.py --sweep):
    one or two output columns per program keep thousands of small programs in flight to
    cover memory latency, and 1024-wide K tiles make each load long and coalesced. One row:
    long rows (down, K = 11008) best with 1 column x 1 warp (74% of the read rate vs 60%
    at 2 x 2), wide outputs (gate_up) with 1 column x 2 warps (93%), the small qkv / o_proj
    with 2-4 columns x 4 warps. Two rows and more take the tensor-core variant: the row
    loop multiplies each weight tile once per row on CUDA cores and fell behind cuBLAS from
    four rows on (8 rows: 6.40 vs 2.96 ms per decode graph, H200, session 9). Its tiles
    (H200 sweep at 4 rows, session 10, the projection alone): gated (gate_up) 32 x 128 x 3
    stages 23.4 us (94% of the read rate, cuBLAS 25.0); long rows (down) 16 x 512 x 5 stages
    17.5 us (cuBLAS 16.4); the small qkv / o_proj 32 x 512 x 3 stages 6.2 / 5.9 us (cuBLAS
    6.4 / 6.1). Gated tiles stay narrow in K at any width so two weight pipelines fit in
    shared memory.
    """
    block_k = min(1024, max(64, next_power_of_2(k)))
    if rows > 1:
        if gated:
            return GemvConfig(32, min(128, block_k), 4, 3, dot=True)
        if k >= 4096:
            return GemvConfig(16, min(512, block_k), 4, 5, dot=True)
        return GemvConfig(32, min(512, block_k), 4, 3, dot=True)
    if k >= 4096:
        return GemvConfig(1, block_k, 1)
    if n >= 8192:
        return GemvConfig(1, block_k, 2)
    return GemvConfig(2, block_k, 4)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
    use_triton_kernel: bool | None = None,
    config: GemvConfig | tuple[int, int, int] | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """`[norm](x) @ weight.T + bias`, then SiLU-and-mul and/or a residual add, for few rows.

    Args:
        x: [M, K], M <= MAX_ROWS for the kernel; K must be contiguous.
        weight: [N, K] (an nn.Linear weight), or [2I, K] gate-then-up rows when `gated`.
        bias: optional [N] (or [2I]).
        residual: optional [M, N_out], added last (N_out = N, or I when `gated`).
        norm_weight: optional [K]: x goes through HF's RMSNorm with this weight and `eps`.
        gated: return silu(gate) * up of the fused projection, [M, I].
        use_triton_kernel: force the kernel (True) or the torch reference (False); None takes
            the kernel on CUDA tensors or when MMENGINE_FORCE_TRITON=1.
        config: a `GemvConfig` (or a (BLOCK_N, BLOCK_K, num_warps) row-loop launch) to
            override `launch_config` (benchmarks, tests).
        pdl: launch as a programmatic dependent of the kernel before (None: on sm_90+):
            the weight fetch starts while that kernel finishes.

    Returns:
        [M, N_out] in x's dtype.
    """
    if not use_triton(x, use_triton_kernel):
        return gemv_torch(
            x,
            weight,
            bias,
            residual=residual,
            norm_weight=norm_weight,
            eps=eps,
            gated=gated,
        )
    check_launchable(_gemv_kernel, x)
    if x.dim() != 2 or x.shape[0] > MAX_ROWS:
        raise ValueError(f"gemv takes [M <= {MAX_ROWS}, K] inputs, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    rows, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if weight.shape[1] != k or (gated and weight.shape[0] % 2):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if residual is not None and (residual.shape != out.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be [{rows}, {n}] with contiguous rows")
    if rows == 0 or n == 0:
        return out
    cfg = GemvConfig(*config) if config is not None else launch_config(rows, n, k, gated)
    if cfg.dot and cfg.block_n < 16:
        raise ValueError(f"tensor-core gemv tiles need BLOCK_N >= 16, got {cfg}")
    use_pdl = pdl_supported(x) if pdl is None else pdl
    dummy = x
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        out,
        x,
        weight,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        eps,
        rows,
        n,
        k,
        x.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        HAS_NORM=norm_weight is not None,
        HAS_BIAS=bias is not None,
        GATED=gated,
        HAS_RESIDUAL=residual is not None,
        USE_PDL=use_pdl,
        DOT=cfg.dot,
        NUM_STAGES=cfg.num_stages if cfg.dot else None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=max(16, next_power_of_2(rows)) if cfg.dot else next_power_of_2(rows),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps,
        launch_pdl=use_pdl,
    )
    return out


def gemv_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    gated: bool = False,
) -> torch.Tensor:
    """Plain-torch reference of `gemv`: the decoder's own ops in HF's order."""
    if norm_weight is not None:
        x = rms_norm_torch(x, norm_weight, eps)
    y = F.linear(x, weight, bias)
    if gated:
        y = silu_and_mul_torch(y)
    return y if residual is None else residual + y

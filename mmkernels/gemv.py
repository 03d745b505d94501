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
- a residual add (`residual`): out = residual + x @ weight.T;
- for a QKV projection (`gemv_qkv_rope`): rotary on q and k and the KV-cache write, in
  place of `mmkernels/rotary_kv.py`'s launch. A program owns pairs of weight rows, element i
  and i + head_size / 2 of a head (the two halves rotate_half mixes), the way `gated`
  pairs gate and up rows;
- for the projection before a norm (`gemv_norm_out`, o_proj): the launch's last program
  to finish reads the output rows back and writes their RMSNorm, so the next projection
  (gate_up) reads a normalized input instead of normalizing in each of its programs.

Roundings fall where HF's decoder layer puts them (norm output, matmul output, silu, the
product, the residual sum each rounded to the activation dtype), so the result equals the
torch reference up to the matmul's summation order.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from mmkernels._dispatch import (
    check_launchable,
    next_power_of_2,
    pdl_supported,
    pdl_trigger,
    use_triton,
)
from mmkernels.activation import silu_and_mul_torch
from mmkernels.rms_norm import rms_norm_torch
from mmkernels.rotary import _check_args, rotate_pair
from mmkernels.rotary_kv import rotary_write_kv_torch

MAX_ROWS = 8  # rows of x the kernel takes; more go to the regular matmul
# (The engine's default row count is EngineConfig.extra's gemv_max_tokens, mmengine/config.py.)


# stride_pos_row (M-RoPE positions' token count) changes every eager step: not specialized.
@triton.jit(do_not_specialize=["stride_pos_row"])
def _gemv_kernel(
    out_ptr,  # [M, N] (row stride stride_om)
    x_ptr,  # [M, K] (row stride stride_xm, K contiguous)
    w_ptr,  # [N, K] contiguous; [2N, K] when GATED (gate rows, then up rows)
    bias_ptr,  # [N] (or [2N] when GATED), HAS_BIAS only
    residual_ptr,  # [M, N] (row stride stride_rm), HAS_RESIDUAL only
    norm_w_ptr,  # [K], HAS_NORM only
    positions_ptr,  # ROPE: [M] int64, or [3, M] with IS_MROPE
    cos_sin_ptr,  # ROPE: [max_position, 2 * HALF] fp32: cos | sin
    key_cache_ptr,  # ROPE: [num_blocks, CACHE_BLOCK_SIZE, NUM_KV_HEADS, 2 * HALF]
    value_cache_ptr,  # ROPE: same strides as key_cache
    slot_mapping_ptr,  # ROPE: [M] int64; < 0: no cache write
    norm_out_ptr,  # NORM_OUT: [M, N] (row stride stride_nm), RMSNorm of the output rows
    norm_out_w_ptr,  # NORM_OUT: [N]
    counter_ptr,  # NORM_OUT: int32, 0 between launches
    eps,
    eps_out,  # NORM_OUT
    M,
    N,  # output columns; with ROPE rotation pairs (all heads' rows / 2)
    K,
    stride_xm,
    stride_om,
    stride_rm,
    stride_nm,
    stride_pos_row,
    stride_cs_pos,
    stride_cache_blk,
    stride_cache_pos,
    stride_cache_head,
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GATED: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    ROPE: tl.constexpr,  # a QKV projection: rotary on q and k, k and v into the KV cache
    PAIRED: tl.constexpr,  # GATED or ROPE: each program owns pairs of weight rows
    HALF: tl.constexpr,  # ROPE: head_size // 2
    NUM_Q_HEADS: tl.constexpr,  # ROPE
    NUM_KV_HEADS: tl.constexpr,  # ROPE
    CACHE_BLOCK_SIZE: tl.constexpr,  # ROPE
    IS_MROPE: tl.constexpr,  # ROPE
    MROPE_END_T: tl.constexpr,  # ROPE with IS_MROPE: as in mmkernels/rotary.py
    MROPE_END_H: tl.constexpr,
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the kernel before
    TRIGGER: tl.constexpr,  # USE_PDL: the next kernel may launch 0 before the wait, 1 after, 2 after the K loop
    DOT: tl.constexpr,  # tensor-core tiles (tl.dot, BLOCK_M >= 16) instead of a row loop
    NUM_STAGES: tl.constexpr,  # DOT: software-pipeline depth of its loops (else None)
    DOT_PRECISION: tl.constexpr,  # DOT: "ieee" for fp32 inputs (tests), else "tf32"
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM_BLOCK_K: tl.constexpr,  # HAS_NORM: K width of the rms prologue's steps
    ONE_TILE: tl.constexpr,  # the row loop with K <= BLOCK_K: x is read once, in the prologue
    NORM_OUT: tl.constexpr,  # also write the RMSNorm of the output rows (last program)
    NORM_OUT_N: tl.constexpr,  # NORM_OUT: next power of 2 >= N
):
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    # Weight rows: column n's own; a pair's second row is n + N for GATED (up after gate)
    # and, for ROPE, the row HALF further in the same head (x1 / x2 of rotate_half).
    rows_a = offs_n
    rows_b = offs_n + N
    if ROPE:
        head = offs_n // HALF
        pair_i = offs_n % HALF
        rows_a = head * (2 * HALF) + pair_i
        rows_b = rows_a + HALF
    w_rows = w_ptr + rows_a.to(tl.int64)[:, None] * K
    w_rows_b = w_ptr + rows_b.to(tl.int64)[:, None] * K

    # The weights do not depend on the kernel before: fetch the first tile, then wait for
    # that kernel's output (x) to be complete and visible (a no-op without PDL). (The DOT
    # loop leaves its loads to Triton's pipeliner.)
    if not DOT:
        w_mask = mask_n[:, None] & (offs_k0 < K)[None, :]
        w_next = tl.load(w_rows + offs_k0[None, :], mask=w_mask, other=0.0)
        if PAIRED:
            wu_next = tl.load(w_rows_b + offs_k0[None, :], mask=w_mask, other=0.0)
    if USE_PDL:
        if TRIGGER == 0:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if TRIGGER == 1:
            tl.extra.cuda.gdc_launch_dependents()

    if HAS_NORM:  # the rms of each whole x row, before any chunk is used
        # DOT: its own K width, pipelined like the weight loop (widths 128-1024 timed alike
        # on an H200 in session 11: the fused norm's cost there is the K loop's per-tile
        # normalization, not this). The row loop passes BLOCK_K and NUM_STAGES None (the
        # compiler's default, as with a plain range).
        if ONE_TILE:  # the whole rows are the loop's one x tile: load them once
            x_one = tl.load(
                x_rows + offs_k0[None, :], mask=mask_m[:, None] & (offs_k0 < K)[None, :], other=0.0
            ).to(tl.float32)
            sum_sq = tl.sum(x_one * x_one, 1)
        else:
            offs_nk = tl.arange(0, NORM_BLOCK_K)
            sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
            for k0 in tl.range(0, K, NORM_BLOCK_K, num_stages=NUM_STAGES):
                offs_k = k0 + offs_nk
                xk = tl.load(
                    x_rows + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :],
                    other=0.0,
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
            if PAIRED:
                wu = tl.load(
                    w_rows_b + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :],
                    other=0.0,
                )
                acc_up = tl.dot(xk, tl.trans(wu), acc_up, input_precision=DOT_PRECISION)
    else:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            mask_k = offs_k < K
            w = w_next.to(tl.float32)
            if PAIRED:
                wu = wu_next.to(tl.float32)
            # Next tile's loads go out before this tile's math (fully masked after the last).
            next_k = offs_k + BLOCK_K
            w_mask = mask_n[:, None] & (next_k < K)[None, :]
            w_next = tl.load(w_rows + next_k[None, :], mask=w_mask, other=0.0)
            if PAIRED:
                wu_next = tl.load(w_rows_b + next_k[None, :], mask=w_mask, other=0.0)
            if HAS_NORM and ONE_TILE:
                xk = x_one
            else:
                xk = tl.load(
                    x_rows + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
                ).to(tl.float32)
            if HAS_NORM:  # HF: weight * (x * rsqrt(var + eps)).to(dtype), rounded again
                nw = tl.load(norm_w_ptr + offs_k, mask=mask_k, other=0.0).to(tl.float32)
                xk = (xk * inv_rms[:, None]).to(dtype).to(tl.float32)
                xk = (nw[None, :] * xk).to(dtype).to(tl.float32)
            for m in tl.static_range(BLOCK_M):  # each weight tile is read once for all rows
                row = offs_m[:, None] == m
                xm = tl.sum(tl.where(row, xk, 0.0), 0)
                acc = tl.where(row, acc + tl.sum(w * xm[None, :], 1)[None, :], acc)
                if PAIRED:
                    acc_up = tl.where(row, acc_up + tl.sum(wu * xm[None, :], 1)[None, :], acc_up)

    if USE_PDL and TRIGGER == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_a, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if PAIRED:
            bias_b = tl.load(bias_ptr + rows_b, mask=mask_n, other=0.0)
            acc_up += bias_b.to(tl.float32)[None, :]
    y = acc.to(dtype).to(tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    if ROPE:
        _rope_epilogue(
            y,
            acc_up.to(dtype).to(tl.float32),
            out_ptr,
            key_cache_ptr,
            value_cache_ptr,
            slot_mapping_ptr,
            positions_ptr,
            cos_sin_ptr,
            offs_m,
            mask_m,
            mask,
            head,
            pair_i,
            stride_om,
            stride_pos_row,
            stride_cs_pos,
            stride_cache_blk,
            stride_cache_pos,
            stride_cache_head,
            HALF,
            NUM_Q_HEADS,
            NUM_KV_HEADS,
            CACHE_BLOCK_SIZE,
            IS_MROPE,
            MROPE_END_T,
            MROPE_END_H,
        )
    else:
        if GATED:  # silu rounded, up rounded, their product rounded (as silu_and_mul)
            y = (y / (1.0 + tl.exp(-y))).to(dtype).to(tl.float32)
            y = (y * acc_up.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        if HAS_RESIDUAL:
            r_ptrs = residual_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
            y = y + tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
        o_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if NORM_OUT:
            _norm_out_last_program(
                out_ptr,
                norm_out_ptr,
                norm_out_w_ptr,
                counter_ptr,
                eps_out,
                offs_m,
                mask_m,
                N,
                stride_om,
                stride_nm,
                NORM_OUT_N,
            )


@triton.jit
def _norm_out_last_program(
    out_ptr,
    norm_out_ptr,
    norm_w_ptr,
    counter_ptr,
    eps,
    offs_m,
    mask_m,
    N,
    stride_om,
    stride_nm,
    NORM_N: tl.constexpr,
):
    """The program that stores the launch's last output columns reads the whole rows back
    and writes their RMSNorm (HF's roundings), so the projection after the norm reads
    finished inputs instead of every program of it normalizing x again.

    The pattern of paged attention's fused merge: a CTA barrier orders every thread's
    stores before the one thread's acquire-release atomic; the program that reads
    num_programs - 1 has synchronized with every other program's release, loads the rows
    through L2 (".cg"), and puts the counter back to 0 for the next launch."""
    dtype = out_ptr.dtype.element_ty
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        offs = tl.arange(0, NORM_N)
        rows = offs_m.to(tl.int64)[:, None]
        mask = mask_m[:, None] & (offs < N)[None, :]
        x = tl.load(
            out_ptr + rows * stride_om + offs[None, :], mask=mask, other=0.0, cache_modifier=".cg"
        )
        x = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, 1) / N + eps)
        h = (x * inv_rms[:, None]).to(dtype).to(tl.float32)
        w = tl.load(norm_w_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        tl.store(
            norm_out_ptr + rows * stride_nm + offs[None, :], (w[None, :] * h).to(dtype), mask=mask
        )
        tl.store(counter_ptr, 0)


@triton.jit
def _rope_epilogue(
    x1,  # [BLOCK_M, BLOCK_N] fp32 (rounded to the activation dtype): first-half elements
    x2,  # the same pairs' second-half elements
    q_out_ptr,  # [M, NUM_Q_HEADS * 2 * HALF]
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    positions_ptr,
    cos_sin_ptr,
    offs_m,
    mask_m,
    mask,  # [BLOCK_M, BLOCK_N]: real rows and pairs
    head,  # [BLOCK_N]: head of each pair, q heads then k heads then v heads
    pair_i,  # [BLOCK_N]: frequency index within the head
    stride_qo,
    stride_pos_row,
    stride_cs_pos,
    stride_cache_blk,
    stride_cache_pos,
    stride_cache_head,
    HALF: tl.constexpr,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    CACHE_BLOCK_SIZE: tl.constexpr,
    IS_MROPE: tl.constexpr,
    MROPE_END_T: tl.constexpr,
    MROPE_END_H: tl.constexpr,
):
    """`rotary_write_kv` on a tile of the QKV projection: q pairs rotated into q_out, k
    pairs rotated and v pairs as they are into each row's cache slot (none below 0)."""
    dtype = q_out_ptr.dtype.element_ty
    if IS_MROPE:  # frequency i takes the t, h or w position by the section it falls in
        pos_t = tl.load(positions_ptr + offs_m, mask=mask_m, other=0)[:, None]
        pos_h = tl.load(positions_ptr + stride_pos_row + offs_m, mask=mask_m, other=0)[:, None]
        pos_w = tl.load(positions_ptr + 2 * stride_pos_row + offs_m, mask=mask_m, other=0)
        i = pair_i[None, :]
        pos = tl.where(i < MROPE_END_T, pos_t, tl.where(i < MROPE_END_H, pos_h, pos_w[:, None]))
    else:
        pos = tl.load(positions_ptr + offs_m, mask=mask_m, other=0)[:, None]
    cs = cos_sin_ptr + pos.to(tl.int64) * stride_cs_pos + pair_i[None, :]
    cos = tl.load(cs, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=mask, other=0.0).to(tl.float32)
    r1, r2 = rotate_pair(x1, x2, cos, sin, dtype)
    is_q = head < NUM_Q_HEADS
    is_v = head >= NUM_Q_HEADS + NUM_KV_HEADS
    o1 = tl.where(is_v[None, :], x1, r1)
    o2 = tl.where(is_v[None, :], x2, r2)

    q_cols = (head * (2 * HALF) + pair_i)[None, :]
    q_ptrs = q_out_ptr + offs_m.to(tl.int64)[:, None] * stride_qo + q_cols
    q_mask = mask & is_q[None, :]
    tl.store(q_ptrs, o1.to(dtype), mask=q_mask)
    tl.store(q_ptrs + HALF, o2.to(dtype), mask=q_mask)

    slot = tl.load(slot_mapping_ptr + offs_m, mask=mask_m, other=-1).to(tl.int64)
    # 64-bit: block id x block stride overflows int32 on large caches.
    row_off = (slot // CACHE_BLOCK_SIZE) * stride_cache_blk
    row_off += (slot % CACHE_BLOCK_SIZE) * stride_cache_pos
    kv_head = tl.where(is_v, head - NUM_Q_HEADS - NUM_KV_HEADS, head - NUM_Q_HEADS)
    off = row_off[:, None] + (kv_head.to(tl.int64) * stride_cache_head + pair_i)[None, :]
    cache_mask = mask & (slot >= 0)[:, None] & ~is_q[None, :]
    k_mask = cache_mask & ~is_v[None, :]
    v_mask = cache_mask & is_v[None, :]
    cache_dtype = key_cache_ptr.dtype.element_ty
    tl.store(key_cache_ptr + off, o1.to(dtype).to(cache_dtype), mask=k_mask)
    tl.store(key_cache_ptr + off + HALF, o2.to(dtype).to(cache_dtype), mask=k_mask)
    tl.store(value_cache_ptr + off, o1.to(dtype).to(cache_dtype), mask=v_mask)
    tl.store(value_cache_ptr + off + HALF, o2.to(dtype).to(cache_dtype), mask=v_mask)


class GemvConfig(NamedTuple):
    """How `gemv` launches: output columns and K width per tile, warps; with `dot`, the
    tensor-core variant (rows padded to 16, `num_stages` weight tiles in flight)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 1
    dot: bool = False
    norm_block_k: int = 512  # dot with a fused norm: K width of its rms prologue


def launch_config(
    rows: int, n: int, k: int, gated: bool = False, rope: bool = False, norm: bool = False
) -> GemvConfig:
    """The launch of `gemv` for `rows` x rows of width k and n output columns (per half of a
    `gated` weight; n rotation pairs for `gemv_qkv_rope`).

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
    shared memory. With a fused RMSNorm (`norm`), a one-row gated launch takes 2 columns x 4
    warps: each program reads the x row twice (the rms prologue, then the K loop) and the
    norm weight once, so two columns a program halve those cached reads; in the batch-1
    layer chain (36 Qwen2.5-3B layers, benchmarks/bench_b1_layers.py, H200, session 15) it
    ran 2.122 ms against 2.162 with 1 x 2.
    """
    block_k = min(1024, max(64, next_power_of_2(k)))
    if rope:  # two weight rows per pair (q/k/v elements i and i + head_size / 2)
        if rows > 1:
            return GemvConfig(32, min(256, block_k), 4, 3, dot=True)
        return GemvConfig(1, block_k, 4)
    if rows > 1:
        if gated:
            return GemvConfig(32, min(128, block_k), 4, 3, dot=True)
        if k >= 4096:
            return GemvConfig(16, min(512, block_k), 4, 5, dot=True)
        return GemvConfig(32, min(512, block_k), 4, 3, dot=True)
    if k >= 4096:
        return GemvConfig(1, block_k, 1)
    if n >= 8192:
        return GemvConfig(2, block_k, 4) if gated and norm else GemvConfig(1, block_k, 2)
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
    return _gemv(x, weight, bias, residual, norm_weight, eps, gated, config, pdl, None)[0]


class NormOut(NamedTuple):
    """The RMSNorm `gemv_norm_out` applies to its output rows (the next norm of the layer)."""

    weight: torch.Tensor  # [N]
    eps: float
    counter: torch.Tensor  # int32 [1], zero; the launch leaves it zero (one per stream)


def gemv_norm_out(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    residual: torch.Tensor | None,
    norm_out: NormOut,
    use_triton_kernel: bool | None = None,
    config: GemvConfig | tuple[int, int, int] | None = None,
    pdl: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`gemv` (+ residual) that also returns the RMSNorm of its output rows: the o_proj
    launch handing gate_up its normalized input, so that gate_up's thousands of programs
    do not each read the whole x row for its rms and normalize every tile again.

    The program that finishes last (an atomic count) reads the rows back and normalizes
    them; `norm_out.counter` must be zero before the launch and is zero after it.

    Returns:
        (out, rms_norm(out, norm_out.weight, norm_out.eps)), both [M, N].
    """
    if not use_triton(x, use_triton_kernel):
        out = gemv_torch(x, weight, residual=residual)
        return out, rms_norm_torch(out, norm_out.weight, norm_out.eps)
    out, normed = _gemv(x, weight, None, residual, None, 0.0, False, config, pdl, norm_out)
    assert normed is not None
    return out, normed


def _gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    gated: bool,
    config: GemvConfig | tuple[int, int, int] | None,
    pdl: bool | None,
    norm_out: NormOut | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks and launches `gemv` / `gemv_norm_out` on the Triton kernel."""
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
    normed = None
    if norm_out is not None:
        if norm_out.weight.shape != (n,) or norm_out.counter.dtype != torch.int32:
            raise ValueError(
                f"norm_out needs a [{n}] weight and an int32 counter, got "
                f"{tuple(norm_out.weight.shape)} and {norm_out.counter.dtype}"
            )
        normed = torch.empty_like(out)
    if rows == 0 or n == 0:
        return out, normed
    cfg = (
        GemvConfig(*config)
        if config is not None
        else launch_config(rows, n, k, gated, norm=norm_weight is not None)
    )
    _launch(
        out, x, weight, bias, residual, norm_weight, eps, n, cfg, pdl, gated=gated,
        norm_out=norm_out, normed=normed,
    )  # fmt: skip
    return out, normed


@dataclass(frozen=True)
class _Rope:
    """The ROPE epilogue's tensors and shape (see `gemv_qkv_rope`)."""

    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    slot_mapping: torch.Tensor
    num_q_heads: int
    mrope_section: list[int] | None


def _launch(
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    n: int,
    cfg: GemvConfig,
    pdl: bool | None,
    *,
    gated: bool = False,
    rope: _Rope | None = None,
    norm_out: NormOut | None = None,
    normed: torch.Tensor | None = None,
) -> None:
    """One `_gemv_kernel` launch over n output columns (or n rotation pairs with rope)."""
    if cfg.dot and cfg.block_n < 16:
        raise ValueError(f"tensor-core gemv tiles need BLOCK_N >= 16, got {cfg}")
    use_pdl = pdl_supported(x) if pdl is None else pdl
    rows, k = x.shape
    dummy = x
    if rope is None:
        rope_tensors = (dummy,) * 5
        rope_strides = (0,) * 5
        rope_meta = dict(HALF=1, NUM_Q_HEADS=1, NUM_KV_HEADS=1, CACHE_BLOCK_SIZE=1)
        rope_meta.update(IS_MROPE=False, MROPE_END_T=0, MROPE_END_H=0)
    else:
        cache = rope.key_cache
        sections = rope.mrope_section or [cache.shape[-1] // 2, 0, 0]
        rope_tensors = (
            rope.positions,
            rope.cos_sin_cache,
            rope.key_cache,
            rope.value_cache,
            rope.slot_mapping,
        )
        rope_strides = (
            rope.positions.stride(0) if rope.mrope_section else 0,
            rope.cos_sin_cache.stride(0),
            *cache.stride()[:3],
        )
        rope_meta = dict(
            HALF=cache.shape[-1] // 2,
            NUM_Q_HEADS=rope.num_q_heads,
            NUM_KV_HEADS=cache.shape[2],
            CACHE_BLOCK_SIZE=cache.shape[1],
            IS_MROPE=rope.mrope_section is not None,
            MROPE_END_T=sections[0],
            MROPE_END_H=sections[0] + sections[1],
        )
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        out,
        x,
        weight,
        bias if bias is not None else dummy,
        residual if residual is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        *rope_tensors,
        normed if normed is not None else dummy,
        norm_out.weight if norm_out is not None else dummy,
        norm_out.counter if norm_out is not None else dummy,
        eps,
        norm_out.eps if norm_out is not None else 0.0,
        rows,
        n,
        k,
        x.stride(0),
        out.stride(0),
        residual.stride(0) if residual is not None else 0,
        normed.stride(0) if normed is not None else 0,
        *rope_strides,
        HAS_NORM=norm_weight is not None,
        HAS_BIAS=bias is not None,
        GATED=gated,
        HAS_RESIDUAL=residual is not None,
        ROPE=rope is not None,
        PAIRED=gated or rope is not None,
        **rope_meta,
        USE_PDL=use_pdl,
        TRIGGER=pdl_trigger("rope" if rope is not None else "gated" if gated else "plain"),
        DOT=cfg.dot,
        NUM_STAGES=cfg.num_stages if cfg.dot else None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=max(16, next_power_of_2(rows)) if cfg.dot else next_power_of_2(rows),
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        NORM_BLOCK_K=max(cfg.block_k, min(cfg.norm_block_k, next_power_of_2(k)))
        if cfg.dot
        else cfg.block_k,
        ONE_TILE=not cfg.dot and k <= cfg.block_k,
        NORM_OUT=norm_out is not None,
        NORM_OUT_N=next_power_of_2(n) if norm_out is not None else 1,
        num_warps=cfg.num_warps,
        launch_pdl=use_pdl,
    )


def gemv_qkv_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    norm_weight: torch.Tensor | None,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    mrope_section: list[int] | None = None,
    use_triton_kernel: bool | None = None,
    config: GemvConfig | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """The QKV projection of a few tokens with rotary and the KV-cache write in its
    epilogue: `gemv` (norm, bias) then `rotary_write_kv`, in one launch.

    Each program owns pairs of weight rows (element i and i + head_size / 2 of a head),
    so it holds both halves that rotate_half mixes; the q pairs go out rotated, the k pairs
    rotated and the v pairs as they are into each token's cache slot.

    Args:
        x: [M, hidden], M <= MAX_ROWS; weight: [(Hq + 2 Hk) * D, hidden] (q, k, v rows);
        bias, norm_weight, eps: as in `gemv`.
        positions, cos_sin_cache, mrope_section: as in `rotary_write_kv` (full-width rotary).
        key_cache, value_cache: [num_blocks, block_size, Hk, D], equal strides, last dim
            contiguous; slot_mapping: int64 [M] (< 0: no write).
        num_q_heads: Hq.

    Returns:
        q rotated, [M, Hq, D].
    """
    head_size, num_kv_heads = key_cache.shape[-1], key_cache.shape[2]
    q_rows = num_q_heads * head_size
    if weight.shape[0] != q_rows + 2 * num_kv_heads * head_size or head_size % 2:
        raise ValueError(
            f"QKV weight {tuple(weight.shape)} does not fit {num_q_heads} q heads and "
            f"{num_kv_heads} kv heads of size {head_size} (even)"
        )
    _check_args(key_cache, positions, cos_sin_cache, head_size, mrope_section)  # head_size fits
    if not use_triton(x, use_triton_kernel):
        return gemv_qkv_rope_torch(
            x,
            weight,
            bias,
            norm_weight=norm_weight,
            eps=eps,
            positions=positions,
            cos_sin_cache=cos_sin_cache,
            key_cache=key_cache,
            value_cache=value_cache,
            slot_mapping=slot_mapping,
            num_q_heads=num_q_heads,
            mrope_section=mrope_section,
        )
    check_launchable(_gemv_kernel, x)
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv takes [M <= {MAX_ROWS}, K] inputs, got {tuple(x.shape)}")
    if any(t.stride(-1) != 1 for t in (key_cache, cos_sin_cache)):
        raise ValueError("the caches and cos_sin_cache need a contiguous last dim")
    if key_cache.stride() != value_cache.stride():
        raise ValueError("key_cache and value_cache need equal strides")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight if weight.is_contiguous() else weight.contiguous()
    rows, k = x.shape
    q = torch.empty((rows, num_q_heads, head_size), dtype=x.dtype, device=x.device)
    if rows == 0:
        return q
    pairs = weight.shape[0] // 2
    cfg = config if config is not None else launch_config(rows, pairs, k, rope=True)
    rope = _Rope(
        positions,
        cos_sin_cache,
        key_cache,
        value_cache,
        slot_mapping,
        num_q_heads,
        list(mrope_section) if mrope_section is not None else None,
    )
    _launch(
        q.view(rows, q_rows), x, weight, bias, None, norm_weight, eps, pairs, cfg, pdl, rope=rope
    )
    return q


def gemv_qkv_rope_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    norm_weight: torch.Tensor | None,
    eps: float,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_q_heads: int,
    mrope_section: list[int] | None = None,
) -> torch.Tensor:
    """Plain-torch reference of `gemv_qkv_rope`: `gemv_torch`, then `rotary_write_kv_torch`
    on the q / k / v column blocks."""
    qkv = gemv_torch(x, weight, bias, norm_weight=norm_weight, eps=eps)
    t, d, hk = x.shape[0], key_cache.shape[-1], key_cache.shape[2]
    q, k, v = qkv.split([num_q_heads * d, hk * d, hk * d], -1)
    return rotary_write_kv_torch(
        q.view(t, num_q_heads, d),
        k.view(t, hk, d),
        v.view(t, hk, d),
        positions,
        cos_sin_cache,
        key_cache,
        value_cache,
        slot_mapping,
        mrope_section=mrope_section,
    )


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

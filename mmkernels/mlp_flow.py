"""One launch for the second half of a decoder layer at batch 1 (experimental, benchmarks only).

`o_proj (+ residual) -> RMSNorm -> gate_up (SiLU-and-mul) -> down (+ residual)` is three
GEMV launches in the engine's one-token path (`mmkernels/gemv.py`), each waiting for the
whole launch before it. Here it is one launch of tasks that wait only for what they read:

- o_proj tasks (a few output columns each) fetch their weights, wait for the kernel before
  (PDL), write the residual stream `s`; the last to finish (an acquire-release count, as in
  paged attention's fused merge) writes `h = rmsnorm(s)` and raises a flag;
- gate_up tasks fetch their weights, wait for the flag, write their `silu(gate) * up`
  columns and count them into the counter of their K chunk of down;
- down tasks (a column group x one K chunk) fetch their weights, wait for that chunk's
  counter only, so down overlaps gate_up's tail, and store an fp32 partial; the last chunk
  of a column group to finish sums the partials in a fixed order (deterministic), rounds,
  adds `s` and rounds again, as the GEMV does.

Each program runs one task. With `ticket` (default) a program takes its task number from
an atomic counter rather than its program id, so a task only ever waits for tasks that
running programs already hold: no deadlock whatever order the GPU starts programs in, and
Triton's interpreter (programs one after another) runs it unchanged. Every counter is back
to zero when the launch ends (the last finishers reset them), so CUDA graphs replay it.
docs/design-notes.md ("One-token decode steps") has the reasoning; it is timed against the
three launches in `benchmarks/bench_b1_layers.py` (variant `mlp=flow`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import check_launchable, next_power_of_2, pdl_supported, use_triton
from mmkernels.gemv import gemv_torch
from mmkernels.rms_norm import rms_norm_torch

_FIXED = 4  # sync words before the counters: ticket, o_proj arrivals, norm flag, groups done


class MlpFlowConfig(NamedTuple):
    """Task sizes of `mlp_flow` (powers of two; `chunk` a multiple of `gu_cols`)."""

    o_cols: int = 2  # o_proj output columns a task
    gu_cols: int = 2  # gate_up columns a task (each a gate and an up row)
    down_cols: int = 4  # down output columns a task
    chunk: int = 1024  # down's K chunk: one task's share of the row, one counter
    num_warps: int = 4
    ticket: bool = True  # task numbers from an atomic ticket (else the program id)


DEFAULT_CONFIG = MlpFlowConfig()


def mlp_flow_counters(
    hidden: int, inter: int, device: torch.device | str, config: MlpFlowConfig = DEFAULT_CONFIG
) -> torch.Tensor:
    """The int32 counters of one `mlp_flow` launch site, zero (and zero again after each
    launch): ticket, o_proj arrivals, norm flag, groups done, one per K chunk of down, one
    per column group. Give each layer its own: under early PDL triggers the next layer's
    launch may start while this one still runs."""
    chunks = triton.cdiv(inter, config.chunk)
    groups = triton.cdiv(hidden, config.down_cols)
    return torch.zeros(_FIXED + chunks + groups, dtype=torch.int32, device=device)


@triton.jit
def _wait_at_least(ptr, target, ASM: tl.constexpr):
    """Spin until the int32 at `ptr` is >= target, with acquire semantics at GPU scope
    (sm_90: a plain acquire load per poll; elsewhere, e.g. the interpreter, an atomic)."""
    if ASM:  # polls back off 32 ns, so thousands of waiting tasks do not crowd the L2
        v = tl.inline_asm_elementwise(
            "ld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
            is_pure=False, pack=1,
        )  # fmt: skip
        while v < target:
            v = tl.inline_asm_elementwise(
                "nanosleep.u32 32;\n\tld.global.acquire.gpu.b32 $0, [$1];", "=r,l", [ptr],
                dtype=tl.int32, is_pure=False, pack=1,
            )  # fmt: skip
    else:
        v = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")
        while v < target:
            v = tl.atomic_add(ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def _mlp_flow_kernel(
    out_ptr,  # [H] the new residual stream
    s_ptr,  # [H] scratch: residual + o_proj(a)
    h_ptr,  # [H] scratch: rmsnorm(s)
    act_ptr,  # [I] scratch
    part_ptr,  # [NCH, H] fp32 scratch
    a_ptr,  # [KIN] attention output (written by the kernel before)
    wo_ptr,  # [H, KIN]
    res_ptr,  # [H] residual stream in
    nw_ptr,  # [H] post-attention norm weight
    wgu_ptr,  # [2I, H]: gate rows, then up rows
    wd_ptr,  # [H, I]
    sync_ptr,  # int32: ticket, o_proj arrivals, norm flag, groups done, [NCH], [NG]
    eps,
    H,
    KIN,
    I,  # noqa: E741
    N_O,  # o_proj tasks
    N_GU,  # gate_up tasks
    NG,  # down column groups
    NCH,  # down K chunks
    O_BN: tl.constexpr,
    KIN_PAD: tl.constexpr,
    H_PAD: tl.constexpr,
    GU_BN: tl.constexpr,
    D_BN: tl.constexpr,
    CHUNK: tl.constexpr,
    TICKET: tl.constexpr,
    USE_PDL: tl.constexpr,
    ASM: tl.constexpr,
):
    if TICKET:
        task = tl.atomic_add(sync_ptr, 1, sem="relaxed", scope="gpu")
        if task == N_O + N_GU + NG * NCH - 1:  # every task is taken: ready for the next launch
            tl.store(sync_ptr, 0)
    else:
        task = tl.program_id(0)
    if USE_PDL:  # the next kernel may launch (and fetch its weights) once all tasks started
        tl.extra.cuda.gdc_launch_dependents()
    o_arrived = sync_ptr + 1
    norm_flag = sync_ptr + 2
    groups_done = sync_ptr + 3
    chunk_count = sync_ptr + 4  # [NCH]: gate_up tasks done per K chunk of down
    group_count = sync_ptr + 4 + NCH  # [NG]: down chunks done per column group

    if task < N_O:
        _o_proj_task(
            task, s_ptr, h_ptr, a_ptr, wo_ptr, res_ptr, nw_ptr, o_arrived, norm_flag, eps,
            H, KIN, N_O, O_BN, KIN_PAD, H_PAD, USE_PDL,
        )  # fmt: skip
    elif task < N_O + N_GU:
        _gate_up_task(
            task - N_O, act_ptr, h_ptr, wgu_ptr, norm_flag, chunk_count, H, I, H_PAD, GU_BN,
            CHUNK, ASM,
        )  # fmt: skip
    else:
        _down_task(
            task - N_O - N_GU, out_ptr, s_ptr, act_ptr, part_ptr, wd_ptr, norm_flag,
            groups_done, chunk_count, group_count, H, I, NG, NCH, GU_BN, D_BN, CHUNK, ASM,
        )  # fmt: skip


@triton.jit
def _o_proj_task(
    task, s_ptr, h_ptr, a_ptr, wo_ptr, res_ptr, nw_ptr, o_arrived, norm_flag, eps, H, KIN,
    N_O, O_BN: tl.constexpr, KIN_PAD: tl.constexpr, H_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    """o_proj + residual -> s; the last task to finish also writes h = rmsnorm(s)."""
    dtype = a_ptr.dtype.element_ty
    cols = task * O_BN + tl.arange(0, O_BN)
    mc = cols < H
    k = tl.arange(0, KIN_PAD)
    mk = k < KIN
    w = tl.load(
        wo_ptr + cols.to(tl.int64)[:, None] * KIN + k[None, :],
        mask=mc[:, None] & mk[None, :],
        other=0.0,
    )
    if USE_PDL:  # the weights were fetched; now the attention output must be complete
        tl.extra.cuda.gdc_wait()
    a = tl.load(a_ptr + k, mask=mk, other=0.0).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * a[None, :], 1).to(dtype).to(tl.float32)
    y += tl.load(res_ptr + cols, mask=mc, other=0.0).to(tl.float32)
    tl.store(s_ptr + cols, y.to(dtype), mask=mc)
    tl.debug_barrier()  # every thread's stores before the one thread's release
    arrived = tl.atomic_add(o_arrived, 1, sem="acq_rel", scope="gpu")
    if arrived == N_O - 1:
        offs = tl.arange(0, H_PAD)
        m = offs < H
        x = tl.load(s_ptr + offs, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
        hx = (x * inv_rms).to(dtype).to(tl.float32)
        nw = tl.load(nw_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(h_ptr + offs, (nw * hx).to(dtype), mask=m)
        tl.store(o_arrived, 0)
        tl.debug_barrier()
        tl.atomic_xchg(norm_flag, 1, sem="release", scope="gpu")


@triton.jit
def _gate_up_task(
    t, act_ptr, h_ptr, wgu_ptr, norm_flag, chunk_count, H, I, H_PAD: tl.constexpr,  # noqa: E741
    GU_BN: tl.constexpr, CHUNK: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """gate_up + SiLU-and-mul on h -> act columns, counted into their K chunk of down."""
    dtype = act_ptr.dtype.element_ty
    cols = t * GU_BN + tl.arange(0, GU_BN)
    mc = cols < I
    k = tl.arange(0, H_PAD)
    m = mc[:, None] & (k < H)[None, :]
    rows = cols.to(tl.int64)[:, None] * H + k[None, :]
    wg = tl.load(wgu_ptr + rows, mask=m, other=0.0)
    wu = tl.load(wgu_ptr + I.to(tl.int64) * H + rows, mask=m, other=0.0)
    _wait_at_least(norm_flag, 1, ASM)
    x = tl.load(h_ptr + k, mask=k < H, other=0.0, cache_modifier=".cg").to(tl.float32)
    g = tl.sum(wg.to(tl.float32) * x[None, :], 1).to(dtype).to(tl.float32)
    u = tl.sum(wu.to(tl.float32) * x[None, :], 1).to(dtype).to(tl.float32)
    g = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(act_ptr + cols, (g * u).to(dtype), mask=mc)
    tl.debug_barrier()
    tl.atomic_add(chunk_count + (t * GU_BN) // CHUNK, 1, sem="release", scope="gpu")


@triton.jit
def _down_task(
    t, out_ptr, s_ptr, act_ptr, part_ptr, wd_ptr, norm_flag, groups_done, chunk_count,
    group_count, H, I, NG, NCH, GU_BN: tl.constexpr, D_BN: tl.constexpr,  # noqa: E741
    CHUNK: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """down over one K chunk -> an fp32 partial; a column group's last chunk to finish sums
    them in a fixed order (deterministic) and adds s; the last group resets the counters."""
    dtype = act_ptr.dtype.element_ty
    c = t // NG  # chunk-major: the first chunks' tasks are taken first
    g = t % NG
    cols = g * D_BN + tl.arange(0, D_BN)
    mc = cols < H
    k = c * CHUNK + tl.arange(0, CHUNK)
    mk = k < I
    w = tl.load(
        wd_ptr + cols.to(tl.int64)[:, None] * I + k[None, :],
        mask=mc[:, None] & mk[None, :],
        other=0.0,
    )
    _wait_at_least(chunk_count + c, tl.cdiv(tl.minimum(CHUNK, I - c * CHUNK), GU_BN), ASM)
    x = tl.load(act_ptr + k, mask=mk, other=0.0, cache_modifier=".cg").to(tl.float32)
    tl.store(part_ptr + c * H + cols, tl.sum(w.to(tl.float32) * x[None, :], 1), mask=mc)
    tl.debug_barrier()
    arrived = tl.atomic_add(group_count + g, 1, sem="acq_rel", scope="gpu")
    if arrived == NCH - 1:
        acc = tl.zeros([D_BN], dtype=tl.float32)
        for cc in range(0, NCH):  # a fixed order: the same sums every launch
            acc += tl.load(part_ptr + cc * H + cols, mask=mc, other=0.0, cache_modifier=".cg")
        s = tl.load(s_ptr + cols, mask=mc, other=0.0, cache_modifier=".cg").to(tl.float32)
        y = acc.to(dtype).to(tl.float32) + s
        tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=mc)
        tl.store(group_count + g, 0)
        tl.debug_barrier()
        done = tl.atomic_add(groups_done, 1, sem="acq_rel", scope="gpu")
        if done == NG - 1:  # every task is past its waits: reset for the next launch
            tl.store(norm_flag, 0)
            for cc in range(0, NCH):
                tl.store(chunk_count + cc, 0)
            tl.store(groups_done, 0)


def mlp_flow(
    attn: torch.Tensor,
    o_weight: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    counters: torch.Tensor,
    config: MlpFlowConfig = DEFAULT_CONFIG,
    *,
    use_triton_kernel: bool | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """`residual + o_proj(attn)` -> `s`; returns `s + down(silu(gate(h)) * up(h))` with
    `h = rmsnorm(s)`, for one token, in one launch (see the module docstring).

    Args:
        attn: [1, KIN] attention output; residual: [1, H] the residual stream.
        o_weight: [H, KIN]; gate_up_weight: [2I, H] (gate rows, then up); down_weight:
            [H, I]; norm_weight: [H] with `eps`: the post-attention RMSNorm.
        counters: `mlp_flow_counters(H, I, device, config)`, this launch site's.
        config: task sizes.
        pdl: launch as a programmatic dependent of the kernel before (None: on sm_90+).

    Returns:
        [1, H], the residual stream after the layer.
    """
    if not use_triton(attn, use_triton_kernel):
        return mlp_flow_torch(
            attn, o_weight, residual, norm_weight, eps, gate_up_weight, down_weight
        )
    check_launchable(_mlp_flow_kernel, attn)
    h, kin = o_weight.shape
    inter = down_weight.shape[1]
    cfg = config
    if attn.shape != (1, kin) or residual.shape != (1, h):
        raise ValueError(f"mlp_flow takes one token: attn [1, {kin}], residual [1, {h}]")
    if gate_up_weight.shape != (2 * inter, h) or down_weight.shape != (h, inter):
        raise ValueError("gate_up / down weights do not fit o_proj's and each other's shapes")
    sizes = (cfg.o_cols, cfg.gu_cols, cfg.down_cols, cfg.chunk)
    if any(next_power_of_2(v) != v for v in sizes) or cfg.chunk % cfg.gu_cols:
        raise ValueError(f"mlp_flow task sizes must be powers of two, chunk % gu_cols == 0: {cfg}")
    chunks, groups = triton.cdiv(inter, cfg.chunk), triton.cdiv(h, cfg.down_cols)
    if counters.dtype != torch.int32 or counters.numel() != _FIXED + chunks + groups:
        raise ValueError("counters do not fit these shapes and this config")
    tensors = (attn, o_weight, residual, norm_weight, gate_up_weight, down_weight)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("mlp_flow takes contiguous tensors")
    use_pdl = pdl_supported(attn) if pdl is None else pdl
    out = torch.empty_like(residual)
    dt, dev = residual.dtype, residual.device
    s_buf, h_buf = torch.empty_like(residual), torch.empty_like(residual)
    act = torch.empty(1, inter, dtype=dt, device=dev)
    part = torch.empty(chunks, h, dtype=torch.float32, device=dev)
    n_o, n_gu = triton.cdiv(h, cfg.o_cols), triton.cdiv(inter, cfg.gu_cols)
    _mlp_flow_kernel[(n_o + n_gu + groups * chunks,)](
        out, s_buf, h_buf, act, part,
        attn, o_weight, residual, norm_weight, gate_up_weight, down_weight, counters,
        eps, h, kin, inter, n_o, n_gu, groups, chunks,
        O_BN=cfg.o_cols, KIN_PAD=next_power_of_2(kin), H_PAD=next_power_of_2(h),
        GU_BN=cfg.gu_cols, D_BN=cfg.down_cols, CHUNK=cfg.chunk, TICKET=cfg.ticket,
        USE_PDL=use_pdl, ASM=attn.is_cuda, num_warps=cfg.num_warps, launch_pdl=use_pdl,
    )  # fmt: skip
    return out


def mlp_flow_torch(
    attn: torch.Tensor,
    o_weight: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
) -> torch.Tensor:
    """Plain-torch reference of `mlp_flow`: the decoder's ops in HF's order."""
    s = gemv_torch(attn, o_weight, residual=residual)
    act = gemv_torch(rms_norm_torch(s, norm_weight, eps), gate_up_weight, gated=True)
    return gemv_torch(act, down_weight, residual=s)

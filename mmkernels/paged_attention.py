"""Causal attention of packed, variable-length query chunks over a paged KV cache.

One kernel family serves every batch the scheduler builds: single-token decodes, prefill
chunks that continue a cached context, and whole prefills, mixed in one launch (the
"unified attention" layout of vLLM V1). Each program takes a tile of query rows of one
sequence (`BLOCK_Q` tokens × the `QUERIES_PER_KV` query heads that share one KV head) and
streams that sequence's keys and values through its block table with an online softmax.

For decode-heavy batches with few sequences and long contexts that grid leaves most of the
GPU idle, so the KV range of each sequence can be split across `NUM_SPLITS` programs
(flash-decoding). Each split writes a partial result (unnormalized output, row max, row
sum); by default the last split to finish a tile merges them in the same launch (see
"Fused merge" below), otherwise (`fused_merge=False`) a second, small kernel does.

Fused merge: the programs of one tile (same query block and KV head, different splits)
share an int32 counter. Each program stores its partials, then atomically increments the
counter with acquire-release semantics; the program that reads NUM_SPLITS - 1 knows that
every other split has published its partials, merges them, writes the output and puts the
counter back to 0. No program ever waits for another, so the order in which programs run
(in parallel on a GPU, one after another in Triton's interpreter) does not matter.

No host synchronization happens inside `paged_attention`: every length is read on the
device; the host ints `max_query_len` and `max_seq_len` only size the grid and pick tiles,
so calls can be captured in CUDA graphs.
"""

import functools
import logging
import math

import torch
import triton
import triton.language as tl

from mmkernels._dispatch import (
    check_launchable,
    next_power_of_2,
    pdl_supported,
    pdl_trigger,
    use_triton,
)

logger = logging.getLogger(__name__)

# The split (flash-decoding) path is chosen only for batches whose query chunks are at most
# this long: its fp32 partial buffers grow with the number of query tokens.
_SPLIT_MAX_QUERY_LEN = 8
# Splits down to one 32-position tile: a decode of one sequence (2 KV heads, 1152
# positions) ran 10.3 us at 8 splits of 64-wide tiles and 6.8 us at 64 splits of 32
# (H200, session 10, benchmarks/sweep_attention.py), the work spread over 72 SMs, not 12.
_MIN_SPLIT_LEN = 32
# `fused_merge=None` fuses the split merge into the split kernel up to this many splits:
# beyond, its last program merges alone and the two-launch merge is faster (H100 sweep,
# session 3; at 64 splits 21 vs 6.8 + 3.0 us, H200, session 10).
FUSED_MERGE_MAX_SPLITS = 8
_MAX_SPLITS = 64
# From this many splits on, decode tiles are 32 positions wide (one tile per split at the
# contexts where so many splits are chosen); fewer splits keep 64-wide tiles, which were
# 1-10% faster there (B=64 x 1152: 30.6 us at 4 fused splits vs 33.6 with 32-wide tiles).
_NARROW_TILE_SPLITS = 16
# Aim for this many programs per SM when splitting (a few waves hide the tail).
_PROGRAMS_PER_SM = 4
# A plain grid with this many programs per SM already streams KV at ~95% of copy bandwidth
# on an H100 (64 sequences × 8 KV heads); splitting it only adds the merge.
_NO_SPLIT_PROGRAMS_PER_SM = 2
# Batches with chunks longer than 256 query rows but fewer than this many rows per sequence
# on average (decodes riding along prompt chunks) take 64-row tiles (see _launch_config).
_MIXED_MEAN_ROWS = 1024
# Decode programs (one query token, heads padded to 128 or more) resident on one SM at once:
# each holds two pipeline stages of K and V tiles, 2 × 64 positions × 128 dims × 2 bytes × 2
# = 64 KiB of shared memory (32 × 256 for wider heads, the same), and a Hopper SM has 228 KiB.
# A grid just past a multiple of this × SMs runs a short last wave at a fraction of the
# card's bandwidth: 16q/2kv at context 1152 took 65 us at 198 sequences (396 programs) and
# 94 us at 200 (400) on an H200 (session 15, benchmarks/sweep_decode_waves.py).
_DECODE_RESIDENT_PER_SM = 3

# Fused-merge counters: one persistent, zeroed int32 buffer per device, shared by every
# call (one counter per (query block, KV head) tile of the call's grid). Each call leaves
# every counter it touched at 0 again (the merging program resets it), so the buffer needs
# zeroing only once, when it is allocated, and a call inside a CUDA graph needs no memset
# node and no allocation. Consequence: calls on one device must not run concurrently on
# different streams (they would share counters); the engine runs attention on one stream.
_SPLIT_COUNTERS: dict[torch.device, torch.Tensor] = {}
# Buffers replaced by a larger one stay referenced forever: a CUDA graph captured earlier
# still increments and resets counters at the old address on every replay, so that memory
# must never be handed to anyone else. They are small (a few hundred KiB at most).
_RETIRED_SPLIT_COUNTERS: list[torch.Tensor] = []
# Smallest buffer allocated (256 KiB): covers a decode batch of 8192 sequences × 8 KV heads,
# so an engine never grows it after start-up.
_MIN_SPLIT_COUNTERS = 1 << 16
# The fused merge fully unrolls its loops over splits (so that several splits' loads are in
# flight at once) for at most _MERGE_UNROLL_MAX_SPLITS splits of partial tiles of at most
# this many fp32 values: the decode tile (16 rows × head 128). Taller tiles, unrolled, spill
# registers on sm_90 (64 rows × 8 splits: 180 bytes, partly before the main loop); they
# loop instead.
_MERGE_UNROLL_MAX_TILE = 16 * 128
_MERGE_UNROLL_MAX_SPLITS = 32


@triton.jit
def _attend_tile(
    acc,  # [BLOCK_M, HEAD_PAD] fp32, unnormalized output
    m_i,  # [BLOCK_M] fp32, running row max (log2 units)
    l_i,  # [BLOCK_M] fp32, running row sum
    q,  # [BLOCK_M, HEAD_PAD]
    q_abs_pos,  # [BLOCK_M] position of each row in its sequence
    tile,  # index of the TILE_N KV positions to attend to
    kv_end,  # KV positions >= this are past every row of the tile
    k_ptr,  # key_cache_ptr offset to the KV head: [num_blocks, block_size, ·, head_size]
    v_ptr,  # value_cache_ptr offset to the KV head: [num_blocks, block_size, ·, head_size]
    block_table_row,  # [max_blocks_per_seq] int32, this sequence's block table
    stride_cache_blk,
    stride_cache_pos,
    scale_log2,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    CAUSAL_MASK: tl.constexpr,  # False for tiles every row sees whole: no mask, no guards
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over TILE_N KV positions; returns (acc, m_i, l_i)."""
    offs_n = tile * TILE_N + tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    n_valid = offs_n < kv_end
    d_valid = offs_d < HEAD_SIZE
    # 64-bit: block id × block stride overflows int32 on large caches.
    block_id = tl.load(block_table_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0)
    kv_offset = block_id.to(tl.int64) * stride_cache_blk + (offs_n % BLOCK_SIZE) * stride_cache_pos

    k = tl.load(
        k_ptr + kv_offset[None, :] + offs_d[:, None],
        mask=n_valid[None, :] & d_valid[:, None],
        other=0.0,
    )  # [HEAD_PAD, TILE_N]
    # Raw scores: the scale (> 0) goes onto the row max and into the exponent, where
    # s * scale - max is one FMA per score rather than a multiply and a subtract.
    s = tl.dot(q, k, input_precision=DOT_PRECISION)  # [BLOCK_M, TILE_N]
    if CAUSAL_MASK:
        visible = (offs_n[None, :] <= q_abs_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        # A row may see no key in this tile (or in this whole split): keep exp2 away from
        # (-inf) - (-inf), but keep m_new itself -inf so the merge weighs the split as empty.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale_log2)
        m_ref = m_new
    p = tl.exp2(s * scale_log2 - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)

    v = tl.load(
        v_ptr + kv_offset[:, None] + offs_d[None, :],
        mask=n_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # [TILE_N, HEAD_PAD]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# Integers that change from step to step are not specialized: Triton would otherwise
# compile a new variant (seconds of host time, mid-run) the first time a batch size is 1
# or a multiple of 16. The first W1 profile on an H100 showed single steps stalling
# 0.3-2 s on such compiles. The block-table row stride stays specialized (its 16-
# divisibility lets block ids load as vectors): the engine pads the width to a multiple
# of 16, and its decode graphs capture a fixed width.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_size]
    part_acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, HEAD_PAD] fp32, split path only
    part_max_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32 (log2 units), split path only
    part_sum_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32, split path only
    counters_ptr,  # [>= num_q_blocks * num_kv_heads] int32, zero on entry; fused merge only
    q_ptr,  # [num_tokens, num_q_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    seq_lens_ptr,  # [num_seqs] int32
    num_seqs,
    scale_log2,  # softmax scale × log2(e): the kernel exponentiates with exp2
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_cache_blk,  # shared by key_cache and value_cache
    stride_cache_pos,
    stride_cache_head,
    stride_bt_seq,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # HEAD_SIZE rounded up to a power of two; the tail is masked
    BLOCK_SIZE: tl.constexpr,  # KV positions per cache block (page)
    BLOCK_M: tl.constexpr,  # query rows per program, a power of two >= BLOCK_Q * QUERIES_PER_KV
    BLOCK_Q: tl.constexpr,  # query tokens per program
    ONE_BLOCK_PER_SEQ: tl.constexpr,  # max_query_len <= BLOCK_Q: grid axis 0 is the sequence
    TILE_N: tl.constexpr,  # KV positions per inner-loop step
    NUM_SPLITS: tl.constexpr,  # 1: write the output; > 1: write partials, then merge them
    FUSED_MERGE: tl.constexpr,  # NUM_SPLITS > 1: the last split merges (else a 2nd kernel)
    MERGE_UNROLL: tl.constexpr,  # fused merge: unroll its loops over the splits
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs so tests compare tightly
    LONGEST_FIRST: tl.constexpr,  # walk the query blocks last to first (see the wrapper)
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the kernel before
    TRIGGER: tl.constexpr,  # USE_PDL: the next kernel may launch 0 before the wait, 1 after, 2 after the KV loop
):
    if USE_PDL:  # wait for the kernel before (it wrote q and the KV cache)
        if TRIGGER == 0:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if TRIGGER == 1:
            tl.extra.cuda.gdc_launch_dependents()
    q_block_global = tl.program_id(0)
    if LONGEST_FIRST:
        q_block_global = tl.num_programs(0) - 1 - q_block_global
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if ONE_BLOCK_PER_SEQ:
        # Every chunk fits one query block (decode batches): program i is sequence i.
        seq = q_block_global
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_block = 0
    else:
        # Sequence b owns the query blocks starting at qsl[b] // BLOCK_Q + b: an upper bound
        # on the blocks of all earlier sequences that needs no prefix sum. Binary-search the
        # last b whose start is <= this program's block.
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            mid_start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
            lo = tl.where(mid_start <= q_block_global, mid + 1, lo)
            hi = tl.where(mid_start <= q_block_global, hi, mid)
        seq = lo - 1
        q_start = tl.load(query_start_loc_ptr + seq)
        q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
        q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        # A slack block of the upper bound, or a padding sequence with no query tokens.
        return

    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row r of the tile is query token q_block * BLOCK_Q + r // QUERIES_PER_KV of this
    # sequence, query head kv_head * QUERIES_PER_KV + r % QUERIES_PER_KV.
    offs_m = tl.arange(0, BLOCK_M)
    row_tok = offs_m // QUERIES_PER_KV
    q_pos = q_block * BLOCK_Q + row_tok
    row_valid = (row_tok < BLOCK_Q) & (q_pos < q_len)
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    token = (q_start + q_pos).to(tl.int64)
    q_abs_pos = context_len + q_pos  # position in the sequence; keys at <= it are visible

    offs_d = tl.arange(0, HEAD_PAD)
    d_valid = offs_d < HEAD_SIZE

    q = tl.load(
        q_ptr + token[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
        mask=row_valid[:, None] & d_valid[None, :],
        other=0.0,
    )  # [BLOCK_M, HEAD_PAD]

    # Keys past the last row's position are invisible to the whole tile.
    kv_end = context_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    if NUM_SPLITS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
        tile_lo = split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)

    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    k_ptr = key_cache_ptr + kv_head * stride_cache_head
    v_ptr = value_cache_ptr + kv_head * stride_cache_head
    # Tiles below this one are visible to every row of the tile (the first row sits at
    # context_len + q_block * BLOCK_Q), so they skip the causal mask.
    full_tiles = (context_len + q_block * BLOCK_Q + 1) // TILE_N
    for tile in range(tile_lo, tl.minimum(tile_hi, full_tiles)):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            q_abs_pos,
            tile,
            kv_end,
            k_ptr,
            v_ptr,
            block_table_row,
            stride_cache_blk,
            stride_cache_pos,
            scale_log2,
            HEAD_SIZE,
            HEAD_PAD,
            BLOCK_SIZE,
            TILE_N,
            False,
            DOT_PRECISION,
        )
    for tile in range(tl.maximum(tile_lo, full_tiles), tile_hi):
        acc, m_i, l_i = _attend_tile(
            acc,
            m_i,
            l_i,
            q,
            q_abs_pos,
            tile,
            kv_end,
            k_ptr,
            v_ptr,
            block_table_row,
            stride_cache_blk,
            stride_cache_pos,
            scale_log2,
            HEAD_SIZE,
            HEAD_PAD,
            BLOCK_SIZE,
            TILE_N,
            True,
            DOT_PRECISION,
        )

    if USE_PDL and TRIGGER == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr
            + token[:, None] * stride_o_tok
            + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_valid[None, :],
        )
    else:
        # Every split writes its partials, an empty one too (max -inf, sum 0), so the merge
        # kernel never reads memory nobody wrote.
        num_q_heads = tl.num_programs(1) * QUERIES_PER_KV
        part_row = (token * num_q_heads + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(
            part_acc_ptr + part_row[:, None] * HEAD_PAD + offs_d[None, :],
            acc,
            mask=row_valid[:, None],
        )
        tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)
        if FUSED_MERGE:
            # Every split of this tile gets here exactly once: the early return above
            # depends only on the query block (and its sequence), which all splits of the
            # tile share, and every split that passes it (even one with no KV tile to
            # attend) writes its partials, so the tile's count always reaches NUM_SPLITS.
            #
            # Memory ordering. Release side: the partials were stored by all threads of
            # this program, but the scalar atomic below is issued by one thread, so a CTA
            # barrier first orders every thread's stores before it; the atomic's release
            # (cumulative) then publishes them at GPU scope before the new count becomes
            # visible. Acquire side: the program that reads NUM_SPLITS - 1 has, through its
            # atomic's acquire, synchronized with the release of every other split (their
            # increments precede its own in the counter's modification order, and each
            # read-modify-write continues the release sequences before it); Triton then
            # broadcasts the atomic's result to the other threads through shared memory
            # and a barrier, so their loads in the merge come after the acquire too. Those
            # loads go through L2 (".cg"), never a possibly stale L1 line. On sm_90 this
            # compiles to the classic last-block pattern: BAR.SYNC, then one thread's
            # MEMBAR.ALL.GPU + ATOMG.ADD.STRONG.GPU + CCTL.IVALL (L1 invalidate), then
            # STS + BAR.SYNC to broadcast the count.
            tl.debug_barrier()
            counter_ptr = counters_ptr + q_block_global * tl.num_programs(1) + kv_head
            arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                _merge_tile_splits(
                    counter_ptr,
                    out_ptr,
                    part_acc_ptr,
                    part_max_ptr,
                    part_sum_ptr,
                    token,
                    head,
                    row_valid,
                    num_q_heads,
                    stride_o_tok,
                    stride_o_head,
                    HEAD_SIZE,
                    HEAD_PAD,
                    BLOCK_M,
                    NUM_SPLITS,
                    MERGE_UNROLL,
                )


@triton.jit
def _merge_tile_splits(
    counter_ptr,  # this tile's fused-merge counter, now NUM_SPLITS
    out_ptr,  # [num_tokens, num_q_heads, head_size]
    part_acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, HEAD_PAD] fp32
    part_max_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32 (log2 units)
    part_sum_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32
    token,  # [BLOCK_M] int64, the query token of each row of the tile
    head,  # [BLOCK_M], the query head of each row
    row_valid,  # [BLOCK_M]
    num_q_heads,
    stride_o_tok,
    stride_o_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UNROLL: tl.constexpr,
):
    """Fused merge, run by the last split of a tile to arrive: combine the NUM_SPLITS
    partials of every row and store the normalized output (the same arithmetic as
    `_merge_splits_kernel`, per row), then put the tile's counter back to 0.

    Written for the compiler as much as for the reader (checked on sm_90 PTX/SASS): per-row
    values are loaded as 1-D [BLOCK_M] vectors, one split at a time, so that they take the
    layout of the partial outputs they scale. (A [BLOCK_M, NUM_SPLITS] tile of maxes, or
    [BLOCK_M, 1] columns, get a layout of their own, and converting every split's weights
    costs a round trip through shared memory with two CTA barriers, which also keeps the
    next split's loads from being issued early.) With UNROLL the loops over splits are
    unrolled, so the loads of several splits are in flight at once.
    """
    offs_d = tl.arange(0, HEAD_PAD)
    row_base = (token * num_q_heads + head) * NUM_SPLITS  # [BLOCK_M] first partial row

    # Pass 1: the largest split max of each row. An all-empty row keeps 0 as its reference
    # so that exp2 never sees (-inf) - (-inf); its weights are then all 0.
    m_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    if UNROLL:
        for s in tl.static_range(NUM_SPLITS):
            m_max = tl.maximum(
                m_max, _load_rows(part_max_ptr, row_base + s, row_valid, float("-inf"))
            )
    else:
        for s in range(NUM_SPLITS):
            m_max = tl.maximum(
                m_max, _load_rows(part_max_ptr, row_base + s, row_valid, float("-inf"))
            )
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)

    # Pass 2: sum of the partial outputs and row sums, weighted by exp2(split max - m_max).
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    if UNROLL:
        for s in tl.static_range(NUM_SPLITS):
            acc, total = _add_split_partial(
                acc,
                total,
                m_max,
                row_base + s,
                row_valid,
                part_acc_ptr,
                part_max_ptr,
                part_sum_ptr,
                HEAD_PAD,
            )
    else:
        for s in range(NUM_SPLITS):
            acc, total = _add_split_partial(
                acc,
                total,
                m_max,
                row_base + s,
                row_valid,
                part_acc_ptr,
                part_max_ptr,
                part_sum_ptr,
                HEAD_PAD,
            )

    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(
        out_ptr + token[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & (offs_d < HEAD_SIZE)[None, :],
    )
    # Every split of the tile has incremented, and none touches the counter again in this
    # launch, so a plain store can reset it, ready for the next call (which is ordered
    # after the end of this launch). Without the reset the next call would count past
    # NUM_SPLITS - 1 and never merge.
    tl.store(counter_ptr, 0)


@triton.jit
def _load_rows(ptr, rows, row_valid, other):
    """ptr[rows[i]] for each tile row (`other` for masked rows), through L2 (".cg"):
    other programs of this launch wrote these values."""
    return tl.load(ptr + rows, mask=row_valid, other=other, cache_modifier=".cg")


@triton.jit
def _add_split_partial(
    acc,  # [BLOCK_M, HEAD_PAD] fp32, weighted sum of partial outputs so far
    total,  # [BLOCK_M] fp32, weighted sum of partial row sums so far
    m_max,  # [BLOCK_M] fp32, the reference max of each row (log2 units)
    rows,  # [BLOCK_M] the split's partial row of each tile row
    row_valid,  # [BLOCK_M]
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    HEAD_PAD: tl.constexpr,
):
    """Adds one split's partials to (acc, total), weighted by exp2(its max - m_max)."""
    offs_d = tl.arange(0, HEAD_PAD)
    m_s = _load_rows(part_max_ptr, rows, row_valid, float("-inf"))
    weight = tl.exp2(m_s - m_max)  # 0 for an empty split
    acc_s = tl.load(
        part_acc_ptr + rows[:, None] * HEAD_PAD + offs_d[None, :],
        mask=row_valid[:, None],
        other=0.0,
        cache_modifier=".cg",
    )  # [BLOCK_M, HEAD_PAD]
    acc = acc + acc_s * weight[:, None]
    total = total + _load_rows(part_sum_ptr, rows, row_valid, 0.0) * weight
    return acc, total


@triton.jit(do_not_specialize=["num_seqs"])
def _merge_splits_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_size]
    part_acc_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS, HEAD_PAD] fp32
    part_max_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32 (log2 units)
    part_sum_ptr,  # [num_tokens, num_q_heads, NUM_SPLITS] fp32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    stride_o_tok,
    stride_o_head,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # NUM_SPLITS rounded up to a power of two
    USE_PDL: tl.constexpr,  # launched as a programmatic dependent of the split kernel
):
    if USE_PDL:  # every program waits (even one that returns at once): see the wrapper
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    token = tl.program_id(0)
    head = tl.program_id(1)
    # Tokens past the last sequence (CUDA-graph padding) were never attended: leave them.
    if token >= tl.load(query_start_loc_ptr + num_seqs):
        return
    if token < tl.load(query_start_loc_ptr):
        return

    row = (token.to(tl.int64) * tl.num_programs(1) + head) * NUM_SPLITS
    offs_s = tl.arange(0, SPLITS_PAD)
    s_valid = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, HEAD_PAD)

    m = tl.load(part_max_ptr + row + offs_s, mask=s_valid, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row + offs_s, mask=s_valid, other=0.0)
    acc = tl.load(
        part_acc_ptr + (row + offs_s)[:, None] * HEAD_PAD + offs_d[None, :],
        mask=s_valid[:, None],
        other=0.0,
    )  # [SPLITS_PAD, HEAD_PAD]

    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    weight = tl.exp2(m - m_max)  # 0 for empty splits
    total = tl.sum(sums * weight, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + token.to(tl.int64) * stride_o_tok + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=offs_d < HEAD_SIZE,
    )


def _split_counters(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed fused-merge counter buffer, holding at least `needed` counters.

    Grows (to a power of two) when too small, keeping the old buffer alive for the graphs
    that captured it. Returns None while a CUDA graph is being captured and the buffer is
    missing or too small: an allocation made now would be zeroed only when the graph first
    replays, and the caller then falls back to the two-launch merge. The engine never gets
    there, since it runs every graph's batch eagerly before capturing it.
    """
    buf = _SPLIT_COUNTERS.get(device)
    if buf is not None and buf.numel() >= needed:
        return buf
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    if buf is not None:
        _RETIRED_SPLIT_COUNTERS.append(buf)
    buf = torch.zeros(
        max(_MIN_SPLIT_COUNTERS, next_power_of_2(needed)), dtype=torch.int32, device=device
    )
    _SPLIT_COUNTERS[device] = buf
    return buf


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_kv_splits(
    *,
    num_q_blocks: int,
    num_kv_heads: int,
    max_query_len: int,
    max_seq_len: int,
    sm_count: int,
    head_size: int = 128,
) -> int:
    """How many programs share one sequence's KV range (1 = no split).

    Splitting pays in two cases:
    - the plain grid (query blocks × KV heads) cannot fill the GPU and each sequence has a
      long context to stream: a decode batch of 16 sequences with 2 KV heads is 32 programs
      on a 132-SM H100;
    - a decode grid spills a little past a whole number of waves (`_DECODE_RESIDENT_PER_SM`
      programs an SM): splitting shortens every program, so the last wave is short too.
      The thresholds are from an H200 sweep (session 15, benchmarks/sweep_decode_waves.py,
      16q/2kv and 28q/4kv at context 1152), in waves w = programs / (3 × SMs):
      | w | plain | chosen |
      |---|---|---|
      | 1.01 (400 programs) | 94.2 us | 4 splits 76.3 us |
      | 1.29 (512) | 104.0 | 2 splits 89.4 |
      | 1.62 (640) | 109.4 | 2 splits 104.8 |
      | 1.94 (768) | 119.4 | plain (2 splits 133.8) |
      | 2.02 (800) | 149.2 | 2 splits 135.5 |
      | 2.59 (1024) | 164.3 | plain (2 splits 173.5) |
      | 3.23 (1280) | 214.0 | 2 splits 200.3 |

    Args:
        num_q_blocks: upper bound on the query blocks of the plain grid.
        num_kv_heads: KV heads (the grid's second axis).
        max_query_len: longest query chunk of the batch.
        max_seq_len: longest sequence (context + chunk) of the batch.
        sm_count: streaming multiprocessors of the device.
        head_size: the attention head size (the wave rule is measured for heads padded to
            128 and more; narrower heads fit more programs an SM and skip it).

    Returns:
        The number of KV splits: a power of two between 1 and 64. (Each split count is a
        kernel variant of its own; any count from 2 to 64 used to be possible, and a new
        one compiled mid-run for ~1.5 s, stalling the step: session 13.)
    """
    if max_query_len > _SPLIT_MAX_QUERY_LEN:
        return 1
    programs = num_q_blocks * num_kv_heads
    length_cap = triton.cdiv(max_seq_len, _MIN_SPLIT_LEN)
    if programs >= _NO_SPLIT_PROGRAMS_PER_SM * sm_count:
        if max_query_len != 1 or next_power_of_2(head_size) < 128:
            return 1
        wanted = _wave_splits(programs / (_DECODE_RESIDENT_PER_SM * sm_count))
    else:
        wanted = triton.cdiv(_PROGRAMS_PER_SM * sm_count, max(programs, 1))
    splits = min(wanted, length_cap, _MAX_SPLITS)
    return 1 << (max(splits, 1).bit_length() - 1)


def _wave_splits(waves: float) -> int:
    """Splits for a decode grid of `waves` full waves (programs / resident slots), at least
    two thirds of a wave: 1 unless the grid spills a little past a whole wave (see
    `choose_num_kv_splits`). The first spill is the costliest (the tail is as long as the
    whole grid's run), later ones cost a smaller share of the step."""
    if waves <= 1:
        return 1
    whole, spill = int(waves), waves - int(waves)
    if spill == 0:
        return 1
    if whole == 1:
        return 4 if spill <= 0.25 else 2 if spill <= 0.75 else 1
    return 2 if spill <= 0.4 else 1


def decode_wave_batch_sizes(
    num_kv_heads: int, sm_count: int, head_size: int, max_waves: int = 4
) -> list[int]:
    """Decode batch sizes whose plain grid exactly fills 1..`max_waves` waves of resident
    programs (none for heads narrower than 128, where the wave rule is not measured).

    One more sequence past such a size makes `choose_num_kv_splits` split KV (the grid
    spills into another wave), so CUDA-graph buckets at these sizes let the batches just
    below an edge keep the unsplit kernel instead of the split one captured for the bucket
    above: with 2 KV heads on 132 SMs, 193-198 sequences replay a 198 graph (65 us a
    layer's attention at context 1152, H200) rather than the 208 graph's 4 splits (74 us)."""
    if next_power_of_2(head_size) < 128:
        return []
    slots = _DECODE_RESIDENT_PER_SM * sm_count
    return sorted({w * slots // num_kv_heads for w in range(1, max_waves + 1)} - {0})


def _launch_config(
    max_query_len: int,
    queries_per_kv: int,
    head_pad: int,
    dtype: torch.dtype,
    num_kv_splits: int = 1,
    mean_query_len: float | None = None,
) -> tuple[int, int, int, int]:
    """(BLOCK_M, TILE_N, num_warps, num_stages) for a batch (bf16, head 128: tuned on H100
    and H200). BLOCK_M does not depend on `num_kv_splits`. `mean_query_len` (tokens per
    sequence; default `max_query_len`) keeps mixed batches off the tallest tile.

    Decode-like batches get the smallest tile `tl.dot` allows (16 rows): their work is
    streaming KV, and a taller tile would only multiply wasted rows; two pipeline stages
    keep shared memory low enough for 3 programs per SM, which hides latency better than a
    deeper pipeline. Long prefills get 256 x 64 tiles with 16 warps: on an H200 (session
    10, benchmarks/sweep_attention.py) 8 x 1024 tokens (32q/8kv) ran 263 us against 320
    us with the earlier 128 x 128 tiles and 8 warps (SDPA flash 276 us), 2 x 4096 764
    against 850 us. But every sequence of a launch gets whole query tiles, so a decode
    riding in a prefill batch computes 256 rows for its 1-8. Batches of long chunks
    averaging under `_MIXED_MEAN_ROWS` query rows per sequence (prompt chunks with many
    decodes riding along) take 64 x 64 tiles with 4 warps and 3 stages instead (two
    programs an SM): 7 x 1024 prompt tokens with 64 / 128 / 192 decodes at context 1152
    (16q/2kv, H100, session 15, benchmarks/sweep_mixed_attention.py) ran 179 / 201 / 226 us
    against 192 / 251 / 310 with 256-row tiles and 272 us (192 decodes) with the 128 x 128
    tiles such batches had before; with 32 decodes it was even (170 vs 168), with none 8%
    slower (144 vs 134). Medium chunks get 128- or 64-row tiles. Heads wider than 128
    halve the tiles to fit shared memory.
    """
    rows = max_query_len * queries_per_kv
    min_rows = max(16, next_power_of_2(queries_per_kv))
    if dtype == torch.float32:
        # fp32 is for tests: keep tiles small enough for shared memory at 4 bytes.
        return max(min_rows, 16 if rows <= 16 else 64), 32, 4, 2
    if rows <= 16:
        narrow = head_pad > 128 or num_kv_splits >= _NARROW_TILE_SPLITS
        return min_rows, 32 if narrow else 64, 4, 2
    if head_pad > 128:
        return max(min_rows, 64), 32, 4, 2
    if rows <= 64:
        return max(min_rows, 64), 64, 4, 3
    if rows <= 256:
        return max(min_rows, 128), 128, 8, 3
    mean_rows = rows if mean_query_len is None else mean_query_len * queries_per_kv
    if mean_rows < _MIXED_MEAN_ROWS:
        return max(min_rows, 64), 64, 4, 3
    return max(min_rows, 256), 64, 16, 2


def paged_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    fused_merge: bool | None = None,
    longest_first: bool = True,
    use_triton_kernel: bool | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks over each sequence's paged KV.

    Query token j of sequence b (q_len = qsl[b+1] - qsl[b]) sits at position
    seq_lens[b] - q_len + j and attends to KV positions 0..that position. Its K/V must
    already be in the cache.

    Args:
        q: [num_tokens, num_q_heads, head_size]; sequence b's tokens are rows
            query_start_loc[b]:query_start_loc[b+1]. The last dim must be contiguous.
        key_cache: [num_blocks, block_size, num_kv_heads, head_size].
        value_cache: same shape and strides as key_cache.
        block_tables: int32 [num_seqs, max_blocks_per_seq].
        query_start_loc: int32 [num_seqs + 1], non-decreasing, starting at 0. Sequences
            with no query tokens (CUDA-graph padding) are skipped.
        seq_lens: int32 [num_seqs], KV length of each sequence including this step's
            query tokens.
        scale: softmax scale, usually head_size ** -0.5.
        max_query_len: host-side upper bound on every q_len (must hold: it sizes the grid).
        max_seq_len: host-side bound on seq_lens (choosing the split count only).
        out: optional [num_tokens, num_q_heads, head_size] output buffer. Rows that
            belong to no sequence are left as they are (uninitialized if allocated here).
        num_kv_splits: KV splits per sequence; None chooses from the batch shape and the
            device, 1 disables the split path.
        fused_merge: with splits, let the last split of each tile merge the partials in
            the same launch (True) or merge them in a second kernel launch (False); None
            (default): fused up to FUSED_MERGE_MAX_SPLITS splits, two launches above. Both
            give the same result; the fused path saves the second launch. The fused path
            shares a per-device counter buffer between calls, so calls on one device must
            not run concurrently on different streams.
        longest_first: for batches with several query blocks per sequence, launch the
            grid's query blocks last to first, so that the blocks that see the most keys
            (a sequence's last ones, causally) start first and the short ones fill the
            tail of the last wave. Same result either way. On by default: on an H100
            (session 8, `benchmarks/bench_kernels.py --only prefill`) it was 7.7% faster at
            2 x 4096 tokens (828 vs 892 us, Llama-8B heads) and even at 8 x 1024.
        use_triton_kernel: force the Triton kernel (True) or the torch reference (False);
            None takes Triton on CUDA tensors or when MMENGINE_FORCE_TRITON=1.

    Returns:
        The attention output, [num_tokens, num_q_heads, head_size] in q's dtype (`out` if
        given).
    """
    if not use_triton(q, use_triton_kernel):
        return paged_attention_torch(
            q,
            key_cache,
            value_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            scale=scale,
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            out=out,
            num_kv_splits=num_kv_splits,
            fused_merge=fused_merge,
            longest_first=longest_first,
        )
    check_launchable(_paged_attention_kernel, q)

    num_tokens, num_q_heads, head_size = q.shape
    _, block_size, num_kv_heads, cache_head_size = key_cache.shape
    num_seqs = block_tables.shape[0]
    if num_q_heads % num_kv_heads != 0 or cache_head_size != head_size:
        raise ValueError(f"q {tuple(q.shape)} does not match the KV cache {tuple(key_cache.shape)}")
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("key_cache and value_cache need equal strides and a contiguous last dim")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous last dim")
    # The kernel walks these with unit strides (no-ops for the usual contiguous inputs).
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    query_start_loc = query_start_loc.contiguous()
    seq_lens = seq_lens.contiguous()
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out

    queries_per_kv = num_q_heads // num_kv_heads
    head_pad = max(16, next_power_of_2(head_size))
    mean_query_len = num_tokens / num_seqs
    block_m = _launch_config(max_query_len, queries_per_kv, head_pad, q.dtype, 1, mean_query_len)[0]
    block_q = block_m // queries_per_kv
    one_block_per_seq = max_query_len <= block_q
    # The kernel lays sequence b's query blocks out from qsl[b] // BLOCK_Q + b, which needs
    # num_tokens // BLOCK_Q + num_seqs programs; slack programs return at once.
    num_q_blocks = num_seqs if one_block_per_seq else num_tokens // block_q + num_seqs

    if num_kv_splits is None:
        if q.is_cuda:
            num_kv_splits = choose_num_kv_splits(
                num_q_blocks=num_q_blocks,
                num_kv_heads=num_kv_heads,
                max_query_len=max_query_len,
                max_seq_len=max_seq_len,
                sm_count=_sm_count(q.device.index or 0),
                head_size=head_size,
            )
        else:
            num_kv_splits = 1  # the interpreter gains nothing from more programs
    num_kv_splits = max(int(num_kv_splits), 1)
    block_m, tile_n, num_warps, num_stages = _launch_config(
        max_query_len, queries_per_kv, head_pad, q.dtype, num_kv_splits, mean_query_len
    )

    if num_kv_splits > 1:
        part_acc = torch.empty(
            (num_tokens, num_q_heads, num_kv_splits, head_pad), dtype=torch.float32, device=q.device
        )
        part_max = torch.empty(
            (num_tokens, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device
        )
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # never touched: NUM_SPLITS == 1 compiles them out
    counters = None
    if fused_merge is None:
        fused_merge = num_kv_splits <= FUSED_MERGE_MAX_SPLITS
    if num_kv_splits > 1 and fused_merge:
        counters = _split_counters(q.device, num_q_blocks * num_kv_heads)
        if counters is None:
            logger.warning(
                "paged_attention: fused-merge counters missing or too small during CUDA "
                "graph capture; this graph uses the two-launch merge (run the same batch "
                "eagerly before capturing to avoid this)"
            )
    fused = counters is not None
    merge_unroll = (
        num_kv_splits <= _MERGE_UNROLL_MAX_SPLITS and block_m * head_pad <= _MERGE_UNROLL_MAX_TILE
    )

    pdl = pdl_supported(q, num_tokens)
    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_kv_splits)](
        out,
        part_acc,
        part_max,
        part_sum,
        counters if fused else out,  # never touched unless FUSED_MERGE
        q,
        key_cache,
        value_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        num_seqs,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv,
        HEAD_SIZE=head_size,
        HEAD_PAD=head_pad,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        ONE_BLOCK_PER_SEQ=one_block_per_seq,
        TILE_N=tile_n,
        NUM_SPLITS=num_kv_splits,
        FUSED_MERGE=fused,
        MERGE_UNROLL=merge_unroll,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        LONGEST_FIRST=longest_first and not one_block_per_seq,
        USE_PDL=pdl,
        TRIGGER=pdl_trigger("attn"),
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=pdl,
    )
    if num_kv_splits > 1 and not fused:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out,
            part_acc,
            part_max,
            part_sum,
            query_start_loc,
            num_seqs,
            out.stride(0),
            out.stride(1),
            HEAD_SIZE=head_size,
            HEAD_PAD=head_pad,
            NUM_SPLITS=num_kv_splits,
            SPLITS_PAD=next_power_of_2(num_kv_splits),
            # Like the split kernel: the next kernel (the o_proj GEMV at batch 1) may
            # start fetching weights while this one merges. Each program waits before
            # anything else, so the ordering chain of PDL launches stays unbroken.
            USE_PDL=pdl,
            num_warps=2,
            launch_pdl=pdl,
        )
    return out


def paged_attention_torch(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    max_query_len: int,
    max_seq_len: int,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    fused_merge: bool | None = None,
    longest_first: bool = True,
) -> torch.Tensor:
    """Plain-torch reference of `paged_attention` (same arguments and result).

    A loop over sequences: gather the sequence's K/V through its block table, then a
    masked softmax in fp32, the way HF's eager attention computes it. It reads the lengths
    on the host, so it synchronizes; `max_query_len`, `max_seq_len`, `num_kv_splits`,
    `fused_merge` and `longest_first` are accepted for signature parity and unused. Rows
    that belong to no
    sequence are left as they are in `out` (zeros if allocated here).
    """
    del max_query_len, max_seq_len, num_kv_splits, fused_merge, longest_first
    num_q_heads = q.shape[1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        if q_len > seq_len:
            raise ValueError(f"sequence {b}: {q_len} query tokens but seq_len {seq_len}")
        blocks = block_tables[b, : triton.cdiv(seq_len, block_size)].long()
        # [seq_len, num_kv_heads, head_size] -> [num_q_heads, seq_len, head_size]; query
        # head h reads KV head h // group, as HF's repeat_kv arranges it.
        k = key_cache[blocks].flatten(0, 1)[:seq_len].float()
        v = value_cache[blocks].flatten(0, 1)[:seq_len].float()
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        qb = q[start:end].float().transpose(0, 1)  # [num_q_heads, q_len, head_size]

        scores = torch.matmul(qb, k.transpose(1, 2)) * scale  # [num_q_heads, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        visible = k_pos[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start:end] = torch.matmul(probs, v).transpose(0, 1).to(out.dtype)
    return out

"""paged_attention: the Triton kernel against its torch reference, the reference against
SDPA and HF's eager attention.

CPU tests run the kernel in Triton's interpreter (see conftest.py) on small fp32 shapes;
`gpu` tests use realistic bf16/fp16 shapes.
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import mmkernels.paged_attention as pa
from mmkernels.paged_attention import (
    choose_num_kv_splits,
    decode_wave_batch_sizes,
    paged_attention,
    paged_attention_torch,
)

torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@dataclass
class Batch:
    q: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    max_query_len: int
    max_seq_len: int

    @property
    def num_real_tokens(self) -> int:
        return int(self.query_start_loc[-1])

    def run(self, impl=paged_attention, **kwargs) -> torch.Tensor:
        return impl(
            self.q,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
            scale=self.q.shape[-1] ** -0.5,
            max_query_len=self.max_query_len,
            max_seq_len=self.max_seq_len,
            **kwargs,
        )


def make_batch(
    q_lens: list[int],
    context_lens: list[int],
    *,
    num_kv_heads: int,
    queries_per_kv: int,
    head_size: int,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    padded_tokens: int = 0,
    num_blocks: int | None = None,
    seed: int = 0,
) -> Batch:
    """A batch whose sequences own random, scattered cache blocks.

    Block-table entries past a sequence's length point at other sequences' blocks, so a
    kernel that reads them gets wrong numbers rather than a crash.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(context_lens, q_lens)]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    max_blocks = max(max(blocks_per_seq), 1)
    needed = sum(blocks_per_seq) + 1
    num_blocks = num_blocks or needed + 7
    pool = torch.randperm(num_blocks, generator=gen)[:needed]
    block_tables = pool[torch.randint(0, needed, (len(q_lens), max_blocks), generator=gen)]
    at = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = pool[at : at + n]
        at += n

    num_tokens = sum(q_lens) + padded_tokens
    num_q_heads = num_kv_heads * queries_per_kv
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    query_start_loc = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(q_lens).cumsum(0)
    return Batch(
        q=torch.randn(num_tokens, num_q_heads, head_size, generator=gen).to(device, dtype),
        key_cache=torch.randn(cache_shape, generator=gen).to(device, dtype),
        value_cache=torch.randn(cache_shape, generator=gen).to(device, dtype),
        block_tables=block_tables.to(device, torch.int32),
        query_start_loc=query_start_loc.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )


def unpaged_kv(batch: Batch, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence b's keys and values, [seq_len, num_kv_heads, head_size], read by hand."""
    seq_len = int(batch.seq_lens[b])
    block_size = batch.key_cache.shape[1]
    pos = torch.arange(seq_len)
    blocks = batch.block_tables[b, pos // block_size].long()
    return batch.key_cache[blocks, pos % block_size], batch.value_cache[blocks, pos % block_size]


# ---------------------------------------------------------------- reference vs others


def test_reference_matches_sdpa_on_unpaged_causal_prefill() -> None:
    batch = make_batch([37], [0], num_kv_heads=2, queries_per_kv=3, head_size=64)
    k, v = unpaged_kv(batch, 0)
    expected = F.scaled_dot_product_attention(
        batch.q.transpose(0, 1),
        k.transpose(0, 1).repeat_interleave(3, dim=0),
        v.transpose(0, 1).repeat_interleave(3, dim=0),
        is_causal=True,
        scale=64**-0.5,
    ).transpose(0, 1)
    torch.testing.assert_close(batch.run(paged_attention_torch), expected, atol=2e-6, rtol=1e-5)


def test_reference_matches_hf_eager_attention_for_a_chunk_after_cached_context() -> None:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    batch = make_batch([11], [29], num_kv_heads=2, queries_per_kv=4, head_size=64)
    k, v = unpaged_kv(batch, 0)
    q_pos = torch.arange(29, 40)
    visible = torch.arange(40)[None, :] <= q_pos[:, None]
    mask = torch.zeros(11, 40).masked_fill(~visible, float("-inf"))
    module = SimpleNamespace(num_key_value_groups=4, training=False)
    expected, _ = eager_attention_forward(
        module,
        batch.q.transpose(0, 1)[None],
        k.transpose(0, 1)[None],
        v.transpose(0, 1)[None],
        mask[None, None],
        scaling=64**-0.5,
    )  # [1, q_len, heads, head_size]
    torch.testing.assert_close(batch.run(paged_attention_torch), expected[0], atol=2e-6, rtol=1e-5)


# ---------------------------------------------------------------- triton vs reference


@pytest.mark.parametrize("longest_first", [False, True], ids=["in-order", "longest-first"])
@pytest.mark.parametrize(
    ("queries_per_kv", "head_size"), [(1, 64), (3, 80), (8, 64)], ids=["mha", "gqa3-h80", "gqa8"]
)
def test_triton_matches_reference_on_mixed_decode_and_prefill_batch(
    queries_per_kv: int, head_size: int, longest_first: bool
) -> None:
    # Decodes, a chunk continuing a context, an empty padding sequence, a fresh prefill
    # spanning several query blocks, and a chunk ending mid-block.
    batch = make_batch(
        [1, 9, 0, 1, 70, 5],
        [40, 23, 0, 70, 0, 12],
        num_kv_heads=2,
        queries_per_kv=queries_per_kv,
        head_size=head_size,
    )
    torch.testing.assert_close(
        batch.run(use_triton_kernel=True, longest_first=longest_first),
        batch.run(paged_attention_torch),
        atol=2e-5,
        rtol=1e-4,
    )


def test_decode_batch_leaves_cuda_graph_padding_rows_untouched() -> None:
    # A graph captured for 8 sequences replayed with 5: the last 3 have no query tokens and
    # their token rows belong to no sequence.
    batch = make_batch(
        [1, 1, 1, 1, 1, 0, 0, 0],
        [17, 1, 64, 33, 0, 0, 0, 0],
        num_kv_heads=2,
        queries_per_kv=4,
        head_size=64,
        block_size=8,
        padded_tokens=3,
    )
    sentinel = torch.full_like(batch.q, 7.0)
    out = batch.run(use_triton_kernel=True, out=sentinel.clone())
    expected = batch.run(paged_attention_torch)
    real = batch.num_real_tokens
    torch.testing.assert_close(out[:real], expected[:real], atol=2e-5, rtol=1e-4)
    assert torch.equal(out[real:], sentinel[real:])


@pytest.mark.parametrize("num_kv_splits", [3, 4])
def test_split_kv_path_matches_reference(num_kv_splits: int) -> None:
    # Splits see tiles in which some rows have no visible key, and splits with no tile.
    batch = make_batch(
        [1, 1, 3, 0, 1],
        [300, 5, 150, 0, 90],
        num_kv_heads=2,
        queries_per_kv=3,
        head_size=80,
        padded_tokens=2,
    )
    sentinel = torch.full_like(batch.q, -3.0)
    out = batch.run(use_triton_kernel=True, out=sentinel.clone(), num_kv_splits=num_kv_splits)
    expected = batch.run(paged_attention_torch)
    real = batch.num_real_tokens
    torch.testing.assert_close(out[:real], expected[:real], atol=2e-5, rtol=1e-4)
    assert torch.equal(out[real:], sentinel[real:])


def test_split_kv_path_is_exact_when_every_score_is_far_below_zero() -> None:
    # One tile per split (fp32 tiles hold 32 positions); the chunk's first row sits just
    # before the last tile, so it sees nothing in the last split. With scores near -230 in
    # log2 units, any stand-in max of 0 for that empty split would underflow every weight.
    batch = make_batch([3], [127], num_kv_heads=1, queries_per_kv=2, head_size=64, seed=5)
    batch.key_cache = 1.0 + 0.1 * batch.key_cache
    batch.q = -20.0 + 0.1 * batch.q
    out = batch.run(use_triton_kernel=True, num_kv_splits=5)
    expected = batch.run(paged_attention_torch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def move_blocks_to_top(batch: Batch, num_blocks: int, dtype: torch.dtype) -> Batch:
    """The same batch in a cache of num_blocks blocks, its blocks moved to the highest ids.

    torch.empty leaves the big cache untouched (virtual memory) except the blocks in use.
    """
    used = torch.unique(batch.block_tables.long().cpu()).to(batch.q.device)
    moved = num_blocks - 1 - used
    remap = torch.zeros(batch.key_cache.shape[0], dtype=torch.long, device=batch.q.device)
    remap[used] = moved
    caches = []
    for small in (batch.key_cache, batch.value_cache):
        big = torch.empty((num_blocks, *small.shape[1:]), dtype=dtype, device=small.device)
        big[moved] = small[used].to(dtype)
        caches.append(big)
    return Batch(
        q=batch.q.to(dtype),
        key_cache=caches[0],
        value_cache=caches[1],
        block_tables=remap[batch.block_tables.long()].to(torch.int32),
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
    )


def test_large_cache_block_offsets_do_not_overflow_int32() -> None:
    # Block id × block stride reaches past 2**32 elements (an 8 GiB fp16 cache, virtual).
    small = make_batch([1, 6], [40, 20], num_kv_heads=1, queries_per_kv=2, head_size=64, seed=3)
    block_stride = 16 * 1 * 64
    big = move_blocks_to_top(small, 2**32 // block_stride + 64, torch.float16)
    torch.testing.assert_close(
        big.run(use_triton_kernel=True), big.run(paged_attention_torch), atol=2e-3, rtol=1e-3
    )


def test_split_count_is_chosen_only_for_few_long_decodes() -> None:
    decode = dict(num_kv_heads=2, max_query_len=1, sm_count=132)
    assert choose_num_kv_splits(num_q_blocks=16, max_seq_len=4096, **decode) > 4
    # Batch 1: one 32-position tile per split or more, up to 64 splits; always a power of
    # two (each count is a kernel variant: 36 would compile another one mid-run).
    assert choose_num_kv_splits(num_q_blocks=1, max_seq_len=1152, **decode) == 32
    assert choose_num_kv_splits(num_q_blocks=1, max_seq_len=990, **decode) == 16
    for seq_len in range(1, 3000, 7):
        n = choose_num_kv_splits(
            num_q_blocks=3, max_seq_len=seq_len, **dict(decode, max_query_len=5)
        )
        assert n & (n - 1) == 0, (seq_len, n)
    assert choose_num_kv_splits(num_q_blocks=1, max_seq_len=32768, **decode) == 64
    # Short contexts: no split shorter than one 32-position tile.
    assert choose_num_kv_splits(num_q_blocks=16, max_seq_len=100, **decode) == 4
    assert choose_num_kv_splits(num_q_blocks=16, max_seq_len=32, **decode) == 1
    # Enough programs already.
    assert choose_num_kv_splits(num_q_blocks=512, max_seq_len=4096, **decode) == 1
    # Prefill chunks never split automatically.
    prefill = dict(decode, max_query_len=512)
    assert choose_num_kv_splits(num_q_blocks=16, max_seq_len=4096, **prefill) == 1


def test_decode_grid_spilling_just_past_a_wave_splits_kv() -> None:
    # 3 decode programs an SM: 396 slots on 132 SMs. With 2 KV heads, 198 sequences fill one
    # wave; 200 spill 4 programs into a second wave, which 4 splits keep short.
    def splits(batch: int, kv_heads: int = 2, head_size: int = 128, query_len: int = 1) -> int:
        return choose_num_kv_splits(
            num_q_blocks=batch,
            num_kv_heads=kv_heads,
            max_query_len=query_len,
            max_seq_len=1344,
            sm_count=132,
            head_size=head_size,
        )

    assert [splits(b) for b in (160, 192, 198)] == [1, 1, 1]
    assert [splits(b) for b in (200, 208, 232)] == [4, 4, 4]  # a short spill: 1.01-1.17 waves
    assert [splits(b) for b in (256, 320)] == [2, 2]  # 1.29-1.62 waves
    assert [splits(b) for b in (384, 396, 512)] == [1, 1, 1]  # (nearly) whole waves
    assert [splits(b) for b in (400, 448)] == [2, 2]  # just past two waves
    assert splits(200, kv_heads=4) == 2  # 800 programs: 2.02 waves
    # Narrow heads (more programs an SM, unmeasured) and few-token chunks keep one split.
    assert splits(200, head_size=64) == 1
    assert splits(200, query_len=4) == 1
    # Short contexts cap the splits at one 32-position tile each, still a power of two.
    assert (
        choose_num_kv_splits(
            num_q_blocks=200, num_kv_heads=2, max_query_len=1, max_seq_len=70, sm_count=132
        )
        == 2
    )


def test_wave_batch_sizes_are_the_batches_that_fill_whole_waves() -> None:
    assert decode_wave_batch_sizes(2, 132, 128) == [198, 396, 594, 792]
    assert decode_wave_batch_sizes(8, 132, 80) == [49, 99, 148, 198]
    assert decode_wave_batch_sizes(2, 132, 64) == []
    for batch in decode_wave_batch_sizes(4, 132, 128):  # an edge itself never splits
        assert (
            choose_num_kv_splits(
                num_q_blocks=batch, num_kv_heads=4, max_query_len=1, max_seq_len=4096, sm_count=132
            )
            == 1
        )


def test_launch_tiles_follow_batch_shape_and_split_count() -> None:
    bf16 = torch.bfloat16
    # Decode (16 rows): 64-wide KV tiles, 32-wide once splits are many (one tile each).
    assert pa._launch_config(1, 8, 128, bf16) == (16, 64, 4, 2)
    assert pa._launch_config(1, 8, 128, bf16, 8) == (16, 64, 4, 2)
    assert pa._launch_config(1, 8, 128, bf16, 16) == (16, 32, 4, 2)
    # Long prefills: 256-row tiles; medium chunks 128 rows; BLOCK_M never depends on splits.
    assert pa._launch_config(1024, 4, 128, bf16) == (256, 64, 16, 2)
    # A prefill batch carrying many decodes (8192 tokens over 200 sequences) takes 64-row
    # tiles, 3 stages: each decode computes whole tiles, and two programs share an SM.
    assert pa._launch_config(1024, 4, 128, bf16, 1, 8192 / 200) == (64, 64, 4, 3)
    assert pa._launch_config(1024, 8, 128, bf16, 1, 7232 / 71) == (64, 64, 4, 3)  # 64 decodes
    assert pa._launch_config(1024, 8, 128, bf16, 1, 7200 / 39)[0] == 256  # 32 decodes
    assert pa._launch_config(1024, 4, 128, bf16, 1, 1024.0)[0] == 256
    assert pa._launch_config(32, 4, 128, bf16)[0] == 128
    assert pa._launch_config(8, 4, 128, bf16)[0] == 64
    for q_len in (1, 8, 32, 1024):
        assert len({pa._launch_config(q_len, 8, 128, bf16, s)[0] for s in (1, 16, 64)}) == 1
    # fp32 (tests) and wide heads keep small tiles for shared memory.
    assert pa._launch_config(1024, 4, 256, bf16) == (64, 32, 4, 2)
    assert pa._launch_config(1024, 4, 128, torch.float32) == (64, 32, 4, 2)


def test_torch_path_is_taken_for_cpu_tensors_by_default() -> None:
    batch = make_batch([2, 1], [3, 9], num_kv_heads=1, queries_per_kv=2, head_size=64)
    assert torch.equal(batch.run(), batch.run(paged_attention_torch))


# ---------------------------------------------------------------- fused split merge


def _refuse_merge_kernel(*_args, **_kwargs):
    raise AssertionError("the two-launch merge kernel ran on the fused path")


class _NoLaunch:
    """Stands in for `_merge_splits_kernel`: `kernel[grid](...)` fails the test."""

    def __getitem__(self, grid):
        return _refuse_merge_kernel


def assert_counters_zero(device: torch.device | str) -> None:
    counters = pa._SPLIT_COUNTERS.get(torch.device(device))
    assert counters is not None, "the fused path allocated no counter buffer"
    assert int(counters.count_nonzero()) == 0, "a fused call left a counter non-zero"


def run_fused_and_unfused(batch: Batch, num_kv_splits: int, monkeypatch, **kwargs) -> tuple:
    """(fused output, two-launch output, reference) with the same sentinel in padding rows;
    the fused call runs with the merge kernel disabled, proving it needs no second launch."""
    sentinel = torch.full_like(batch.q, -3.0)
    with monkeypatch.context() as m:
        m.setattr(pa, "_merge_splits_kernel", _NoLaunch())
        fused = batch.run(
            use_triton_kernel=True,
            out=sentinel.clone(),
            num_kv_splits=num_kv_splits,
            fused_merge=True,
            **kwargs,
        )
    unfused = batch.run(
        use_triton_kernel=True,
        out=sentinel.clone(),
        num_kv_splits=num_kv_splits,
        fused_merge=False,
        **kwargs,
    )
    return fused, unfused, batch.run(paged_attention_torch, out=sentinel.clone())


# (queries_per_kv, head_size, num_kv_splits): GQA 8:1 and odd group sizes; one split (no
# merge at all), few, more than the longest sequence has 32-wide tiles (fp32 tiles: 301
# positions = 10 tiles), and more than it has 16-position KV blocks (19), so most splits
# of every tile are empty.
FUSED_DECODE_CASES = [(8, 64, 2), (8, 64, 13), (8, 64, 24), (3, 80, 5), (7, 64, 4)]
FUSED_DECODE_CASES += [(1, 64, 3), (5, 64, 1)]


@pytest.mark.parametrize(
    ("queries_per_kv", "head_size", "num_kv_splits"),
    FUSED_DECODE_CASES,
    ids=[f"gqa{g}-h{h}-s{s}" for g, h, s in FUSED_DECODE_CASES],
)
def test_fused_merge_matches_reference_and_two_launch_merge_on_decode_batch(
    queries_per_kv: int, head_size: int, num_kv_splits: int, monkeypatch
) -> None:
    # Decodes of various lengths (one shorter than a tile, one exactly at a block edge), an
    # empty padding sequence, and padding token rows that belong to no sequence.
    batch = make_batch(
        [1, 1, 0, 1, 1],
        [300, 5, 0, 63, 130],
        num_kv_heads=2,
        queries_per_kv=queries_per_kv,
        head_size=head_size,
        padded_tokens=2,
        seed=11,
    )
    fused, unfused, expected = run_fused_and_unfused(batch, num_kv_splits, monkeypatch)
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=1e-4)
    # Same partials, same merge formula; only the summation order may differ.
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-5)
    real = batch.num_real_tokens
    assert torch.equal(fused[real:], torch.full_like(fused[real:], -3.0))
    if num_kv_splits > 1:
        assert_counters_zero("cpu")


@pytest.mark.parametrize("longest_first", [False, True], ids=["in-order", "longest-first"])
@pytest.mark.parametrize("num_kv_splits", [2, 6])
def test_fused_merge_on_mixed_batch_with_several_query_blocks_per_sequence(
    num_kv_splits: int, longest_first: bool, monkeypatch
) -> None:
    # Chunks longer than one query block (fp32, 8:1: 64-row tiles of 8 tokens), so one
    # sequence owns several tiles, each with its own counter, next to decodes and a fresh
    # prefill; slack query blocks of the grid must leave their counters alone.
    batch = make_batch(
        [1, 12, 0, 1, 17],
        [140, 37, 0, 9, 0],
        num_kv_heads=2,
        queries_per_kv=8,
        head_size=64,
        seed=12,
    )
    fused, unfused, expected = run_fused_and_unfused(
        batch, num_kv_splits, monkeypatch, longest_first=longest_first
    )
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-5)
    assert_counters_zero("cpu")


def test_fused_merge_runs_once_per_tile_with_its_own_counter(monkeypatch) -> None:
    # The interpreter runs programs one after another, a tile's splits back to back, so a
    # wrong "am I last" test (say, the first split merging and resetting) or two tiles
    # sharing a counter would still end with a correct output. Record every merge instead:
    # the interpreter looks the helper up at call time, so a wrapper sees each call.
    merges = []
    original = pa._merge_tile_splits

    def recording_merge(counter_ptr, out_ptr, part_acc, part_max, part_sum, token, head, *rest):
        counters = pa._SPLIT_COUNTERS[torch.device("cpu")]
        slot = (int(counter_ptr.handle.data[0]) - counters.data_ptr()) // counters.element_size()
        # (token, head) of the tile's first row, the counter slot, and its count so far.
        merges.append((int(token.handle.data[0]), int(head.handle.data[0]), slot))
        assert int(counters[slot]) == 5, "merged before all 5 splits arrived"
        return original(counter_ptr, out_ptr, part_acc, part_max, part_sum, token, head, *rest)

    monkeypatch.setattr(pa, "_merge_tile_splits", recording_merge)
    batch = make_batch(
        [1, 1, 0, 1], [300, 5, 0, 63], num_kv_heads=2, queries_per_kv=3, head_size=64
    )
    out = batch.run(use_triton_kernel=True, num_kv_splits=5, fused_merge=True)
    torch.testing.assert_close(out, batch.run(paged_attention_torch), atol=2e-5, rtol=1e-4)
    # One merge per (sequence with a query token, KV head), none for the empty sequence 2;
    # tile (sequence b, KV head h) counts in slot 2 * b + h. Query heads 0 and 3 start the
    # tiles of KV heads 0 and 1.
    expected = [(0, 0, 0), (0, 3, 1), (1, 0, 2), (1, 3, 3), (2, 0, 6), (2, 3, 7)]
    assert sorted(merges) == expected
    assert_counters_zero("cpu")


def test_fused_merge_past_the_unrolled_split_count(monkeypatch) -> None:
    # 33 splits: the merge loops instead of unrolling. The first sequence has 33 fp32 tiles
    # (1051 positions), one per split, so every split (the last one too) holds keys.
    batch = make_batch([1, 1], [1050, 40], num_kv_heads=1, queries_per_kv=2, head_size=64, seed=4)
    fused, unfused, expected = run_fused_and_unfused(batch, 33, monkeypatch)
    torch.testing.assert_close(fused, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused, unfused, atol=1e-6, rtol=1e-5)
    assert_counters_zero("cpu")


def test_fused_merge_twice_in_a_row_with_the_same_buffers() -> None:
    # The merging program resets its counter; were it left at NUM_SPLITS, the second call
    # would count past it, no program would merge, and `out` would keep the first result.
    batch = make_batch([1, 1, 1], [200, 77, 150], num_kv_heads=2, queries_per_kv=4, head_size=64)
    out = torch.zeros_like(batch.q)
    first = batch.run(use_triton_kernel=True, out=out, num_kv_splits=4, fused_merge=True).clone()
    torch.testing.assert_close(first, batch.run(paged_attention_torch), atol=2e-5, rtol=1e-4)
    assert_counters_zero("cpu")

    batch.q.copy_(torch.randn(batch.q.shape, generator=torch.Generator().manual_seed(9)))
    batch.seq_lens.copy_(torch.tensor([130, 201, 64], dtype=torch.int32))
    second = batch.run(use_triton_kernel=True, out=out, num_kv_splits=4, fused_merge=True)
    torch.testing.assert_close(second, batch.run(paged_attention_torch), atol=2e-5, rtol=1e-4)
    assert not torch.allclose(first, second)
    assert_counters_zero("cpu")


def test_fused_merge_counter_buffer_grows_and_keeps_the_old_one(monkeypatch) -> None:
    monkeypatch.setattr(pa, "_MIN_SPLIT_COUNTERS", 4)
    monkeypatch.setattr(pa, "_SPLIT_COUNTERS", {})
    monkeypatch.setattr(pa, "_RETIRED_SPLIT_COUNTERS", [])
    small = make_batch([1, 1], [40, 90], num_kv_heads=2, queries_per_kv=2, head_size=64)
    big = make_batch([1] * 5, [33, 64, 90, 12, 70], num_kv_heads=2, queries_per_kv=2, head_size=64)
    for batch, size in ((small, 4), (big, 16)):  # 2 x 2 tiles, then 5 x 2 tiles
        out = batch.run(use_triton_kernel=True, num_kv_splits=3, fused_merge=True)
        torch.testing.assert_close(out, batch.run(paged_attention_torch), atol=2e-5, rtol=1e-4)
        assert pa._SPLIT_COUNTERS[torch.device("cpu")].numel() == size
        assert_counters_zero("cpu")
    # The first buffer is kept alive: a CUDA graph may still use its address.
    assert [t.numel() for t in pa._RETIRED_SPLIT_COUNTERS] == [4]


# ---------------------------------------------------------------- GPU


def _random_decode_and_prefill_batch(
    num_decodes: int, prefill_chunks: list[tuple[int, int]], max_context: int, seed: int, **kw
) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    decode_ctx = torch.randint(1, max_context, (num_decodes,), generator=gen).tolist()
    q_lens = [1] * num_decodes + [n for n, _ in prefill_chunks]
    contexts = decode_ctx + [c for _, c in prefill_chunks]
    return make_batch(q_lens, contexts, device="cuda", seed=seed, **kw)


GPU_TOLERANCES = {
    torch.bfloat16: dict(atol=1.5e-2, rtol=1.5e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_kv_splits", [None, 1, 8])
def test_gpu_decode_batch_of_64_with_contexts_up_to_4k(num_kv_splits: int | None) -> None:
    batch = _random_decode_and_prefill_batch(
        64,
        [],
        4096,
        seed=1,
        num_kv_heads=4,
        queries_per_kv=8,
        head_size=128,
        dtype=torch.bfloat16,
    )
    out = batch.run(num_kv_splits=num_kv_splits)
    torch.testing.assert_close(
        out, batch.run(paged_attention_torch), **GPU_TOLERANCES[torch.bfloat16]
    )


@pytest.mark.gpu
@requires_cuda
def test_gpu_auto_split_path_for_few_long_decodes_matches_reference() -> None:
    batch = _random_decode_and_prefill_batch(
        4,
        [],
        4096,
        seed=2,
        num_kv_heads=2,
        queries_per_kv=8,
        head_size=128,
        dtype=torch.bfloat16,
    )
    assert (
        choose_num_kv_splits(
            num_q_blocks=4,
            num_kv_heads=2,
            max_query_len=1,
            max_seq_len=batch.max_seq_len,
            sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
        )
        > 1
    )
    torch.testing.assert_close(
        batch.run(), batch.run(paged_attention_torch), **GPU_TOLERANCES[torch.bfloat16]
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    ("dtype", "queries_per_kv", "head_size"),
    [
        (torch.bfloat16, 8, 128),
        (torch.float16, 5, 96),
        (torch.bfloat16, 7, 80),
        (torch.float16, 1, 64),
        (torch.float32, 3, 128),
    ],
)
@pytest.mark.parametrize("longest_first", [False, True], ids=["in-order", "longest-first"])
def test_gpu_mixed_batch_with_chunked_prefill(
    dtype: torch.dtype, queries_per_kv: int, head_size: int, longest_first: bool
) -> None:
    batch = _random_decode_and_prefill_batch(
        48,
        [(512, 0), (300, 1700), (77, 3000), (1, 0), (1024, 2048)],
        4096,
        seed=3,
        num_kv_heads=4,
        queries_per_kv=queries_per_kv,
        head_size=head_size,
        dtype=dtype,
    )
    torch.testing.assert_close(
        batch.run(longest_first=longest_first),
        batch.run(paged_attention_torch),
        **GPU_TOLERANCES[dtype],
    )


@pytest.mark.gpu
@requires_cuda
def test_gpu_large_cache_block_offsets_do_not_overflow_int32() -> None:
    # Block id × block stride past 2**31 elements: two 4+ GiB bf16 caches.
    batch = make_batch(
        [1, 1, 130],
        [700, 2000, 100],
        num_kv_heads=8,
        queries_per_kv=4,
        head_size=128,
        dtype=torch.bfloat16,
        device="cuda",
    )
    big = move_blocks_to_top(batch, 2**31 // (16 * 8 * 128) + 256, torch.bfloat16)
    torch.testing.assert_close(
        big.run(), big.run(paged_attention_torch), **GPU_TOLERANCES[torch.bfloat16]
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_kv_splits", [None, 1])
def test_gpu_short_chunks_like_speculative_decoding(num_kv_splits: int | None) -> None:
    # Chunks of up to 8 tokens × 8 heads per KV head: the 64-row tile, splittable.
    gen = torch.Generator().manual_seed(4)
    q_lens = torch.randint(1, 9, (24,), generator=gen).tolist()
    contexts = torch.randint(0, 3000, (24,), generator=gen).tolist()
    batch = make_batch(
        q_lens,
        contexts,
        num_kv_heads=2,
        queries_per_kv=8,
        head_size=128,
        dtype=torch.bfloat16,
        device="cuda",
    )
    torch.testing.assert_close(
        batch.run(num_kv_splits=num_kv_splits),
        batch.run(paged_attention_torch),
        **GPU_TOLERANCES[torch.bfloat16],
    )


# Fused split merge at realistic shapes. Fused and two-launch results share the partials
# and differ only in the fp32 summation order of the merge, so they agree to within one
# rounding of the output dtype.
FUSED_VS_UNFUSED = {
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(
    ("dtype", "num_kv_heads", "queries_per_kv", "head_size", "num_kv_splits"),
    [
        (torch.bfloat16, 2, 8, 128, None),  # the issue-3 shape: auto split (17 on an H100)
        (torch.bfloat16, 2, 8, 128, 16),  # the engine's power-of-two choice
        (torch.bfloat16, 2, 8, 128, 32),
        (torch.bfloat16, 2, 8, 128, 3),
        (torch.bfloat16, 8, 4, 128, None),  # 32q/8kv
        (torch.float16, 2, 7, 80, 5),
        (torch.float16, 4, 5, 96, 11),
        (torch.bfloat16, 2, 8, 128, 300),  # more splits than any sequence has KV blocks
    ],
)
def test_gpu_fused_merge_on_long_decodes_matches_reference_and_two_launch_merge(
    dtype: torch.dtype,
    num_kv_heads: int,
    queries_per_kv: int,
    head_size: int,
    num_kv_splits: int | None,
) -> None:
    # 16 decodes, one at the full 4096 positions (auto: 17 splits for 2 KV heads on a
    # 132-SM card, 5 for 8), the others random; 256 KV blocks at most, so 300 splits leave
    # most of every tile's splits empty.
    gen = torch.Generator().manual_seed(5)
    contexts = [4095] + torch.randint(1, 4096, (15,), generator=gen).tolist()
    batch = make_batch(
        [1] * 16,
        contexts,
        num_kv_heads=num_kv_heads,
        queries_per_kv=queries_per_kv,
        head_size=head_size,
        dtype=dtype,
        device="cuda",
        seed=5,
    )
    expected = batch.run(paged_attention_torch)
    # Three launches back to back, no synchronization between them: each must find the
    # counters reset by the one before.
    outs = [batch.run(num_kv_splits=num_kv_splits, fused_merge=True) for _ in range(3)]
    for fused in outs:
        torch.testing.assert_close(fused, expected, **GPU_TOLERANCES[dtype])
    unfused = batch.run(num_kv_splits=num_kv_splits, fused_merge=False)
    torch.testing.assert_close(fused, unfused, **FUSED_VS_UNFUSED[dtype])
    assert_counters_zero(batch.q.device)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_kv_splits", [2, 8])
def test_gpu_fused_merge_on_mixed_batch_with_chunked_prefill(num_kv_splits: int) -> None:
    # Forced splits on chunks spanning many query blocks: one counter per (block, KV head).
    batch = _random_decode_and_prefill_batch(
        24,
        [(512, 0), (300, 1700), (77, 3000), (1, 0)],
        4096,
        seed=6,
        num_kv_heads=2,
        queries_per_kv=8,
        head_size=128,
        dtype=torch.bfloat16,
    )
    fused = batch.run(num_kv_splits=num_kv_splits, fused_merge=True)
    torch.testing.assert_close(
        fused, batch.run(paged_attention_torch), **GPU_TOLERANCES[torch.bfloat16]
    )
    unfused = batch.run(num_kv_splits=num_kv_splits, fused_merge=False)
    torch.testing.assert_close(fused, unfused, **FUSED_VS_UNFUSED[torch.bfloat16])
    assert_counters_zero(batch.q.device)


def _graph_step_inputs(static: Batch, step: int, num_real: int) -> None:
    """Writes a new decode step into the static buffers a graph was captured on: new
    queries, new context lengths, new block tables, and num_real real sequences (the rest
    have no query token, like a captured batch replayed with fewer sequences)."""
    gen = torch.Generator().manual_seed(100 + step)
    num_seqs, max_blocks = static.block_tables.shape
    num_blocks, block_size = static.key_cache.shape[:2]
    seq_lens = torch.randint(1, max_blocks * block_size + 1, (num_seqs,), generator=gen)
    seq_lens[step % num_real] = max_blocks * block_size  # one maximal context each step
    q_lens = torch.zeros(num_seqs, dtype=torch.int32)
    q_lens[:num_real] = 1
    qsl = torch.zeros(num_seqs + 1, dtype=torch.int32)
    qsl[1:] = q_lens.cumsum(0)
    tables = torch.randperm(num_blocks, generator=gen)[: num_seqs * max_blocks]
    static.q.copy_(torch.randn(static.q.shape, generator=gen))
    static.seq_lens.copy_(seq_lens)
    static.query_start_loc.copy_(qsl)
    static.block_tables.copy_(tables.view(num_seqs, max_blocks))


@pytest.mark.gpu
@requires_cuda
def test_gpu_fused_merge_in_a_cuda_graph_replayed_with_changing_inputs(monkeypatch) -> None:
    # A graph captured once (as the engine does for decode steps) and replayed three times
    # with new inputs: each replay increments and resets the same persistent counters.
    num_seqs, max_len, block_size = 16, 4096, 16
    static = make_batch(
        [1] * num_seqs,
        [max_len - 1] * num_seqs,
        num_kv_heads=2,
        queries_per_kv=8,
        head_size=128,
        dtype=torch.bfloat16,
        device="cuda",
        num_blocks=num_seqs * max_len // block_size + 64,
        seed=7,
    )
    splits = choose_num_kv_splits(
        num_q_blocks=num_seqs,
        num_kv_heads=2,
        max_query_len=1,
        max_seq_len=max_len,
        sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
    )
    assert splits > 1
    out = torch.full_like(static.q, 5.0)

    def step() -> torch.Tensor:
        return static.run(out=out, fused_merge=True)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile, allocate the counters: outside the capture, as the engine does
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with monkeypatch.context() as m:
        m.setattr(pa, "_merge_splits_kernel", _NoLaunch())  # the graph must hold one kernel
        with torch.cuda.graph(graph):
            step()

    for i, num_real in enumerate((16, 16, 11)):
        _graph_step_inputs(static, i, num_real)
        out.fill_(5.0)
        graph.replay()
        torch.cuda.synchronize()
        expected = static.run(paged_attention_torch)
        torch.testing.assert_close(
            out[:num_real], expected[:num_real], **GPU_TOLERANCES[torch.bfloat16]
        )
        assert torch.equal(out[num_real:], torch.full_like(out[num_real:], 5.0))
        assert_counters_zero(out.device)


@pytest.mark.gpu
@requires_cuda
def test_gpu_capture_without_counters_falls_back_to_the_two_launch_merge(monkeypatch) -> None:
    # No counter buffer at capture time (none may be allocated inside a capture): the graph
    # must still give correct results, through the two-launch merge.
    batch = _random_decode_and_prefill_batch(
        8,
        [],
        2048,
        seed=8,
        num_kv_heads=2,
        queries_per_kv=8,
        head_size=128,
        dtype=torch.bfloat16,
    )
    out = torch.empty_like(batch.q)
    batch.run(out=out, num_kv_splits=8, fused_merge=False)  # compile outside the capture
    torch.cuda.synchronize()
    monkeypatch.setattr(pa, "_SPLIT_COUNTERS", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batch.run(out=out, num_kv_splits=8, fused_merge=True)
    assert pa._SPLIT_COUNTERS == {}
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(
        out, batch.run(paged_attention_torch), **GPU_TOLERANCES[torch.bfloat16]
    )


def test_default_merge_is_fused_up_to_the_limit_and_two_launches_above(monkeypatch) -> None:
    # fused_merge=None: the split kernel merges in the same launch up to
    # FUSED_MERGE_MAX_SPLITS splits (the merge kernel must not launch), a second launch
    # merges above (where a tile's last program would merge alone).
    batch = make_batch([1, 1], [600, 90], num_kv_heads=2, queries_per_kv=2, head_size=64)
    expected = batch.run(paged_attention_torch)
    limit = pa.FUSED_MERGE_MAX_SPLITS
    with monkeypatch.context() as m:
        m.setattr(pa, "_merge_splits_kernel", _NoLaunch())
        out = batch.run(use_triton_kernel=True, num_kv_splits=limit)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    merges = []
    original = pa._merge_splits_kernel

    class Recording:
        def __getitem__(self, grid):  # noqa: ANN001, ANN204
            merges.append(grid)
            return original[grid]

    with monkeypatch.context() as m:
        m.setattr(pa, "_merge_splits_kernel", Recording())
        out = batch.run(use_triton_kernel=True, num_kv_splits=limit + 1)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert len(merges) == 1

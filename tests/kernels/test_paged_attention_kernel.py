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

from kernels.paged_attention import (
    choose_num_kv_splits,
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


@pytest.mark.parametrize(
    ("queries_per_kv", "head_size"), [(1, 64), (3, 80), (8, 64)], ids=["mha", "gqa3-h80", "gqa8"]
)
def test_triton_matches_reference_on_mixed_decode_and_prefill_batch(
    queries_per_kv: int, head_size: int
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
        batch.run(use_triton_kernel=True), batch.run(paged_attention_torch), atol=2e-5, rtol=1e-4
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
    # Short contexts: a split would hold fewer than ~128 positions.
    assert choose_num_kv_splits(num_q_blocks=16, max_seq_len=100, **decode) == 1
    # Enough programs already.
    assert choose_num_kv_splits(num_q_blocks=512, max_seq_len=4096, **decode) == 1
    # Prefill chunks never split automatically.
    prefill = dict(decode, max_query_len=512)
    assert choose_num_kv_splits(num_q_blocks=16, max_seq_len=4096, **prefill) == 1


def test_torch_path_is_taken_for_cpu_tensors_by_default() -> None:
    batch = make_batch([2, 1], [3, 9], num_kv_heads=1, queries_per_kv=2, head_size=64)
    assert torch.equal(batch.run(), batch.run(paged_attention_torch))


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
def test_gpu_mixed_batch_with_chunked_prefill(
    dtype: torch.dtype, queries_per_kv: int, head_size: int
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
        batch.run(), batch.run(paged_attention_torch), **GPU_TOLERANCES[dtype]
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

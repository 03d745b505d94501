"""BlockPool: LRU free queue, reference counts, the hash map and its confirmation."""

from __future__ import annotations

import pytest

from mmengine.block_hash import HashKey, hash_block
from mmengine.block_pool import BlockPool


def _key(tokens: tuple[int, ...], parent: bytes | None = None) -> HashKey:
    return (parent, tokens, ())


def test_pool_refuses_fewer_than_two_blocks() -> None:
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1, enable_caching=True)


def test_null_block_is_never_handed_out() -> None:
    pool = BlockPool(5, enable_caching=True)
    assert pool.num_usable_blocks == 4
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert pool.num_free_blocks() == 0
    with pytest.raises(ValueError, match="asked for 1 KV blocks, 0 free"):
        pool.get_new_blocks(1)
    pool.free([pool.null_block])  # ignored: the null block is never freed
    assert pool.num_free_blocks() == 0
    pool.free(blocks)
    assert pool.num_free_blocks() == 4
    again = pool.get_new_blocks(4)
    assert pool.null_block not in again
    assert pool.null_block.ref_cnt == 1


def test_fresh_pool_hands_out_blocks_in_id_order() -> None:
    pool = BlockPool(5, enable_caching=True)
    assert [b.block_id for b in pool.get_new_blocks(2)] == [1, 2]
    assert [b.block_id for b in pool.get_new_blocks(2)] == [3, 4]


def test_least_recently_freed_block_is_evicted_first() -> None:
    pool = BlockPool(5, enable_caching=True)
    b1, b2, b3, b4 = pool.get_new_blocks(4)
    pool.free([b3])
    pool.free([b1])
    pool.free([b4, b2])  # within one call: in the given order
    assert [b.block_id for b in pool.get_new_blocks(4)] == [3, 1, 4, 2]


def test_freed_blocks_join_the_tail_behind_never_used_ones() -> None:
    pool = BlockPool(5, enable_caching=True)
    (b1,) = pool.get_new_blocks(1)
    pool.free([b1])
    assert [b.block_id for b in pool.get_new_blocks(4)] == [2, 3, 4, 1]


def test_ref_count_counts_users_and_block_is_free_only_at_zero() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    assert block.ref_cnt == 1
    pool.touch([block])  # a second request shares it
    assert block.ref_cnt == 2
    pool.free([block])
    assert block.ref_cnt == 1 and not block.in_free_queue
    assert pool.num_free_blocks() == 2
    pool.free([block])
    assert block.ref_cnt == 0 and block.in_free_queue
    assert pool.num_free_blocks() == 3


def test_double_free_asserts() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([block])


def test_cached_block_is_found_by_hash_and_key() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    key = _key((1, 2, 3, 4))
    pool.cache_block(block, hash_block(key), key)
    assert pool.lookup(hash_block(key), key) is block
    assert pool.lookup(hash_block(_key((1, 2, 3, 5))), _key((1, 2, 3, 5))) is None


def test_hash_collision_with_a_different_key_misses() -> None:
    pool = BlockPool(4, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    stored = _key((1, 2, 3, 4))
    h = hash_block(stored)
    pool.cache_block(block, h, stored)
    # Another block whose hash happens to be the same but whose content differs.
    for other in (
        _key((9, 9, 9, 9)),
        _key((1, 2, 3, 4), parent=b"p" * 16),
        (None, (1, 2, 3, 4), (("img", 0),)),
    ):
        assert pool.lookup(h, other) is None
    assert pool.lookup(h, stored) is block


def test_freed_cached_block_stays_findable_until_reused() -> None:
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    key = _key((5, 6))
    pool.cache_block(block, hash_block(key), key)
    pool.free([block])
    assert block.ref_cnt == 0 and block.in_free_queue
    assert pool.lookup(hash_block(key), key) is block
    pool.touch([block])  # a prefix hit revives it out of the free queue
    assert block.ref_cnt == 1 and not block.in_free_queue
    assert pool.num_free_blocks() == 1


def test_eviction_removes_the_hash() -> None:
    pool = BlockPool(2, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    key = _key((5, 6))
    h = hash_block(key)
    pool.cache_block(block, h, key)
    pool.free([block])
    (reused,) = pool.get_new_blocks(1)
    assert reused is block
    assert block.block_hash is None and block.hash_key is None
    assert h not in pool.cached
    assert pool.lookup(h, key) is None


def test_first_block_cached_under_a_hash_keeps_it() -> None:
    pool = BlockPool(4, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    key = _key((1, 2))
    pool.cache_block(first, hash_block(key), key)
    pool.cache_block(second, hash_block(key), key)  # same content computed twice
    assert second.block_hash is None
    assert pool.lookup(hash_block(key), key) is first
    # Evicting the duplicate leaves the original entry alone.
    pool.free([second])
    pool.get_new_blocks(2)
    assert pool.lookup(hash_block(key), key) is first


def test_caching_disabled_records_no_hash() -> None:
    pool = BlockPool(3, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    key = _key((1, 2))
    pool.cache_block(block, hash_block(key), key)
    assert block.block_hash is None
    assert pool.lookup(hash_block(key), key) is None


def test_reset_prefix_cache_only_when_no_block_is_in_use() -> None:
    pool = BlockPool(3, enable_caching=True)
    (block,) = pool.get_new_blocks(1)
    key = _key((1, 2))
    pool.cache_block(block, hash_block(key), key)
    assert not pool.reset_prefix_cache()
    assert pool.lookup(hash_block(key), key) is block
    pool.free([block])
    assert pool.reset_prefix_cache()
    assert pool.lookup(hash_block(key), key) is None
    assert not pool.cached

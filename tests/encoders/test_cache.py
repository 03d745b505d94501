"""EmbeddingCache: counting, LRU eviction by bytes, oversized items."""

from __future__ import annotations

import torch

from encoders.cache import EmbeddingCache

torch.set_num_threads(1)


def emb(rows: int) -> torch.Tensor:
    return torch.zeros(rows, 4)  # 16 bytes per row in float32


def test_get_counts_hits_and_misses() -> None:
    cache = EmbeddingCache(max_bytes=1024)
    assert cache.get("a") is None
    tensor = emb(2)
    assert cache.put("a", tensor)
    assert cache.get("a") is tensor
    assert cache.get("a") is tensor
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.entries, stats.bytes_used) == (2, 1, 1, 32)


def test_least_recently_used_entry_is_evicted_first() -> None:
    cache = EmbeddingCache(max_bytes=3 * 32)
    for key in "abc":
        cache.put(key, emb(2))
    cache.get("a")  # "b" is now the least recently used
    cache.put("d", emb(2))
    assert "b" not in cache
    assert all(key in cache for key in "acd")
    cache.put("e", emb(4))  # needs 64 bytes: evicts "c" then "a"
    assert "c" not in cache and "a" not in cache
    assert "d" in cache and "e" in cache
    stats = cache.stats
    assert (stats.evictions, stats.bytes_used, stats.entries) == (3, 96, 2)


def test_item_larger_than_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache = EmbeddingCache(max_bytes=64)
    cache.put("small", emb(2))
    assert not cache.put("huge", emb(5))
    assert "huge" not in cache and "small" in cache
    assert cache.stats.rejected == 1
    assert cache.stats.evictions == 0


def test_putting_an_existing_hash_replaces_it_without_double_counting() -> None:
    cache = EmbeddingCache(max_bytes=64)
    cache.put("a", emb(2))
    cache.put("a", emb(3))
    assert cache.stats.bytes_used == 48
    assert len(cache) == 1

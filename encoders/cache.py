"""An LRU cache of encoder outputs keyed by item content hash, bounded in bytes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

import torch


@dataclass
class CacheStats:
    """Counters of an EmbeddingCache since it was created."""

    hits: int = 0  # get() calls that found their hash
    misses: int = 0  # get() calls that did not
    evictions: int = 0  # entries dropped to make room
    rejected: int = 0  # put() calls refused because the tensor alone exceeds the budget
    bytes_used: int = 0  # bytes of the tensors held now
    entries: int = 0  # tensors held now


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class EmbeddingCache:
    """Least-recently-used cache of embeddings, evicting by bytes.

    Not thread-safe: one encoder stage loop owns it. Tensors are held as given (same
    device); callers should put compact tensors, since a view keeps its whole base alive
    while only its own bytes are counted.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()  # oldest use first
        self._stats = CacheStats()

    def get(self, content_hash: str) -> torch.Tensor | None:
        """Returns the cached tensor (marking it most recently used), or None."""
        tensor = self._entries.get(content_hash)
        if tensor is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(content_hash)
        self._stats.hits += 1
        return tensor

    def put(self, content_hash: str, tensor: torch.Tensor) -> bool:
        """Caches `tensor`, evicting least recently used entries until it fits.

        Returns:
            Whether it was cached: a tensor larger than the whole budget is not (and
            evicts nothing).
        """
        size = _nbytes(tensor)
        if size > self.max_bytes:
            self._stats.rejected += 1
            return False
        old = self._entries.pop(content_hash, None)
        if old is not None:
            self._stats.bytes_used -= _nbytes(old)
        while self._stats.bytes_used + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._stats.bytes_used -= _nbytes(evicted)
            self._stats.evictions += 1
        self._entries[content_hash] = tensor
        self._stats.bytes_used += size
        return True

    def __contains__(self, content_hash: str) -> bool:
        """Membership without touching recency or counters."""
        return content_hash in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        return replace(self._stats, entries=len(self._entries))

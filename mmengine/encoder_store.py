"""Bookkeeping of the engine-side store of vision embeddings awaiting prefill.

Pure Python: it only counts. The runner holds the tensors, keyed by item content hash.
An item is encoded whole once, kept while any request still has to prefill over it, and
freed when the last such request has passed its end (or finished, or was preempted).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class _Entry:
    num_tokens: int
    holders: set[str] = field(default_factory=set)  # request ids still needing it


class EncoderStore:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity = capacity_tokens  # embedding rows the store may hold at once
        self.used = 0
        self.entries: dict[str, _Entry] = {}
        self._freed: list[str] = []

    def has(self, content_hash: str) -> bool:
        return content_hash in self.entries

    def fits(self, num_tokens: int) -> bool:
        return self.used + num_tokens <= self.capacity

    def add(self, content_hash: str, num_tokens: int, request_id: str) -> None:
        """Reserve room for a new item (the caller checked ``fits``)."""
        entry = self.entries.get(content_hash)
        if entry is None:
            entry = self.entries[content_hash] = _Entry(num_tokens)
            self.used += num_tokens
        entry.holders.add(request_id)

    def hold(self, content_hash: str, request_id: str) -> None:
        self.entries[content_hash].holders.add(request_id)

    def release(self, content_hash: str, request_id: str) -> None:
        entry = self.entries.get(content_hash)
        if entry is None:
            return
        entry.holders.discard(request_id)
        if not entry.holders:
            del self.entries[content_hash]
            self.used -= entry.num_tokens
            self._freed.append(content_hash)

    def take_freed(self) -> list[str]:
        freed, self._freed = self._freed, []
        return freed

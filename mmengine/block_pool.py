"""The pool of fixed-size KV blocks: reference counts, an LRU free queue, the hash map.

Pure Python, no torch: block ids index the KV tensors that the model runner owns.
Block 0 is the null block (never handed out): padding entries of block tables point at it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mmengine.block_hash import BlockHash, HashKey


@dataclass(eq=False)
class KVCacheBlock:
    """One block of KV memory."""

    block_id: int
    ref_cnt: int = 0  # requests using this block
    block_hash: BlockHash | None = None  # set once the block is full and cached
    # What the hash was computed from (parent hash, tokens, extra keys): confirms hits.
    hash_key: HashKey | None = None
    # Links of the doubly linked free queue (None when not in the queue).
    prev_free: KVCacheBlock | None = None
    next_free: KVCacheBlock | None = None
    in_free_queue: bool = False


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order: O(1) pop, append and remove."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels
        self._tail = KVCacheBlock(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def append(self, block: KVCacheBlock) -> None:
        assert not block.in_free_queue
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        block.in_free_queue = True
        self.num_free += 1

    def remove(self, block: KVCacheBlock) -> None:
        assert block.in_free_queue and block.prev_free and block.next_free
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_free -= 1

    def popleft(self) -> KVCacheBlock:
        first = self._head.next_free
        if first is None or first is self._tail:
            raise IndexError("no free KV blocks")
        self.remove(first)
        return first


class BlockPool:
    """Owns all blocks; hands out free ones (evicting the least recently freed) and
    finds cached ones by hash."""

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 2:
            raise ValueError("the KV pool needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1  # never freed, never handed out
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    def usage(self) -> float:
        return 1.0 - self.num_free_blocks() / self.num_usable_blocks

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the head of the free queue, evicting their cached hashes."""
        if n > self.free_queue.num_free:
            raise ValueError(f"asked for {n} KV blocks, {self.free_queue.num_free} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None
            block.hash_key = None

    def lookup(self, block_hash: BlockHash, hash_key: HashKey) -> KVCacheBlock | None:
        """The cached block for this hash, if its recorded key confirms the hit."""
        block = self.cached.get(block_hash)
        if block is None or block.hash_key != hash_key:
            return None
        return block

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(
        self,
        block: KVCacheBlock,
        block_hash: BlockHash,
        hash_key: HashKey,
    ) -> None:
        """Record a full block under its hash (the first block with a hash keeps it)."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:
            return
        block.block_hash = block_hash
        block.hash_key = hash_key
        self.cached[block_hash] = block

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference; blocks reaching zero go to the tail of the free queue.

        Pass blocks in eviction order: callers give a request's tail blocks first, so a
        shared prefix outlives the suffixes that hang off it.
        """
        for block in blocks:
            if block is self.null_block:
                continue
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} freed twice"
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    self._evict(block)
                self.free_queue.append(block)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only when no block is in use)."""
        if self.num_free_blocks() != self.num_usable_blocks:
            return False
        for block in self.blocks[1:]:
            self._evict(block)
        return True

"""Per-request KV block tables on top of the block pool, with prefix caching.

Pure Python, no torch. Calls go one way: Scheduler -> KVCacheManager -> BlockPool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmengine.block_hash import extend_block_hashes
from mmengine.block_pool import BlockPool, KVCacheBlock
from mmengine.request import Request


@dataclass
class PrefixHit:
    """Blocks whose K/V a request can reuse instead of computing."""

    blocks: list[KVCacheBlock] = field(default_factory=list)
    num_tokens: int = 0  # len(blocks) * block_size


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, served from cache
    mm_hit_tokens: int = 0  # hit tokens inside blocks that hold multimodal items


class KVCacheManager:
    """Allocates, shares, caches and frees the blocks of each request."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # kept in step with req_blocks
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already in the hash map
        self.stats = PrefixCacheStats()

    # ---- queries -----------------------------------------------------------------------
    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live list: do not modify)."""
        return self.req_block_ids.get(request_id, [])

    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks()

    def num_used_blocks(self) -> int:
        return self.pool.num_usable_blocks - self.pool.num_free_blocks()

    def _update_hashes(self, request: Request) -> None:
        extend_block_hashes(
            request.block_hashes,
            request.block_hash_keys,
            request.all_token_ids,
            self.block_size,
            request.mm_positions,
        )

    def find_prefix(self, request: Request) -> PrefixHit:
        """Longest run of cached, confirmed blocks at the start of the request's tokens.

        At least one token is always left to compute so the request gets logits. Requests
        asking for prompt logprobs compute their whole prompt (cached K/V has no logits).
        """
        if not self.enable_caching or request.wants_prompt_logprobs():
            return PrefixHit()
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit = PrefixHit()
        for i in range(max_blocks):
            block = self.pool.lookup(request.block_hashes[i], request.block_hash_keys[i])
            if block is None:
                break
            hit.blocks.append(block)
        hit.num_tokens = len(hit.blocks) * self.block_size
        self.stats.queried_tokens += request.num_tokens
        self.stats.hit_tokens += hit.num_tokens
        if hit.num_tokens:
            self.stats.mm_hit_tokens += sum(
                min(p.offset + p.length, hit.num_tokens) - p.offset
                for p in request.mm_positions
                if p.offset < hit.num_tokens
            )
        return hit

    def share_prefix(self, request: Request, leader: Request) -> PrefixHit:
        """Full prompt blocks of ``leader`` (same prompt, already computed) to share."""
        blocks = self.req_blocks.get(leader.request_id, [])
        n = min(
            (request.num_tokens - 1) // self.block_size,
            request.num_prompt_tokens // self.block_size,  # never the leader's outputs
            leader.num_computed_tokens // self.block_size,
            len(blocks),
        )
        return PrefixHit(blocks=list(blocks[:n]), num_tokens=n * self.block_size)

    # ---- updates -----------------------------------------------------------------------
    def allocate_slots(
        self, request: Request, num_new_tokens: int, hit: PrefixHit | None = None
    ) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after ``hit``).

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        blocks = self.req_blocks.get(request.request_id, [])
        hit_tokens = hit.num_tokens if hit is not None else 0
        total = request.num_computed_tokens + hit_tokens + num_new_tokens
        num_required = -(-total // self.block_size)
        if hit is None and num_required <= len(blocks):
            return True  # the common decode step: the last block still has room
        hit = hit or PrefixHit()
        num_new_blocks = max(0, num_required - len(blocks) - len(hit.blocks))
        # Hit blocks sitting in the free queue stop being available once we take them.
        free_hits = sum(1 for b in hit.blocks if b.ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks() - free_hits:
            return False
        self.pool.touch(hit.blocks)
        blocks = self.req_blocks.setdefault(request.request_id, [])
        ids = self.req_block_ids.setdefault(request.request_id, [])
        new = self.pool.get_new_blocks(num_new_blocks)
        for b in (*hit.blocks, *new):
            blocks.append(b)
            ids.append(b.block_id)
        if hit.blocks:
            # Shared blocks are already in the hash map (or owned by the leader).
            self._num_cached_blocks[request.request_id] = len(hit.blocks)
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Record every full block whose K/V is now computed under its chained hash."""
        if not self.enable_caching:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        start = self._num_cached_blocks.get(request.request_id, 0)
        if request.num_computed_tokens // self.block_size <= start:
            return  # no newly full block (most decode steps): nothing to hash or cache
        self._update_hashes(request)
        # Only blocks of known token ids have hashes: with async scheduling the computed
        # range can end in a token still in flight.
        end = min(
            request.num_computed_tokens // self.block_size,
            len(blocks),
            len(request.block_hashes),
        )
        for i in range(start, end):
            self.pool.cache_block(blocks[i], request.block_hashes[i], request.block_hash_keys[i])
        self._num_cached_blocks[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first (so prefixes are evicted last)."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.req_block_ids.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        self.pool.free(reversed(blocks))

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

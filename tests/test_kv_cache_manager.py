"""KVCacheManager: prefix hits, allocation, sharing and freeing, on real requests."""

from __future__ import annotations

from mmengine.kv_cache_manager import KVCacheManager, PrefixHit
from mmengine.request import MMPosition, Request
from tests.core_factories import assert_all_blocks_free, make_prompt, make_request

BS = 4  # block size of every manager here


def _kv(num_blocks: int = 17, enable_caching: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_caching)


def _compute(kv: KVCacheManager, req: Request, hit: PrefixHit | None = None) -> None:
    """Allocate and 'compute' the request's whole prompt (after ``hit``), caching it."""
    hit = hit or PrefixHit()
    n = req.num_tokens - req.num_computed_tokens - hit.num_tokens
    assert kv.allocate_slots(req, n, hit)
    req.num_computed_tokens += hit.num_tokens + n
    kv.cache_computed_blocks(req)


def _cache_prompt(kv: KVCacheManager, prompt: list[int]) -> None:
    """Compute a prompt once and finish the request, leaving its blocks cached."""
    req = make_request("seed", prompt)
    _compute(kv, req, kv.find_prefix(req))
    kv.free(req)


def test_prefix_hit_counts_queried_and_hit_tokens() -> None:
    kv = _kv()
    prompt = make_prompt(10)
    _cache_prompt(kv, prompt)
    assert (kv.stats.queried_tokens, kv.stats.hit_tokens) == (10, 0)
    other = make_request("b", prompt[:8] + [1, 2, 3])
    hit = kv.find_prefix(other)
    assert hit.num_tokens == 8 and len(hit.blocks) == 2
    assert (kv.stats.queried_tokens, kv.stats.hit_tokens) == (21, 8)


def test_prefix_hit_stops_at_the_first_differing_block() -> None:
    kv = _kv()
    prompt = make_prompt(12)
    _cache_prompt(kv, prompt)
    changed = list(prompt)
    changed[5] = 1  # second block differs: the third cannot hit (its parent differs)
    assert kv.find_prefix(make_request("b", changed)).num_tokens == 4


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    kv = _kv()
    prompt = make_prompt(17)
    _cache_prompt(kv, prompt)
    # 16 tokens: 15 may hit, rounded down to whole blocks.
    assert kv.find_prefix(make_request("a", prompt[:16])).num_tokens == 12
    # 17 tokens: 16 may hit.
    assert kv.find_prefix(make_request("b", prompt)).num_tokens == 16


def test_request_with_prompt_logprobs_gets_no_prefix_hits() -> None:
    kv = _kv()
    prompt = make_prompt(12)
    _cache_prompt(kv, prompt)
    assert kv.find_prefix(make_request("a", prompt, prompt_logprobs=0)).num_tokens == 0
    assert kv.find_prefix(make_request("b", prompt)).num_tokens == 8


def test_caching_disabled_gives_no_hits() -> None:
    kv = _kv(enable_caching=False)
    prompt = make_prompt(12)
    _cache_prompt(kv, prompt)
    assert kv.find_prefix(make_request("a", prompt)).num_tokens == 0


def test_allocate_slots_takes_one_block_per_block_size_tokens() -> None:
    kv = _kv(num_blocks=9)
    req = make_request("a", 5)
    assert kv.allocate_slots(req, 5)
    assert len(kv.block_ids("a")) == 2
    req.num_computed_tokens = 5
    for total in range(6, 13):  # decode one token at a time
        assert kv.allocate_slots(req, 1)
        req.num_computed_tokens += 1
        assert len(kv.block_ids("a")) == -(-total // BS)
    assert kv.num_used_blocks() == 3


def test_allocate_slots_fails_without_change_when_the_pool_is_short() -> None:
    kv = _kv(num_blocks=5)  # 4 usable
    holder = make_request("holder", 12)
    assert kv.allocate_slots(holder, 12)
    assert kv.num_free_blocks() == 1
    req = make_request("a", 8)
    assert not kv.allocate_slots(req, 8)
    assert kv.num_free_blocks() == 1
    assert kv.block_ids("a") == [] and "a" not in kv.req_blocks
    assert kv.allocate_slots(req, 4)  # one block still fits
    assert kv.num_free_blocks() == 0


def test_allocate_slots_counts_free_queue_hits_as_unavailable() -> None:
    kv = _kv(num_blocks=5)  # 4 usable
    prompt = make_prompt(8)
    _cache_prompt(kv, prompt)  # two cached blocks, now in the free queue
    other = make_request("other", 4)
    assert kv.allocate_slots(other, 4)
    assert kv.num_free_blocks() == 3  # two of them are the cached hits

    req = make_request("a", prompt + make_prompt(8))
    hit = kv.find_prefix(req)
    assert hit.num_tokens == 8
    # 16 tokens: 2 hit blocks + 2 new, but taking the hits leaves only 1 free block.
    assert not kv.allocate_slots(req, 8, hit)
    assert kv.num_free_blocks() == 3
    assert all(b.ref_cnt == 0 and b.in_free_queue for b in hit.blocks)
    assert kv.block_ids("a") == []
    assert kv.find_prefix(make_request("c", prompt + [1])).blocks == hit.blocks
    # 12 tokens: 2 hit blocks + 1 new block fits exactly.
    assert kv.allocate_slots(req, 4, hit)
    assert [b.ref_cnt for b in hit.blocks] == [1, 1]
    assert kv.block_ids("a")[:2] == [b.block_id for b in hit.blocks]
    assert kv.num_free_blocks() == 0


def test_prefix_hit_on_blocks_in_use_increments_their_ref_counts() -> None:
    kv = _kv()
    prompt = make_prompt(9)
    first = make_request("a", prompt)
    _compute(kv, first)
    second = make_request("b", prompt)
    hit = kv.find_prefix(second)
    assert kv.allocate_slots(second, 1, hit)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert [b.ref_cnt for b in hit.blocks] == [2, 2]
    kv.free(first)
    assert [b.ref_cnt for b in hit.blocks] == [1, 1]
    kv.free(second)
    assert_all_blocks_free(kv)


def test_leader_prompt_blocks_are_shared_with_followers() -> None:
    kv = _kv(enable_caching=False)  # sharing must not depend on the hash map
    prompt = make_prompt(10)
    leader = make_request("r-0", prompt)
    _compute(kv, leader)
    leader_blocks = list(kv.req_blocks["r-0"])
    assert len(leader_blocks) == 3
    followers = [make_request(f"r-{i}", prompt, share_prompt_with="r-0") for i in (1, 2)]
    for f in followers:
        shared = kv.share_prefix(f, leader)
        assert shared.num_tokens == 8 and shared.blocks == leader_blocks[:2]
        _compute(kv, f, shared)
        assert kv.req_blocks[f.request_id][:2] == leader_blocks[:2]
        assert kv.req_blocks[f.request_id][2] is not leader_blocks[2]
    assert [b.ref_cnt for b in leader_blocks] == [3, 3, 1]
    assert kv.num_used_blocks() == 5
    kv.free(leader)
    assert [b.ref_cnt for b in leader_blocks] == [2, 2, 0]
    for f in followers:
        kv.free(f)
    assert_all_blocks_free(kv)


def test_share_prefix_only_covers_what_the_leader_has_computed() -> None:
    kv = _kv(enable_caching=False)
    prompt = make_prompt(20)
    leader = make_request("r-0", prompt)
    assert kv.allocate_slots(leader, 6)
    leader.num_computed_tokens = 6
    follower = make_request("r-1", prompt, share_prompt_with="r-0")
    assert kv.share_prefix(follower, leader).num_tokens == 4


def test_free_releases_tail_blocks_first() -> None:
    kv = _kv(num_blocks=4)  # 3 usable
    prompt = make_prompt(12)
    req = make_request("a", prompt)
    _compute(kv, req)
    ids = kv.block_ids("a")
    kv.free(req)
    # The tail is evicted first, so the shared prefix survives longest.
    taker = make_request("b", 4)
    assert kv.allocate_slots(taker, 4)
    assert kv.block_ids("b") == [ids[2]]
    assert kv.find_prefix(make_request("c", prompt)).num_tokens == 8


def test_every_block_is_free_after_all_requests_finish() -> None:
    kv = _kv()
    shared = make_prompt(8)
    reqs = [make_request(f"r{i}", shared + make_prompt(3 + i)) for i in range(4)]
    for r in reqs:
        _compute(kv, r, kv.find_prefix(r))
        for _ in range(5):  # a few decode steps each
            r.append_output_token(7)
            assert kv.allocate_slots(r, 1)
            r.num_computed_tokens += 1
            kv.cache_computed_blocks(r)
    assert kv.stats.hit_tokens == 3 * 8
    for r in reqs:
        kv.free(r)
    assert_all_blocks_free(kv)


def _image_request(rid: str, tokens: list[int], content_hash: str, offset: int) -> Request:
    return make_request(rid, tokens, mm_positions=[MMPosition(content_hash, offset, 6)])


def test_same_tokens_with_different_image_hashes_share_no_blocks() -> None:
    kv = _kv()
    tokens = [5] * 3 + [99] * 6 + make_prompt(7)  # 99: the image placeholder id
    first = _image_request("a", tokens, "img-A", 3)
    _compute(kv, first, kv.find_prefix(first))
    other = _image_request("b", tokens, "img-B", 3)
    hit = kv.find_prefix(other)
    assert hit.num_tokens == 0
    _compute(kv, other, hit)
    assert not set(kv.block_ids("b")) & set(kv.block_ids("a"))
    assert kv.stats.mm_hit_tokens == 0


def test_same_image_hash_at_the_same_offset_shares_blocks() -> None:
    kv = _kv()
    tokens = [5] * 3 + [99] * 6 + make_prompt(7)
    first = _image_request("a", tokens, "img-A", 3)
    _compute(kv, first, kv.find_prefix(first))
    again = _image_request("b", tokens, "img-A", 3)
    hit = kv.find_prefix(again)
    assert hit.num_tokens == 12
    assert hit.blocks == kv.req_blocks["a"][:3]
    assert kv.stats.mm_hit_tokens == 6  # the image's placeholder tokens inside the hit


def test_same_image_hash_at_another_offset_shares_no_blocks() -> None:
    kv = _kv()
    tokens = [99] * 12 + make_prompt(4)
    first = _image_request("a", tokens, "img-A", 3)
    _compute(kv, first, kv.find_prefix(first))
    moved = _image_request("b", tokens, "img-A", 4)
    assert kv.find_prefix(moved).num_tokens == 0


def test_text_blocks_before_an_image_are_shared_whatever_the_image() -> None:
    kv = _kv()
    tokens = make_prompt(8) + [99] * 6 + make_prompt(3)
    first = _image_request("a", tokens, "img-A", 8)
    _compute(kv, first, kv.find_prefix(first))
    other = _image_request("b", tokens, "img-B", 8)
    assert kv.find_prefix(other).num_tokens == 8

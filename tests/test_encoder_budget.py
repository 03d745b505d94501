"""The scheduler's encoder budget and embedding store (pure Python, no model)."""

from __future__ import annotations

import pytest

from mmengine.request import MMPosition
from mmengine.scheduler import Scheduler, SchedulerConfig
from tests.core_factories import (
    assert_all_blocks_free,
    make_request,
    run_until_done,
    scheduled_tokens,
    step,
)


def make_mm_scheduler(
    *, encoder_tokens: int = 64, store_tokens: int = 64, batch: int = 64
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=8,
            max_num_batched_tokens=batch,
            max_model_len=128,
            block_size=4,
            num_kv_blocks=1 + 4 * 32,
            enable_prefix_caching=True,
            max_num_encoder_tokens=encoder_tokens,
            encoder_store_tokens=store_tokens,
        )
    )


def encoded(sched) -> list[tuple[str, str]]:
    return [(req.request_id, req.mm_positions[i].content_hash) for req, i in sched.encoder_inputs]


def test_item_is_encoded_once_and_sliced_across_chunks() -> None:
    s = make_mm_scheduler(batch=8)
    req = make_request("a", 40, mm_positions=[MMPosition("img", 4, 20)], max_tokens=1)
    s.add_request(req)
    first, _ = step(s)
    assert scheduled_tokens(first) == {"a": 8}
    assert encoded(first) == [("a", "img")]  # encoded whole with the first chunk touching it
    second, _ = step(s)  # [8, 16): inside the item
    assert not second.encoder_inputs  # later chunks only slice the stored embeddings
    assert s.encoder_store.has("img")
    third, _ = step(s)  # [16, 24): reaches the item's end, which releases it
    assert not third.encoder_inputs
    assert not s.encoder_store.has("img") and s.encoder_store.used == 0


def test_chunk_stops_before_an_item_that_does_not_fit_the_budget() -> None:
    s = make_mm_scheduler(encoder_tokens=20, batch=64)
    req = make_request(
        "a", 60, mm_positions=[MMPosition("i1", 2, 16), MMPosition("i2", 30, 16)], max_tokens=1
    )
    s.add_request(req)
    first, _ = step(s)
    assert scheduled_tokens(first) == {"a": 30}  # stops just before i2
    assert encoded(first) == [("a", "i1")]
    second, _ = step(s)
    assert encoded(second) == [("a", "i2")]
    assert scheduled_tokens(second) == {"a": 30}


def test_requests_waiting_for_the_encoder_do_not_block_others() -> None:
    s = make_mm_scheduler(encoder_tokens=16, store_tokens=16)
    big = make_request("big", 30, mm_positions=[MMPosition("x", 0, 16)], max_tokens=1)
    other_img = make_request("img2", 30, mm_positions=[MMPosition("y", 0, 16)], max_tokens=1)
    text = make_request("text", 10, max_tokens=1)
    for r in (big, other_img, text):
        s.add_request(r)
    first, _ = step(s)
    got = scheduled_tokens(first)
    assert got.get("big") == 30 and "img2" not in got  # no room for a second item
    assert got.get("text") == 10  # text-only request goes ahead of the blocked one
    run_until_done(s)
    assert_all_blocks_free(s.kv)
    assert s.encoder_store.used == 0


def test_same_item_in_two_requests_is_encoded_once() -> None:
    s = make_mm_scheduler()
    a = make_request("a", 30, mm_positions=[MMPosition("same", 2, 16)], max_tokens=1)
    b = make_request("b", 30, mm_positions=[MMPosition("same", 5, 16)], max_tokens=1)
    s.add_request(a)
    s.add_request(b)
    first, _ = step(s)
    assert encoded(first) == [("a", "same")]
    assert set(scheduled_tokens(first)) == {"a", "b"}
    run_until_done(s)
    assert s.encoder_store.used == 0


def test_items_in_prefix_cache_hits_need_no_encoding() -> None:
    s = make_mm_scheduler()
    prompt = list(range(100, 140))
    pos = [MMPosition("img", 0, 16)]
    s.add_request(make_request("a", prompt, mm_positions=pos, max_tokens=1))
    run_until_done(s)
    s.add_request(make_request("b", prompt, mm_positions=pos, max_tokens=1))
    sched, _ = step(s)
    assert not sched.encoder_inputs  # the item's blocks came from the cache
    assert s.kv.stats.mm_hit_tokens >= 16


def test_preempted_request_releases_its_embeddings() -> None:
    s = make_mm_scheduler(batch=8)
    req = make_request("a", 40, mm_positions=[MMPosition("img", 4, 20)], max_tokens=1)
    s.add_request(req)
    step(s)
    assert s.encoder_store.has("img")
    s._preempt(req)  # what KV pressure does
    assert not s.encoder_store.has("img") and s.encoder_store.used == 0
    sched, _ = step(s)
    assert encoded(sched) == [("a", "img")]  # encoded again (the runner's cache makes it cheap)


def test_item_larger_than_the_budget_is_refused() -> None:
    s = make_mm_scheduler(encoder_tokens=8)
    with pytest.raises(ValueError, match="max_num_encoder_tokens"):
        s.add_request(make_request("a", 40, mm_positions=[MMPosition("img", 4, 20)]))

"""Scheduler: budgets, chunked prefill, prefix hits, preemption, stops, aborts, n > 1.

Each test builds a real scheduler, calls ``schedule()``, hands ``update_from_output`` a
fake runner output and checks the queues and the KV blocks.
"""

from __future__ import annotations

import pytest

from mmengine.messages import TokenLogprobs
from mmengine.request import RequestStatus
from mmengine.scheduler import RunnerOutput, Scheduler
from tests.core_factories import (
    EOS,
    TOKEN,
    assert_all_blocks_free,
    make_prompt,
    make_request,
    make_scheduler,
    run_until_done,
    running_ids,
    scheduled_tokens,
    step,
    waiting_ids,
)

# ---- construction and admission --------------------------------------------------------


def test_pool_smaller_than_max_model_len_is_refused() -> None:
    with pytest.raises(ValueError, match=r"fewer than max_model_len=64"):
        make_scheduler(max_model_len=64, block_size=4, num_kv_blocks=16)  # 15 * 4 = 60
    make_scheduler(max_model_len=64, block_size=4, num_kv_blocks=17)  # exactly enough


def test_prompt_of_max_model_len_or_more_is_refused() -> None:
    sched = make_scheduler(max_model_len=16)
    for n in (16, 17):
        with pytest.raises(ValueError, match=f"prompt has {n} tokens; max_model_len is 16"):
            sched.add_request(make_request(f"r{n}", n))
    assert not sched.has_unfinished() and not sched.requests
    sched.add_request(make_request("ok", 15))
    assert waiting_ids(sched) == ["ok"]


def test_duplicate_request_id_is_refused() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 4))
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        sched.add_request(make_request("a", 4))


# ---- budgets and chunked prefill -------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("a", 40, max_tokens=2))
    chunks = []
    for _ in range(3):
        out, outputs = step(sched)
        chunks.append(scheduled_tokens(out)["a"])
        assert out.num_batched_tokens == chunks[-1]
        # No token until the last chunk: intermediate chunks produce no logits to sample.
        assert [o.new_token_ids for o in outputs] == ([[TOKEN]] if len(chunks) == 3 else [])
    assert chunks == [16, 16, 8]
    req = sched.requests["a"]
    assert req.num_computed_tokens == 40 and req.num_tokens == 41
    assert len(sched.kv.block_ids("a")) == 10


def test_requests_share_one_steps_token_budget() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    for rid in "abc":
        sched.add_request(make_request(rid, 10, max_tokens=3))
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"a": 10, "b": 6}  # c waits: budget spent
    assert out.num_batched_tokens == 16
    assert waiting_ids(sched) == ["c"]
    assert len(sched.kv.block_ids("b")) == 2  # blocks for the 6 computed tokens only
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"a": 1, "b": 4, "c": 10}
    assert out.num_batched_tokens == 15


def test_decodes_are_scheduled_before_running_prefills() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("a", 3, max_tokens=4))
    sched.add_request(make_request("b", 60, max_tokens=4))
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"a": 3, "b": 13}
    out, _ = step(sched)
    assert list(scheduled_tokens(out).items()) == [("a", 1), ("b", 15)]
    # Even when the running prefill comes first in the running list (FCFS admission
    # alone never orders them so), the decode goes first and keeps its token; the
    # prefill, which could use the whole budget, gets what is left.
    sched.running.reverse()
    out, _ = step(sched)
    assert list(scheduled_tokens(out).items()) == [("a", 1), ("b", 15)]


def test_max_num_seqs_caps_the_running_requests() -> None:
    sched = make_scheduler(max_num_seqs=2)
    sched.add_request(make_request("a", 4, max_tokens=1))
    sched.add_request(make_request("b", 4, max_tokens=3))
    sched.add_request(make_request("c", 4, max_tokens=3))
    out, _ = step(sched)
    assert list(scheduled_tokens(out)) == ["a", "b"]
    assert waiting_ids(sched) == ["c"]
    out, _ = step(sched)  # a finished last step: c takes its seat
    assert scheduled_tokens(out) == {"b": 1, "c": 4}
    assert running_ids(sched) == ["b", "c"]


def test_prefix_cache_hits_reduce_the_scheduled_tokens() -> None:
    sched = make_scheduler()
    prompt = make_prompt(20)
    sched.add_request(make_request("a", prompt, max_tokens=1))
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"a": 20}
    sched.add_request(make_request("b", prompt, max_tokens=1))
    out, outputs = step(sched)
    # 19 tokens may hit, rounded down to 4 blocks: 4 tokens left to compute.
    assert scheduled_tokens(out) == {"b": 4}
    assert outputs[0].num_cached_tokens == 16
    assert (sched.kv.stats.queried_tokens, sched.kv.stats.hit_tokens) == (40, 16)
    assert_all_blocks_free(sched.kv)


def test_no_prefix_hits_without_prefix_caching() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    prompt = make_prompt(20)
    for rid in ("a", "b"):
        sched.add_request(make_request(rid, prompt, max_tokens=1))
        out, _ = step(sched)
        assert scheduled_tokens(out) == {rid: 20}


def test_request_with_prompt_logprobs_recomputes_a_cached_prompt() -> None:
    sched = make_scheduler()
    prompt = make_prompt(20)
    sched.add_request(make_request("a", prompt, max_tokens=1))
    step(sched)
    sched.add_request(make_request("b", prompt, max_tokens=1, prompt_logprobs=1))
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"b": 20}


def test_prompt_logprobs_of_each_chunk_are_reported_before_the_first_token() -> None:
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request(make_request("a", 24, max_tokens=1, prompt_logprobs=0))
    chunk_lp = [TokenLogprobs([5], [-1.0], [3])]
    out = sched.schedule()
    outputs = sched.update_from_output(out, RunnerOutput(prompt_logprobs={"a": chunk_lp}))
    assert [(o.new_token_ids, o.prompt_logprobs) for o in outputs] == [([], chunk_lp)]
    assert sched.stats.prompt_tokens_computed == 16
    out = sched.schedule()
    result = RunnerOutput(sampled_token_ids={"a": TOKEN}, prompt_logprobs={"a": chunk_lp})
    (final,) = sched.update_from_output(out, result)
    assert final.new_token_ids == [TOKEN] and final.prompt_logprobs == chunk_lp
    assert final.finish_reason == "length"
    assert sched.stats.prompt_tokens_computed == 24


# ---- preemption -----------------------------------------------------------------------


def test_out_of_blocks_preempts_the_latest_arrived_request_to_the_waiting_front() -> None:
    # 4 usable blocks of 4 tokens; a (1 block) and b (3 blocks) fill the pool.
    sched = make_scheduler(max_num_seqs=2, max_model_len=16, num_kv_blocks=5)
    sched.add_request(make_request("a", 4, max_tokens=3))
    sched.add_request(make_request("b", 11, max_tokens=2))
    sched.add_request(make_request("c", 13, max_tokens=2))  # waits: max_num_seqs
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"a": 4, "b": 11}
    assert sched.kv.num_free_blocks() == 0

    # a's 5th token needs a second block: b, the latest arrival, makes room.
    out, _ = step(sched)
    assert out.preempted_req_ids == ["b"]
    assert scheduled_tokens(out) == {"a": 1}
    b = sched.requests["b"]
    assert b.status == RequestStatus.WAITING and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and sched.stats.num_preemptions == 1
    assert b.output_token_ids == [TOKEN]  # kept: recomputed with the prompt
    assert waiting_ids(sched) == ["b", "c"]
    assert running_ids(sched) == ["a"]

    outputs = run_until_done(sched)
    finals = {o.request_id: o for o in outputs if o.finish_reason}
    assert set(finals) == {"a", "b", "c"}
    assert finals["b"].finish_reason == "length"
    assert b.output_token_ids == [TOKEN, TOKEN]
    assert_all_blocks_free(sched.kv)


def test_preemption_goes_from_the_latest_arrival_backwards() -> None:
    sched = make_scheduler(max_model_len=12, num_kv_blocks=4)  # 3 usable blocks
    for rid in "abc":
        sched.add_request(make_request(rid, 4, max_tokens=3))
    out, _ = step(sched)
    assert list(scheduled_tokens(out)) == ["a", "b", "c"]
    assert sched.kv.num_free_blocks() == 0
    # Every request now needs a second block: c goes for a; b then has to give way too.
    out, _ = step(sched)
    assert out.preempted_req_ids == ["c", "b"]
    assert scheduled_tokens(out) == {"a": 1}
    assert waiting_ids(sched) == ["b", "c"]  # earlier arrivals first
    assert sched.stats.num_preemptions == 2
    outputs = run_until_done(sched)
    assert sorted(o.request_id for o in outputs if o.finish_reason) == ["a", "b", "c"]
    assert_all_blocks_free(sched.kv)


# ---- stop conditions ------------------------------------------------------------------


def _single(**params: object) -> Scheduler:
    sched = make_scheduler()
    sched.add_request(make_request("r", 4, **params))
    step(sched)  # prefill, samples TOKEN
    return sched


def test_eos_finishes_with_stop() -> None:
    sched = _single(max_tokens=10)
    _, outputs = step(sched, {"r": EOS})
    assert outputs[0].finish_reason == "stop" and outputs[0].stop_reason is None
    assert outputs[0].new_token_ids == [EOS]
    assert not sched.has_unfinished()
    assert_all_blocks_free(sched.kv)


def test_eos_is_ignored_with_ignore_eos() -> None:
    sched = _single(max_tokens=10, ignore_eos=True)
    _, outputs = step(sched, {"r": EOS})
    assert outputs[0].finish_reason is None
    assert running_ids(sched) == ["r"]


def test_stop_token_id_finishes_with_the_token_as_stop_reason() -> None:
    sched = _single(max_tokens=10, stop_token_ids=[9])
    _, outputs = step(sched, {"r": 9})
    assert outputs[0].finish_reason == "stop" and outputs[0].stop_reason == 9


def test_max_tokens_finishes_with_length() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("r", 4, max_tokens=3))
    reasons = [step(sched)[1][0].finish_reason for _ in range(3)]
    assert reasons == [None, None, "length"]
    assert not sched.has_unfinished()


def test_min_tokens_defers_eos_and_stop_tokens() -> None:
    sched = _single(max_tokens=10, min_tokens=3, stop_token_ids=[9])  # 1 output so far
    _, outputs = step(sched, {"r": EOS})  # 2nd output: too early
    assert outputs[0].finish_reason is None
    _, outputs = step(sched, {"r": 9})  # 3rd output: min_tokens reached
    assert outputs[0].finish_reason == "stop" and outputs[0].stop_reason == 9


def test_max_model_len_finishes_with_length() -> None:
    sched = make_scheduler(max_model_len=12)
    sched.add_request(make_request("r", 10, max_tokens=None))
    outputs = run_until_done(sched)
    assert [o.finish_reason for o in outputs] == [None, "length"]
    assert_all_blocks_free(sched.kv)


# ---- abort ----------------------------------------------------------------------------


def test_abort_frees_blocks_and_reports_the_request() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 10))
    sched.add_request(make_request("b", 10))
    step(sched)
    sched.add_request(make_request("w", 10))  # still waiting
    assert sched.kv.num_used_blocks() == 6
    assert sched.abort_requests(["a", "w", "unknown"]) == ["a", "w"]
    assert sched.kv.num_used_blocks() == 3
    assert running_ids(sched) == ["b"] and waiting_ids(sched) == []
    out = sched.schedule()
    assert out.finished_req_ids == ["a", "w"]
    assert scheduled_tokens(out) == {"b": 1}
    assert sched.abort_requests(["a"]) == []  # already gone
    sched.abort_requests(["b"])
    assert_all_blocks_free(sched.kv)


def test_request_aborted_while_its_step_runs_gets_no_output() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 6))
    sched.add_request(make_request("b", 6))
    out = sched.schedule()
    sched.abort_requests(["a"])
    outputs = sched.update_from_output(out, RunnerOutput({"a": TOKEN, "b": TOKEN}))
    assert [o.request_id for o in outputs] == ["b"]
    assert sched.kv.block_ids("a") == []


# ---- n > 1 -----------------------------------------------------------------------------


def test_followers_wait_for_the_leader_prompt_then_share_its_blocks() -> None:
    sched = make_scheduler(max_num_batched_tokens=16, enable_prefix_caching=False)
    prompt = make_prompt(20)
    sched.add_request(make_request("r-0", prompt, max_tokens=3))
    for i in (1, 2):
        sched.add_request(make_request(f"r-{i}", prompt, share_prompt_with="r-0", max_tokens=3))
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"r-0": 16}
    assert waiting_ids(sched) == ["r-1", "r-2"]
    out, _ = step(sched)  # the leader's last chunk: followers still wait
    assert scheduled_tokens(out) == {"r-0": 4}
    assert waiting_ids(sched) == ["r-1", "r-2"]

    out, outputs = step(sched)
    # 19 prompt tokens may be shared: 4 full blocks; each follower computes 4 tokens.
    assert scheduled_tokens(out) == {"r-0": 1, "r-1": 4, "r-2": 4}
    leader_blocks = sched.kv.req_blocks["r-0"]
    for rid in ("r-1", "r-2"):
        assert sched.kv.req_blocks[rid][:4] == leader_blocks[:4]
        assert sched.kv.req_blocks[rid][4] is not leader_blocks[4]
    assert [b.ref_cnt for b in leader_blocks] == [3, 3, 3, 3, 1, 1]
    assert {o.request_id: o.num_cached_tokens for o in outputs}["r-1"] == 16

    run_until_done(sched)
    assert_all_blocks_free(sched.kv)


def test_preempted_follower_shares_only_the_leader_prompt_blocks() -> None:
    # 4 usable blocks of 4 tokens; the follower is preempted at step 5, then readmitted.
    # No prefix caching: with it, the follower's own cached blocks would hide the bug
    # here (it still shows once they are evicted).
    sched = make_scheduler(
        max_num_seqs=2, max_model_len=16, num_kv_blocks=5, enable_prefix_caching=False
    )
    prompt = make_prompt(6)
    sched.add_request(make_request("r-0", prompt, max_tokens=10))
    sched.add_request(make_request("r-1", prompt, share_prompt_with="r-0", max_tokens=10))
    tokens = {"r-0": 7, "r-1": 8}  # the completions diverge from their first token
    for _ in range(4):
        step(sched, tokens)
    out, _ = step(sched, tokens)
    assert out.preempted_req_ids == ["r-1"]
    follower = sched.requests["r-1"]
    assert follower.all_token_ids == prompt + [8, 8, 8]

    # Only the leader's block 0 is all prompt; its block 1 holds prompt[4:6] and the
    # leader's outputs (7, 7), where the follower has its own (8, 8).
    leader_block_1 = sched.kv.req_blocks["r-0"][1]
    while "r-0" in sched.requests:
        step(sched, tokens)
        assert leader_block_1 not in sched.kv.req_blocks.get("r-1", [])
    run_until_done(sched)
    assert_all_blocks_free(sched.kv)


def test_follower_computes_alone_once_the_leader_is_gone() -> None:
    sched = make_scheduler(enable_prefix_caching=False)
    prompt = make_prompt(12)
    sched.add_request(make_request("r-0", prompt))
    sched.add_request(make_request("r-1", prompt, share_prompt_with="r-0"))
    sched.abort_requests(["r-0"])
    out, _ = step(sched)
    assert scheduled_tokens(out) == {"r-1": 12}


# ---- bookkeeping ----------------------------------------------------------------------


def test_every_block_is_free_after_a_mixed_workload() -> None:
    sched = make_scheduler(max_num_batched_tokens=24, max_model_len=32, num_kv_blocks=17)
    shared = make_prompt(8)
    for i in range(8):
        sched.add_request(make_request(f"r{i}", shared + make_prompt(3 * i + 1), max_tokens=6 + i))
    outputs = run_until_done(sched)
    assert sum(1 for o in outputs if o.finish_reason) == 8
    assert sched.stats.requests_finished == 8
    assert sched.stats.num_preemptions > 0  # 8 requests of up to 32 tokens, 64-token pool
    # max_tokens, or max_model_len (32) for the longest prompts.
    expected = sum(min(6 + i, 32 - (9 + 3 * i)) for i in range(8))
    assert sched.stats.generation_tokens == expected
    assert_all_blocks_free(sched.kv)

"""Async scheduling: step N+1 is planned and launched before step N's tokens are read.

Scheduler level (pure Python, ``PipelinedSteps``): placeholders, the one wasted step after
a stop, length limits known in advance, preemption and aborts of requests in flight.
Engine level (tiny float32 checkpoints on CPU, ``async_scheduling=True``): the same
tokens as the synchronous engine with every sampling feature. HF parity with async
scheduling: ``test_hf_parity.py``, ``test_mm_parity.py``; serving:
``tests/server/test_async_llm.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmengine import LLM, SamplingParams
from mmengine.request import RequestStatus
from tests.core_factories import (
    EOS,
    TOKEN,
    PipelinedSteps,
    assert_all_blocks_free,
    make_request,
    make_scheduler,
    running_ids,
    scheduled_tokens,
)
from tests.test_hf_parity import MAX_NEW, hf_greedy, make_prompts

torch.set_num_threads(1)

# ---- scheduler -------------------------------------------------------------------------


def test_next_step_decodes_the_token_still_in_flight() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=4))
    pipe = PipelinedSteps(sched)
    out, outputs = pipe.step()  # prefill: samples token 1 (in flight)
    assert scheduled_tokens(out) == {"a": 8} and outputs == []
    req = sched.requests["a"]
    assert req.num_computed_tokens == 8 and req.num_output_placeholders == 1
    assert req.num_tokens == 8 and req.num_planned_tokens == 9
    out, outputs = pipe.step()  # decode of the placeholder, then token 1 lands
    assert scheduled_tokens(out) == {"a": 1} and out.scheduled[0].start == 8
    assert [o.new_token_ids for o in outputs] == [[TOKEN]]
    assert req.num_output_placeholders == 1 and req.num_tokens == 9


def test_max_tokens_known_in_advance_schedules_no_extra_step() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=3))
    pipe = PipelinedSteps(sched)
    outputs = pipe.run_until_done()
    assert [o.new_token_ids for o in outputs] == [[TOKEN]] * 3
    assert outputs[-1].finish_reason == "length"
    # prefill + 2 decodes: the step after the third token is never planned.
    assert sched.stats.num_steps == 3
    assert_all_blocks_free(sched.kv)


def test_max_tokens_one_finishes_after_the_prefill() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=1))
    pipe = PipelinedSteps(sched)
    out, _ = pipe.step()
    assert scheduled_tokens(out) == {"a": 8}
    out, outputs = pipe.step()  # nothing to plan: the in-flight token ends it
    assert out.is_empty
    assert [(o.new_token_ids, o.finish_reason) for o in outputs] == [([TOKEN], "length")]
    assert not sched.has_unfinished()
    assert_all_blocks_free(sched.kv)


def test_eos_costs_one_wasted_step_whose_token_is_dropped() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=10))
    sched.add_request(make_request("b", 8, max_tokens=10))
    pipe = PipelinedSteps(sched, {"a": EOS})
    _, outputs = pipe.step()  # prefill both
    out, outputs = pipe.step()  # decode both; then "a" turns out to have sampled EOS
    assert set(scheduled_tokens(out)) == {"a", "b"}
    stops = [o for o in outputs if o.finish_reason is not None]
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in stops] == [
        ("a", [EOS], "stop")
    ]
    out, outputs = pipe.step()  # the wasted decode of "a" lands: nothing reported for it
    assert set(scheduled_tokens(out)) == {"b"}
    assert [o.request_id for o in outputs] == ["b"]
    rest = pipe.run_until_done()
    assert {o.request_id for o in rest} == {"b"}
    assert sum(len(o.new_token_ids) for o in outputs + rest) == 9
    assert_all_blocks_free(sched.kv)


def test_request_preempted_while_its_token_is_in_flight_keeps_the_token() -> None:
    # 8 blocks of 4: two 12-token prompts take 3 blocks each, their decodes need more.
    sched = make_scheduler(max_model_len=24, block_size=4, num_kv_blocks=8)
    sched.add_request(make_request("a", 12, max_tokens=8))
    sched.add_request(make_request("b", 12, max_tokens=8))
    pipe = PipelinedSteps(sched)
    preempted_in_flight = False
    outputs = []
    for _ in range(60):
        if not sched.has_unfinished() and pipe.in_flight is None:
            break
        prev = pipe.in_flight
        out, new = pipe.step()
        outputs += new
        if prev is not None and out.preempted_req_ids:
            victim = out.preempted_req_ids[0]
            was_sampling = any(i.request.request_id == victim and i.samples for i in prev.scheduled)
            preempted_in_flight |= was_sampling
    assert preempted_in_flight, "the pool never forced a preemption of a request in flight"
    tokens: dict[str, int] = {}
    for o in outputs:
        tokens[o.request_id] = tokens.get(o.request_id, 0) + len(o.new_token_ids)
    assert tokens == {"a": 8, "b": 8}
    assert sched.stats.num_preemptions > 0
    assert_all_blocks_free(sched.kv)


def test_preempted_request_waits_for_its_token_before_recomputing() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=4))
    pipe = PipelinedSteps(sched)
    pipe.step()  # prefill, token in flight
    req = sched.requests["a"]
    sched._preempt(req)  # as a full pool would, while the token is in flight
    out = sched.schedule()
    assert out.is_empty, "a request with a token in flight was recomputed without it"
    assert req.status == RequestStatus.WAITING
    outputs = pipe.finish()
    assert [o.new_token_ids for o in outputs] == [[TOKEN]]
    assert req.num_output_placeholders == 0 and req.num_tokens == 9
    rest = pipe.run_until_done()
    assert sum(len(o.new_token_ids) for o in rest) == 3
    assert_all_blocks_free(sched.kv)


def test_abort_of_a_request_in_flight_drops_its_result() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=10))
    sched.add_request(make_request("b", 8, max_tokens=3))
    pipe = PipelinedSteps(sched)
    pipe.step()
    pipe.step()
    assert sched.abort_requests(["a"]) == ["a"]
    rest = pipe.run_until_done()
    assert {o.request_id for o in rest} == {"b"}
    assert running_ids(sched) == []
    assert_all_blocks_free(sched.kv)


def test_followers_share_the_leader_prompt_only_after_its_step() -> None:
    sched = make_scheduler(block_size=4)
    prompt = list(range(100, 119))  # 19 tokens: 4 full blocks
    sched.add_request(make_request("r-0", prompt, max_tokens=3))
    sched.add_request(make_request("r-1", prompt, share_prompt_with="r-0", max_tokens=3))
    pipe = PipelinedSteps(sched, {"r-1": 8})
    out, _ = pipe.step()  # the leader's prompt, still in flight after this
    assert scheduled_tokens(out) == {"r-0": 19}
    out, _ = pipe.step()  # the follower shares the 4 blocks computed by the step before
    assert scheduled_tokens(out) == {"r-0": 1, "r-1": 3}
    assert sched.kv.block_ids("r-1")[:4] == sched.kv.block_ids("r-0")[:4]
    pipe.run_until_done()
    assert_all_blocks_free(sched.kv)


def test_sync_requests_are_counted_while_live() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 8, max_tokens=2, repetition_penalty=1.2))
    sched.add_request(make_request("b", 8, max_tokens=2, prompt_logprobs=1))
    sched.add_request(make_request("c", 8, max_tokens=2))
    assert sched.num_sync_requests == 2
    PipelinedSteps(sched).run_until_done()
    assert sched.num_sync_requests == 0


# ---- engine: tokens identical to HF and to the synchronous engine -------------------------


def _mixed_params(greedy_refs: list[list[int]]) -> list[SamplingParams]:
    """Per prompt: seeded sampling with logprobs, min_tokens, stop tokens that greedy
    decoding reaches (so requests stop early, one right when min_tokens lets it),
    penalties and prompt logprobs (which pause async scheduling), side by side."""
    out = []
    for i, ref in enumerate(greedy_refs):
        kind = i % 7
        if kind == 0:  # the stop token comes exactly when min_tokens stops masking it
            p = SamplingParams(
                temperature=0.0, max_tokens=MAX_NEW, min_tokens=3, stop_token_ids=[ref[3]]
            )
        elif kind == 1:
            p = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=MAX_NEW, logprobs=3)
        elif kind == 2:
            p = SamplingParams(temperature=1.0, top_k=20, seed=5, max_tokens=MAX_NEW, min_tokens=6)
        elif kind == 3:
            p = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, stop_token_ids=[ref[2]])
        elif kind == 4:
            p = SamplingParams(temperature=0.7, seed=3, max_tokens=MAX_NEW, repetition_penalty=1.3)
        elif kind == 5:
            p = SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2)
        else:
            p = SamplingParams(temperature=0.8, seed=9, max_tokens=1)
        out.append(p)
    return out


def _run_mixed(ckpt: Path, async_scheduling: bool) -> list[tuple]:
    prompts = make_prompts(14)
    per = _mixed_params(hf_greedy(ckpt, prompts))
    with LLM(
        str(ckpt),
        dtype="float32",
        device="cpu",
        max_model_len=256,
        multiprocess=False,
        max_num_batched_tokens=32,
        async_scheduling=async_scheduling,
    ) as llm:
        # Penalties and prompt logprobs pause async scheduling while they are live, so
        # they run in a batch of their own: the first batch is pipelined throughout.
        pauses = [i for i, p in enumerate(per) if p.repetition_penalty != 1.0 or p.prompt_logprobs]
        rest = [i for i in range(len(prompts)) if i not in pauses]
        outs = llm.generate([prompts[i] for i in rest], [per[i] for i in rest], use_tqdm=False)
        outs += llm.generate([prompts[i] for i in pauses], [per[i] for i in pauses], use_tqdm=False)
        n2 = llm.generate(
            prompts[:2],
            SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=6),
            use_tqdm=False,
        )
        assert llm.stats()["kv_blocks_used"] == 0
    rows = []
    for o in outs + n2:
        for c in o.outputs:
            lps = None
            if c.logprobs:
                lps = [sorted((k, v.logprob) for k, v in d.items()) for d in c.logprobs]
            rows.append((o.request_id, c.token_ids, c.finish_reason, lps))
        if o.prompt_logprobs:
            rows.append(
                (
                    o.request_id,
                    "prompt",
                    [None if d is None else sorted(d) for d in o.prompt_logprobs],
                )
            )
    return rows


def test_async_matches_sync_for_every_sampling_feature(text_ckpt: Path) -> None:
    sync = _run_mixed(text_ckpt, async_scheduling=False)
    got = _run_mixed(text_ckpt, async_scheduling=True)
    # Token ids, finish reasons and top-logprob ids exactly; logprob values to float32
    # noise (batches are composed differently, so CPU matmuls round differently).
    assert [r[:3] for r in got] == [r[:3] for r in sync]
    for a, b in zip(got, sync):
        if a[1] != "prompt" and a[3] is not None:
            assert [[k for k, _ in d] for d in a[3]] == [[k for k, _ in d] for d in b[3]]
            flat_a = [v for d in a[3] for _, v in d]
            flat_b = [v for d in b[3] for _, v in d]
            assert flat_a == pytest.approx(flat_b, abs=1e-4)
    # The stop-token requests really stopped early, so the wasted-step path ran.
    assert [r[2] for r in sync[:10]].count("stop") >= 3

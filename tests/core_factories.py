"""Small factories for the CPU tests of the engine core (scheduler, KV manager, pool).

Pure Python, no torch: a real ``Scheduler`` built from a ``SchedulerConfig``, requests
with distinct prompts unless a test passes its own, and a fake model runner step that
samples a token for every request whose scheduled chunk reaches its last token.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

from mmengine.kv_cache_manager import KVCacheManager
from mmengine.messages import EngineCoreOutput
from mmengine.request import MMPosition, Request
from mmengine.sampling_params import SamplingParams
from mmengine.scheduler import RunnerOutput, Scheduler, SchedulerConfig, SchedulerOutput

EOS = 2  # the eos id of every request made here
TOKEN = 7  # what the fake runner samples unless told otherwise

# Each generated prompt starts at a fresh base so that two requests never share a
# prefix by accident (prefix caching would otherwise change block counts).
_prompt_bases = itertools.count(start=1000, step=1000)


def make_prompt(num_tokens: int) -> list[int]:
    """A prompt of ``num_tokens`` ids that no other ``make_prompt`` call repeats."""
    base = next(_prompt_bases)
    return list(range(base, base + num_tokens))


def make_request(
    request_id: str,
    prompt: int | list[int] = 8,
    *,
    share_prompt_with: str | None = None,
    mm_positions: list[MMPosition] | None = None,
    eos_token_ids: list[int] | None = None,
    **params: object,
) -> Request:
    """A core request; ``prompt`` is a token list or a length (distinct tokens).

    Keyword arguments other than the named ones go to ``SamplingParams``.
    """
    prompt_ids = make_prompt(prompt) if isinstance(prompt, int) else list(prompt)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        sampling_params=SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_ids=[EOS] if eos_token_ids is None else eos_token_ids,
        share_prompt_with=share_prompt_with,
        mm_positions=list(mm_positions or []),
    )


def make_scheduler(
    *,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    block_size: int = 4,
    num_kv_blocks: int | None = None,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    """A scheduler; the pool defaults to room for four requests of ``max_model_len``."""
    if num_kv_blocks is None:
        num_kv_blocks = 1 + 4 * -(-max_model_len // block_size)
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching,
        )
    )


def fake_runner_output(
    sched: SchedulerOutput, tokens: Mapping[str, int] | None = None
) -> RunnerOutput:
    """What a model runner returns: a token for each request whose chunk reaches its
    last token, i.e. that the scheduler marked as sampling (``tokens[request_id]``,
    default ``TOKEN``)."""
    tokens = tokens or {}
    out = RunnerOutput()
    for item in sched.scheduled:
        if item.samples:
            rid = item.request.request_id
            out.sampled_token_ids[rid] = tokens.get(rid, TOKEN)
    return out


def step(
    scheduler: Scheduler, tokens: Mapping[str, int] | None = None
) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    """One engine step: schedule, fake the runner, update."""
    sched = scheduler.schedule()
    outputs = scheduler.update_from_output(sched, fake_runner_output(sched, tokens))
    return sched, outputs


def run_until_done(scheduler: Scheduler, max_steps: int = 200) -> list[EngineCoreOutput]:
    """Step until no request is left; returns every output, in order."""
    outputs: list[EngineCoreOutput] = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return outputs
        outputs.extend(step(scheduler)[1])
    raise AssertionError(f"requests still unfinished after {max_steps} steps")


def scheduled_tokens(sched: SchedulerOutput) -> dict[str, int]:
    """request id -> tokens scheduled this step, in batch order."""
    return {item.request.request_id: item.num_tokens for item in sched.scheduled}


def waiting_ids(scheduler: Scheduler) -> list[str]:
    return [r.request_id for r in scheduler.waiting]


def running_ids(scheduler: Scheduler) -> list[str]:
    return [r.request_id for r in scheduler.running]


def assert_all_blocks_free(kv: KVCacheManager) -> None:
    """Every usable block is back in the free queue with no reference left."""
    pool = kv.pool
    assert kv.num_free_blocks() == pool.num_usable_blocks
    assert kv.num_used_blocks() == 0
    assert all(b.ref_cnt == 0 for b in pool.blocks[1:])
    assert not kv.req_blocks


class PipelinedSteps:
    """Async scheduling without a model: step N+1 is planned before step N's update.

    ``step()`` schedules the next step, then updates from the one before it (whose fake
    tokens come from ``tokens`` as they are at update time), like ``EngineCore.step``
    with ``async_scheduling`` on.
    """

    def __init__(self, scheduler: Scheduler, tokens: Mapping[str, int] | None = None) -> None:
        self.scheduler = scheduler
        self.tokens = dict(tokens or {})
        self.in_flight: SchedulerOutput | None = None

    def step(self) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
        sched = self.scheduler.schedule()
        outputs = self.finish()
        if not sched.is_empty:
            self.in_flight = sched
        return sched, outputs

    def finish(self) -> list[EngineCoreOutput]:
        if self.in_flight is None:
            return []
        prev, self.in_flight = self.in_flight, None
        return self.scheduler.update_from_output(prev, fake_runner_output(prev, self.tokens))

    def run_until_done(self, max_steps: int = 200) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished() and self.in_flight is None:
                return outputs
            outputs.extend(self.step()[1])
        raise AssertionError(f"requests still unfinished after {max_steps} steps")

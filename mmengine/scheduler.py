"""The scheduler: one budgeted plan per step, pure Python (no torch).

Each step: decodes of running requests first, then chunks of running prefills, then
new (or preempted) requests from the waiting queue, all within ``max_num_batched_tokens``
tokens and ``max_num_seqs`` requests. There are no separate prefill and decode phases:
every request's ``num_computed_tokens`` catches up with its ``num_tokens``. When KV blocks
run out, the lowest-priority running request (latest arrival) is preempted and later
recomputed.

A plan is committed when it is made: ``schedule()`` advances each scheduled request's
``num_computed_tokens``, and a chunk that reaches the end of a request's tokens adds an
output placeholder (its sampled token). ``update_from_output()`` later swaps placeholders
for the real tokens. So the engine may plan step N+1 while step N still runs on the GPU
(async scheduling): a request whose token is still in flight is scheduled as a decode of
that placeholder (the runner reads its id on the device), and one whose in-flight token
must end it (``max_tokens``, ``max_model_len``) is not scheduled again.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from mmengine.encoder_store import EncoderStore
from mmengine.kv_cache_manager import KVCacheManager, PrefixHit
from mmengine.messages import EngineCoreOutput, TokenLogprobs
from mmengine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_num_seqs: int  # requests in one step
    max_num_batched_tokens: int  # LLM tokens in one step
    max_model_len: int  # prompt + output tokens of one request
    block_size: int
    num_kv_blocks: int  # including the reserved null block
    enable_prefix_caching: bool
    max_num_encoder_tokens: int = 16384  # vision-encoder output rows computed per step
    encoder_store_tokens: int = 32768  # embedding rows held awaiting prefill


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int  # tokens computed this step, positions [start, start + num_tokens)
    block_ids: list[int]  # the request's whole block table after allocation
    start: int = 0  # the request's num_computed_tokens when it was scheduled
    samples: bool = False  # the chunk reaches the end of the tokens: sample one more


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]  # batch order: decodes, running prefills, new ones
    num_batched_tokens: int
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # since the previous step
    # Multimodal items to encode this step, before the LLM forward: (request, item index).
    encoder_inputs: list[tuple[Request, int]] = field(default_factory=list)
    freed_encoder_hashes: list[str] = field(default_factory=list)  # drop from the store

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class RunnerOutput:
    """What the model runner returns for one step."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prompt_tokens_computed: int = 0
    generation_tokens: int = 0
    requests_finished: int = 0
    num_steps: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        usable_tokens = (config.num_kv_blocks - 1) * config.block_size
        if usable_tokens < config.max_model_len:
            raise ValueError(
                f"the KV pool holds {usable_tokens} tokens "
                f"({config.num_kv_blocks - 1} blocks of {config.block_size}), fewer than "
                f"max_model_len={config.max_model_len}: one request could never finish. "
                "Raise num_kv_blocks / the memory budget, or lower max_model_len."
            )
        self.kv = KVCacheManager(
            config.num_kv_blocks, config.block_size, config.enable_prefix_caching
        )
        self.encoder_store = EncoderStore(config.encoder_store_tokens)
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()
        self._finished_ids: list[str] = []
        # Live requests that need each step's results before the next is planned
        # (Request.needs_sync_steps): while any exist, async scheduling pauses.
        self.num_sync_requests = 0

    # ---- requests in and out ------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if request.num_prompt_tokens >= self.config.max_model_len:
            raise ValueError(
                f"prompt has {request.num_prompt_tokens} tokens; max_model_len is "
                f"{self.config.max_model_len} (prompt plus at least one output token)"
            )
        limit = min(self.config.max_num_encoder_tokens, self.config.encoder_store_tokens)
        for p in request.mm_positions:
            if p.length > limit:
                raise ValueError(
                    f"a multimodal item needs {p.length} embedding rows; the engine encodes at "
                    f"most {limit} per step (raise max_num_encoder_tokens or use smaller media)"
                )
        self.requests[request.request_id] = request
        self.waiting.append(request)
        if request.needs_sync_steps():
            self.num_sync_requests += 1

    def abort_requests(self, request_ids: list[str]) -> list[str]:
        """Finish the given requests as aborted; returns the ids that were still live."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            self._finish(req, RequestStatus.FINISHED_ABORTED)
            done.append(rid)
        return done

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        self._release_encoder(req)
        del self.requests[req.request_id]
        self._finished_ids.append(req.request_id)
        self.stats.requests_finished += 1
        if req.needs_sync_steps():
            self.num_sync_requests -= 1

    # ---- planning ---------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        self._enc_budget = self.config.max_num_encoder_tokens
        self._encode_now: list[tuple[Request, int]] = []
        self._starts: dict[str, int] = {}  # num_computed_tokens before this step
        scheduled: list[ScheduledRequest] = []
        scheduled_ids: set[str] = set()
        preempted: list[str] = []

        # 1) running requests: decodes first, then running prefills, in arrival order.
        decodes, prefills = [], []
        for r in self.running:
            todo = r.num_planned_tokens - r.num_computed_tokens
            if todo == 1:
                if not (r.num_output_placeholders and self._ends_in_flight(r)):
                    decodes.append(r)
            elif todo > 1:
                prefills.append(r)
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            n = min(req.num_planned_tokens - req.num_computed_tokens, budget)
            n = self._fit_encoder(req, req.num_computed_tokens, n)
            if n == 0:
                continue  # its next item's embeddings cannot be made this step
            while not self.kv.allocate_slots(req, n):
                victim = self._pick_victim(scheduled_ids)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                continue
            self._commit_encoder(req, req.num_computed_tokens, n)
            scheduled.append(self._commit(req, n))
            scheduled_ids.add(req.request_id)
            budget -= n

        # 2) waiting requests, FCFS; stop at the first that does not fit.
        skipped: list[Request] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting.popleft()
            if req.request_id in preempted or req.num_output_placeholders:
                # Preempted this step (not back in the same step), or its last token is
                # still in flight: recomputing needs every token id on the host.
                skipped.append(req)
                continue
            leader = self._prompt_leader(req)
            if leader is not None and (
                self._starts.get(leader.request_id, leader.num_computed_tokens)
                < leader.num_prompt_tokens
            ):
                # n > 1: wait for the first completion's prompt, computed by an earlier
                # step (one still in flight is fine: the GPU runs steps in order).
                skipped.append(req)
                continue
            hit = self.kv.find_prefix(req) if req.num_computed_tokens == 0 else PrefixHit()
            if leader is not None and req.num_computed_tokens == 0:
                shared = self.kv.share_prefix(req, leader)
                if shared.num_tokens > hit.num_tokens:
                    hit = shared
            start = req.num_computed_tokens + hit.num_tokens
            n = min(req.num_tokens - start, budget)
            n = self._fit_encoder(req, start, n)
            if n == 0:
                skipped.append(req)  # waits for encoder room; others may go ahead
                continue
            if not self.kv.allocate_slots(req, n, hit):
                self.waiting.appendleft(req)
                break
            self._commit_encoder(req, start, n)
            req.num_computed_tokens += hit.num_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = hit.num_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._commit(req, n))
            scheduled_ids.add(req.request_id)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            scheduled=scheduled,
            num_batched_tokens=self.config.max_num_batched_tokens - budget,
            preempted_req_ids=preempted,
            finished_req_ids=finished,
            encoder_inputs=self._encode_now,
            freed_encoder_hashes=self.encoder_store.take_freed(),
        )

    def _commit(self, req: Request, n: int) -> ScheduledRequest:
        """Advance the request past its scheduled chunk now (see the module docstring)."""
        start = req.num_computed_tokens
        self._starts[req.request_id] = start
        req.num_computed_tokens = start + n
        samples = req.num_computed_tokens == req.num_planned_tokens
        if samples:
            req.num_output_placeholders += 1
        return ScheduledRequest(req, n, self.kv.block_ids(req.request_id), start, samples)

    def _ends_in_flight(self, req: Request) -> bool:
        """The token still in flight finishes the request by length: nothing to plan."""
        sp = req.sampling_params
        return req.num_planned_tokens >= self.config.max_model_len or (
            sp.max_tokens is not None
            and req.num_output_tokens + req.num_output_placeholders >= sp.max_tokens
        )

    # ---- encoder budget ---------------------------------------------------------------
    def _fit_encoder(self, req: Request, start: int, n: int) -> int:
        """Shorten a prefill chunk [start, start+n) so it stops just before the first item
        whose embeddings are neither stored nor affordable this step."""
        if not req.mm_positions or start >= req.num_prompt_tokens:
            return n
        end, tokens = start + n, 0
        store = self.encoder_store
        for p in req.mm_positions:
            if p.offset >= end:
                break
            if p.offset + p.length <= start or store.has(p.content_hash):
                continue
            if tokens + p.length <= self._enc_budget and store.fits(tokens + p.length):
                tokens += p.length
                continue
            return p.offset - start
        return n

    def _commit_encoder(self, req: Request, start: int, n: int) -> None:
        """Reserve store room (and encoder budget) for the items this chunk covers."""
        end = start + n
        for i, p in enumerate(req.mm_positions):
            if p.offset >= end:
                break
            if p.offset + p.length <= start:
                continue
            if self.encoder_store.has(p.content_hash):
                self.encoder_store.hold(p.content_hash, req.request_id)
                continue
            self.encoder_store.add(p.content_hash, p.length, req.request_id)
            self._enc_budget -= p.length
            self._encode_now.append((req, i))

    def _release_encoder(self, req: Request, upto: int | None = None) -> None:
        """Let go of stored embeddings the request no longer needs (all, or those whose
        items end at or before ``upto``)."""
        for p in req.mm_positions:
            if upto is None or p.offset + p.length <= upto:
                self.encoder_store.release(p.content_hash, req.request_id)

    def _prompt_leader(self, req: Request) -> Request | None:
        if req.share_prompt_with is None:
            return None
        leader = self.requests.get(req.share_prompt_with)
        if leader is None or leader.status != RequestStatus.RUNNING:
            return None  # finished or preempted: compute on our own
        return leader

    def _pick_victim(self, scheduled_ids: set[str]) -> Request:
        """The lowest-priority running request not yet scheduled this step."""
        for req in reversed(self.running):
            if req.request_id not in scheduled_ids:
                return req
        raise AssertionError("no preemptible request")  # the current one is always a candidate

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        self._release_encoder(req)
        self.running.remove(req)
        req.status = RequestStatus.WAITING
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)
        logger.debug("preempted %s (KV blocks exhausted)", req.request_id)

    # ---- results ------------------------------------------------------------------------
    def update_from_output(
        self, sched: SchedulerOutput, result: RunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        self.stats.num_steps += 1
        for item in sched.scheduled:
            req = item.request
            if req.is_finished:
                continue  # aborted or stopped while the step ran
            rid = req.request_id
            token = result.sampled_token_ids.get(rid) if item.samples else None
            if item.samples:
                req.num_output_placeholders -= 1
            was_prefill = item.start < req.num_prompt_tokens
            if req.status == RequestStatus.RUNNING:
                if was_prefill:
                    self.stats.prompt_tokens_computed += min(
                        item.num_tokens, req.num_prompt_tokens - item.start
                    )
                    if req.mm_positions:
                        self._release_encoder(req, upto=item.start + item.num_tokens)
            elif token is None:
                continue  # preempted after this step was planned: it will recompute
            # (A request preempted while its sampling step ran keeps that token: it was
            # computed from the right state, and recomputing needs every token id.)
            prompt_lp = result.prompt_logprobs.get(rid)
            if token is None:
                if req.status == RequestStatus.RUNNING:
                    self.kv.cache_computed_blocks(req)
                if prompt_lp:
                    outputs.append(EngineCoreOutput(rid, [], prompt_logprobs=prompt_lp))
                continue
            req.append_output_token(token)
            if req.status == RequestStatus.RUNNING:
                self.kv.cache_computed_blocks(req)
            self.stats.generation_tokens += 1
            status = self._check_stop(req)
            lp = result.logprobs.get(rid)
            out = EngineCoreOutput(
                rid,
                [token],
                new_logprobs=[lp] if lp is not None else None,
                prompt_logprobs=prompt_lp,
                num_cached_tokens=max(req.num_cached_tokens, 0),
            )
            if status is not None:
                out.finish_reason = status.value
                out.stop_reason = req.stop_reason
                self._finish(req, status)
            outputs.append(out)
        return outputs

    def _check_stop(self, req: Request) -> RequestStatus | None:
        sp = req.sampling_params
        if req.num_tokens >= self.config.max_model_len or (
            sp.max_tokens is not None and req.num_output_tokens >= sp.max_tokens
        ):
            return RequestStatus.FINISHED_LENGTH
        if req.num_output_tokens < sp.min_tokens:
            return None
        last = req.output_token_ids[-1]
        if not sp.ignore_eos and last in req.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in sp.stop_token_ids:
            req.stop_reason = last
            return RequestStatus.FINISHED_STOPPED
        return None

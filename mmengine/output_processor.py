"""Frontend side of outputs: detokenize, apply stop strings, gather n completions.

Runs in the frontend process (the ``LLM`` or the API server), never in the engine core.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mmengine.detokenizer import IncrementalDetokenizer, decode_token
from mmengine.messages import EngineCoreOutput, TokenLogprobs
from mmengine.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from mmengine.sampling_params import SamplingParams


@dataclass
class _Completion:
    index: int
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text: str = ""  # text so far, after stop-string truncation
    sent_text_len: int = 0  # streaming: characters already delivered
    sent_tokens: int = 0


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: dict[str, _Completion]  # engine-core request id -> completion
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions.values())


@dataclass
class ProcessedOutputs:
    updated: list[RequestOutput]  # requests that changed (finished ones included)
    abort_core_ids: list[str]  # engine-core requests to abort (a stop string matched)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self.core_to_parent: dict[str, str] = {}

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        core_ids: list[str],
    ) -> None:
        completions = {
            cid: _Completion(
                index=i,
                detok=IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    params.skip_special_tokens,
                    params.spaces_between_special_tokens,
                ),
                logprobs=[] if params.logprobs is not None else None,
            )
            for i, cid in enumerate(core_ids)
        }
        self.states[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, params, completions
        )
        for cid in core_ids:
            self.core_to_parent[cid] = request_id

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request (client went away); returns its engine-core ids to abort."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        for cid in state.completions:
            self.core_to_parent.pop(cid, None)
        return [cid for cid, c in state.completions.items() if c.finish_reason is None]

    def _to_position(self, lp: TokenLogprobs) -> PositionLogprobs:
        return {
            t: Logprob(v, r, decode_token(self.tokenizer, t))
            for t, v, r in zip(lp.token_ids, lp.logprobs, lp.ranks)
        }

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, _RequestState] = {}
        aborts: list[str] = []
        now = time.monotonic()
        for out in outputs:
            parent = self.core_to_parent.get(out.request_id)
            state = self.states.get(parent) if parent else None
            if state is None:
                continue  # aborted by the frontend already
            comp = state.completions[out.request_id]
            if comp.finish_reason is not None:
                continue
            touched[state.request_id] = state
            if out.error:
                state.error = out.error
                comp.finish_reason = "error"
                continue
            if out.prompt_logprobs:
                if state.prompt_logprobs is None:
                    state.prompt_logprobs = []
                if comp.index == 0:
                    state.prompt_logprobs.extend(
                        None if p is None else self._to_position(p) for p in out.prompt_logprobs
                    )
            state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
            if out.new_token_ids and state.first_token_time is None:
                state.first_token_time = now
            self._add_tokens(state, comp, out)
            if comp.finish_reason is None and out.finish_reason is not None:
                comp.finish_reason = out.finish_reason
                comp.stop_reason = out.stop_reason
                comp.text += comp.detok.flush()
            elif comp.finish_reason == "stop" and out.finish_reason is None:
                aborts.append(out.request_id)  # a stop string matched: stop the core
        updated = []
        for state in touched.values():
            updated.append(self._request_output(state))
            if state.finished:
                state.finish_time = now
                del self.states[state.request_id]
                for cid in state.completions:
                    self.core_to_parent.pop(cid, None)
        return ProcessedOutputs(updated, aborts)

    def _add_tokens(self, state: _RequestState, comp: _Completion, out: EngineCoreOutput) -> None:
        params = state.params
        for i, tok in enumerate(out.new_token_ids):
            comp.token_ids.append(tok)
            if out.new_logprobs is not None and comp.logprobs is not None:
                lp = out.new_logprobs[i]
                comp.logprobs.append(self._to_position(lp))
                comp.cumulative_logprob += lp.logprobs[0]
            is_last = i == len(out.new_token_ids) - 1
            stops_on_token = (
                is_last
                and out.finish_reason == "stop"
                and not isinstance(out.stop_reason, str)
                and not params.include_stop_str_in_output
            )
            if stops_on_token:
                continue  # EOS / stop token id: not part of the text (as vLLM)
            before = len(comp.text)
            comp.text += comp.detok.add_tokens([tok])
            if params.stop and len(comp.token_ids) > params.min_tokens:
                if self._check_stop_strings(comp, params, before):
                    return

    @staticmethod
    def _check_stop_strings(comp: _Completion, params: SamplingParams, before: int) -> bool:
        best: tuple[int, str] | None = None
        for s in params.stop:
            # Only matches that end in the new text: earlier ones were already rejected.
            idx = comp.text.find(s, max(0, before - len(s) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return False
        idx, s = best
        comp.text = (
            comp.text[: idx + len(s)] if params.include_stop_str_in_output else comp.text[:idx]
        )
        comp.finish_reason = "stop"
        comp.stop_reason = s
        return True

    def _request_output(self, state: _RequestState) -> RequestOutput:
        comps = sorted(state.completions.values(), key=lambda c: c.index)
        outs = [
            CompletionOutput(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                logprobs=c.logprobs,
                cumulative_logprob=c.cumulative_logprob if c.logprobs is not None else None,
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
            )
            for c in comps
        ]
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=outs,
            finished=state.finished,
            prompt_logprobs=state.prompt_logprobs,
            num_cached_tokens=state.num_cached_tokens,
            metrics=metrics,
        )

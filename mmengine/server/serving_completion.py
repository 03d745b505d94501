"""``POST /v1/completions``: prompt strings or token ids -> engine -> OpenAI responses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmengine.outputs import CompletionOutput, RequestOutput
from mmengine.sampling_params import SamplingParams
from mmengine.server.protocol import CompletionRequest
from mmengine.server.serving_base import (
    DONE_EVENT,
    SSE_HEADERS,
    aborted_error,
    check_model,
    collect_final,
    merge,
    new_id,
    parse_body,
    resolve_max_tokens,
    sse,
    stream_error,
    stream_text_limit,
    usage,
    validate_prompt,
)
from mmengine.server.state import ServerState

_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
_MIN_LOGPROB = -9999.0


@dataclass
class _Prompt:
    text: str  # echoed back with echo=true
    ids: list[int]
    params: SamplingParams


class CompletionService:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        state = self.state
        body = await parse_body(request, CompletionRequest)
        check_model(state, body.model)
        body.refuse_unsupported()
        prompts = [await self._prepare(p, body) for p in body.prompts()]
        rid = new_id("cmpl")
        gens = [
            state.engine.generate(
                {"prompt": p.text, "prompt_token_ids": p.ids}, p.params, f"{rid}-{i}"
            )
            for i, p in enumerate(prompts)
        ]
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(gens, prompts, rid, created, body.echo, include_usage, arrival)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        finals = await collect_final(request, gens)
        state.metrics.record_finished(finals, arrival, time.monotonic())
        return JSONResponse(self._response(finals, prompts, rid, created, body.echo))

    async def _prepare(self, prompt: str | list[int], body: CompletionRequest) -> _Prompt:
        renderer = self.state.renderer
        if isinstance(prompt, str):
            ids = await renderer.tokenize(prompt, add_special_tokens=True)
            text = prompt
        else:
            ids = prompt
            text = ""
        renderer.check_placeholders(ids, {}, param="prompt")
        max_tokens = resolve_max_tokens(
            body.max_tokens,
            "max_tokens",
            len(ids),
            self.state.engine.max_model_len,
            _DEFAULT_MAX_TOKENS,
            "prompt",
        )
        params = body.sampling_params(max_tokens, body.logprobs)
        validate_prompt(self.state, ids, params, "prompt")
        if body.echo and not text:
            text = renderer.tokenizer.decode(ids, skip_special_tokens=False)
        return _Prompt(text, ids, params)

    def _response(
        self,
        finals: list[RequestOutput],
        prompts: list[_Prompt],
        rid: str,
        created: int,
        echo: bool,
    ) -> dict[str, Any]:
        choices = []
        for i, (out, p) in enumerate(zip(finals, prompts)):
            for c in out.outputs:
                choices.append(
                    {
                        "index": i * p.params.n + c.index,
                        "text": (p.text if echo else "") + c.text,
                        "logprobs": _logprobs(c, 0, p.params.logprobs, 0),
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion_tokens = sum(len(c.token_ids) for out in finals for c in out.outputs)
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    async def _stream(
        self,
        gens: list[AsyncIterator[RequestOutput]],
        prompts: list[_Prompt],
        rid: str,
        created: int,
        echo: bool,
        include_usage: bool,
        arrival: float,
    ) -> AsyncIterator[str]:
        base: dict[str, Any] = {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.state.model_name,
        }
        if include_usage:
            base["usage"] = None
        n = prompts[0].params.n
        total = len(prompts) * n
        sent_chars, sent_tokens = [0] * total, [0] * total
        echoed, done = [False] * total, [False] * total
        finals: list[RequestOutput | None] = [None] * len(prompts)
        try:
            async for pi, out in merge(gens):
                finals[pi] = out
                choices = []
                for c in out.outputs:
                    k = pi * n + c.index
                    if done[k]:
                        continue
                    finished = c.finish_reason is not None
                    limit = stream_text_limit(c.text, sent_chars[k], prompts[pi].params, finished)
                    text = c.text[sent_chars[k] : limit]
                    if echo and not echoed[k]:
                        text, echoed[k] = prompts[pi].text + text, True
                    logprobs = _logprobs(
                        c, sent_tokens[k], prompts[pi].params.logprobs, sent_chars[k]
                    )
                    sent_chars[k], sent_tokens[k] = max(sent_chars[k], limit), len(c.token_ids)
                    if text or finished or (logprobs and logprobs["tokens"]):
                        done[k] = finished
                        choices.append(
                            {
                                "index": k,
                                "text": text,
                                "logprobs": logprobs,
                                "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason if finished else None,
                            }
                        )
                if choices:
                    yield sse({**base, "choices": choices})
            if any(f is None or not f.finished for f in finals):
                yield aborted_error().sse_event()
            else:
                done_outs = [f for f in finals if f is not None]
                self.state.metrics.record_finished(done_outs, arrival, time.monotonic())
                if include_usage:
                    tokens = sum(len(c.token_ids) for f in done_outs for c in f.outputs)
                    prompt_tokens = sum(len(p.ids) for p in prompts)
                    yield sse({**base, "choices": [], "usage": usage(prompt_tokens, tokens)})
        except asyncio.CancelledError:
            raise  # the client went away: merge() closed every generator, aborting them
        except Exception as e:
            yield stream_error(e).sse_event()
        yield DONE_EVENT


def _logprobs(
    c: CompletionOutput, start: int, top_n: int | None, text_offset: int
) -> dict[str, Any] | None:
    """Legacy completions logprobs for tokens ``start:`` of a completion."""
    if top_n is None:
        return None
    out: dict[str, list[Any]] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    positions = c.logprobs or []
    offset = text_offset
    for j in range(start, min(len(c.token_ids), len(positions))):
        pos = positions[j]
        chosen = pos.get(c.token_ids[j])
        if chosen is None:
            continue
        token = chosen.decoded_token or ""
        out["tokens"].append(token)
        out["token_logprobs"].append(max(chosen.logprob, _MIN_LOGPROB))
        top = sorted(pos.values(), key=lambda lp: lp.rank)[:top_n]
        out["top_logprobs"].append(
            {(lp.decoded_token or ""): max(lp.logprob, _MIN_LOGPROB) for lp in top}
            if top_n
            else None
        )
        out["text_offset"].append(offset)
        offset += len(token)
    return out

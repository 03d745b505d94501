"""``POST /v1/chat/completions``: messages -> chat template -> engine -> OpenAI responses."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from mmengine.async_llm import EnginePrompt
from mmengine.chat_utils import split_media
from mmengine.input_processor import discard_processed
from mmengine.outputs import CompletionOutput, Logprob, RequestOutput
from mmengine.sampling_params import SamplingParams
from mmengine.server.errors import APIError
from mmengine.server.media import (
    FetchedMedia,
    check_media_limits,
    engine_media,
    extract_media,
    media_counts,
)
from mmengine.server.protocol import ChatCompletionRequest
from mmengine.server.serving_base import (
    DONE_EVENT,
    SSE_HEADERS,
    aborted_error,
    check_model,
    collect_final,
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

# JSON has no -inf; OpenAI-compatible servers report impossible tokens as -9999.
_MIN_LOGPROB = -9999.0

MM_NOT_SUPPORTED = "This model takes no images or videos."


class ChatService:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def create(self, request: Request) -> Response:
        arrival = time.monotonic()
        state = self.state
        body = await parse_body(request, ChatCompletionRequest)
        check_model(state, body.model)
        body.refuse_unsupported()
        messages = [m.template_dict() for m in body.messages]
        refs = extract_media(messages)
        if refs and not state.engine.is_multimodal:  # refused before anything is fetched
            raise APIError(400, MM_NOT_SUPPORTED, param="messages", code="multimodal_not_supported")
        check_media_limits(refs, state.media.config)  # before any fetch: cheap refusals first
        # Media parts become {"type": "image"} / {"type": "video"}, as LLM.chat renders
        # them: every HF template knows those, not every one knows "image_url".
        text = await state.renderer.render_chat(
            split_media(messages)[0],
            add_generation_prompt=body.add_generation_prompt,
            chat_template=body.chat_template,
        )
        ids = await state.renderer.tokenize(text, add_special_tokens=False)
        # Placeholder tokens typed as text are refused (SECURITY.md 9): each media part
        # must account for the one placeholder the template writes for it.
        state.renderer.check_placeholders(ids, media_counts(refs), param="messages")
        # Bad sampling parameters are refused before any media is fetched; with media the
        # output budget is settled again on the expanded prompt below.
        params = self._params(body, len(ids))
        prompt: dict[str, Any] | EnginePrompt = {"prompt": text, "prompt_token_ids": ids}
        if refs:
            prompt = await self._expand_media(text, ids, await state.media.load(refs))
            ids = prompt.prompt_token_ids
            try:
                params = self._params(body, len(ids))
                validate_prompt(state, ids, params, "messages")
            except BaseException:
                discard_processed(prompt.mm)  # its pixels will never reach the engine
                raise
        else:
            validate_prompt(state, ids, params, "messages")

        rid = new_id("chatcmpl")
        gen = state.engine.generate(prompt, params, rid)
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._stream(gen, rid, created, params, len(ids), include_usage, arrival)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        (final,) = await collect_final(request, [gen])
        state.metrics.record_finished([final], arrival, time.monotonic())
        return JSONResponse(self._response(final, rid, created, params))

    def _params(self, body: ChatCompletionRequest, prompt_len: int) -> SamplingParams:
        requested, name = body.requested_max_tokens
        max_tokens = resolve_max_tokens(
            requested, name, prompt_len, self.state.engine.max_model_len, None, "messages"
        )
        return body.sampling_params(
            max_tokens, body.num_logprobs, max_tokens_name=name, logprobs_name="top_logprobs"
        )

    async def _expand_media(
        self, text: str, ids: list[int], items: list[FetchedMedia]
    ) -> EnginePrompt:
        """Hands fetched media to the engine's input workers; returns the expanded prompt.

        The media was fetched under the server's policy; the workers get the encoded
        bytes, so content hashes (the embedding- and prefix-cache keys) are of the bytes,
        and decode them there, off this process, under the pixel/frame caps. Worker
        failures arrive as MediaInputError (4xx) or InputWorkerDiedError (5xx), mapped by
        ``response_error``.
        """
        data, uuids = engine_media(items)
        prompt = {
            "prompt": text,
            "prompt_token_ids": ids,
            "multi_modal_data": data,
            "multi_modal_uuids": uuids,
        }
        return await self.state.engine.preprocess(prompt)

    def _response(
        self, out: RequestOutput, rid: str, created: int, params: SamplingParams
    ) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _logprobs(c, 0, params.logprobs)
                if params.logprobs is not None
                else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            for c in out.outputs
        ]
        completion_tokens = sum(len(c.token_ids) for c in out.outputs)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": self.state.model_name,
            "choices": choices,
            "usage": usage(len(out.prompt_token_ids), completion_tokens),
        }

    async def _stream(
        self,
        gen: AsyncIterator[RequestOutput],
        rid: str,
        created: int,
        params: SamplingParams,
        prompt_len: int,
        include_usage: bool,
        arrival: float,
    ) -> AsyncIterator[str]:
        base: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.state.model_name,
        }
        if include_usage:
            base["usage"] = None  # as OpenAI: null on every chunk but the last

        def chunk(choices: list[dict[str, Any]]) -> str:
            return sse({**base, "choices": choices})

        n = params.n
        sent_chars, sent_tokens, done = [0] * n, [0] * n, [False] * n
        final: RequestOutput | None = None
        try:
            yield chunk([_choice(i, {"role": "assistant", "content": ""}) for i in range(n)])
            async for out in gen:
                final = out
                choices = []
                for c in out.outputs:
                    if done[c.index]:
                        continue
                    choice = _delta(c, sent_chars, sent_tokens, params)
                    if choice is not None:
                        choices.append(choice)
                        done[c.index] = c.finish_reason is not None
                if choices:
                    yield chunk(choices)
            if final is None or not final.finished:
                yield aborted_error().sse_event()
            else:
                self.state.metrics.record_finished([final], arrival, time.monotonic())
                if include_usage:
                    tokens = sum(len(c.token_ids) for c in final.outputs)
                    yield sse({**base, "choices": [], "usage": usage(prompt_len, tokens)})
        except asyncio.CancelledError:
            raise  # the client went away: generate() already aborted the request
        except Exception as e:
            yield stream_error(e).sse_event()
        yield DONE_EVENT


def _choice(index: int, delta: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None, **extra}


def _delta(
    c: CompletionOutput, sent_chars: list[int], sent_tokens: list[int], params: SamplingParams
) -> dict[str, Any] | None:
    """The next chunk's choice for one completion, or None when there is nothing new."""
    i = c.index
    finished = c.finish_reason is not None
    limit = stream_text_limit(c.text, sent_chars[i], params, finished)
    text = c.text[sent_chars[i] : limit]
    sent_chars[i] = max(sent_chars[i], limit)
    logprobs = None
    if params.logprobs is not None and len(c.token_ids) > sent_tokens[i]:
        logprobs = _logprobs(c, sent_tokens[i], params.logprobs)
    sent_tokens[i] = len(c.token_ids)
    if not text and logprobs is None and not finished:
        return None
    choice = _choice(i, {"content": text} if text else {})
    choice["logprobs"] = logprobs
    if finished:
        choice["finish_reason"] = c.finish_reason
        choice["stop_reason"] = c.stop_reason
    return choice


def _logprobs(c: CompletionOutput, start: int, top_n: int) -> dict[str, Any]:
    """OpenAI chat logprobs for tokens ``start:`` of a completion."""
    content = []
    positions = c.logprobs or []
    for j in range(start, min(len(c.token_ids), len(positions))):
        pos = positions[j]
        chosen = pos.get(c.token_ids[j])
        if chosen is None:
            continue
        top = sorted(pos.values(), key=lambda lp: lp.rank)[:top_n]
        entry = _entry(chosen)
        entry["top_logprobs"] = [_entry(lp) for lp in top]
        content.append(entry)
    return {"content": content}


def _entry(lp: Logprob) -> dict[str, Any]:
    token = lp.decoded_token or ""
    return {
        "token": token,
        "logprob": max(lp.logprob, _MIN_LOGPROB),
        "bytes": list(token.encode("utf-8")),
    }

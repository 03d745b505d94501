"""What chat and completions serving share: body parsing, limits, collection, SSE, errors."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from mmengine.async_inputs import InputWorkerDiedError, MediaInputError
from mmengine.core_client import EngineDeadError
from mmengine.outputs import RequestOutput
from mmengine.sampling_params import SamplingParams
from mmengine.server.errors import (
    APIError,
    engine_unavailable,
    from_validation_error,
    internal_error,
)
from mmengine.server.state import ServerState

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = "data: [DONE]\n\n"


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # only escapes can carry a surrogate


def _has_lone_surrogate(obj: object) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


async def parse_body(request: Request, model: type[M]) -> M:
    """Strict UTF-8 + JSON + schema parsing, each failure a 400 that says which."""
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not valid UTF-8.") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # ValueError covers JSONDecodeError and huge ints
        raise APIError(400, "The request body is not valid JSON.") from None
    if not isinstance(obj, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        # JSON may escape half of a UTF-16 pair ("\ud800"); such a string cannot be
        # tokenized or even encoded back to UTF-8 (it was a 500 in the tokenizer).
        raise APIError(
            400, "The request body holds an unpaired UTF-16 surrogate (\\ud800-\\udfff)."
        )
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise from_validation_error(e) from None


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name not in state.served_names:
        raise APIError(
            404, f"The model '{name[:100]}' does not exist.", param="model", code="model_not_found"
        )


def resolve_max_tokens(
    requested: int | None,
    name: str,
    prompt_len: int,
    max_model_len: int,
    default: int | None,
    prompt_param: str,
) -> int:
    """The output budget: as asked (400 if it cannot fit), else ``default`` clipped to fit."""
    room = max_model_len - prompt_len
    if room < 1:
        raise APIError(
            400,
            f"The prompt has {prompt_len} tokens, but this model's context is {max_model_len} "
            "tokens (room for at least one output token is needed).",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is None:
        return room if default is None else min(default, room)
    if not isinstance(requested, int) or requested < 1:
        raise APIError(400, f"{name} must be a positive integer.", param=name)
    if requested > room:
        raise APIError(
            400,
            f"This model's context is {max_model_len} tokens; the prompt has {prompt_len} "
            f"tokens, so {name} can be at most {room} (got {requested}).",
            param=name,
            code="context_length_exceeded",
        )
    return requested


def validate_prompt(state: ServerState, ids: list[int], params: SamplingParams, param: str) -> None:
    try:
        state.engine.validate(ids, params)
    except ValueError as e:
        # AsyncLLM's messages name counts and ids only, never paths: safe to return.
        text = str(e)
        if text.startswith("stop token id"):
            param = "stop_token_ids"
        raise APIError(400, text[:1].upper() + text[1:] + ".", param=param) from None


def stream_error(exc: BaseException) -> APIError:
    """The error event for a failure after a streaming response has started."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return engine_unavailable()
    if isinstance(exc, MediaInputError):  # its message is client-safe by contract
        return APIError(exc.status, exc.message, param="messages")
    if isinstance(exc, InputWorkerDiedError):
        logger.error("a request failed: %s", exc)
        return APIError(500, str(exc), code="input_worker_died")
    if isinstance(exc, ValueError):
        return APIError(400, "The request was rejected by the engine.")
    logger.error("streaming failed", exc_info=exc)
    return internal_error()


def response_error(exc: BaseException) -> APIError:
    """The error response for a failure before any byte was sent."""
    if isinstance(exc, EngineDeadError):
        return engine_unavailable()
    return stream_error(exc)


def aborted_error() -> APIError:
    return APIError(503, "The request was aborted: the server is shutting down.", code="aborted")


async def merge(gens: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index.

    Leaving early (or being cancelled) closes every iterator, which aborts their requests.
    """
    pending = {asyncio.ensure_future(anext(g)): i for i, g in enumerate(gens)}  # type: ignore[arg-type]
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(gens[i]))] = i  # type: ignore[arg-type]
                yield i, item
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for g in gens:
            await g.aclose()  # type: ignore[attr-defined]


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Runs ``work``; cancels it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def collect_final(
    request: Request, gens: list[AsyncIterator[RequestOutput]]
) -> list[RequestOutput]:
    """The last output of each generator (non-streaming responses).

    Raises:
        ClientDisconnected: the client left; every request has been aborted.
        APIError: 503 when a request was aborted by a server shutdown.
    """
    finals: list[RequestOutput | None] = [None] * len(gens)

    async def consume() -> None:
        async for i, out in merge(gens):
            finals[i] = out

    await run_unless_disconnected(request, consume())
    if any(f is None or not f.finished for f in finals):
        raise aborted_error()
    return finals  # type: ignore[return-value]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def stream_text_limit(text: str, sent: int, params: SamplingParams, finished: bool) -> int:
    """How much of a completion's text is safe to stream now.

    A stop string may still complete and cut the text; hold back the characters it
    could start with so that nothing already sent is ever retracted.
    """
    if finished or not params.stop:
        return len(text)
    hold = max(len(s) for s in params.stop) - 1
    return max(sent, len(text) - hold)

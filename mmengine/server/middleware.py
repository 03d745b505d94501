"""ASGI middleware: accounting, API key, admission (overload / draining) and body size.

Plain ASGI rather than Starlette's BaseHTTPMiddleware, so streaming responses pass
through untouched and the in-flight count drops only when a response has been fully
sent (or the client has gone). Outermost first:

    Accounting -> ApiKey -> Admission -> BodyLimit -> the app

Admission refuses at once when the server is already full, but takes its slot only when
BodyLimit has the whole body (through the ``admit`` hook it leaves in the scope): a
client that sends headers and then stalls the body must not hold an inference slot. The
body itself must arrive within a deadline, so such a client cannot hold its connection
and buffer forever either.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from mmengine.server.errors import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INFERENCE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the response"
# Seconds a client has to send a whole request body (not per chunk: a trickle of a byte a
# second must not keep a connection either). Read when a BodyLimitMiddleware is built.
DEFAULT_BODY_TIMEOUT_S = 30.0
# Scope key of AdmissionMiddleware's hook: BodyLimitMiddleware calls it once the body is in.
ADMIT_KEY = "mmengine.admit"
Admit = Callable[[], APIError | None]


async def _send_error(err: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    await err.response()(scope, receive, send)


class AccountingMiddleware:
    """Counts every HTTP request by route and final status (2xx + 4xx + 5xx + 499 = sent)."""

    def __init__(self, app: ASGIApp, record: Callable[[str, int], None]) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = CLIENT_CLOSED

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.record(scope["path"], status)


# Routes outside /v1/ that still need the key: they change what the engine does.
KEYED_ROUTES = frozenset({"/start_profile", "/stop_profile"})


class ApiKeyMiddleware:
    """With a key configured, every ``/v1/*`` route (and the profiler's) needs
    ``Authorization: Bearer <key>``."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.expected is None
            or scope["type"] != "http"
            or not (scope["path"].startswith("/v1/") or scope["path"] in KEYED_ROUTES)
            or scope["method"] == "OPTIONS"
        ):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):  # constant time: no key oracle
            err = APIError(401, "Invalid or missing API key.", code="invalid_api_key")
            await _send_error(err, scope, receive, send)
            return
        await self.app(scope, receive, send)


class Admission:
    """Shared state of the admission gate: in-flight count, limit, draining, engine health."""

    def __init__(self, max_in_flight: int, engine: Any) -> None:
        self.max_in_flight = max_in_flight
        self.engine = engine
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def refusal(self) -> APIError | None:
        if self.draining:
            return APIError(503, "The server is shutting down.", code="shutting_down")
        if not self.engine.is_healthy():
            return APIError(503, "The engine is not running.", code="engine_unavailable")
        if self.in_flight >= self.max_in_flight:
            # Fast refusal instead of an unbounded queue: the client may retry elsewhere.
            return APIError(
                503,
                "The server is overloaded; retry later.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            )
        return None


class AdmissionMiddleware:
    """Admits inference requests while healthy, not draining and under the in-flight cap.

    A request that would be refused now is refused before its body is read. Otherwise
    the slot is taken by the ``admit`` hook put in ``scope[ADMIT_KEY]``, which
    BodyLimitMiddleware (inside this one) calls when the whole body has arrived; the
    checks run again there. So the cap counts requests the engine may work on, never
    clients still uploading (or stalling) a body.
    """

    def __init__(
        self, app: ASGIApp, admission: Admission, on_change: Callable[[int], None]
    ) -> None:
        self.app = app
        self.admission = admission
        self.on_change = on_change

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in INFERENCE_ROUTES:
            await self.app(scope, receive, send)
            return
        adm = self.admission
        err = adm.refusal()
        if err is not None:
            await _send_error(err, scope, receive, send)
            return
        admitted = False

        def admit() -> APIError | None:
            nonlocal admitted
            if admitted:
                return None
            refusal = adm.refusal()  # the server may have filled up during the upload
            if refusal is not None:
                return refusal
            admitted = True
            adm.in_flight += 1
            adm.idle.clear()
            self.on_change(adm.in_flight)
            return None

        scope[ADMIT_KEY] = admit
        try:
            await self.app(scope, receive, send)
        finally:
            if admitted:
                adm.in_flight -= 1
                self.on_change(adm.in_flight)
                if adm.in_flight == 0:
                    adm.idle.set()


class BodyLimitMiddleware:
    """Reads the request body whole before the app runs: 413 above ``max_bytes`` (declared
    or streamed), 408 when it has not all arrived within ``body_timeout_s``.

    Then it admits the request (see AdmissionMiddleware) and replays the body to the app.
    The deadline covers the whole body, not each chunk, so neither a client that stops
    after its headers nor one that trickles a byte at a time keeps the connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = DEFAULT_BODY_TIMEOUT_S if body_timeout_s is None else body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413,
            f"The request body is larger than {self.max_bytes} bytes.",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _send_error(too_large, scope, receive, send)
            return
        # Read the body here (bounded in size and time), then replay it; later receive()
        # calls go to the server so the app still hears about a client disconnect.
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        await _send_error(too_large, scope, receive, send)
                        return
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            slow = APIError(
                408,
                f"The request body did not arrive within {self.body_timeout_s:g} seconds.",
                code="request_timeout",
                # The rest of the body may still come; this connection cannot be reused.
                headers={"Connection": "close"},
            )
            await _send_error(slow, scope, receive, send)
            return
        admit: Admit | None = scope.get(ADMIT_KEY)
        refusal = admit() if admit is not None else None
        if refusal is not None:
            await _send_error(refusal, scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports goes through here, so a client never sees a traceback,
a local path or an object address: messages are written by us (or are a processors
``MediaError.message``, which is client-safe by contract); anything unexpected becomes a
generic 500 and the details go to the server log.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

# OpenAI's error "type" per HTTP status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}
_MAX_MESSAGE_CHARS = 500


class APIError(Exception):
    """An error to answer with; raise it anywhere in a request handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,  # noqa: A002 - OpenAI's field name
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = headers

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message[:_MAX_MESSAGE_CHARS],
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.payload(), status_code=self.status, headers=self.headers)

    def sse_event(self) -> str:
        """The error as one server-sent event (streaming responses already sent a 200)."""
        return f"data: {json.dumps(self.payload())}\n\n"


def internal_error() -> APIError:
    return APIError(500, "Internal server error.", code="internal_error")


def engine_unavailable(reason: str = "The engine is not running.") -> APIError:
    return APIError(503, reason, code="engine_unavailable")


_SAMPLING_PARAM = re.compile(r"invalid sampling parameter '(\w+)'")


def param_of_value_error(err: ValueError) -> str | None:
    """The parameter a ``SamplingParams`` ValueError names (its messages are stable)."""
    m = _SAMPLING_PARAM.search(str(err))
    return m.group(1) if m else None


_TYPE_MARKERS = frozenset({"str", "int", "float", "bool", "none", "dict"})


def from_validation_error(err: ValidationError | RequestValidationError) -> APIError:
    """400 naming the invalid field, e.g. ``messages.0.content.1.image_url.url``."""
    errors = err.errors()
    if not errors:
        return APIError(400, "The request is invalid.")
    # With unions pydantic reports every alternative; the deepest location got furthest.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc: list[str] = []
    for part in (str(p) for p in first.get("loc", ()) if p != "body"):
        # Drop union alternatives ("list[int]", "str") and a tagged union's repeated tag.
        if "[" in part or part in _TYPE_MARKERS or (loc and loc[-1] == part and not part.isdigit()):
            continue
        loc.append(part)
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    text = f"Invalid value for '{param}': {msg}" if param else f"Invalid request: {msg}"
    return APIError(400, text, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Turns every exception that escapes a route into an OpenAI-shaped response."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return APIError(404, "Not found.", code="not_found").response()
        if exc.status_code == 405:
            return APIError(405, "Method not allowed.").response()
        message = exc.detail if isinstance(exc.detail, str) else "Request failed."
        return APIError(exc.status_code, message).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in a request", exc_info=exc)
        return internal_error().response()

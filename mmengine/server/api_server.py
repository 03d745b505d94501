"""The OpenAI-compatible HTTP server: the FastAPI app and its uvicorn runner.

``build_app(engine, args)`` wires routes, middleware and error handlers around a started
``AsyncLLM`` (tests build several apps on one engine); ``run_server(args)`` owns the
process: it starts the engine, serves, and on SIGTERM/SIGINT drains in-flight requests
(new ones get 503) before stopping the engine, so no child process outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from mmengine import __version__
from mmengine.async_llm import AsyncLLM
from mmengine.server.args import engine_config_from_args, media_config_from_args, split_list
from mmengine.server.errors import APIError, install_error_handlers
from mmengine.server.media import MediaLoader
from mmengine.server.metrics import ServerMetrics
from mmengine.server.middleware import (
    AccountingMiddleware,
    Admission,
    AdmissionMiddleware,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
)
from mmengine.server.prompts import PromptRenderer
from mmengine.server.serving_base import ClientDisconnected, response_error
from mmengine.server.serving_chat import ChatService
from mmengine.server.serving_completion import CompletionService
from mmengine.server.state import ServerState

logger = logging.getLogger("mmengine.server")

Handler = Callable[[Request], Awaitable[Response]]


def build_app(
    engine: AsyncLLM, args: argparse.Namespace, *, media_loader: MediaLoader | None = None
) -> FastAPI:
    """The FastAPI app serving a started engine.

    Args:
        engine: A started ``AsyncLLM``; the app does not stop it.
        args: Parsed ``mmengine serve`` flags (see ``mmengine.server.args``).
        media_loader: Overrides the media fetcher built from ``args`` (tests pass one
            with a stub DNS resolver and short timeouts).
    """
    served = list(split_list(args.served_model_name)) or [args.model]
    metrics = ServerMetrics(engine, served[0])
    state = ServerState(
        engine=engine,
        renderer=PromptRenderer(
            engine.tokenizer,
            template_timeout_s=args.chat_template_timeout,
            allow_request_templates=args.trust_request_chat_template,
            request_template_processes=args.request_template_processes,
        ),
        media=media_loader
        or MediaLoader(
            media_config_from_args(args),
            max_workers=args.media_workers,
            trust_uuids=args.trust_media_uuids,
        ),
        metrics=metrics,
        admission=Admission(args.max_concurrent_requests, engine),
        served_names=served,
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_exit_when_engine_dies(state))
        try:
            yield
        finally:
            watcher.cancel()
            state.renderer.close()
            state.media.close()

    app = FastAPI(
        title="mmengine",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    chat, completion = ChatService(state), CompletionService(state)
    app.add_api_route("/v1/chat/completions", _guarded(chat.create), methods=["POST"])
    app.add_api_route("/v1/completions", _guarded(completion.create), methods=["POST"])

    @app.get("/v1/models")
    async def models() -> dict[str, object]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "mmengine",
                    "max_model_len": engine.max_model_len,
                }
                for name in served
            ],
        }

    @app.get("/health")
    async def health() -> Response:
        refusal = None if engine.is_healthy() else APIError(503, "The engine is not running.")
        if state.admission.draining:
            refusal = APIError(503, "The server is shutting down.")
        return refusal.response() if refusal else Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    if getattr(args, "profiler_dir", None):
        _add_profiler_routes(app, engine, Path(args.profiler_dir))

    install_error_handlers(app)
    # Added innermost first; see middleware.py for the order and why.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=args.max_request_body_bytes,
        body_timeout_s=args.request_body_timeout,
    )
    app.add_middleware(
        AdmissionMiddleware, admission=state.admission, on_change=metrics.in_flight.set
    )
    app.add_middleware(ApiKeyMiddleware, api_key=args.api_key or os.environ.get("MMENGINE_API_KEY"))
    app.add_middleware(AccountingMiddleware, record=metrics.record_http)
    return app


def _add_profiler_routes(app: FastAPI, engine: AsyncLLM, out_dir: Path) -> None:
    """POST /start_profile and /stop_profile (vLLM's paths), only with --profiler-dir."""

    async def start(request: Request) -> Response:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"mmengine-core-{time.strftime('%Y%m%d-%H%M%S')}.json.gz"
        try:
            await engine.start_profile(str(path.resolve()))
        except RuntimeError as e:
            raise APIError(409, str(e)) from None
        logger.info("profiling the engine core into %s", path)
        # The file's name only: the server's paths stay out of HTTP bodies (SECURITY.md);
        # the operator knows --profiler-dir, and the log names the whole path.
        return JSONResponse({"status": "started", "trace": path.name})

    async def stop(request: Request) -> Response:
        try:
            await engine.stop_profile()
        except RuntimeError as e:
            raise APIError(409, str(e)) from None
        return JSONResponse({"status": "stopped"})

    app.add_api_route("/start_profile", _guarded(start), methods=["POST"])
    app.add_api_route("/stop_profile", _guarded(stop), methods=["POST"])


def _guarded(handler: Handler) -> Handler:
    """Maps what a handler may raise to a response; nothing internal reaches the client."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except APIError as e:
            return e.response()
        except ClientDisconnected:
            return Response(status_code=499)  # nobody is listening; counted as 499
        except Exception as e:
            return response_error(e).response()

    return route


async def _exit_when_engine_dies(state: ServerState) -> None:
    assert state.engine.dead_event is not None
    await state.engine.dead_event.wait()
    if state.engine.closed:  # a normal shutdown, not a death
        return
    logger.error("the engine core died; the server reports unhealthy and exits")
    await asyncio.sleep(1.0)  # let in-flight requests receive their 503s first
    state.request_exit(1)


async def drain(state: ServerState, grace_s: float) -> None:
    """Refuses new inference requests (503), then waits for in-flight ones up to ``grace_s``."""
    state.admission.draining = True
    try:
        await asyncio.wait_for(state.admission.idle.wait(), grace_s)
        return
    except TimeoutError:
        aborted = state.engine.abort_all()
        logger.warning("grace period over: aborted %d request(s)", len(aborted))
    with contextlib.suppress(TimeoutError):  # aborted streams end with an error event
        await asyncio.wait_for(state.admission.idle.wait(), 5.0)


class _Server(uvicorn.Server):
    """uvicorn with a drain on the first SIGTERM/SIGINT and a hard stop on the second."""

    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s
        self._drain_task: asyncio.Task[None] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        if self._drain_task is None:
            logger.info(
                "received %s: finishing in-flight requests (up to %.0fs), refusing new ones",
                signal.Signals(sig).name,
                self.grace_s,
            )
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())
        else:
            logger.warning("received %s again: stopping now", signal.Signals(sig).name)
            self.state.engine.abort_all()
            self.should_exit = self.force_exit = True

    async def _drain_then_exit(self) -> None:
        await drain(self.state, self.grace_s)
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.state.exit_requested:
            self.should_exit = True
        return await super().on_tick(counter)


def run_server(args: argparse.Namespace) -> int:
    """Runs ``mmengine serve`` until stopped; returns the process exit code."""
    level = args.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    os.environ.setdefault("MMENGINE_LOG_LEVEL", level)  # the engine-core process logs alike
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    config = engine_config_from_args(args)
    logger.info("loading %s ...", args.model)
    # The input workers decode media under the same limits the server fetched it with.
    engine = AsyncLLM(
        config, startup_timeout_s=args.startup_timeout, media_config=media_config_from_args(args)
    )
    try:
        await engine.start()
    except (RuntimeError, OSError, ValueError, TimeoutError) as e:  # EngineDeadError too
        # The engine core has logged its own traceback; say plainly what failed.
        logger.error("could not start the engine for %s: %s", args.model, e)
        return 1
    try:
        info = engine.info
        assert info is not None
        logger.info(
            "model %s | dtype %s | device %s | KV cache %d blocks x %d tokens (%d tokens, "
            "%.1f MiB) | max_model_len %d",
            args.model,
            info.dtype,
            info.device,
            info.num_kv_blocks,
            info.block_size,
            info.num_kv_blocks * info.block_size,
            info.kv_cache_bytes / 2**20,
            info.max_model_len,
        )
        if engine.is_multimodal:
            logger.info(
                "images and video: on, %s; at most %s per prompt",
                f"{config.num_input_workers} input-processing process(es)"
                if config.num_input_workers > 0
                else "input processing on a frontend thread",
                config.limit_mm_per_prompt,
            )
        else:
            logger.info("images and video: off (a text-only model)")
        app = build_app(engine, args)
        uv_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_config=None,
            log_level=args.log_level,
            access_log=False,
            timeout_graceful_shutdown=5,
            lifespan="on",
        )
        sock = uv_config.bind_socket()
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        logger.info(
            "listening on http://%s:%d (OpenAI API at http://%s:%d/v1)", shown, port, shown, port
        )
        server = _Server(uv_config, app.state.server, args.shutdown_grace_period)
        await server.serve(sockets=[sock])
        return app.state.server.exit_code
    finally:
        engine.shutdown()
        logger.info("engine stopped")

"""The asyncio frontend of the engine, used by the API server.

One background task reads engine-core outputs, detokenizes them with an
``OutputProcessor`` and routes each cumulative ``RequestOutput`` to its request's queue.
``generate`` is an async iterator over those outputs; leaving it early (a client that
disconnects, a cancelled task) aborts the request in the engine so its KV blocks are freed.
For a vision-language model, prompts with images or videos first go through the
input-processing worker processes (``AsyncInputWorkers``), off the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec

from mmengine.async_client import AsyncCoreClient
from mmengine.async_inputs import (
    AsyncInputWorkers,
    InputWorkerDiedError,
    MediaInputError,
    start_input_workers,
)
from mmengine.config import EngineConfig
from mmengine.core_client import EngineDeadError
from mmengine.gc_heap import freeze_startup_heap, release_startup_heap
from mmengine.input_processor import ProcessedMsg, discard_processed
from mmengine.llm import PromptType, load_tokenizer, validate_prompt
from mmengine.messages import (
    ControlMsg,
    EngineCoreOutput,
    EngineInfo,
    completion_ids,
    core_requests,
)
from mmengine.output_processor import OutputProcessor
from mmengine.outputs import RequestOutput
from mmengine.sampling_params import SamplingParams
from processors.config import MediaConfig

logger = logging.getLogger(__name__)

__all__ = ["AsyncLLM", "EngineDeadError", "EnginePrompt", "InputWorkerDiedError", "MediaInputError"]

# Prompts longer than this many characters are tokenized on a worker thread: a fast
# tokenizer needs ~1 ms per 10k characters, and the event loop must stay responsive.
_INLINE_TOKENIZE_CHARS = 8192


class _Aborted:
    """Queue marker: the request was aborted by ``abort()``; the iterator just ends."""


_ABORTED = _Aborted()
_QueueItem = RequestOutput | BaseException | _Aborted


@dataclass
class EnginePrompt:
    """A prompt as the engine takes it: media placeholders expanded to one token per
    embedding row, and the workers' preprocessed items alongside."""

    text: str | None  # the prompt as given (placeholders unexpanded), for outputs
    prompt_token_ids: list[int]  # what the engine runs: what usage counts
    mm: ProcessedMsg | None = None  # items, M-RoPE positions; None for text-only prompts


class AsyncLLM:
    """Asynchronous generation over an engine core running in a child process.

    Args:
        config: The engine options. ``multiprocess`` is ignored: the engine core always
            runs in its own process, so the caller's event loop never runs the model.
        startup_timeout_s: How long loading the model may take.
        media_config: Limits the input workers apply while decoding media (and the
            fetch policy for media given as URLs). Default: ``MediaConfig()``.
        input_timeout_s: Longest a prompt's media may take in the input workers,
            queueing included. Default: the fetch plus video-decode deadlines, plus 30 s.

    Call ``await start()`` before anything else and ``shutdown()`` at the end.
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        startup_timeout_s: float = 900.0,
        media_config: MediaConfig | None = None,
        input_timeout_s: float | None = None,
    ) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.media_config = media_config or MediaConfig()
        self.input_timeout_s = input_timeout_s or (
            self.media_config.fetch_deadline_s + self.media_config.video_decode_deadline_s + 30
        )
        self.tokenizer: Any = None
        self.info: EngineInfo | None = None
        self.max_model_len = 0
        self.vocab_size = 0
        self.dead_event: asyncio.Event | None = None  # set once the engine is dead
        self._client: AsyncCoreClient | None = None
        self._inputs: AsyncInputWorkers | None = None  # vision-language models only
        self._processor: OutputProcessor | None = None
        self._queues: dict[str, asyncio.Queue[_QueueItem]] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._call_ids = itertools.count(1)
        self._output_task: asyncio.Task[None] | None = None
        self._dead: EngineDeadError | None = None
        self._shut_down = False

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Loads the tokenizer and starts the engine core; returns once it is ready."""
        if not self.config.multiprocess:
            logger.info("AsyncLLM always runs the engine core in its own process")
        self.dead_event = asyncio.Event()
        name = self.config.tokenizer or self.config.model
        tokenizer_task = asyncio.create_task(
            asyncio.to_thread(load_tokenizer, name, self.config.revision)
        )
        try:
            self._client = AsyncCoreClient(self.config)  # spawned on this (the loop's) thread
            self.info = await self._client.wait_ready(self.startup_timeout_s)
            self.tokenizer = await tokenizer_task
            # Forked now, while this process is quiet, rather than in the middle of serving.
            self._inputs = await start_input_workers(
                self.config, self.media_config, self.info.dtype, self.input_timeout_s
            )
        except BaseException:
            tokenizer_task.cancel()
            self.shutdown()
            raise
        self.max_model_len = self.info.max_model_len
        self.vocab_size = self.info.vocab_size
        self._processor = OutputProcessor(self.tokenizer)
        self._output_task = asyncio.create_task(self._output_loop(), name="engine-outputs")
        # The start-up heap out of the GC's full passes until shutdown (mmengine/gc_heap.py).
        freeze_startup_heap()
        self._frozen = True

    def shutdown(self) -> None:
        """Stops the output task, the input workers and the engine-core process
        (idempotent, synchronous)."""
        if self._shut_down:
            return
        self._shut_down = True
        if self._output_task is not None and not self._output_task.done():
            self._output_task.cancel()
        if self._inputs is not None:
            self._inputs.shutdown()
        if self._client is not None:
            self._client.shutdown()
        if self._dead is None:
            self._fail_all(EngineDeadError("the engine has been shut down"))
        if getattr(self, "_frozen", False):
            release_startup_heap()
            self._frozen = False

    @property
    def closed(self) -> bool:
        """True once ``shutdown()`` was called (a dead engine is ``errored``, not closed)."""
        return self._shut_down

    @property
    def errored(self) -> bool:
        return self._dead is not None

    def is_healthy(self) -> bool:
        return self._dead is None and self._client is not None and self._client.alive()

    @property
    def core_pid(self) -> int | None:
        return None if self._client is None else self._client.pid

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    @property
    def is_multimodal(self) -> bool:
        """True when the model takes images/videos (its input workers are running)."""
        return self._inputs is not None

    @property
    def input_worker_pids(self) -> list[int]:
        return [] if self._inputs is None else self._inputs.pids

    # ---- requests --------------------------------------------------------------------------
    async def generate(
        self, prompt: PromptType | EnginePrompt, params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Streams cumulative outputs of one prompt (all ``params.n`` completions).

        A prompt is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``
        (optionally with ``"prompt"`` as its text), plus for a vision-language model
        ``"multi_modal_data": {"image": [...], "video": [...]}`` (encoded bytes, or
        http(s)/data:/allowed file: URLs fetched by the workers under ``media_config``)
        and optionally ``"multi_modal_uuids"`` in the same shape; or an ``EnginePrompt``
        from :meth:`preprocess`. Stopping iteration early aborts it.

        Raises:
            MediaInputError: the media was refused (a ValueError carrying an HTTP status).
            InputWorkerDiedError: an input worker died with this request (now restarted).
            ValueError: invalid prompt (empty, too long, ids outside the vocabulary) or a
                duplicate ``request_id``; raised before anything reaches the engine.
            EngineDeadError: the engine core is dead or died during the request.
        """
        engine_prompt = await self.preprocess(prompt)
        text, ids = engine_prompt.text, engine_prompt.prompt_token_ids
        try:
            self.validate(ids, params)
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already running")
            self._check_alive()  # it may have died while we were tokenizing
        except BaseException:
            discard_processed(engine_prompt.mm)  # its pixels will never reach the engine
            raise
        assert self._processor is not None and self._client is not None
        core_ids = completion_ids(request_id, params.n)
        queue: asyncio.Queue[_QueueItem] = asyncio.Queue()
        self._processor.add_request(request_id, text, ids, params, core_ids)
        self._queues[request_id] = queue
        finished = False
        try:
            requests = core_requests(ids, engine_prompt.mm, params, core_ids)
            self._client.send(ControlMsg(kind="add", requests=requests))
            while not finished:
                item = await queue.get()
                while not queue.empty() and isinstance(item, RequestOutput):
                    item = queue.get_nowait()  # outputs are cumulative: the newest suffices
                if isinstance(item, _Aborted):
                    finished = True  # already forgotten by abort()
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                    if any(c.finish_reason == "error" for c in item.outputs):
                        raise ValueError("the engine rejected the request")
                yield item
        finally:
            # Normal end, error, cancellation or the consumer closing us: free the engine side.
            if not finished:
                self._abort_now(request_id)
            self._queues.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        """Aborts a request; its ``generate`` iterator ends without further outputs."""
        self._abort_now(request_id)
        queue = self._queues.get(request_id)
        if queue is not None:
            queue.put_nowait(_ABORTED)

    def abort_all(self) -> list[str]:
        """Aborts every running request (used when the server stops); returns their ids."""
        ids = list(self._queues)
        for rid in ids:
            self._abort_now(rid)
            self._queues[rid].put_nowait(_ABORTED)
        return ids

    async def _control(self, kind: str, timeout_s: float, path: str | None = None) -> Any:  # noqa: ANN401
        """Sends a control call to the engine core and awaits its reply."""
        self._check_alive()
        assert self._client is not None
        call_id = next(self._call_ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        try:
            self._client.send(ControlMsg(kind=kind, call_id=call_id, path=path))
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._calls.pop(call_id, None)

    async def start_profile(self, path: str) -> None:
        """torch.profiler in the engine core until `stop_profile` writes its trace to `path`.

        Raises:
            RuntimeError: a profile is already being recorded.
        """
        reply = await self._control("start_profile", 30.0, path=path)
        if not reply.ok:
            raise RuntimeError(reply.error)

    async def stop_profile(self) -> None:
        """Stops the engine core's profile and writes its trace (this can take a while).

        Raises:
            RuntimeError: no profile is being recorded.
        """
        reply = await self._control("stop_profile", 600.0)
        if not reply.ok:
            raise RuntimeError(reply.error)

    async def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The engine's counters (KV blocks, queues, prefix cache...), plus the frontend's."""
        reply = await self._control("stats", timeout_s)
        stats = msgspec.structs.asdict(reply.stats)
        stats["num_frontend_requests"] = len(self._queues)
        stats["input_worker_restarts"] = 0 if self._inputs is None else self._inputs.restarts
        return stats

    # ---- prompts ---------------------------------------------------------------------------
    async def preprocess(self, prompt: PromptType | EnginePrompt) -> EnginePrompt:
        """Tokenizes a prompt and, if it has media, runs it through the input workers.

        The server calls this before ``generate`` because the output budget depends on
        the expanded prompt's length. Validation against the context is ``validate``'s.
        """
        if isinstance(prompt, EnginePrompt):
            return prompt
        self._check_alive()
        text, ids = await self.encode(prompt)
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        if not mm_data:
            return EnginePrompt(text, ids)
        if self._inputs is None:
            raise MediaInputError("This model takes no images or videos.")
        if not isinstance(mm_data, dict):
            raise MediaInputError("multi_modal_data must map 'image'/'video' to items.")
        uuids = prompt.get("multi_modal_uuids")  # type: ignore[union-attr]
        msg = await self._inputs.process(ids, mm_data, uuids, trusted=False)
        self._check_alive()  # the engine may have died while the workers ran
        return EnginePrompt(text, list(msg.prompt_token_ids), msg)

    async def encode(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt; long texts are tokenized off the event loop."""
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if not isinstance(text, str):
            raise ValueError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [...]}")
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return text, self.tokenizer(text)["input_ids"]
        return text, (await asyncio.to_thread(self.tokenizer, text))["input_ids"]

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError for a prompt the engine would refuse (as ``LLM`` does)."""
        validate_prompt(ids, params, self.max_model_len, self.vocab_size)

    # ---- internals -------------------------------------------------------------------------
    def _check_alive(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._client is None or self._processor is None:
            raise EngineDeadError("the engine is not started")

    def _abort_now(self, request_id: str) -> None:
        """Synchronous so it can run in a ``finally`` of a closing/cancelled generator."""
        if self._processor is None:
            return
        core_ids = self._processor.abort_request(request_id)
        if core_ids and self._dead is None and self._client is not None:
            try:
                self._client.send(ControlMsg(kind="abort", abort_ids=core_ids))
            except EngineDeadError:
                pass

    async def _output_loop(self) -> None:
        assert self._client is not None
        try:
            while True:
                msg = await self._client.recv(0.25)
                if msg is None:
                    continue
                if msg.call_id is not None:
                    fut = self._calls.get(msg.call_id)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                if msg.outputs:
                    self._route(msg.outputs)
                # A ready socket does not suspend: yield so HTTP handlers run between steps.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            raise
        except EngineDeadError as e:
            logger.error("engine core died: %s", e)
            self._fail_all(e)
        except Exception as e:  # a bug here must not leave requests hanging forever
            logger.exception("the engine output loop failed")
            self._fail_all(EngineDeadError(f"the engine output loop failed: {type(e).__name__}"))
            if self._client is not None:
                self._client.shutdown()

    def _route(self, outputs: list[EngineCoreOutput]) -> None:
        assert self._processor is not None and self._client is not None
        res = self._processor.process(outputs)
        if res.abort_core_ids:  # a stop string matched in the frontend: stop the core too
            self._client.send(ControlMsg(kind="abort", abort_ids=res.abort_core_ids))
        for out in res.updated:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def _fail_all(self, err: EngineDeadError) -> None:
        self._dead = err
        for queue in self._queues.values():
            queue.put_nowait(err)
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(err)
        if self._processor is not None:
            for rid in list(self._processor.states):
                self._processor.abort_request(rid)
        if self.dead_event is not None:
            self.dead_event.set()

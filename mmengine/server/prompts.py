"""Chat templates and tokenization for the server, off the event loop and time-bounded.

Templates render in HuggingFace's sandboxed Jinja environment. The model's own template
(trusted) renders on a small dedicated thread pool with a deadline. A template sent in a
request (only with ``--trust-request-chat-template``) is untrusted code: it renders in a
separate sandbox process that is killed at the deadline and replaced. A thread cannot be
stopped, so a template looping for hours on the thread pool used to keep its threads (and
the GIL) and make every later chat request fail; a process can be killed, and it shares
nothing with the model's template renders. Media placeholder tokens typed as text
(``<|image_pad|>`` with no image) are refused: downstream they would be taken for media
that does not exist.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import json
import logging
import sys
from collections import Counter
from typing import Any

from mmengine.server.errors import APIError

logger = logging.getLogger(__name__)

# Tokens that stand for media in the families we serve (Qwen2-VL family, LLaVA).
_IMAGE_TOKENS = ("<|image_pad|>", "<image>")
_VIDEO_TOKENS = ("<|video_pad|>",)
_FRAME_TOKENS = ("<|vision_start|>", "<|vision_end|>")  # one pair around each item
# Texts longer than this are tokenized on a worker thread.
_INLINE_TOKENIZE_CHARS = 8192

# Request-supplied templates: sandbox processes, their start-up bound (not charged to a
# template's deadline), the memory a render may add to a fresh sandbox, and the largest
# reply line (the rendered prompt as JSON) a sandbox sends back.
_SANDBOX_PROCESSES = 2
_SANDBOX_START_TIMEOUT_S = 60.0
_SANDBOX_MEMORY_BYTES = 1 << 30
_SANDBOX_MAX_REPLY_BYTES = 32 << 20


class PromptRenderer:
    """Renders chat templates and tokenizes prompts for one tokenizer.

    Args:
        tokenizer: A HuggingFace tokenizer with a chat template.
        template_timeout_s: Longest a chat template may take to render.
        allow_request_templates: Accept ``chat_template`` from requests (off by default:
            a template is code, even if sandboxed). They render in sandbox processes.
        request_template_processes: How many sandbox processes render request-supplied
            templates at once.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template_timeout_s: float = 5.0,
        allow_request_templates: bool = False,
        request_template_processes: int = _SANDBOX_PROCESSES,
    ) -> None:
        self.tokenizer = tokenizer
        self.template_timeout_s = template_timeout_s
        self.allow_request_templates = allow_request_templates
        # Own pool, for the model's template only: never the default executor that other
        # off-loop work shares, and never a request's template (see SandboxPool).
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="chat-template")
        self.sandboxes = (
            SandboxPool(request_template_processes) if allow_request_templates else None
        )
        self.placeholder_ids = _placeholder_ids(tokenizer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.sandboxes is not None:
            self.sandboxes.close()

    async def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool,
        chat_template: str | None,
    ) -> str:
        if chat_template is not None and not self.allow_request_templates:
            raise APIError(
                400,
                "Request-supplied chat templates are not accepted by this server.",
                param="chat_template",
            )
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "This model has no chat template; use /v1/completions.")
        if chat_template is not None and self.sandboxes is not None:
            return await self._render_in_sandbox(messages, add_generation_prompt, chat_template)

        def render() -> str:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )

        loop = asyncio.get_running_loop()
        try:
            text = await asyncio.wait_for(
                loop.run_in_executor(self._pool, render), self.template_timeout_s
            )
        except TimeoutError:
            raise APIError(400, "The chat template took too long to render.") from None
        except Exception:
            # Jinja errors (TemplateError, raise_exception(...) in a template) and bad
            # message shapes; their text may quote template internals, so do not echo it.
            raise APIError(
                400, "The messages could not be rendered with the chat template.", param="messages"
            ) from None
        if not isinstance(text, str):
            raise APIError(400, "The chat template did not produce text.", param="messages")
        return text

    async def _render_in_sandbox(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, chat_template: str
    ) -> str:
        """What ``apply_chat_template(..., tokenize=False)`` renders, in a sandbox process."""
        assert self.sandboxes is not None
        try:
            # A name of one of the model's templates (a dict of them) means that template.
            template = self.tokenizer.get_chat_template(chat_template)
        except Exception:
            template = chat_template
        try:
            job = {
                "messages": messages,
                "template": template,
                "add_generation_prompt": add_generation_prompt,
                "tokens": self.tokenizer.special_tokens_map,
            }
            line = json.dumps(job).encode() + b"\n"
        except (TypeError, ValueError):
            raise APIError(
                400, "The messages could not be rendered with the chat template.", param="messages"
            ) from None
        return await self.sandboxes.render(line, self.template_timeout_s)

    async def tokenize(self, text: str, *, add_special_tokens: bool) -> list[int]:
        def run() -> list[int]:
            return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return run()
        return await asyncio.to_thread(run)

    def check_placeholders(
        self, token_ids: list[int], media_counts: dict[str, int], *, param: str
    ) -> None:
        """Refuses media placeholder tokens that no media item of the request accounts for.

        Args:
            token_ids: The prompt's token ids after the chat template.
            media_counts: Items per modality actually sent (the template adds one
                placeholder for each).
            param: The request field to blame ("messages" or "prompt").
        """
        if not self.placeholder_ids:
            return
        found = Counter(self.placeholder_ids[t] for t in token_ids if t in self.placeholder_ids)
        expected = {
            "image": media_counts.get("image", 0),
            "video": media_counts.get("video", 0),
        }
        total = expected["image"] + expected["video"]
        too_many = any(found.get(kind, 0) > expected[kind] for kind in expected)
        # Each real item is wrapped in exactly one start/end pair by the template.
        bad_frames = found.get("frame", 0) not in (0, 2 * total)
        if too_many or bad_frames:
            raise APIError(
                400,
                "The prompt contains image/video placeholder tokens as text; send media as "
                "image_url / video_url content parts instead.",
                param=param,
            )


class SandboxPool:
    """Sandbox processes for request-supplied chat templates, each rendering one at a time.

    A render that misses its deadline (or whose request goes away) has its process killed
    at once and a new one spawned, so untrusted template code never outlives its request
    and never occupies what the model's own template renders on. A request waits at most
    its deadline for a free process, then gets a fast 503 (retry), so a burst of slow
    templates cannot queue without bound. Processes start on first use, all at once; the
    wait for a fresh process to be ready is bounded separately and not charged to the
    template.
    """

    def __init__(self, size: int) -> None:
        self._all = [_Sandbox() for _ in range(max(1, size))]
        self._idle: asyncio.LifoQueue[_Sandbox] | None = None  # warmest first

    async def render(self, job: bytes, timeout_s: float) -> str:
        idle = self._idle
        if idle is None:
            idle = self._idle = asyncio.LifoQueue()
            for box in self._all:
                await box.spawn()  # they boot side by side
                idle.put_nowait(box)
        try:
            async with asyncio.timeout(timeout_s):
                box = await idle.get()
        except TimeoutError:
            raise APIError(
                503,
                "Too many request-supplied chat templates are rendering; retry later.",
                code="server_overloaded",
                headers={"Retry-After": "1"},
            ) from None
        try:
            reply = await box.render(job, timeout_s)
        finally:
            idle.put_nowait(box)
        text = reply.get("text")
        if isinstance(text, str):
            return text
        if reply.get("error") == "not_text":
            raise APIError(400, "The chat template did not produce text.", param="messages")
        if reply.get("error") == "too_large":
            raise APIError(400, "The chat template rendered too much text.", param="messages")
        raise APIError(
            400, "The messages could not be rendered with the chat template.", param="messages"
        )

    def pids(self) -> list[int]:
        """Process ids of the live sandboxes (for tests and diagnostics)."""
        return [box.pid for box in self._all if box.pid is not None]

    def close(self) -> None:
        for box in self._all:
            box.kill()


class _Sandbox:
    """One sandbox process: ``python -I -c <_sandbox_main>``, JSON lines on stdin/stdout.

    Replies are JSON, never pickle: nothing a template produced is unpickled here.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def spawn(self) -> None:
        """Starts the process (fast); it imports Jinja and signals ready on its own."""
        if self._proc is not None:
            return
        self._ready = False
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # no PYTHON* variables, no user site-packages, not the working directory
            "-c",
            _sandbox_program(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_SANDBOX_MAX_REPLY_BYTES + 1024,
        )

    async def render(self, job: bytes, timeout_s: float) -> dict[str, Any]:
        await self.spawn()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        if not self._ready:
            try:
                async with asyncio.timeout(_SANDBOX_START_TIMEOUT_S):
                    ready = await proc.stdout.readline()
            except TimeoutError:
                ready = b""
            except BaseException:
                self.kill()
                raise
            if ready.strip() != b'{"ready": true}':
                self.kill()
                logger.error(
                    "a chat template sandbox failed to start (exit code %s)", proc.returncode
                )
                raise APIError(
                    503,
                    "Request-supplied chat templates cannot be rendered right now.",
                    code="template_sandbox_unavailable",
                )
            self._ready = True
        try:
            async with asyncio.timeout(timeout_s):
                proc.stdin.write(job)
                await proc.stdin.drain()
                line = await proc.stdout.readline()
            reply = json.loads(line)  # b"" (the process died) fails here too
            if not isinstance(reply, dict):
                raise ValueError("not a reply")
            return reply
        except TimeoutError:
            await self._replace()
            raise APIError(400, "The chat template took too long to render.") from None
        except (ConnectionError, ValueError):
            await self._replace()
            raise APIError(
                400, "The messages could not be rendered with the chat template.", param="messages"
            ) from None
        except BaseException:
            # Cancelled (the client went away) mid-render: the template must stop too, and
            # its late reply must not be read as the next request's.
            self.kill()
            raise

    async def _replace(self) -> None:
        self.kill()
        await self.spawn()  # boots while nobody waits on it

    def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


_PROGRAM: str | None = None


def _sandbox_program() -> str:
    """The source a sandbox runs: ``_sandbox_main`` and a call to it."""
    global _PROGRAM
    if _PROGRAM is None:
        _PROGRAM = (
            inspect.getsource(_sandbox_main)
            + f"\n_sandbox_main({_SANDBOX_MEMORY_BYTES}, {_SANDBOX_MAX_REPLY_BYTES})\n"
        )
    return _PROGRAM


def _sandbox_main(memory_bytes: int, max_reply_bytes: int) -> None:
    """A sandbox process: renders request-supplied chat templates, one JSON line each way.

    Runs as ``python -I -c <this function's source>``, so it must be self-contained (no
    globals of this module): as a plain program it imports Jinja and transformers' chat
    template module only (~60 MB, well under a second), never torch or the server. It
    renders exactly as ``apply_chat_template(tokenize=False)`` does, in the same sandboxed
    Jinja environment. It dies with the server (PR_SET_PDEATHSIG, or stdin closing), runs
    at a lower CPU priority, and may grow by ``memory_bytes`` at most, so a template that
    builds a huge string gets a MemoryError rather than the machine's memory.

    First line out: ``{"ready": true}``. In: ``{"messages", "template",
    "add_generation_prompt", "tokens"}``; out: ``{"text": ...}`` or ``{"error": "render" |
    "not_text" | "too_large"}``.
    """
    import ctypes
    import json
    import os
    import resource
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server stops us, not a Ctrl-C
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    os.nice(10)

    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + memory_bytes, size + memory_bytes))
    except (OSError, ValueError):
        pass
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            job = json.loads(line)
            # apply_chat_template drops None-valued keys before rendering; so do we.
            chat = [{k: v for k, v in m.items() if v is not None} for m in job["messages"]]
            rendered, _ = render_jinja_template(
                conversations=[chat],
                chat_template=job["template"],
                add_generation_prompt=job["add_generation_prompt"],
                **job["tokens"],
            )
            text = rendered[0]
            reply = {"text": text} if isinstance(text, str) else {"error": "not_text"}
            data = json.dumps(reply).encode() + b"\n"
        except Exception:  # Jinja/security/memory errors: their text may quote the template
            data = b'{"error": "render"}\n'
        if len(data) > max_reply_bytes:
            data = b'{"error": "too_large"}\n'
        out.write(data)
        out.flush()


def _placeholder_ids(tokenizer: Any) -> dict[int, str]:
    """Token id -> "image" / "video" / "frame" for the placeholder tokens this vocab has."""
    vocab = tokenizer.get_vocab()
    out: dict[int, str] = {}
    for kind, names in (
        ("image", _IMAGE_TOKENS),
        ("video", _VIDEO_TOKENS),
        ("frame", _FRAME_TOKENS),
    ):
        for name in names:
            if name in vocab:
                out[vocab[name]] = kind
    return out

"""Chat templates and tokenization for the server, off the event loop and time-bounded.

Templates render in HuggingFace's sandboxed Jinja environment on a small dedicated
thread pool with a deadline, so a slow template cannot stall ``/health`` or other
requests. Media placeholder tokens typed as text (``<|image_pad|>`` with no image) are
refused: downstream they would be taken for media that does not exist.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter
from typing import Any

from mmengine.server.errors import APIError

# Tokens that stand for media in the families we serve (Qwen2-VL family, LLaVA).
_IMAGE_TOKENS = ("<|image_pad|>", "<image>")
_VIDEO_TOKENS = ("<|video_pad|>",)
_FRAME_TOKENS = ("<|vision_start|>", "<|vision_end|>")  # one pair around each item
# Texts longer than this are tokenized on a worker thread.
_INLINE_TOKENIZE_CHARS = 8192


class PromptRenderer:
    """Renders chat templates and tokenizes prompts for one tokenizer.

    Args:
        tokenizer: A HuggingFace tokenizer with a chat template.
        template_timeout_s: Longest a chat template may take to render.
        allow_request_templates: Accept ``chat_template`` from requests (off by default:
            a template is code, even if sandboxed).
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        template_timeout_s: float = 5.0,
        allow_request_templates: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.template_timeout_s = template_timeout_s
        self.allow_request_templates = allow_request_templates
        # Own pool: a runaway template occupies one of these threads, never the default
        # executor that other off-loop work shares.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="chat-template")
        self.placeholder_ids = _placeholder_ids(tokenizer)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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

"""Media in chat requests: find the parts, enforce per-prompt limits, fetch.

Fetching runs on a bounded thread pool through the ``processors`` package, which enforces
SECURITY.md items 1-4 (SSRF guard, allowlists, byte caps, content types) and raises
``MediaError`` with a client-safe message and an HTTP status; this module turns those into
API errors. ``engine_media`` hands the fetched bytes to the engine's input workers, which
decode them once, in their own processes, under the pixel/frame/format caps (items 5-7):
a decoder crash or hang costs a worker (restarted, the request failed), never this server.
(The server used to decode every item here too, only to throw the pixels away.)

Client-supplied ``uuid``s of media parts are dropped unless the server trusts them
(``--trust-media-uuids``): a uuid replaces the content hash as the embedding- and
prefix-cache key, so one client could otherwise name its image after another's and be
served the other's cached embeddings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mmengine.server.errors import APIError
from processors.config import MediaConfig
from processors.errors import MediaError
from processors.fetch import fetch_media
from processors.netpolicy import Resolver
from processors.placeholders import check_limit_mm_per_prompt

logger = logging.getLogger(__name__)

Modality = Literal["image", "video"]
_PART_MODALITY: dict[str, Modality] = {"image_url": "image", "video_url": "video"}


@dataclass(frozen=True)
class MediaRef:
    """One media content part of a chat request, before fetching."""

    modality: Modality
    url: str  # http(s)://, data: or file: (file: only under an allowed directory)
    uuid: str | None  # the client's name for this item (a cache key), if given
    message_index: int  # which message it came from
    part_index: int  # which content part of that message


@dataclass(frozen=True)
class FetchedMedia:
    """One fetched item, in the order it appears in the prompt."""

    modality: Modality
    uuid: str | None  # the client's cache key, kept only when the server trusts uuids
    data: bytes  # the encoded bytes as fetched (what content hashes are taken of)


def extract_media(messages: Sequence[dict[str, Any]]) -> list[MediaRef]:
    """Media parts of OpenAI-style messages, in prompt order."""
    refs: list[MediaRef] = []
    for mi, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for pi, part in enumerate(content):
            modality = _PART_MODALITY.get(part.get("type", ""))
            if modality is None:
                continue
            url = (part.get(part["type"]) or {}).get("url", "")
            refs.append(MediaRef(modality, url, part.get("uuid"), mi, pi))
    return refs


def media_counts(refs: Sequence[MediaRef]) -> dict[str, int]:
    return dict(Counter(ref.modality for ref in refs))


def engine_media(
    items: Sequence[FetchedMedia],
) -> tuple[dict[str, list[bytes]], dict[str, list[str | None]]]:
    """``multi_modal_data`` and ``multi_modal_uuids`` for ``AsyncLLM`` from loaded items.

    Items stay in prompt order within each modality, which is how the input workers pair
    them with the prompt's image / video placeholders.
    """
    data: dict[str, list[bytes]] = {}
    uuids: dict[str, list[str | None]] = {}
    for item in items:
        data.setdefault(item.modality, []).append(item.data)
        uuids.setdefault(item.modality, []).append(item.uuid)
    return data, uuids


def check_media_limits(refs: Sequence[MediaRef], config: MediaConfig) -> None:
    """400 when a prompt has more images or videos than ``limit_mm_per_prompt`` allows."""
    try:
        check_limit_mm_per_prompt(media_counts(refs), config.limit_mm_per_prompt)
    except MediaError as e:
        raise APIError(e.status, e.message, param="messages") from None


class MediaLoader:
    """Fetches media items on a thread pool, never on the event loop.

    Args:
        config: Allowlists and limits (see ``processors.config.MediaConfig``).
        max_workers: Threads for fetching; more requests queue for them.
        resolver: Host name resolver for http(s) URLs (tests stub it).
        timeout_s: Bound on one request's media (queueing included); by default the
            fetch deadline plus 5 s of queueing.
        trust_uuids: Keep the ``uuid`` of media parts as cache keys (only for clients
            that may share a cache); otherwise items are keyed by their bytes.
    """

    def __init__(
        self,
        config: MediaConfig,
        *,
        max_workers: int = 4,
        resolver: Resolver | None = None,
        timeout_s: float | None = None,
        trust_uuids: bool = False,
    ) -> None:
        self.config = config
        self.resolver = resolver
        self.timeout_s = timeout_s or config.fetch_deadline_s + 5.0
        self.trust_uuids = trust_uuids
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers, thread_name_prefix="media")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def load(self, refs: Sequence[MediaRef]) -> list[FetchedMedia]:
        """Fetches every item concurrently; the first failure (in prompt order) wins.

        Raises:
            APIError: 400/413 with the media error's client-safe message, or 400 when the
                items take longer than ``timeout_s``.
        """
        if not refs:
            return []
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(self._pool, self._load_one, ref) for ref in refs]
        try:
            async with asyncio.timeout(self.timeout_s):
                results = await asyncio.gather(*futures, return_exceptions=True)
        except TimeoutError:
            # The worker threads finish on their own (fetches have deadlines); this
            # request does not wait for them.
            raise APIError(400, "Media took too long to fetch.", param="messages") from None
        for result in results:
            if isinstance(result, MediaError):
                raise APIError(result.status, result.message, param="messages")
            if isinstance(result, BaseException):
                # A fetcher bug on hostile input fails this request only.
                logger.error("media fetch failed: %s", type(result).__name__, exc_info=result)
                raise APIError(400, "Media could not be processed.", param="messages")
        return list(results)  # type: ignore[arg-type]

    def _load_one(self, ref: MediaRef) -> FetchedMedia:
        data = fetch_media(ref.url, self.config, modality=ref.modality, resolver=self.resolver)
        return FetchedMedia(ref.modality, ref.uuid if self.trust_uuids else None, data)

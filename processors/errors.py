"""Errors raised while fetching, decoding and preprocessing media.

Every error carries the HTTP status the server should answer with and a message that is
safe to show to the client: it names what was wrong with the input, never a local path,
a resolved address, a traceback or an object repr.
"""

from __future__ import annotations


class MediaError(Exception):
    """Base class of all user-facing media errors.

    Attributes:
        message: Text safe to return to the client.
        status: HTTP status the server should answer with (400 unless stated otherwise).
    """

    default_status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = self.default_status if status is None else status


class MediaFetchError(MediaError):
    """The media could not be fetched: refused URL, unreachable host, bad response."""


class MediaDecodeError(MediaError):
    """The bytes are not a supported, readable image or video."""


class MediaLimitError(MediaError):
    """The media or the request goes over a configured limit.

    Byte, pixel, frame and duration caps answer 413 (content too large); per-prompt item
    counts answer 400.
    """


class PlaceholderMismatchError(MediaError, ValueError):
    """The prompt's placeholder tokens do not match the multimodal items sent with it."""

"""Fetch media bytes from http(s) URLs, data: URLs and allowlisted local files.

Synchronous by design: fetches run in input-processing workers (threads or processes),
never on the server's event loop. Every path is bounded in bytes and time.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from urllib.parse import unquote, urljoin, urlsplit

from processors.config import MediaConfig
from processors.errors import MediaError, MediaFetchError
from processors.netpolicy import FetchTarget, Resolver, check_url
from processors.sources import content_type_allowed, read_data_url, read_local_file, too_large

_CHUNK = 64 * 1024
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


def fetch_media(
    url: str,
    config: MediaConfig,
    *,
    modality: str | None = None,
    resolver: Resolver | None = None,
) -> bytes:
    """Return the bytes a media URL names, within the configured limits.

    Args:
        url: An `http://`, `https://`, `data:` or `file:` URL.
        config: Allowlists, timeouts and size caps.
        modality: "image" or "video" when known: picks the byte cap and the content types
            accepted; None accepts either.
        resolver: Host name resolver for http(s) (tests stub it); defaults to the system's.

    Returns:
        The raw (still encoded) media bytes.

    Raises:
        MediaFetchError: (400) refused, unreachable, timed out or bad response.
        MediaLimitError: (413) larger than the byte cap.
        MediaDecodeError: (400) a data: URL with invalid base64.
    """
    if not isinstance(url, str) or not url:
        raise MediaFetchError("Media URL must be a non-empty string.")
    colon = url.find(":")  # not split(): a data: URL is megabytes, copied for nothing
    scheme = url[:colon].strip().lower() if colon >= 0 else ""
    if scheme == "data":
        return read_data_url(url, config, modality)
    if scheme == "file":
        return _fetch_file_url(url, config, modality)
    if scheme in ("http", "https"):
        return _fetch_http(url, config, modality, resolver)
    raise MediaFetchError("Media URL must use http, https, data or file (when enabled).")


def _fetch_file_url(url: str, config: MediaConfig, modality: str | None) -> bytes:
    if not config.allowed_local_paths:
        raise MediaFetchError("Local file URLs are disabled on this server.")
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise MediaFetchError("Local file URLs must look like file:///path/to/file.")
    return read_local_file(unquote(parts.path), config, modality)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to one pre-approved IP, naming the approved host in SNI."""

    def __init__(self, target: FetchTarget, connect_timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout)
        self._target = target

    def connect(self) -> None:
        sock = socket.create_connection((self._target.address, self._target.port), self.timeout)
        if self._target.scheme == "https":
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=self._target.host)
        self.sock = sock


def _fetch_http(
    url: str, config: MediaConfig, modality: str | None, resolver: Resolver | None
) -> bytes:
    deadline = time.monotonic() + config.fetch_deadline_s
    for _hop in range(config.max_redirects + 1):
        target = check_url(url, config, resolver)
        location = _request_once(target, config, modality, deadline)
        if isinstance(location, bytes):
            return location
        # Each hop is parsed, resolved and checked again from scratch.
        url = urljoin(url, location)
    raise MediaFetchError("Media URL could not be fetched: too many redirects.")


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MediaFetchError("Media URL could not be fetched: the server took too long.")
    return left


def _request_once(
    target: FetchTarget, config: MediaConfig, modality: str | None, deadline: float
) -> bytes | str:
    """One GET; returns the body, or the Location of an allowed redirect."""
    conn = _PinnedConnection(target, min(config.connect_timeout_s, _remaining(deadline)))
    # The watchdog shuts the socket at the deadline, so a server that dribbles headers
    # or body one byte at a time cannot hold the worker past fetch_deadline_s.
    watchdog: threading.Timer | None = None
    sock: socket.socket | None = None
    response: http.client.HTTPResponse | None = None
    try:
        conn.connect()
        # Keep our own handle: http.client drops conn.sock once a "close" response starts.
        sock = conn.sock
        expired = threading.Event()
        watchdog = threading.Timer(_remaining(deadline), _shutdown, args=(sock, expired))
        watchdog.daemon = True
        watchdog.start()
        sock.settimeout(min(config.read_timeout_s, _remaining(deadline)))
        conn.putrequest("GET", target.request_target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        conn.putheader("User-Agent", "mmengine-media-fetch/1")
        conn.putheader("Accept", "image/*, video/*, application/octet-stream")
        conn.putheader("Accept-Encoding", "identity")
        conn.putheader("Connection", "close")
        conn.endheaders()
        response = conn.getresponse()
        if response.status in _REDIRECT_STATUSES:
            location = response.getheader("Location")
            if config.max_redirects == 0 or not location:
                raise MediaFetchError("Media URL could not be fetched: redirects are not followed.")
            return location
        if response.status != 200:
            raise MediaFetchError(
                f"Media URL could not be fetched: the server answered HTTP {response.status}."
            )
        content_type = response.getheader("Content-Type") or ""
        if not content_type_allowed(content_type, config, modality):
            raise MediaFetchError(
                "Media URL could not be fetched: the server's content type is not an accepted "
                f"{modality or 'image or video'} type."
            )
        body = _read_capped(sock, response, config, modality, deadline)
        if expired.is_set():  # the watchdog cut the stream: what we have is incomplete
            raise MediaFetchError("Media URL could not be fetched: the server took too long.")
        return body
    except MediaError:
        raise
    except TimeoutError:
        # The last read's timeout is capped at the deadline, so it may be what fired.
        if deadline - time.monotonic() < 0.05:
            raise MediaFetchError(
                "Media URL could not be fetched: the server took too long."
            ) from None
        raise MediaFetchError("Media URL could not be fetched: the server timed out.") from None
    except ssl.SSLError:
        raise MediaFetchError("Media URL could not be fetched: TLS verification failed.") from None
    except (OSError, http.client.HTTPException, ValueError):
        if time.monotonic() >= deadline:
            raise MediaFetchError(
                "Media URL could not be fetched: the server took too long."
            ) from None
        raise MediaFetchError("Media URL could not be fetched: connection failed.") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
        if response is not None:
            response.close()
        conn.close()
        if sock is not None:
            sock.close()


def _shutdown(sock: socket.socket, expired: threading.Event) -> None:
    expired.set()
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _read_capped(
    sock: socket.socket,
    response: http.client.HTTPResponse,
    config: MediaConfig,
    modality: str | None,
    deadline: float,
) -> bytes:
    cap = config.max_bytes(modality)
    declared = response.getheader("Content-Length")
    if declared is not None and declared.strip().isdigit() and int(declared) > cap:
        raise too_large(cap)
    chunks: list[bytes] = []
    total = 0
    # Python 3.12+ closes the socket as soon as a Content-Length body is complete.
    while not response.isclosed() and response.length != 0:
        sock.settimeout(min(config.read_timeout_s, _remaining(deadline)))
        # read1: at most one socket read, so a slow stream still hits the timeouts.
        chunk = response.read1(min(_CHUNK, cap + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > cap:
            raise too_large(cap)  # stop here: the rest is never downloaded
        chunks.append(chunk)
    if response.length:
        raise MediaFetchError("Media URL could not be fetched: the response ended early.")
    return b"".join(chunks)

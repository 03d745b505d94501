"""SECURITY.md 14 against slow clients: a stalled or trickled request body holds nothing
that other requests need.

Each refusal is in OpenAI's error shape, leaks nothing, and a normal request succeeds
right after it (``assert_refused``).
"""

from __future__ import annotations

import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch

from mmengine.cli import make_parser
from mmengine.server import middleware
from tests.server.harness import ServerHarness, metric, scrape
from tests.server.test_security import assert_refused, complete

torch.set_num_threads(1)

BODY_TIMEOUT_S = 1.0
BODY_FLAG = "--request-body-timeout"
DECLARED = 100  # Content-Length the slow clients announce and never finish


def _serve_with_body_timeout(
    harness: ServerHarness, monkeypatch: pytest.MonkeyPatch, extra: list[str]
) -> str:
    """An app with a short body deadline: by its flag once ``mmengine serve`` has one,
    else through the middleware's default (read when the app builds its middleware)."""
    _, unknown = make_parser().parse_known_args(["serve", *harness.argv, BODY_FLAG, "1"])
    if not unknown:
        return harness.serve([*extra, BODY_FLAG, str(BODY_TIMEOUT_S)])
    monkeypatch.setattr(middleware, "DEFAULT_BODY_TIMEOUT_S", BODY_TIMEOUT_S, raising=False)
    return harness.serve(extra)


def _send_headers(url: str, first_bytes: bytes) -> socket.socket:
    """A completion request whose body stops after ``first_bytes`` of ``DECLARED``."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=BODY_TIMEOUT_S + 5)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {DECLARED}\r\n\r\n"
    ).encode()
    sock.sendall(head + first_bytes)
    return sock


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    """A byte every 0.1 s: the body would take 10 s, each chunk is quick."""
    try:
        while not stop.wait(0.1):
            sock.sendall(b" ")
    except OSError:  # the server answered and closed the connection
        pass


def _read_response(sock: socket.socket) -> httpx.Response:
    """Everything until the server closes the connection, as an httpx.Response."""
    data = b""
    while chunk := sock.recv(65536):  # socket.timeout here: a hung connection
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(":", 1)) for line in lines[1:]]
    return httpx.Response(
        int(lines[0].split()[1]), headers=[(k, v.strip()) for k, v in headers], content=body
    )


def test_stalled_and_trickled_bodies_hold_no_slot_and_get_408_at_the_deadline(
    harness: ServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _serve_with_body_timeout(harness, monkeypatch, ["--max-concurrent-requests", "3"])
    start = time.monotonic()
    # More stalled requests than the server admits at once, and one that keeps sending.
    stalled = [_send_headers(url, b'{"prompt": "hel') for _ in range(3)]
    trickler = _send_headers(url, b"{")
    stop = threading.Event()
    feeder = threading.Thread(target=_trickle, args=(trickler, stop), daemon=True)
    feeder.start()
    try:
        time.sleep(0.2)  # all four are past their headers and waiting on their bodies
        # They hold no admission slot: normal requests are served meanwhile.
        for _ in range(2):
            normal = complete(url, max_tokens=1)
            assert normal.status_code == 200, normal.text
        assert time.monotonic() - start < BODY_TIMEOUT_S
        assert metric(scrape(url), "mmengine:http_requests_in_flight") == 0
        # At the deadline each gets a 408 and its connection is closed (read to EOF).
        responses = [_read_response(sock) for sock in [*stalled, trickler]]
        took = time.monotonic() - start
    finally:
        stop.set()
        for sock in [*stalled, trickler]:
            sock.close()
        feeder.join(5)
    assert BODY_TIMEOUT_S * 0.9 <= took <= BODY_TIMEOUT_S + 1.0, took
    for resp in responses:
        error = assert_refused(resp, url, 408, says="did not arrive")
        assert error["code"] == "request_timeout"
        assert resp.headers["connection"] == "close"
    counts = scrape(url)
    assert metric(counts, "mmengine:http_requests_total", status="408") == 4
    assert metric(counts, "mmengine:http_requests_in_flight") == 0

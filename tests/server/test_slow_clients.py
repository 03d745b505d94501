"""SECURITY.md 12 and 14 against slow clients: a stalled or trickled request body and a
request-supplied template that renders for hours hold nothing that other requests need.

Each refusal is in OpenAI's error shape, leaks nothing, and a normal request succeeds
right after it (``assert_refused``).
"""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import torch

from mmengine.server.prompts import PromptRenderer
from tests.server.harness import ServerHarness, metric, pid_alive, scrape, wait_for
from tests.server.test_security import assert_refused, chat, complete

torch.set_num_threads(1)

BODY_TIMEOUT_S = 1.0
BODY_FLAG = "--request-body-timeout"
DECLARED = 100  # Content-Length the slow clients announce and never finish


def _serve_with_body_timeout(harness: ServerHarness, extra: list[str]) -> str:
    """An app with a short body deadline (``--request-body-timeout``)."""
    return harness.serve([*extra, BODY_FLAG, str(BODY_TIMEOUT_S)])


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


TRICKLE_S = 0.8 * BODY_TIMEOUT_S  # then it stalls: no byte in flight at the deadline


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    """A byte every 0.1 s for TRICKLE_S: each chunk is quick, the body would take 10 s.
    (It stops before the deadline: a server closing a socket with unread bytes resets it,
    and the client may lose the 408 already sent.)"""
    end = time.monotonic() + TRICKLE_S
    try:
        while time.monotonic() < end and not stop.wait(0.1):
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
    harness: ServerHarness,
) -> None:
    url = _serve_with_body_timeout(harness, ["--max-concurrent-requests", "3"])
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
    # A per-chunk deadline would have cut the trickler at TRICKLE_S + BODY_TIMEOUT_S.
    assert BODY_TIMEOUT_S * 0.9 <= took <= BODY_TIMEOUT_S + 0.5, took
    for resp in responses:
        error = assert_refused(resp, url, 408, says="did not arrive")
        assert error["code"] == "request_timeout"
        assert resp.headers["connection"] == "close"
    counts = scrape(url)
    assert metric(counts, "mmengine:http_requests_total", status="408") == 4
    assert metric(counts, "mmengine:http_requests_in_flight") == 0


# ---- request-supplied chat templates ---------------------------------------------------------
TEMPLATE_TIMEOUT_S = 0.5
# 10**10 loop iterations: hours of work unless something really stops it.
ENDLESS = (
    "{% for i in range(100000) %}{% for j in range(100000) %}{% if i == j %}y{% endif %}"
    "{% endfor %}{% endfor %}x"
)
QUICK = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def _sandbox_children() -> set[int]:
    """This process's template sandboxes (``python -I -c <_sandbox_main's source>``)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"_sandbox_main" in cmdline and pid_alive(int(entry.name)):
            out.add(int(entry.name))
    return out


def _cpu_seconds() -> float:
    """CPU time of this process, all its threads (the old thread pool rendered here)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_endless_request_templates_are_killed_and_never_delay_the_model_template(
    harness: ServerHarness,
) -> None:
    url = harness.serve(
        ["--trust-request-chat-template", "--chat-template-timeout", str(TEMPLATE_TIMEOUT_S)]
    )
    before = _sandbox_children()
    warm = chat(url, "hi", chat_template=QUICK)  # starts this app's sandboxes
    assert warm.status_code == 200, warm.text
    sandboxes = _sandbox_children() - before

    with ThreadPoolExecutor(3) as pool:
        start = time.monotonic()
        slow = [pool.submit(chat, url, "hi", chat_template=ENDLESS) for _ in range(3)]
        time.sleep(0.1)  # the endless templates are rendering
        plain = chat(url, "hello")  # the model's own template
        plain_took = time.monotonic() - start
        responses = [f.result() for f in slow]
        slow_took = time.monotonic() - start
    assert plain.status_code == 200, plain.text
    assert plain_took < 2.0, plain_took
    # Bounded: a template waits at most its deadline for a free sandbox, possibly then for a
    # fresh one to start (about a second, not charged to it), then renders for its deadline.
    assert slow_took < 2 * TEMPLATE_TIMEOUT_S + 5.0, slow_took
    # Two sandboxes: the templates that got one ran out of time; one that found both busy
    # for its whole deadline was told to retry.
    codes = sorted(r.status_code for r in responses)
    assert codes.count(400) >= 2 and set(codes) <= {400, 503}, codes
    for resp in responses:
        if resp.status_code == 400:
            assert_refused(resp, url, 400, says="too long")
        else:
            error = assert_refused(resp, url, 503, says="retry")
            assert error["code"] == "server_overloaded"

    # Nothing keeps rendering: no CPU burnt in this process (where the old thread pool
    # rendered), and the sandboxes that ran the endless templates are gone.
    cpu = _cpu_seconds()
    time.sleep(1.0)
    assert _cpu_seconds() - cpu < 0.5
    assert len(sandboxes) == 2, sandboxes
    wait_for(lambda: not any(pid_alive(pid) for pid in sandboxes), timeout=2.0)
    # Replacements serve the next request-supplied template.
    assert chat(url, "hi", chat_template=QUICK).status_code == 200


def test_trusted_request_template_renders_as_the_model_template_does(
    harness: ServerHarness,
) -> None:
    """The sandbox process renders exactly what ``apply_chat_template`` renders."""
    tokenizer = harness.engine.tokenizer
    renderer = PromptRenderer(tokenizer, allow_request_templates=True)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "caf\u00e9 \u4e2d\u6587"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ]
    try:
        for add_generation_prompt in (True, False):
            own, sent = (
                harness.call(
                    renderer.render_chat(
                        messages, add_generation_prompt=add_generation_prompt, chat_template=t
                    )
                )
                for t in (None, tokenizer.chat_template)
            )
            assert own == sent
            assert own == tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        assert renderer.sandboxes is not None and renderer.sandboxes.pids()
    finally:
        renderer.close()

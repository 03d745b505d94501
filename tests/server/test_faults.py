"""SECURITY.md 13, 14, 17: disconnects free KV, overload is refused fast and fully accounted,
an API key guards every inference route."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from tests.server.harness import MODEL_NAME, ServerHarness, metric, scrape, wait_for

torch.set_num_threads(1)

# A request that would run for many seconds if nobody stopped it.
LONG = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": "tell me everything"}],
    "max_tokens": 4000,
    "ignore_eos": True,
    "temperature": 0,
}


def engine_idle(url: str) -> bool:
    values = scrape(url)
    return (
        metric(values, "mmengine:kv_cache_blocks_used") == 0
        and metric(values, "mmengine:num_requests_running") == 0
        and metric(values, "mmengine:num_requests_waiting") == 0
    )


def assert_serves_normally(url: str) -> None:
    """A normal request right after the fault succeeds (SECURITY.md: every case)."""
    resp = httpx.post(f"{url}/v1/chat/completions", json={**LONG, "max_tokens": 3}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


def test_client_disconnect_mid_stream_aborts_within_a_second_and_frees_kv_blocks(api: str) -> None:
    assert engine_idle(api)
    finished_before = metric(scrape(api), "mmengine:request_success_total")
    with httpx.stream("POST", f"{api}/v1/chat/completions", json={**LONG, "stream": True}) as resp:
        events = (line for line in resp.iter_lines() if line.startswith("data: "))
        for _ in range(5):
            next(events)
        busy = scrape(api)  # mid-stream: the request holds KV blocks
        assert metric(busy, "mmengine:kv_cache_blocks_used") > 0
        assert metric(busy, "mmengine:num_requests_running") == 1
    # Leaving the block closed the connection mid-stream.
    took = wait_for(lambda: engine_idle(api), timeout=3.0)
    assert took < 1.2
    after = scrape(api)
    assert metric(after, "mmengine:request_success_total") == finished_before  # aborted, not done
    assert_serves_normally(api)


def test_client_disconnect_while_waiting_for_a_non_streaming_reply_aborts_it(api: str) -> None:
    gone_before = metric(scrape(api), "mmengine:http_requests_total", status="499")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{api}/v1/chat/completions", json=LONG, timeout=httpx.Timeout(5, read=0.5))
    took = wait_for(lambda: engine_idle(api), timeout=3.0)
    assert took < 1.2
    wait_for(
        lambda: (
            metric(scrape(api), "mmengine:http_requests_total", status="499") == gone_before + 1
        ),
        timeout=2.0,
    )
    assert_serves_normally(api)


def test_overload_is_refused_fast_and_every_request_is_accounted_for(
    harness: ServerHarness,
) -> None:
    url = harness.serve(["--max-concurrent-requests", "3"])
    body = {**LONG, "max_tokens": 300}
    sent = 12

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(
                *(http.post(f"{url}/v1/chat/completions", json=body) for _ in range(sent))
            )

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    ok, refused = codes.count(200), codes.count(503)
    assert ok + refused == sent and ok >= 3 and refused >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "server_overloaded"
            assert r.headers["retry-after"] == "1"
        else:
            assert r.json()["usage"]["completion_tokens"] == 300
    values = scrape(url)
    route = "/v1/chat/completions"
    assert metric(values, "mmengine:http_requests_total", route=route) == sent
    assert metric(values, "mmengine:http_requests_total", route=route, status="503") == refused
    assert_serves_normally(url)
    assert metric(values, "mmengine:http_requests_in_flight") == 0
    assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_api_key_guards_every_v1_route_and_nothing_else(
    harness: ServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = harness.serve(["--api-key", "s3cret"])
    calls = [
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 1}),
        ("GET", "/v1/models", None),
    ]  # fmt: skip
    for method, path, body in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            resp = httpx.request(method, f"{url}{path}", json=body, headers=headers)
            assert resp.status_code == 401, (path, headers)
            assert resp.json()["error"]["type"] == "authentication_error"
        good = httpx.request(
            method, f"{url}{path}", json=body, headers={"Authorization": "Bearer s3cret"}
        )
        assert good.status_code == 200, path
    for path in ("/health", "/version", "/metrics"):
        assert httpx.get(f"{url}{path}").status_code == 200
    keyed = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    assert keyed.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1).choices
    monkeypatch.setenv("MMENGINE_API_KEY", "from-env")
    env_url = harness.serve([])
    assert httpx.get(f"{env_url}/v1/models").status_code == 401
    auth = {"Authorization": "Bearer from-env"}
    assert httpx.get(f"{env_url}/v1/models", headers=auth).status_code == 200

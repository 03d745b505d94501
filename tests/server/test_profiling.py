"""POST /start_profile and /stop_profile: off unless --profiler-dir, keyed with --api-key,
409 when out of order, and a trace of the engine core's steps in between."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import torch

from tests.server.harness import ServerHarness

torch.set_num_threads(1)


def test_profiler_routes_exist_only_with_a_profiler_dir(harness: ServerHarness) -> None:
    url = harness.serve([])
    for path in ("/start_profile", "/stop_profile"):
        assert httpx.post(f"{url}{path}").status_code == 404


def test_profile_of_the_engine_core_through_the_server(
    harness: ServerHarness, tmp_path: Path
) -> None:
    url = harness.serve(["--profiler-dir", str(tmp_path / "traces"), "--api-key", "k3y"])
    auth = {"Authorization": "Bearer k3y"}
    for path in ("/start_profile", "/stop_profile"):  # they change the engine: keyed
        resp = httpx.post(f"{url}{path}")
        assert resp.status_code == 401
        assert resp.json()["error"]["type"] == "authentication_error"
    resp = httpx.post(f"{url}/stop_profile", headers=auth)
    assert resp.status_code == 409 and "no profile" in resp.json()["error"]["message"]
    started = httpx.post(f"{url}/start_profile", headers=auth, timeout=60)
    assert started.status_code == 200, started.text
    name = started.json()["trace"]
    assert "/" not in name  # no server path in a response body
    trace = tmp_path / "traces" / name
    again = httpx.post(f"{url}/start_profile", headers=auth)
    assert again.status_code == 409 and "already" in again.json()["error"]["message"]
    body = {"prompt": "hi", "max_tokens": 3, "ignore_eos": True}
    done = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60)
    assert done.status_code == 200
    stopped = httpx.post(f"{url}/stop_profile", headers=auth, timeout=120)
    assert stopped.status_code == 200, stopped.text
    with gzip.open(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    forwards = [e for e in events if e.get("name") == "mm:forward"]
    assert len(forwards) >= 3  # a prefill and two decodes at least
    assert httpx.post(f"{url}/stop_profile", headers=auth).status_code == 409

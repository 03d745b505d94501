"""`mmengine serve` as a real process: signals, engine death, no leftover children, the CLI.

The served model is the Qwen2-VL fixture, so the children are the engine core and one
input-processing worker, and both must be gone after every kind of stop.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from mmengine import cli
from mmengine.cli import main, make_parser
from mmengine.config import EngineConfig
from mmengine.server.args import (
    ENGINE_FLAG_HELP,
    NOT_FLAGS,
    SERVER_OWNED,
    engine_config_from_args,
    media_config_from_args,
    split_list,
)
from tests.processors.media_helpers import png_bytes
from tests.server.harness import ServerProcess, engine_argv, pid_alive, wait_for

torch.set_num_threads(1)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0}
IMAGE_URL = "data:image/png;base64," + base64.b64encode(png_bytes(28, 28)).decode()
IMAGE_CHAT = {
    **CHAT,
    "max_tokens": 4,
    "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE_URL}}]}
    ],
}


@pytest.fixture
def server(qwen2_vl_ckpt: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    argv = engine_argv(qwen2_vl_ckpt, max_model_len=1024)
    proc = ServerProcess(argv, tmp_path / "server.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.close()


def stream_in_thread(
    url: str, max_tokens: int
) -> tuple[threading.Thread, list[str], threading.Event]:
    """Starts a streaming chat; returns (thread, received data lines, first-chunk event)."""
    lines: list[str] = []
    started = threading.Event()

    def run() -> None:
        body = {**CHAT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(20)
    return thread, lines, started


def content_tokens(lines: list[str]) -> tuple[str | None, list[dict]]:
    """(finish_reason, error events) of a finished chat stream."""
    events = [json.loads(x) for x in lines if x != "[DONE]"]
    finish = [
        c["finish_reason"] for e in events for c in e.get("choices", []) if c["finish_reason"]
    ]
    return (finish[0] if finish else None), [e for e in events if "error" in e]


def core_pid(server: ServerProcess) -> int:
    (core,) = [pid for pid in server.children() if "mmengine.core_process" in cmdline(pid)]
    return core


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_sigterm_finishes_in_flight_refuses_new_and_leaves_no_child(server: ServerProcess) -> None:
    children = server.children()
    assert len(children) == 2  # the engine core and one input-processing worker
    image = httpx.post(f"{server.url}/v1/chat/completions", json=IMAGE_CHAT, timeout=30)
    assert image.status_code == 200 and image.json()["usage"]["prompt_tokens"] > 10
    thread, lines, _ = stream_in_thread(server.url, max_tokens=300)
    server.signal(signal.SIGTERM)
    wait_for(lambda: "received SIGTERM" in server.log(), timeout=5)
    late = httpx.post(f"{server.url}/v1/chat/completions", json={**CHAT, "max_tokens": 2})
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert httpx.get(f"{server.url}/health").status_code == 503
    thread.join(30)
    finish, errors = content_tokens(lines)
    assert finish == "length" and not errors and lines[-1] == "[DONE]"
    assert server.proc.wait(20) == 0
    assert not any(pid_alive(pid) for pid in children)


def test_sigterm_aborts_requests_still_running_after_the_grace_period(
    qwen2_vl_ckpt: Path, tmp_path: Path
) -> None:
    argv = [*engine_argv(qwen2_vl_ckpt, max_model_len=4096), "--shutdown-grace-period", "0.5"]
    server = ServerProcess(argv, tmp_path / "server.log")
    try:
        server.wait_ready()
        children = server.children()
        thread, lines, _ = stream_in_thread(server.url, max_tokens=3500)  # ~20 s on this CPU
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        thread.join(15)
        assert not thread.is_alive() and time.monotonic() - signalled < 5.0
        finish, errors = content_tokens(lines)
        assert finish is None and lines[-1] == "[DONE]"  # cut short, and the client is told
        assert errors and set(errors[0]["error"]) == {"message", "type", "param", "code"}
        assert "grace period over: aborted 1 request(s)" in server.log()
        assert server.proc.wait(20) == 0
        assert "Traceback" not in server.log()
        assert not any(pid_alive(pid) for pid in children)
    finally:
        server.close()


def test_sigint_stops_cleanly_and_leaves_no_child(server: ServerProcess) -> None:
    children = server.children()
    assert len(children) == 2
    server.signal(signal.SIGINT)
    assert server.proc.wait(20) == 0
    assert "engine stopped" in server.log()
    assert "Traceback" not in server.log()
    assert not any(pid_alive(pid) for pid in children)


def test_engine_core_death_fails_in_flight_requests_reports_unhealthy_and_exits_nonzero(
    server: ServerProcess,
) -> None:
    children = server.children()
    core = core_pid(server)
    thread, lines, _ = stream_in_thread(server.url, max_tokens=900)
    killed = time.monotonic()
    os.kill(core, signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - killed < 2.0  # failed promptly
    finish, errors = content_tokens(lines)
    assert finish is None and errors and errors[0]["error"]["code"] == "engine_unavailable"
    assert lines[-1] == "[DONE]"
    health = httpx.get(f"{server.url}/health", timeout=2)  # still up for ~1 s after the death
    assert health.status_code == 503
    assert server.proc.wait(15) != 0
    assert not any(pid_alive(pid) for pid in children)  # the input worker too


def test_serve_without_a_model_says_a_model_is_required_unless_a_default_ships(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "DEFAULT_MODEL", None)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", "0"])
    assert info.value.code == 2
    assert "a model is required" in capsys.readouterr().err
    monkeypatch.setattr(cli, "DEFAULT_MODEL", "/models/embedded")
    assert make_parser().parse_args(["serve"]).model == "/models/embedded"


def test_every_engine_option_is_a_flag_with_an_explained_help_line() -> None:
    help_text = make_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # noqa: SLF001
    for f in dataclasses.fields(EngineConfig):
        if f.name in NOT_FLAGS:
            continue
        assert "--" + f.name.replace("_", "-") in help_text, f.name
        if f.name not in SERVER_OWNED:  # those have their own server flag and help
            assert f.name in ENGINE_FLAG_HELP, f"EngineConfig.{f.name} has no --help text"
    args = make_parser().parse_args(
        ["serve", "m", "--max-model-len", "77", "--no-enable-prefix-caching", "--block-size", "32"]
    )
    config = engine_config_from_args(args)
    assert (config.max_model_len, config.enable_prefix_caching, config.block_size) == (
        77,
        False,
        32,
    )
    assert config.multiprocess and config.seed == EngineConfig(model="m").seed


def test_extra_flag_sets_engine_switches_and_refuses_unknown_keys(
    capsys: pytest.CaptureFixture,
) -> None:
    args = make_parser().parse_args(
        [
            "serve",
            "m",
            "--extra",
            "gemv_max_tokens=0",
            "--extra",
            "load_format=dummy",
            "--extra",
            "cuda_graphs=off",
        ]
    )
    config = engine_config_from_args(args)
    assert config.extra == {"gemv_max_tokens": 0, "load_format": "dummy", "cuda_graphs": False}
    assert engine_config_from_args(make_parser().parse_args(["serve", "m"])).extra == {}
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "m", "--extra", "gemv_max_token=0"])
    err = capsys.readouterr().err
    assert "gemv_max_token=0" in err and "gemv_max_tokens" in err


def test_engine_config_checks_extra_values_and_stores_them_in_their_kind() -> None:
    from mmengine.config import EXTRA_OPTIONS, GEMV_MAX_ROWS
    from mmkernels.gemv import MAX_ROWS

    assert GEMV_MAX_ROWS == MAX_ROWS  # the limit config checks is the kernel's
    with pytest.raises(ValueError, match="unknown extra option 'cuda_graph'"):
        EngineConfig(model="m", extra={"cuda_graph": False})
    for bad in (GEMV_MAX_ROWS + 1, -1, 2.0, True, "abc"):
        with pytest.raises(ValueError, match="gemv_max_tokens takes"):
            EngineConfig(model="m", extra={"gemv_max_tokens": bad})
    # "no" / "off" used to be kept as (truthy) strings, so the switch silently stayed on.
    for off in (False, 0, "0", "no", "off", "False"):
        assert (
            EngineConfig(model="m", extra={"torch_compile": off}).extra_option("torch_compile")
            is False
        )
    for bad in ("maybe", 2, 0.5, None):
        with pytest.raises(ValueError, match="cuda_graphs takes true or false"):
            EngineConfig(model="m", extra={"cuda_graphs": bad})
    with pytest.raises(ValueError, match="load_format takes one of auto, dummy"):
        EngineConfig(model="m", extra={"load_format": "foo"})
    config = EngineConfig(model="m", extra={"gemv_max_tokens": "4", "gemv_rope": 1})
    assert config.extra == {"gemv_max_tokens": 4, "gemv_rope": True}
    assert config.extra_option("cuda_graphs") is True  # unset: the default
    assert {k: EngineConfig(model="m").extra_option(k) for k in EXTRA_OPTIONS} == {
        k: o.default for k, o in EXTRA_OPTIONS.items()
    }


def test_multiprocess_follows_the_environment_only_when_not_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MMENGINE_MULTIPROCESS", "0")
    assert EngineConfig(model="m").multiprocess is False
    assert EngineConfig(model="m", multiprocess=True).multiprocess is True
    monkeypatch.delenv("MMENGINE_MULTIPROCESS")
    assert EngineConfig(model="m").multiprocess is True


def test_list_flags_do_not_swallow_the_model_argument() -> None:
    args = make_parser().parse_args(
        ["serve", "--allowed-media-domains", "cdn.example.com", "/models/x"]
    )
    assert args.model == "/models/x"
    args = make_parser().parse_args(
        [
            "serve",
            "--served-model-name",
            "qwen,qwen-vl",
            "--served-model-name",
            "q3",
            "--allowed-media-domains",
            "a.com,.b.org",
            "--allowed-media-domains",
            "c.net",
            "/models/x",
        ]
    )
    assert args.model == "/models/x"
    assert split_list(args.served_model_name) == ("qwen", "qwen-vl", "q3")
    assert media_config_from_args(args).allowed_domains == ("a.com", ".b.org", "c.net")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--block-size", "3"], "block_size must be a power of two"),
        (["--extra", "gemv_max_tokens=abc"], "gemv_max_tokens takes an integer"),
        (["--extra", "gemv_max_tokens=9"], "gemv_max_tokens takes one of 0, 1, 2"),
        (["--extra", "torch_compile=maybe"], "torch_compile takes true or false"),
        (["--dtype", "int8"], "dtype must be"),
    ],
)
def test_serve_refuses_bad_engine_option_values_with_a_usage_error_not_a_traceback(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "/nonexistent/model", *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_help_does_not_load_torch_or_the_engine() -> None:
    """`mmengine serve --help` answered in seconds when the package imported the engine."""
    import subprocess
    import sys

    code = (
        "import sys; from mmengine.cli import make_parser; make_parser(); "
        "import mmengine; mmengine.__version__; "
        "print(sorted(m for m in ('torch', 'transformers', 'mmengine.llm') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--media-workers", "0"], "--media-workers: must be >= 1"),
        (["--port", "70000"], "--port: must be in [0, 65535]"),
        (["--request-body-timeout", "nan"], "--request-body-timeout: must be a positive"),
        (["--chat-template-timeout", "0"], "--chat-template-timeout: must be a positive"),
        (["--shutdown-grace-period", "-1"], "--shutdown-grace-period: must be a number"),
        (["--max-concurrent-requests", "x"], "expected an integer"),
        (["--request-template-processes", "0"], "--request-template-processes: must be >= 1"),
    ],
)
def test_server_flags_out_of_range_are_usage_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    """--media-workers 0 used to end in a ValueError traceback at start-up."""
    with pytest.raises(SystemExit) as exc:
        make_parser().parse_args(["serve", "m", *flags])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err

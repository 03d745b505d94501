"""Fixtures of the server tests: one engine serving several apps, a media server, references."""

from __future__ import annotations

import dataclasses
import http.server
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from mmengine import LLM
from mmengine.cli import make_parser
from mmengine.server.args import media_config_from_args
from mmengine.server.media import MediaLoader
from processors.config import MediaConfig
from tests.processors.media_helpers import bomb_png, mp4_bytes, png_bytes
from tests.server.harness import ServerHarness, engine_argv

torch.set_num_threads(1)

PNG = png_bytes(16, 16)
MP4 = mp4_bytes(num_frames=7)

# Names a stub resolver answers; nothing in these tests ever reaches real DNS.
DNS = {
    "localhost": ["127.0.0.1"],
    "media.internal": ["10.1.2.3"],
    "metadata.internal": ["169.254.169.254"],
    "rebind.example": ["93.184.216.34", "127.0.0.1"],
    "v6.internal": ["::1"],
    "ula.internal": ["fd12:3456::1"],
}


def stub_resolver(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("unknown host")
    return DNS[host]


class _MediaHandler(http.server.BaseHTTPRequestHandler):
    stop = threading.Event()
    hits: list[str] = []
    files: dict[str, tuple[bytes, str]] = {}  # path -> (body, content type), added by tests

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _MediaHandler.hits.append(self.path)
        if self.path in _MediaHandler.files:
            self._send(*_MediaHandler.files[self.path])
        elif self.path == "/img.png":
            self._send(PNG, "image/png")
        elif self.path == "/clip.mp4":
            self._send(MP4, "video/mp4")
        elif self.path == "/page.html":
            self._send(b"<html>not an image</html>", "text/html")
        elif self.path == "/bomb.png":
            self._send(bomb_png(), "image/png")
        elif self.path == "/huge.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while not _MediaHandler.stop.is_set():
                    self.wfile.write(b"\x00" * 65536)
            except OSError:
                pass
        elif self.path == "/redirect.png":
            self.send_response(302)
            self.send_header("Location", "/img.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow.png":
            _MediaHandler.stop.wait(10)  # never answers within the fetch deadline
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="session")
def media_url() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MediaHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _MediaHandler.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="session")
def media_hits() -> list[str]:
    return _MediaHandler.hits


@pytest.fixture(scope="session")
def serve_media(media_url: str) -> Callable[[str, bytes, str], str]:
    """``serve_media(path, body, content_type)`` -> the URL the media server answers it at."""

    def add(path: str, body: bytes, content_type: str) -> str:
        _MediaHandler.files[path] = (body, content_type)
        return f"{media_url}{path}"

    return add


@pytest.fixture(scope="session")
def media_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(allowed dir with img.png and an escaping symlink, a secret file outside it)."""
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    (allowed / "img.png").write_bytes(PNG)
    secret = outside / "secret.png"
    secret.write_bytes(PNG)
    (allowed / "escape.png").symlink_to(secret)
    return allowed, secret


def _start_harness(
    ckpt: Path, media_config: MediaConfig | None = None, extra_argv: tuple[str, ...] = ()
) -> ServerHarness:
    # One thread in the engine-core child too (it inherits the environment at spawn).
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return ServerHarness([*engine_argv(ckpt), *extra_argv], media_config)
    finally:
        if saved is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = saved


@pytest.fixture(scope="session")
def harness(qwen2_ckpt: Path) -> Iterator[ServerHarness]:
    """A text-only model (Qwen2 fixture)."""
    h = _start_harness(qwen2_ckpt)
    yield h
    h.close()


@pytest.fixture(scope="session")
def async_harness(qwen2_ckpt: Path) -> Iterator[ServerHarness]:
    """The Qwen2 fixture with async scheduling (the GPU default) on the CPU."""
    h = _start_harness(qwen2_ckpt, extra_argv=("--async-scheduling",))
    yield h
    h.close()


@pytest.fixture(scope="session")
def vlm_harness(qwen2_vl_ckpt: Path) -> Iterator[ServerHarness]:
    """The Qwen2-VL fixture with one input-processing worker process. The workers may
    fetch from the test media server (only tests that call AsyncLLM directly use URLs;
    the server hands the workers bytes)."""
    # The workers decode every item (the server only fetches): the decode caps the tests
    # probe are theirs. A small frame cap, so a short clip can cross it.
    config = MediaConfig(allowed_domains=("127.0.0.1",), video_max_source_frames=5)
    h = _start_harness(qwen2_vl_ckpt, config)
    yield h
    h.close()


def _loader(extra: list[str], harness: ServerHarness) -> MediaLoader:
    """The media path the flags configure, with test-sized timeouts and caps."""
    args = make_parser().parse_args(["serve", *harness.argv, *extra])
    config = dataclasses.replace(
        media_config_from_args(args),
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
        fetch_deadline_s=1.5,
        max_image_bytes=256 * 1024,
    )
    return MediaLoader(
        config, resolver=stub_resolver, timeout_s=10, trust_uuids=args.trust_media_uuids
    )


DEFAULT_FLAGS = ["--limit-mm-per-prompt", "image=2,video=1", "--max-request-body-bytes", "2000000"]


@pytest.fixture(scope="session")
def api(harness: ServerHarness) -> str:
    """Default media policy: public hosts only, no file: URLs."""
    return harness.serve(DEFAULT_FLAGS, media_loader=_loader(DEFAULT_FLAGS, harness))


def _allowlisted_flags(media_dirs: tuple[Path, Path]) -> list[str]:
    """The local media server and one local directory explicitly allowed."""
    return [
        *DEFAULT_FLAGS,
        "--allowed-media-domains", "127.0.0.1,localhost",
        "--allowed-local-media-path", str(media_dirs[0]),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def api_allowlisted(harness: ServerHarness, media_dirs: tuple[Path, Path]) -> str:
    """The local media server and one local directory explicitly allowed."""
    flags = _allowlisted_flags(media_dirs)
    return harness.serve(flags, media_loader=_loader(flags, harness))


@pytest.fixture(scope="session")
def vlm_api(vlm_harness: ServerHarness) -> str:
    """The VLM behind the default media policy: public hosts only, no file: URLs."""
    return vlm_harness.serve(DEFAULT_FLAGS, media_loader=_loader(DEFAULT_FLAGS, vlm_harness))


@pytest.fixture(scope="session")
def vlm_api_trusting_uuids(vlm_harness: ServerHarness) -> str:
    """The VLM with --trust-media-uuids: media parts' uuids are their cache keys."""
    flags = [*DEFAULT_FLAGS, "--trust-media-uuids"]
    return vlm_harness.serve(flags, media_loader=_loader(flags, vlm_harness))


@pytest.fixture(scope="session")
def vlm_api_allowlisted(vlm_harness: ServerHarness, media_dirs: tuple[Path, Path]) -> str:
    """The VLM with the local media server and one local directory explicitly allowed."""
    flags = _allowlisted_flags(media_dirs)
    return vlm_harness.serve(flags, media_loader=_loader(flags, vlm_harness))


@pytest.fixture(scope="session")
def vlm_reference_llm(qwen2_vl_ckpt: Path) -> Iterator[LLM]:
    """The offline API on the VLM checkpoint: the oracle for the server's tokens."""
    with LLM(
        str(qwen2_vl_ckpt), dtype="float32", device="cpu", max_model_len=4096, multiprocess=False
    ) as llm:
        yield llm


@pytest.fixture(scope="session")
def reference_llm(qwen2_ckpt: Path) -> Iterator[LLM]:
    """The offline API on the same checkpoint: the oracle for the server's tokens."""
    with LLM(
        str(qwen2_ckpt), dtype="float32", device="cpu", max_model_len=4096, multiprocess=False
    ) as llm:
        yield llm

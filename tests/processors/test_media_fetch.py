"""Fetching: SSRF guard, allowlists, caps, timeouts, content types, data: and file: URLs.

Only 127.0.0.1 is ever connected to (a server in a thread); every other address is
judged by the policy with a stubbed resolver and refused before any connection.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from processors.config import MediaConfig
from processors.errors import MediaDecodeError, MediaError, MediaFetchError, MediaLimitError
from processors.fetch import fetch_media
from processors.netpolicy import check_url, is_public_address
from tests.processors.media_helpers import png_bytes

torch.set_num_threads(1)

PNG = png_bytes(8, 8)
PUBLIC_IP = "93.184.216.34"


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "test"
    stop = threading.Event()
    requests: list[str] = []
    hosts: list[str] = []

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, content_type: str = "image/png", **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _Handler.requests.append(self.path)
        path = self.path
        _Handler.hosts.append(self.headers.get("Host", ""))
        if path == "/img.png":
            self._send(200, PNG)
        elif path == "/html":
            self._send(200, b"<html></html>", "text/html")
        elif path == "/missing":
            self._send(404, b"no")
        elif path == "/redirect":
            self._send(302, b"", Location="/img.png")
        elif path == "/redirect-private":
            self._send(302, b"", Location="http://10.0.0.1/img.png")
        elif path == "/loop":
            self._send(302, b"", Location="/loop")
        elif path == "/declared-huge":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(10**12))
            self.end_headers()
        elif path == "/endless":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while not _Handler.stop.is_set():
                    self.wfile.write(b"\x00" * 65536)
            except OSError:
                pass
        elif path == "/stall":
            _Handler.stop.wait(5)
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while not _Handler.stop.wait(0.05):
                    self.wfile.write(b"\x00")
                    self.wfile.flush()
            except OSError:
                pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.stop.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def only_loopback_connections(monkeypatch):
    """Fails the test itself (not only the suite-wide guard) if a refused URL connects."""
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        if address[0] != "127.0.0.1":
            pytest.fail(f"fetch connected to a refused address {address[0]}")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


LOCAL = MediaConfig(
    allowed_domains=("127.0.0.1",), connect_timeout_s=2, read_timeout_s=2, fetch_deadline_s=5
)


def no_dns(host: str, port: int) -> list[str]:
    raise AssertionError(f"resolver must not be called for {host}")


def stub_dns(table: dict[str, list[str]]):
    def resolve(host: str, port: int) -> list[str]:
        return table[host]

    return resolve


def assert_clean(error: MediaError) -> None:
    assert error.status in (400, 413)
    for leak in ("127.0.0.1", "10.0.0.1", "169.254", "Traceback", "/tmp", "0x"):
        assert leak not in error.message


# ---------- the local server: reachable only when allowlisted ----------


def test_local_server_is_refused_by_default_before_any_request(server):
    before = len(_Handler.requests)
    with pytest.raises(MediaFetchError) as info:
        fetch_media(f"{server}/img.png", MediaConfig())
    assert "non-public address" in info.value.message
    assert len(_Handler.requests) == before
    assert_clean(info.value)


def test_allowlisted_local_server_is_fetched(server):
    assert fetch_media(f"{server}/img.png", LOCAL, modality="image") == PNG


def test_connection_goes_to_the_resolved_address_with_the_host_name_in_host_header(server):
    port = server.rsplit(":", 1)[1]
    config = MediaConfig(allowed_domains=("media.test",))
    resolver = stub_dns({"media.test": ["127.0.0.1"]})
    assert fetch_media(f"http://media.test:{port}/img.png", config, resolver=resolver) == PNG
    assert _Handler.hosts[-1] == f"media.test:{port}"


def test_private_networks_switch_also_opens_the_local_server(server):
    config = MediaConfig(allow_private_networks=True)
    assert fetch_media(f"{server}/img.png", config) == PNG


def test_byte_cap_stops_an_endless_stream_with_413(server):
    config = MediaConfig(allowed_domains=("127.0.0.1",), max_image_bytes=200_000)
    start = time.monotonic()
    with pytest.raises(MediaLimitError) as info:
        fetch_media(f"{server}/endless", config, modality="image")
    assert info.value.status == 413
    assert time.monotonic() - start < 3


def test_declared_length_over_the_cap_is_refused_before_reading(server):
    with pytest.raises(MediaLimitError) as info:
        fetch_media(f"{server}/declared-huge", LOCAL)
    assert info.value.status == 413


def test_stalled_server_times_out_with_a_4xx(server):
    config = MediaConfig(allowed_domains=("127.0.0.1",), read_timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(MediaFetchError, match="timed out") as info:
        fetch_media(f"{server}/stall", config)
    assert time.monotonic() - start < 2
    assert_clean(info.value)


def test_trickling_server_hits_the_overall_deadline(server):
    config = MediaConfig(allowed_domains=("127.0.0.1",), read_timeout_s=1, fetch_deadline_s=0.5)
    start = time.monotonic()
    with pytest.raises(MediaFetchError, match="took too long|timed out"):
        fetch_media(f"{server}/trickle", config)
    assert time.monotonic() - start < 2


def test_wrong_content_type_is_refused(server):
    with pytest.raises(MediaFetchError, match="content type"):
        fetch_media(f"{server}/html", LOCAL)
    with pytest.raises(MediaFetchError, match="content type"):
        fetch_media(f"{server}/img.png", LOCAL, modality="video")


def test_error_status_is_reported_without_details(server):
    with pytest.raises(MediaFetchError, match="HTTP 404") as info:
        fetch_media(f"{server}/missing", LOCAL)
    assert_clean(info.value)


def test_closed_port_is_a_clean_connection_error():
    with pytest.raises(MediaFetchError, match="connection failed") as info:
        fetch_media("http://127.0.0.1:1/img.png", LOCAL)
    assert_clean(info.value)


def test_redirects_are_refused_by_default(server):
    with pytest.raises(MediaFetchError, match="redirects are not followed"):
        fetch_media(f"{server}/redirect", LOCAL)


def test_enabled_redirects_are_followed_and_every_hop_is_rechecked(server):
    config = MediaConfig(allowed_domains=("127.0.0.1",), max_redirects=2)
    assert fetch_media(f"{server}/redirect", config) == PNG
    before = len(_Handler.requests)
    with pytest.raises(MediaFetchError, match="not in the allowed domain list"):
        fetch_media(f"{server}/redirect-private", config)
    assert _Handler.requests[before:] == ["/redirect-private"]
    with pytest.raises(MediaFetchError, match="too many redirects"):
        fetch_media(f"{server}/loop", config)


# ---------- SSRF: judged without connecting ----------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://10.1.2.3/",
        "http://172.16.0.1/",
        "http://192.168.1.1/",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/",
        "http://100.64.0.1/",
        "http://[::1]/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://[::]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[64:ff9b::7f00:1]/",
        "http://[2002:7f00:1::]/",
        "http://127.0.0.1./",
        "https://192.168.0.1:8443/x",
        "http://[fec0::1]/",  # deprecated site-local
    ],
)
def test_non_public_ip_literals_are_refused_without_dns(url):
    with pytest.raises(MediaFetchError) as info:
        fetch_media(url, MediaConfig(), resolver=no_dns)
    assert info.value.status == 400
    # Refused for what the address is (a failed connection would be a 400 too).
    assert "non-public address" in info.value.message
    assert_clean(info.value)


def test_port_zero_is_refused_not_fetched_as_the_default_port():
    resolver = stub_dns({"img.example": [PUBLIC_IP]})
    with pytest.raises(MediaFetchError, match="port is not valid"):
        fetch_media("http://img.example:0/a.png", MediaConfig(), resolver=resolver)


@pytest.mark.parametrize(
    "url",
    [
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://0x7f.0.0.1/",
        "http://127.1/",
        "http://0x7f000001/",
    ],
)
def test_decimal_octal_hex_and_short_ip_forms_are_refused(url):
    with pytest.raises(MediaFetchError, match="dotted-quad"):
        fetch_media(url, MediaConfig(allow_private_networks=True), resolver=no_dns)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pass@img.example/a.png",
        f"http://{PUBLIC_IP}@127.0.0.1/",
        "http://img.example\\@127.0.0.1/",
        "http://img.example%5C@127.0.0.1/",
        "http://img.example /a.png",
        "http://img.exämple/a.png",
        "ftp://img.example/a.png",
        "gopher://127.0.0.1:6379/_INFO",
        "http:///a.png",
        "http://img.example:99999/",
        "http://-bad-.example/",
    ],
)
def test_userinfo_backslash_and_malformed_urls_are_refused(url):
    resolver = stub_dns({"img.example": [PUBLIC_IP]})
    with pytest.raises(MediaFetchError) as info:
        fetch_media(url, MediaConfig(allowed_domains=("img.example",)), resolver=resolver)
    assert_clean(info.value)


@pytest.mark.parametrize(
    ("addresses", "refused"),
    [
        (["10.0.0.5"], True),
        (["169.254.169.254"], True),
        (["::1"], True),
        (["fd12::3"], True),
        (["::ffff:192.168.0.1"], True),
        ([PUBLIC_IP, "127.0.0.1"], True),
        ([PUBLIC_IP], False),
        (["2606:4700::1111"], False),
    ],
)
def test_host_names_are_judged_by_every_resolved_address(addresses, refused):
    resolver = stub_dns({"media.example": addresses, "media.example.": addresses})
    for url in ("http://media.example/a.png", "http://MEDIA.example./a.png"):
        if refused:
            with pytest.raises(MediaFetchError, match="non-public"):
                check_url(url, MediaConfig(), resolver)
        else:
            target = check_url(url, MediaConfig(), resolver)
            assert target.address == addresses[0]  # the address the socket will use
            assert target.host == "media.example" and target.host_header == "media.example"


def test_domain_allowlist_admits_only_listed_hosts_which_may_be_private():
    resolver = stub_dns(
        {"img.example": ["10.0.0.5"], "cdn.img.example": ["10.0.0.6"], "evil.example": [PUBLIC_IP]}
    )
    exact = MediaConfig(allowed_domains=("img.example",))
    assert check_url("http://img.example/a", exact, resolver).address == "10.0.0.5"
    for url in ("http://evil.example/a", "http://cdn.img.example/a"):
        with pytest.raises(MediaFetchError, match="allowed domain list"):
            check_url(url, exact, resolver)
    wildcard = MediaConfig(allowed_domains=("*.img.example",))
    assert check_url("http://cdn.img.example/a", wildcard, resolver).address == "10.0.0.6"


def test_unresolvable_host_is_a_clean_400():
    def fail(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    with pytest.raises(MediaFetchError, match="did not resolve"):
        check_url("http://nowhere.example/", MediaConfig(), fail)


def test_public_address_classifier_unwraps_embedded_ipv4():
    import ipaddress

    assert is_public_address(ipaddress.ip_address(PUBLIC_IP))
    assert is_public_address(ipaddress.ip_address(f"::ffff:{PUBLIC_IP}"))
    assert not is_public_address(ipaddress.ip_address("::ffff:10.0.0.1"))
    assert not is_public_address(ipaddress.ip_address("224.0.0.1"))


def test_unsupported_schemes_are_refused():
    for url in ("gopher://x/", "javascript:alert(1)", "", "/etc/passwd", "C:\\x.png"):
        with pytest.raises(MediaFetchError):
            fetch_media(url, MediaConfig())


# ---------- data: URLs ----------


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def test_data_url_decodes_within_limits():
    assert fetch_media(data_url(PNG), MediaConfig(), modality="image") == PNG


@pytest.mark.parametrize(
    ("url", "error", "status"),
    [
        ("data:image/png;base64,@@@not-base64@@@", MediaDecodeError, 400),
        ("data:image/png;base64,AAA", MediaDecodeError, 400),
        ("data:image/png;base64,QUJD\nREVG", MediaDecodeError, 400),  # no line breaks
        ("data:image/png;base64,QUJD\u00e9", MediaDecodeError, 400),  # non-ASCII
        ("data:image/png,rawbytes", MediaFetchError, 400),
        ("data:text/html;base64,PGh0bWw+", MediaFetchError, 400),
        ("data:;base64,AAAA", MediaFetchError, 400),
        ("data:image/png;base64", MediaFetchError, 400),
        (data_url(b"x" * 1000), MediaLimitError, 413),
        (data_url(b"x" * 10, "video/mp4"), MediaFetchError, 400),
    ],
)
def test_bad_or_oversized_data_urls_are_refused(url, error, status):
    config = MediaConfig(max_image_bytes=500)
    with pytest.raises(error) as info:
        fetch_media(url, config, modality="image")
    assert info.value.status == status


def test_data_url_size_is_checked_before_base64_decoding(monkeypatch):
    import processors.sources as sources

    monkeypatch.setattr(sources.pybase64, "b64decode", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(MediaLimitError):
        fetch_media(
            "data:image/png;base64," + "A" * 4000,
            MediaConfig(max_image_bytes=1000),
            modality="image",
        )


# ---------- file: URLs ----------


@pytest.fixture
def media_dir(tmp_path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "img.png").write_bytes(PNG)
    (allowed / "sub").mkdir()
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", allowed / "link.png")
    os.symlink(tmp_path, allowed / "dirlink")
    return allowed


def test_file_urls_are_off_by_default(media_dir):
    with pytest.raises(MediaFetchError, match="disabled"):
        fetch_media(f"file://{media_dir}/img.png", MediaConfig())


def test_file_url_inside_the_allowed_directory_is_read(media_dir):
    config = MediaConfig(allowed_local_paths=(str(media_dir),))
    assert fetch_media(f"file://{media_dir}/img.png", config) == PNG
    assert fetch_media(f"file://{media_dir}/sub/../img.png", config) == PNG


@pytest.mark.parametrize(
    "suffix",
    [
        "/../secret.txt",
        "/sub/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/link.png",
        "/dirlink/secret.txt",
    ],
)
def test_dotdot_and_symlink_escapes_are_refused_without_naming_the_path(media_dir, suffix):
    config = MediaConfig(allowed_local_paths=(str(media_dir),))
    with pytest.raises(MediaFetchError, match="outside the directories") as info:
        fetch_media(f"file://{media_dir}{suffix}", config)
    assert str(media_dir) not in info.value.message
    assert_clean(info.value)


def test_missing_directories_hosts_and_oversized_files_are_refused(media_dir):
    config = MediaConfig(allowed_local_paths=(str(media_dir),), max_image_bytes=10)
    with pytest.raises(MediaFetchError, match="could not be opened"):
        fetch_media(f"file://{media_dir}/nope.png", config)
    with pytest.raises(MediaFetchError, match="not a regular file"):
        fetch_media(f"file://{media_dir}/sub", config)
    with pytest.raises(MediaFetchError, match="file:///"):
        fetch_media(f"file://otherhost{media_dir}/img.png", config)
    with pytest.raises(MediaLimitError) as info:
        fetch_media(f"file://{media_dir}/img.png", config, modality="image")
    assert info.value.status == 413


# ---------- TLS ----------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory) -> Iterator[tuple[int, list[str]]]:
    """A TLS server with a self-signed certificate; records the SNI names it is sent."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not available")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=media.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    names: list[str] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda sslsock, name, ctx: names.append(name)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)

    def serve() -> None:
        for _ in range(4):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with contextlib.suppress(OSError, ssl.SSLError):
                context.wrap_socket(conn, server_side=True).close()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], names
    listener.close()


def test_https_sends_the_approved_host_as_sni_and_verifies_the_certificate(tls_server):
    port, names = tls_server
    config = MediaConfig(allowed_domains=("media.test",))
    resolver = stub_dns({"media.test": ["127.0.0.1"]})
    with pytest.raises(MediaFetchError, match="TLS verification failed") as info:
        fetch_media(f"https://media.test:{port}/img.png", config, resolver=resolver)
    assert names == ["media.test"]
    assert_clean(info.value)

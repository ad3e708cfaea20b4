"""Remote image URLs (``--allow-remote-images``) that do get fetched: the download, its size and time
limits, HTTP errors and redirects, against a local HTTP server. The address check is what keeps a
request off loopback, so here it is replaced by one that vets the test host as if it were public and
pins it to the local server; tests/test_serve.py checks that real private addresses are refused."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from llava_uhd.serve import image_urls
from llava_uhd.serve.limits import ApiError, ServerLimits
from serve_helpers import png_bytes

PNG = png_bytes(320, 200, (200, 30, 30))
HOST = "images.example.org"
PARAM = "messages.0.content.0.image_url.url"


class _Handler(http.server.BaseHTTPRequestHandler):
    seen_hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        _Handler.seen_hosts.append(self.headers["Host"])
        if self.path == "/ok.png":
            self._send(200, PNG)
        elif self.path == "/big.png":
            self._send(200, PNG + b"\0" * 50_000)
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):  # a trickle: each chunk in time, the whole too slow
                self.wfile.write(PNG[:64])
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/stall":  # nothing at all until long after the limit
            time.sleep(2.5)
            self._send(200, PNG)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1/secret")
            self.end_headers()
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def pinned(monkeypatch):
    """The test host passes the address check and connects to the local server."""
    vetted: list[str] = []

    def fake(host: str, port: int, param: str) -> str:
        vetted.append(host)
        return "127.0.0.1"

    monkeypatch.setattr(image_urls, "public_address", fake)
    return vetted


def _fetch(port: int, path: str, **limits: float) -> bytes:
    settings = ServerLimits(**{"max_image_bytes": 20_000, "remote_timeout_s": 1.0, **limits})
    return image_urls.image_bytes(f"http://{HOST}:{port}{path}", PARAM, settings, allow_remote=True)


def _refusal(port: int, path: str, **limits: float) -> ApiError:
    with pytest.raises(ApiError) as caught:
        _fetch(port, path, **limits)
    assert caught.value.status == 400 and caught.value.param == PARAM
    assert "\n" not in caught.value.message
    return caught.value


def test_a_public_image_is_fetched_whole_with_its_host_header(port, pinned):
    assert _fetch(port, "/ok.png") == PNG
    assert pinned == [HOST]
    assert _Handler.seen_hosts[-1] == f"{HOST}:{port}"


def test_an_image_over_the_size_limit_is_refused_while_it_downloads(port, pinned):
    error = _refusal(port, "/big.png")
    assert error.code == "limit_exceeded" and "--max-image-mb" in error.message


def test_a_download_over_the_time_limit_is_refused(port, pinned):
    start = time.monotonic()
    error = _refusal(port, "/slow.png", remote_timeout_s=0.5)
    assert error.code == "remote_image_timeout" and "--remote-timeout" in error.message
    assert time.monotonic() - start < 1.8  # stopped near the limit, not after the whole trickle


def test_a_server_that_sends_nothing_is_cut_off_at_the_limit(port, pinned):
    start = time.monotonic()
    assert _refusal(port, "/stall", remote_timeout_s=0.5).code == "remote_image_timeout"
    assert time.monotonic() - start < 1.8


def test_http_errors_and_redirects_are_not_followed(port, pinned):
    assert _refusal(port, "/missing.png").code == "remote_image_failed"
    moved = _refusal(port, "/moved")
    assert moved.code == "remote_image_failed" and "302" in moved.message
    assert _Handler.seen_hosts.count(f"{HOST}:{port}") >= 2  # the redirect target was never asked


def test_a_public_address_literal_passes_the_check_and_private_ones_do_not():
    assert image_urls.public_address("93.184.216.34", 80, PARAM) == "93.184.216.34"
    assert image_urls.public_address("2606:4700::6810:85e5", 443, PARAM) == "2606:4700::6810:85e5"
    for private in ("127.0.0.1", "10.0.0.7", "192.168.1.1", "169.254.169.254", "::ffff:127.0.0.1", "fe80::1"):
        with pytest.raises(ApiError) as caught:
            image_urls.public_address(private, 80, PARAM)
        assert caught.value.code == "remote_image_refused", private

"""An ``image_url`` of a request -> the image's encoded bytes, without ever reading a server file.

``data:`` URLs carry base64 PNG, JPEG, WebP or GIF bytes. ``http(s)`` URLs are fetched only when the
operator turns them on, within a size and a time limit, and only from public addresses: the host is
resolved once, every address it resolves to must be public (no loopback, link-local, private, multicast or
reserved range), and the connection goes to that vetted address (a second lookup could answer
differently). Redirects are not followed. ``file://`` URLs and paths are always refused.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
from urllib.parse import urlsplit

from llava_uhd.serve.limits import ApiError, ServerLimits, bad_request, over_limit

# The four formats the OpenAI API takes, by their leading bytes (PNG, JPEG/JFIF, GIF 87a/89a, RIFF WebP).
_MEDIA_TYPES = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
_READ_CHUNK = 64 * 1024


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG, GIF or WEBP from the first bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def image_bytes(url: str, param: str, limits: ServerLimits, allow_remote: bool) -> bytes:
    """The encoded image ``url`` names; ``param`` locates it in the request for error messages."""
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        data = _data_url(url, param, limits)
    elif scheme in ("http", "https"):
        if not allow_remote:
            raise bad_request(
                "remote image URLs are turned off on this server (the operator enables them with "
                "--allow-remote-images); send the image as a base64 data URL",
                param,
                "remote_images_disabled",
            )
        data = fetch_remote(url, param, limits)
    else:
        raise bad_request(
            "an image_url must be a data: URL (or http(s) where the server allows it); "
            "file URLs and paths are refused",
            param,
            "unsupported_url",
        )
    if not data:
        raise bad_request("the image is empty (0 bytes)", param, "invalid_image")
    if sniff_format(data) is None:
        raise bad_request("the image is not a PNG, JPEG, WebP or GIF file", param, "invalid_image")
    return data


def _data_url(url: str, param: str, limits: ServerLimits) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    fields = [f.strip().lower() for f in header.split(";")]
    if not comma or "base64" not in fields[1:]:
        raise bad_request("a data URL must be data:image/<type>;base64,<data>", param, "invalid_data_url")
    if fields[0] not in _MEDIA_TYPES:
        raise bad_request(
            f"data URL media type {fields[0]!r} is not one of image/png, image/jpeg, image/webp, image/gif",
            param,
            "invalid_data_url",
        )
    # base64 takes 4 characters per 3 bytes: refuse an oversized image before decoding it
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise over_limit(
            "the image size in bytes", len(payload) // 4 * 3, limits.max_image_bytes, "--max-image-mb", param
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"the data URL's base64 is malformed ({exc})", param, "invalid_base64") from None
    if len(data) > limits.max_image_bytes:
        raise over_limit(
            "the image size in bytes", len(data), limits.max_image_bytes, "--max-image-mb", param
        )
    return data


def public_address(host: str, port: int, param: str) -> str:
    """One address of ``host``, after checking that every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise bad_request(
            f"the image host {host!r} cannot be resolved ({exc})", param, "remote_image_failed"
        ) from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_global or ip.is_multicast:
            raise bad_request(
                f"the image host {host!r} resolves to {ip}, a non-public address; it is refused",
                param,
                "remote_image_refused",
            )
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_remote(url: str, param: str, limits: ServerLimits) -> bytes:
    """GET ``url`` from a public address within ``limits.max_image_bytes`` and ``limits.remote_timeout_s``.

    The time limit is one deadline for the whole exchange (connect, headers, body): a socket timeout
    alone bounds each read, and a server trickling a byte at a time would pass every one of them.
    """
    parts = urlsplit(url)
    if not parts.hostname or parts.username or parts.password:
        raise bad_request("a remote image URL needs a host and no credentials", param, "unsupported_url")
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    address = public_address(parts.hostname, port, param)
    kind = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    connection = kind(parts.hostname, address, port, limits.remote_timeout_s)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()

    def expire() -> None:  # unblocks a read in progress on the request thread
        expired.set()
        if connection.sock is not None:
            with contextlib.suppress(OSError):
                connection.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(limits.remote_timeout_s, expire)
    timer.start()
    try:
        connection.request("GET", target, headers={"User-Agent": "llava-uhd-serve", "Accept": "image/*"})
        response = connection.getresponse()
        if response.status != 200:
            raise bad_request(f"the image URL answered HTTP {response.status}", param, "remote_image_failed")
        chunks: list[bytes] = []
        size = 0
        while chunk := response.read1(_READ_CHUNK):  # what has arrived, not a full chunk
            if expired.is_set():  # on Linux a shut-down socket still reads what keeps arriving
                raise _timeout(limits, param)
            size += len(chunk)
            if size > limits.max_image_bytes:
                raise over_limit(
                    "the remote image size in bytes",
                    f"over {limits.max_image_bytes}",
                    limits.max_image_bytes,
                    "--max-image-mb",
                    param,
                )
            chunks.append(chunk)
        if expired.is_set():  # a read the shutdown unblocked ends as if the body were complete
            raise _timeout(limits, param)
    except TimeoutError:
        raise _timeout(limits, param) from None
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set():
            raise _timeout(limits, param) from None
        raise bad_request(
            f"the image URL could not be fetched ({exc})", param, "remote_image_failed"
        ) from None
    finally:
        timer.cancel()
        connection.close()
    return b"".join(chunks)


def _timeout(limits: ServerLimits, param: str) -> ApiError:
    return bad_request(
        f"the remote image took longer than this server's limit of {limits.remote_timeout_s} s "
        "(the operator sets it with --remote-timeout)",
        param,
        "remote_image_timeout",
    )

"""The HTTP side of the emulator: request parsing, Range, faults on the wire, dispatch.

:class:`Server` serves one :class:`Backend` (in practice the
:class:`~sly_emulator.Emulator`: its store, token, faults, counters); the REST handlers
themselves are in ``_api`` and ``_images``.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from sly_emulator import _api, _images
from sly_emulator._common import FileBody, Handler, Raw, Upload
from sly_emulator._faults import HEADER, Active, Faults
from sly_emulator._store import ApiError, Store, parse_multipart

logger = logging.getLogger(__name__)

API_PREFIX = "/public/api/v3/"
CONTROL_PREFIX = "/_emulator/"
CHUNK = 256 << 10
#: A JSON request body larger than this is refused (413): a 10,000-image bulk add is ~2 MB.
MAX_JSON_BYTES = 64 << 20
#: An unauthorized request's body is read and dropped up to this size (so the client sees
#: the 401); a bigger one is not read at all and the connection is closed.
MAX_DRAIN_BYTES = 1 << 20
IDLE_TIMEOUT_S = 120
METHODS: dict[str, Handler] = {**_api.REGISTRY.methods, **_images.REGISTRY.methods}
_RANGE = re.compile(r"bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


class Unsatisfiable(Exception):
    """A Range that selects no byte of the object (answered with 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The half-open ``[start, end)`` a single ``Range: bytes=...`` selects.

    None means "send the whole object": no header, or one this server ignores as RFC 9110
    allows (malformed, several ranges, ``last < first``). Raises :class:`Unsatisfiable`
    when the range is valid but starts past the end (or is the empty suffix ``-0``).
    """
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:  # suffix range: the last N bytes
        if int(last) == 0 or size == 0:
            raise Unsatisfiable
        return max(0, size - int(last)), size
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, min(int(last) + 1, size) if last else size


def _query_value(value: str) -> Any:
    if value.isdigit():
        return int(value)
    return {"true": True, "false": False}.get(value, value)


def _discard_uploads(body: Any) -> None:
    """Delete the temporary files of a request body that the handler did not keep."""
    if isinstance(body, Upload):
        body.path.unlink(missing_ok=True)
    elif isinstance(body, list):
        for part in body:
            if isinstance(part, tuple) and len(part) == 3 and isinstance(part[2], Path):
                part[2].unlink(missing_ok=True)


class Backend(Protocol):
    """What the HTTP side needs of the emulator that owns it.

    Declared here, so that the emulator builds its server and the server never imports
    the emulator back: requests flow down, from the wire to the store.
    """

    store: Store
    token: str
    faults: Faults

    def open_entry(
        self, method: str, status: int, range_header: str | None, faults: list[str], secs: float
    ) -> dict[str, Any]:
        """Log a request as answered (before its body goes out); returns its log entry."""
        ...

    def add_sent(self, entry: dict[str, Any], n: int) -> None:
        """Count ``n`` more body bytes sent for the request of ``entry``."""
        ...

    def control(self, path: str, body: Any) -> Any:
        """Answer one ``/_emulator/<path>`` control request."""
        ...

    def lock_for(self, method: str) -> contextlib.AbstractContextManager[Any]:
        """The lock a request of ``method`` runs under."""
        ...


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], emulator: Backend) -> None:
        super().__init__(address, _Handler)
        self.emulator = emulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-answer (the SDK closes a stream it only wanted the
        headers of) is routine, not a traceback on stderr."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            logger.debug("client %s went away: %r", client_address, exc)
        else:
            logger.exception("request from %s failed", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sly-emulator"
    # Headers and body go out in separate writes; with Nagle on, the body waits for the
    # client's delayed ACK (~40 ms per request on Linux).
    disable_nagle_algorithm = True
    # An idle keep-alive connection is closed after this, as real servers do; clients must
    # reopen (and a stuck client does not hold a thread forever).
    timeout = IDLE_TIMEOUT_S
    server: Server
    _status: int
    _method: str | None
    _faults: Active | None
    _entry: dict[str, Any] | None

    def setup(self) -> None:
        super().setup()
        self._reset = False
        self._start_request()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    def _start_request(self) -> None:
        self._status, self._method, self._faults, self._entry = 0, None, None, None
        self._began = time.monotonic()

    def send_response(self, code: int, message: str | None = None) -> None:
        """Also opens the request's log entry: before the client can see the answer, so
        ``stats()`` read right after a response already counts it."""
        self._status = code
        if self._method is not None:
            self._entry = self.server.emulator.open_entry(
                self._method,
                code,
                self.headers.get("Range"),
                self._faults.names() if self._faults else [],
                time.monotonic() - self._began,
            )
        super().send_response(code, message)

    def finish(self) -> None:
        """Close with RST instead of FIN when ``reset_mid_body`` fired."""
        try:
            super().finish()
        finally:
            if self._reset:
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()

    # ---- request bodies ---------------------------------------------------------------

    def _has_body(self) -> bool:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        return chunked or int(self.headers.get("Content-Length") or 0) > 0

    def _body_chunks(self) -> Iterator[bytes]:
        """The request body as it arrives: by Content-Length, or chunked (httpx sends an
        upload generator that way)."""
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))
            return
        while True:
            size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return
            yield from self._read_exactly(size)
            self.rfile.readline(16)

    def _read_exactly(self, remaining: int) -> Iterator[bytes]:
        while remaining > 0:
            chunk = self.rfile.read(min(CHUNK, remaining))
            if not chunk:
                raise ConnectionError("request body cut short")
            remaining -= len(chunk)
            yield chunk

    def _read_json_bytes(self) -> bytes:
        data = bytearray()
        for chunk in self._body_chunks():
            data += chunk
            if len(data) > MAX_JSON_BYTES:
                self.close_connection = True
                raise ApiError(413, "request body too large")
        return bytes(data)

    def _save_body(self) -> Path:
        path = self.server.emulator.store.new_upload_path()
        with open(path, "wb") as f:
            for chunk in self._body_chunks():
                f.write(chunk)
        return path

    def _request_body(self, query: dict[str, str]) -> Any:
        """Parsed body: multipart parts, an :class:`Upload`, JSON, or the query string."""
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/"):
            try:
                return parse_multipart(
                    self._body_chunks(), content_type, self.server.emulator.store
                )
            except ApiError:
                self.close_connection = True  # the rest of the body is not read
                raise
        if content_type.startswith("application/octet-stream"):
            return Upload(self._save_body())
        raw = self._read_json_bytes()
        from_query = {k: _query_value(v) for k, v in query.items()}
        if not raw.strip():
            return from_query
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "request body is not valid JSON") from None
        return {**from_query, **body} if isinstance(body, dict) else body

    def _drop_body(self) -> None:
        """Leave the connection usable after an early answer, or mark it for closing."""
        if not self._has_body():
            return
        length = int(self.headers.get("Content-Length") or 0)
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower() or (
            length > MAX_DRAIN_BYTES
        ):
            self.close_connection = True
            return
        for _ in self._read_exactly(length):
            pass

    # ---- answers ----------------------------------------------------------------------

    def _authorized(self) -> bool:
        given = self.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.server.emulator.token.encode())

    def _send_json(self, status: int, value: Any, faults: Active | None = None) -> None:
        data = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        cut = faults is not None and faults.cuts_body
        self._write(data[: len(data) // 2] if cut else data)
        if cut and faults is not None:
            self._cut(faults)

    def _write(self, data: bytes) -> None:
        if self._entry is not None:  # counted first, for the same reason
            self.server.emulator.add_sent(self._entry, len(data))
        self.wfile.write(data)

    def _cut(self, faults: Active) -> None:
        """End the connection mid-body: RST for ``reset_mid_body``, FIN for ``short_body``."""
        self.wfile.flush()
        self.close_connection = True
        self._reset = faults.reset_mid_body

    def _send_raw(self, result: Raw, faults: Active) -> None:
        self.send_response(200)
        self.send_header("Content-Type", result.content_type)
        self.send_header("Content-Length", str(len(result.data)))
        self.end_headers()
        data = result.data
        self._write(data[: len(data) // 2] if faults.cuts_body else data)
        if faults.cuts_body:
            self._cut(faults)

    def _send_file(self, body: FileBody, faults: Active) -> None:
        range_header = self.headers.get("Range")
        if self.headers.get("If-None-Match") == body.etag and not range_header:
            self.send_response(304)
            self.send_header("ETag", body.etag)
            self.end_headers()
            return
        try:
            span = None if faults.ignore_range else parse_range(range_header, body.size)
        except Unsatisfiable:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{body.size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = span or (0, body.size)
        self.send_response(200 if span is None else 206)
        self.send_header("Content-Type", body.content_type)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", body.etag)
        self.send_header("Content-Length", str(end - start))
        if span is not None:
            shift = 1 if faults.wrong_content_range else 0
            self.send_header(
                "Content-Range", f"bytes {start + shift}-{end - 1 + shift}/{body.size}"
            )
        self.end_headers()
        self._stream(body, start, end, faults)

    def _stream(self, body: FileBody, start: int, end: int, faults: Active) -> None:
        """Copy ``[start, end)`` of the object from disk in chunks (never whole)."""
        stop = start + (end - start) // 2 if faults.cuts_body else end
        with open(body.path, "rb") as f:
            f.seek(body.offset + start)
            pos = start
            while pos < stop:
                chunk = f.read(min(CHUNK, stop - pos))
                if not chunk:
                    break
                self._write(chunk)
                pos += len(chunk)
        if stop < end:
            self._cut(faults)

    # ---- dispatch ---------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self._start_request()
        path = urlsplit(self.path).path
        if path.startswith(CONTROL_PREFIX):
            self._control(path)
        elif path.startswith(API_PREFIX):
            self._api(path[len(API_PREFIX) :])
        else:
            self._drop_body()
            self._send_json(404, {"error": "not found", "details": {"message": "not found"}})

    def _control(self, path: str) -> None:
        emulator = self.server.emulator
        if not self._authorized():
            self._drop_body()
            self._send_json(401, {"error": "Unauthorized"})
            return
        try:
            body = json.loads(self._read_json_bytes() or b"{}")
            answer = emulator.control(path[len(CONTROL_PREFIX) :], body)
        except (ValueError, TypeError) as exc:
            self._send_json(400, {"error": str(exc)})
            return
        except ApiError as exc:
            self._send_json(exc.status, exc.body())
            return
        self._send_json(200, answer)

    def _api(self, method: str) -> None:
        """Auth, faults, body, handler, answer."""
        self._method = method
        if not self._authorized():
            self._drop_body()  # never store what an unauthenticated client sends
            self._send_json(401, {"error": "Unauthorized", "details": {"message": "bad token"}})
            return
        try:
            faults = self.server.emulator.faults.for_request(method, self.headers.get(HEADER))
        except ValueError as exc:
            self._drop_body()
            self._send_json(400, {"error": str(exc), "details": {"message": str(exc)}})
            return
        self._faults = faults
        if faults.latency_ms:
            time.sleep(faults.latency_ms / 1000)
        try:
            self._answer(method, faults)
        except ApiError as exc:
            self._send_json(exc.status, exc.body())
        except ConnectionError:
            raise
        except Exception:
            logger.exception("%s failed", method)
            if self._status:  # the answer had begun: all the client can get is a cut
                self.close_connection = True
            else:
                self._send_json(500, {"error": "internal error in the emulator"})

    def _answer(self, method: str, faults: Active) -> None:
        handler = METHODS.get(method)
        if handler is None:
            self._drop_body()
            raise ApiError(404, f"method {method} is not emulated")
        query = dict(parse_qsl(urlsplit(self.path).query))
        body = self._request_body(query)
        try:
            if faults.fail_status is not None:  # after reading the body: keep-alive stays usable
                self._send_json(faults.fail_status, {"error": "injected failure"})
                return
            with self.server.emulator.lock_for(method):
                result = handler(self.server.emulator.store, body, query)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.debug("%s: bad request", method, exc_info=True)
            raise ApiError(400, f"bad request: {type(exc).__name__}: {exc}") from None
        finally:
            _discard_uploads(body)
        if isinstance(result, FileBody):
            self._send_file(result, faults)
        elif isinstance(result, Raw):
            self._send_raw(result, faults)
        else:
            self._send_json(200, result, faults)

"""HTTP for blobfs: one pooled session, bounded retries, and ranged reads that are checked.

Every byte that reaches a program passed :meth:`HttpRangeReader.read`'s checks: status 206
with a ``Content-Range`` equal to the range asked for, and exactly that many body bytes.
A server that ignores ``Range`` (200 with the whole object) still gives correct bytes: the
reader skips to the range in the stream and stops reading there, and logs that once.
Transient failures (connection errors, cut bodies, 429/5xx) are retried with exponential
backoff a bounded number of times; anything else (TLS errors included: they do not heal by
retrying) is a :class:`RemoteError` at once. Retries live inside the calling operation's
deadline (:mod:`blobfs.deadline`): each request's timeouts shrink to the time left, and a
retry that cannot fit is not started (:class:`~blobfs.errors.TimedOut`).

Connection failures are said in words a user can act on ("connection refused: URL",
"name not resolved: HOST", "TLS error ... use http://"), never as an exception class name.

The API token lives only in the session's headers: it is never part of a URL, a log line
or an exception message.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from blobfs import deadline
from blobfs.errors import AuthError, RangeNotSatisfiable, RemoteError, RemoteNotFound

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = (10.0, 60.0)
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
STREAM_CHUNK = 256 << 10
#: Bytes of a file read at a time while it uploads (one buffer, reused).
UPLOAD_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying (wraps the reason)."""


def _settle_environment(session: requests.Session, url: str) -> None:
    """Read the proxy and CA bundle settings of the environment once, for the one server
    this session talks to, instead of at every request.

    With ``trust_env`` (requests' default) every request scans the whole environment for
    proxies and ``stat`` s the netrc files and the CA bundle: a large share of the CPU of a
    small request, paid hundreds of times by one listing. The settings a user gives
    (``HTTPS_PROXY``/``NO_PROXY``, ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``) keep their
    effect; a netrc entry is no longer sent as a Basic ``Authorization`` header (the API
    token is the credential).
    """
    session.proxies.update(requests.utils.get_environ_proxies(url))
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False


class HttpClient:
    """A ``requests.Session`` for one server: auth header, pool, retries, timeouts."""

    def __init__(
        self,
        server: str,
        token: str,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        pool_size: int = 32,
        timeout_s: tuple[float, float] = DEFAULT_TIMEOUT_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base = server.rstrip("/") + "/public/api/v3/"
        self.server = server.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers["x-api-key"] = token
        self._session.headers["User-Agent"] = "blobfs"
        _settle_environment(self._session, self.base)
        self.requests = 0
        self.retried = 0
        self._count_lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    def _count(self, retried: bool = False) -> None:
        with self._count_lock:
            self.requests += 1
            self.retried += retried

    def with_retries(self, what: str, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until it succeeds, a permanent error, the retries run out, or the
        calling operation's deadline leaves no time for another try."""
        delay = self.backoff_s
        for n in range(self.retries + 1):
            deadline.check(what)
            try:
                return attempt()
            except _Transient as exc:
                if n == self.retries:
                    raise RemoteError(f"{what}: gave up after {n + 1} attempts: {exc}") from None
                left = deadline.remaining()
                if left is not None and left <= delay:
                    tries = f"{n + 1} attempt{'s' if n else ''}"
                    raise deadline.expired(what, f"{exc} ({tries})") from None
                logger.info("%s: %s; retry %d/%d in %.2f s", what, exc, n + 1, self.retries, delay)
                self._count(retried=True)
                self._sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def _timeouts(self, what: str) -> tuple[float, float]:
        """The (connect, read) timeouts of one request: the defaults, cut to the time left."""
        left = deadline.remaining()
        if left is None:
            return self.timeout_s
        if left <= 0:
            raise deadline.expired(what)
        return (min(self.timeout_s[0], left), min(self.timeout_s[1], left))

    def _connection_failure(self, exc: requests.RequestException) -> Exception:
        """A connection error as a retryable or permanent error saying what happened."""
        message, transient = describe_connection_error(exc, self.server)
        return _Transient(message) if transient else RemoteError(message)

    def _send(
        self, method: str, payload: dict[str, Any], headers: dict[str, str] | None, stream: bool
    ) -> requests.Response:
        timeout = self._timeouts(method)
        self._count()
        try:
            response = self._session.post(
                self.base + method,
                json=payload,
                headers=headers,
                timeout=timeout,
                stream=stream,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._connection_failure(exc) from None
        except requests.RequestException as exc:
            raise RemoteError(f"{method}: {type(exc).__name__}") from None
        if response.status_code in TRANSIENT_STATUS:
            response.close()
            raise _Transient(f"HTTP {response.status_code}")
        return response

    def post_json(self, method: str, payload: dict[str, Any]) -> Any:
        """POST ``payload`` to an API method and return the decoded JSON answer."""

        def attempt() -> Any:
            response = self._send(method, payload, None, stream=True)
            try:
                check_status(method, response)
                body = _read_body(response)
            finally:
                response.close()
            try:
                return json.loads(body)
            except ValueError:
                raise _Transient("answer is not JSON") from None

        return self.with_retries(method, attempt)

    def post_multipart(
        self, method: str, fields: dict[str, str], file: tuple[str, str, str | UploadContent]
    ) -> Any:
        """POST a multipart form with one file streamed from disk; returns the JSON answer.

        The file goes out in chunks read into one buffer (:class:`MultipartFileBody`), not
        as a body built in memory: a blob is as large as a batch, and requests' own encoding
        would hold it in memory two or three times over, memory the machine has to find
        for each upload."""
        field_name, file_name, source = file
        name = method.split("?")[0]

        def attempt() -> Any:
            with MultipartFileBody(fields, field_name, file_name, source) as body:
                timeout = self._timeouts(name)
                self._count()
                try:
                    response = self._session.post(
                        self.base + method,
                        data=body,
                        headers={"Content-Type": body.content_type},
                        timeout=timeout,
                    )
                except (requests.ConnectionError, requests.Timeout) as exc:
                    raise self._connection_failure(exc) from None
            if response.status_code in TRANSIENT_STATUS:
                raise _Transient(f"HTTP {response.status_code}")
            check_status(name, response)
            try:
                return response.json()
            except ValueError:
                raise _Transient("answer is not JSON") from None

        return self.with_retries(name, attempt)

    def post_stream(
        self, method: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> requests.Response:
        """POST and return the streaming response (caller checks and closes it)."""
        return self._send(method, payload, headers, stream=True)


class UploadContent(Protocol):
    """A file's bytes made as they are sent (not read from one file): ``size`` of them,
    the same bytes each time it is iterated (a retried upload sends them again)."""

    size: int

    def __iter__(self) -> Iterator[bytes]: ...


class MultipartFileBody:
    """A ``multipart/form-data`` body of text fields and one file, read (from a path, or
    an :class:`UploadContent`) as it is sent.

    Its length is known before the first byte (the ``Content-Length`` requests sends), so
    exactly that many bytes are sent: a file that shrank meanwhile fails the request rather
    than leave the server waiting for bytes that never come. The head and tail around the
    file's bytes are urllib3's own encoding of the same form."""

    def __init__(
        self, fields: dict[str, str], field_name: str, file_name: str, source: str | UploadContent
    ) -> None:
        boundary = urllib3.filepost.choose_boundary()
        part = urllib3.fields.RequestField(field_name, b"", file_name)
        part.make_multipart(content_type="application/x-tar")
        encoded, self.content_type = urllib3.filepost.encode_multipart_formdata(
            [*fields.items(), part], boundary
        )
        self._tail = f"\r\n--{boundary}--\r\n".encode()
        if not encoded.endswith(self._tail):  # pragma: no cover - urllib3 changed its layout
            raise RemoteError("multipart encoding has an unexpected layout")
        self._head = encoded[: -len(self._tail)]
        self._file: io.FileIO | None = None
        self._content: UploadContent | None = None
        if isinstance(source, str):
            self._file = open(source, "rb", buffering=0)  # noqa: SIM115 - closed by __exit__
            self._size = os.fstat(self._file.fileno()).st_size
        else:
            self._content, self._size = source, source.size

    def __enter__(self) -> MultipartFileBody:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def __len__(self) -> int:
        return len(self._head) + self._size + len(self._tail)

    def __iter__(self) -> Iterator[bytes]:
        yield self._head
        yield from self._from_file() if self._content is None else self._checked(self._content)
        yield self._tail

    def _checked(self, content: UploadContent) -> Iterator[bytes]:
        sent = 0
        for chunk in content:
            sent += len(chunk)
            if sent > self._size:
                raise RemoteError("an upload's content grew while it was sent")
            yield chunk
        if sent != self._size:
            raise RemoteError("an upload's content shrank while it was sent")

    def _from_file(self) -> Iterator[bytes]:
        assert self._file is not None
        buffer = memoryview(bytearray(UPLOAD_CHUNK))
        left = self._size
        self._file.seek(0)
        while left > 0:
            got = self._file.readinto(buffer[: min(left, UPLOAD_CHUNK)])
            if not got:
                raise RemoteError(f"{self._file.name} shrank while it was uploaded")
            left -= got
            # sent (sendall) before the next read reuses the buffer; a view is as good as
            # bytes to the socket
            yield cast(bytes, buffer[:got])


def check_status(method: str, response: requests.Response) -> None:
    """Turn a non-2xx answer into the matching error (no body text: it may echo input)."""
    code = response.status_code
    if code < 300:
        return
    response.close()
    if code in (401, 403):
        raise AuthError(f"{method}: HTTP {code} (is the API token right?)")
    if code == 404:
        raise RemoteNotFound(f"{method}: HTTP 404 (not found on the server)")
    if code == 416:
        raise RangeNotSatisfiable(f"{method}: HTTP 416")
    raise RemoteError(f"{method}: HTTP {code}")


def safe_url(url: str) -> str:
    """``url`` without any ``user:password@`` part, for messages."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (requests -> urllib3 -> socket/ssl), each once."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
        todo.extend(a for a in e.args if isinstance(a, BaseException))


#: OpenSSL reasons that mean "this is not a TLS server" (plain HTTP on the port).
_PLAIN_HTTP_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "UNKNOWN_PROTOCOL")


def describe_connection_error(exc: BaseException, server: str) -> tuple[str, bool]:
    """``(message, transient)`` for a failure to reach ``server``.

    Refused connections and unresolved names may heal (a restart, a network coming up) and
    are retried; TLS errors do not heal by retrying. Messages name the URL or host (never
    a header, so never the token) and what to do where that is clear.
    """
    url = safe_url(server)
    host = urlsplit(server).hostname or server
    causes = list(_causes(exc))
    tls = next(
        (e for e in causes if isinstance(e, ssl.SSLError | requests.exceptions.SSLError)), None
    )
    if tls is not None:
        reason = next(
            (str(e.reason) for e in causes if isinstance(e, ssl.SSLError) and e.reason), ""
        )
        hint = ""
        if server.startswith("https://") and any(r in reason for r in _PLAIN_HTTP_REASONS):
            plain = "http://" + url.removeprefix("https://")
            hint = f"; the server may speak plain HTTP: use {plain}"
        return f"TLS error talking to {url}: {reason or type(tls).__name__}{hint}", False
    if any(isinstance(e, socket.gaierror) for e in causes) or any(
        type(e).__name__ == "NameResolutionError" for e in causes
    ):
        return f"name not resolved: {host}", True
    if any(isinstance(e, ConnectionRefusedError) for e in causes):
        return f"connection refused: {url}", True
    if isinstance(exc, requests.Timeout):
        return f"no answer from {url} in time ({type(exc).__name__})", True
    if any(isinstance(e, ConnectionResetError) for e in causes):
        return f"connection reset by {url}", True
    return f"cannot reach {url} ({type(exc).__name__})", True


class HttpRangeReader:
    """Ranged reads of one remote object fetched by an API method with a JSON payload."""

    _warned_ignore_range = False

    def __init__(
        self, client: HttpClient, method: str, payload: dict[str, Any], size: int, name: str
    ) -> None:
        self.client = client
        self.method = method
        self.payload = payload
        self.size = size
        self.name = name

    def read(self, start: int, end: int) -> bytes:
        if start < 0 or end > self.size or start > end:
            raise RangeNotSatisfiable(f"{self.name}: [{start}, {end}) outside {self.size} bytes")
        if start == end:
            return b""
        return self.client.with_retries(
            f"{self.method} {self.name}", lambda: self._attempt(start, end)
        )

    def close(self) -> None:
        """Nothing to release: the connections belong to the client (one per mount)."""

    def _attempt(self, start: int, end: int) -> bytes:
        headers = {"Range": f"bytes={start}-{end - 1}"}
        response = self.client.post_stream(self.method, self.payload, headers)
        try:
            check_status(self.method, response)
            if response.status_code == 206:
                self._check_content_range(response, start, end)
                return self._read_exact(response, end - start)
            if response.status_code == 200:
                return self._from_full_body(response, start, end)
            raise RemoteError(f"{self.method} {self.name}: unexpected HTTP {response.status_code}")
        finally:
            response.close()

    def _check_content_range(self, response: requests.Response, start: int, end: int) -> None:
        header = response.headers.get("Content-Range", "")
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if not match or (int(match.group(1)), int(match.group(2))) != (start, end - 1):
            raise _Transient(f"asked for bytes {start}-{end - 1}, got Content-Range {header!r}")
        total = match.group(3)
        if total != "*" and int(total) != self.size:
            raise RangeNotSatisfiable(
                f"{self.name}: object is {total} bytes, expected {self.size} (changed?)"
            )
        length = response.headers.get("Content-Length")
        if length is not None and int(length) != end - start:
            raise _Transient(f"Content-Length {length} for a range of {end - start}")

    def _read_exact(self, response: requests.Response, want: int) -> bytes:
        parts: list[bytes] = []
        got = 0
        try:
            for chunk in _chunks(response):
                parts.append(chunk)
                got += len(chunk)
                if got > want:
                    break
                _check_body_deadline()
        except (requests.RequestException, OSError) as exc:
            raise _Transient(f"body cut short ({type(exc).__name__})") from None
        if got != want:
            raise _Transient(f"body has {got} bytes, expected {want}")
        return b"".join(parts)

    def _from_full_body(self, response: requests.Response, start: int, end: int) -> bytes:
        if not HttpRangeReader._warned_ignore_range:
            HttpRangeReader._warned_ignore_range = True
            logger.warning(
                "%s ignores Range (200 with the whole object): reads stay correct "
                "but fetch more bytes",
                self.method,
            )
        length = response.headers.get("Content-Length")
        if length is not None and int(length) != self.size:
            raise RangeNotSatisfiable(
                f"{self.name}: whole body is {length} bytes, expected {self.size} (changed?)"
            )
        parts: list[bytes] = []
        pos = 0
        try:
            for chunk in _chunks(response):
                lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
                if lo < hi:
                    parts.append(chunk[lo:hi])
                pos += len(chunk)
                if pos >= end:
                    break
                _check_body_deadline()
        except (requests.RequestException, OSError) as exc:
            raise _Transient(f"body cut short ({type(exc).__name__})") from None
        data = b"".join(parts)
        if len(data) != end - start:
            raise _Transient(f"body ended at {pos} bytes before {end}")
        return data


def _chunks(response: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: each chunk is what one read of the socket gave (urllib3's
    ``read1``), so the deadline is checked between reads, not only after a whole chunk
    of ``STREAM_CHUNK`` bytes trickled in. Older urllib3 without ``read1``: fixed chunks."""
    read1 = getattr(response.raw, "read1", None)
    if read1 is None:
        yield from response.iter_content(STREAM_CHUNK)
        return
    while True:
        try:
            chunk = read1(STREAM_CHUNK, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise requests.ConnectionError(type(exc).__name__) from None
        if not chunk:
            return
        yield chunk


def _read_body(response: requests.Response) -> bytes:
    """The whole body, read in chunks so that a body trickling in cannot outlast the
    deadline (the socket timeout bounds each chunk, not the whole)."""
    parts: list[bytes] = []
    try:
        for chunk in _chunks(response):
            parts.append(chunk)
            _check_body_deadline()
    except (requests.RequestException, OSError) as exc:
        raise _Transient(f"body cut short ({type(exc).__name__})") from None
    return b"".join(parts)


def _check_body_deadline() -> None:
    """A body trickling in past the deadline is a transient failure (the retry loop then
    finds no time left and raises TimedOut); the socket timeout alone bounds each chunk."""
    left = deadline.remaining()
    if left is not None and left <= 0:
        raise _Transient("body still arriving when the deadline passed")

"""HTTP for blobfs: one pooled session, bounded retries, and ranged reads that are checked.

Every byte that reaches a program passed :meth:`HttpRangeReader.read`'s checks: status 206
with a ``Content-Range`` equal to the range asked for, and exactly that many body bytes.
A server that ignores ``Range`` (200 with the whole object) still gives correct bytes: the
reader skips to the range in the stream and stops reading there, and logs that once.
Transient failures (connection errors, cut bodies, 429/5xx) are retried with exponential
backoff a bounded number of times; anything else is a :class:`RemoteError` at once.

The API token lives only in the session's headers: it is never part of a URL, a log line
or an exception message.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from requests.adapters import HTTPAdapter

from blobfs.errors import AuthError, NotFound, RangeNotSatisfiable, RemoteError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = (10.0, 60.0)
DEFAULT_RETRIES = 5
DEFAULT_BACKOFF_S = 0.2
MAX_BACKOFF_S = 5.0
STREAM_CHUNK = 256 << 10
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying (wraps the reason)."""


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
        """Run ``attempt`` until it succeeds, a permanent error, or the retries run out."""
        delay = self.backoff_s
        for n in range(self.retries + 1):
            try:
                return attempt()
            except _Transient as exc:
                if n == self.retries:
                    raise RemoteError(f"{what}: gave up after {n + 1} attempts: {exc}") from None
                logger.info("%s: %s; retry %d/%d in %.2f s", what, exc, n + 1, self.retries, delay)
                self._count(retried=True)
                self._sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def _send(
        self, method: str, payload: dict[str, Any], headers: dict[str, str] | None, stream: bool
    ) -> requests.Response:
        self._count()
        try:
            response = self._session.post(
                self.base + method,
                json=payload,
                headers=headers,
                timeout=self.timeout_s,
                stream=stream,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Transient(type(exc).__name__) from None
        except requests.RequestException as exc:
            raise RemoteError(f"{method}: {type(exc).__name__}") from None
        if response.status_code in TRANSIENT_STATUS:
            response.close()
            raise _Transient(f"HTTP {response.status_code}")
        return response

    def post_json(self, method: str, payload: dict[str, Any]) -> Any:
        """POST ``payload`` to an API method and return the decoded JSON answer."""

        def attempt() -> Any:
            response = self._send(method, payload, None, stream=False)
            check_status(method, response)
            try:
                return response.json()
            except ValueError:
                raise _Transient("answer is not JSON") from None

        return self.with_retries(method, attempt)

    def post_multipart(
        self, method: str, fields: dict[str, str], file: tuple[str, str, str]
    ) -> Any:
        """POST a multipart form with one file streamed from disk; returns the JSON answer."""
        field_name, file_name, path = file
        name = method.split("?")[0]

        def attempt() -> Any:
            with open(path, "rb") as f:
                self._count()
                try:
                    response = self._session.post(
                        self.base + method,
                        data=fields,
                        files={field_name: (file_name, f, "application/x-tar")},
                        timeout=self.timeout_s,
                    )
                except (requests.ConnectionError, requests.Timeout) as exc:
                    raise _Transient(type(exc).__name__) from None
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


def check_status(method: str, response: requests.Response) -> None:
    """Turn a non-2xx answer into the matching error (no body text: it may echo input)."""
    code = response.status_code
    if code < 300:
        return
    response.close()
    if code in (401, 403):
        raise AuthError(f"{method}: HTTP {code} (is the API token right?)")
    if code == 404:
        raise NotFound(f"{method}: HTTP 404")
    if code == 416:
        raise RangeNotSatisfiable(f"{method}: HTTP 416")
    raise RemoteError(f"{method}: HTTP {code}")


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
            for chunk in response.iter_content(STREAM_CHUNK):
                parts.append(chunk)
                got += len(chunk)
                if got > want:
                    break
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
            for chunk in response.iter_content(STREAM_CHUNK):
                lo, hi = max(start - pos, 0), min(end - pos, len(chunk))
                if lo < hi:
                    parts.append(chunk[lo:hi])
                pos += len(chunk)
                if pos >= end:
                    break
        except (requests.RequestException, OSError) as exc:
            raise _Transient(f"body cut short ({type(exc).__name__})") from None
        data = b"".join(parts)
        if len(data) != end - start:
            raise _Transient(f"body ended at {pos} bytes before {end}")
        return data

"""Blob reads that stay ranged when the server's blob download ignores ``Range``.

``images.data.download`` is the call the SDK uses for a blob, but the SDK never sends it a
``Range``; whether a real instance honours one is unknown. If it answers a ranged request
with 200 and the whole blob, every small read would pull the blob up to the range. So a
blob's reads switch, once, at the first such answer:

1. to ``file-storage.download`` with ``Range`` (``{"teamId", "path"}``, the SDK's own
   ranged call, ``FileApi._download_async``), if the file's team and path are known;
2. if that also ignores ``Range`` or is refused, to one whole download of the blob into a
   private temporary file (in ``--cache-dir`` when given), from which every later read of
   that blob is served.

Each step checks its bytes as strictly as the first (``Content-Range`` equal to the range
asked for, the object's size unchanged), so a fallback never serves other bytes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from typing import IO, Any

import requests

from blobfs.errors import (
    AuthError,
    NotFound,
    RangeNotSatisfiable,
    RemoteError,
    RemoteNotFound,
)
from blobfs.transport.http import (
    STREAM_CHUNK,
    HttpClient,
    HttpRangeReader,
    _Transient,
    check_status,
)

logger = logging.getLogger(__name__)

_warned = False
_warn_lock = threading.Lock()


class RangeIgnored(RemoteError):
    """The server answered a ranged request with the whole object."""


class StrictRangeReader(HttpRangeReader):
    """A ranged reader that refuses a 200 answer instead of streaming up to the range."""

    def _from_full_body(self, response: requests.Response, start: int, end: int) -> bytes:
        if start == 0 and end == self.size:  # the whole object was asked for: 200 is right
            return super()._from_full_body(response, start, end)
        raise RangeIgnored(f"{self.method} {self.name}: the server ignores Range")


class WholeBlob:
    """A blob downloaded once (no ``Range``) into an unnamed temporary file, then pread."""

    def __init__(
        self,
        client: HttpClient,
        method: str,
        payload: dict[str, Any],
        size: int,
        name: str,
        folder: str | None = None,
    ) -> None:
        self.client, self.method, self.payload = client, method, payload
        self.size, self.name, self.folder = size, name, folder
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()

    def read(self, start: int, end: int) -> bytes:
        if start < 0 or end > self.size or start > end:
            raise RangeNotSatisfiable(f"{self.name}: [{start}, {end}) outside {self.size} bytes")
        with self._lock:  # the first reader downloads; the others wait for the file
            if self._file is None:
                self._file = self.client.with_retries(
                    f"{self.method} {self.name} (whole)", self._download
                )
            fd = self._file.fileno()
        data = os.pread(fd, end - start, start)
        if len(data) != end - start:
            raise RemoteError(f"{self.name}: local copy is short")
        return data

    def _download(self) -> IO[bytes]:
        if self.folder:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
        out = tempfile.TemporaryFile(dir=self.folder or None)  # noqa: SIM115 (kept open)
        try:
            response = self.client.post_stream(self.method, self.payload, {})
            try:
                check_status(self.method, response)
                got = 0
                try:
                    for chunk in response.iter_content(STREAM_CHUNK):
                        out.write(chunk)
                        got += len(chunk)
                        if got > self.size:
                            break
                except (requests.RequestException, OSError) as exc:
                    raise _Transient(f"body cut short ({type(exc).__name__})") from None
            finally:
                response.close()
            if got != self.size:
                raise RangeNotSatisfiable(
                    f"{self.name}: whole download has {got} bytes, expected {self.size}"
                )
            out.flush()
            return out
        except BaseException:
            out.close()
            raise

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class BlobReader:
    """Ranged reads of one blob that fall back as the module docstring says."""

    def __init__(
        self,
        primary: StrictRangeReader,
        secondary: StrictRangeReader | None,
        whole: WholeBlob,
    ) -> None:
        self.primary, self.secondary, self.whole = primary, secondary, whole
        self.size = primary.size
        self.name = primary.name
        #: 0: ``images.data.download``; 1: ``file-storage.download``; 2: the whole blob.
        self.mode = 0
        self._lock = threading.Lock()

    def read(self, start: int, end: int) -> bytes:
        if self.mode == 0:
            try:
                return self.primary.read(start, end)
            except RangeIgnored as exc:
                self._switch(1 if self.secondary is not None else 2, str(exc))
        if self.mode == 1:
            assert self.secondary is not None
            try:
                return self.secondary.read(start, end)
            except (RangeIgnored, NotFound, RemoteNotFound, AuthError, RangeNotSatisfiable) as exc:
                self._switch(2, str(exc))
        return self.whole.read(start, end)

    def _switch(self, mode: int, reason: str) -> None:
        global _warned
        with self._lock:
            if self.mode >= mode:
                return
            self.mode = mode
        how = (
            f"reading it with Range through {self.secondary.method}"
            if mode == 1 and self.secondary is not None
            else "downloading it once, whole, to a temporary file"
        )
        with _warn_lock:
            first, _warned = not _warned, True
        (logger.warning if first else logger.info)("%s (%s); %s", self.name, reason, how)

    def close(self) -> None:
        self.whole.close()

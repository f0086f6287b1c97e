"""An emulator of the Supervisely public REST API, for tests, benchmarks and demos.

    python -m blobfs.testing.emulator --state DIR --port PORT --token-file FILE

Serves ``/public/api/v3/<method>`` (the methods in :mod:`blobfs.testing._emu_api`) with the
token in ``x-api-key`` (401 without it), keeps its state in ``DIR`` (SQLite + files, so a
restart keeps everything), streams blob bytes with HTTP Range (206, 416, ``Content-Range``,
``ETag``), keeps connections alive and answers from many threads.

Faults, for every test that needs a misbehaving server, switchable for the whole run
(``Emulator.faults``, or ``POST /_emulator/faults``) and per request (header
``x-emulator-fault: latency_ms=5;ignore_range``):

=====================  ==============================================================
``latency_ms=N``       add N ms to every request
``fail_n=N``           the next N matching requests answer ``fail_status`` (500)
``fail_status=503``    status used by ``fail_n``
``reset_mid_body``     send half the body, then drop the connection
``short_body``         announce the full length, send less, close
``ignore_range``       answer 200 with the whole object
``wrong_content_range``  answer 206 with a Content-Range shifted by one byte
``scope=blob|all|M``   which requests the run-wide faults hit (default: blob downloads)
=====================  ==============================================================

Counters (per method, bytes sent) are in ``Emulator.stats()`` and ``GET /_emulator/stats``.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from blobfs.testing._emu_api import BLOB_METHODS, METHODS, FileBody, Raw, dumps
from blobfs.testing._emu_store import ApiError, Store, parse_multipart

logger = logging.getLogger(__name__)

API_PREFIX = "/public/api/v3/"
CHUNK = 256 << 10
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Faults:
    """Run-wide fault settings (see the module docstring)."""

    latency_ms: float = 0.0
    fail_n: int = 0
    fail_status: int = 500
    reset_mid_body: bool = False
    short_body: bool = False
    ignore_range: bool = False
    wrong_content_range: bool = False
    scope: str = "blob"
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def update(self, values: dict[str, Any]) -> None:
        with self._lock:
            for key, value in values.items():
                if key.startswith("_") or not hasattr(self, key):
                    raise ValueError(f"unknown fault {key!r}")
                setattr(self, key, type(getattr(self, key))(value))

    def snapshot(self) -> dict[str, Any]:
        """The current settings (without the lock)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def reset(self) -> None:
        self.update(Faults().snapshot())

    def for_request(self, method: str, header: str | None) -> dict[str, Any]:
        """The faults that apply to one request (run-wide ones in scope, plus its header)."""
        active: dict[str, Any] = {}
        in_scope = (
            self.scope == "all"
            or self.scope == method
            or (self.scope == "blob" and method in BLOB_METHODS)
        )
        with self._lock:
            if self.latency_ms:
                active["latency_ms"] = self.latency_ms
            if in_scope:
                if self.fail_n > 0:
                    self.fail_n -= 1
                    active["fail"] = self.fail_status
                for key in ("reset_mid_body", "short_body", "ignore_range", "wrong_content_range"):
                    if getattr(self, key):
                        active[key] = True
        for item in (header or "").split(";"):
            key, sep, value = item.strip().partition("=")
            if not key:
                continue
            if key == "fail_status":
                active["fail"] = int(value)
            else:
                active[key] = float(value) if sep else True
        return active


def _query_body(query: dict[str, str]) -> dict[str, Any]:
    """GET requests (the SDK's async downloads) carry their fields in the query string."""
    return {k: int(v) if v.isdigit() else v for k, v in query.items()}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        super().__init__(address, _Handler)
        self.emulator = emulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    # ---- plumbing ------------------------------------------------------------------

    def _send_json(self, status: int, value: Any) -> None:
        data = dumps(value)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.emulator._count_bytes(len(data))

    def _authorized(self) -> bool:
        given = self.headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.server.emulator.token.encode())

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        if self.path.startswith("/_emulator/"):
            self._control()
        elif self.path.rstrip("/") in ("", "/public/api"):
            self._send_json(200, {"emulator": "blobfs"})
        else:
            self._api()

    def do_POST(self) -> None:
        if self.path.startswith("/_emulator/"):
            self._control()
        else:
            self._api()

    def _control(self) -> None:
        emulator = self.server.emulator
        body = self._read_body()
        if not self._authorized():
            self._send_json(401, {"error": "unauthorized"})
            return
        path = urlsplit(self.path).path
        if path == "/_emulator/stats":
            self._send_json(200, emulator.stats())
        elif path == "/_emulator/stats/reset":
            emulator.reset_stats()
            self._send_json(200, {"success": True})
        elif path == "/_emulator/faults":
            try:
                if body:
                    emulator.faults.update(json.loads(body))
            except (ValueError, TypeError) as exc:
                self._send_json(400, {"error": str(exc)})
                return
            self._send_json(200, emulator.faults.snapshot())
        elif path == "/_emulator/faults/reset":
            emulator.faults.reset()
            self._send_json(200, {"success": True})
        else:
            self._send_json(404, {"error": "unknown control path"})

    # ---- the API ---------------------------------------------------------------------

    def _api(self) -> None:
        emulator = self.server.emulator
        parts = urlsplit(self.path)
        if not parts.path.startswith(API_PREFIX):
            self._read_body()
            self._send_json(404, {"error": "not found"})
            return
        method = parts.path[len(API_PREFIX) :]
        emulator._count(method)
        faults = emulator.faults.for_request(method, self.headers.get("x-emulator-fault"))
        if faults.get("latency_ms"):
            time.sleep(float(faults["latency_ms"]) / 1000)
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/"):
            body: Any = self._save_multipart(content_type)
        else:
            raw = self._read_body()
            body = None
        if not self._authorized():
            self._send_json(401, {"error": "Unauthorized", "details": {"message": "bad token"}})
            return
        if "fail" in faults:
            self._send_json(int(faults["fail"]), {"error": "injected failure"})
            return
        handler = METHODS.get(method)
        if handler is None:
            self._send_json(404, {"error": f"method {method} is not emulated"})
            return
        query = dict(parse_qsl(parts.query))
        try:
            if body is None:
                body = json.loads(raw) if raw else _query_body(query)
            result = handler(emulator.store, body, query)
        except ApiError as exc:
            self._send_json(exc.status, {"error": str(exc), "details": {"message": str(exc)}})
            return
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            self._send_json(400, {"error": f"bad request: {type(exc).__name__}: {exc}"})
            return
        self._answer(result, faults)

    def _answer(self, result: Any, faults: dict[str, Any]) -> None:
        if isinstance(result, FileBody):
            self._send_file(result, faults)
        elif isinstance(result, Raw):
            self.send_response(200)
            self.send_header("Content-Type", result.content_type)
            self.send_header("Content-Length", str(len(result.data)))
            self.end_headers()
            self.wfile.write(result.data)
            self.server.emulator._count_bytes(len(result.data))
        else:
            self._send_json(200, result)

    def _save_multipart(self, content_type: str) -> Any:
        emulator = self.server.emulator
        path = emulator.store.new_upload_path()
        remaining = int(self.headers.get("Content-Length") or 0)
        with open(path, "wb") as f:
            while remaining:
                chunk = self.rfile.read(min(CHUNK, remaining))
                if not chunk:
                    break
                f.write(chunk)
                remaining -= len(chunk)
        try:
            return parse_multipart(path, content_type, emulator.store)
        finally:
            path.unlink(missing_ok=True)

    def _send_file(self, body: FileBody, faults: dict[str, Any]) -> None:
        start, end = 0, body.size
        status = 200
        header = self.headers.get("Range")
        if header and not faults.get("ignore_range"):
            match = _RANGE.match(header.strip())
            first, last = (match.group(1), match.group(2)) if match else ("", "")
            if not match or (first == "" and last == ""):
                start, end = -1, -1
            elif first == "":
                start, end = max(0, body.size - int(last)), body.size
            else:
                start, end = int(first), min(int(last) + 1 if last else body.size, body.size)
            if start < 0 or start >= body.size or start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{body.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", body.content_type)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", body.etag)
        self.send_header("Content-Length", str(end - start))
        if status == 206:
            shown = (start + 1, end) if faults.get("wrong_content_range") else (start, end - 1)
            self.send_header("Content-Range", f"bytes {shown[0]}-{shown[1]}/{body.size}")
        self.end_headers()
        self._stream(body, start, end, faults)

    def _stream(self, body: FileBody, start: int, end: int, faults: dict[str, Any]) -> None:
        send_until = end
        if faults.get("reset_mid_body") or faults.get("short_body"):
            send_until = start + (end - start) // 2
        with open(body.path, "rb") as f:
            f.seek(body.offset + start)
            pos = start
            while pos < send_until:
                chunk = f.read(min(CHUNK, send_until - pos))
                if not chunk:
                    break
                self.wfile.write(chunk)
                pos += len(chunk)
                self.server.emulator._count_bytes(len(chunk))
        if send_until < end:
            self.wfile.flush()
            if faults.get("reset_mid_body"):
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
            self.close_connection = True


class Emulator:
    """The emulator as a Python object: ``with Emulator(dir, token) as emu: emu.url``."""

    def __init__(
        self, state_dir: str | os.PathLike[str], token: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.store = Store(state_dir)
        self.token = token
        self.faults = Faults()
        self._server = _Server((host, port), self)
        self._thread: threading.Thread | None = None
        self._counts: Counter[str] = Counter()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Emulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="blobfs-emulator", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _count(self, method: str) -> None:
        with self._lock:
            self._counts[method] += 1

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes += n

    def stats(self) -> dict[str, Any]:
        """Requests per method, total requests and body bytes sent since the last reset."""
        with self._lock:
            return {
                "requests": sum(self._counts.values()),
                "methods": dict(self._counts),
                "bytes_sent": self._bytes,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._counts.clear()
            self._bytes = 0


def start_process(
    state_dir: str | os.PathLike[str],
    token_file: str | os.PathLike[str],
    port: int = 0,
    latency_ms: float = 0.0,
) -> tuple[subprocess.Popen[str], str]:
    """Run the emulator as its own process (so it can be killed for real, and so its CPU
    does not share a GIL with the caller); returns (process, URL) once it listens."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blobfs.testing.emulator",
            "--state",
            str(state_dir),
            "--port",
            str(port),
            "--token-file",
            str(token_file),
            "--latency-ms",
            str(latency_ms),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return proc, line.split()[-1]


def _token(args: argparse.Namespace) -> str:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    token = args.token or os.environ.get("BLOBFS_EMULATOR_TOKEN")
    if not token:
        sys.exit("emulator: give --token, --token-file or BLOBFS_EMULATOR_TOKEN")
    return str(token)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m blobfs.testing.emulator", description="Emulated Supervisely REST API."
    )
    parser.add_argument("--state", required=True, help="state folder (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=None)
    parser.add_argument("--token-file", default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--reset", action="store_true", help="start from an empty state")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.reset:
        shutil.rmtree(args.state, ignore_errors=True)
    emulator = Emulator(args.state, _token(args), args.host, args.port)
    emulator.faults.update({"latency_ms": args.latency_ms, "scope": "all"})
    print(f"listening on {emulator.url}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        emulator.serve_forever()


if __name__ == "__main__":
    main()

"""An emulator of the Supervisely public REST API, for tests, benchmarks and demos.

    python -m sly_emulator --state DIR [--port PORT] --token-file FILE

(or ``--token TOKEN``, or the ``SLY_EMULATOR_TOKEN`` environment variable). It prints
``listening on http://HOST:PORT`` once ready; ``--port 0`` picks a free port.

Serves ``/public/api/v3/<method>`` (handlers in :mod:`sly_emulator._api` and
:mod:`sly_emulator._images`, HTTP in :mod:`sly_emulator._http`) with the
token in ``x-api-key`` (401 without it), keeps its state in ``DIR`` (SQLite + files, so
a restart keeps everything), streams file bytes with HTTP Range (206, 416,
``Content-Range``, ``ETag``), keeps connections alive and answers from many threads.
``docs/emulator.md`` says what is and is not emulated.

Faults (:mod:`sly_emulator._faults`) are set for the run through
``Emulator.faults`` or ``POST /_emulator/faults``, and per request by the header
``x-emulator-fault: latency_ms=5;ignore_range``. Counters and a log of recent requests
are in ``Emulator.stats()`` / ``request_log()`` and ``GET /_emulator/stats`` / ``log``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter, deque
from pathlib import Path
from types import FrameType
from typing import Any

from sly_emulator._faults import Faults
from sly_emulator._http import METHODS, Server, Unsatisfiable, parse_range
from sly_emulator._store import ApiError, Store

__all__ = ["METHODS", "Emulator", "Unsatisfiable", "main", "parse_range", "start_process"]

logger = logging.getLogger(__name__)

#: How many recent requests ``request_log()`` keeps.
LOG_SIZE = 10_000


class Emulator:
    """The emulator as a Python object::

        with Emulator(tmp_path / "state", token) as emu:
            api = sly.Api(emu.url, token)
            emu.faults.update({"fail_n": 2})
            emu.stats()["methods"]

    The server socket is bound at construction (so ``url`` is known); ``start()`` serves
    from a daemon thread, ``serve_forever()`` from the calling one.
    """

    def __init__(
        self, state_dir: str | os.PathLike[str], token: str, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if not token:
            raise ValueError("the emulator needs a non-empty token")
        self.store = Store(state_dir)
        self.token = token
        self.faults = Faults()
        try:
            self._server = Server((host, port), self)
        except OSError:
            self.store.close()
            raise
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._served = False
        self._lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._counts: Counter[str] = Counter()
        self._statuses: Counter[str] = Counter()
        self._bytes = 0
        self._log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    @property
    def url(self) -> str:
        """``http://HOST:PORT``, the SDK's ``server_address``."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def port(self) -> int:
        """The bound port (useful with ``port=0``)."""
        return int(self._server.server_address[1])

    def start(self) -> Emulator:
        """Serve from a daemon thread; returns self (``emu = Emulator(...).start()``)."""
        self._thread = threading.Thread(target=self.serve_forever, name="sly-emulator", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from the calling thread until ``stop()`` (or an exception there)."""
        self._served = True
        self._server.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        """Stop serving and release the state folder (safe to call twice)."""
        if self._stopped:
            return
        self._stopped = True
        if self._served:  # shutdown() waits for serve_forever: never call it without one
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(10)
        self._server.server_close()
        self.store.close()

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def lock_for(self, method: str) -> contextlib.AbstractContextManager[Any]:
        """Writes run one at a time (a bulk add checks names, then inserts); reads and
        downloads run in parallel."""
        reads = (".list", ".info", ".download", ".meta", "hashes.list", "instance.version")
        if method.endswith(reads):
            return contextlib.nullcontext()
        return self._write_lock

    # ---- counters ---------------------------------------------------------------------

    def open_entry(
        self, method: str, status: int, range_header: str | None, faults: list[str], secs: float
    ) -> dict[str, Any]:
        entry = {
            "method": method,
            "status": status,
            "bytes": 0,
            "range": range_header,
            "faults": faults,
            "ms": round(secs * 1000, 3),
        }
        with self._lock:
            self._counts[method] += 1
            self._statuses[str(status)] += 1
            self._log.append(entry)
        return entry

    def add_sent(self, entry: dict[str, Any], n: int) -> None:
        with self._lock:
            entry["bytes"] += n
            self._bytes += n

    def stats(self) -> dict[str, Any]:
        """Requests in total, per method and per status, and body bytes sent, since the
        last reset."""
        with self._lock:
            return {
                "requests": sum(self._counts.values()),
                "methods": dict(self._counts),
                "statuses": dict(self._statuses),
                "bytes_sent": self._bytes,
            }

    def request_log(self) -> list[dict[str, Any]]:
        """The last requests (oldest first): method, status, body bytes, Range header,
        faults that fired, milliseconds until the answer began."""
        with self._lock:
            return [dict(e) for e in self._log]

    def reset_stats(self) -> None:
        """Zero the counters and empty the request log (faults are left as they are)."""
        with self._lock:
            self._counts.clear()
            self._statuses.clear()
            self._bytes = 0
            self._log.clear()

    def control(self, path: str, body: Any) -> Any:
        """The ``/_emulator/<path>`` endpoints, for an emulator in another process."""
        if path == "stats":
            return self.stats()
        if path == "stats/reset":
            self.reset_stats()
            return {"success": True}
        if path == "log":
            return self.request_log()
        if path == "faults":
            if body:
                self.faults.update(body)
            return self.faults.snapshot()
        if path == "faults/reset":
            self.faults.reset()
            return self.faults.snapshot()
        raise ApiError(404, f"unknown control path {path!r}")


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
            "-P",
            "-m",
            "sly_emulator",
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
        proc.wait()
        raise RuntimeError(f"emulator did not start: {line!r}")
    return proc, line.split()[-1]


def _token(args: argparse.Namespace) -> str:
    """From ``--token-file``, ``--token`` or ``SLY_EMULATOR_TOKEN`` (first found)."""
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    else:
        token = args.token or os.environ.get("SLY_EMULATOR_TOKEN", "")
    if not token:
        sys.exit("emulator: give --token-file, --token or SLY_EMULATOR_TOKEN")
    return str(token)


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sly_emulator", description="Emulated Supervisely REST API."
    )
    parser.add_argument("--state", required=True, help="state folder (created if missing)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--token", default=None, help="prefer --token-file (argv is public)")
    parser.add_argument("--token-file", default=None)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument("--reset", action="store_true", help="start from an empty state")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    token = _token(args)
    if args.reset:
        shutil.rmtree(args.state, ignore_errors=True)
    emulator = Emulator(args.state, token, args.host, args.port)
    emulator.faults.update({"latency_ms": args.latency_ms})
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    print(f"listening on {emulator.url}", flush=True)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            emulator.serve_forever()
    finally:
        emulator.stop()


if __name__ == "__main__":
    main()

"""A remote batch's import run in a process of its own: the network part, off the daemon.

An import's Python (the HTTP client, the JSON of thousands of images and annotations,
the tar made as it uploads) holds the interpreter lock that every FUSE request of the
daemon needs, so a copy into the mount while a batch imports waits for it, although the
copy itself leaves most of a second CPU idle (it waits on round trips). One worker
process (``python -I -m blobfs.writeback.import_worker``, which imports blobfs only,
never the working directory), started with the mount and killed at unmount, runs each
batch's import instead, with the same code (:class:`~blobfs.writeback.remote.RemoteImporter`).

The daemon keeps the journal, the spool and every decision. The worker reads what the
batch holds durably (its manifest, the ranges of its ``data`` file, its links to staged
files) and does the requests; each step's result (packed, uploaded, registered, with the
ids) goes back to the daemon, which saves it in the batch's manifest before the worker
goes on, exactly where the in-process import saves it. So a crash of either process
anywhere leaves a manifest the in-process import resumes, as it resumes its own.

Everything the worker does is an optimisation: a worker that cannot start, dies, talks
nonsense or is still busy at its deadline is killed, and the batch (as far as the daemon
saved it) is imported in the daemon, as without it; the mount then imports in the
daemon until it ends. An error the import itself reports (the server refused, the
network is down) is the import's failure, retried by the queue as always.

Protocol, one JSON object a line. The daemon writes ``{"server", "token", "concurrency",
"project"}`` first (the token only ever goes over this pipe: never argv, the
environment or a log), then ``{"batch": id}`` per import. The worker answers each batch
with ``{"save": fields}`` per step, each acknowledged by ``{"saved": true}`` once the
manifest is durable, then ``{"done": true}`` or ``{"failed": message}``; ``{"log":
message}`` lines carry its log. It exits when its stdin ends: a daemon killed with
``kill -9`` takes its worker down.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from blobfs.credentials import TOKEN_ENV
from blobfs.errors import RemoteError
from blobfs.failpoints import ENV as FAILPOINT_ENV
from blobfs.failpoints import failpoint
from blobfs.format.pack import InlineFile, open_source
from blobfs.writeback.importer import Importer, split_batch
from blobfs.writeback.spool import Batch, Spool

logger = logging.getLogger(__name__)

#: A batch the worker has not finished after this long is taken back by the daemon.
BATCH_DEADLINE_S = 1800.0
#: Crash point of the worker, before each batch (the fallback tests).
FAILPOINT = "import-worker"
#: Seconds of ``BATCH_DEADLINE_S`` a mount uses instead, when set (the fallback tests).
DEADLINE_ENV = "BLOBFS_IMPORT_WORKER_DEADLINE_S"
#: The crash points the daemon passes before and after saving each step (by the state it
#: reaches): where the in-process import passes them, so the crash tests hold either way.
_STEP_POINTS = {
    "packed": ("", "remote-after-pack"),
    "uploaded": ("remote-after-upload", ""),
    "registered": ("remote-after-register", ""),
}
#: The manifest fields a step may set.
_STEP_FIELDS = ("state", "team_file_id", "image_ids", "members")


class WorkerGone(Exception):
    """The worker cannot do this batch (it did not start, died, hung or talked nonsense)."""


class ImportWorker:
    """The daemon's side of one worker process (see the module docstring).

    Args:
        server, token, concurrency, project: what the worker's client needs.
        deadline_s: how long one batch may take in the worker.
    """

    def __init__(
        self,
        server: str,
        token: str,
        concurrency: int,
        project: int,
        deadline_s: float = BATCH_DEADLINE_S,
    ) -> None:
        self.deadline_s = deadline_s
        self._lock = threading.Lock()  # one batch at a time
        self._timer: threading.Timer | None = None
        # the crash points of a batch's steps are passed in the daemon (where the
        # in-process import passes them); only the worker's own reaches the worker
        env = dict(os.environ)
        if env.get(FAILPOINT_ENV, "").partition(":")[0] != FAILPOINT:
            env.pop(FAILPOINT_ENV, None)
        env.pop(TOKEN_ENV, None)  # the token goes over the pipe, nowhere else
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            cwd="/",
            env=env,
        )
        hello = {"server": server, "token": token, "concurrency": concurrency, "project": project}
        self._send(hello)

    def _send(self, message: dict[str, Any]) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except (OSError, ValueError) as exc:
            raise WorkerGone(f"cannot write to the worker: {exc}") from None

    def _receive(self) -> dict[str, Any]:
        stdout = self._proc.stdout
        assert stdout is not None
        try:
            line = stdout.readline()
        except (OSError, ValueError) as exc:
            raise WorkerGone(f"cannot read from the worker: {exc}") from None
        if not line:
            raise WorkerGone(f"the worker exited ({self._proc.poll()})")
        try:
            message = json.loads(line)
        except ValueError:
            raise WorkerGone("the worker's answer is not JSON") from None
        if not isinstance(message, dict):
            raise WorkerGone("the worker's answer is not an object")
        return message

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        """Import ``batch`` in the worker, saving each of its steps in the manifest.

        Raises:
            WorkerGone: the worker cannot finish it (``batch`` is as far as was saved).
            RemoteError: the import failed in the worker, as it can in the daemon.
        """
        with self._lock:
            timer = threading.Timer(self.deadline_s, self.stop)
            timer.daemon = True
            timer.start()
            unsaved: Exception | None = None  # a step the daemon could not save
            try:
                self._send({"batch": batch.id, "batches": str(spool.batches_dir)})
                while True:
                    message = self._receive()
                    if "log" in message:
                        logger.info("%s", message["log"])
                    elif "save" in message:
                        try:
                            self._save(spool, batch, message["save"])
                        except WorkerGone:
                            raise
                        except Exception as exc:  # e.g. a full spool: the import fails there
                            unsaved = exc
                        # the worker stops at a step not saved, and answers the batch
                        self._send({"saved": unsaved is None})
                    elif "done" in message or "failed" in message:
                        if unsaved is not None:
                            raise unsaved
                        if "failed" in message:
                            raise RemoteError(str(message["failed"]))
                        return
                    else:
                        raise WorkerGone(f"unexpected answer from the worker: {sorted(message)}")
            finally:
                timer.cancel()

    @staticmethod
    def _save(spool: Spool, batch: Batch, fields: object) -> None:
        """One step's result, saved as the in-process import saves it (its crash points
        included)."""
        if not isinstance(fields, dict) or fields.get("state") not in _STEP_POINTS:
            raise WorkerGone("the worker sent a step the import has not")
        before, after = _STEP_POINTS[str(fields["state"])]
        if before:
            failpoint(before)
        for name in _STEP_FIELDS:
            if name in fields:
                setattr(batch, name, fields[name])
        spool.save_batch(batch)
        if after:
            failpoint(after)

    def stop(self) -> None:
        """Kill the worker (unmount, deadline); the daemon imports from then on."""
        if self._proc.poll() is None:
            self._proc.kill()

    def close(self) -> None:
        """Stop the worker and reap it."""
        self.stop()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class WorkerImporter:
    """Imports each batch in an :class:`ImportWorker`, or in the daemon (``fallback``) when
    the worker cannot: see the module docstring.

    ``start`` makes the worker; it is called at once, and a worker that cannot be started
    leaves every import to ``fallback``."""

    def __init__(self, fallback: Importer, start: Callable[[], ImportWorker]) -> None:
        self.fallback = fallback
        self._worker: ImportWorker | None = None
        try:
            self._worker = start()
        except (OSError, WorkerGone) as exc:
            logger.warning("import worker not started (%s); imports run in the daemon", exc)

    @property
    def in_worker(self) -> bool:
        """Whether the next batch goes to the worker."""
        return self._worker is not None

    def import_batch(self, spool: Spool, batch: Batch) -> None:
        worker = self._worker
        if worker is not None and all(p in batch.held for p in _images(batch)):
            try:
                worker.import_batch(spool, batch)
                return
            except WorkerGone as exc:
                logger.warning("import worker lost (%s); imports run in the daemon", exc)
                self._worker = None
                worker.close()
        self.fallback.import_batch(spool, batch)

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.close()


def _images(batch: Batch) -> list[str]:
    """The batch's images when it still has to be packed (a batch with an image that is
    not held packs a tar into the spool: the daemon does that itself); none otherwise."""
    return split_batch(batch)[0] if batch.state == "new" else []


# ---- the worker ---------------------------------------------------------------------


class _BatchFiles:
    """What the worker's import reads of the spool: one batch's durable files, read only.

    Stands in for the :class:`Spool` the importer is given; ``save_batch`` hands the step
    to the daemon and waits until it is saved."""

    def __init__(self, batches_dir: Path, link: _Link) -> None:
        self.batches_dir = batches_dir
        self._link = link
        self._fds: dict[str, int] = {}

    def batch_source(self, batch: Batch, view_path: str) -> Path | InlineFile:
        entry = batch.held.get(view_path)
        if entry is None:
            return self.batches_dir / batch.id / "files" / view_path.lstrip("/")
        offset, size, mtime_ns = entry
        fd = self._fds.get(batch.id)
        if fd is None:
            fd = os.open(self.batches_dir / batch.id / "data", os.O_RDONLY | os.O_CLOEXEC)
            self._fds[batch.id] = fd
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"batch {batch.id}: its data file is short")
        return InlineFile(view_path.rsplit("/", 1)[1], data, mtime_ns / 1e9)

    def batch_bytes(self, batch: Batch, view_path: str) -> bytes:
        stream, _, _ = open_source(self.batch_source(batch, view_path))
        with stream:
            return stream.read()

    def save_batch(self, batch: Batch) -> None:
        fields: dict[str, Any] = {"state": batch.state, "team_file_id": batch.team_file_id}
        if batch.state == "packed":
            fields["members"] = batch.members
        if batch.state == "registered":
            fields["image_ids"] = batch.image_ids
        self._link.send({"save": fields})
        if not self._link.receive().get("saved"):
            raise OSError("the daemon did not save the batch")

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Link:
    """The worker's pipe to the daemon: stdin read by a thread of its own, so that the
    worker exits as soon as it ends (the daemon is gone), whatever it is doing."""

    def __init__(self, stdin: IO[bytes], stdout: IO[bytes]) -> None:
        self._out = stdout
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._lines: list[bytes] = []
        threading.Thread(target=self._read, args=(stdin,), daemon=True).start()

    def _read(self, stdin: IO[bytes]) -> None:
        for line in stdin:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()
        os._exit(0)  # the daemon is gone: nothing this worker does is needed

    def receive(self) -> dict[str, Any]:
        with self._cond:
            while not self._lines:
                self._cond.wait()
            message = json.loads(self._lines.pop(0))
        if not isinstance(message, dict):
            raise ValueError("not an object")
        return message

    def send(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._out.write(json.dumps(message).encode() + b"\n")
            self._out.flush()


class _Forward(logging.Handler):
    """The worker's log records, to the daemon's log."""

    def __init__(self, link: _Link) -> None:
        super().__init__(logging.INFO)
        self._link = link

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):  # a log line is never worth the import
            self._link.send({"log": record.getMessage()})


def main() -> int:
    """Import every batch the daemon names, one after another."""
    from blobfs.sly.api import SuperviselyApi, pool_size
    from blobfs.transport.http import HttpClient
    from blobfs.writeback.remote import RemoteImporter

    link = _Link(sys.stdin.buffer, sys.stdout.buffer)
    root = logging.getLogger("blobfs")
    root.setLevel(logging.INFO)
    root.addHandler(_Forward(link))
    root.propagate = False
    hello = link.receive()
    concurrency = int(hello["concurrency"])
    client = HttpClient(str(hello["server"]), str(hello["token"]), pool_size=pool_size(concurrency))
    api = SuperviselyApi(client, concurrency)
    importer = RemoteImporter(api, int(hello["project"]))
    while True:
        message = link.receive()
        failpoint(FAILPOINT)
        batch_id = str(message["batch"])
        files = _BatchFiles(Path(str(message["batches"])), link)
        try:
            manifest = files.batches_dir / batch_id / "manifest.json"
            batch = Batch(**json.loads(manifest.read_bytes()))
            importer.import_batch(files, batch)
            link.send({"done": True})
        except Exception as exc:
            link.send({"failed": f"{type(exc).__name__}: {exc}"})
        finally:
            files.close()


if __name__ == "__main__":
    # the copy a user waits for is the daemon's FUSE requests: they come first when both
    # want a CPU, and the worker takes what they leave
    os.nice(5)
    sys.exit(main())

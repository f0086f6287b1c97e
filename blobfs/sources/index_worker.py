"""The indexes of a local project built in a process of their own, into the index cache:
each dataset's blob index, then its ordinary folders' names (``ann/``).

Parsing offsets files and building their tables is pure Python: done by the daemon's
background preload, it holds the interpreter lock that every FUSE request needs, so a
cold ``find`` over the mount waits for it. One worker process (``python -I -m
blobfs.sources.index_worker``, which imports blobfs only, never the working directory)
builds the folders instead, with the same source code, so the same restricted unpickler
and limits judge every offsets file, and writes each folder's index to the index cache;
the daemon then loads those files as a remount does.

Everything the worker does is an optimisation: a worker that fails, is killed at its
deadline or at unmount, or never started leaves the folders it did not finish to the
daemon's own build, which reports problems exactly as without it. A request for a
folder the worker has not reached builds it in the daemon at once; only a folder the
worker is building right now is waited for (it is further along than a new build).

The worker is handed jobs, each a dataset's blob index (``blob``) or its ordinary folders
(``plain``: ``ann/``), in the order a walk such as ``find`` will want them, except what
the walk demands at once: a dataset lists ``img/`` before ``ann/``, so the walk's first
demand is the first dataset's blob index, which the daemon builds itself. The worker
lists that dataset's ``ann/`` meanwhile, then takes the other datasets whole, each blob
index and then its ordinary folders, ahead of the walk; the first blob index comes last
(by then usually a load of what the daemon saved to the cache).

Protocol: the daemon writes a JSON list of ``[kind, key]`` jobs to the worker's stdin;
the worker prints ``start <n>`` and ``done <n>`` (the job's position) around each, and
exits 0 after the last.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from blobfs.failpoints import failpoint

logger = logging.getLogger(__name__)

#: The worker is killed after this long; the daemon builds what it has not finished.
WORKER_DEADLINE_S = 1800.0
#: Longest a request waits for the folder the worker is building before building it too.
MAX_WAIT_S = 60.0
#: Crash point of the worker, before each folder (the fallback tests).
FAILPOINT = "index-worker"


#: A job of the worker: ``("blob", key)`` or ``("plain", key)`` for dataset ``key``.
Job = tuple[str, str]


class IndexWorker:
    """One worker process doing ``jobs`` for a project, in order.

    Args:
        project: the project folder.
        index_dir: the index cache folder the worker writes to.
        jobs: ``(kind, key)`` pairs, kind ``blob`` or ``plain``, key a dataset's relative
            path in the project, in the order to do them.
        deadline_s: the worker is killed after this long.
    """

    def __init__(
        self, project: Path, index_dir: Path, jobs: list[Job], deadline_s: float = WORKER_DEADLINE_S
    ) -> None:
        self.jobs = jobs
        self._at = {job: i for i, job in enumerate(jobs)}
        self._cond = threading.Condition()
        self._current = -1
        self._done: set[int] = set()
        self._ended = False
        self.status: int | None = None
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-m", __name__, str(project), str(index_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            cwd="/",
        )
        self._deadline = time.monotonic() + deadline_s
        threading.Thread(target=self._follow, name="blobfs-index-worker", daemon=True).start()

    def _follow(self) -> None:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        timer = threading.Timer(max(0.0, self._deadline - time.monotonic()), self.stop)
        timer.daemon = True
        timer.start()
        try:
            proc.stdin.write(json.dumps(self.jobs).encode())
            proc.stdin.close()
            for line in proc.stdout:
                word, _, at = line.decode("ascii", "replace").partition(" ")
                with self._cond:
                    if word == "start":
                        self._current = int(at)
                    elif word == "done":
                        self._done.add(int(at))
                        self._current = -1
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass  # a worker gone or talking nonsense: the daemon builds the rest
        finally:
            timer.cancel()
            proc.stdout.close()
            self.status = proc.wait()
            with self._cond:
                self._ended = True
                self._cond.notify_all()
            if self.status != 0:
                logger.info(
                    "index worker exited with status %d after %d of %d jobs; "
                    "the others are indexed in the daemon",
                    self.status,
                    len(self._done),
                    len(self.jobs),
                )

    def wait_for(self, key: str, timeout_s: float = MAX_WAIT_S, plain: bool = False) -> bool:
        """Whether the worker has written the blob index of dataset ``key`` (``plain``: its
        ordinary folders): waits only while it is building that very one (for at most
        ``timeout_s``), never for one it has not started."""
        at = self._at.get(("plain" if plain else "blob", key))
        if at is None:
            return False
        end = time.monotonic() + timeout_s
        with self._cond:
            done = self._done
            while at not in done and not self._ended:
                if self._current != at:
                    break
                left = end - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return at in done

    def wait(self) -> None:
        """Return once the worker has exited (done, failed or killed)."""
        with self._cond:
            while not self._ended:
                self._cond.wait()

    def stop(self) -> None:
        """Kill the worker (unmount, deadline); what it did not finish the daemon builds."""
        if self._proc.poll() is None:
            self._proc.kill()


def main() -> int:
    """Do every job read from stdin (a dataset's blob index, or its ordinary folders'
    names) into the index cache, one after another."""
    from blobfs.cache.blocks import BlockCache
    from blobfs.cache.index_store import IndexStore
    from blobfs.sources.project_dir import LocalProjectSource

    logging.disable(logging.CRITICAL)  # problems are saved with each index; the daemon logs
    project, index_dir = sys.argv[1], sys.argv[2]
    jobs = json.loads(sys.stdin.read())
    store = IndexStore(Path(index_dir))
    if not store.usable:
        return 2
    source = LocalProjectSource(project, BlockCache(4096, 4096), index_store=store)
    out = sys.stdout
    try:
        for at, (kind, key) in enumerate(jobs):
            failpoint(FAILPOINT)
            _say(out, f"start {at}")
            if kind == "plain":
                source.build_plain(str(key))
            else:
                source.build_index(str(key))
            _say(out, f"done {at}")
    finally:
        source.close()
    return 0


def _say(out: IO[str], line: str) -> None:
    out.write(line + "\n")
    out.flush()


if __name__ == "__main__":
    os.nice(5)  # requests of the daemon come first when both want a CPU
    sys.exit(main())

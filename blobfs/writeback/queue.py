"""WritebackQueue: decide when staged files become batches, run imports, retry, report.

A background thread packs a dataset's staged images into a batch when they reach
``blob_size``, when its staged files reach ``batch_files`` (so that a long copy of small
files is imported while it goes on, as rclone's or mountpoint-s3's uploads are, instead of
all at the end), after ``delay_s`` without new writes, on ``flush()``, and when the mount
stops. Batches left by a crashed run are finished first. A failing import is retried with
exponential backoff; its files stay staged (and visible) meanwhile. A file that cannot be
imported as it is (not an image, an annotation that does not parse or names an unknown
class) is kept in the spool and listed under ``failed`` until the user fixes or removes it.

The queue knows nothing above it: what the layers above must learn (a batch is importing,
was imported, is served from the project alone) is published as events to whoever
subscribed (the writable overlay, the FUSE layer).

Lock order: ``_cond`` only; it is never held while importing.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from blobfs.config import DEFAULT_BATCH_FILES
from blobfs.failpoints import failpoint
from blobfs.format.pack import new_blob_stem
from blobfs.layout import ANN_DIR, IMG_DIR, META_PATH, dataset_of, image_of_ann
from blobfs.writeback.importer import Importer, PhaseTimes
from blobfs.writeback.spool import Batch, Spool

logger = logging.getLogger(__name__)

DEFAULT_DELAY_S = 5.0
#: How often the queue's thread, between passes, validates the files staged since it last
#: looked, so that a flush or a batch finds them checked already.
PREVALIDATE_S = 0.2
#: How a path in a dataset's ann/ folder ends before its name.
_IN_ANN = "/" + ANN_DIR
DEFAULT_BLOB_SIZE = 256 << 20
MAX_BACKOFF_S = 60.0

Validate = Callable[[str], str | None]
"""(view path of a staged file) -> reason it cannot be imported, or None."""


@dataclass(frozen=True)
class Importing:
    """The batch of these view paths is importing now (empty: none is): changes to them
    must wait (EBUSY) until the next ``Importing``."""

    paths: tuple[str, ...]


@dataclass(frozen=True)
class Imported:
    """The batch is in the project; its staged copies are still there (no gap in
    listings): the project's own listing of the dataset must be read again."""

    batch: Batch


@dataclass(frozen=True)
class Settled:
    """These imported annotations and meta are now served from the project alone (staged
    copies gone; the server's copy may differ in bytes and length). Images land byte for
    byte and are not listed."""

    paths: tuple[str, ...]


Event = Importing | Imported | Settled
Listener = Callable[[Event], None]


@dataclass
class QueueStatus:
    """What ``blobfs status`` shows about writeback."""

    pending: int = 0
    pending_bytes: int = 0
    importing: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    imported: int = 0
    last_error: str | None = None
    batches_done: int = 0

    def as_dict(self) -> dict[str, object]:
        return {
            "pending": self.pending,
            "pending_bytes": self.pending_bytes,
            "importing": list(self.importing),
            "failed": dict(self.failed),
            "imported": self.imported,
            "batches_done": self.batches_done,
            "last_error": self.last_error,
        }


class WritebackQueue:
    """See the module docstring."""

    def __init__(
        self,
        spool: Spool,
        importer: Importer,
        validate: Validate,
        delay_s: float = DEFAULT_DELAY_S,
        blob_size: int = DEFAULT_BLOB_SIZE,
        batch_files: int = DEFAULT_BATCH_FILES,
        clock: Callable[[], float] = time.monotonic,
        backoff_s: float = 1.0,
    ) -> None:
        self.spool = spool
        self.importer = importer
        self.validate = validate
        self._listeners: list[Listener] = []
        self.delay_s = delay_s
        self.blob_size = blob_size
        self.batch_files = batch_files
        self.backoff_s = backoff_s
        self._clock = clock
        self._cond = threading.Condition()
        self._last_write = clock()
        self._force = 0
        self._generation = 0
        self._running = False
        self._stopping = False
        self._retry_at = 0.0
        self._failures = 0
        self._checked: dict[str, tuple[int, int, str | None, object]] = {}
        self._imports = 0  # batches imported: what a refused file was checked against
        self._dirty = True  # the first pass finds what an earlier run left in the spool
        self._staged_bytes = 0
        self._staged_files = 0  # since the last pass (an annotation counts twice)
        self._short = 0  # files of a dataset the last pass found too few to seal
        self._times = PhaseTimes()  # of the current pass
        self._fresh: set[str] = set()  # staged since the thread last validated ahead
        self.status = QueueStatus()
        self._thread: threading.Thread | None = None
        self._tickets = 0  # flush requests handed out
        self._targets: list[tuple[int, int]] = []  # (pass generation, ticket) awaited
        self._flushed = 0  # the last ticket whose flush pass has completed
        self._asked_at: float | None = None  # when the oldest flush not yet started was asked

    # ---- control ---------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every event, on the queue's thread (keep it short)."""
        self._listeners.append(listener)

    def _publish(self, event: Event) -> None:
        for listener in self._listeners:
            listener(event)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="blobfs-writeback", daemon=True)
        self._thread.start()

    def staged(self, size: int = 0, path: str | None = None) -> None:
        """A file (``path``) was committed to the spool: restart the quiet period.

        This runs on every close, so it only counts: a pass (which walks the whole spool)
        is woken when a blob's worth of bytes is staged, not per file, which would make
        copying N files cost O(N^2). The thread validates ``path`` ahead, between passes
        (a copy waits on round trips, so the daemon's CPU is mostly free meanwhile).

        The counting takes no lock (each step is one store or one C call under the
        interpreter lock); only the wake-up does. What a race with a pass may cost is
        benign: the file was committed before this call and a pass clears ``_dirty``
        before it walks the spool, so no pass misses it; a count that lands in the pass
        that just began only moves one file's weight to the next seal, and a path added
        to the set the thread just took is validated by the pass instead of ahead.
        """
        if path is not None:
            self._fresh.add(path)
        self._last_write = self._clock()
        self._dirty = True
        self._staged_bytes += size
        # a pass counts the images whose annotation is staged too, with those: an
        # annotation usually completes a pair (two such files), an image may not. Only
        # the folder the file is in is looked at (only a dataset's files are staged)
        in_ann = path is not None and path.rpartition("/")[0].endswith(_IN_ANN)
        self._staged_files += 2 if in_ann else 1
        status = self.status
        status.pending += 1  # an estimate until the next pass counts the spool
        status.pending_bytes += size
        if self._enough_staged():
            with self._cond:
                self._cond.notify_all()

    def _enough_staged(self) -> bool:
        """Whether what was staged since the last pass could seal a batch."""
        return self._staged_bytes >= self.blob_size or (0 < self.batch_files <= self._staged_files)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Import everything importable now; True when nothing importable is left pending."""
        ticket = self.request_flush()
        done = self.wait_flushed(ticket, timeout_s)
        return done and self.status.pending == 0

    def request_flush(self) -> int:
        """Ask for a flush pass and return at once; the ticket to wait for.

        The pass runs on the queue's thread: it makes the spool durable (what stays staged,
        refused files too, no longer depends on the page cache) and imports what it can.
        """
        with self._cond:
            self._force += 1
            self._tickets += 1
            if self._asked_at is None:
                self._asked_at = time.perf_counter()
            # the first pass that starts after this request: the next one, or the one after
            # the pass running now (which may have listed the spool before the last write)
            self._targets.append((self._generation + (2 if self._running else 1), self._tickets))
            self._cond.notify_all()
            return self._tickets

    def wait_flushed(self, ticket: int, timeout_s: float | None = None) -> bool:
        """Wait until the flush of ``ticket`` is done (True) or ``timeout_s`` passed (False).
        Without a running thread there is nothing to wait for."""
        with self._cond:
            deadline = None if timeout_s is None else self._clock() + timeout_s
            while self._flushed < ticket and self._thread is not None:
                remaining = None if deadline is None else deadline - self._clock()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> bool:
        """Stop the thread, after importing what can be imported when ``drain``."""
        ok = self.flush(timeout_s) if drain and self._thread is not None else True
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return ok

    # ---- the loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._due():
                    if self._fresh:
                        break
                    self._cond.wait(min(PREVALIDATE_S, max(self.delay_s / 2, 0.05)))
                if not self._due():
                    fresh, self._fresh = self._fresh, set()
                    ahead = True
                else:
                    ahead = False
            if ahead:
                self._validate_ahead(fresh)
                continue
            with self._cond:
                if self._stopping:
                    return
                force = self._force > 0
                self._force = 0
                asked, self._asked_at = self._asked_at, None
                quiet = self._clock() - self._last_write >= self.delay_s
                if force or quiet:
                    self._dirty = False  # this pass considers every staged file
                self._begin_pass()
            self._times = PhaseTimes()
            if asked is not None:  # how long the flush waited for the thread to look
                self._times.seconds["wait"] = time.perf_counter() - asked
            try:
                if force:
                    with self._times.timed("sync"):
                        self.spool.sync()
                self.run_once(force)
            except Exception as exc:  # keep the thread alive whatever happens
                logger.exception("writeback pass failed")
                self.status.last_error = f"{type(exc).__name__}: {exc}"
            with self._cond:
                self._end_pass()
            if "import" in self._times.seconds:  # the phases of one import: the importer's line
                logger.info("writeback pass%s: %s", " (flush)" if force else "", self._times)

    def _begin_pass(self) -> None:
        """Count what is staged from now on towards the next pass (``_cond`` held)."""
        self._staged_bytes = self._staged_files = 0
        self._running = True

    def _end_pass(self) -> None:
        """Settle a pass (``_cond`` held): the files it found too few of to seal still
        count towards the next one, and the flushes waiting for it are released."""
        self._running = False
        self._staged_files += self._short
        self._generation += 1
        while self._targets and self._targets[0][0] <= self._generation:
            self._flushed = max(self._flushed, self._targets.pop(0)[1])
        self._cond.notify_all()

    def _due(self) -> bool:
        """Whether a pass could do anything now (called with ``_cond`` held).

        Idle passes are skipped: each one walks and stats the whole spool, and while a
        program copies thousands of files the quiet period never ends anyway.
        """
        if self._stopping or self._force or self._enough_staged():
            return True
        now = self._clock()
        if self._failures and now >= self._retry_at:
            return True
        return self._dirty and now - self._last_write >= self.delay_s

    def run_once(self, force: bool = False) -> None:
        """One pass: finish old batches, then make and import new ones that are due."""
        self._short = 0
        if self._clock() < self._retry_at and not force:
            return
        for batch in self.spool.open_batches():
            if not self._run_batch(batch):
                return
        with self._times.timed("validate"):
            groups, meta = self._pending(force)
        quiet = self._clock() - self._last_write >= self.delay_s
        if meta is not None and (force or quiet):
            self._run_batch(self._new_batch([], [meta]))
        for dataset, (images, anns, size) in sorted(groups.items()):
            if not (force or quiet or size >= self.blob_size):
                images = _paired(images, anns)
                if not 0 < self.batch_files <= len(images) + len(anns):
                    self._short = max(self._short, len(images) + len(anns))
                    continue
            for chunk in self._chunks(images):
                names = {p.rsplit("/", 1)[1] for p in chunk}
                # one pass that splits them (filtering by a list's ``in`` was quadratic
                # in the annotations)
                batch_anns: list[str] = []
                rest: list[str] = []
                for a in anns:
                    (batch_anns if image_of_ann(a.rsplit("/", 1)[1]) in names else rest).append(a)
                if not self._run_batch(self._new_batch(list(dataset), chunk + batch_anns)):
                    return
                anns = rest
            waiting = self._staged_image_names(dataset)
            anns = [a for a in anns if image_of_ann(a.rsplit("/", 1)[1]) not in waiting]
            if anns:  # annotations of images imported earlier
                self._run_batch(self._new_batch(list(dataset), anns))

    def _staged_image_names(self, dataset: tuple[str, ...]) -> set[str]:
        files, _ = self.spool.walk()
        names = set()
        for path in files:
            where = dataset_of(path)
            if where is not None and where[0] == dataset and where[1] == IMG_DIR:
                names.add(where[2])
        return names

    def _chunks(self, images: list[str]) -> list[list[str]]:
        chunks: list[list[str]] = []
        size = 0
        for path in images:
            st = self.spool.stat(path)
            if st is None:
                continue  # removed since the pass listed it
            if not chunks or size + st.st_size > self.blob_size:
                chunks.append([])
                size = 0
            chunks[-1].append(path)
            size += st.st_size
        return chunks

    def _new_batch(self, dataset: list[str], files: list[str]) -> Batch:
        stem = new_blob_stem(dataset[-1] if dataset else "meta")
        with self._times.timed("seal"):
            return self.spool.create_batch(Batch(uuid.uuid4().hex[:12], dataset, files, stem))

    def _run_batch(self, batch: Batch) -> bool:
        self._set_importing(batch.files)
        try:
            return self._import(batch)
        finally:  # only once the spool forgot the batch's files (or the import failed)
            self._set_importing([])

    def _set_importing(self, paths: list[str]) -> None:
        self.status.importing = list(paths)
        self._publish(Importing(tuple(paths)))

    def _import(self, batch: Batch) -> bool:
        try:
            failpoint("importing")
            with self._times.timed("import"):
                self.importer.import_batch(self.spool, batch)
        except Exception as exc:
            self._failures += 1
            delay = min(self.backoff_s * 2 ** (self._failures - 1), MAX_BACKOFF_S)
            self._retry_at = self._clock() + delay
            self.status.last_error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "import of %d files failed (retry in %.1f s): %s", len(batch.files), delay, exc
            )
            return False
        self._failures = 0
        self._imports += 1
        self.status.last_error = None
        failpoint("after-import")
        with self._times.timed("relist"):
            self._publish(Imported(batch))  # before the staged copies go: no gap in listings
        with self._times.timed("unstage"):
            done = self.spool.finish_batch(batch)
        settled = [p for p in batch.files if (d := dataset_of(p)) is None or d[1] != IMG_DIR]
        with self._times.timed("invalidate"):
            self._publish(Settled(tuple(settled)))
        self.status.imported += len(done)
        self.status.batches_done += 1
        self.status.pending = max(0, self.status.pending - len(done))
        self.status.pending_bytes = max(0, self.status.pending_bytes - sum(done.values()))
        return True

    def _pending(
        self, force: bool = False
    ) -> tuple[dict[tuple[str, ...], tuple[list[str], list[str], int]], str | None]:
        files, _ = self.spool.walk()
        new_pass = getattr(self.validate, "new_pass", None)
        if callable(new_pass):
            new_pass()
        context = None if force else self._context()
        groups: dict[tuple[str, ...], tuple[list[str], list[str], int]] = {}
        meta = None
        failed: dict[str, str] = {}
        pending = pending_bytes = 0
        for path in sorted(files):
            reason, size = self._check(path, context)
            if reason:
                failed[path] = reason
                continue
            pending += 1
            pending_bytes += size
            if path == META_PATH:
                meta = path
                continue
            where = dataset_of(path)
            if where is None:
                failed[path] = "not a dataset image or annotation"
                pending -= 1
                continue
            images, anns, group_size = groups.get(where[0], ([], [], 0))
            if where[1] == IMG_DIR:
                images.append(path)
                group_size += size
            else:
                anns.append(path)
            groups[where[0]] = (images, anns, group_size)
        self.status.failed = failed
        self.status.pending, self.status.pending_bytes = pending, pending_bytes
        return groups, meta

    def _validate_ahead(self, paths: set[str]) -> None:
        """Validate ``paths`` before any pass needs them; only an accepted file is
        remembered (a refusal, e.g. an annotation whose image is not copied yet, is
        left to the pass, which decides and reports it)."""
        try:
            context = self._context()
            for path in sorted(paths):
                st = self.spool.stat(path)
                if st is None or stat.S_ISDIR(st.st_mode):
                    continue
                if self._known(path, st) is not None:
                    continue
                if self.validate(path) is None:
                    self._remember(path, st, None, context)
        except Exception:  # the pass validates what this missed
            logger.debug("validating ahead failed", exc_info=True)

    def _context(self) -> object:
        """What a refusal may depend on besides the file itself: the staged meta.json (its
        classes) and the imports since (an annotation's image may have landed)."""
        st = self.spool.stat(META_PATH)
        meta = None if st is None else (st.st_mtime_ns, st.st_size)
        return (self._imports, meta)

    def _known(self, path: str, st: os.stat_result) -> tuple[int, int, str | None, object] | None:
        """What was decided about ``path`` if it was about this version of the file
        (same mtime and size)."""
        known = self._checked.get(path)
        if known is not None and known[:2] == (st.st_mtime_ns, st.st_size):
            return known
        return None

    def _remember(self, path: str, st: os.stat_result, reason: str | None, context: object) -> None:
        """Record what was decided about this version of ``path`` (see :meth:`_known`)."""
        self._checked[path] = (st.st_mtime_ns, st.st_size, reason, context)

    def _check(self, path: str, context: object = None) -> tuple[str | None, int]:
        """(why the staged file cannot be imported or None, its size).

        A file is validated once per version; a refused one again whenever ``context``
        differs from the one it was refused in (None, on a flush: always), so fixing
        meta.json, or importing the image an annotation waited for, lets it through.
        """
        st = self.spool.stat(path)
        if st is None:
            return "vanished", 0
        known = self._known(path, st)
        if known is not None and (
            known[2] is None or (context is not None and known[3] == context)
        ):
            return known[2], st.st_size
        known = self._checked.get(path)
        reason = self.validate(path)
        self._remember(path, st, reason, context)
        if reason and (known is None or known[:3] != (st.st_mtime_ns, st.st_size, reason)):
            logger.warning("%s is kept in the spool, not imported: %s", path, reason)
        return reason, st.st_size


def _paired(images: list[str], anns: list[str]) -> list[str]:
    """The images whose annotation is staged too: what a batch takes while writes go on.

    An image imported before its annotation arrives gets an empty one, then the real one:
    twice the annotation requests, and a ``cp -r`` copies ``img/`` before ``ann/``. So
    while a copy goes on only pairs are imported; a lone image waits for ``blob_size``,
    the quiet period or a flush, like every file did before.
    """
    with_ann = {image_of_ann(a.rsplit("/", 1)[1]) for a in anns}
    return [p for p in images if p.rsplit("/", 1)[1] in with_ann]

"""The contract every project source meets."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from blobfs.errors import BlobfsError
from blobfs.model import DatasetRecord, FileRecord
from blobfs.problems import Problems
from blobfs.transport.base import RangeReader

#: A folder's entries by name: a dict, or a compact table that makes records on demand
#: (:class:`blobfs.sources.compact.FileTable`). The standard folders ``img`` and ``ann``
#: are always present.
FolderEntries = Mapping[str, FileRecord]
FolderLoaders = dict[str, Callable[[], FolderEntries]]


@dataclass(frozen=True, slots=True)
class PeekingLoader:
    """A folder's loader that can also answer one name before the folder is loaded.

    Listing a large folder costs its whole index; a ``stat`` of one name right after the
    mount should not wait for that. ``peek`` gives that name's attributes (None: not known
    without loading); reads always go through the loaded folder.
    """

    load: Callable[[], FolderEntries]
    peek: Callable[[str], FileRecord | None]

    def __call__(self) -> FolderEntries:
        return self.load()


class Source(ABC):
    """A Supervisely project as records, each file readable by byte range.

    Contract:
        - ``datasets()`` lists every dataset, nested ones included (their ``path`` has
          more than one name); it may be called once at mount and cached by the caller
          when ``is_immutable()``.
        - ``files(dataset)`` lists the dataset's files with paths relative to the dataset
          folder, in the standard layout: ``img/<name>``, ``ann/<name>.json`` and optional
          ``img_info/``, ``meta/`` files. Entries the source refuses (bad names, conflicts)
          are left out and reported through ``problems()``: each listing is counted in a
          scope of its own (``with self._problems.listing(scope)``), so listing the same
          bad entries again logs nothing new.
        - ``listing(dataset)`` names the dataset's folders, each with a loader of its
          entries; the view calls a loader once (per refresh), lazily, possibly in another
          thread, and never under a lock another folder's lookups wait for.
        - ``open(record)`` returns a reader of the file's own bytes ``[0, size)``.
        - ``content(record)`` returns a small file whole (used when ``size`` is None).
        - Errors are :class:`blobfs.errors.BlobfsError` subclasses only.
    """

    def __init__(self, log: logging.Logger | None = None) -> None:
        #: The one collector of this source's problems: aggregated by (file, cause),
        #: bounded, each logged once (see :mod:`blobfs.problems`).
        self._problems = Problems(log)

    @abstractmethod
    def meta_json(self) -> bytes | None:
        """The project's ``meta.json`` bytes, or None when the project has none."""

    @abstractmethod
    def datasets(self) -> Sequence[DatasetRecord]:
        """Every dataset of the project."""

    @abstractmethod
    def files(self, dataset: DatasetRecord) -> Sequence[FileRecord]:
        """The files of one dataset (see the class contract)."""

    def listing(self, dataset: DatasetRecord) -> FolderLoaders:
        """The dataset's folders with a loader of each one's entries.

        The default groups :meth:`files` (one call, now); sources with large datasets
        override it to load each folder on its own, compactly.
        """
        groups: dict[str, dict[str, FileRecord]] = {"img": {}, "ann": {}}
        for rec in self.files(dataset):
            sub, _, name = rec.relpath.partition("/")
            if name and "/" not in name:
                groups.setdefault(sub, {})[name] = rec
        return {sub: _constant(entries) for sub, entries in groups.items()}

    @abstractmethod
    def open(self, record: FileRecord) -> RangeReader:
        """A reader of the file's bytes."""

    def content(self, record: FileRecord) -> bytes:
        """The whole file; sources with lazily known sizes override this."""
        if record.size is None:
            raise NotImplementedError("source must override content() for unsized files")
        return self.open(record).read(0, record.size)

    def is_immutable(self) -> bool:
        """True when listings never change while mounted (the kernel may cache them forever)."""
        return True

    def problems(self) -> list[str]:
        """Human-readable reasons why some entries are not served, one line per (file,
        cause), as the latest listings found them (plus failures met while reading)."""
        return self._problems.lines()

    def changed(self) -> None:  # noqa: B027 - optional hook, immutable sources cache nothing
        """The project was changed through this mount (a writeback import): forget small
        files kept in memory (annotations), so the next read fetches what is there now.
        Listings are re-read by the view; blob bytes are versioned and stay valid."""

    def refused(self, dataset: tuple[str, ...], relpath: str) -> str | None:
        """Why the last listing of ``dataset`` left out an entry it has at ``relpath``, or
        None. Writeback asks before it accepts a new file: a name the project already
        holds unservably (e.g. twice) would stay unservable after an import."""
        return None

    def stats(self) -> dict[str, object]:
        """Counters for ``blobfs stats``."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, most sources hold nothing
        """Release descriptors, sessions and threads."""

    def foreign(self, record: FileRecord) -> BlobfsError:
        """The error for a record of a kind this source never lists (another source's):
        a bug, so EIO, with the path for the log."""
        return BlobfsError(f"{record.relpath}: a {type(record.ref).__name__} is not served here")


def _constant(entries: FolderEntries) -> Callable[[], FolderEntries]:
    return lambda: entries

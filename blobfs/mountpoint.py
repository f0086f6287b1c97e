"""What is at a mount point: nothing, a folder, a live mount, or a mount whose daemon died.

The CLI asks this before mounting (never stack a mount or hide files by accident) and before
``unmount``/``status``/``flush``/``stats`` (a dead mount answers every ``stat`` with ENOTCONN,
which must become advice, not a traceback). The kernel's mount table
(``/proc/self/mountinfo``) says what is mounted where, even when the daemon is gone.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass

from blobfs.errors import InvalidInput

#: ``stat`` on a FUSE mount whose daemon exited (or whose connection was aborted).
DEAD_ERRNOS = frozenset({errno.ENOTCONN, errno.ECONNABORTED})
BLOBFS_FSTYPE = "fuse.blobfs"
AUTOFS_FSTYPE = "autofs"
MOUNTINFO = "/proc/self/mountinfo"


class Kind(enum.Enum):
    MISSING = "missing"
    NOT_A_DIRECTORY = "not a directory"
    FOLDER = "folder"
    MOUNTED = "mounted"
    DEAD = "dead"


@dataclass(frozen=True)
class MountState:
    path: str
    kind: Kind
    #: File system type from the mount table (``fuse.blobfs``), when something is mounted.
    fstype: str | None = None

    @property
    def is_blobfs(self) -> bool:
        return self.fstype == BLOBFS_FSTYPE


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo`` octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounted_fstype(path: str, mountinfo: str = MOUNTINFO) -> str | None:
    """The type of the topmost file system mounted exactly on ``path``, or None."""
    target = os.path.realpath(path)
    found: str | None = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) < 7 or "-" not in fields[6:]:
                    continue
                sep = fields.index("-", 6)
                if _unescape(fields[4]) == target and len(fields) > sep + 1:
                    found = fields[sep + 1]  # later lines are mounted on top of earlier ones
    except OSError:
        return None
    return found


def inspect(path: str, mountinfo: str = MOUNTINFO) -> MountState:
    """What ``path`` is now (the ``stat`` decides dead vs. alive, the mount table the type)."""
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return MountState(path, Kind.MISSING)
    except OSError as exc:
        if exc.errno in DEAD_ERRNOS:
            return MountState(path, Kind.DEAD, mounted_fstype(path, mountinfo))
        raise
    if not stat.S_ISDIR(st.st_mode):
        return MountState(path, Kind.NOT_A_DIRECTORY)
    fstype = mounted_fstype(path, mountinfo)
    if fstype is None and not os.path.ismount(path):
        return MountState(path, Kind.FOLDER)
    if fstype == AUTOFS_FSTYPE:
        return MountState(path, Kind.MOUNTED, fstype)  # statfs would trigger the automount
    # The kernel answers ``stat`` of a dead mount's root from its attribute cache (for up to
    # ``attr_timeout``); ``statfs`` always asks the daemon, so it tells a dead one.
    try:
        os.statvfs(path)
    except OSError as exc:
        if exc.errno in DEAD_ERRNOS:
            return MountState(path, Kind.DEAD, fstype)
    return MountState(path, Kind.MOUNTED, fstype)


def dead_mount_advice(path: str) -> str:
    return (
        f"{path} is a dead mount (its daemon has exited: Transport endpoint is not "
        f"connected); run: blobfs unmount {path}"
    )


def check_mount_target(path: str, nonempty: bool = False, mountinfo: str = MOUNTINFO) -> None:
    """Refuse a mount point that is missing, mounted (dead or alive), or not empty.

    Mounting on top of a live mount would stack a second one and hide the first; over a
    non-empty folder it would hide the folder's files. Both are refused, as mount(8) and
    libfuse 2 refuse them, unless ``-o nonempty`` says the files may be hidden. An autofs
    trigger (fstab ``x-systemd.automount``) is the one mount that is meant to be mounted
    over; it is not even listed, since reading it would wait for this very mount.

    Raises:
        InvalidInput: with a message that says what to run instead.
    """
    if mounted_fstype(path, mountinfo) == AUTOFS_FSTYPE:
        return
    try:
        state = inspect(path, mountinfo)
    except OSError as exc:
        raise InvalidInput(f"mount point {path}: {exc.strerror}") from None
    if state.kind is Kind.MISSING:
        raise InvalidInput(f"mount point {state.path} does not exist")
    if state.kind is Kind.NOT_A_DIRECTORY:
        raise InvalidInput(f"mount point {state.path} is not a directory")
    if state.kind is Kind.DEAD:
        raise InvalidInput(dead_mount_advice(state.path))
    if state.kind is Kind.MOUNTED:
        how = "blobfs unmount" if state.is_blobfs else "umount"
        raise InvalidInput(
            f"{state.path} is already a mount point ({state.fstype or 'unknown type'}); "
            f"unmount it first: {how} {state.path}"
        )
    if not nonempty:
        try:
            entries = os.listdir(state.path)
        except OSError as exc:
            raise InvalidInput(f"mount point {state.path}: {exc.strerror}") from None
        if entries:
            raise InvalidInput(
                f"mount point {state.path} is not empty ({len(entries)} entries would be "
                "hidden); empty it, or pass -o nonempty to mount over them"
            )

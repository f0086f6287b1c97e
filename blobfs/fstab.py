"""``mount.fuse.blobfs``: the helper ``mount -t fuse.blobfs`` (and so /etc/fstab) runs.

mount(8) calls ``/sbin/mount.fuse.blobfs SOURCE MOUNTPOINT -o OPTIONS`` (plus flags such
as ``-n``). This translates the comma-separated options into ``blobfs mount`` flags and
runs it; the mount returns once it is live, as mount(8) expects.

fstab example::

    /data/project  /mnt/project  fuse.blobfs  ro,_netdev,cache_size=1G  0 0
    sly://123  /mnt/remote  fuse.blobfs  _netdev,server=https://sly.example,token_file=/etc/t  0 0
"""

from __future__ import annotations

import os
import sys

#: fstab option -> ``blobfs mount`` flag taking a value.
VALUE_FLAGS = {
    "cache_size": "--cache-size",
    "block_size": "--block-size",
    "cache_dir": "--cache-dir",
    "disk_cache_size": "--disk-cache-size",
    "server": "--server",
    "token_file": "--token-file",
    "log_file": "--log-file",
    "log_level": "--log-level",
    "spool_dir": "--spool-dir",
    "writeback_delay": "--writeback-delay",
    "blob_size": "--blob-size",
    "batch_files": "--batch-files",
    "timeout": "--timeout",
    "concurrency": "--concurrency",
    "readdirplus": "--readdirplus",
}
#: fstab option -> flag without a value.
BOOL_FLAGS = {
    "allow_other": "--allow-other",
    "writeback": "--writeback",
    "prefetch": "--prefetch",
    "sync_close": "--sync-close",
    "sync": "--sync-close",  # mount(8)'s name for it
}
#: Options for mount(8) or systemd only; FUSE must not see them. ``ro`` is the default.
DROPPED = {
    "_netdev",
    "nofail",
    "noauto",
    "auto",
    "user",
    "users",
    "nouser",
    "defaults",
    "ro",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "relatime",
    "noatime",
    "atime",
}


def daemon_command() -> list[str]:
    """How blobfs runs itself again (the background daemon, and this helper's ``blobfs mount``).

    ``-P`` keeps the working directory off ``sys.path``: a ``./blobfs/`` folder wherever the
    user stands must not be imported in place of the installed package. ``PYTHONPATH`` still
    counts (``-I`` would drop it), so a checkout run with ``PYTHONPATH=.`` mounts its own code.
    """
    return [sys.executable, "-P", "-m", "blobfs"]


def translate(source: str, mountpoint: str, options: str) -> list[str]:
    """``blobfs mount`` arguments for one fstab line's fields."""
    args = ["mount", source, mountpoint]
    passthrough: list[str] = []
    for item in options.split(","):
        item = item.strip()
        key, sep, value = item.partition("=")
        if not item or key in DROPPED or key.startswith(("x-", "comment")):
            continue
        if key in VALUE_FLAGS and sep:
            args += [VALUE_FLAGS[key], value]
        elif key in BOOL_FLAGS:
            args.append(BOOL_FLAGS[key])
        else:
            passthrough.append(item)
    if passthrough:
        args += ["-o", ",".join(passthrough)]
    return args


def parse_argv(argv: list[str]) -> tuple[str, str, str]:
    """``SOURCE MOUNTPOINT [-o OPTS] [-n] [-s] [-v]`` -> (source, mountpoint, options)."""
    positional: list[str] = []
    options: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "-o":
            options.append(next(it, ""))
        elif arg.startswith("-o"):
            options.append(arg[2:])
        elif arg.startswith("-"):
            continue  # -n (no mtab), -s (sloppy), -v (verbose), -f (fake): nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.fuse.blobfs SOURCE MOUNTPOINT [-o OPTIONS]")
    return positional[0], positional[1], ",".join(options)


def main() -> None:
    source, mountpoint, options = parse_argv(sys.argv[1:])
    args = translate(source, mountpoint, options)
    cmd = daemon_command()
    os.execv(cmd[0], [*cmd, *args])


if __name__ == "__main__":
    main()

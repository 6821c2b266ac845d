"""What making a 4 KiB file durable costs on this disk (decision 0016).

Writes N files of 4 KiB in a folder, each to a temporary name renamed into place,
with and without the flushes, and prints milliseconds per file:

  none  write, close, rename (no flush: what stock pyftpdlib pays, minus the rename)
  A     write, fdatasync, close, rename, fsync(folder): the gateway's commit
  A2    the same with fsync instead of fdatasync
  C     write, sync_file_range(WAIT_BEFORE|WRITE|WAIT_AFTER), close, rename,
        fsync(folder): one journal commit instead of two (not taken, see 0016)

    python3 docs/decisions/evidence/0016-flush-cost.py [FOLDER] [N]

FOLDER defaults to a new folder under /tmp (on the disk the uploads use, if that is
where /tmp is); run it when nothing else writes, and more than once.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import time

_SYNC_FILE_RANGE_ALL = 1 | 2 | 4  # WAIT_BEFORE | WRITE | WAIT_AFTER
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def _sync_range(fd: int) -> None:
    if _libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0),
                             _SYNC_FILE_RANGE_ALL) != 0:  # fmt: skip
        raise OSError(ctypes.get_errno(), "sync_file_range")


def per_file_ms(folder: str, count: int, mode: str) -> float:
    """Milliseconds per file for one way of storing ``count`` files."""
    data = os.urandom(4096)
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    began = time.perf_counter()
    for number in range(count):
        temp, final = f"{folder}/.tmp{number}", f"{folder}/{mode}-{number}"
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        if mode == "A":
            os.fdatasync(fd)
        elif mode == "A2":
            os.fsync(fd)
        elif mode == "C":
            _sync_range(fd)
        os.close(fd)
        os.rename(temp, final)
        if mode != "none":
            os.fsync(folder_fd)
    elapsed = time.perf_counter() - began
    os.close(folder_fd)
    for number in range(count):
        os.unlink(f"{folder}/{mode}-{number}")
    return 1000 * elapsed / count


def main() -> None:
    """Three alternations of the four ways."""
    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="flush-")
    os.makedirs(folder, exist_ok=True)
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 400  # noqa: PLR2004
    print(f"{count} files of 4 KiB in {folder}, load {os.getloadavg()[0]:.2f}")
    for _ in range(3):
        print("  ".join(f"{mode} {per_file_ms(folder, count, mode):.3f} ms"
                        for mode in ("none", "A", "A2", "C")))  # fmt: skip


if __name__ == "__main__":
    main()

"""Rename without replacing: ``renameat2(RENAME_NOREPLACE)``, else link and unlink.

RNTO without ``overwrite`` is checked (the target does not exist) and then renamed;
``os.rename`` between the two would replace whatever a local process (a consumer, a
second session) created in between. The kernel can refuse that itself: Linux
``renameat2`` with ``RENAME_NOREPLACE`` (3.15+, glibc 2.28+) fails with ``EEXIST``.
Python has no binding, so it is called through ctypes. Where the filesystem or libc
does not offer it, a file is renamed with ``link`` + ``unlink`` (``link`` fails with
``EEXIST`` too); a folder, which cannot be hard-linked, is checked and renamed, the
only path with a window left (and ``rename`` replaces at most an *empty* folder).

No IO loop, no FTP: ``ftp.filesystem`` calls it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path

AT_FDCWD = -100  # <fcntl.h>: paths relative to the working directory
RENAME_NOREPLACE = 1  # <linux/fs.h>
# renameat2 exists but this filesystem (or an old kernel) does not do NOREPLACE.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def _load_renameat2() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not glibc 2.28+, or not Linux
        return None
    function.argtypes = [
        ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
    ]  # fmt: skip
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def rename_noreplace(
    source: str | os.PathLike[str], target: str | os.PathLike[str]
) -> None:
    """Rename ``source`` to ``target``; ``FileExistsError`` if ``target`` exists.

    Raises:
        FileExistsError: something is at ``target`` (whenever it appeared).
        OSError: the rename failed otherwise (as ``os.rename`` would).
    """
    src, dst = os.fsencode(source), os.fsencode(target)
    if _renameat2 is not None:
        if _renameat2(AT_FDCWD, src, AT_FDCWD, dst, RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in _UNSUPPORTED:
            raise OSError(
                code, os.strerror(code), os.fsdecode(src), None, os.fsdecode(dst)
            )
    _rename_by_link(src, dst)


def _rename_by_link(src: bytes, dst: bytes) -> None:
    _rename_by_link_paths(Path(os.fsdecode(src)), Path(os.fsdecode(dst)))


def _rename_by_link_paths(source: Path, target: Path) -> None:
    """The fallback: ``link`` refuses an existing target; folders cannot be linked."""
    if stat.S_ISDIR(source.lstat().st_mode):
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
        source.rename(target)
        return
    os.link(source, target, follow_symlinks=False)
    try:
        source.unlink()
    except OSError:
        target.unlink()  # the rename did not happen: leave one name, the old one
        raise

"""Virtual paths (what FTP clients send) to real paths, confined to one home.

Plain Python (no pyftpdlib import), so every rule here is unit-tested without a
server. Everything a client sends is refused or confined before the disk is touched:
a path that cannot be mapped safely raises ``PathRefused``, never maps "nearby".
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.errors import GatewayError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_CHARS",
    "UPLOAD_TEMP_PREFIX",
    "HomeTree",
    "PathRefused",
    "Resolved",
    "is_upload_temp",
    "normalize_virtual",
    "upload_temp_name",
]

# Uploads are written under this hidden name and renamed into place on success (see
# filesystem.AtomicUpload). Partners must never see or address these files: a
# partner who could would read half-written data or race the rename.
UPLOAD_TEMP_PREFIX = ".ftps-upload-"

# Longer client paths are refused outright: no legitimate partner needs them, and a
# bound keeps every per-path operation (and every audit line) small. Linux's PATH_MAX
# is 4096 bytes for the *real* path, home prefix included.
MAX_PATH_CHARS = 1024
# NAME_MAX on Linux filesystems (ext4, xfs, btrfs): longer names fail at the syscall
# with a confusing error, so they are refused up front.
MAX_NAME_BYTES = 255

# C0 controls and DEL. CR/LF would split a reply line or an audit record, NUL ends a
# C string; none belongs in a partner's file name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# An upload token goes into a file name: keep it to characters that need no quoting.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")

_INVALID = "invalid path"
_OUTSIDE = "outside home"


# N818: named for the verdict it carries; the adapters catch ``vfs.PathRefused``.
class PathRefused(GatewayError):  # noqa: N818
    """A client path was refused; ``reason`` is short and generic on purpose.

    The reason goes to the audit log; the client gets a generic 550 so that refusals
    do not describe the server's filesystem.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Resolved:
    """A client path after mapping: its normalized virtual form and its real path.

    A dataclass rather than a tuple so that a mount table can add fields (the mount,
    its access rights) without changing every caller.
    """

    virtual: str  # absolute, normalized: "/", "/in/report.csv"
    real: Path  # root-joined; containment already checked


def is_upload_temp(name: str) -> bool:
    """Return True if ``name`` (one path component) is a hidden upload temporary.

    Case-insensitive so that no spelling of the prefix can address a temporary file
    on a case-insensitive filesystem; refusing a few more names is the safe side.
    """
    return name.casefold().startswith(UPLOAD_TEMP_PREFIX)


def upload_temp_name(final_name: str, token: str) -> str:
    """Return the hidden name an upload to ``final_name`` is written under.

    ``f"{UPLOAD_TEMP_PREFIX}{token}-{final_name}"``, with ``final_name`` cut (at a
    character boundary) so the result fits in ``MAX_NAME_BYTES`` of UTF-8: any name a
    partner may upload to has a temporary name the filesystem accepts. The token
    keeps concurrent uploads to one name apart, even when the cut made their tails
    equal.

    Raises:
        ValueError: ``final_name`` is not a single path component, or ``token`` is
            not 1-64 of ``A-Z a-z 0-9 _ -``.
    """
    if not final_name or "/" in final_name or final_name in {".", ".."}:
        raise ValueError(f"not a file name: {final_name!r}")
    if _TOKEN.fullmatch(token) is None:
        raise ValueError(f"unsafe upload token: {token!r}")
    head = f"{UPLOAD_TEMP_PREFIX}{token}-"
    budget = MAX_NAME_BYTES - len(head.encode("utf-8"))
    kept: list[str] = []
    for char in final_name:
        # surrogateescape: the byte a non-UTF-8 name from os.listdir stands for.
        budget -= len(char.encode("utf-8", "surrogateescape"))
        if budget < 0:
            break
        kept.append(char)
    return head + "".join(kept)


def _check_component(name: str) -> None:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: not a name any client can mean
        raise PathRefused(_INVALID) from None
    if size > MAX_NAME_BYTES:
        raise PathRefused("name too long")
    if is_upload_temp(name):
        raise PathRefused(_INVALID)


def normalize_virtual(cwd: str, path: str) -> str:
    """Join ``path`` to the virtual ``cwd`` and collapse it; see HomeTree.normalize."""
    if _CONTROL.search(cwd) or _CONTROL.search(path):
        raise PathRefused(_INVALID)
    if len(path) > MAX_PATH_CHARS:
        raise PathRefused("path too long")
    joined = path if path.startswith("/") else f"{cwd}/{path}"
    parts: list[str] = []
    for name in joined.split("/"):
        if name in {"", "."}:
            continue
        _check_component(name)  # before "..": "/.ftps-upload-x/.." is refused too
        if name == "..":
            # RFC 959 leaves ".." above the root undefined; clients expect CDUP at
            # "/" to stay at "/", and anything else would leave the home.
            if parts:
                parts.pop()
        else:
            parts.append(name)
    virtual = "/" + "/".join(parts)
    if len(virtual) > MAX_PATH_CHARS:
        raise PathRefused("path too long")
    return virtual


class HomeTree:
    """One user's home directory seen as the virtual root "/".

    Mapping is two steps, kept apart so a mount table can sit between them later:
    ``normalize`` works on virtual paths only (pure string rules), ``to_real`` joins
    the result to the root and then checks, on the disk, that symlinks do not lead
    out of the home.

    Symlinks are followed when they stay inside the home and refused when they leave
    it. The check is made when the path is mapped, so it guards against links placed
    by local users or processes, not against one racing the FTP command (partners
    cannot create links over FTP); a race-free version needs ``openat2`` with
    ``RESOLVE_BENEATH`` on every open.
    """

    def __init__(self, root: Path) -> None:
        """Confine paths to ``root``.

        Raises:
            ValueError: ``root`` is not absolute (a relative root would move with the
                process's working directory).
            NotADirectoryError: ``root`` is not an existing directory.
        """
        if not root.is_absolute():
            raise ValueError(f"home must be an absolute path: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"home is not a directory: {root}")
        # Resolved once, so containment compares real paths with a real path even
        # when the configured storage root is itself reached through a symlink.
        self._root = root.resolve(strict=True)
        self._root_text = str(self._root)

    @property
    def root(self) -> Path:
        """The home directory, symlinks resolved."""
        return self._root

    def normalize(self, cwd: str, path: str) -> str:
        """Return the absolute, normalized virtual path ``path`` names from ``cwd``.

        POSIX rules on virtual paths only (the disk is not consulted): a relative
        ``path`` is joined to ``cwd``, repeated slashes and ``.`` collapse, ``..``
        removes the previous component but never climbs above "/". So
        ``/../../etc/passwd`` is ``/etc/passwd`` *inside the home*.

        Raises:
            PathRefused: a NUL or other control character, more than
                ``MAX_PATH_CHARS`` characters, a component over ``MAX_NAME_BYTES``
                bytes of UTF-8, or a component naming an upload temporary file.
        """
        return normalize_virtual(cwd, path)

    def to_real(self, virtual: str) -> Path:
        """Return the real path for ``virtual``, after checking it stays in the home.

        ``os.path.realpath`` resolves every symlink on the way, including a final
        dangling one (to where it points) and missing components (kept as they are),
        so a name to be created under a linked directory, or a dangling link whose
        target lies outside, is checked against where the data would really go.

        Raises:
            PathRefused: ``virtual`` is refused by ``normalize`` (it is normalized
                again, so callers cannot skip the string rules), or it resolves
                outside the home ("outside home").
        """
        virtual = normalize_virtual("/", virtual)
        names = [name for name in virtual.split("/") if name]
        real = self._root.joinpath(*names)
        if not self.is_inside(real):
            raise PathRefused(_OUTSIDE)
        return real

    def resolve(self, cwd: str, path: str) -> Resolved:
        """``normalize`` then ``to_real``, as one result."""
        virtual = normalize_virtual(cwd, path)
        return Resolved(virtual=virtual, real=self.to_real(virtual))

    def to_virtual(self, real: Path) -> str:
        """Return the virtual path of ``real``, a path under the home (for PWD).

        Lexical: it inverts ``to_real`` without consulting the disk. The result
        passes ``normalize``'s rules, so a name a partner could not have sent (a
        control character, an upload temporary) is refused rather than shown.

        Raises:
            PathRefused: ``real`` is not under the home, or its virtual form would
                be refused by ``normalize``.
        """
        text = os.path.normpath(os.fspath(real))
        if not text.startswith("/") or not self._contains(text):
            raise PathRefused(_OUTSIDE)
        relative = os.path.relpath(text, self._root_text)
        virtual = "/" if relative == "." else "/" + relative
        return normalize_virtual("/", virtual)

    def is_inside(self, real: str | os.PathLike[str]) -> bool:
        """Return True if ``real``, symlinks resolved, is the home or inside it.

        A relative ``real`` is False: resolving it would depend on the process's
        working directory, which pyftpdlib changes.
        """
        text = os.fspath(real)
        if not text.startswith("/"):
            return False
        try:
            resolved = os.path.realpath(text)
        except (OSError, ValueError):  # ValueError: embedded NUL
            return False
        return self._contains(resolved)

    def _contains(self, text: str) -> bool:
        # commonpath compares whole components: "/home/ann2" is not inside
        # "/home/ann", which a startswith() check would get wrong.
        try:
            return os.path.commonpath([self._root_text, text]) == self._root_text
        except ValueError:  # mixing absolute and relative paths
            return False

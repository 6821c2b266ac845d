"""File digests for HASH and the XSHA*/XMD5/XCRC commands (no IO loop, no FTP).

The algorithms by the names the two families of commands use:

- ``HASH`` (draft-bryan-ftpext-hash-02, section 3.1) names them as the IANA "Hash
  Function Textual Names" registry does: ``SHA-256``, ``SHA-512``, ``SHA-1``, ``MD5``;
- ProFTPD's mod_digest (``contrib/mod_digest.c``, ``get_algo_name``) answers the
  ``X*`` commands with ``SHA256``, ``SHA512``, ``SHA1``, ``MD5`` and ``CRC32``.

``digest_file`` reads with ``os.pread`` in 1 MiB chunks: hashlib and zlib release
the GIL on buffers that large, so a worker thread hashing a 1 GiB file leaves the IO
loop free. It runs on ``session.work.FileWork``, never on the loop.
"""

from __future__ import annotations

import hashlib
import os
import stat
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

CHUNK_BYTES: Final = 1 << 20


class Hasher(Protocol):
    """What a digest needs of a hash object (hashlib's, or ``_Crc32``)."""

    def update(self, data: bytes, /) -> None: ...
    def hexdigest(self) -> str: ...


class _Crc32:
    """CRC-32 (the ISO-HDLC/PKZip polynomial ProFTPD's XCRC uses) as a hash object."""

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes, /) -> None:
        self._value = zlib.crc32(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value:08x}"  # always 8 digits: leading zeros kept


@dataclass(frozen=True)
class Algorithm:
    """One digest algorithm and the names the two command families give it."""

    iana: str  # HASH, FEAT and OPTS HASH: "SHA-256"
    proftpd: str  # the X* commands' "Computing SHA256 digest" line
    new: Callable[[], Hasher]


ALGORITHMS: Final[dict[str, Algorithm]] = {
    algorithm.iana: algorithm
    for algorithm in (
        Algorithm("SHA-256", "SHA256", hashlib.sha256),
        Algorithm("SHA-512", "SHA512", hashlib.sha512),
        Algorithm("SHA-1", "SHA1", hashlib.sha1),
        Algorithm("MD5", "MD5", hashlib.md5),
        Algorithm("CRC32", "CRC32", _Crc32),
    )
}
# What HASH offers (FEAT) and selects by default. The draft (section 5) wants no
# default weaker than SHA-1; SHA-256 is what partners compare against today. CRC32
# stays out of HASH (it is no cryptographic hash) and serves XCRC only.
HASH_ALGORITHMS: Final = ("SHA-256", "SHA-512", "SHA-1", "MD5")
DEFAULT_HASH_ALGORITHM: Final = "SHA-256"


def find_algorithm(name: str) -> Algorithm | None:
    """The HASH algorithm called ``name`` (case-insensitive, as the draft says)."""
    wanted = name.upper()
    return next((ALGORITHMS[iana] for iana in HASH_ALGORITHMS if iana == wanted), None)


class NotARegularFileError(OSError):
    """The path is a folder or a special file: its digest is not defined."""


class RangeError(ValueError):
    """The requested byte range does not lie within the file."""


@dataclass(frozen=True)
class Digest:
    """A computed digest and the byte range ``[start, end)`` it covers."""

    hexdigest: str  # lowercase
    start: int
    end: int  # exclusive: end - start bytes were hashed


def digest_file(
    path: Path, algorithm: Algorithm, start: int = 0, end: int | None = None
) -> Digest:
    """Hash bytes ``[start, end)`` of the regular file at ``path``.

    ``end`` None means the end of the file. The file is opened once and its size
    taken from that descriptor, so a rename racing the command cannot mix two files.

    Raises:
        FileNotFoundError, PermissionError, OSError: the file cannot be read.
        NotARegularFileError: ``path`` is a folder or a special file.
        RangeError: ``start`` > ``end`` or ``end`` beyond the file's size.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotARegularFileError(f"not a regular file: {path}")
        stop = info.st_size if end is None else end
        if not 0 <= start <= stop <= info.st_size:
            raise RangeError(f"range {start}-{stop} outside 0-{info.st_size}")
        digest = algorithm.new()
        offset = start
        while offset < stop:
            chunk = os.pread(fd, min(CHUNK_BYTES, stop - offset), offset)
            if not chunk:  # truncated meanwhile: hash what was there
                break
            digest.update(chunk)
            offset += len(chunk)
        return Digest(digest.hexdigest(), start, offset)
    finally:
        os.close(fd)

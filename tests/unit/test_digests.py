"""File digests (storage.digests), the X* argument split and the upload-busy check."""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pytest

from ftps_gateway.ftp.hashverbs import split_range
from ftps_gateway.storage.digests import (
    ALGORITHMS,
    NotARegularFileError,
    RangeError,
    digest_file,
    find_algorithm,
)
from ftps_gateway.storage.uploads import AtomicUpload, upload_in_progress


@pytest.mark.parametrize("size", [0, 1, (1 << 20) + 3])
def test_digests_equal_hashlib_and_zlib(tmp_path: Path, size: int) -> None:
    """Every algorithm gives hashlib's (zlib's for CRC32) digest, whole and in part."""
    data = os.urandom(size)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = {
        "SHA-256": hashlib.sha256,
        "SHA-512": hashlib.sha512,
        "SHA-1": hashlib.sha1,
        "MD5": hashlib.md5,
    }
    for name, new in expected.items():
        assert digest_file(path, ALGORITHMS[name]).hexdigest == new(data).hexdigest()
        part = digest_file(path, ALGORITHMS[name], size // 3, size // 2)
        assert part.hexdigest == new(data[size // 3 : size // 2]).hexdigest()
        assert (part.start, part.end) == (size // 3, size // 2)
    crc = digest_file(path, ALGORITHMS["CRC32"]).hexdigest
    assert crc == f"{zlib.crc32(data):08x}"
    assert len(crc) == 8


def test_ranges_outside_the_file_and_folders_are_refused(tmp_path: Path) -> None:
    """An end past the size, a start after the end, or a folder raise."""
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    with pytest.raises(RangeError):
        digest_file(path, ALGORITHMS["MD5"], 0, 4)
    with pytest.raises(RangeError):
        digest_file(path, ALGORITHMS["MD5"], 2, 1)
    with pytest.raises(NotARegularFileError):
        digest_file(tmp_path, ALGORITHMS["MD5"])
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(NotARegularFileError):  # opened without blocking on a writer
        digest_file(tmp_path / "fifo", ALGORITHMS["MD5"])


def test_algorithm_names_are_case_insensitive_and_crc32_is_not_a_hash_choice() -> None:
    """OPTS HASH accepts any case of the IANA names; CRC32 serves XCRC only."""
    found = find_algorithm("sha-512")
    assert found is not None
    assert found.iana == "SHA-512"
    assert find_algorithm("CRC32") is None
    assert find_algorithm("SHA256") is None  # HASH uses the IANA spelling


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a.csv", ("a.csv", None, None)),
        ("a.csv 0 10", ("a.csv", 0, 10)),
        ("my report.csv 5 9", ("my report.csv", 5, 9)),
        ("report 2024.csv", ("report 2024.csv", None, None)),
        ("a.csv 10", ("a.csv 10", None, None)),
        ("a.csv -1 5", ("a.csv -1 5", None, None)),
        ("a.csv 0 99999999999999999999", ("a.csv 0 99999999999999999999", None, None)),
    ],
)
def test_x_command_arguments_split_a_trailing_range_only(
    line: str, expected: tuple[str, int | None, int | None]
) -> None:
    """Two trailing words of digits are a range; anything else is the path."""
    assert split_range(line) == expected


def test_upload_in_progress_sees_only_running_uploads(tmp_path: Path) -> None:
    """A running upload of any listed user is seen; a kept partial is not."""
    final = tmp_path / "d.csv"
    assert not upload_in_progress(final, ["ann", "bob"])
    upload = AtomicUpload(final, "/d.csv", "bob", retention_seconds=3600)
    upload.write(b"half")
    assert upload_in_progress(final, ["ann", "bob"])
    assert not upload_in_progress(final, ["ann"])
    upload.discard(keep=True)  # a resumable partial: nobody is writing it
    assert not upload_in_progress(final, ["ann", "bob"])
    assert not upload_in_progress(Path("/"), ["ann"])

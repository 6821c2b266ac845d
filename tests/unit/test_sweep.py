"""Partial-upload sweep (``filesystem.sweep_partials``)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import TEMP_MIN_AGE_SECONDS, sweep_partials

if TYPE_CHECKING:
    from pathlib import Path


def test_sweep_removes_a_crash_leftover_at_once_with_retention_0(
    tmp_path: Path,
) -> None:
    """An unlocked upload temporary older than the safety margin (a crash's
    leftover) goes at the next sweep; it used to wait for a minute."""
    leftover = tmp_path / vfs.upload_temp_name("report.csv", "t0ken")
    leftover.write_bytes(b"half")
    fresh = tmp_path / vfs.upload_temp_name("other.csv", "n3w")
    fresh.write_bytes(b"new")
    old = time.time() - TEMP_MIN_AGE_SECONDS - 5
    os.utime(leftover, (old, old))
    assert sweep_partials([tmp_path], 0) == 1
    assert not leftover.exists()
    assert fresh.exists()


def test_sweep_removes_old_style_leftovers(tmp_path: Path) -> None:
    """Temporaries named by the earlier version (final name appended) still go."""
    leftover = tmp_path / f"{vfs.UPLOAD_TEMP_PREFIX}t0ken-report.csv"
    leftover.write_bytes(b"half")
    old = time.time() - TEMP_MIN_AGE_SECONDS - 5
    os.utime(leftover, (old, old))
    assert sweep_partials([tmp_path], 0) == 1
    assert not leftover.exists()

"""FileAccess.remembering: one location per path within a command, none after it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ftps_gateway.session.fileaccess import FileAccess
from ftps_gateway.storage import vfs

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def access(tmp_path: Path) -> FileAccess:
    """A home at / with a folder ``in``; ``outside`` is not in any mount."""
    (tmp_path / "home" / "in").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    table = vfs.MountTable(
        [vfs.Mount("/", tmp_path / "home", vfs.ALL_PERMISSIONS, "home")]
    )
    return FileAccess(table, "user")


def test_a_command_locates_each_path_once(access: FileAccess, tmp_path: Path) -> None:
    """Within one block the relative and absolute spellings share one location."""
    with access.remembering():
        first = access.locate_from("/in", "x.bin")
        assert access.locate("/in/x.bin") is first
        assert access.locate_from("/", "in/x.bin") is first
    assert first.real == tmp_path / "home" / "in" / "x.bin"


def test_nothing_is_remembered_past_the_command(
    access: FileAccess, tmp_path: Path
) -> None:
    """A link made after the command is resolved afresh by the next one (refused)."""
    with access.remembering():
        assert access.locate("/in/x.bin").real is not None
    (tmp_path / "home" / "in").rename(tmp_path / "home" / "old")
    (tmp_path / "home" / "in").symlink_to(tmp_path / "outside")
    with pytest.raises(vfs.PathRefused, match="outside home"):
        access.locate("/in/x.bin")
    with access.remembering(), pytest.raises(vfs.PathRefused, match="outside home"):
        access.locate("/in/x.bin")

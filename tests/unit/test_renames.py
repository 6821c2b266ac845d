"""Rename without replacing (``storage.renames``): the kernel's way and the fallback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ftps_gateway.storage import renames

if TYPE_CHECKING:
    from pathlib import Path


def test_renameat2_is_available_here() -> None:
    """Linux with glibc 2.28+ (the deployment target) has renameat2."""
    assert renames._renameat2 is not None


@pytest.mark.parametrize(
    "rename", [renames.rename_noreplace, renames._rename_by_link_paths]
)
def test_an_existing_target_is_never_replaced(tmp_path: Path, rename: object) -> None:
    """Files and folders alike: EEXIST, and both names keep their content."""
    source, target = tmp_path / "a.csv", tmp_path / "b.csv"
    source.write_text("new")
    target.write_text("old")
    with pytest.raises(FileExistsError):
        rename(source, target)  # type: ignore[operator]
    assert (source.read_text(), target.read_text()) == ("new", "old")
    folder, taken = tmp_path / "dir", tmp_path / "taken"
    folder.mkdir()
    taken.mkdir()  # an empty folder: plain rename() would replace it
    with pytest.raises(FileExistsError):
        rename(folder, taken)  # type: ignore[operator]
    assert folder.is_dir()


@pytest.mark.parametrize(
    "rename", [renames.rename_noreplace, renames._rename_by_link_paths]
)
def test_a_free_target_is_renamed(tmp_path: Path, rename: object) -> None:
    """Files and folders move when nothing is in the way."""
    (tmp_path / "a.csv").write_text("x")
    rename(tmp_path / "a.csv", tmp_path / "b.csv")  # type: ignore[operator]
    assert [p.name for p in tmp_path.iterdir()] == ["b.csv"]
    (tmp_path / "d").mkdir()
    rename(tmp_path / "d", tmp_path / "e")  # type: ignore[operator]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "e"]

"""FileAccess: one location per path within a command, none after it; a login's
tree follows the configuration it logs in under."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ftps_gateway import config
from ftps_gateway.session.fileaccess import FileAccess
from ftps_gateway.storage import vfs
from support.configs import write_config
from support.credentials import PASSWORD_HASH

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


def test_nested_blocks_share_the_outer_memory(access: FileAccess) -> None:
    """An inner block reuses the outer one's locations and leaves them to it."""
    with access.remembering():
        first = access.locate("/in/x.bin")
        with access.remembering():
            assert access.locate("/in/x.bin") is first
        assert access.locate("/in/x.bin") is first
    assert access.locate("/in/x.bin") is not first


def _mount_config(
    directory: Path, cert_files: tuple[Path, Path, Path], source: str
) -> config.GatewayConfig:
    users = (
        f'[[users]]\nname = "acme"\npassword = "{PASSWORD_HASH}"\n'
        f'[[users.mounts]]\npath = "/m"\nsource = "{source}"\npermissions = "read"\n'
    )
    directory.mkdir()
    return config.load(write_config(directory, cert_files, users=users))


def test_each_login_follows_its_configuration_and_makes_its_folders(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A reloaded mount is the next login's; a removed home folder is made again."""
    first = _mount_config(tmp_path / "one", cert_files, "first")
    second = _mount_config(tmp_path / "two", cert_files, "second")
    for cfg, name in ((first, "first"), (second, "second"), (first, "first")):
        access = FileAccess.for_user(cfg, "acme")
        assert access.locate("/m").real == cfg.storage.root / name
    home = first.storage.root / "home" / "acme"
    home.rmdir()
    FileAccess.for_user(first, "acme")
    assert home.is_dir()

"""Path mapping under hostile input: only ``PathRefused`` escapes, nothing leaves a mount.

The tree has a home at "/", a group mount at "/finance" and a deeper one at
"/finance/in", plus symlinks planted by a local user: one inside a mount (allowed),
one to a sibling of the home, one into another mount's source, one dangling to the
outside. Every generated path either is refused or maps to a real path that, with
every symlink resolved, is its own mount's source or below it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ftps_gateway.ftp.filesystem import GatewayFS
from ftps_gateway.session.fileaccess import FileAccess
from ftps_gateway.storage import vfs

_NAMES = st.sampled_from(
    [
        "..",
        ".",
        "",
        "in",
        "finance",
        "report.csv",
        "link-in",
        "link-out",
        "link-sibling",
        "dangling",
        "..\\..",
        "a\x00b",
        "\r\nDELE x",
        "\udcff",
        "\ud800",
        "\u20ac",
        "\ufeff",
        "é",
        "e\u0301",
        "x" * 255,
        "x" * 256,
        "\u20ac" * 86,
        vfs.UPLOAD_TEMP_PREFIX + "0-x",
        ".FTPS-UPLOAD-1-y",
        "~",
        "$HOME",
        "*",
        "%2e%2e",
    ]
)
NAMES = st.one_of(_NAMES, st.text(max_size=12))
PATHS = (
    st.builds(
        lambda absolute, names, slash: (
            ("/" if absolute else "") + "/".join(names) + ("/" if slash else "")
        ),
        st.booleans(),
        st.lists(NAMES, max_size=8),
        st.booleans(),
    )
    | st.text(max_size=60)
    | st.sampled_from(["/" * 2000, "a/" * 600, "../" * 400])
)
# Non-UTF-8 bytes as pyftpdlib hands them on (decoded with "replace"), and as a
# filesystem name decoded by os.fsdecode (surrogateescape).
PATHS = (
    PATHS
    | st.binary(max_size=40).map(lambda raw: raw.decode("utf-8", "replace"))
    | st.binary(max_size=40).map(os.fsdecode)
)

FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> tuple[vfs.MountTable, Path]:
    """The mount table described in the module docstring, and its parent folder."""
    base = tmp_path_factory.mktemp("paths")
    home, finance, inbox = base / "home", base / "finance", base / "inbox"
    for folder in (home / "in", finance, inbox, base / "home-sibling"):
        folder.mkdir(parents=True)
    (home / "in" / "report.csv").write_text("x")
    (base / "home-sibling" / "secret").write_text("s")
    (home / "link-in").symlink_to(home / "in")
    (home / "link-out").symlink_to(base)
    (home / "link-sibling").symlink_to(base / "home-sibling")
    (home / "dangling").symlink_to(base / "nowhere" / "file")
    (finance / "link-other-mount").symlink_to(inbox)
    table = vfs.MountTable(
        [
            vfs.Mount("/", home, vfs.ALL_PERMISSIONS, "home", personal=True),
            vfs.Mount("/finance", finance, vfs.PRESETS["read"], "group finance"),
            vfs.Mount("/finance/in", inbox, vfs.PRESETS["dropbox"], "group finance"),
        ]
    )
    return table, base


def assert_confined(location: vfs.Location) -> None:
    """The real path, links resolved, is the mount's source or below it."""
    if location.mount is None:
        assert location.real is None
        return
    assert location.real is not None
    source = os.path.realpath(location.mount.source)
    real = os.path.realpath(location.real)
    assert os.path.commonpath([source, real]) == source, (location, real)
    assert location.virtual.startswith("/")
    assert not any(char in location.virtual for char in "\x00\r\n")
    assert len(location.virtual) <= vfs.MAX_PATH_CHARS


@given(cwd=PATHS, path=PATHS)
def test_locate_refuses_or_confines(
    layout: tuple[vfs.MountTable, Path], cwd: str, path: str
) -> None:
    """Any cwd and path: ``PathRefused`` or a real path inside the right mount."""
    table, _ = layout
    try:
        location = table.locate(cwd, path)
    except vfs.PathRefused:
        return
    assert_confined(location)
    assert table.mount_for(location.virtual) is location.mount
    # Mapping is idempotent: the virtual result maps to the same place again.
    assert location == table.locate("/", location.virtual)


@given(path=PATHS)
def test_normalize_is_idempotent_and_clean(path: str) -> None:
    """A normalized path normalizes to itself and has no ``..``, ``.`` or empty parts."""
    try:
        virtual = vfs.normalize_virtual("/", path)
    except vfs.PathRefused:
        return
    assert virtual == vfs.normalize_virtual("/", virtual)
    parts = virtual.split("/")[1:]
    assert virtual == "/" or all(part not in {"", ".", ".."} for part in parts)
    assert not any(vfs.is_upload_temp(part) for part in parts)


@given(path=PATHS)
def test_home_tree_round_trip(layout: tuple[vfs.MountTable, Path], path: str) -> None:
    """``to_virtual(to_real(p))`` is ``p`` for every path the home accepts."""
    _, base = layout
    tree = vfs.HomeTree(base / "home")
    try:
        resolved = tree.resolve("/", path)
    except vfs.PathRefused:
        return
    assert tree.is_inside(resolved.real)
    assert resolved.virtual == tree.to_virtual(resolved.real)


@given(name=NAMES, token=st.text(alphabet="abc019_-", min_size=1, max_size=64))
def test_upload_temp_names_fit_and_stay_hidden(name: str, token: str) -> None:
    """Every uploadable name has a temporary name within NAME_MAX that is refused."""
    try:
        virtual = vfs.normalize_virtual("/", name)
    except vfs.PathRefused:
        return
    assume(virtual != "/")
    final = virtual.rsplit("/", 1)[1]
    temp = vfs.upload_temp_name(final, token)
    assert len(temp.encode("utf-8", "surrogateescape")) <= vfs.MAX_NAME_BYTES
    with pytest.raises(vfs.PathRefused):
        vfs.normalize_virtual("/", temp)


class _Channel:
    """What GatewayFS needs of its control session: the user's file access."""

    def __init__(self, table: vfs.MountTable) -> None:
        self.file_access = FileAccess(table, "user")

    def on_access_refused(self, refusal: object, location: object) -> None:
        """Refusals are part of the answer; nothing to audit here."""


@FUZZ
@given(cwd=PATHS, path=PATHS)
def test_filesystem_adapter_never_raises_or_escapes(
    layout: tuple[vfs.MountTable, Path], cwd: str, path: str
) -> None:
    """GatewayFS (what pyftpdlib calls) answers OSError or confined paths, nothing else."""
    table, _ = layout
    fs = GatewayFS("/", _Channel(table))
    fs.cwd = cwd if cwd.startswith("/") else "/"
    virtual = fs.ftp2fs(path)
    valid = fs.validpath(virtual)
    assert _maps(table, virtual) == valid
    for probe in (fs.isdir, fs.isfile, fs.lexists):
        probe(virtual)
    if not valid:
        return
    try:  # pyftpdlib calls these only for valid paths and catches OSError only
        fs.listdir(virtual)
        real = fs._real(virtual)
    except OSError:
        return
    location = table.locate("/", virtual)
    assert_confined(location)
    assert real == str(location.real)


def _maps(table: vfs.MountTable, virtual: str) -> bool:
    try:
        table.locate("/", virtual)
    except vfs.PathRefused:
        return False
    return True

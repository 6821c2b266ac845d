"""Unit tests for ftps_gateway.vfs: normalization, refusals, symlink confinement."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from ftps_gateway.errors import GatewayError
from ftps_gateway.storage.vfs import (
    MAX_NAME_BYTES,
    UPLOAD_TEMP_PREFIX,
    HomeTree,
    PathRefused,
    Resolved,
    is_upload_temp,
    upload_temp_name,
)

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A home with a file and a subdirectory, next to an "outside" directory."""
    root = tmp_path / "home"
    (root / "in").mkdir(parents=True)
    (root / "in" / "report.csv").write_text("data")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    return root


@pytest.fixture
def tree(home: Path) -> HomeTree:
    return HomeTree(home)


# --- normalize ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cwd", "path", "expected"),
    [
        ("/", "", "/"),
        ("/", "/", "/"),
        ("/", ".", "/"),
        ("/", "..", "/"),  # CDUP at the root stays at the root
        ("/", "../..", "/"),
        ("/", "/../../etc/passwd", "/etc/passwd"),  # a virtual path inside the home
        ("/in", "../../../x", "/x"),
        ("/", "a/./b//c", "/a/b/c"),
        ("/", "//a///b", "/a/b"),
        ("/", "in/", "/in"),  # trailing slash
        ("/", "/in/report.csv", "/in/report.csv"),
        ("/in", "report.csv", "/in/report.csv"),
        ("/in", "/out", "/out"),  # absolute path ignores cwd
        ("/in", "..", "/"),
        ("/in/sub", "../x", "/in/x"),
        ("/a/b", "./../c/./d/..", "/a/c"),
        ("/", "...", "/..."),  # three dots is a name, not a parent
        ("/", "..a/b..", "/..a/b.."),
        ("/", "dir with spaces/ü.txt", "/dir with spaces/ü.txt"),
        ("/", "back\\slash", "/back\\slash"),  # a plain character on POSIX
        ("/", ".hidden", "/.hidden"),
        ("/", ".ftps-uploa", "/.ftps-uploa"),  # not quite the prefix
    ],
)
def test_normalize(tree: HomeTree, cwd: str, path: str, expected: str) -> None:
    """Virtual paths join, collapse and never climb above "/"."""
    assert tree.normalize(cwd, path) == expected


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("a\x00b", "invalid path"),
        ("file\r\nDELE x", "invalid path"),
        ("file\n", "invalid path"),
        ("tab\tname", "invalid path"),
        ("del\x7f", "invalid path"),
        ("\x1b[31mred", "invalid path"),
        ("next\x85line", "invalid path"),  # NEL: a line break to str.splitlines
        ("c1\x9bcontrol", "invalid path"),  # C1 CSI
        ("line\u2028sep", "invalid path"),
        ("para\u2029sep", "invalid path"),
        *(
            (f"invoice{chr(code)}fdp.exe", "invalid path")  # bidi: "invoiceexe.pdf"
            for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
        ),
        ("/" + "a/" * 513, "path too long"),
        ("a" * 1025, "path too long"),
        ("a" * 256, "name too long"),
        ("é" * 128, "name too long"),  # 256 bytes of UTF-8 in 128 characters
        ("\udcff", "invalid path"),  # lone surrogate
        (f"{UPLOAD_TEMP_PREFIX}abc-report.csv", "invalid path"),
        (f"/in/{UPLOAD_TEMP_PREFIX}abc-report.csv", "invalid path"),
        (f"/{UPLOAD_TEMP_PREFIX}x/..", "invalid path"),
        (f"{UPLOAD_TEMP_PREFIX.upper()}abc-x", "invalid path"),
        (UPLOAD_TEMP_PREFIX, "invalid path"),
    ],
)
def test_normalize_refuses(tree: HomeTree, path: str, reason: str) -> None:
    """Control characters, oversize paths/names and temp names are refused."""
    with pytest.raises(PathRefused) as excinfo:
        tree.normalize("/", path)
    assert excinfo.value.reason == reason
    assert str(excinfo.value) == reason


def test_normalize_limits_are_inclusive(tree: HomeTree) -> None:
    """Exactly 255 bytes per name and 1024 characters per path are accepted."""
    assert tree.normalize("/", "a" * 255) == "/" + "a" * 255
    path = "/" + "/".join(["b" * 200] * 5) + "/" + "c" * 18
    assert len(path) == 1024
    assert tree.normalize("/", path) == path


def test_normalize_refuses_long_result(tree: HomeTree) -> None:
    """A short relative path under a long cwd is refused once joined."""
    cwd = "/" + "/".join(["d" * 250] * 4)
    with pytest.raises(PathRefused, match="path too long"):
        tree.normalize(cwd, "e" * 30)


def test_normalize_refuses_bad_cwd(tree: HomeTree) -> None:
    """The cwd is checked too (it is joined into the result)."""
    with pytest.raises(PathRefused, match="invalid path"):
        tree.normalize("/in\n", "x")


def test_normalize_answers_the_same_when_asked_again(tree: HomeTree) -> None:
    """Kept answers depend on both cwd and path; a refusal is refused every time."""
    for _ in range(2):
        assert tree.normalize("/in", "x.bin") == "/in/x.bin"
        assert tree.normalize("/out", "x.bin") == "/out/x.bin"
        assert tree.normalize("/out", "../x.bin") == "/x.bin"
        with pytest.raises(PathRefused, match="invalid path"):
            tree.normalize("/", f"/in/{UPLOAD_TEMP_PREFIX}x")


def test_path_refused_is_gateway_error() -> None:
    """PathRefused is one of ours."""
    assert issubclass(PathRefused, GatewayError)


# --- to_real: containment ----------------------------------------------------------


def test_to_real_plain(tree: HomeTree, home: Path) -> None:
    """Plain paths map under the root; missing targets are fine (uploads, MKD)."""
    assert tree.to_real("/") == home
    assert tree.to_real("/in/report.csv") == home / "in" / "report.csv"
    assert tree.to_real("/in/new/deeper.txt") == home / "in" / "new" / "deeper.txt"


def test_to_real_climbing_stays_inside(tree: HomeTree, home: Path) -> None:
    """/../../etc/passwd maps to <home>/etc/passwd, never to /etc/passwd."""
    assert tree.to_real("/../../etc/passwd") == home / "etc" / "passwd"


def test_to_real_renormalizes(tree: HomeTree) -> None:
    """to_real applies normalize's refusals itself."""
    with pytest.raises(PathRefused, match="invalid path"):
        tree.to_real(f"/in/{UPLOAD_TEMP_PREFIX}t-x")
    with pytest.raises(PathRefused, match="invalid path"):
        tree.to_real("/in/\x00")


def link(path: Path, target: Path | str) -> Path:
    path.symlink_to(target)
    return path


def test_symlink_file_outside_refused(tree: HomeTree, home: Path) -> None:
    """A link to a file outside the home is refused."""
    link(home / "secret", home.parent / "outside" / "secret.txt")
    with pytest.raises(PathRefused, match="outside home"):
        tree.to_real("/secret")


def test_symlink_dir_outside_refused(tree: HomeTree, home: Path) -> None:
    """A link to a directory outside is refused, and so is everything under it."""
    link(home / "out", home.parent / "outside")
    for virtual in ("/out", "/out/secret.txt", "/out/new.txt", "/out/new/dir/x"):
        with pytest.raises(PathRefused, match="outside home"):
            tree.to_real(virtual)


def test_relative_symlink_outside_refused(tree: HomeTree, home: Path) -> None:
    """A relative link climbing out of the home is refused."""
    link(home / "in" / "up", "../../outside")
    with pytest.raises(PathRefused, match="outside home"):
        tree.to_real("/in/up/secret.txt")


def test_symlink_to_root_refused(tree: HomeTree, home: Path) -> None:
    """A link to / is refused."""
    link(home / "slash", "/")
    with pytest.raises(PathRefused, match="outside home"):
        tree.to_real("/slash/etc/passwd")


def test_symlink_inside_allowed(tree: HomeTree, home: Path) -> None:
    """Links that stay inside the home work; the lexical path is returned."""
    link(home / "alias", home / "in")
    link(home / "in" / "self", ".")
    link(home / "report", "in/report.csv")
    assert tree.to_real("/alias/report.csv") == home / "alias" / "report.csv"
    assert tree.to_real("/in/self/self/report.csv").read_text() == "data"
    assert tree.to_real("/report").read_text() == "data"


def test_dangling_symlink_outside_refused(tree: HomeTree, home: Path) -> None:
    """A dangling link whose target is outside is refused (STOR would create it)."""
    link(home / "drop", home.parent / "outside" / "planted.txt")
    with pytest.raises(PathRefused, match="outside home"):
        tree.to_real("/drop")


def test_dangling_symlink_inside_allowed(tree: HomeTree, home: Path) -> None:
    """A dangling link whose target would be inside is allowed."""
    link(home / "later", home / "in" / "not-yet.txt")
    assert tree.to_real("/later") == home / "later"


def test_symlink_chain_outside_refused(tree: HomeTree, home: Path) -> None:
    """A chain of links that ends outside is refused, whatever the hops."""
    link(home / "hop1", "hop2")
    link(home / "hop2", "in/hop3")
    link(home / "in" / "hop3", home.parent / "outside")
    with pytest.raises(PathRefused, match="outside home"):
        tree.to_real("/hop1/secret.txt")


def test_symlink_chain_inside_allowed(tree: HomeTree, home: Path) -> None:
    """A chain of links that ends inside is allowed."""
    link(home / "hop1", "hop2")
    link(home / "hop2", "in")
    assert tree.to_real("/hop1/report.csv").read_text() == "data"


def test_symlink_chain_out_and_back_allowed(tree: HomeTree, home: Path) -> None:
    """A chain passing outside but ending inside resolves inside: allowed."""
    link(home.parent / "outside" / "back", home / "in")
    link(home / "via", home.parent / "outside" / "back")
    assert tree.to_real("/via/report.csv").read_text() == "data"


def test_symlink_loop_does_not_escape(tree: HomeTree, home: Path) -> None:
    """A link loop neither hangs nor escapes (opening it fails with ELOOP later)."""
    link(home / "loop1", "loop2")
    link(home / "loop2", "loop1")
    real = tree.to_real("/loop1/x")
    assert tree.is_inside(real)


def test_sibling_with_common_prefix_is_outside(tmp_path: Path) -> None:
    """/x/home2 is not inside /x/home (component-wise comparison)."""
    (tmp_path / "home").mkdir()
    (tmp_path / "home2").mkdir()
    tree = HomeTree(tmp_path / "home")
    link(tmp_path / "home" / "twin", tmp_path / "home2")
    with pytest.raises(PathRefused, match="outside home"):
        tree.to_real("/twin")
    assert not tree.is_inside(str(tmp_path / "home2"))


def test_root_through_symlink(tmp_path: Path) -> None:
    """A home reached through a symlink is resolved once; its contents map inside."""
    (tmp_path / "real-home" / "in").mkdir(parents=True)
    link(tmp_path / "home-link", tmp_path / "real-home")
    tree = HomeTree(tmp_path / "home-link")
    assert tree.root == tmp_path / "real-home"
    assert tree.to_real("/in") == tmp_path / "real-home" / "in"


def test_resolve(tree: HomeTree, home: Path) -> None:
    """resolve returns the virtual and real forms together."""
    assert tree.resolve("/in", "../in/./report.csv") == Resolved(
        virtual="/in/report.csv", real=home / "in" / "report.csv"
    )


def test_resolve_refuses_escape(tree: HomeTree, home: Path) -> None:
    """resolve refuses what to_real refuses."""
    link(home / "out", home.parent / "outside")
    with pytest.raises(PathRefused, match="outside home"):
        tree.resolve("/", "out/secret.txt")


# --- to_virtual and is_inside ---------------------------------------------------------


@pytest.mark.parametrize(
    "virtual", ["/", "/in", "/in/report.csv", "/new/dir/file", "/ü ß/x y"]
)
def test_to_virtual_roundtrip(tree: HomeTree, virtual: str) -> None:
    """to_virtual inverts to_real."""
    assert tree.to_virtual(tree.to_real(virtual)) == virtual


def test_to_virtual_outside_refused(tree: HomeTree, home: Path) -> None:
    """Real paths outside the home have no virtual form."""
    for real in (home.parent, home.parent / "outside", home / ".." / "outside"):
        with pytest.raises(PathRefused, match="outside home"):
            tree.to_virtual(real)


def test_to_virtual_refuses_temp_names(tree: HomeTree, home: Path) -> None:
    """An upload temporary never gets a virtual name."""
    with pytest.raises(PathRefused, match="invalid path"):
        tree.to_virtual(home / "in" / upload_temp_name("x.csv", "tok"))


def test_is_inside_ignores_process_cwd(
    tree: HomeTree, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative paths are not inside, even when the process cwd is in the home."""
    monkeypatch.chdir(home / "in")
    assert not tree.is_inside("report.csv")


def test_to_virtual_relative_refused(tree: HomeTree) -> None:
    """A relative real path is refused, not resolved against the process cwd."""
    with pytest.raises(PathRefused):
        tree.to_virtual(tree.root.relative_to(tree.root.anchor))


def test_is_inside(tree: HomeTree, home: Path) -> None:
    """is_inside resolves symlinks and compares real paths."""
    link(home / "out", home.parent / "outside")
    link(home / "alias", home / "in")
    assert tree.is_inside(str(home))
    assert tree.is_inside(str(home / "in" / "report.csv"))
    assert tree.is_inside(home / "alias" / "report.csv")
    assert tree.is_inside(str(home / "missing" / "file"))
    assert not tree.is_inside(str(home / "out"))
    assert not tree.is_inside(str(home / "out" / "secret.txt"))
    assert not tree.is_inside(str(home.parent))
    assert not tree.is_inside("relative/path")
    assert not tree.is_inside(".")
    assert not tree.is_inside("\x00refused")


# --- construction ------------------------------------------------------------------


def test_root_must_be_absolute(home: Path) -> None:
    """A relative root is refused."""
    with pytest.raises(ValueError, match="absolute"):
        HomeTree(home.relative_to(home.anchor))


def test_root_must_exist(tmp_path: Path) -> None:
    """A missing root or a file as root is refused."""
    with pytest.raises(NotADirectoryError):
        HomeTree(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        HomeTree(tmp_path / "file")


# --- upload temporaries ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (".ftps-upload-abc-x.csv", True),
        (".ftps-upload-", True),
        (".FTPS-Upload-abc", True),
        ("ftps-upload-abc", False),
        (".ftps-upload", False),
        ("report.csv", False),
        ("", False),
    ],
)
def test_is_upload_temp(name: str, expected: bool) -> None:
    """Only names starting with the prefix (any case) are temporaries."""
    assert is_upload_temp(name) is expected


def test_upload_temp_name_shape() -> None:
    """prefix + token + ".part", recognised by is_upload_temp; never the real name's
    extension (``find -name '*.csv'`` must not pick up half-written data)."""
    name = upload_temp_name("report.csv", "0123abcd")
    assert name == ".ftps-upload-0123abcd.part"
    assert is_upload_temp(name)
    assert not name.endswith(".csv")


def test_old_style_upload_temporaries_are_still_recognised() -> None:
    """Leftovers of the version that appended the final name stay hidden and swept."""
    assert is_upload_temp(".ftps-upload-0123abcd-report.csv")


@pytest.mark.parametrize("char", ["a", "é", "日", "😀"])  # 1 to 4 UTF-8 bytes
def test_upload_temp_name_fits_name_max(char: str) -> None:
    """Any final name, however long, gets a short temporary name."""
    name = upload_temp_name(char * 255, "0" * 64)
    assert len(name.encode("utf-8")) <= MAX_NAME_BYTES
    assert name == f"{UPLOAD_TEMP_PREFIX}{'0' * 64}.part"


def test_upload_temp_name_distinct_tokens_distinct_names() -> None:
    """Two uploads to the same long name still get distinct temporaries."""
    final = "x" * 255
    assert upload_temp_name(final, "aaaa") != upload_temp_name(final, "bbbb")


@pytest.mark.parametrize(
    ("final", "token"),
    [
        ("", "tok"),
        ("a/b", "tok"),
        (".", "tok"),
        ("..", "tok"),
        ("x", ""),
        ("x", "../.."),
        ("x", "a b"),
        ("x", "t" * 65),
    ],
)
def test_upload_temp_name_refuses(final: str, token: str) -> None:
    """Multi-component names and unsafe tokens are programming errors."""
    with pytest.raises(ValueError, match=r"not a file name|unsafe upload token"):
        upload_temp_name(final, token)

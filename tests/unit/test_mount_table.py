"""Unit tests for the mount table (vfs.MountTable), tree planning and explain."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftps_gateway import cli, config
from ftps_gateway.config import tree as mounts
from ftps_gateway.errors import ConfigError
from ftps_gateway.storage import vfs
from support.configs import write_config
from support.credentials import PASSWORD_HASH

P = vfs.Permission


@pytest.fixture
def table(tmp_path: Path) -> vfs.MountTable:
    """Home at /, /finance read-only, /finance/drop dropbox, /a/b/deep read-write."""
    for name in ("home", "finance", "drop", "deep", "outside"):
        (tmp_path / name).mkdir()
    return vfs.MountTable(
        [
            vfs.Mount(
                "/", tmp_path / "home", vfs.ALL_PERMISSIONS, "home", personal=True
            ),
            vfs.Mount("/finance", tmp_path / "finance", vfs.PRESETS["read"], "group f"),
            vfs.Mount(
                "/finance/drop", tmp_path / "drop", vfs.PRESETS["dropbox"], "group o"
            ),
            vfs.Mount("/a/b/deep", tmp_path / "deep", vfs.ALL_PERMISSIONS, "user"),
        ]
    )


def test_longest_prefix_decides(table: vfs.MountTable, tmp_path: Path) -> None:
    """A path belongs to the deepest mount above it, with that mount's permissions."""
    cases = {
        "/x.txt": ("/", tmp_path / "home" / "x.txt"),
        "/finance": ("/finance", tmp_path / "finance"),
        "/finance/q1.csv": ("/finance", tmp_path / "finance" / "q1.csv"),
        "/finance/drop/in.csv": ("/finance/drop", tmp_path / "drop" / "in.csv"),
        "/financed": ("/", tmp_path / "home" / "financed"),  # not a prefix match
        "/a/b/deep/z": ("/a/b/deep", tmp_path / "deep" / "z"),
    }
    for path, (mount, real) in cases.items():
        location = table.locate("/", path)
        assert location.mount is not None
        assert (mount, real) == (location.mount.virtual, location.real)
    assert table.locate("/", "/finance/drop/x").permissions == {P.UPLOAD}


def test_traversal_never_leaves_the_mount(
    table: vfs.MountTable, tmp_path: Path
) -> None:
    """.. from inside a mount is virtual: it climbs the tree, never the disk."""
    location = table.locate("/finance/drop", "../../../../outside/secret")
    assert location.virtual == "/outside/secret"
    assert location.real == tmp_path / "home" / "outside" / "secret"


def test_symlink_out_of_a_mount_is_refused(
    table: vfs.MountTable, tmp_path: Path
) -> None:
    """Links leading outside the mount, or into another mount's source, are refused."""
    (tmp_path / "finance" / "out").symlink_to(tmp_path / "outside")
    (tmp_path / "finance" / "home").symlink_to(tmp_path / "home")
    (tmp_path / "finance" / "inside").symlink_to(tmp_path / "finance")
    for path in ("/finance/out/x", "/finance/home", "/finance/home/y"):
        with pytest.raises(vfs.PathRefused, match="outside home"):
            table.locate("/", path)
    assert table.locate("/", "/finance/inside").real == tmp_path / "finance" / "inside"


def test_virtual_directories_and_children(table: vfs.MountTable) -> None:
    """Ancestors of mount points are structural and list their mount points."""
    assert table.is_structural("/a")
    assert table.is_structural("/finance")
    assert not table.is_structural("/finance/q1.csv")
    assert set(table.children("/")) == {"finance", "a"}
    assert table.children("/a") == {"b": None}
    assert set(table.children("/finance")) == {"drop"}


def test_home_false_root_is_virtual(tmp_path: Path) -> None:
    """Without a home, / is a virtual directory and paths outside mounts are refused."""
    (tmp_path / "f").mkdir()
    table = vfs.MountTable([vfs.Mount("/f", tmp_path / "f", vfs.PRESETS["read"], "g")])
    root = table.locate("/", "/")
    assert (root.mount, root.real, root.permissions) == (None, None, frozenset())
    with pytest.raises(vfs.PathRefused, match="no such folder"):
        table.locate("/", "/elsewhere.txt")


def test_duplicate_and_malformed_mounts_are_refused(tmp_path: Path) -> None:
    """Two mounts at one path name both; paths must be normalized, sources absolute."""
    with pytest.raises(ValueError, match="mounted twice: group a .* and group b"):
        vfs.MountTable([vfs.Mount("/x", tmp_path, frozenset(), "group a"),
                        vfs.Mount("/x", tmp_path, frozenset(), "group b")])  # fmt: skip
    with pytest.raises(ValueError, match="not normalized"):
        vfs.MountTable([vfs.Mount("/x/", tmp_path, frozenset(), "g")])
    with pytest.raises(ValueError, match="not absolute"):
        vfs.MountTable([vfs.Mount("/x", Path("rel"), frozenset(), "g")])


def test_missing_source_is_unavailable(tmp_path: Path) -> None:
    """A mount whose folder is gone refuses its paths instead of failing the session."""
    table = vfs.MountTable(
        [vfs.Mount("/", tmp_path / "gone", vfs.ALL_PERMISSIONS, "h")]
    )
    with pytest.raises(vfs.PathRefused, match="folder unavailable"):
        table.locate("/", "/x")


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("read", {P.LIST, P.DOWNLOAD}),
        ("dropbox", {P.UPLOAD}),
        ("read-write", set(P)),
        ("none", set()),
        (["read", "upload"], {P.LIST, P.DOWNLOAD, P.UPLOAD}),
        (["delete"], {P.DELETE}),
    ],
)
def test_parse_permissions(words: str | list[str], expected: set[P]) -> None:
    """Presets and words combine."""
    assert vfs.parse_permissions(words) == expected


def test_unknown_permission_names_the_known_ones() -> None:
    """A typo lists what would have been accepted."""
    with pytest.raises(ValueError, match="unknown permission 'wirte' .*overwrite"):
        vfs.parse_permissions(["wirte"])


def test_expand_source(tmp_path: Path) -> None:
    """{user} and relative sources expand under storage.root; other braces refused."""
    assert vfs.expand_source("out/{user}", "acme", tmp_path) == tmp_path / "out/acme"
    assert vfs.expand_source("/srv/x", "acme", tmp_path) == Path("/srv/x")
    for bad in ("{users}", "a{", "{user"):
        with pytest.raises(ValueError, match="placeholder|brace"):
            vfs.expand_source(bad, "acme", tmp_path)


def test_partial_token_is_per_user_and_name() -> None:
    """Another user, or another name, gives another temporary file."""
    token = vfs.partial_token("acme", "a.csv")
    assert token == vfs.partial_token("acme", "a.csv")
    assert token != vfs.partial_token("beta", "a.csv")
    assert token != vfs.partial_token("acme", "b.csv")


def test_usage_counts_files_once_and_temps_as_bytes(tmp_path: Path) -> None:
    """Nested roots count once; upload temporaries count bytes but not files."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b").write_bytes(b"x" * 5)
    (tmp_path / "sub" / ".ftps-upload-t-c").write_bytes(b"x" * 3)
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert vfs.usage([tmp_path, tmp_path / "sub"]) == vfs.Usage(18, 2)


# --- config and explain ---------------------------------------------------------------

GROUPS = """
[[groups]]
name = "finance"
[[groups.mounts]]
path = "/finance"
source = "shared/finance"
permissions = "read"
quota_bytes = 1000000
[[groups.mounts]]
path = "/outbound"
source = "shared/outbound/{user}"
permissions = "dropbox"

[[groups]]
name = "ops"
[[groups.mounts]]
path = "/finance/drop"
source = "shared/drop"
permissions = ["upload", "list"]
"""


def load(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], users: str, storage: str = ""
) -> Path:
    """Write a config with ``storage`` keys, GROUPS and ``users``; return its path."""
    return write_config(tmp_path, cert_files, users=storage + GROUPS + users)


def user(name: str, extra: str = "") -> str:
    """A [[users]] section."""
    return f'[[users]]\nname = "{name}"\npassword = "{PASSWORD_HASH}"\n{extra}\n'


def problems(path: Path) -> list[str]:
    """The config problems, without the file prefix."""
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    return [line.split(": ", 1)[1] for line in caught.value.problems]


def test_config_reads_groups_and_user_trees(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Groups, user mounts, quotas and retention land in the config."""
    path = load(tmp_path, cert_files, storage="partial_retention_seconds = 60\n", users=user(
        "acme", 'groups = ["finance", "ops"]\nhome_permissions = "read"\n'
        "quota_bytes = 5000\n"
        '[[users.mounts]]\npath = "/own"\nsource = "/tmp/own-{user}"\n'
        'permissions = ["list", "upload"]\nquota_files = 3\n'
    ))  # fmt: skip
    cfg = config.load(path)
    acme = cfg.user("acme")
    assert acme is not None
    assert acme.groups == ("finance", "ops")
    assert acme.home_permissions == {P.LIST, P.DOWNLOAD}
    assert (acme.max_bytes, acme.max_files) == (5000, None)
    assert acme.mounts[0].max_files == 3
    assert cfg.storage.partial_retention_seconds == 60
    plan = mounts.plan_tree(cfg, acme)
    assert [p.mount.virtual for p in plan.mounts] == [
        "/", "/finance", "/outbound", "/finance/drop", "/own"]  # fmt: skip
    by_path = {p.mount.virtual: p.mount for p in plan.mounts}
    assert by_path["/outbound"].source == cfg.storage.root / "shared/outbound/acme"
    assert by_path["/outbound"].personal
    assert not by_path["/finance"].personal
    assert by_path["/own"].source == Path("/tmp/own-acme")


@pytest.mark.parametrize(
    ("users", "expected"),
    [
        (
            user("acme", 'groups = ["nope"]'),
            ["users[0].groups[0]: no group named 'nope'"],
        ),
        (
            user(
                "acme",
                'groups = ["finance"]\n[[users.mounts]]\npath = "/finance"\n'
                'source = "x"\npermissions = "read"',
            ),
            [
                "users[0].mounts[0]: /finance is mounted twice for user 'acme': "
                "groups[0].mounts[0] (group finance, source 'shared/finance') and "
                "users[0].mounts[0] (user, source 'x')"
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "/"\nsource = "x"\npermissions = "read"',
            ),
            [
                "users[0].mounts[0]: / is mounted twice for user 'acme': users[0] (home, "
                "source 'home/acme') and users[0].mounts[0] (user, source 'x')"
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "/all"\nsource = "."\npermissions = "read"',
            ),
            [
                "users[0].mounts[0].source: would expose storage.root (every home); "
                "mount a folder inside it"
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "/h"\nsource = "home"\npermissions = "read"',
            ),
            [
                "users[0].mounts[0].source: would expose every user's home; mount one "
                "folder inside it"
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "/up"\nsource = "../x"\npermissions = "read"',
            ),
            [
                "users[0].mounts[0].source: a relative source must stay under "
                "storage.root (no ..)"
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "/etc"\nsource = "/"\npermissions = "read"',
            ),
            [
                "users[0].mounts[0].source: would expose storage.root (every home); "
                "mount a folder inside it"
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "x/../y"\nsource = "s"\n'
                'permissions = ["read", "fly"]\nquota_bytes = 0',
            ),
            [
                "users[0].mounts[0].path: must be an absolute virtual path such as "
                "/finance (got 'x/../y')",
                "users[0].mounts[0].quota_bytes: must be 1 to 4611686018427387904 (got 0)",
                "users[0].mounts[0].permissions: unknown permission 'fly' (known: read, "
                "dropbox, read-write, none, list, download, upload, overwrite, delete, "
                "rename, mkdir, hash)",
            ],
        ),
        (
            user(
                "acme",
                '[[users.mounts]]\npath = "/a/"\nsource = "{usr}"\npermissions = 3',
            ),
            [
                "users[0].mounts[0].path: not in normal form; write '/a' (got '/a/')",
                "users[0].mounts[0].source: unknown placeholder {usr} (only {user}) "
                "(got '{usr}')",
                "users[0].mounts[0].permissions: must be a preset name or an array of "
                "permission words (got 3)",
            ],
        ),
    ],
)
def test_config_tree_problems(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    users: str,
    expected: list[str],
) -> None:
    """Each tree mistake is one message under the key that fixes it."""
    assert sorted(expected) == sorted(problems(load(tmp_path, cert_files, users)))


def test_source_holding_the_tls_key_is_refused(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A mount must not expose the gateway's own secrets."""
    key_dir = cert_files[1].parent
    extra = f'[[users.mounts]]\npath = "/k"\nsource = "{key_dir}"\npermissions = "read"'
    found = problems(load(tmp_path, cert_files, user("acme", extra)))
    assert found == [
        f"users[0].mounts[0].source: would expose the gateway's own file {cert_files[1]}"
    ]


def test_explain_for_a_user_in_two_groups(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """explain prints each mount's source, origin, permissions, quota and warnings."""
    path = load(tmp_path, cert_files, user(
        "acme", 'groups = ["finance", "ops"]\nquota_files = 10\n'
        '[[users.mounts]]\npath = "/peek"\nsource = "home/beta"\npermissions = "read"'
    ) + user("beta"))  # fmt: skip
    assert cli.main(["explain", "acme", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    root = tmp_path / "storage"
    expected = f"""User acme
Groups: finance, ops
Home: mounted at /
Tree (the longest matching path decides):
  /
    source:      {root}/home/acme
    from:        home (users[0])
    permissions: read-write (list, download, upload, overwrite, delete, rename, mkdir, hash)
    counts in:   the user's quota
  /finance
    source:      {root}/shared/finance
    from:        group finance (groups[0].mounts[0])
    permissions: read (list, download)
    quota:       1000000 bytes (976.6 KiB)
  /finance/drop
    source:      {root}/shared/drop
    from:        group ops (groups[1].mounts[0])
    permissions: list, upload
  /outbound
    source:      {root}/shared/outbound/acme
    from:        group finance (groups[0].mounts[1])
    permissions: dropbox (upload)
    counts in:   the user's quota
  /peek
    source:      {root}/home/beta
    from:        user (users[0].mounts[0])
    permissions: read (list, download)
    counts in:   the user's quota
User quota: 10 files
Interrupted uploads: discarded (storage.partial_retention_seconds = 0)
Login from: every address
TLS: versions 1.2-1.3; data connections must resume the control connection's TLS \
session ([tls] reuse)
Sessions: at most 8 at once
warning: /peek exposes the home of user 'beta' (read (list, download))
"""
    assert expected == out


def test_explain_home_false_shows_virtual_root(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without a home, / is listed as virtual; an unknown user exits 1."""
    path = load(tmp_path, cert_files, user("acme", 'groups = ["ops"]\nhome = false'))
    assert cli.main(["explain", "acme", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "  /  (virtual: lists its mount points, nothing else)" in out
    assert "  /finance  (virtual: lists its mount points, nothing else)" in out
    assert cli.main(["explain", "nobody", "--config", str(path)]) == cli.EXIT_FAILURE
    assert capsys.readouterr().err == "error: no user named 'nobody'\n"


def test_sweep_roots_are_upload_folders(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Partials are only looked for where someone can upload."""
    cfg = config.load(load(tmp_path, cert_files, user("acme", 'groups = ["finance"]')))
    root = cfg.storage.root
    assert mounts.sweep_roots(cfg) == sorted(
        [root / "home/acme", root / "shared/outbound/acme"]
    )


def test_explain_shows_login_networks_and_tls_policy(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The partner-facing policy is part of a user's picture, not only its tree."""
    path = load(tmp_path, cert_files, user(
        "acme", 'allow = ["198.51.100.0/24"]\nreuse = "ip-match"\nmax_version = "1.2"'
    ))  # fmt: skip
    assert cli.main(["explain", "acme", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert "Login from: 198.51.100.0/24 (users allow), within every address" in out
    assert (
        "TLS: versions 1.2-1.3; data connections need the control connection's "
        "address only (user); data connections at most TLS 1.2 (user)"
    ) in out


def test_check_config_prints_tree_warnings(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An operator running check-config sees a mount that exposes another home."""
    path = load(tmp_path, cert_files, user(
        "acme",
        '[[users.mounts]]\npath = "/peek"\nsource = "home/beta"\npermissions = "read"',
    ) + user("beta"))  # fmt: skip
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert (
        "warning: user acme: /peek exposes the home of user 'beta' "
        "(read (list, download))"
    ) in out

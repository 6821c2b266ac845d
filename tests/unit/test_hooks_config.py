"""``[[hooks]]``: one case per rule, with the exact ``check-config`` line and exit 3."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ftps_gateway import cli, config
from ftps_gateway.config import HookSettings
from ftps_gateway.errors import ConfigError
from support.configs import write_config

SCRIPT = Path(sys.executable)
SECRET = "hook.secret"


def _hooks_config(
    directory: Path, cert_files: tuple[Path, Path, Path], hooks: str
) -> Path:
    """A test config with ``hooks`` appended, a secret file and a group."""
    (directory / SECRET).write_text("s3cret\r\n\n")
    groups = '[[groups]]\nname = "finance"\n[[groups.mounts]]\npath = "/fin"\n'
    groups += 'source = "fin"\npermissions = "read"\n'
    return write_config(directory, cert_files, sections=groups + hooks)


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    return [line.removeprefix(f"{path}: ") for line in caught.value.problems]


URL = 'url = "https://hooks.example.com/in"\nsecret_file = "hook.secret"\n'
REJECTED = [
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\n',
        ["hooks[0]: no action: give command (a program to run) or url (to POST to)"],
        id="no-action",
    ),
    pytest.param(
        f'[[hooks]]\nevents = ["upload"]\ncommand = ["{SCRIPT}"]\n{URL}',
        ["hooks[0]: both command and url; a hook has exactly one action"],
        id="both-actions",
    ),
    pytest.param(
        f'[[hooks]]\nevents = ["upload", "uplaod"]\n{URL}',
        [
            "hooks[0].events[1]: unknown event (known: upload, download, delete, "
            "rename, mkdir, rmdir, login-failed, ban) (got 'uplaod')"
        ],
        id="unknown-event",
    ),
    pytest.param(
        f"[[hooks]]\n{URL}",
        ["hooks[0].events: required key is missing"],
        id="no-events",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\ncommand = ["bin/ingest", "--x"]\n',
        [
            "hooks[0].command[0]: must be an absolute path (the command runs without"
            " a shell and without a PATH search) (got 'bin/ingest')"
        ],
        id="relative-command-path",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\ncommand = ["/nonexistent/ingest"]\n',
        [
            "hooks[0].command[0]: cannot use: No such file or directory "
            "(got '/nonexistent/ingest')"
        ],
        id="missing-program",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\ncommand = ["{dir}/data.txt"]\n',
        ["hooks[0].command[0]: not an executable file (got '{dir}/data.txt')"],
        id="not-executable",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\ncommand = []\n',
        ["hooks[0].command: must be a non-empty array of strings (an argv) (got [])"],
        id="empty-argv",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\nurl = "https://h.example/"\n'
        'secret_file = "missing.secret"\n',
        [
            "hooks[0].secret_file: cannot read: No such file or directory (got '{dir}/missing.secret')"
        ],
        id="missing-secret",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\nurl = "https://h.example/"\nsecret_file = "."\n',
        ["hooks[0].secret_file: cannot read: Is a directory (got '{dir}')"],
        id="unreadable-secret-even-as-root",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\nurl = "https://h.example/"\n',
        [
            "hooks[0].secret_file: required for a url hook (its HMAC-SHA256 signature key)"
        ],
        id="no-secret",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\nurl = "http://hooks.example.com/in"\n'
        'secret_file = "hook.secret"\n',
        [
            "hooks[0].url: must be https:// (http:// only to a loopback host: events"
            " name partners and files) (got 'http://hooks.example.com/in')"
        ],
        id="http-not-loopback",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\nurl = "ftp://h.example/"\nsecret_file = "hook.secret"\n',
        ["hooks[0].url: must be an https:// URL (got 'ftp://h.example/')"],
        id="not-http",
    ),
    pytest.param(
        '[[hooks]]\nevents = ["upload"]\nurl = "https://u:p@h.example/"\n'
        'secret_file = "hook.secret"\n',
        [
            "hooks[0].url: must not carry user:password (receivers check the"
            " signature instead) (got 'https://u:p@h.example/')"
        ],
        id="credentials-in-url",
    ),
    pytest.param(
        f'[[hooks]]\nevents = ["upload"]\ncommand = ["{SCRIPT}"]\nsecret_file = "hook.secret"\n',
        ["hooks[0].secret_file: only for url hooks"],
        id="secret-with-command",
    ),
    pytest.param(
        f'[[hooks]]\nevents = ["upload"]\nusers = ["acme", "nobody"]\ngroups = ["ops"]\n{URL}',
        [
            "hooks[0].users[1]: not a configured user (got 'nobody')",
            "hooks[0].groups[0]: not a configured group (got 'ops')",
        ],
        id="unknown-user-and-group",
    ),
    pytest.param(
        f'[[hooks]]\nevents = ["upload"]\npaths = ["inbox/*"]\n{URL}',
        [
            "hooks[0].paths[0]: must be an absolute virtual path glob, such as \"/inbox/*\" (got 'inbox/*')"
        ],
        id="relative-glob",
    ),
    pytest.param(
        f'[[hooks]]\nname = "a"\nevents = ["upload"]\n{URL}[[hooks]]\nname = "a"\n'
        f'events = ["ban"]\n{URL}',
        ["hooks[1].name: duplicate hook name, also hooks[0] (got 'a')"],
        id="duplicate-name",
    ),
    pytest.param(
        f'[[hooks]]\nevents = ["upload"]\ntimeout_seconds = 0\nmax_attempts = 0\n'
        f"max_age_seconds = 59\nextra = 1\n{URL}",
        [
            "hooks[0].timeout_seconds: must be 1 to 3600 (got 0)",
            "hooks[0].max_attempts: must be 1 to 1000 (got 0)",
            "hooks[0].max_age_seconds: must be 60 to 2592000 (got 59)",
            "hooks[0].extra: unknown key",
        ],
        id="ranges-and-typos",
    ),
]


@pytest.mark.parametrize(("hooks", "expected"), REJECTED)
def test_rejected(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], hooks: str, expected: list[str]
) -> None:
    """Each mistake is one problem line naming its key."""
    (tmp_path / "data.txt").write_text("not a program")
    path = _hooks_config(tmp_path, cert_files, hooks.replace("{dir}", str(tmp_path)))
    wanted = [line.replace("{dir}", str(tmp_path)) for line in expected]
    assert _problems(path) == wanted


def test_unreadable_secret_is_reported(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A secret the service user cannot read is a problem at load, not at delivery."""
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = _hooks_config(tmp_path, cert_files, f'[[hooks]]\nevents = ["ban"]\n{URL}')
    (tmp_path / SECRET).chmod(0)
    assert _problems(path) == [
        f"hooks[0].secret_file: cannot read: Permission denied (got '{tmp_path / SECRET}')"
    ]


def test_empty_secret_is_refused(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A secret file holding only newlines gives no key at all."""
    path = _hooks_config(tmp_path, cert_files, f'[[hooks]]\nevents = ["ban"]\n{URL}')
    (tmp_path / SECRET).write_text("\n")
    assert _problems(path) == [
        f"hooks[0].secret_file: empty: a signature needs a secret (got '{tmp_path / SECRET}')"
    ]


def test_accepted_hooks_and_their_defaults(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """Defaults: the name from the position, 30 s, 20 attempts, a day; the secret
    without trailing newlines; http to loopback allowed."""
    hooks = (
        f'[[hooks]]\nevents = ["upload", "rename"]\nusers = ["acme"]\n'
        f'groups = ["finance"]\npaths = ["/in/*"]\n{URL}'
        '[[hooks]]\nname = "local"\nevents = ["ban"]\n'
        'url = "http://127.0.0.1:8080/x"\nsecret_file = "hook.secret"\n'
        '[[hooks]]\nname = "v6"\nevents = ["ban"]\nurl = "http://[::1]:8080/"\n'
        'secret_file = "hook.secret"\n'
        f'[[hooks]]\nname = "run"\nevents = ["delete"]\ncommand = ["{SCRIPT}", "-V"]\n'
        "timeout_seconds = 5\nmax_attempts = 3\nmax_age_seconds = 600\n"
    )
    cfg = config.load(_hooks_config(tmp_path, cert_files, hooks))
    first, local, v6, run = cfg.hooks
    assert first == HookSettings(
        name="hooks[0]", key="hooks[0]", events=frozenset({"upload", "rename"}),
        users=frozenset({"acme"}), groups=frozenset({"finance"}), paths=("/in/*",),
        url="https://hooks.example.com/in", secret=b"s3cret",
        secret_file=tmp_path / SECRET,
    )  # fmt: skip
    assert (first.timeout_seconds, first.max_attempts, first.max_age_seconds) == (
        30, 20, 86400,
    )  # fmt: skip
    assert (local.kind, v6.kind, run.kind) == ("url", "url", "command")
    assert run.command == (str(SCRIPT), "-V")
    assert (run.timeout_seconds, run.max_attempts, run.max_age_seconds) == (5, 3, 600)
    assert "s3cret" not in repr(first)
    summary = config.summary(cfg)
    assert "s3cret" not in summary
    assert (
        "Hook hooks[0]: upload, rename -> POST https://hooks.example.com/in, signed; "
        "only users acme; groups finance; paths /in/*; timeout 30 s, at most 20 "
        "attempts within 86400 s"
    ) in summary.splitlines()
    assert (
        f"Hook run: delete -> run {SCRIPT} (+1 arguments); timeout 5 s, at most 3 "
        "attempts within 600 s"
    ) in summary.splitlines()


def test_a_mount_may_not_expose_the_spool_or_a_hook_secret(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """The gateway's state folder and hook secrets are never mount sources."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / SECRET).write_text("s3cret\n")
    hooks = (
        '[[hooks]]\nevents = ["ban"]\nurl = "https://h.example/"\n'
        f'secret_file = "{tmp_path / "secrets" / SECRET}"\n'
    )
    users = (
        '[[users]]\nname = "acme"\npassword = "$argon2id$v=19$m=8,t=1,p=1$'
        'c29tZXNhbHRzb21lc2FsdA$qrvyLEgxMgDcJrYENoZi7eJ6gZO2e0ZGzsONiuU5rr0"\n'
        '[[users.mounts]]\npath = "/spool"\nsource = ".ftps-gateway/hooks"\n'
        'permissions = "read"\n'
        f'[[users.mounts]]\npath = "/keys"\nsource = "{tmp_path / "secrets"}"\n'
        'permissions = "read"\n'
    )
    path = write_config(tmp_path, cert_files, users=users, sections=hooks)
    problems = _problems(path)
    assert any(
        "would expose the gateway's own state (admin socket, hook spool)" in p
        for p in problems
    ), problems
    assert any("would expose the gateway's own file" in p for p in problems), problems


def test_check_config_exits_3_naming_the_hook_key(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``check-config`` prints the hook's key path and exits 3."""
    path = _hooks_config(
        tmp_path, cert_files, '[[hooks]]\nevents = ["upload", "uplaod"]\n'
    )
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{path}: hooks[0]: no action: give command" in err
    assert f"{path}: hooks[0].events[1]: unknown event" in err
    assert "Traceback" not in err

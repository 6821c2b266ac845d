"""``[[hooks]]``: what to run or call when a file arrives (issue 16), checked at load.

Each hook names the happenings it wants (``events``), optional filters (``users``,
``groups``, ``paths``) and exactly one action: a ``command`` (an argv whose program
is an absolute path: no shell, no PATH search) or a ``url`` (https; plain http only
to a loopback host, where nothing crosses a network) signed with ``secret_file``.
Every mistake is a ``check-config`` error naming its key, so a hook never starts
failing only when the first partner delivers.

May import: ``config.model``, ``config.values``, ``config.parsers``; nothing else in
the package.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import urllib.parse
from typing import TYPE_CHECKING, Final

from ftps_gateway.config.model import HOOK_EVENTS, HookSettings
from ftps_gateway.config.parsers import path_under
from ftps_gateway.config.values import BadValueError

if TYPE_CHECKING:
    from pathlib import Path

    from ftps_gateway.config.model import GroupSettings, UserSettings
    from ftps_gateway.config.values import Table

# Names go into spool file contents, metrics label values and audit lines.
_HOOK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
MAX_HOOK_TIMEOUT_SECONDS: Final = 3_600
MAX_HOOK_ATTEMPTS: Final = 1_000
MIN_HOOK_AGE_SECONDS: Final = 60
MAX_HOOK_AGE_SECONDS: Final = 30 * 86_400
MAX_SECRET_BYTES: Final = 4_096
LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost."})


def read_hooks(
    root: Table,
    base: Path,
    users: tuple[UserSettings, ...],
    groups: tuple[GroupSettings, ...],
) -> tuple[HookSettings, ...]:
    """Every ``[[hooks]]`` table, in order; problems go to ``root.problems``."""
    user_names = frozenset(user.name for user in users)
    group_names = frozenset(group.name for group in groups)
    hooks: list[HookSettings] = []
    names: dict[str, str] = {}  # name -> key of the hook that has it
    for index, table in enumerate(root.tables("hooks")):
        hook = _hook(table, index, base, user_names, group_names)
        other = names.get(hook.name)
        if other is not None:
            problem = f"duplicate hook name, also {other}"
            table.problems.add(table.key("name"), problem, hook.name)
        names[hook.name] = table.path
        hooks.append(hook)
    return tuple(hooks)


def _hook(
    table: Table,
    index: int,
    base: Path,
    user_names: frozenset[str],
    group_names: frozenset[str],
) -> HookSettings:
    name = table.optional("name", _parse_name, f"hooks[{index}]")
    events = frozenset(
        entry.value for entry in table.strings("events", _parse_event, required=True)
    )
    users = _known(table, "users", user_names, "not a configured user")
    groups = _known(table, "groups", group_names, "not a configured group")
    paths = tuple(
        entry.value for entry in table.strings("paths", _parse_glob, required=False)
    )
    command = _command(table)
    url = table.optional("url", _parse_url, "")
    secret_file = table.optional("secret_file", path_under(base), None)
    ca_file = table.optional("ca_file", path_under(base), None)
    timeout = table.integer(
        "timeout_seconds", 1, MAX_HOOK_TIMEOUT_SECONDS, HookSettings.timeout_seconds
    )
    attempts = table.integer(
        "max_attempts", 1, MAX_HOOK_ATTEMPTS, HookSettings.max_attempts
    )
    max_age = table.integer(
        "max_age_seconds", MIN_HOOK_AGE_SECONDS, MAX_HOOK_AGE_SECONDS,
        HookSettings.max_age_seconds,
    )  # fmt: skip
    given = table.given()
    table.close()
    secret = _check_action(table, given, secret_file, ca_file)
    return HookSettings(
        name=name, key=table.path, events=events, users=users, groups=groups,
        paths=paths, command=command, url=url,
        secret=secret, secret_file=secret_file, ca_file=ca_file,
        timeout_seconds=timeout, max_attempts=attempts, max_age_seconds=max_age,
    )  # fmt: skip


def _check_action(
    table: Table, given: frozenset[str], secret_file: Path | None, ca_file: Path | None
) -> bytes:
    """Exactly one action, and the keys that belong to it; returns the secret."""
    has_command, has_url = "command" in given, "url" in given
    if has_command == has_url:
        problem = (
            "both command and url; a hook has exactly one action"
            if has_command
            else "no action: give command (a program to run) or url (to POST to)"
        )
        table.problems.add(table.path, problem)
        return b""
    if has_command:
        for key in ("secret_file", "ca_file"):
            if key in given:
                table.problems.add(table.key(key), "only for url hooks")
        return b""
    if ca_file is not None:
        _check_readable(table, "ca_file", ca_file)
    if secret_file is None:
        if "secret_file" not in given:
            problem = "required for a url hook (its HMAC-SHA256 signature key)"
            table.problems.add(table.key("secret_file"), problem)
        return b""
    return _read_secret(table, secret_file)


def _read_secret(table: Table, path: Path) -> bytes:
    """The file's content without trailing CR/LF (what receivers key with too)."""
    key = table.key("secret_file")
    try:
        with path.open("rb") as source:
            data = source.read(MAX_SECRET_BYTES + 1)
    except OSError as error:
        table.problems.add(key, f"cannot read: {error.strerror or error}", str(path))
        return b""
    secret = data.rstrip(b"\r\n")
    if len(data) > MAX_SECRET_BYTES:
        table.problems.add(key, f"longer than {MAX_SECRET_BYTES} bytes", str(path))
    elif not secret:
        table.problems.add(key, "empty: a signature needs a secret", str(path))
    return secret


def _check_readable(table: Table, name: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as error:
        problem = f"cannot read: {error.strerror or error}"
        table.problems.add(table.key(name), problem, str(path))


def _command(table: Table) -> tuple[str, ...]:
    """``command``: an argv; the program an absolute path to an executable file."""
    value = table.value("command")
    if value is None:
        return ()
    key = table.key("command")
    if not isinstance(value, list) or not value:
        table.problems.add(key, "must be a non-empty array of strings (an argv)", value)
        return ()
    bad = next(
        (
            i
            for i, item in enumerate(value)
            if not isinstance(item, str) or "\x00" in item
        ),
        None,
    )
    if bad is not None:
        table.problems.add(f"{key}[{bad}]", "must be a string without NUL", value[bad])
        return ()
    argv = tuple(str(item) for item in value)
    problem = _program_problem(argv[0])
    if problem is not None:
        table.problems.add(f"{key}[0]", problem, argv[0])
        return ()
    return argv


def _program_problem(program: str) -> str | None:
    if not os.path.isabs(program):  # noqa: PTH117 - a string from TOML, not a Path
        return (
            "must be an absolute path (the command runs without a shell and "
            "without a PATH search)"
        )
    try:
        info = os.stat(program)  # noqa: PTH116
    except OSError as error:
        return f"cannot use: {error.strerror}"
    if not stat.S_ISREG(info.st_mode) or not os.access(program, os.X_OK):
        return "not an executable file"
    return None


def _known(
    table: Table, name: str, known: frozenset[str], problem: str
) -> frozenset[str]:
    found: set[str] = set()
    for entry in table.strings(name, str, required=False):
        if entry.value in known:
            found.add(entry.value)
        else:
            table.problems.add(entry.key, problem, entry.text)
    return frozenset(found)


def _parse_name(text: str) -> str:
    if not _HOOK_NAME.fullmatch(text):
        raise BadValueError(
            "must be 1 to 63 of A-Z a-z 0-9 . _ -, starting alphanumeric"
        )
    return text


def _parse_event(text: str) -> str:
    if text not in HOOK_EVENTS:
        raise BadValueError(f"unknown event (known: {', '.join(HOOK_EVENTS)})")
    return text


def _parse_glob(text: str) -> str:
    if not text.startswith("/"):
        raise BadValueError('must be an absolute virtual path glob, such as "/inbox/*"')
    if any(ord(char) < 0x20 or char == "\x7f" for char in text):  # noqa: PLR2004
        raise BadValueError("must not contain control characters")
    return text


def _parse_url(text: str) -> str:
    try:
        parts = urllib.parse.urlsplit(text)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as error:
        raise BadValueError(f"not a URL: {error}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise BadValueError("must be an https:// URL")
    if parts.username is not None or parts.password is not None:
        raise BadValueError(
            "must not carry user:password (receivers check the signature instead)"
        )
    if parts.scheme == "http" and not _is_loopback(host):
        raise BadValueError(
            "must be https:// (http:// only to a loopback host: events name partners"
            " and files)"
        )
    return text


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

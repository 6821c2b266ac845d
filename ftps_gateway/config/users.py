"""``[[users]]`` and ``[[groups]]``: accounts, their mounts, permission words, quotas.

Reads the account tables into ``UserSettings`` and ``GroupSettings`` and checks each
user's effective tree with the same planner the server and ``explain`` use
(``config.tree``), so a config that loads gives every user a buildable tree.

May import: ``config.model``, ``config.values``, ``config.parsers``, ``config.tree``,
``ftps_gateway.storage.vfs`` and ``ftps_gateway.policy.passwords``.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Final

from ftps_gateway.config.model import (
    MAX_QUOTA,
    MAX_USER_NAME_CHARS,
    REUSE_POLICIES,
    TLS_VERSIONS,
    GroupSettings,
    MountSettings,
    UserSettings,
)
from ftps_gateway.config.parsers import one_of, unique_networks
from ftps_gateway.config.tree import plan_tree
from ftps_gateway.config.values import BadValueError
from ftps_gateway.policy import passwords
from ftps_gateway.storage import vfs

if TYPE_CHECKING:
    from ftps_gateway.config.model import GatewayConfig
    from ftps_gateway.config.values import Problems, Table

NOT_ARGON2ID: Final = "not an argon2id hash (make one with: ftps-gateway hash-password)"

_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def read_users(root: Table, min_version: str) -> tuple[UserSettings, ...]:
    first: dict[str, str] = {}  # lower-cased name -> name as first written
    users: list[UserSettings] = []
    for table in root.tables("users", secret=True):
        name = table.required("name", _parse_user_name)
        password_hash = table.required("password", _parse_password_hash, secret=True)
        allow = unique_networks(table, "allow", {}, required=False)
        reuse = table.optional("reuse", one_of(REUSE_POLICIES), None)
        max_version = table.optional("max_version", one_of(TLS_VERSIONS), None)
        user = _with_tree(
            table,
            UserSettings(name or "", password_hash or "", allow, reuse, max_version),
        )
        table.close()
        if name is not None:
            _check_unique_user(table, name, first)
        if max_version is not None and max_version < min_version:
            problem = f"below tls.min_version {min_version}"
            table.problems.add(table.key("max_version"), problem, max_version)
        users.append(user)
    return tuple(users)


def _check_unique_user(table: Table, name: str, first: dict[str, str]) -> None:
    # Case-only twins are refused too: FTP clients and operators treat names loosely,
    # and "Acme" next to "acme" is a mistake, never two partners.
    existing = first.get(name.lower())
    if existing is None:
        first[name.lower()] = name
        return
    problem = "duplicate user name"
    if existing != name:
        problem += f", differs only in case from {existing!r}"
    table.problems.add(table.key("name"), problem, name)


# --- groups, mounts and each user's tree (issue 4) -----------------------------------


def read_groups(root: Table) -> tuple[GroupSettings, ...]:
    first: dict[str, str] = {}
    groups: list[GroupSettings] = []
    for table in root.tables("groups"):
        name = table.required("name", _parse_user_name)
        mounts = _mounts(table)
        table.close()
        if name is not None:
            existing = first.get(name.lower())
            if existing is not None:
                table.problems.add(
                    table.key("name"), f"duplicate group name, as {existing!r}", name
                )
            first.setdefault(name.lower(), name)
        groups.append(GroupSettings(name or "", mounts))
    return tuple(groups)


def _mounts(owner: Table) -> tuple[MountSettings, ...]:
    mounts: list[MountSettings] = []
    for table in owner.tables("mounts"):
        path = table.required("path", _parse_mount_path)
        source = table.required("source", _parse_source)
        permissions = _permissions(table, "permissions", required=True)
        max_bytes, max_files = _quota(table)
        table.close()
        if path is not None and source is not None:
            mounts.append(
                MountSettings(path, source, permissions, table.path,
                              max_bytes, max_files)
            )  # fmt: skip
    return tuple(mounts)


def _permissions(
    table: Table, name: str, *, required: bool
) -> frozenset[vfs.Permission]:
    value = table.value(name)
    key = table.key(name)
    if value is None:
        if required:
            table.problems.add(key, "required key is missing")
        return vfs.ALL_PERMISSIONS if not required else frozenset()
    words = [value] if isinstance(value, str) else value
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        problem = "must be a preset name or an array of permission words"
        table.problems.add(key, problem, value)
        return frozenset()
    try:
        return vfs.parse_permissions(words)
    except ValueError as error:
        table.problems.add(key, str(error))
        return frozenset()


def _quota(table: Table) -> tuple[int | None, int | None]:
    max_bytes = table.integer("quota_bytes", 1, MAX_QUOTA, 0)
    max_files = table.integer("quota_files", 1, MAX_QUOTA, 0)
    return max_bytes or None, max_files or None


def _with_tree(table: Table, user: UserSettings) -> UserSettings:
    """``user`` with the issue-4 keys of its ``[[users]]`` table read."""
    groups: list[str] = []
    raw = table.value("groups")
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(g, str) for g in raw):
            table.problems.add(table.key("groups"), "must be an array of group names")
        else:
            for index, name in enumerate(raw):
                if name in groups:
                    table.problems.add(
                        f"{table.key('groups')}[{index}]", "group listed twice", name
                    )
                else:
                    groups.append(name)
    max_bytes, max_files = _quota(table)
    return replace(
        user,
        groups=tuple(groups),
        home=table.flag("home", UserSettings.home),
        home_permissions=_permissions(table, "home_permissions", required=False),
        mounts=_mounts(table),
        max_bytes=max_bytes,
        max_files=max_files,
    )


def check_trees(problems: Problems, config: GatewayConfig) -> None:
    """Every user's effective tree: known groups, no path mounted twice, safe sources.

    Each problem is reported once, under the key that can fix it.
    """
    seen: set[tuple[str, str]] = set()
    for index, user in enumerate(config.users):
        plan = plan_tree(config, user, user_key=f"users[{index}]")
        for key, problem in plan.problems:
            if (key, problem) not in seen:
                seen.add((key, problem))
                problems.add(key, problem)


def _parse_mount_path(text: str) -> str:
    if not text.startswith("/"):
        raise BadValueError("must be an absolute virtual path such as /finance")
    try:
        normalized = vfs.normalize_virtual("/", text)
    except vfs.PathRefused as refusal:
        raise BadValueError(f"not a usable path: {refusal.reason}") from None
    if normalized != text:
        raise BadValueError(f"not in normal form; write {normalized!r}")
    return text


def _parse_source(text: str) -> str:
    if not text:
        raise BadValueError("must not be empty")
    if "\x00" in text:
        raise BadValueError("must not contain NUL")
    try:
        vfs.expand_source(text, "user", Path("/"))
    except ValueError as error:
        raise BadValueError(str(error)) from None
    return text


def _parse_user_name(text: str) -> str:
    # The name becomes a directory under storage.root: no dot-files, no option-like
    # leading dash, nothing a shell or path would interpret.
    if len(text) > MAX_USER_NAME_CHARS or not _USER_NAME.fullmatch(text):
        raise BadValueError(
            f"must be 1 to {MAX_USER_NAME_CHARS} of A-Z a-z 0-9 . _ -,"
            " not starting with '.' or '-'"
        )
    return text


def _parse_password_hash(text: str) -> str:
    # The same check the verifier relies on: a truncated paste (empty salt or digest)
    # or an old argon2 version fails here, not at a partner's first login.
    if not passwords.is_argon2id_hash(text):
        raise BadValueError(NOT_ARGON2ID)
    return text

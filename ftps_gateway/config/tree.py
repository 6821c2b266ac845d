"""One user's tree, planned from the config: mounts, where each came from, warnings.

Plain Python (no pyftpdlib import). The same plan feeds three readers, so they cannot
disagree: config validation (``config.load`` reports its problems), the server (which
builds the ``vfs.MountTable`` of a session at login) and ``ftps-gateway explain``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftps_gateway.config.model import STATE_DIRECTORY
from ftps_gateway.storage import vfs

if TYPE_CHECKING:
    from ftps_gateway.config.model import GatewayConfig, MountSettings, UserSettings

HOME_DIRECTORY = "home"  # homes live at <storage.root>/home/<user>


@dataclass(frozen=True)
class PlannedMount:
    """A mount of the tree and the config key that put it there."""

    mount: vfs.Mount
    key: str  # "users[0]" for the home, "groups[1].mounts[0]", "users[0].mounts[2]"
    template: str  # the source as written ("shared/out/{user}")


@dataclass
class TreePlan:
    """A user's effective tree, or why it cannot be built."""

    user: str
    mounts: list[PlannedMount] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (key, problem)
    warnings: list[str] = field(default_factory=list)

    def table(self, user: UserSettings) -> vfs.MountTable:
        """The session's mount table.

        Raises:
            ValueError: the plan has problems (a loaded config never has).
        """
        if self.problems:
            raise ValueError("; ".join(f"{k}: {p}" for k, p in self.problems))
        return vfs.MountTable(
            [planned.mount for planned in self.mounts],
            user_quota=(user.max_bytes, user.max_files),
            user=user.name,
        )


def home_source(cfg: GatewayConfig, name: str) -> Path:
    """``<storage.root>/home/<user>``."""
    return cfg.storage.root / HOME_DIRECTORY / name


def plan_tree(
    cfg: GatewayConfig,
    user: UserSettings,
    *,
    user_key: str | None = None,
    warnings: bool = True,
) -> TreePlan:
    """Collect ``user``'s mounts: the home, each group's, the user's own.

    Args:
        user_key: the user's key path for messages ("users[3]"); found if omitted.
        warnings: look for what ``check-config`` and ``explain`` warn about (a
            login, which only builds the table, skips it: a third of its cost).
    """
    if user_key is None:
        index = next((i for i, u in enumerate(cfg.users) if u.name == user.name), 0)
        user_key = f"users[{index}]"
    plan = TreePlan(user.name)

    if user.home:
        home = vfs.Mount("/", home_source(cfg, user.name), user.home_permissions,
                         "home", personal=True)  # fmt: skip
        _claim(plan, PlannedMount(home, user_key, f"{HOME_DIRECTORY}/{user.name}"),
               user_key)  # fmt: skip
    for index, group_name in enumerate(user.groups):
        group = cfg.group(group_name)
        if group is None:
            plan.problems.append(
                (f"{user_key}.groups[{index}]", f"no group named {group_name!r}")
            )
            continue
        for settings in group.mounts:
            planned = _planned(cfg, plan, user.name, settings, f"group {group.name}")
            if planned is not None:
                _claim(plan, planned, f"{user_key}.groups[{index}]")
    for settings in user.mounts:
        planned = _planned(cfg, plan, user.name, settings, "user")
        if planned is not None:
            _claim(plan, planned, settings.key)
    if warnings:
        _warn(cfg, plan, user)
    return plan


def _claim(plan: TreePlan, planned: PlannedMount, key_for_problem: str) -> None:
    """Add ``planned`` unless its path is taken; then name both claimants."""
    virtual = planned.mount.virtual
    first = next((p for p in plan.mounts if p.mount.virtual == virtual), None)
    if first is None:
        plan.mounts.append(planned)
        return
    problem = (
        f"{virtual} is mounted twice for user {plan.user!r}: "
        f"{first.key} ({first.mount.origin}, source {first.template!r}) and "
        f"{planned.key} ({planned.mount.origin}, source {planned.template!r})"
    )
    plan.problems.append((key_for_problem, problem))


def _planned(
    cfg: GatewayConfig,
    plan: TreePlan,
    name: str,
    settings: MountSettings,
    origin: str,
) -> PlannedMount | None:
    source_key = f"{settings.key}.source"
    try:
        source = vfs.expand_source(settings.source, name, cfg.storage.root)
    except ValueError as error:  # config validated the template already
        plan.problems.append((source_key, str(error)))
        return None
    problem = source_problem(cfg, settings.source, source)
    if problem is not None:
        plan.problems.append((source_key, problem))
        return None
    personal = origin == "user" or "{user}" in settings.source
    mount = vfs.Mount(settings.path, source, settings.permissions, origin,
                      personal, settings.max_bytes, settings.max_files)  # fmt: skip
    return PlannedMount(mount, settings.key, settings.source)


def source_problem(cfg: GatewayConfig, template: str, source: Path) -> str | None:
    """Why ``source`` must not be mounted, or None.

    Refused: storage.root itself or anything containing it (every home at once), the
    folder of all homes, a relative source that climbs out of storage.root, and any
    folder holding the gateway's own secrets (TLS key and certificate, the config,
    hook secrets) or state (``STATE_DIRECTORY``: admin socket, hook spool).
    """
    root = _norm(cfg.storage.root)
    text = _norm(source)
    if not Path(template.replace("{user}", "x")).is_absolute() and not _under(
        text, root
    ):
        return "a relative source must stay under storage.root (no ..)"
    if _under(root, text):
        return "would expose storage.root (every home); mount a folder inside it"
    if text == _norm(cfg.storage.root / HOME_DIRECTORY):
        return "would expose every user's home; mount one folder inside it"
    if _under(text, _norm(cfg.storage.root / STATE_DIRECTORY)):
        return "would expose the gateway's own state (admin socket, hook spool)"
    secrets = [cfg.tls.private_key, cfg.tls.certificate]
    if cfg.source is not None:
        secrets.append(cfg.source)
    secrets += [hook.secret_file for hook in cfg.hooks if hook.secret_file is not None]
    for secret in secrets:
        if _under(_norm(secret), text):
            return f"would expose the gateway's own file {secret}"
    return None


def _warn(cfg: GatewayConfig, plan: TreePlan, user: UserSettings) -> None:
    homes = _norm(cfg.storage.root / HOME_DIRECTORY)
    mounts = [planned.mount for planned in plan.mounts]
    for mount in mounts:
        text = _norm(mount.source)
        if _under(text, homes) and mount.origin != "home":
            owner = Path(os.path.relpath(text, homes)).parts[0]
            if owner != user.name:
                plan.warnings.append(
                    f"{mount.virtual} exposes the home of user {owner!r}"
                    f" ({vfs.describe_permissions(mount.permissions)})"
                )
        if not mount.permissions:
            plan.warnings.append(f"{mount.virtual} grants no permission at all")
        for other in mounts:
            if (
                other is not mount
                and _under(text, _norm(other.source))
                and (text != _norm(other.source) or other.virtual < mount.virtual)
            ):
                plan.warnings.append(
                    f"{mount.virtual} and {other.virtual} reach the same files"
                    f" ({mount.source} is inside {other.source}); each path keeps"
                    " its own permissions"
                )
    if not mounts:
        plan.warnings.append("no home and no mounts: the user can log in to nothing")


def _norm(path: Path) -> str:
    return os.path.normpath(path)


def _under(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([root, path]) == root
    except ValueError:
        return False


def sweep_roots(cfg: GatewayConfig) -> list[Path]:
    """Every real folder some user can upload into (for expired-partial cleanup)."""
    roots: set[Path] = set()
    for user in cfg.users:
        for planned in plan_tree(cfg, user).mounts:
            if vfs.Permission.UPLOAD in planned.mount.permissions:
                roots.add(planned.mount.source)
    return sorted(roots)


# --- explain -------------------------------------------------------------------------


def explain(cfg: GatewayConfig, name: str) -> str:
    """What ``ftps-gateway explain USER`` prints: the tree as the user sees it.

    Raises:
        LookupError: no user called ``name``.
    """
    user = cfg.user(name)
    if user is None:
        raise LookupError(f"no user named {name!r}")
    plan = plan_tree(cfg, user)
    lines = [
        f"User {user.name}",
        f"Groups: {', '.join(user.groups) or 'none'}",
        f"Home: {'mounted at /' if user.home else 'none (home = false)'}",
        "Tree (the longest matching path decides):",
    ]
    for planned in sorted(plan.mounts, key=lambda p: p.mount.virtual):
        mount = planned.mount
        lines.append(f"  {mount.virtual}")
        lines.append(f"    source:      {mount.source}")
        lines.append(f"    from:        {mount.origin} ({planned.key})")
        lines.append(f"    permissions: {vfs.describe_permissions(mount.permissions)}")
        if mount.max_bytes is not None or mount.max_files is not None:
            quota = _limits(mount.max_bytes, mount.max_files)
            lines.append(f"    quota:       {quota}")
        if mount.personal and (user.max_bytes or user.max_files):
            lines.append("    counts in:   the user's quota")
    if not plan.problems:
        table = vfs.MountTable([p.mount for p in plan.mounts])
        virtual = sorted(
            path for path in _all_structural(table) if table.mount_for(path) is None
        )
        lines.extend(
            f"  {path}  (virtual: lists its mount points, nothing else)"
            for path in virtual
        )
    if user.max_bytes is not None or user.max_files is not None:
        lines.append(f"User quota: {_limits(user.max_bytes, user.max_files)}")
    else:
        lines.append("User quota: none")
    retention = cfg.storage.partial_retention_seconds
    lines.append(
        f"Interrupted uploads kept for resuming: {retention} s"
        if retention
        else "Interrupted uploads: discarded (storage.partial_retention_seconds = 0)"
    )
    lines.extend(_access_lines(cfg, user))
    lines.extend(f"problem: {key}: {problem}" for key, problem in plan.problems)
    lines.extend(f"warning: {warning}" for warning in plan.warnings)
    return "\n".join(lines)


def _access_lines(cfg: GatewayConfig, user: UserSettings) -> list[str]:
    """Where the user may log in from, its TLS policy and its session limit."""
    everywhere = "every address" if not cfg.access.allow else "[access] allow"
    networks = ", ".join(str(network) for network in user.allow)
    login = f"{networks} (users allow), within {everywhere}" if networks else everywhere
    reuse = user.reuse or cfg.tls.reuse
    reuse_from = "user" if user.reuse else "[tls] reuse"
    words = {
        "required": "must resume the control connection's TLS session",
        "required-any-ip": "must resume the control connection's TLS session, "
        "from any address",
        "ip-match": "need the control connection's address only",
    }
    tls_line = (
        f"TLS: versions {cfg.tls.min_version}-{cfg.tls.max_version}; "
        f"data connections {words[reuse]} ({reuse_from})"
    )
    if user.max_version is not None:
        tls_line += f"; data connections at most TLS {user.max_version} (user)"
    lines = [f"Login from: {login}", tls_line]
    lines.extend(
        "TLS override for clients in "
        + ", ".join(str(network) for network in override.networks)
        + (f": reuse {override.reuse}" if override.reuse else "")
        + (f": at most TLS {override.max_version}" if override.max_version else "")
        for override in cfg.tls.overrides
    )
    lines.append(f"Sessions: at most {cfg.server.max_sessions_per_user} at once")
    return lines


def _all_structural(table: vfs.MountTable) -> set[str]:
    paths: set[str] = set()
    pending = ["/"]
    while pending:
        path = pending.pop()
        if table.is_structural(path):
            paths.add(path)
            base = path.rstrip("/")
            pending.extend(f"{base}/{child}" for child in table.children(path))
    return paths


def _limits(max_bytes: int | None, max_files: int | None) -> str:
    parts = []
    if max_bytes is not None:
        parts.append(f"{max_bytes} bytes ({_human(max_bytes)})")
    if max_files is not None:
        parts.append(f"{max_files} files")
    return ", ".join(parts) or "none"


def _human(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":  # noqa: PLR2004
            return f"{value:.1f} {unit}" if unit != "B" else f"{count} B"
        value /= 1024
    return f"{count} B"  # pragma: no cover

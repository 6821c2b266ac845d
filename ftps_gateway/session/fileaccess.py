"""File access of one logged-in user: every decision on the final virtual path.

What a partner may do with a path is decided here, on the virtual path the protocol
layer is about to use (after every alias, flag and ``..`` was resolved), never on the
text of a command. Each decision returns a ``Refusal`` (the reason for the audit log,
and its kind, which the protocol layer maps to a reply) or None to allow:

- permission words of the mount the path belongs to (``list``, ``download``,
  ``upload``, ``overwrite``, ``mkdir``, ``delete``, ``rename``, ``hash``);
- mount points, and the virtual directories leading to them, are never created,
  removed, renamed, uploaded over or re-timed; nothing is renamed across mounts;
- a folder that may not be listed shows nothing of what is in it: no names, no sizes,
  no dates (``may_see_metadata``), whichever command asks;
- quotas: which limits an upload counts against (``quota_scopes``; the reservations
  are ``session.quota``'s).

Protocol-neutral: no pyftpdlib, no replies. Imports the storage and config floors.
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from typing import TYPE_CHECKING, NamedTuple

from ftps_gateway.config.tree import plan_tree
from ftps_gateway.storage import vfs
from ftps_gateway.storage.uploads import partial_size

if TYPE_CHECKING:
    import contextlib

    from ftps_gateway.config import GatewayConfig
    from ftps_gateway.config.model import UserSettings
    from ftps_gateway.config.tree import TreePlan

logger = logging.getLogger("ftps_gateway")

P = vfs.Permission


class Action(enum.Enum):
    """What a command does to its path (the protocol layer maps verbs to these)."""

    ENTER = "enter"  # change into a folder
    LIST = "list"  # names (and facts) of what a folder holds, or a file's line
    READ_METADATA = "read-metadata"  # a file's size or date
    SIZE = "size"  # a file's size, or the user's own resumable partial
    DOWNLOAD = "download"
    UPLOAD = "upload"
    MKDIR = "mkdir"
    REMOVE = "remove"  # a file or an empty folder
    RENAME_FROM = "rename-from"
    RENAME_TO = "rename-to"
    SET_TIME = "set-time"  # a file's modification time
    HASH = "hash"  # a file's digest (HASH, XSHA256...): download or hash


class Kind(enum.Enum):
    """How a refusal reads to the client (the protocol layer words it)."""

    DENIED = "denied"
    MOUNT_POINT = "mount-point"  # a mounted folder cannot be changed
    ACROSS_MOUNTS = "across-mounts"  # renames stay inside one mount


class Refusal(NamedTuple):
    """Why an action is refused: ``reason`` for the audit, ``kind`` for the reply."""

    reason: str
    kind: Kind


# The permission word each action needs in the path's mount (ENTER, LIST,
# READ_METADATA and SIZE have rules of their own).
REQUIRED: dict[Action, vfs.Permission] = {
    Action.DOWNLOAD: P.DOWNLOAD,
    Action.UPLOAD: P.UPLOAD,
    Action.MKDIR: P.MKDIR,
    Action.REMOVE: P.DELETE,
    Action.RENAME_FROM: P.RENAME,
    Action.RENAME_TO: P.RENAME,
    Action.SET_TIME: P.OVERWRITE,
}
# Changes that a mount point (or a virtual directory) never accepts.
STRUCTURAL_CHANGES = frozenset(
    {
        Action.UPLOAD,
        Action.MKDIR,
        Action.REMOVE,
        Action.RENAME_FROM,
        Action.RENAME_TO,
        Action.SET_TIME,
    }
)
# What a purely virtual directory (no folder behind it) allows.
VIRTUAL_DIRECTORY_ACTIONS = frozenset({Action.ENTER, Action.LIST})
# Permission words that show a file's metadata (size, date, its line in a listing).
METADATA_PERMISSIONS = frozenset({P.LIST, P.DOWNLOAD})
# Permission words that allow a file's digest: whoever may read the file back, or an
# upload-only partner given ``hash`` to verify its delivery (draft-bryan-ftpext-hash-02
# section 6: only for users who uploaded the file or could download it).
HASH_PERMISSIONS = frozenset({P.DOWNLOAD, P.HASH})


class FileAccess:
    """One user's tree (``vfs.MountTable``) and the rules over it."""

    def __init__(
        self, table: vfs.MountTable, username: str, *, retention_seconds: int = 0
    ) -> None:
        self.table = table
        self.username = username
        self.retention_seconds = retention_seconds
        # Locations remembered while one command (or one listing) runs, per thread.
        self._remembered = threading.local()

    @classmethod
    def for_user(cls, config: GatewayConfig, username: str) -> FileAccess:
        """Plan ``username``'s tree from ``config`` and create its folders.

        A folder that cannot be created is logged; paths into it are refused later
        ("folder unavailable") instead of failing the whole login.

        Raises:
            LookupError: ``username`` is not in ``config`` (a reload removed it).
        """
        user = config.user(username)
        if user is None:
            raise LookupError(username)
        table = _plan(config, user).table(user)
        for mount in table.mounts:
            if mount.source.is_dir():
                continue  # one stat, not mkdir's EEXIST and its exception
            try:
                mount.source.mkdir(mode=0o750, parents=True, exist_ok=True)
            except OSError as err:  # an operational fault, not a bug: no traceback
                logger.error(  # noqa: TRY400
                    "cannot create %s for %s: %s; paths into %s are refused",
                    mount.source, username, err.strerror, mount.virtual,
                )  # fmt: skip
        return cls(
            table, username, retention_seconds=config.storage.partial_retention_seconds
        )

    def locate(self, virtual: str) -> vfs.Location:
        """Map a normalized virtual path; raises ``vfs.PathRefused``."""
        return self.locate_from("/", virtual)

    def locate_from(self, cwd: str, path: str) -> vfs.Location:
        """``table.locate(cwd, path)``, remembered within ``remembering``.

        Each ``locate`` resolves every component on the disk (``realpath``: an
        ``lstat`` per component). One STOR asked four times for the same path
        (pyftpdlib's ``ftp2fs`` and ``validpath``, the gate, the verb), about 30
        ``lstat`` and a fifth of the IO loop's Python time per 4 KiB upload
        (docs/decisions/0013). A refusal is not remembered (it raises each time).
        """
        cache: dict[str, vfs.Location] | None = getattr(
            self._remembered, "locations", None
        )
        if cache is None:
            return self.table.locate(cwd, path)
        # Keyed by the normalized path: pyftpdlib asks with the client's relative
        # text first, then with the absolute path it made of it.
        virtual = self.table.normalize(cwd, path)
        location = cache.get(virtual)
        if location is None:
            location = cache[virtual] = self.table.locate("/", virtual)
        return location

    def remembering(self) -> contextlib.AbstractContextManager[None]:
        """Within this block (in this thread), each path is located once.

        For one moment of one thread: a command's checks and its use on the loop,
        or one listing rendered off the loop. The answer could only differ if the
        tree changed in between, and the use that follows a check could meet that
        change anyway; every disk touch still goes through the location it was
        checked with. Nested blocks share the outer one's memory.
        """
        return _Remembering(self._remembered)

    # --- decisions

    def decide(
        self,
        action: Action,
        location: vfs.Location,
        *,
        rename_source: vfs.Location | None = None,
    ) -> Refusal | None:
        """May the user do ``action`` at ``location``? None: yes.

        Args:
            rename_source: for ``RENAME_TO``, where the file comes from.
        """
        if action in STRUCTURAL_CHANGES and self.table.is_structural(location.virtual):
            return Refusal("mount-point", Kind.MOUNT_POINT)
        reason = _missing_permission(action, location)
        if reason is not None:
            return Refusal(reason, Kind.DENIED)
        if action is Action.RENAME_TO and rename_source is not None:
            if not self.table.same_mount(rename_source, location):
                return Refusal("across-mounts", Kind.ACROSS_MOUNTS)
            if self.exists(location) and P.OVERWRITE not in location.permissions:
                return Refusal("needs-overwrite", Kind.DENIED)
        replaces = action is Action.UPLOAD and self.exists(location)
        if replaces and P.OVERWRITE not in location.permissions:
            return Refusal("needs-overwrite", Kind.DENIED)
        return None

    def may_see_metadata(self, location: vfs.Location) -> bool:
        """May the user see this path's size, date, or its line in a listing?

        Yes for mount points and virtual directories (they appear in their parent's
        listing), and for paths in a mount that grants ``list`` or ``download``. A
        dropbox (upload only) shows nothing of what is in it.
        """
        if location.mount is None or self.table.is_structural(location.virtual):
            return True
        return bool(location.permissions & METADATA_PERMISSIONS)

    def may_see_inside(self, location: vfs.Location) -> bool:
        """May the user see anything of what the folder at ``location`` holds?"""
        return location.mount is None or bool(
            location.permissions & METADATA_PERMISSIONS
        )

    def exists(self, location: vfs.Location) -> bool:
        """True if something is at ``location`` (links followed inside the mount)."""
        if location.real is None:
            return self.table.is_structural(location.virtual)
        # os.path.exists answers False for any OSError (an unreadable folder);
        # Path.exists raises on EACCES.
        return os.path.exists(location.real)  # noqa: PTH110

    def own_partial_size(self, location: vfs.Location, *, binary: bool) -> int | None:
        """The size of this user's resumable partial upload to ``location``, if any.

        What SIZE answers an uploader (curl ``-C -``, lftp ``reput`` ask it to learn
        where to resume); only for users who may upload there.
        """
        if not binary or P.UPLOAD not in location.permissions or location.real is None:
            return None
        return partial_size(location.real, self.username, self.retention_seconds)

    def quota_scopes(self, location: vfs.Location) -> list[vfs.QuotaScope]:
        """The limits an upload to ``location`` counts against (none outside mounts)."""
        if location.mount is None or location.real is None:
            return []
        return self.table.quota_scopes(location.mount)


def _missing_permission(action: Action, location: vfs.Location) -> str | None:
    """The audit reason if ``location``'s permissions do not allow ``action``."""
    granted = location.permissions
    if location.mount is None:  # a virtual directory: enter and list only
        return None if action in VIRTUAL_DIRECTORY_ACTIONS else "virtual-directory"
    if action is Action.ENTER:
        return None if granted else "no-permission"
    if action is Action.LIST:
        return None if P.LIST in granted else "needs-list"
    if action in (Action.READ_METADATA, Action.SIZE):
        readable = granted & METADATA_PERMISSIONS
        uploader = action is Action.SIZE and P.UPLOAD in granted
        return None if readable or uploader else "needs-list-or-download"
    if action is Action.HASH:
        return None if granted & HASH_PERMISSIONS else "needs-download-or-hash"
    needed = REQUIRED[action]
    return None if needed in granted else f"needs-{needed.value}"


# The last configuration's tree plans, per user: a plan depends on the (immutable)
# configuration only, and every login planned it again (a third of a login's
# Python time, decision 0014). One configuration at a time: a reload starts over;
# at most one plan per user of that configuration.
_plans: tuple[GatewayConfig | None, dict[str, TreePlan]] = (None, {})


def _plan(config: GatewayConfig, user: UserSettings) -> TreePlan:
    global _plans  # noqa: PLW0603 - one tuple, swapped whole
    planned_for, plans = _plans
    if planned_for is not config:
        plans = {}
        _plans = (config, plans)
    plan = plans.get(user.name)
    if plan is None:
        plan = plans[user.name] = plan_tree(config, user, warnings=False)
    return plan


class _Remembering:
    """The ``remembering`` block; a class, not a generator: it runs once per
    command, and a generator context manager costs six calls (decision 0014)."""

    __slots__ = ("_local", "_outermost")

    def __init__(self, local: threading.local) -> None:
        self._local = local
        self._outermost = False

    def __enter__(self) -> None:
        if getattr(self._local, "locations", None) is None:
            self._local.locations = {}
            self._outermost = True

    def __exit__(self, *exc_info: object) -> None:
        if self._outermost:
            self._local.locations = None

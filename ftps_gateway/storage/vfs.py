"""Virtual paths (what FTP clients send) to real paths, through a per-user mount table.

Plain Python (no pyftpdlib import), so every rule here is unit-tested without a
server. Everything a client sends is refused or confined before the disk is touched:
a path that cannot be mapped safely raises ``PathRefused``, never maps "nearby".

A user's tree is a ``MountTable``: virtual paths (``/``, ``/finance``) mapped to real
source folders, each with its own permission words. The longest matching mount decides
both where a path lives and what the user may do there, so permissions follow the
virtual path and never the physical one. Each mount confines its paths with a
``HomeTree`` over its source, so nothing (``..``, symlinks) leaves the mount.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ftps_gateway.errors import GatewayError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

__all__ = [
    "ALL_PERMISSIONS",
    "MAX_NAME_BYTES",
    "MAX_PATH_CHARS",
    "PRESETS",
    "UPLOAD_TEMP_PREFIX",
    "UPLOAD_TEMP_SUFFIX",
    "HomeTree",
    "Mount",
    "MountTable",
    "PathRefused",
    "Permission",
    "QuotaScope",
    "Resolved",
    "Usage",
    "describe_permissions",
    "expand_source",
    "is_upload_temp",
    "normalize_virtual",
    "parse_permissions",
    "partial_token",
    "upload_temp_name",
    "usage",
]

# Uploads are written under this hidden name and renamed into place on success (see
# storage.uploads.AtomicUpload). Partners must never see or address these files: a
# partner who could would read half-written data or race the rename.
UPLOAD_TEMP_PREFIX = ".ftps-upload-"
# ... and end in this, never in the partner's name (see ``upload_temp_name``).
UPLOAD_TEMP_SUFFIX = ".part"

# Longer client paths are refused outright: no legitimate partner needs them, and a
# bound keeps every per-path operation (and every audit line) small. Linux's PATH_MAX
# is 4096 bytes for the *real* path, home prefix included.
MAX_PATH_CHARS = 1024
# NAME_MAX on Linux filesystems (ext4, xfs, btrfs): longer names fail at the syscall
# with a confusing error, so they are refused up front.
MAX_NAME_BYTES = 255

# Characters no partner's file name needs, refused like C0 controls:
# - C0 controls and DEL: CR/LF would split a reply line or an audit record, NUL ends a
#   C string;
# - C1 controls (U+0080-U+009F, NEL U+0085 among them) and the line and paragraph
#   separators U+2028/U+2029: line breaks to str.splitlines, many log viewers and
#   JavaScript, so they forged xferlog lines;
# - bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): they make
#   "invoice<RLO>fdp.exe" display as "invoiceexe.pdf" (the Trojan Source trick).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# An upload token goes into a file name: keep it to characters that need no quoting.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")

_INVALID = "invalid path"
_OUTSIDE = "outside home"


# N818: named for the verdict it carries; the adapters catch ``vfs.PathRefused``.
class PathRefused(GatewayError):  # noqa: N818
    """A client path was refused; ``reason`` is short and generic on purpose.

    The reason goes to the audit log; the client gets a generic 550 so that refusals
    do not describe the server's filesystem.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Resolved:
    """A client path after mapping: its normalized virtual form and its real path.

    A dataclass rather than a tuple so that a mount table can add fields (the mount,
    its access rights) without changing every caller.
    """

    virtual: str  # absolute, normalized: "/", "/in/report.csv"
    real: Path  # root-joined; containment already checked


def is_upload_temp(name: str) -> bool:
    """Return True if ``name`` (one path component) is a hidden upload temporary.

    Any name with the prefix: today's ``<prefix><token>.part`` and the older
    ``<prefix><token>-<final name>`` alike (leftovers of an earlier version are
    still hidden, refused and swept). Case-insensitive so that no spelling of the
    prefix can address a temporary file on a case-insensitive filesystem; refusing
    a few more names is the safe side.
    """
    return name.casefold().startswith(UPLOAD_TEMP_PREFIX)


def upload_temp_name(final_name: str, token: str) -> str:
    """Return the hidden name an upload to ``final_name`` is written under.

    ``f"{UPLOAD_TEMP_PREFIX}{token}{UPLOAD_TEMP_SUFFIX}"``: the final name is
    deliberately not part of it. It used to be (``.ftps-upload-<token>-report.csv``),
    and a consumer running ``find -name '*.csv'`` picked up half-written data; a
    neutral suffix matches no pattern a consumer writes for partner files. The token
    (``partial_token``: user and whole final name) keeps uploads to different names
    apart and finds a resumable partial again. ``is_upload_temp`` recognises both
    shapes, so the sweep still removes leftovers of the old one.

    Raises:
        ValueError: ``final_name`` is not a single path component, or ``token`` is
            not 1-64 of ``A-Z a-z 0-9 _ -``.
    """
    if not final_name or "/" in final_name or final_name in {".", ".."}:
        raise ValueError(f"not a file name: {final_name!r}")
    if _TOKEN.fullmatch(token) is None:
        raise ValueError(f"unsafe upload token: {token!r}")
    return f"{UPLOAD_TEMP_PREFIX}{token}{UPLOAD_TEMP_SUFFIX}"


def _check_component(name: str) -> None:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: not a name any client can mean
        raise PathRefused(_INVALID) from None
    if size > MAX_NAME_BYTES:
        raise PathRefused("name too long")
    if is_upload_temp(name):
        raise PathRefused(_INVALID)


# Normalizing is a pure function of two strings, and a session asks for the same
# few again and again (eight per download session: the gate, pyftpdlib's ftp2fs and
# validpath, each mount table lookup; decision 0014). Short pairs are kept; a refusal
# is never kept (it raises each time). Memory: at most this many pairs of up to
# _KEPT_PATH_CHARS characters.
_KEPT_PATHS = 512
_KEPT_PATH_CHARS = 256


def normalize_virtual(cwd: str, path: str) -> str:
    """Join ``path`` to the virtual ``cwd`` and collapse it; see HomeTree.normalize."""
    if len(cwd) + len(path) <= _KEPT_PATH_CHARS:
        return _normalize_kept(cwd, path)
    return _normalize(cwd, path)


def _normalize(cwd: str, path: str) -> str:
    if _CONTROL.search(cwd) or _CONTROL.search(path):
        raise PathRefused(_INVALID)
    if len(path) > MAX_PATH_CHARS:
        raise PathRefused("path too long")
    joined = path if path.startswith("/") else f"{cwd}/{path}"
    parts: list[str] = []
    for name in joined.split("/"):
        if name in {"", "."}:
            continue
        _check_component(name)  # before "..": "/.ftps-upload-x/.." is refused too
        if name == "..":
            # RFC 959 leaves ".." above the root undefined; clients expect CDUP at
            # "/" to stay at "/", and anything else would leave the home.
            if parts:
                parts.pop()
        else:
            parts.append(name)
    virtual = "/" + "/".join(parts)
    if len(virtual) > MAX_PATH_CHARS:
        raise PathRefused("path too long")
    return virtual


_normalize_kept = functools.lru_cache(maxsize=_KEPT_PATHS)(_normalize)


class HomeTree:
    """One user's home directory seen as the virtual root "/".

    Mapping is two steps, kept apart so a mount table can sit between them later:
    ``normalize`` works on virtual paths only (pure string rules), ``to_real`` joins
    the result to the root and then checks, on the disk, that symlinks do not lead
    out of the home.

    Symlinks are followed when they stay inside the home and refused when they leave
    it. The check is made when the path is mapped, so it guards against links placed
    by local users or processes, not against one racing the FTP command (partners
    cannot create links over FTP); a race-free version needs ``openat2`` with
    ``RESOLVE_BENEATH`` on every open.
    """

    def __init__(self, root: Path) -> None:
        """Confine paths to ``root``.

        Raises:
            ValueError: ``root`` is not absolute (a relative root would move with the
                process's working directory).
            NotADirectoryError: ``root`` is not an existing directory.
        """
        if not root.is_absolute():
            raise ValueError(f"home must be an absolute path: {root}")
        if not root.is_dir():
            raise NotADirectoryError(f"home is not a directory: {root}")
        # Resolved once, so containment compares real paths with a real path even
        # when the configured storage root is itself reached through a symlink.
        self._root = root.resolve(strict=True)
        self._root_text = str(self._root)

    @property
    def root(self) -> Path:
        """The home directory, symlinks resolved."""
        return self._root

    def normalize(self, cwd: str, path: str) -> str:
        """Return the absolute, normalized virtual path ``path`` names from ``cwd``.

        POSIX rules on virtual paths only (the disk is not consulted): a relative
        ``path`` is joined to ``cwd``, repeated slashes and ``.`` collapse, ``..``
        removes the previous component but never climbs above "/". So
        ``/../../etc/passwd`` is ``/etc/passwd`` *inside the home*.

        Raises:
            PathRefused: a NUL or other control character, more than
                ``MAX_PATH_CHARS`` characters, a component over ``MAX_NAME_BYTES``
                bytes of UTF-8, or a component naming an upload temporary file.
        """
        return normalize_virtual(cwd, path)

    def to_real(self, virtual: str) -> Path:
        """Return the real path for ``virtual``, after checking it stays in the home.

        ``os.path.realpath`` resolves every symlink on the way, including a final
        dangling one (to where it points) and missing components (kept as they are),
        so a name to be created under a linked directory, or a dangling link whose
        target lies outside, is checked against where the data would really go.

        Raises:
            PathRefused: ``virtual`` is refused by ``normalize`` (it is normalized
                again, so callers cannot skip the string rules), or it resolves
                outside the home ("outside home").
        """
        virtual = normalize_virtual("/", virtual)
        names = [name for name in virtual.split("/") if name]
        real = self._root.joinpath(*names)
        if not self.is_inside(real):
            raise PathRefused(_OUTSIDE)
        return real

    def resolve(self, cwd: str, path: str) -> Resolved:
        """``normalize`` then ``to_real``, as one result."""
        virtual = normalize_virtual(cwd, path)
        return Resolved(virtual=virtual, real=self.to_real(virtual))

    def to_virtual(self, real: Path) -> str:
        """Return the virtual path of ``real``, a path under the home (for PWD).

        Lexical: it inverts ``to_real`` without consulting the disk. The result
        passes ``normalize``'s rules, so a name a partner could not have sent (a
        control character, an upload temporary) is refused rather than shown.

        Raises:
            PathRefused: ``real`` is not under the home, or its virtual form would
                be refused by ``normalize``.
        """
        text = os.path.normpath(os.fspath(real))
        if not text.startswith("/") or not self._contains(text):
            raise PathRefused(_OUTSIDE)
        relative = os.path.relpath(text, self._root_text)
        virtual = "/" if relative == "." else "/" + relative
        return normalize_virtual("/", virtual)

    def is_inside(self, real: str | os.PathLike[str]) -> bool:
        """Return True if ``real``, symlinks resolved, is the home or inside it.

        A relative ``real`` is False: resolving it would depend on the process's
        working directory, which pyftpdlib changes.
        """
        text = os.fspath(real)
        if not text.startswith("/"):
            return False
        try:
            resolved = os.path.realpath(text)
        except (OSError, ValueError):  # ValueError: embedded NUL
            return False
        return self._contains(resolved)

    def _contains(self, text: str) -> bool:
        # commonpath compares whole components: "/home/ann2" is not inside
        # "/home/ann", which a startswith() check would get wrong.
        try:
            return os.path.commonpath([self._root_text, text]) == self._root_text
        except ValueError:  # mixing absolute and relative paths
            return False


# --- permissions ----------------------------------------------------------------------


class Permission(enum.StrEnum):
    """What a user may do inside one mount, in words an operator understands."""

    LIST = "list"  # LIST NLST MLSD MLST STAT; SIZE/MDTM
    DOWNLOAD = "download"  # RETR; SIZE/MDTM
    UPLOAD = "upload"  # STOR/APPE/REST+STOR of a new file (and resuming one's own)
    OVERWRITE = "overwrite"  # replace an existing file (STOR, RNTO onto it, MFMT)
    DELETE = "delete"  # DELE, RMD
    RENAME = "rename"  # RNFR/RNTO, both names in the same mount
    MKDIR = "mkdir"  # MKD
    # HASH and the XSHA*/XMD5/XCRC digests of a file. ``download`` allows them too;
    # this word lets an upload-only partner verify a delivery it cannot read back.
    # It also lets it learn whether a name exists and what it holds (by digest):
    # grant it only on folders that are the partner's own.
    HASH = "hash"


ALL_PERMISSIONS = frozenset(Permission)

# Presets name the common shapes; "dropbox" is the partner who delivers but can neither
# list nor read back what was delivered (nor what anybody else delivered).
PRESETS: dict[str, frozenset[Permission]] = {
    "read": frozenset({Permission.LIST, Permission.DOWNLOAD}),
    "dropbox": frozenset({Permission.UPLOAD}),
    "read-write": ALL_PERMISSIONS,
    "none": frozenset(),
}


def parse_permissions(words: str | Sequence[str]) -> frozenset[Permission]:
    """A preset name, or a list of permission words (presets may appear in the list).

    Raises:
        ValueError: an unknown word, naming the known ones.
    """
    items = [words] if isinstance(words, str) else list(words)
    granted: set[Permission] = set()
    for word in items:
        if word in PRESETS:
            granted |= PRESETS[word]
            continue
        try:
            granted.add(Permission(word))
        except ValueError:
            known = ", ".join([*PRESETS, *(p.value for p in Permission)])
            raise ValueError(f"unknown permission {word!r} (known: {known})") from None
    return frozenset(granted)


def describe_permissions(granted: frozenset[Permission]) -> str:
    """``read (list, download)`` or ``list, upload``: the preset name when one fits."""
    words = ", ".join(p.value for p in Permission if p in granted) or "nothing"
    for name, preset in PRESETS.items():
        if preset == granted:
            return name if name == "none" else f"{name} ({words})"
    return words


# --- sources and partial uploads ------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def expand_source(template: str, user: str, storage_root: Path) -> Path:
    """The real folder a mount's ``source`` names for ``user``.

    ``{user}`` becomes the user name (config validated it as a safe path component);
    a relative source is taken under ``storage_root``. The result is normalized
    lexically (no disk access), so ``..`` in a source is visible to the checks that
    keep sources away from the gateway's own files.

    Raises:
        ValueError: a placeholder other than ``{user}``, or a stray brace.
    """
    for match in _PLACEHOLDER.finditer(template):
        if match[1] != "user":
            raise ValueError(f"unknown placeholder {{{match[1]}}} (only {{user}})")
    text = template.replace("{user}", user)
    if "{" in text or "}" in text:
        raise ValueError("unbalanced brace (the only placeholder is {user})")
    path = Path(text)
    if not path.is_absolute():
        path = storage_root / path
    return Path(os.path.normpath(path))


def partial_token(user: str, final_name: str) -> str:
    """The token of ``user``'s upload temporary for ``final_name``.

    Deterministic, so an interrupted upload's temporary file is the partial that a
    later session of the same user resumes; keyed by the user, so another user
    uploading to the same name writes (and resumes) a different file; keyed by the
    whole final name, because ``upload_temp_name`` may cut long names.
    """
    digest = hashlib.sha256(f"{user}\0{final_name}".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:24]


# --- quotas ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """Bytes and files under some folders."""

    bytes: int = 0
    files: int = 0


def usage(roots: Iterable[Path]) -> Usage:
    """Add up the regular files under ``roots`` (symlinks not followed).

    Upload temporaries count as bytes (they occupy the disk) but not as files (they
    are not files a partner delivered). A root that is inside another root is counted
    once.
    """
    unique = sorted({os.path.normpath(root) for root in roots})
    kept = [r for r in unique if not any(_is_under(r, o) for o in unique if o != r)]
    total_bytes = total_files = 0
    for entry in walk_entries(kept):
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            total_bytes += info.st_size
            if not is_upload_temp(entry.name):
                total_files += 1
    return Usage(total_bytes, total_files)


def walk_entries(roots: Iterable[str | Path]) -> Iterator[os.DirEntry[str]]:
    """Every non-directory entry under ``roots``; symlinks are not followed.

    Unreadable directories are skipped (a walk for quotas or clean-up must not fail
    on one bad folder).
    """
    pending = [str(root) for root in roots]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
            else:
                yield entry


def _is_under(path: str, root: str) -> bool:
    return os.path.commonpath([root, path]) == root


@dataclass(frozen=True)
class QuotaScope:
    """A limit over some folders: one mount's source, or a user's own folders."""

    name: str  # for audit lines and explain: "user acme", "mount /finance"
    roots: tuple[Path, ...]
    max_bytes: int | None
    max_files: int | None
    # What the shared state counts it under (``session.state``): the user, or the
    # mount's source folder, which is one scope whoever mounts it and wherever
    # ("mount /finance" may be a different folder for another group or user, and
    # one folder may be mounted at two paths).
    key: str = ""


# --- the mount table ------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One virtual folder of a user's tree."""

    virtual: str  # absolute, normalized: "/", "/finance"
    source: Path  # real folder, absolute and normalized
    permissions: frozenset[Permission]
    origin: str  # where it came from, for explain and audit: "home", "group finance"
    personal: bool = False  # counted in the user's own quota (home, {user}, own)
    max_bytes: int | None = None  # this mount's quota
    max_files: int | None = None


@dataclass(frozen=True)
class Location:
    """A virtual path after mapping through a mount table.

    ``mount`` is None for a purely virtual directory: an ancestor of mount points that
    no mount covers (``/`` of a user with ``home = false``). Such a directory has no
    real path and only lists its mount points.
    """

    virtual: str
    mount: Mount | None
    real: Path | None = field(default=None)

    @property
    def is_mount_point(self) -> bool:
        """True for the virtual path a mount is attached at."""
        return self.mount is not None and self.mount.virtual == self.virtual

    @property
    def permissions(self) -> frozenset[Permission]:
        """What the user may do here (nothing but CWD/list in a virtual directory)."""
        return self.mount.permissions if self.mount is not None else frozenset()


class MountTable:
    """One user's tree: virtual paths to real ones, with permissions per mount.

    The longest mount path that is the virtual path or one of its ancestors decides
    (so ``/finance/in`` belongs to ``/finance`` even though ``/`` is mounted too).
    Mount points, and the virtual directories leading to them, are *structural*: they
    appear in listings but cannot be created, deleted, renamed or uploaded over.
    """

    def __init__(
        self,
        mounts: Sequence[Mount],
        *,
        user_quota: tuple[int | None, int | None] = (None, None),
        user: str = "",
    ) -> None:
        """Index ``mounts``.

        Raises:
            ValueError: a mount path that is not absolute and normalized, a source
                that is not absolute, or two mounts at the same path.
        """
        by_path: dict[str, Mount] = {}
        for mount in mounts:
            if normalize_virtual("/", mount.virtual) != mount.virtual:
                raise ValueError(f"mount path not normalized: {mount.virtual!r}")
            if not mount.source.is_absolute():
                raise ValueError(f"mount source not absolute: {mount.source}")
            if mount.virtual in by_path:
                first = by_path[mount.virtual]
                raise ValueError(
                    f"{mount.virtual} mounted twice: {first.origin} ({first.source})"
                    f" and {mount.origin} ({mount.source})"
                )
            by_path[mount.virtual] = mount
        self._mounts = by_path
        # Ancestors of mount points: directories that must exist virtually.
        self._structural: set[str] = set()
        for path in by_path:
            self._structural.update(_ancestors(path))
            self._structural.add(path)
        self._trees: dict[str, HomeTree] = {}
        self.user = user
        self.user_quota = user_quota

    @property
    def mounts(self) -> list[Mount]:
        """The mounts, sorted by virtual path."""
        return [self._mounts[path] for path in sorted(self._mounts)]

    def normalize(self, cwd: str, path: str) -> str:
        """See ``normalize_virtual``."""
        return normalize_virtual(cwd, path)

    def mount_for(self, virtual: str) -> Mount | None:
        """The mount that ``virtual`` (normalized) lives in, or None."""
        path = virtual
        while True:
            mount = self._mounts.get(path)
            if mount is not None:
                return mount
            if path == "/":
                return None
            path = path.rsplit("/", 1)[0] or "/"

    def is_structural(self, virtual: str) -> bool:
        """True for a mount point or a virtual directory leading to one."""
        return virtual in self._structural

    def locate(self, cwd: str, path: str) -> Location:
        """Map a client path (relative to ``cwd``) to its mount and real path.

        The real path is checked against the mount's source on the disk: symlinks
        that lead out of the mount (or into another mount's source) are refused.

        Raises:
            PathRefused: the string rules of ``normalize_virtual``; "outside home"
                when the path resolves outside its mount; "no such folder" when no
                mount covers it and it is not a virtual directory; "folder
                unavailable" when the mount's source is missing.
        """
        virtual = normalize_virtual(cwd, path)
        mount = self.mount_for(virtual)
        if mount is None:
            if virtual in self._structural:
                return Location(virtual, None, None)
            raise PathRefused("no such folder")
        inner = virtual[len(mount.virtual) :] if mount.virtual != "/" else virtual
        real = self._tree(mount).to_real(inner or "/")
        return Location(virtual, mount, real)

    def children(self, virtual: str) -> dict[str, Mount | None]:
        """Names directly under ``virtual`` that are structural (mounts or ancestors).

        Maps each name to its mount, or None for a virtual directory on the way to a
        deeper mount point. Listings show these whatever the disk holds, and hide a
        real entry of the same name (the mount shadows it).
        """
        prefix = virtual.rstrip("/") + "/"
        names: dict[str, Mount | None] = {}
        for path in self._structural:
            if path != virtual and path.startswith(prefix):
                name = path[len(prefix) :].split("/", 1)[0]
                names.setdefault(name, None)
                child = self._mounts.get(prefix + name)
                if child is not None:
                    names[name] = child
        return names

    def is_visible(self, mount: Mount, real: str) -> bool:
        """True if ``real`` (symlinks resolved) stays inside ``mount``'s source."""
        return self._tree(mount).is_inside(real)

    def same_mount(self, first: Location, second: Location) -> bool:
        """True if both locations are in one mount (renames may not cross mounts)."""
        return first.mount is not None and first.mount is second.mount

    def quota_scopes(self, mount: Mount) -> list[QuotaScope]:
        """The limits an upload into ``mount`` counts against."""
        scopes: list[QuotaScope] = []
        if mount.max_bytes is not None or mount.max_files is not None:
            scopes.append(
                QuotaScope(f"mount {mount.virtual}", (mount.source,),
                           mount.max_bytes, mount.max_files,
                           f"mount {os.path.normpath(mount.source)}")
            )  # fmt: skip
        max_bytes, max_files = self.user_quota
        if mount.personal and (max_bytes is not None or max_files is not None):
            roots = tuple(m.source for m in self.mounts if m.personal)
            scopes.append(QuotaScope(f"user {self.user}", roots, max_bytes, max_files,
                                     f"user {self.user}"))  # fmt: skip
        return scopes

    def _tree(self, mount: Mount) -> HomeTree:
        tree = self._trees.get(mount.virtual)
        if tree is None:
            try:
                tree = HomeTree(mount.source)
            except (OSError, ValueError):
                raise PathRefused("folder unavailable") from None
            self._trees[mount.virtual] = tree
        return tree


def _ancestors(virtual: str) -> list[str]:
    parts = [name for name in virtual.split("/") if name]
    return ["/" + "/".join(parts[:depth]) for depth in range(len(parts))]

"""The gateway's configuration: TOML in, frozen validated dataclasses out.

Nothing else in the package reads TOML. ``load`` reports every problem it finds in
one pass (``ConfigError``), so an operator never fixes one typo per restart, and a
config that loads is complete: no later code re-checks or defaults anything.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, Generic, TypeGuard, TypeVar

from ftps_gateway.errors import ConfigError
from ftps_gateway.policy import passwords
from ftps_gateway.storage import vfs

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

TLS_VERSIONS = ("1.2", "1.3")
# How a data connection proves it belongs to its control session:
# "required": it resumes the control connection's own TLS session (and comes from
#             the control connection's IP);
# "ip-match": only the IP check, for clients that cannot resume (Go, old .NET/Java).
# "required-any-ip": it resumes the control connection's own TLS session, from any
#             address (partners whose NAT sends connections from several addresses;
#             the resumption alone ties the data connection to its session).
REUSE_POLICIES = ("required", "ip-match", "required-any-ip")
RESUMING_POLICIES = frozenset({"required", "required-any-ip"})


@dataclass(frozen=True)
class ListenAddress:
    """One control-port listener (explicit TLS: AUTH TLS on a plain TCP port)."""

    host: str  # literal IP address ("0.0.0.0", "::", "127.0.0.1")
    port: int  # 0-65535; 0 = a free port the OS picks (tests, throw-away instances)


@dataclass(frozen=True)
class ServerSettings:
    """``[server]``: listeners, timeouts, limits."""

    listen: tuple[ListenAddress, ...]
    banner: str = "Partner file exchange"  # 220 text; never the software version
    idle_timeout_seconds: int = 300  # logged-in session with no command
    login_timeout_seconds: int = 30  # unauthenticated session closed after this
    max_sessions: int = 512  # control connections in total
    max_sessions_per_ip: int = 16  # from one client address
    max_sessions_per_user: int = 8  # logged in as one user
    allow_active_mode: bool = False  # PORT/EPRT; off: cannot work behind NAT
    shutdown_grace_seconds: int = 30  # SIGTERM: running transfers may finish
    node_name: str = ""  # shown in SITE DIAG and the audit log; "": the host name
    # Load balancers whose connections start with a PROXY protocol header (v1/v2).
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    workers: int = 0  # worker processes; 0 = "auto": one per CPU core
    login_cache_seconds: int = 300  # a verified password skips argon2id this long
    implicit_listen: tuple[ListenAddress, ...] = ()  # TLS from the first byte (990)


@dataclass(frozen=True)
class TLSOverride:
    """``[[tls.overrides]]``: TLS policy for some client networks (first match wins)."""

    networks: tuple[IPNetwork, ...]
    reuse: str | None = None  # None: the [tls] value
    max_version: str | None = None  # None: the [tls] value


@dataclass(frozen=True)
class TLSSettings:
    """``[tls]``: certificate chain, key, protocol bounds, data-connection policy."""

    certificate: Path  # PEM, leaf first then intermediates
    private_key: Path  # PEM, unencrypted, readable by the server only
    min_version: str = "1.2"  # "1.2" or "1.3"
    max_version: str = "1.3"  # "1.2" or "1.3"
    reuse: str = "required"  # see REUSE_POLICIES
    overrides: tuple[TLSOverride, ...] = ()


@dataclass(frozen=True)
class PassiveOverride:
    """``[[passive.overrides]]``: the address advertised to some client networks."""

    networks: tuple[IPNetwork, ...]
    address: str  # IP or DNS name; "" = the server's own local address


@dataclass(frozen=True)
class PassiveSettings:
    """``[passive]``: the data-port range and the address that 227 replies advertise."""

    port_min: int
    port_max: int  # inclusive
    address: str = ""  # IP or DNS name; "" = local address of the control connection
    overrides: tuple[PassiveOverride, ...] = ()  # first match wins
    connect_timeout_seconds: int = 30  # how long a PASV port waits for the client


@dataclass(frozen=True)
class StorageSettings:
    """``[storage]``: where homes live (``<root>/home/<user>``)."""

    root: Path
    # Seconds an interrupted upload's data is kept (hidden) so that the same user can
    # resume it; 0 = discard at once. Default 0.
    partial_retention_seconds: int = 0


# --- groups and mounts (issue 4) ------------------------------------------------------


@dataclass(frozen=True)
class MountSettings:
    """``[[groups.mounts]]`` / ``[[users.mounts]]``: one virtual folder."""

    path: str  # virtual, absolute, normalized: "/finance"
    source: str  # as written: relative to storage.root or absolute; may hold {user}
    permissions: frozenset[vfs.Permission]
    key: str  # where it was configured, for messages: "groups[0].mounts[1]"
    max_bytes: int | None = None  # quota_bytes; None = unlimited
    max_files: int | None = None  # quota_files; None = unlimited


@dataclass(frozen=True)
class GroupSettings:
    """``[[groups]]``: mounts shared by every member."""

    name: str
    mounts: tuple[MountSettings, ...]


@dataclass(frozen=True)
class AccessSettings:
    """``[access]``: who may open a control connection at all."""

    allow: tuple[IPNetwork, ...] = ()  # empty: every address (check-config says so)
    safe: tuple[IPNetwork, ...] = ()  # never banned by the defender


@dataclass(frozen=True)
class DefenderSettings:
    """``[defender]``: ban source addresses that keep failing to log in."""

    enabled: bool = True
    max_failures: int = 5  # failed logins within the window that earn a ban
    window_seconds: int = 300
    ban_seconds: int = 900  # first ban; each repeat offence doubles it
    max_ban_seconds: int = 86_400  # cap for repeat offences


@dataclass(frozen=True)
class AdminSettings:
    """``[admin]``: the local control socket (``ftps-gateway ban``, ``reload``)."""

    socket: Path  # Unix socket, mode 0600; default <storage.root>/.ftps-gateway/


@dataclass(frozen=True)
class UserSettings:
    """``[[users]]``: one partner account."""

    name: str
    password_hash: str = field(repr=False)  # argon2id PHC string; never logged
    allow: tuple[IPNetwork, ...] = ()  # networks it may log in from; empty: any
    reuse: str | None = None  # None: the network's or [tls] policy
    max_version: str | None = None  # caps data connections; None: network's/[tls]

    # --- tree (issue 4)
    groups: tuple[str, ...] = ()  # group names, in the order written
    home: bool = True  # mount <storage.root>/home/<user> at "/"
    home_permissions: frozenset[vfs.Permission] = vfs.ALL_PERMISSIONS
    mounts: tuple[MountSettings, ...] = ()  # the user's own mounts
    max_bytes: int | None = None  # quota_bytes over the user's own folders
    max_files: int | None = None  # quota_files over the user's own folders


@dataclass(frozen=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus and health HTTP endpoint (off by default)."""

    # IP:PORT serving /metrics, /healthz and /readyz; None (key absent or "") = off.
    # Plain HTTP without authentication: loopback or a private network only, unless
    # allow_public says otherwise.
    listen: ListenAddress | None = None
    # Label transfer metrics with the user name too; off: one series per user
    # costs memory in Prometheus, and user names are partner data.
    per_user_labels: bool = False
    # Accept a public (or every-interface) listen address; off: the endpoint has no
    # TLS and no login, and shows partner names when per_user_labels is on.
    allow_public: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    """The whole, validated configuration."""

    source: Path | None  # the file it came from (None for the built-in demo)
    server: ServerSettings
    tls: TLSSettings
    passive: PassiveSettings
    storage: StorageSettings
    users: tuple[UserSettings, ...]
    access: AccessSettings = AccessSettings()
    defender: DefenderSettings = DefenderSettings()
    admin: AdminSettings = AdminSettings(Path())
    log_level: str = "info"  # [logging] level: debug, info, warning, error
    audit_file: Path | None = None  # [logging] audit_file; None: stdout
    xferlog_file: Path | None = None  # [logging] xferlog_file; None: no xferlog
    upload_sha256: bool = True  # [logging] upload_sha256: digest in upload events
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    groups: tuple[GroupSettings, ...] = ()

    def group(self, name: str) -> GroupSettings | None:
        """Return the group called ``name``, or None."""
        for candidate in self.groups:
            if candidate.name == name:
                return candidate
        return None

    def user(self, name: str) -> UserSettings | None:
        """Return the user called ``name``, or None."""
        for candidate in self.users:
            if candidate.name == name:
                return candidate
        return None


# --- loading -----------------------------------------------------------------------

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
MAX_BANNER_CHARS: Final = 200
MAX_USER_NAME_CHARS: Final = 64
MAX_HOSTNAME_CHARS: Final = 253
PORT_MAX: Final = 65535
PASSIVE_PORT_MIN: Final = 1024  # below this are privileged ports other services own
MAX_PASSIVE_PORTS: Final = 10_000  # each one is a firewall/NAT rule somewhere
MAX_RETENTION_SECONDS: Final = 30 * 86_400
MAX_QUOTA: Final = 2**62

NOT_ARGON2ID: Final = "not an argon2id hash (make one with: ftps-gateway hash-password)"

# Where an unauthenticated HTTP endpoint may listen without metrics.allow_public.
# Spelt out rather than ip.is_private: that also counts 0.0.0.0 and :: (every
# interface, public ones included) and the documentation ranges, and its meaning has
# shifted between Python versions.
_INTERNAL_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "127.0.0.0/8", "::1/128",  # loopback
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
        "fc00::/7",  # RFC 4193 unique local
        "169.254.0.0/16", "fe80::/10",  # link-local: never routed
    )
)  # fmt: skip

_PORT = re.compile(r"[0-9]{1,5}")
_PORT_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")
_NODE_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
_USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123

_T = TypeVar("_T")

# TOML types as an operator names them; bool comes apart since Python's bool is an int.
_KIND_NAMES: Final[dict[type, str]] = {
    bool: "true or false",
    int: "an integer",
    str: "a string",
    list: "an array",
    dict: "a table",
}


def load(path: Path) -> GatewayConfig:
    """Read and validate the TOML file at ``path``.

    Raises:
        ConfigError: with every problem found, each prefixed by ``path`` as given.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        detail = f"not UTF-8 text ({error.reason} at byte {error.start})"
        raise ConfigError([f"{path}: cannot read: {detail}"]) from error
    except OSError as error:
        detail = error.strerror or str(error)
        raise ConfigError([f"{path}: cannot read: {detail}"]) from error
    return load_text(text, path)


def load_text(text: str, source: Path) -> GatewayConfig:
    """Validate TOML ``text`` as if it had been read from the file ``source``.

    ``source`` prefixes every message and anchors relative paths (its directory).

    Raises:
        ConfigError: with every problem found in one pass.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{source}: TOML syntax error: {error}"]) from error
    problems = _Problems(source)
    # Sections build their dataclasses even around a bad value (a placeholder takes
    # its place) so that one pass finds everything; placeholders never escape,
    # because any recorded problem raises here.
    config = _gateway(_Table(data, "", problems), source)
    if problems.lines:
        raise ConfigError(problems.lines)
    return config


def summary(cfg: GatewayConfig) -> str:
    """Describe ``cfg`` for ``check-config``: effective values, no secrets.

    Users appear by name only; password hashes never leave ``UserSettings``.
    """
    server, passive, tls = cfg.server, cfg.passive, cfg.tls
    active = "allowed" if server.allow_active_mode else "refused"
    port_count = passive.port_max - passive.port_min + 1
    names = ", ".join(user.name for user in cfg.users) or "none (nobody can log in)"
    lines = [
        f"Configuration: {cfg.source if cfg.source is not None else 'built-in demo'}",
        f"Listeners (explicit TLS): {_endpoints(server.listen)}",
        f"Listeners (implicit TLS): {_endpoints(server.implicit_listen)}",
        f"Banner: {server.banner}",
        f"Node name: {server.node_name or 'the host name'}",
        (
            "PROXY protocol from: "
            + (_networks(server.proxy_protocol_from) or "nobody (off)")
        ),
        (
            f"Sessions: at most {server.max_sessions}, "
            f"{server.max_sessions_per_ip} per client address, "
            f"{server.max_sessions_per_user} per user; "
            f"login timeout {server.login_timeout_seconds} s, "
            f"idle timeout {server.idle_timeout_seconds} s, "
            f"shutdown grace {server.shutdown_grace_seconds} s, "
            f"verified logins remembered {server.login_cache_seconds} s"
        ),
        (
            "Worker processes: "
            + (str(server.workers) if server.workers else "auto (one per CPU core)")
        ),
        f"Active mode (PORT/EPRT): {active}",
        _access_line(cfg.access),
        _defender_line(cfg.defender, cfg.access),
        (
            f"TLS: certificate {tls.certificate}, private key {tls.private_key}, "
            f"versions {tls.min_version}-{tls.max_version}, "
            f"data connections: {_reuse_words(tls.reuse)}"
        ),
        *(
            f"TLS override: {_networks(override.networks)} -> "
            f"{_policy_words(override.reuse, override.max_version)}"
            for override in tls.overrides
        ),
        (
            f"Passive ports: {passive.port_min}-{passive.port_max} "
            f"({_count(port_count, 'port')}), "
            f"connect timeout {passive.connect_timeout_seconds} s"
        ),
        f"Passive address: {_advertised(passive.address)}",
        *(
            f"Passive override: {', '.join(str(net) for net in override.networks)}"
            f" -> {_advertised(override.address)}"
            for override in passive.overrides
        ),
        f"Storage root: {cfg.storage.root}",
        f"Admin socket: {cfg.admin.socket}",
        f"Users ({len(cfg.users)}): {names}",
        *(
            f"User {user.name}: "
            + "; ".join(
                part
                for part in (
                    f"login only from {_networks(user.allow)}" if user.allow else "",
                    _policy_words(user.reuse, user.max_version)
                    if user.reuse or user.max_version
                    else "",
                )
                if part
            )
            for user in cfg.users
            if user.allow or user.reuse or user.max_version
        ),
        f"Log level: {cfg.log_level}",
        f"Audit log: {cfg.audit_file or 'stdout'}",
        f"xferlog: {cfg.xferlog_file or 'off'}",
        f"Upload sha256 in the audit log: {'on' if cfg.upload_sha256 else 'off'}",
        f"Metrics: {_metrics_summary(cfg.metrics)}",
    ]
    return "\n".join(lines)


def _endpoints(addresses: Sequence[ListenAddress]) -> str:
    return ", ".join(endpoint(address) for address in addresses) or "none"


def _networks(networks: Sequence[IPNetwork]) -> str:
    return ", ".join(str(network) for network in networks)


def _access_line(access: AccessSettings) -> str:
    if not access.allow:
        return (
            "Access: WARNING: every client address may connect "
            "(access.allow is empty; list your partners' networks)"
        )
    return f"Access: only from {_networks(access.allow)}"


def _defender_line(defender: DefenderSettings, access: AccessSettings) -> str:
    if not defender.enabled:
        return "Defender: off (failed logins never lead to a ban)"
    line = (
        f"Defender: ban after {defender.max_failures} failed logins within "
        f"{defender.window_seconds} s, for {defender.ban_seconds} s "
        f"(doubling on repeat, at most {defender.max_ban_seconds} s)"
    )
    if access.safe:
        line += f"; never banned: {_networks(access.safe)}"
    return line


def _reuse_words(reuse: str) -> str:
    if reuse == "required":
        return "must resume the control connection's TLS session"
    if reuse == "required-any-ip":
        return "must resume the control connection's TLS session, from any address"
    return "same client IP only (no TLS session resumption check)"


def _policy_words(reuse: str | None, max_version: str | None) -> str:
    parts = []
    if reuse is not None:
        parts.append(f"data connections {_reuse_words(reuse)}")
    if max_version is not None:
        parts.append(f"TLS at most {max_version}")
    return ", ".join(parts)


def endpoint(address: ListenAddress) -> str:
    """Write a listener the way the config does: ``IP:port``, ``[IPv6]:port``."""
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}"


def _metrics_summary(metrics: MetricsSettings) -> str:
    if metrics.listen is None:
        return "off"
    where = endpoint(metrics.listen)
    text = f"http://{where}/metrics (also /healthz, /readyz)"
    if not _is_internal(metrics.listen.host):
        text += ", public (metrics.allow_public)"
    labels = "on" if metrics.per_user_labels else "off"
    return f"{text}, per-user labels {labels}"


def _advertised(address: str) -> str:
    return address or "local address of the control connection"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


# --- the reader ----------------------------------------------------------------------


class _BadValueError(ValueError):
    """A value parser's complaint; the reader adds file, key path and value."""


_HIDDEN: Final = object()  # "no (got ...)": the value is secret, absent or meaningless


class _Problems:
    """Every problem found so far, formatted ``FILE: key.path: problem (got VALUE)``."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, problem: str, value: object = _HIDDEN) -> None:
        got = "" if value is _HIDDEN else f" (got {value!r})"
        self.lines.append(f"{self.source}: {key}: {problem}{got}")


@dataclass(frozen=True)
class _Entry(Generic[_T]):
    """One array element that parsed: where it was, what it said, what it means."""

    key: str
    text: str
    value: _T


def _is_kind(value: object, kind: type[_T]) -> TypeGuard[_T]:
    # TOML true is a Python int too; for an integer key it is still a type error.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


class _Table:
    """One TOML table being read.

    Getters type-check and parse a key, record any problem under the table's key path
    and return a usable value; the table remembers which keys were asked for, so
    ``close`` can report every other key as unknown (a typo must not be silently
    ignored and leave a default in force).
    """

    def __init__(self, data: dict[str, object], path: str, problems: _Problems) -> None:
        self.path = path
        self.problems = problems
        self._data = data
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """The full key path of ``name`` in this table, as messages show it."""
        return f"{self.path}.{name}" if self.path else name

    def raw(
        self, name: str, kind: type[_T], *, required: bool, secret: bool = False
    ) -> _T | None:
        """Return the value of ``name`` if present and of ``kind``, else None."""
        self._seen.add(name)
        if name not in self._data:
            if required:
                self.problems.add(self.key(name), "required key is missing")
            return None
        value = self._data[name]
        if not _is_kind(value, kind):
            shown = _HIDDEN if secret else value
            self.problems.add(self.key(name), f"must be {_KIND_NAMES[kind]}", shown)
            return None
        return value

    def required(
        self, name: str, parse: Callable[[str], _T], *, secret: bool = False
    ) -> _T | None:
        """Parse the required string ``name``; None if missing or invalid."""
        text = self.raw(name, str, required=True, secret=secret)
        if text is None:
            return None
        return self._parse(self.key(name), text, parse, secret=secret)

    def optional(self, name: str, parse: Callable[[str], _T], default: _T) -> _T:
        """Parse the optional string ``name``; ``default`` if absent or invalid."""
        text = self.raw(name, str, required=False)
        if text is None:
            return default
        value = self._parse(self.key(name), text, parse)
        return default if value is None else value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        """Read the optional integer ``name`` in ``low..high``."""
        value = self.raw(name, int, required=False)
        if value is None:
            return default
        if not low <= value <= high:
            self.problems.add(self.key(name), f"must be {low} to {high}", value)
            return default
        return value

    def flag(self, name: str, default: bool) -> bool:
        """Read the optional boolean ``name``."""
        value = self.raw(name, bool, required=False)
        return default if value is None else value

    def strings(
        self, name: str, parse: Callable[[str], _T], *, required: bool = True
    ) -> list[_Entry[_T]]:
        """Read the array of strings ``name``: non-empty if ``required``.

        An optional array may be absent or empty. Returns the entries that parsed,
        with their key paths for follow-up checks (duplicates) by the caller.

        A string made of environment references (``"${FTPS_ALLOW}"``) stands for
        the array: its expansion is split at commas and blanks, so a container can
        set a list (allowlists, listeners) from one variable.
        """
        self._seen.add(name)
        given = self._data.get(name)
        if isinstance(given, str) and "${" in given:
            return self._strings_from_environment(name, given, parse, required=required)
        items = self.raw(name, list, required=required)
        if items is None:
            return []
        if required and not items:
            self.problems.add(self.key(name), "must not be empty", items)
        entries: list[_Entry[_T]] = []
        for index, item in enumerate(items):
            key = f"{self.key(name)}[{index}]"
            if not isinstance(item, str):
                self.problems.add(key, "must be a string", item)
                continue
            value = self._parse(key, item, parse)
            if value is not None:
                entries.append(_Entry(key, item, value))
        return entries

    def _strings_from_environment(
        self, name: str, text: str, parse: Callable[[str], _T], *, required: bool
    ) -> list[_Entry[_T]]:
        try:
            expanded = expand_environment(text)
        except _BadValueError as error:
            self.problems.add(self.key(name), str(error), text)
            return []
        words = [word for word in re.split(r"[,\s]+", expanded) if word]
        if required and not words:
            problem = "must not be empty (the environment gave nothing)"
            self.problems.add(self.key(name), problem, text)
        entries: list[_Entry[_T]] = []
        for index, word in enumerate(words):
            key = f"{self.key(name)}[{index}]"
            value = self._parse(key, word, parse)
            if value is not None:
                entries.append(_Entry(key, word, value))
        return entries

    def value(self, name: str) -> object | None:
        """The raw value of ``name`` (any kind), or None if absent; marks it read."""
        self._seen.add(name)
        return self._data.get(name)

    def table(self, name: str) -> _Table:
        """The sub-table ``name``; an absent one reads as empty."""
        data = self.raw(name, dict, required=False)
        return _Table(data or {}, self.key(name), self.problems)

    def tables(self, name: str, *, secret: bool = False) -> list[_Table]:
        """The array of tables ``name`` (``[[name]]`` sections); absent means none.

        ``secret``: the entries hold secrets, so no message shows their values.
        """
        self._seen.add(name)
        items = self._data.get(name, [])
        if not isinstance(items, list):
            shown = _HIDDEN if secret else items
            problem = f"must be an array of tables ([[{self.key(name)}]] sections)"
            self.problems.add(self.key(name), problem, shown)
            return []
        readers: list[_Table] = []
        for index, item in enumerate(items):
            key = f"{self.key(name)}[{index}]"
            if isinstance(item, dict):
                readers.append(_Table(item, key, self.problems))
            else:
                self.problems.add(key, "must be a table", _HIDDEN if secret else item)
        return readers

    def given(self) -> frozenset[str]:
        """The keys this table actually contains."""
        return frozenset(self._data)

    def close(self) -> None:
        """Report every key that no getter asked for."""
        for name in self._data:
            if name not in self._seen:
                self.problems.add(self.key(name), "unknown key")

    def _parse(
        self, key: str, text: str, parse: Callable[[str], _T], *, secret: bool = False
    ) -> _T | None:
        try:
            return parse(expand_environment(text))
        except _BadValueError as error:
            self.problems.add(key, str(error), _HIDDEN if secret else text)
            return None


# ${NAME} or ${NAME:-default} in a string value: containers set the masquerade
# address, the passive range or the node name from their environment.
_ENVIRONMENT_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(text: str) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}`` with the environment's value.

    Only string values are expanded, and only this syntax (a ``$`` elsewhere, as in
    argon2 hashes, is left alone).

    Raises:
        _BadValueError: a referenced variable is unset and has no default.
    """
    if "${" not in text:
        return text

    def substitute(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise _BadValueError(f"environment variable {name} is not set")
            return default
        return value

    return _ENVIRONMENT_REFERENCE.sub(substitute, text)


# --- sections ------------------------------------------------------------------------


def _gateway(root: _Table, source: Path) -> GatewayConfig:
    base = source.parent.absolute()
    server = _server(root.table("server"))
    tls = _tls(root.table("tls"), base)
    passive = _passive(root.table("passive"), server.listen + server.implicit_listen)
    storage = _storage(root.table("storage"), base)
    access = _access(root.table("access"))
    defender = _defender(root.table("defender"))
    admin = _admin(root.table("admin"), base, storage.root)
    log_level, audit_file, xferlog_file, upload_sha256 = _logging(
        root.table("logging"), base
    )
    metrics = _metrics(
        root.table("metrics"), server.listen + server.implicit_listen, passive
    )
    groups = _groups(root)
    users = _users(root, tls.min_version)
    root.close()
    config = GatewayConfig(
        source, server, tls, passive, storage, users,
        access=access, defender=defender, admin=admin, log_level=log_level,
        audit_file=audit_file, xferlog_file=xferlog_file,
        upload_sha256=upload_sha256, metrics=metrics,
        groups=groups,
    )  # fmt: skip
    _check_trees(root.problems, config)
    _check_proxy_and_ip_match(root.problems, config)
    return config


def _check_proxy_and_ip_match(problems: _Problems, config: GatewayConfig) -> None:
    """Behind a PROXY balancer, "ip-match" would let any partner take any transfer.

    Data connections then all come from the balancer's address, so the address
    check cannot tell partners apart; only TLS resumption can.
    """
    if not config.server.proxy_protocol_from:
        return
    uses: list[tuple[str, str | None]] = [("tls.reuse", config.tls.reuse)]
    uses += [
        (f"tls.overrides[{index}].reuse", override.reuse)
        for index, override in enumerate(config.tls.overrides)
    ]
    uses += [
        (f"users[{index}].reuse", user.reuse) for index, user in enumerate(config.users)
    ]
    for key, reuse in uses:
        if reuse == "ip-match":
            problems.add(
                key,
                '"ip-match" cannot tell partners apart behind server.'
                "proxy_protocol_from (their data connections all come from the "
                'balancer); use "required" or "required-any-ip"',
                reuse,
            )


def _server(table: _Table) -> ServerSettings:
    problems_before = len(table.problems.lines)
    listen = _listeners(table, "listen")
    implicit = _listeners(table, "implicit_listen", seen=listen)
    if not listen and not implicit and len(table.problems.lines) == problems_before:
        problem = "no listener: give listen, implicit_listen or both"
        table.problems.add(table.key("listen"), problem)
    settings = ServerSettings(
        listen=listen,
        implicit_listen=implicit,
        banner=table.optional("banner", _parse_banner, ServerSettings.banner),
        idle_timeout_seconds=table.integer(
            "idle_timeout_seconds", 1, 86_400, ServerSettings.idle_timeout_seconds
        ),
        login_timeout_seconds=table.integer(
            "login_timeout_seconds", 1, 3_600, ServerSettings.login_timeout_seconds
        ),
        max_sessions=table.integer(
            "max_sessions", 1, 100_000, ServerSettings.max_sessions
        ),
        max_sessions_per_ip=table.integer(
            "max_sessions_per_ip", 1, 100_000, ServerSettings.max_sessions_per_ip
        ),
        max_sessions_per_user=table.integer(
            "max_sessions_per_user", 1, 100_000, ServerSettings.max_sessions_per_user
        ),
        allow_active_mode=table.flag(
            "allow_active_mode", ServerSettings.allow_active_mode
        ),
        shutdown_grace_seconds=table.integer(
            "shutdown_grace_seconds", 0, 86_400, ServerSettings.shutdown_grace_seconds
        ),
        node_name=table.optional("node_name", _parse_node_name, ""),
        proxy_protocol_from=_unique_networks(
            table, "proxy_protocol_from", {}, required=False
        ),
        workers=_workers(table),
        login_cache_seconds=table.integer(
            "login_cache_seconds", 0, 3_600, ServerSettings.login_cache_seconds
        ),
    )
    table.close()
    return settings


MAX_WORKERS: Final = 64


def _workers(table: _Table) -> int:
    """``workers``: "auto" (0) or 1 to 64 processes."""
    value = table.value("workers")
    if value is not None:
        if value == "auto":
            return 0
        if _is_kind(value, int) and 1 <= value <= MAX_WORKERS:
            return value
        problem = f'must be "auto" or 1 to {MAX_WORKERS}'
        table.problems.add(table.key("workers"), problem, value)
    return ServerSettings.workers


def _listeners(
    table: _Table, name: str, seen: Sequence[ListenAddress] = ()
) -> tuple[ListenAddress, ...]:
    """``listen`` or ``implicit_listen``: optional arrays, no address twice."""
    taken = {address: table.key("listen") for address in seen}
    first: dict[ListenAddress, str] = {}
    listeners: list[ListenAddress] = []
    for entry in table.strings(name, _parse_listen, required=False):
        other = first.get(entry.value) or taken.get(entry.value)
        if other is not None and entry.value.port != 0:  # port 0: each its own port
            problem = f"duplicate listener, same as {other}"
            table.problems.add(entry.key, problem, entry.text)
        else:
            first.setdefault(entry.value, entry.key)
            listeners.append(entry.value)
    return tuple(listeners)


def _tls(table: _Table, base: Path) -> TLSSettings:
    certificate = table.required("certificate", _path_under(base))
    private_key = table.required("private_key", _path_under(base))
    min_version = table.optional(
        "min_version", _one_of(TLS_VERSIONS), TLSSettings.min_version
    )
    max_version = table.optional(
        "max_version", _one_of(TLS_VERSIONS), TLSSettings.max_version
    )
    reuse = table.optional("reuse", _one_of(REUSE_POLICIES), TLSSettings.reuse)
    overrides = _tls_overrides(table)
    table.close()
    if certificate is not None and private_key is not None:
        _check_certificate_files(table.problems, certificate, private_key)
    for key, version in [(table.key("max_version"), max_version)] + [
        (f"{table.key('overrides')}[{index}].max_version", override.max_version)
        for index, override in enumerate(overrides)
    ]:
        if version is not None and version < min_version:
            table.problems.add(key, f"below tls.min_version {min_version}", version)
    return TLSSettings(
        certificate or Path(), private_key or Path(), min_version, max_version,
        reuse, overrides,
    )  # fmt: skip


def _tls_overrides(tls: _Table) -> tuple[TLSOverride, ...]:
    overrides: list[TLSOverride] = []
    first: dict[IPNetwork, str] = {}
    for table in tls.tables("overrides"):
        networks = _unique_networks(table, "networks", first, required=True)
        reuse = table.optional("reuse", _one_of(REUSE_POLICIES), None)
        max_version = table.optional("max_version", _one_of(TLS_VERSIONS), None)
        if reuse is None and max_version is None and "networks" in table.given():
            table.problems.add(table.path, "sets neither reuse nor max_version")
        table.close()
        overrides.append(TLSOverride(networks, reuse, max_version))
    return tuple(overrides)


def _unique_networks(
    table: _Table, name: str, first: dict[IPNetwork, str], *, required: bool
) -> tuple[IPNetwork, ...]:
    """An array of networks; the very same network twice is a copy-paste slip.

    Overlapping networks are fine (first match wins, so a /24 can carve an exception
    out of a /8 listed later). ``first`` spans the arrays that must not repeat.
    """
    networks: list[IPNetwork] = []
    for entry in table.strings(name, _parse_network, required=required):
        if entry.value in first:
            problem = f"network listed twice, first at {first[entry.value]}"
            table.problems.add(entry.key, problem, entry.text)
        else:
            first[entry.value] = entry.key
            networks.append(entry.value)
    return tuple(networks)


def _check_certificate_files(
    problems: _Problems, certificate: Path, private_key: Path
) -> None:
    """Add the certificate module's findings (missing file, key mismatch, expiry)."""
    # Imported here: certs pulls in cryptography, which nothing else in loading needs,
    # and a late import cannot become an import cycle if certs ever uses this module.
    from ftps_gateway.tls import certificates as certs  # noqa: PLC0415

    for key, problem in certs.certificate_problems(certificate, private_key):
        problems.add(key, problem)


def _passive(table: _Table, listeners: Sequence[ListenAddress]) -> PassiveSettings:
    ports = table.required("ports", _parse_port_range)
    address = table.optional("address", _parse_advertised, PassiveSettings.address)
    connect_timeout = table.integer(
        "connect_timeout_seconds", 1, 600, PassiveSettings.connect_timeout_seconds
    )
    overrides = _overrides(table)
    table.close()
    if ports is not None:
        _check_listener_overlap(table, ports, listeners)
    port_min, port_max = ports or (0, 0)
    return PassiveSettings(port_min, port_max, address, overrides, connect_timeout)


def _check_listener_overlap(
    table: _Table, ports: tuple[int, int], listeners: Sequence[ListenAddress]
) -> None:
    # A data connection landing on the control port would be taken for a new session.
    for listener in listeners:
        if ports[0] <= listener.port <= ports[1]:
            problem = f"overlaps the control listener {endpoint(listener)}"
            table.problems.add(table.key("ports"), problem)


def _overrides(passive: _Table) -> tuple[PassiveOverride, ...]:
    first: dict[IPNetwork, str] = {}
    overrides: list[PassiveOverride] = []
    for table in passive.tables("overrides"):
        networks = _unique_networks(table, "networks", first, required=True)
        address = table.required("address", _parse_advertised)
        table.close()
        overrides.append(PassiveOverride(networks, address or ""))
    return tuple(overrides)


def _storage(table: _Table, base: Path) -> StorageSettings:
    root = table.required("root", _path_under(base))
    retention = table.integer(
        "partial_retention_seconds", 0, MAX_RETENTION_SECONDS,
        StorageSettings.partial_retention_seconds,
    )  # fmt: skip
    table.close()
    return StorageSettings(root or Path(), retention)


def _access(table: _Table) -> AccessSettings:
    allow = _unique_networks(table, "allow", {}, required=False)
    safe = _unique_networks(table, "safe", {}, required=False)
    table.close()
    return AccessSettings(allow, safe)


def _defender(table: _Table) -> DefenderSettings:
    defaults = DefenderSettings()
    settings = DefenderSettings(
        enabled=table.flag("enabled", defaults.enabled),
        max_failures=table.integer("max_failures", 1, 1000, defaults.max_failures),
        window_seconds=table.integer(
            "window_seconds", 1, 86_400, defaults.window_seconds
        ),
        ban_seconds=table.integer("ban_seconds", 1, 2_592_000, defaults.ban_seconds),
        max_ban_seconds=table.integer(
            "max_ban_seconds", 1, 2_592_000, defaults.max_ban_seconds
        ),
    )
    table.close()
    if settings.max_ban_seconds < settings.ban_seconds:
        table.problems.add(
            table.key("max_ban_seconds"),
            f"below defender.ban_seconds ({settings.ban_seconds})",
            settings.max_ban_seconds,
        )
    return settings


# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107


def _admin(table: _Table, base: Path, storage_root: Path) -> AdminSettings:
    socket = table.optional("socket", _path_under(base), None)
    table.close()
    if socket is None:
        socket = storage_root / ".ftps-gateway" / "admin.sock"
    if len(bytes(socket)) > MAX_SOCKET_PATH_BYTES:
        key = table.key("socket")
        problem = f"longer than {MAX_SOCKET_PATH_BYTES} bytes, too long for a socket"
        if "socket" not in table.given():
            problem += " (the default under storage.root; set admin.socket)"
        table.problems.add(key, problem, str(socket))
    return AdminSettings(socket)


def _logging(table: _Table, base: Path) -> tuple[str, Path | None, Path | None, bool]:
    level = table.optional("level", _one_of(LOG_LEVELS), GatewayConfig.log_level)
    # "" is the documented default ("stdout", "off"), so ${VAR:-} works in containers.
    audit_file = table.optional("audit_file", _optional_path_under(base), None)
    xferlog_file = table.optional("xferlog_file", _optional_path_under(base), None)
    upload_sha256 = table.flag("upload_sha256", GatewayConfig.upload_sha256)
    table.close()
    return level, audit_file, xferlog_file, upload_sha256


def _metrics(
    table: _Table, listeners: Sequence[ListenAddress], passive: PassiveSettings
) -> MetricsSettings:
    listen = table.optional("listen", _parse_optional_listen, None)
    per_user_labels = table.flag("per_user_labels", MetricsSettings.per_user_labels)
    allow_public = table.flag("allow_public", MetricsSettings.allow_public)
    table.close()
    if listen is not None:
        _check_metrics_listen(table, listen, listeners, passive, allow_public)
    return MetricsSettings(listen, per_user_labels, allow_public)


def _check_metrics_listen(
    table: _Table,
    listen: ListenAddress,
    listeners: Sequence[ListenAddress],
    passive: PassiveSettings,
    allow_public: bool,
) -> None:
    key, shown = table.key("listen"), endpoint(listen)
    if not allow_public and not _is_internal(listen.host):
        # Plain HTTP, no login: anyone who reaches it learns partner activity and,
        # with per-user labels, partner names.
        problem = (
            "a public or every-interface address; use loopback or a private"
            " address, or set metrics.allow_public = true"
        )
        table.problems.add(key, problem, shown)
    if listen.port == 0:
        return
    if passive.port_min <= listen.port <= passive.port_max:
        # A passive listener could take the port first (or be refused it), at random.
        table.problems.add(key, "port inside passive.ports", shown)
    for listener in listeners:
        if listener.port == listen.port and _hosts_overlap(listener.host, listen.host):
            problem = f"same port as the control listener {endpoint(listener)}"
            table.problems.add(key, problem, shown)


def _is_internal(host: str) -> bool:
    """Loopback, link-local or a private network; never "every interface"."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _INTERNAL_NETWORKS)


def _hosts_overlap(first: str, second: str) -> bool:
    """Whether two listeners on the same port would collide."""
    a, b = ipaddress.ip_address(first), ipaddress.ip_address(second)
    if a == b or a == ipaddress.IPv6Address("::") or b == ipaddress.IPv6Address("::"):
        return True  # "::" is dual-stack on Linux: it takes IPv4 ports too
    return a.version == b.version and (a.is_unspecified or b.is_unspecified)


def _users(root: _Table, min_version: str) -> tuple[UserSettings, ...]:
    first: dict[str, str] = {}  # lower-cased name -> name as first written
    users: list[UserSettings] = []
    for table in root.tables("users", secret=True):
        name = table.required("name", _parse_user_name)
        password_hash = table.required("password", _parse_password_hash, secret=True)
        allow = _unique_networks(table, "allow", {}, required=False)
        reuse = table.optional("reuse", _one_of(REUSE_POLICIES), None)
        max_version = table.optional("max_version", _one_of(TLS_VERSIONS), None)
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


def _check_unique_user(table: _Table, name: str, first: dict[str, str]) -> None:
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


def _groups(root: _Table) -> tuple[GroupSettings, ...]:
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


def _mounts(owner: _Table) -> tuple[MountSettings, ...]:
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
    table: _Table, name: str, *, required: bool
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


def _quota(table: _Table) -> tuple[int | None, int | None]:
    max_bytes = table.integer("quota_bytes", 1, MAX_QUOTA, 0)
    max_files = table.integer("quota_files", 1, MAX_QUOTA, 0)
    return max_bytes or None, max_files or None


def _with_tree(table: _Table, user: UserSettings) -> UserSettings:
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


def _check_trees(problems: _Problems, config: GatewayConfig) -> None:
    """Every user's effective tree: known groups, no path mounted twice, safe sources.

    Each problem is reported once, under the key that can fix it.
    """
    # Imported here: mounts imports this module (for types only at run time, but a
    # late import keeps the dependency one-way whatever mounts grows into).
    from ftps_gateway.config import tree as mounts  # noqa: PLC0415

    seen: set[tuple[str, str]] = set()
    for index, user in enumerate(config.users):
        plan = mounts.plan_tree(config, user, user_key=f"users[{index}]")
        for key, problem in plan.problems:
            if (key, problem) not in seen:
                seen.add((key, problem))
                problems.add(key, problem)


def _parse_mount_path(text: str) -> str:
    if not text.startswith("/"):
        raise _BadValueError("must be an absolute virtual path such as /finance")
    try:
        normalized = vfs.normalize_virtual("/", text)
    except vfs.PathRefused as refusal:
        raise _BadValueError(f"not a usable path: {refusal.reason}") from None
    if normalized != text:
        raise _BadValueError(f"not in normal form; write {normalized!r}")
    return text


def _parse_source(text: str) -> str:
    if not text:
        raise _BadValueError("must not be empty")
    if "\x00" in text:
        raise _BadValueError("must not contain NUL")
    try:
        vfs.expand_source(text, "user", Path("/"))
    except ValueError as error:
        raise _BadValueError(str(error)) from None
    return text


# --- value parsers: str in, value out, or _BadValueError(problem) --------------------


def _parse_listen(text: str) -> ListenAddress:
    if text.startswith("["):
        host, separator, port = text[1:].partition("]:")
    else:
        host, separator, port = text.rpartition(":")
    if not separator or not host:
        raise _BadValueError("not IP:PORT or [IPv6]:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise _BadValueError(
            "host is not an IP address (names are not resolved)"
        ) from None
    if (ip.version == 6) != text.startswith("["):  # noqa: PLR2004
        raise _BadValueError("an IPv6 address needs brackets, IPv4 must not have them")
    if not _PORT.fullmatch(port) or not 0 <= int(port) <= PORT_MAX:
        raise _BadValueError(f"port must be 0 to {PORT_MAX} (0: any free port)")
    return ListenAddress(str(ip), int(port))


def _parse_optional_listen(text: str) -> ListenAddress | None:
    """``IP:PORT`` as for ``server.listen``; "" means "off"."""
    return _parse_listen(text) if text else None


def _parse_port_range(text: str) -> tuple[int, int]:
    match = _PORT_RANGE.fullmatch(text)
    if match is None:
        raise _BadValueError("not a START-END port range")
    start, end = int(match[1]), int(match[2])
    if start < PASSIVE_PORT_MIN or end > PORT_MAX:
        raise _BadValueError(f"ports must be {PASSIVE_PORT_MIN} to {PORT_MAX}")
    if start > end:
        raise _BadValueError("inverted range, start above end")
    if end - start + 1 > MAX_PASSIVE_PORTS:
        raise _BadValueError(f"more than {MAX_PASSIVE_PORTS} ports")
    return start, end


def _parse_advertised(text: str) -> str:
    """An address for 227 replies: IPv4, a DNS name, or "" for the local address."""
    if not text or _is_hostname(text):
        return text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise _BadValueError("not an IPv4 address or DNS hostname") from None
    # PASV's 227 reply has room for four octets only (RFC 959); EPSV sends no address.
    if ip.version == 6:  # noqa: PLR2004
        raise _BadValueError("a PASV reply can only advertise an IPv4 address")
    if ip.is_unspecified:
        raise _BadValueError(
            'not an address a client can reach; "" means the local address'
        )
    return text


def _is_hostname(text: str) -> bool:
    name = text.removesuffix(".")
    labels = name.split(".")
    return (
        len(name) <= MAX_HOSTNAME_CHARS
        and all(_DNS_LABEL.fullmatch(label) for label in labels)
        # An all-digit last label is a mistyped IPv4 address (10.0.0.300), never a
        # name: no top-level domain is numeric (RFC 3696 section 2).
        and not labels[-1].isdigit()
    )


def _parse_network(text: str) -> IPNetwork:
    if "%" in text:  # ipaddress accepts fe80::%eth0/64, but a network has no zone
        raise _BadValueError("a network cannot carry a zone id (%...)")
    try:
        network = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _BadValueError(
            "not an IP network (CIDR like 10.0.0.0/8, or one IP)"
        ) from None
    # strict=False would quietly turn 10.0.0.1/8 into 10.0.0.0/8; say so instead,
    # since the operator may have meant 10.0.0.1/32.
    if ipaddress.ip_interface(text).ip != network.network_address:
        raise _BadValueError(f"host bits set; the network would be {network}")
    return network


def _parse_user_name(text: str) -> str:
    # The name becomes a directory under storage.root: no dot-files, no option-like
    # leading dash, nothing a shell or path would interpret.
    if len(text) > MAX_USER_NAME_CHARS or not _USER_NAME.fullmatch(text):
        raise _BadValueError(
            f"must be 1 to {MAX_USER_NAME_CHARS} of A-Z a-z 0-9 . _ -,"
            " not starting with '.' or '-'"
        )
    return text


def _parse_password_hash(text: str) -> str:
    # The same check the verifier relies on: a truncated paste (empty salt or digest)
    # or an old argon2 version fails here, not at a partner's first login.
    if not passwords.is_argon2id_hash(text):
        raise _BadValueError(NOT_ARGON2ID)
    return text


def _parse_node_name(text: str) -> str:
    if text == "":
        return text  # the documented default: the host name
    if not _NODE_NAME.fullmatch(text):
        raise _BadValueError("must be 1 to 63 of A-Z a-z 0-9 . _ -")
    return text


def _parse_banner(text: str) -> str:
    if not 1 <= len(text) <= MAX_BANNER_CHARS:
        raise _BadValueError(f"must be 1 to {MAX_BANNER_CHARS} characters")
    if "\r" in text or "\n" in text:
        raise _BadValueError("must be one line (a line break would end the 220 reply)")
    return text


def _path_under(base: Path) -> Callable[[str], Path]:
    """A parser for a path; relative ones are taken from the config file's directory."""

    def parse(text: str) -> Path:
        if not text:
            raise _BadValueError("must not be empty")
        if "\x00" in text:  # no file has such a name; os calls raise ValueError
            raise _BadValueError("must not contain a NUL character")
        return base / text

    return parse


def _optional_path_under(base: Path) -> Callable[[str], Path | None]:
    """Like ``_path_under``, but "" means "not set" (the key's default)."""
    parse = _path_under(base)

    def parse_optional(text: str) -> Path | None:
        return parse(text) if text else None

    return parse_optional


def _one_of(choices: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise _BadValueError(f"must be one of {', '.join(choices)}")
        return text

    return parse

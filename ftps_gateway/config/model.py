"""The configuration's shape: frozen dataclasses and the words and limits they use.

What ``load`` hands out, and what every other floor reads. Pure data: nothing here
reads TOML or checks a value (``loader``, ``users``, ``parsers`` do), so the rest of
the package can import these types without pulling in the reader.

May import: ``ftps_gateway.storage.vfs`` (``Permission``); nothing else in the package.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from ftps_gateway.policy.netpolicy import unmapped
from ftps_gateway.storage import vfs

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
    # Logged-in sessions (the gateway's whole node, all workers together), taken at
    # login: in total, from one address key (access.ipv6_prefix_length), as one user.
    max_sessions: int = 512
    max_sessions_per_ip: int = 16
    max_sessions_per_user: int = 8
    # Connections that have not logged in yet, per worker process (each worker's own
    # pool; session.admission): in total, and from one address key. A full pool
    # makes room by closing (421) the longest-idle connection of the address that
    # holds the most, so idle strangers cannot lock partners out.
    max_unauthenticated: int = 256
    max_unauthenticated_per_ip: int = 32
    # Keys still accepted for old configs but without effect (allow_active_mode =
    # false: active mode is not supported, decision 0009); check-config warns.
    obsolete_keys: tuple[str, ...] = ()
    shutdown_grace_seconds: int = 30  # SIGTERM: running transfers may finish
    node_name: str = ""  # shown in SITE DIAG and the audit log; "": the host name
    # Load balancers whose connections start with a PROXY protocol header (v1/v2).
    proxy_protocol_from: tuple[IPNetwork, ...] = ()
    workers: int = 0  # worker processes; 0 = "auto": one per CPU core
    login_cache_seconds: int = 300  # a verified password skips argon2id this long
    implicit_listen: tuple[ListenAddress, ...] = ()  # TLS from the first byte (990)
    # Seconds a worker's IO loop may go without turning before it is reported stuck
    # (log with its stack, /readyz fails, a metric counts it); 0 = no watchdog.
    loop_stall_seconds: int = 5


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
    # Of each worker's share of the range, the percentage one user, and one client
    # address (IPv6: per access prefix), may hold waiting for a data connection; past
    # it PASV/EPSV gets 425. 1-100, default 50; 100 = only the range limits.
    max_ports_per_user_percent: int = 50
    max_ports_per_ip_percent: int = 50


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
    # IPv6 clients are counted (bans, session limits, the unauthenticated pool) per
    # network of this prefix length: one subscriber holds a whole /64 (RFC 6177).
    # 32-128 bits; default 64; 128 counts each address apart. IPv4: per address.
    ipv6_prefix_length: int = 64


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


# --- event hooks (issue 16) ---------------------------------------------------------

# What a hook can be told about: the happenings ``session.events`` hands to the hooks.
HOOK_EVENTS: Final = (
    "upload", "download", "delete", "rename", "mkdir", "rmdir", "login-failed", "ban",
)  # fmt: skip


@dataclass(frozen=True)
class HookSettings:
    """``[[hooks]]``: run a command or POST to a URL when a happening matches."""

    name: str  # unique; names the hook in spool files, metrics, audit; "hooks[N]"
    key: str  # where it was configured, for messages: "hooks[0]"
    events: frozenset[str]  # some of HOOK_EVENTS; required
    users: frozenset[str] = frozenset()  # only these users' events; empty: anyone's
    groups: frozenset[str] = frozenset()  # only members of these groups; empty: any
    paths: tuple[str, ...] = ()  # virtual path globs (fnmatch, "*" spans "/"); any
    # Exactly one action: an argv (absolute program path, never a shell) ...
    command: tuple[str, ...] = ()
    # ... or an https:// URL (http:// only for a loopback host) to POST the event to.
    url: str = ""
    # The HMAC-SHA256 key of url hooks: secret_file's content without trailing CR/LF.
    secret: bytes = field(default=b"", repr=False)
    secret_file: Path | None = None  # where the secret came from (for messages)
    ca_file: Path | None = None  # CA bundle for the URL's certificate; None: system
    timeout_seconds: int = 30  # one attempt: the command's run, or the HTTP request
    max_attempts: int = 20  # then the event goes to the dead-letter folder
    max_age_seconds: int = 86_400  # or once it has waited this long since queued

    @property
    def kind(self) -> str:
        """``"command"`` or ``"url"``."""
        return "command" if self.command else "url"


# --- cluster (issue 15) -------------------------------------------------------------

ON_UNAVAILABLE = ("refuse", "local")  # [cluster] on_unavailable


@dataclass(frozen=True)
class ClusterSettings:
    """``[cluster]``: nodes behind one balancer share bans, limits, quota (Redis).

    The node is ``server.node_name`` (required with a cluster, unique among nodes).
    """

    # redis://[user:password@]host[:port][/db], rediss://... (TLS), or
    # unix://[user:password@]/absolute/path[?db=N]. May hold a password: never
    # logged or shown whole (config.cluster.redacted). Required.
    redis_url: str = field(repr=False)
    # Put in front of every key and channel: several gateways (or other software)
    # can share one Redis. Default "ftps-gateway:".
    key_prefix: str = "ftps-gateway:"
    # Redis unreachable: "refuse" new logins with 421 (limits and bans stay exact;
    # the default), or "local": keep serving with this node's own state (limits
    # then hold per node, bans earned elsewhere are not seen).
    on_unavailable: str = "refuse"
    # Bound of every Redis call (connect, command), seconds, 0.05-30. Default 1.
    timeout_seconds: float = 1.0
    # What a node holds (sessions, quota reservations) lives this long without a
    # heartbeat (every third of it): a node that dies frees its holdings within
    # this time. Seconds, 3-3600. Default 15.
    lease_seconds: int = 15
    # PEM CA certificates that signed Redis' certificate (rediss:// only); None:
    # the system's trust store.
    ca_file: Path | None = None


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
    hooks: tuple[HookSettings, ...] = ()  # [[hooks]], in the order written
    cluster: ClusterSettings | None = None  # [cluster]; None: state kept per node

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


# --- limits ------------------------------------------------------------------------

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
MAX_BANNER_CHARS: Final = 200
MAX_USER_NAME_CHARS: Final = 64
MAX_HOSTNAME_CHARS: Final = 253
PORT_MAX: Final = 65535
PASSIVE_PORT_MIN: Final = 1024  # below this are privileged ports other services own
MAX_PASSIVE_PORTS: Final = 10_000  # each one is a firewall/NAT rule somewhere
MAX_RETENTION_SECONDS: Final = 30 * 86_400
MAX_QUOTA: Final = 2**62
MAX_WORKERS: Final = 64  # [server] workers
# The gateway's own state under storage.root: the default admin socket, the hook
# spool. Never mountable (config.tree refuses it as a source).
STATE_DIRECTORY: Final = ".ftps-gateway"
# [access] ipv6_prefix_length: shorter than a /32 (a whole ISP's allocation, RFC 6177)
# would make one ban or limit cover unrelated subscribers.
MIN_IPV6_PREFIX: Final = 32
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
MIN_LEASE_SECONDS: Final = 3  # [cluster] lease_seconds: a heartbeat a second
MAX_LEASE_SECONDS: Final = 3600

# Where an unauthenticated HTTP endpoint may listen without metrics.allow_public.
# Spelt out rather than ip.is_private: that also counts 0.0.0.0 and :: (every
# interface, public ones included) and the documentation ranges, and its meaning has
# shifted between Python versions.
INTERNAL_NETWORKS: Final[tuple[IPNetwork, ...]] = tuple(
    ipaddress.ip_network(network)
    for network in (
        "127.0.0.0/8", "::1/128",  # loopback
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",  # RFC 1918
        "fc00::/7",  # RFC 4193 unique local
        "169.254.0.0/16", "fe80::/10",  # link-local: never routed
    )
)  # fmt: skip


def is_internal(host: str) -> bool:
    """Loopback, link-local or a private network; never "every interface"."""
    ip = unmapped(ipaddress.ip_address(host))
    return any(ip in network for network in INTERNAL_NETWORKS)

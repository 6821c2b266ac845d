"""``load`` and ``load_text``: a TOML file in, a validated ``GatewayConfig`` out.

Builds one section at a time (``[server]``, ``[tls]``, ``[passive]``, ``[storage]``,
``[access]``, ``[defender]``, ``[admin]``, ``[logging]``, ``[metrics]``; ``[cluster]``
from ``config.cluster``, accounts from ``config.users``, ``[[hooks]]`` from
``config.hooks``) and the checks that span
sections (listener and port overlaps, PROXY with "ip-match"). Every problem is
collected, then all are raised together.

May import: the other ``config`` modules, ``ftps_gateway.errors``, and (late, for the
certificate check only) ``ftps_gateway.tls.certificates``.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

from ftps_gateway.config.cluster import read_cluster
from ftps_gateway.config.describe import endpoint, proxy_source_prefix
from ftps_gateway.config.hooks import read_hooks
from ftps_gateway.config.model import (
    LOG_LEVELS,
    MAX_RETENTION_SECONDS,
    MAX_SOCKET_PATH_BYTES,
    MAX_WORKERS,
    MIN_IPV6_PREFIX,
    REUSE_POLICIES,
    STATE_DIRECTORY,
    TLS_VERSIONS,
    AccessSettings,
    AdminSettings,
    ClusterSettings,
    DefenderSettings,
    GatewayConfig,
    MetricsSettings,
    PassiveOverride,
    PassiveSettings,
    ServerSettings,
    StorageSettings,
    TLSOverride,
    TLSSettings,
    is_internal,
)
from ftps_gateway.config.parsers import (
    one_of,
    optional_path_under,
    parse_advertised,
    parse_banner,
    parse_listen,
    parse_node_name,
    parse_optional_listen,
    parse_port_range,
    path_under,
    unique_networks,
)
from ftps_gateway.config.users import check_trees, read_groups, read_users
from ftps_gateway.config.values import Problems, Table, is_kind
from ftps_gateway.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ftps_gateway.config.model import IPNetwork, ListenAddress


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
    problems = Problems(source)
    # Sections build their dataclasses even around a bad value (a placeholder takes
    # its place) so that one pass finds everything; placeholders never escape,
    # because any recorded problem raises here.
    config = _gateway(Table(data, "", problems), source)
    if problems.lines:
        raise ConfigError(problems.lines)
    return config


# --- sections ------------------------------------------------------------------------


def _gateway(root: Table, source: Path) -> GatewayConfig:
    base = source.parent.absolute()
    server = _server(root.table("server"))
    tls = _tls(root.table("tls"), base)
    passive = _passive(root.table("passive"), server.listen + server.implicit_listen)
    storage = _storage(root.table("storage"), base)
    access = _access(root.table("access"))
    defender = _defender(root.table("defender"))
    cluster = read_cluster(root.table("cluster"), base)
    node = _cluster_node(root, server, cluster)
    admin = _admin(root.table("admin"), base, storage.root, node)
    log_level, audit_file, xferlog_file, upload_sha256 = _logging(
        root.table("logging"), base
    )
    metrics = _metrics(
        root.table("metrics"), server.listen + server.implicit_listen, passive
    )
    groups = read_groups(root)
    users = read_users(root, tls.min_version)
    hooks = read_hooks(root, base, users, groups)
    root.close()
    config = GatewayConfig(
        source, server, tls, passive, storage, users,
        access=access, defender=defender, admin=admin, log_level=log_level,
        audit_file=audit_file, xferlog_file=xferlog_file,
        upload_sha256=upload_sha256, metrics=metrics,
        groups=groups, hooks=hooks, cluster=cluster,
    )  # fmt: skip
    check_trees(root.problems, config)
    _check_proxy_and_ip_match(root.problems, config)
    return config


def _check_proxy_and_ip_match(problems: Problems, config: GatewayConfig) -> None:
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


def _server(table: Table) -> ServerSettings:
    problems_before = len(table.problems.lines)
    listen = _listeners(table, "listen")
    implicit = _listeners(table, "implicit_listen", seen=listen)
    if not listen and not implicit and len(table.problems.lines) == problems_before:
        problem = "no listener: give listen, implicit_listen or both"
        table.problems.add(table.key("listen"), problem)
    settings = ServerSettings(
        listen=listen,
        implicit_listen=implicit,
        banner=table.optional("banner", parse_banner, ServerSettings.banner),
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
        max_unauthenticated=table.integer(
            "max_unauthenticated", 1, 100_000, ServerSettings.max_unauthenticated
        ),
        max_unauthenticated_per_ip=table.integer(
            "max_unauthenticated_per_ip",
            1,
            100_000,
            ServerSettings.max_unauthenticated_per_ip,
        ),
        obsolete_keys=_active_mode(table),
        shutdown_grace_seconds=table.integer(
            "shutdown_grace_seconds", 0, 86_400, ServerSettings.shutdown_grace_seconds
        ),
        node_name=table.optional("node_name", parse_node_name, ""),
        proxy_protocol_from=unique_networks(
            table, "proxy_protocol_from", {}, required=False
        ),
        workers=_workers(table),
        login_cache_seconds=table.integer(
            "login_cache_seconds", 0, 3_600, ServerSettings.login_cache_seconds
        ),
        loop_stall_seconds=table.integer(
            "loop_stall_seconds", 0, 600, ServerSettings.loop_stall_seconds
        ),
    )
    table.close()
    _check_proxy_sources(table, settings.proxy_protocol_from)
    return settings


def _check_proxy_sources(table: Table, networks: Sequence[IPNetwork]) -> None:
    """``proxy_protocol_from`` may not be every address (/0, IPv4-mapped /96 too).

    Whoever may send a PROXY header names the client address the server believes:
    from every address, anyone would walk past bans, ``access.allow`` and the
    per-address limits. Large or public ranges are ``check-config`` warnings.
    """
    for index, network in enumerate(networks):
        if proxy_source_prefix(network) == 0:
            problem = (
                "trusts a PROXY header from every address (anyone could claim any "
                "client address, past bans and access.allow); list the balancers' "
                "own addresses"
            )
            key = f"{table.key('proxy_protocol_from')}[{index}]"
            table.problems.add(key, problem, str(network))


def _active_mode(table: Table) -> tuple[str, ...]:
    """``allow_active_mode``: gone (decision 0009). ``true`` is refused, because it
    asks for what does not exist; ``false`` (the old example's line) still loads, so
    an upgrade does not stop a server over a line that changes nothing."""
    if not table.flag("allow_active_mode", default=False):
        return ("allow_active_mode",) if "allow_active_mode" in table.given() else ()
    problem = (
        "active mode (PORT/EPRT) is not supported: it cannot reach partners behind "
        "NAT or firewalls, and TLS hides PORT from NAT helpers "
        "(docs/decisions/0009-active-mode.md); remove the key, partners use PASV/EPSV"
    )
    table.problems.add(table.key("allow_active_mode"), problem, True)  # noqa: FBT003
    return ()


def _workers(table: Table) -> int:
    """``workers``: "auto" (0) or 1 to 64 processes."""
    value = table.value("workers")
    if value is not None:
        if value == "auto":
            return 0
        if is_kind(value, int) and 1 <= value <= MAX_WORKERS:
            return value
        problem = f'must be "auto" or 1 to {MAX_WORKERS}'
        table.problems.add(table.key("workers"), problem, value)
    return ServerSettings.workers


def _listeners(
    table: Table, name: str, seen: Sequence[ListenAddress] = ()
) -> tuple[ListenAddress, ...]:
    """``listen`` or ``implicit_listen``: optional arrays, no address twice."""
    taken = {address: table.key("listen") for address in seen}
    first: dict[ListenAddress, str] = {}
    listeners: list[ListenAddress] = []
    for entry in table.strings(name, parse_listen, required=False):
        other = first.get(entry.value) or taken.get(entry.value)
        if other is not None and entry.value.port != 0:  # port 0: each its own port
            problem = f"duplicate listener, same as {other}"
            table.problems.add(entry.key, problem, entry.text)
        else:
            first.setdefault(entry.value, entry.key)
            listeners.append(entry.value)
    return tuple(listeners)


def _tls(table: Table, base: Path) -> TLSSettings:
    certificate = table.required("certificate", path_under(base))
    private_key = table.required("private_key", path_under(base))
    min_version = table.optional(
        "min_version", one_of(TLS_VERSIONS), TLSSettings.min_version
    )
    max_version = table.optional(
        "max_version", one_of(TLS_VERSIONS), TLSSettings.max_version
    )
    reuse = table.optional("reuse", one_of(REUSE_POLICIES), TLSSettings.reuse)
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


def _tls_overrides(tls: Table) -> tuple[TLSOverride, ...]:
    overrides: list[TLSOverride] = []
    first: dict[IPNetwork, str] = {}
    for table in tls.tables("overrides"):
        networks = unique_networks(table, "networks", first, required=True)
        reuse = table.optional("reuse", one_of(REUSE_POLICIES), None)
        max_version = table.optional("max_version", one_of(TLS_VERSIONS), None)
        if reuse is None and max_version is None and "networks" in table.given():
            table.problems.add(table.path, "sets neither reuse nor max_version")
        table.close()
        overrides.append(TLSOverride(networks, reuse, max_version))
    return tuple(overrides)


def _check_certificate_files(
    problems: Problems, certificate: Path, private_key: Path
) -> None:
    """Add the certificate module's findings (missing file, key mismatch, expiry)."""
    # Imported here: certs pulls in cryptography, which nothing else in loading needs,
    # and a late import cannot become an import cycle if certs ever uses this module.
    from ftps_gateway.tls import certificates as certs  # noqa: PLC0415

    for key, problem in certs.certificate_problems(certificate, private_key):
        problems.add(key, problem)


def _passive(table: Table, listeners: Sequence[ListenAddress]) -> PassiveSettings:
    ports = table.required("ports", parse_port_range)
    address = table.optional("address", parse_advertised, PassiveSettings.address)
    connect_timeout = table.integer(
        "connect_timeout_seconds", 1, 600, PassiveSettings.connect_timeout_seconds
    )
    per_user = table.integer(
        "max_ports_per_user_percent", 1, 100,
        PassiveSettings.max_ports_per_user_percent,
    )  # fmt: skip
    per_ip = table.integer(
        "max_ports_per_ip_percent", 1, 100, PassiveSettings.max_ports_per_ip_percent
    )
    overrides = _overrides(table)
    table.close()
    if ports is not None:
        _check_listener_overlap(table, ports, listeners)
    port_min, port_max = ports or (0, 0)
    return PassiveSettings(
        port_min, port_max, address, overrides, connect_timeout,
        max_ports_per_user_percent=per_user, max_ports_per_ip_percent=per_ip,
    )  # fmt: skip


def _check_listener_overlap(
    table: Table, ports: tuple[int, int], listeners: Sequence[ListenAddress]
) -> None:
    # A data connection landing on the control port would be taken for a new session.
    for listener in listeners:
        if ports[0] <= listener.port <= ports[1]:
            problem = f"overlaps the control listener {endpoint(listener)}"
            table.problems.add(table.key("ports"), problem)


def _overrides(passive: Table) -> tuple[PassiveOverride, ...]:
    first: dict[IPNetwork, str] = {}
    overrides: list[PassiveOverride] = []
    for table in passive.tables("overrides"):
        networks = unique_networks(table, "networks", first, required=True)
        address = table.required("address", parse_advertised)
        table.close()
        overrides.append(PassiveOverride(networks, address or ""))
    return tuple(overrides)


def _storage(table: Table, base: Path) -> StorageSettings:
    root = table.required("root", path_under(base))
    retention = table.integer(
        "partial_retention_seconds", 0, MAX_RETENTION_SECONDS,
        StorageSettings.partial_retention_seconds,
    )  # fmt: skip
    table.close()
    return StorageSettings(root or Path(), retention)


def _access(table: Table) -> AccessSettings:
    allow = unique_networks(table, "allow", {}, required=False)
    safe = unique_networks(table, "safe", {}, required=False)
    prefix = table.integer(
        "ipv6_prefix_length", MIN_IPV6_PREFIX, 128, AccessSettings.ipv6_prefix_length
    )
    table.close()
    return AccessSettings(allow, safe, prefix)


def _defender(table: Table) -> DefenderSettings:
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


def _cluster_node(
    root: Table, server: ServerSettings, cluster: ClusterSettings | None
) -> str:
    """The node's name in a cluster ("" without one): ``server.node_name``.

    Required there: the host name is no stable identity in a container, and the
    node's leases in Redis and its per-node files are keyed by it.
    """
    if cluster is None:
        return ""
    if not server.node_name:
        problem = (
            "required with [cluster]: a name unique among the nodes (their leases "
            "in Redis and the admin socket under storage.root are keyed by it)"
        )
        root.problems.add("server.node_name", problem)
    return server.node_name


def _admin(table: Table, base: Path, storage_root: Path, node: str) -> AdminSettings:
    """``[admin]``; the default socket is under storage.root, per node in a cluster
    (nodes may share storage.root, and a socket of one node must never be taken for
    a stale one by another)."""
    socket = table.optional("socket", path_under(base), None)
    table.close()
    if socket is None:
        socket = storage_root / STATE_DIRECTORY / "admin.sock"
        if node:
            socket = storage_root / STATE_DIRECTORY / "nodes" / node / "admin.sock"
    if len(bytes(socket)) > MAX_SOCKET_PATH_BYTES:
        key = table.key("socket")
        problem = f"longer than {MAX_SOCKET_PATH_BYTES} bytes, too long for a socket"
        if "socket" not in table.given():
            problem += " (the default under storage.root; set admin.socket)"
        table.problems.add(key, problem, str(socket))
    return AdminSettings(socket)


def _logging(table: Table, base: Path) -> tuple[str, Path | None, Path | None, bool]:
    level = table.optional("level", one_of(LOG_LEVELS), GatewayConfig.log_level)
    # "" is the documented default ("stdout", "off"), so ${VAR:-} works in containers.
    audit_file = table.optional("audit_file", optional_path_under(base), None)
    xferlog_file = table.optional("xferlog_file", optional_path_under(base), None)
    upload_sha256 = table.flag("upload_sha256", GatewayConfig.upload_sha256)
    table.close()
    return level, audit_file, xferlog_file, upload_sha256


def _metrics(
    table: Table, listeners: Sequence[ListenAddress], passive: PassiveSettings
) -> MetricsSettings:
    listen = table.optional("listen", parse_optional_listen, None)
    per_user_labels = table.flag("per_user_labels", MetricsSettings.per_user_labels)
    allow_public = table.flag("allow_public", MetricsSettings.allow_public)
    table.close()
    if listen is not None:
        _check_metrics_listen(table, listen, listeners, passive, allow_public)
    return MetricsSettings(listen, per_user_labels, allow_public)


def _check_metrics_listen(
    table: Table,
    listen: ListenAddress,
    listeners: Sequence[ListenAddress],
    passive: PassiveSettings,
    allow_public: bool,
) -> None:
    key, shown = table.key("listen"), endpoint(listen)
    if not allow_public and not is_internal(listen.host):
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


def _hosts_overlap(first: str, second: str) -> bool:
    """Whether two listeners on the same port would collide."""
    a, b = ipaddress.ip_address(first), ipaddress.ip_address(second)
    if a == b or a == ipaddress.IPv6Address("::") or b == ipaddress.IPv6Address("::"):
        return True  # "::" is dual-stack on Linux: it takes IPv4 ports too
    return a.version == b.version and (a.is_unspecified or b.is_unspecified)

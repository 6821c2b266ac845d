"""``check-config``'s description of a loaded config: effective values, no secrets,
and the warnings about settings that load but are probably a mistake.

May import: ``config.model``; nothing else in the package.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from ftps_gateway.config.model import HOOK_EVENTS, IPNetwork, is_internal

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ftps_gateway.config.model import (
        AccessSettings,
        ClusterSettings,
        DefenderSettings,
        GatewayConfig,
        HookSettings,
        ListenAddress,
        MetricsSettings,
    )


def summary(cfg: GatewayConfig) -> str:
    """Describe ``cfg`` for ``check-config``: effective values, no secrets.

    Users appear by name only; password hashes never leave ``UserSettings``.
    """
    server, passive, tls = cfg.server, cfg.passive, cfg.tls
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
            f"Logged-in sessions: at most {server.max_sessions}, "
            f"{server.max_sessions_per_ip} per client address, "
            f"{server.max_sessions_per_user} per user (all workers together, "
            "counted at login)"
        ),
        (
            "Connections not logged in yet: at most "
            f"{server.max_unauthenticated}, "
            f"{server.max_unauthenticated_per_ip} per client address, per worker "
            "process; when full, the longest-idle connection of the busiest address "
            "is closed to make room"
        ),
        (
            f"Client addresses: IPv6 counted per /{cfg.access.ipv6_prefix_length} "
            "(bans and limits), IPv4 per address"
        ),
        (
            "Timers: "
            f"login timeout {server.login_timeout_seconds} s, "
            f"idle timeout {server.idle_timeout_seconds} s, "
            f"shutdown grace {server.shutdown_grace_seconds} s, "
            f"verified logins remembered {server.login_cache_seconds} s"
        ),
        (
            "Worker processes: "
            + (str(server.workers) if server.workers else "auto (one per CPU core)")
            + "; IO loop watchdog: "
            + (
                f"stuck after {server.loop_stall_seconds} s"
                if server.loop_stall_seconds
                else "off"
            )
        ),
        "Active mode (PORT/EPRT): not supported",
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
            f"connect timeout {passive.connect_timeout_seconds} s, at most "
            f"{passive.max_ports_per_user_percent}% per user and "
            f"{passive.max_ports_per_ip_percent}% per client address"
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
        *([describe_hook(hook) for hook in cfg.hooks] or ["Hooks: none"]),
        f"Cluster: {_cluster_summary(cfg.cluster)}",
        f"Metrics: {_metrics_summary(cfg.metrics)}",
    ]
    return "\n".join(lines)


# PROXY sources wider than this get a warning: a balancer pool is a few addresses.
PROXY_WARN_PREFIX = {4: 16, 6: 48}
_MAPPED_V4 = ipaddress.IPv6Network("::ffff:0:0/96")


def warnings(cfg: GatewayConfig) -> list[str]:
    """Settings that load but are probably a mistake, one line each, key first."""
    found = [
        f"server.{key}: obsolete, active mode is not supported; remove it"
        for key in cfg.server.obsolete_keys
    ]
    for index, network in enumerate(cfg.server.proxy_protocol_from):
        problem = _proxy_source_problem(network)
        if problem:
            found.append(f"server.proxy_protocol_from[{index}]: {problem}")
    found.extend(_passive_warnings(cfg))
    return found


def _workers(cfg: GatewayConfig) -> int:
    """Worker processes ``serve`` starts (as ``service.supervisor.worker_count``)."""
    wanted = cfg.server.workers or os.cpu_count() or 1
    return max(1, min(wanted, cfg.passive.port_max - cfg.passive.port_min + 1))


def _passive_warnings(cfg: GatewayConfig) -> list[str]:
    """A range too small for the sessions that may hold its ports, and per-worker
    caps below the session limits they sit next to.

    Every session waiting for a data connection holds one port. With several
    workers each tries its own share first and borrows from the others' (the
    kernel arbitrates), so the whole range serves every worker; the per-user and
    per-address caps are percentages of a worker's share.
    """
    passive, server = cfg.passive, cfg.server
    ports = passive.port_max - passive.port_min + 1
    found = []
    if ports < server.max_sessions:
        found.append(
            f"passive.ports: {ports} ports for up to {server.max_sessions} sessions "
            "(server.max_sessions): a session waiting for its data connection holds "
            "a port, and PASV/EPSV gets 425 when none is free; give the range at "
            f"least {server.max_sessions} ports"
        )
    workers = _workers(cfg)
    share = ports // workers  # the smallest share
    for key, who, percent, limit_key, limit in (
        ("max_ports_per_user_percent", "a user", passive.max_ports_per_user_percent,
         "max_sessions_per_user", server.max_sessions_per_user),
        ("max_ports_per_ip_percent", "a client address",
         passive.max_ports_per_ip_percent, "max_sessions_per_ip",
         server.max_sessions_per_ip),
    ):  # fmt: skip
        cap = max(1, share * percent // 100)
        if percent < 100 and cap < limit:  # noqa: PLR2004 - 100 % is "no cap"
            where = (
                f"on one of the {workers} workers ({percent}% of its {share}-port "
                "share)"
                if workers > 1
                else f"({percent}% of the range)"
            )
            found.append(
                f"passive.{key}: {who} may hold {cap} ports {where}, fewer than "
                f"server.{limit_key} ({limit}): more of its sessions waiting for "
                "data connections at once get 425"
            )
    return found


def proxy_source_prefix(network: IPNetwork) -> int:
    """The prefix length as the address family it covers (``::ffff:0:0/96`` is
    IPv4's /0: a dual-stack socket shows IPv4 peers as mapped addresses)."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED_V4):
        return network.prefixlen - 96
    return network.prefixlen


def _proxy_source_problem(network: IPNetwork) -> str:
    """Why a PROXY source network is risky, or ""."""
    prefix = proxy_source_prefix(network)
    version = 4 if prefix != network.prefixlen else network.version
    if prefix < PROXY_WARN_PREFIX[version]:
        return (
            f"{network} is {network.num_addresses} addresses; every host there may "
            "claim any client address (list only the balancers)"
        )
    first, last = network[0], network[-1]
    if not (is_internal(str(first)) and is_internal(str(last))):
        return (
            f"{network} is public; any host there may claim any client address "
            "(list only the balancers, on a private network)"
        )
    return ""


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
    if not is_internal(metrics.listen.host):
        text += ", public (metrics.allow_public)"
    labels = "on" if metrics.per_user_labels else "off"
    return f"{text}, per-user labels {labels}"


def _cluster_summary(cluster: ClusterSettings | None) -> str:
    if cluster is None:
        return "off (bans, session limits and quota are this node's own)"
    if cluster.on_unavailable == "local":
        unavailable = "serve with this node's own state (limits per node)"
    else:
        unavailable = "refuse new logins (421)"
    tls = f", TLS trusting {cluster.ca_file}" if cluster.ca_file is not None else ""
    return (
        f"shared through {redacted(cluster.redis_url)}{tls}, keys under "
        f"{cluster.key_prefix!r}, timeout {cluster.timeout_seconds:g} s, "
        f"leases {cluster.lease_seconds} s; Redis unreachable: {unavailable}"
    )


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***`` (logs, check-config)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _advertised(address: str) -> str:
    return address or "local address of the control connection"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def describe_hook(hook: HookSettings) -> str:
    """One ``check-config`` summary line; no secret, no query string."""
    events = ", ".join(event for event in HOOK_EVENTS if event in hook.events)
    if hook.command:
        action = f"run {hook.command[0]}"
        if len(hook.command) > 1:
            action += f" (+{len(hook.command) - 1} arguments)"
    else:
        parts = urllib.parse.urlsplit(hook.url)
        action = f"POST {parts.scheme}://{parts.netloc}{parts.path or '/'}, signed"
        if hook.ca_file is not None:
            action += f", CA {hook.ca_file}"
    filters = [
        f"users {', '.join(sorted(hook.users))}" if hook.users else "",
        f"groups {', '.join(sorted(hook.groups))}" if hook.groups else "",
        f"paths {', '.join(hook.paths)}" if hook.paths else "",
    ]
    only = "; only " + "; ".join(f for f in filters if f) if any(filters) else ""
    return (
        f"Hook {hook.name}: {events} -> {action}{only}; timeout "
        f"{hook.timeout_seconds} s, at most {hook.max_attempts} attempts within "
        f"{hook.max_age_seconds} s"
    )

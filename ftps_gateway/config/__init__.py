"""The gateway's configuration: TOML in, frozen validated dataclasses out.

Nothing else in the package reads TOML. ``load`` reports every problem it finds in
one pass (``ConfigError``), so an operator never fixes one typo per restart, and a
config that loads is complete: no later code re-checks or defaults anything.

The floor, lowest module first (each imports only modules above it in this list):

- ``model``: the frozen dataclasses, the policy words and the limits;
- ``values``: the TOML reader (key paths, kinds, ``${VAR}``, one-pass problems);
- ``describe``: ``summary`` and ``warnings`` for ``check-config``, ``endpoint``;
- ``parsers``: value parsers shared by sections and accounts;
- ``tree``: one user's tree planned from the config (also ``explain``);
- ``users``: ``[[users]]``, ``[[groups]]``, mounts, permission words;
- ``hooks``: ``[[hooks]]`` (event hooks: commands and signed URLs);
- ``cluster``: ``[cluster]`` (the Redis URL, leases, what happens without Redis);
- ``loader``: ``load``, ``load_text`` and the sections.

The floor may import only ``ftps_gateway.errors``, ``ftps_gateway.storage.vfs`` and
``ftps_gateway.policy.passwords``, plus ``ftps_gateway.tls.certificates`` late, for
the certificate check at load time; never ``session``, ``ftp`` or ``service``.
This module re-exports what the rest of the package uses, so callers write
``config.load(path)`` and ``from ftps_gateway.config import GatewayConfig``.
"""

from __future__ import annotations

from ftps_gateway.config.describe import endpoint, redacted, summary, warnings
from ftps_gateway.config.loader import load, load_text
from ftps_gateway.config.model import (
    HOOK_EVENTS,
    LOG_LEVELS,
    MAX_BANNER_CHARS,
    MAX_HOSTNAME_CHARS,
    MAX_PASSIVE_PORTS,
    MAX_QUOTA,
    MAX_RETENTION_SECONDS,
    MAX_SOCKET_PATH_BYTES,
    MAX_USER_NAME_CHARS,
    MAX_WORKERS,
    PASSIVE_PORT_MIN,
    PORT_MAX,
    RESUMING_POLICIES,
    REUSE_POLICIES,
    TLS_VERSIONS,
    AccessSettings,
    AdminSettings,
    ClusterSettings,
    DefenderSettings,
    GatewayConfig,
    GroupSettings,
    HookSettings,
    IPNetwork,
    ListenAddress,
    MetricsSettings,
    MountSettings,
    PassiveOverride,
    PassiveSettings,
    ServerSettings,
    StorageSettings,
    TLSOverride,
    TLSSettings,
    UserSettings,
)
from ftps_gateway.config.users import NOT_ARGON2ID
from ftps_gateway.config.values import expand_environment

__all__ = [
    "HOOK_EVENTS",
    "LOG_LEVELS",
    "MAX_BANNER_CHARS",
    "MAX_HOSTNAME_CHARS",
    "MAX_PASSIVE_PORTS",
    "MAX_QUOTA",
    "MAX_RETENTION_SECONDS",
    "MAX_SOCKET_PATH_BYTES",
    "MAX_USER_NAME_CHARS",
    "MAX_WORKERS",
    "NOT_ARGON2ID",
    "PASSIVE_PORT_MIN",
    "PORT_MAX",
    "RESUMING_POLICIES",
    "REUSE_POLICIES",
    "TLS_VERSIONS",
    "AccessSettings",
    "AdminSettings",
    "ClusterSettings",
    "DefenderSettings",
    "GatewayConfig",
    "GroupSettings",
    "HookSettings",
    "IPNetwork",
    "ListenAddress",
    "MetricsSettings",
    "MountSettings",
    "PassiveOverride",
    "PassiveSettings",
    "ServerSettings",
    "StorageSettings",
    "TLSOverride",
    "TLSSettings",
    "UserSettings",
    "endpoint",
    "expand_environment",
    "load",
    "load_text",
    "redacted",
    "summary",
    "warnings",
]

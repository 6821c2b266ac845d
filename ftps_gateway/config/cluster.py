"""``[cluster]``: the nodes behind one balancer share bans, limits and quota (Redis).

Absent, every node keeps its own state (in-process, or across its workers through
the supervisor): the embedded default. Present, the node is ``server.node_name``,
which must then be set (and unique among the nodes: the service checks that at
start-up, against the leases in Redis), and whatever is per node and would
otherwise sit under a shared ``storage.root`` (the admin socket) is derived from it.

May import: ``config.model``, ``config.values``, ``config.parsers``.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from ftps_gateway.config.model import (
    MAX_LEASE_SECONDS,
    MIN_LEASE_SECONDS,
    ON_UNAVAILABLE,
    PORT_MAX,
    ClusterSettings,
)
from ftps_gateway.config.parsers import one_of, optional_path_under
from ftps_gateway.config.values import BadValueError, Table

if TYPE_CHECKING:
    from pathlib import Path

SCHEMES = ("redis", "rediss", "unix")
REDIS_DEFAULT_PORT = 6379
MAX_DATABASE = 15  # Redis' default "databases 16"
# A prefix ends up in every key name: printable, no blanks, short.
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:{}/-]{1,64}")
_DIGITS = re.compile(r"[0-9]{1,2}")
TIMEOUT_RANGE = (0.05, 30.0)


def read_cluster(table: Table, base: Path) -> ClusterSettings | None:
    """The ``[cluster]`` table, or None when the config has none."""
    if not table.given():
        table.close()
        return None
    url = table.required("redis_url", parse_redis_url, secret=True)
    settings = ClusterSettings(
        redis_url=url or "",
        key_prefix=table.optional(
            "key_prefix", _parse_key_prefix, ClusterSettings.key_prefix
        ),
        on_unavailable=table.optional(
            "on_unavailable", one_of(ON_UNAVAILABLE), ClusterSettings.on_unavailable
        ),
        timeout_seconds=_timeout(table),
        lease_seconds=table.integer(
            "lease_seconds",
            MIN_LEASE_SECONDS,
            MAX_LEASE_SECONDS,
            ClusterSettings.lease_seconds,
        ),
        ca_file=table.optional("ca_file", optional_path_under(base), None),
    )
    table.close()
    if settings.ca_file is not None and url and not url.startswith("rediss://"):
        table.problems.add(table.key("ca_file"), "only for a rediss:// (TLS) redis_url")
    elif settings.ca_file is not None and not settings.ca_file.is_file():
        problem = "no such file (the CA certificates that signed Redis' certificate)"
        table.problems.add(table.key("ca_file"), problem, str(settings.ca_file))
    return settings


def _timeout(table: Table) -> float:
    """``timeout_seconds``: an integer or a decimal, 0.05 to 30."""
    value = table.value("timeout_seconds")
    if value is None:
        return ClusterSettings.timeout_seconds
    low, high = TIMEOUT_RANGE
    if isinstance(value, int | float) and not isinstance(value, bool):  # noqa: SIM102
        if low <= value <= high:
            return float(value)
    table.problems.add(table.key("timeout_seconds"), f"must be {low} to {high}", value)
    return ClusterSettings.timeout_seconds


def _parse_key_prefix(text: str) -> str:
    if not _KEY_PREFIX.fullmatch(text):
        raise BadValueError("must be 1 to 64 of A-Z a-z 0-9 _ . : { } / -")
    return text


def parse_redis_url(text: str) -> str:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://...`` (TLS), or
    ``unix://[user:password@]/absolute/path[?db=N]``; returned as given.

    Errors never repeat the URL: it may hold a password.
    """
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:  # "Port out of range", bad IPv6 brackets
        raise BadValueError(f"not a Redis URL ({err})") from None
    if parts.scheme not in SCHEMES:
        raise BadValueError(
            "must start with redis:// , rediss:// (TLS) or unix:// (a socket path)"
        )
    if parts.fragment:
        raise BadValueError("a Redis URL has no #fragment")
    if parts.scheme == "unix":
        _check_unix(parts.hostname, parts.path, parts.query)
    else:
        _check_tcp(parts.hostname, port, parts.path, parts.query)
    return text


def _check_tcp(host: str | None, port: int | None, path: str, query: str) -> None:
    if not host:
        raise BadValueError("no host: redis://HOST[:PORT][/DB]")
    if port == 0 or (port is not None and port > PORT_MAX):
        raise BadValueError(f"port must be 1 to {PORT_MAX}")
    if query:
        raise BadValueError("no ?options: TLS settings go in cluster.ca_file")
    database = path.removeprefix("/")
    if database and not _is_database(database):
        raise BadValueError(f"the path is the database number, 0 to {MAX_DATABASE}")


def _check_unix(host: str | None, path: str, query: str) -> None:
    if host:
        raise BadValueError(
            "unix:// takes an absolute path: unix:///run/redis/redis.sock "
            "(three slashes)"
        )
    if not path.startswith("/") or path == "/":
        raise BadValueError("unix:// needs an absolute socket path")
    options = parse_qsl(query, keep_blank_values=True) if query else []
    for name, value in options:
        if name != "db" or not _is_database(value):
            raise BadValueError(f"the only option is ?db=0 to {MAX_DATABASE}")


def _is_database(text: str) -> bool:
    return bool(_DIGITS.fullmatch(text)) and int(text) <= MAX_DATABASE

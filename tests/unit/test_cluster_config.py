"""``[cluster]``: the Redis URL, its options, the node name it needs (issue 15)."""

from __future__ import annotations

from pathlib import Path

import argon2
import pytest

from ftps_gateway import config
from ftps_gateway.config import ClusterSettings
from ftps_gateway.errors import ConfigError
from ftps_gateway.service.lifecycle import unreloadable_changes

HASH = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("x")
BASE = f"""\
[server]
listen = ["127.0.0.1:2121"]
node_name = "ftps-1"
[tls]
certificate = "certs/server.crt"
private_key = "certs/server.key"
[passive]
ports = "50000-50099"
[storage]
root = "data"
[[users]]
name = "acme"
password = "{HASH}"
"""


def _load(directory: Path, cluster: str, base: str = BASE) -> config.GatewayConfig:
    path = directory / "gateway.toml"
    path.write_text(f"{base}[cluster]\n{cluster}\n", encoding="utf-8")
    return config.load(path)


def _problems(directory: Path, cluster: str, base: str = BASE) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        _load(directory, cluster, base)
    prefix = f"{directory / 'gateway.toml'}: "
    return [line.removeprefix(prefix) for line in caught.value.problems]


URL_PROBLEM = "cluster.redis_url: "


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param(
            "http://redis:6379",
            "must start with redis:// , rediss:// (TLS) or unix:// (a socket path)",
            id="scheme",
        ),
        pytest.param("redis://", "no host: redis://HOST[:PORT][/DB]", id="no-host"),
        pytest.param(
            "redis://:hunter2@redis:99999",
            "not a Redis URL (Port out of range 0-65535)",
            id="port-range",
        ),
        pytest.param("redis://redis:0", "port must be 1 to 65535", id="port-zero"),
        pytest.param(
            "redis://redis/16", "the path is the database number, 0 to 15", id="db"
        ),
        pytest.param(
            "redis://redis/0?ssl_cert_reqs=none",
            "no ?options: TLS settings go in cluster.ca_file",
            id="options",
        ),
        pytest.param(
            "unix://run/redis.sock",
            "unix:// takes an absolute path: unix:///run/redis/redis.sock "
            "(three slashes)",
            id="unix-relative",
        ),
        pytest.param(
            "unix:///run/redis.sock?timeout=3",
            "the only option is ?db=0 to 15",
            id="unix-option",
        ),
        pytest.param("redis://redis#x", "a Redis URL has no #fragment", id="fragment"),
    ],
)
def test_bad_redis_url_is_a_config_error_naming_the_key(
    config_dir: Path, url: str, problem: str
) -> None:
    """A malformed URL is one problem under cluster.redis_url, never echoing it."""
    assert _problems(config_dir, f'redis_url = "{url}"') == [URL_PROBLEM + problem]


def test_password_in_a_bad_url_is_never_shown(config_dir: Path) -> None:
    """The URL may hold a password: a problem with it never repeats the URL."""
    (line,) = _problems(config_dir, 'redis_url = "redis://:hunter2-SECRET@h:99999"')
    assert "SECRET" not in line


def test_cluster_needs_a_node_name(config_dir: Path) -> None:
    """Without server.node_name a cluster node has no stable identity: refused."""
    base = BASE.replace('node_name = "ftps-1"\n', "")
    problems = _problems(config_dir, 'redis_url = "redis://redis"', base)
    assert problems == [
        "server.node_name: required with [cluster]: a name unique among the nodes "
        "(their leases in Redis and the admin socket under storage.root are keyed "
        "by it)"
    ]


def test_other_keys_are_checked(config_dir: Path) -> None:
    """Each option has its range or choice, named by its key."""
    problems = _problems(
        config_dir,
        'redis_url = "redis://redis"\non_unavailable = "ignore"\n'
        'timeout_seconds = 0\nlease_seconds = 1\nkey_prefix = "a b"\n'
        'ca_file = "ca.pem"\nhost = "x"',
    )
    assert problems == [
        "cluster.key_prefix: must be 1 to 64 of A-Z a-z 0-9 _ . : { } / - (got 'a b')",
        "cluster.on_unavailable: must be one of refuse, local (got 'ignore')",
        "cluster.timeout_seconds: must be 0.05 to 30.0 (got 0)",
        "cluster.lease_seconds: must be 3 to 3600 (got 1)",
        "cluster.host: unknown key",
        "cluster.ca_file: only for a rediss:// (TLS) redis_url",
    ]


def test_ca_file_must_exist(config_dir: Path) -> None:
    """A CA file that is not there is found by check-config, not at the first login."""
    problems = _problems(config_dir, 'redis_url = "rediss://redis"\nca_file = "ca.pem"')
    assert problems == [
        "cluster.ca_file: no such file (the CA certificates that signed Redis' "
        f"certificate) (got '{config_dir / 'ca.pem'}')"
    ]


def test_full_cluster_section_loads(config_dir: Path) -> None:
    """Every key loads; the admin socket moves under the node's own folder."""
    (config_dir / "ca.pem").write_text("x", encoding="utf-8")
    cfg = _load(
        config_dir,
        'redis_url = "rediss://gw:pw@redis.internal:6380/2"\nkey_prefix = "acme:"\n'
        'on_unavailable = "local"\ntimeout_seconds = 0.25\nlease_seconds = 9\n'
        'ca_file = "ca.pem"',
    )
    assert cfg.cluster == ClusterSettings(
        redis_url="rediss://gw:pw@redis.internal:6380/2",
        key_prefix="acme:",
        on_unavailable="local",
        timeout_seconds=0.25,
        lease_seconds=9,
        ca_file=config_dir / "ca.pem",
    )
    node_dir = config_dir / "data" / ".ftps-gateway" / "nodes" / "ftps-1"
    assert cfg.admin.socket == node_dir / "admin.sock"
    summary = config.summary(cfg).splitlines()
    assert summary[-2] == (
        "Cluster: shared through rediss://gw:***@redis.internal:6380/2, TLS trusting "
        f"{config_dir / 'ca.pem'}, keys under 'acme:', timeout 0.25 s, leases 9 s; "
        "Redis unreachable: serve with this node's own state (limits per node)"
    )
    assert "pw@" not in repr(cfg.cluster)


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis",
        "redis://[::1]:6379/0",
        "redis://user:p%40ss@redis:6379/15",
        "unix:///run/redis/redis.sock",
        "unix://:pw@/run/redis/redis.sock?db=3",
    ],
)
def test_good_urls_load(config_dir: Path, url: str) -> None:
    """The three forms the docs show load as written, with the defaults."""
    cfg = _load(config_dir, f'redis_url = "{url}"')
    assert cfg.cluster == ClusterSettings(redis_url=url)
    assert (cfg.cluster.on_unavailable, cfg.cluster.lease_seconds) == ("refuse", 15)


def test_without_a_cluster_section_nothing_changes(config_dir: Path) -> None:
    """No [cluster]: state stays per node and the admin socket where it was."""
    path = config_dir / "gateway.toml"
    path.write_text(BASE, encoding="utf-8")
    cfg = config.load(path)
    assert cfg.cluster is None
    assert cfg.admin.socket == config_dir / "data" / ".ftps-gateway" / "admin.sock"


def test_cluster_settings_change_only_on_restart(config_dir: Path) -> None:
    """A reload cannot move a node to another Redis or rename it: refused, named."""
    old = _load(config_dir, 'redis_url = "redis://redis"')
    new = _load(config_dir, 'redis_url = "redis://other"')
    renamed = _load(
        config_dir,
        'redis_url = "redis://redis"',
        BASE.replace('node_name = "ftps-1"', 'node_name = "ftps-2"'),
    )
    assert unreloadable_changes(old, new) == [
        "cluster: changed; this takes effect only on restart"
    ]
    assert unreloadable_changes(old, renamed) == [
        "admin.socket: changed; this takes effect only on restart",
        "server.node_name: changed; this takes effect only on restart",
    ]
    assert unreloadable_changes(old, old) == []

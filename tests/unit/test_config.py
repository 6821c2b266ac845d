"""Config loading: one case per rule, asserting the exact message an operator sees."""

from __future__ import annotations

import ipaddress
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import argon2
import pytest

from ftps_gateway import config
from ftps_gateway.config import (
    AccessSettings,
    AdminSettings,
    DefenderSettings,
    GatewayConfig,
    ListenAddress,
    PassiveOverride,
    PassiveSettings,
    ServerSettings,
    StorageSettings,
    TLSOverride,
    TLSSettings,
    UserSettings,
)
from ftps_gateway.errors import ConfigError
from ftps_gateway.tls import certificates as certs

if TYPE_CHECKING:
    from collections.abc import Callable

HASH = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("x")
ARGON2I_HASH = argon2.PasswordHasher(
    time_cost=1, memory_cost=8, parallelism=1, type=argon2.Type.I
).hash("x")
NOT_ARGON2ID = "not an argon2id hash (make one with: ftps-gateway hash-password)"
NAME_RULE = "must be 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.' or '-'"
EXAMPLE = Path(__file__).parents[2] / "config" / "gateway.example.toml"

LISTEN = 'listen = ["127.0.0.1:2121"]\n'
USER = f'[[users]]\nname = "acme"\npassword = "{HASH}"\n'
BASE = f"""\
[server]
{LISTEN}
[tls]
certificate = "certs/server.crt"
private_key = "certs/server.key"

[passive]
ports = "50000-50099"

[storage]
root = "data"

{USER}"""

# Appended where a case needs a section that BASE does not have.
OVERRIDE = '[[passive.overrides]]\nnetworks = ["10.0.0.0/8"]\naddress = ""\n\n'


def _add(section: str, lines: str) -> dict[str, str]:
    """An edit that appends ``lines`` to the start of ``[section]`` in BASE."""
    return {f"[{section}]\n": f"[{section}]\n{lines}\n"}


def _before_storage(text: str) -> dict[str, str]:
    """An edit that inserts ``text`` (e.g. override sections) before ``[storage]``."""
    return {"[storage]\n": f"{text}[storage]\n"}


def _edited(edits: dict[str, str]) -> str:
    """BASE with each ``old -> new`` edit applied; an edit that misses is a test bug."""
    text = BASE
    for old, new in edits.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def _write(directory: Path, text: str) -> Path:
    path = directory / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _problems(directory: Path, text: str) -> tuple[Path, ConfigError]:
    path = _write(directory, text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    return path, caught.value


BAD_BANNER = "Hi\r\n230 Logged in"
LONG_NAME = "a" * 65

REJECTED = [
    # server section
    pytest.param(
        {LISTEN: ""},
        ["server.listen: no listener: give listen, implicit_listen or both"],
        id="listen-missing",
    ),
    pytest.param(
        {LISTEN: 'listen = "127.0.0.1:2121"\n'},
        ["server.listen: must be an array (got '127.0.0.1:2121')"],
        id="listen-not-array",
    ),
    pytest.param(
        {LISTEN: "listen = []\n"},
        ["server.listen: no listener: give listen, implicit_listen or both"],
        id="listen-empty",
    ),
    pytest.param(
        {LISTEN: "listen = [2121]\n"},
        ["server.listen[0]: must be a string (got 2121)"],
        id="listen-entry-not-string",
    ),
    pytest.param(
        {LISTEN: 'listen = ["127.0.0.1"]\n'},
        ["server.listen[0]: not IP:PORT or [IPv6]:PORT (got '127.0.0.1')"],
        id="listen-no-port",
    ),
    pytest.param(
        {LISTEN: 'listen = ["localhost:2121"]\n'},
        [
            (
                "server.listen[0]: host is not an IP address (names are not resolved)"
                " (got 'localhost:2121')"
            ),
        ],
        id="listen-hostname",
    ),
    pytest.param(
        {LISTEN: 'listen = ["::1:2121"]\n'},
        [
            (
                "server.listen[0]: an IPv6 address needs brackets,"
                " IPv4 must not have them (got '::1:2121')"
            ),
        ],
        id="listen-ipv6-without-brackets",
    ),
    pytest.param(
        {LISTEN: 'listen = ["[127.0.0.1]:2121"]\n'},
        [
            (
                "server.listen[0]: an IPv6 address needs brackets,"
                " IPv4 must not have them (got '[127.0.0.1]:2121')"
            ),
        ],
        id="listen-ipv4-in-brackets",
    ),
    pytest.param(
        {LISTEN: 'listen = ["127.0.0.1:-1"]\n'},
        [
            "server.listen[0]: port must be 0 to 65535 (0: any free port)"
            " (got '127.0.0.1:-1')"
        ],
        id="listen-port-negative",
    ),
    pytest.param(
        {LISTEN: 'listen = ["[::]:65536"]\n'},
        [
            "server.listen[0]: port must be 0 to 65535 (0: any free port)"
            " (got '[::]:65536')"
        ],
        id="listen-port-too-big",
    ),
    pytest.param(
        {LISTEN: 'listen = ["127.0.0.1:2121", "127.0.0.1:2121"]\n'},
        [
            (
                "server.listen[1]: duplicate listener, same as server.listen[0]"
                " (got '127.0.0.1:2121')"
            ),
        ],
        id="listen-duplicate",
    ),
    pytest.param(
        _add("server", 'banner = ""'),
        ["server.banner: must be 1 to 200 characters (got '')"],
        id="banner-empty",
    ),
    pytest.param(
        _add("server", f'banner = "{"x" * 201}"'),
        [f"server.banner: must be 1 to 200 characters (got {'x' * 201!r})"],
        id="banner-too-long",
    ),
    pytest.param(
        _add("server", r'banner = "Hi\r\n230 Logged in"'),
        [
            (
                "server.banner: must be one line (a line break would end the 220 reply)"
                f" (got {BAD_BANNER!r})"
            ),
        ],
        id="banner-line-break",
    ),
    pytest.param(
        _add("server", "idle_timeout_seconds = 0"),
        ["server.idle_timeout_seconds: must be 1 to 86400 (got 0)"],
        id="idle-timeout-zero",
    ),
    pytest.param(
        _add("server", "idle_timeout_seconds = 86401"),
        ["server.idle_timeout_seconds: must be 1 to 86400 (got 86401)"],
        id="idle-timeout-too-big",
    ),
    pytest.param(
        _add("server", 'idle_timeout_seconds = "300"'),
        ["server.idle_timeout_seconds: must be an integer (got '300')"],
        id="idle-timeout-string",
    ),
    pytest.param(
        _add("server", "idle_timeout_seconds = true"),
        ["server.idle_timeout_seconds: must be an integer (got True)"],
        id="idle-timeout-bool",
    ),
    pytest.param(
        _add("server", "idle_timeout_seconds = 300.0"),
        ["server.idle_timeout_seconds: must be an integer (got 300.0)"],
        id="idle-timeout-float",
    ),
    pytest.param(
        _add("server", "login_timeout_seconds = 3601"),
        ["server.login_timeout_seconds: must be 1 to 3600 (got 3601)"],
        id="login-timeout-too-big",
    ),
    pytest.param(
        _add("server", "max_sessions = 0"),
        ["server.max_sessions: must be 1 to 100000 (got 0)"],
        id="max-sessions-zero",
    ),
    pytest.param(
        _add("server", "max_unauthenticated = 0"),
        ["server.max_unauthenticated: must be 1 to 100000 (got 0)"],
        id="max-unauthenticated-zero",
    ),
    pytest.param(
        _add("server", "max_unauthenticated_per_ip = 100001"),
        ["server.max_unauthenticated_per_ip: must be 1 to 100000 (got 100001)"],
        id="max-unauthenticated-per-ip-too-big",
    ),
    pytest.param(
        _add("server", 'allow_active_mode = "yes"'),
        ["server.allow_active_mode: must be true or false (got 'yes')"],
        id="active-mode-string",
    ),
    pytest.param(
        _add("server", "allow_active_mode = 1"),
        ["server.allow_active_mode: must be true or false (got 1)"],
        id="active-mode-int",
    ),
    pytest.param(
        _add("server", "port = 21"), ["server.port: unknown key"], id="server-unknown"
    ),
    pytest.param(
        {f"[server]\n{LISTEN}": 'server = "0.0.0.0:21"\n'},
        [
            "server: must be a table (got '0.0.0.0:21')",
            "server.listen: no listener: give listen, implicit_listen or both",
        ],
        id="server-not-table",
    ),
    # tls section
    pytest.param(
        {'certificate = "certs/server.crt"\n': ""},
        ["tls.certificate: required key is missing"],
        id="certificate-missing",
    ),
    pytest.param(
        {'private_key = "certs/server.key"\n': 'private_key = ""\n'},
        ["tls.private_key: must not be empty (got '')"],
        id="private-key-empty",
    ),
    pytest.param(
        _add("tls", 'min_version = "1.1"'),
        ["tls.min_version: must be one of 1.2, 1.3 (got '1.1')"],
        id="min-version-unknown",
    ),
    pytest.param(
        _add("tls", "min_version = 1.3"),
        ["tls.min_version: must be a string (got 1.3)"],
        id="min-version-float",
    ),
    # passive section
    pytest.param(
        {'ports = "50000-50099"\n': ""},
        ["passive.ports: required key is missing"],
        id="ports-missing",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "50000"'},
        ["passive.ports: not a START-END port range (got '50000')"],
        id="ports-not-range",
    ),
    pytest.param(
        {'ports = "50000-50099"': "ports = 50000"},
        ["passive.ports: must be a string (got 50000)"],
        id="ports-int",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "50099-50000"'},
        ["passive.ports: inverted range, start above end (got '50099-50000')"],
        id="ports-inverted",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "1023-2000"'},
        ["passive.ports: ports must be 1024 to 65535 (got '1023-2000')"],
        id="ports-privileged",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "60000-65536"'},
        ["passive.ports: ports must be 1024 to 65535 (got '60000-65536')"],
        id="ports-too-big",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "1024-11024"'},
        ["passive.ports: more than 10000 ports (got '1024-11024')"],
        id="ports-too-many",
    ),
    pytest.param(
        {LISTEN: 'listen = ["0.0.0.0:50010", "[::]:50099", "[::]:2121"]\n'},
        [
            "passive.ports: overlaps the control listener 0.0.0.0:50010",
            "passive.ports: overlaps the control listener [::]:50099",
        ],
        id="ports-overlap-listener",
    ),
    pytest.param(
        _add("passive", 'address = "10.0.0.300"'),
        ["passive.address: not an IPv4 address or DNS hostname (got '10.0.0.300')"],
        id="address-bad-ip",
    ),
    pytest.param(
        _add("passive", 'address = "ftp_gw.example.com"'),
        [
            (
                "passive.address: not an IPv4 address or DNS hostname"
                " (got 'ftp_gw.example.com')"
            ),
        ],
        id="address-bad-hostname",
    ),
    pytest.param(
        _add("passive", 'address = "2001:db8::7"'),
        [
            (
                "passive.address: a PASV reply can only advertise an IPv4 address"
                " (got '2001:db8::7')"
            ),
        ],
        id="address-ipv6",
    ),
    pytest.param(
        _add("passive", 'address = "0.0.0.0"'),
        [
            (
                'passive.address: not an address a client can reach; "" means the local'
                " address (got '0.0.0.0')"
            ),
        ],
        id="address-unspecified",
    ),
    pytest.param(
        _add("passive", "connect_timeout_seconds = 601"),
        ["passive.connect_timeout_seconds: must be 1 to 600 (got 601)"],
        id="connect-timeout-too-big",
    ),
    pytest.param(
        _add("passive", "max_ports_per_user_percent = 0"),
        ["passive.max_ports_per_user_percent: must be 1 to 100 (got 0)"],
        id="passive-user-percent-zero",
    ),
    pytest.param(
        _add("passive", "max_ports_per_ip_percent = 101"),
        ["passive.max_ports_per_ip_percent: must be 1 to 100 (got 101)"],
        id="passive-ip-percent-over",
    ),
    pytest.param(
        _add("passive", 'overrides = "10.0.0.0/8"'),
        [
            (
                "passive.overrides: must be an array of tables ([[passive.overrides]]"
                " sections) (got '10.0.0.0/8')"
            ),
        ],
        id="overrides-not-tables",
    ),
    # passive overrides
    pytest.param(
        _before_storage('[[passive.overrides]]\naddress = ""\n\n'),
        ["passive.overrides[0].networks: required key is missing"],
        id="override-networks-missing",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace('["10.0.0.0/8"]', "[]")),
        ["passive.overrides[0].networks: must not be empty (got [])"],
        id="override-networks-empty",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace("10.0.0.0/8", "10.0.0.1/8")),
        [
            (
                "passive.overrides[0].networks[0]: host bits set; the network would be"
                " 10.0.0.0/8 (got '10.0.0.1/8')"
            ),
        ],
        id="override-host-bits",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace("10.0.0.0/8", "10.0.0.0/33")),
        [
            (
                "passive.overrides[0].networks[0]: not an IP network (CIDR like"
                " 10.0.0.0/8, or one IP) (got '10.0.0.0/33')"
            ),
        ],
        id="override-bad-cidr",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace("10.0.0.0/8", "fe80::%eth0/64")),
        [
            (
                "passive.overrides[0].networks[0]: a network cannot carry a zone id"
                " (%...) (got 'fe80::%eth0/64')"
            ),
        ],
        id="override-zone-id",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace('"10.0.0.0/8"', '"10.0.0.0/8", 8')),
        ["passive.overrides[0].networks[1]: must be a string (got 8)"],
        id="override-network-not-string",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace('"10.0.0.0/8"', '"10.0.0.0/8", "10.0.0.0/8"')),
        [
            (
                "passive.overrides[0].networks[1]: network listed twice, first at"
                " passive.overrides[0].networks[0] (got '10.0.0.0/8')"
            ),
        ],
        id="override-network-twice-in-one",
    ),
    pytest.param(
        _before_storage(
            OVERRIDE.replace('"10.0.0.0/8"', '"192.168.0.0/16", "10.0.0.0/8"')
            + OVERRIDE
        ),
        [
            (
                "passive.overrides[1].networks[0]: network listed twice, first at"
                " passive.overrides[0].networks[1] (got '10.0.0.0/8')"
            ),
        ],
        id="override-network-twice-across",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace('address = ""\n', "")),
        ["passive.overrides[0].address: required key is missing"],
        id="override-address-missing",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace('address = ""', 'address = "::1"')),
        [
            (
                "passive.overrides[0].address: a PASV reply can only advertise an IPv4"
                " address (got '::1')"
            ),
        ],
        id="override-address-ipv6",
    ),
    pytest.param(
        _before_storage(OVERRIDE.replace('address = ""', 'adress = ""')),
        [
            "passive.overrides[0].address: required key is missing",
            "passive.overrides[0].adress: unknown key",
        ],
        id="override-unknown-key",
    ),
    # storage and logging sections
    pytest.param(
        {'root = "data"\n': ""}, ["storage.root: required key is missing"], id="root"
    ),
    pytest.param(
        {'root = "data"': "root = 5"},
        ["storage.root: must be a string (got 5)"],
        id="root-int",
    ),
    pytest.param(
        {"[storage]\n": '[logging]\nlevel = "INFO"\n\n[storage]\n'},
        ["logging.level: must be one of debug, info, warning, error (got 'INFO')"],
        id="log-level",
    ),
    pytest.param(
        {"[storage]\n": '[logging]\nfile = "x.log"\n\n[storage]\n'},
        ["logging.file: unknown key"],
        id="logging-unknown",
    ),
    # users
    pytest.param(
        {'name = "acme"\n': ""}, ["users[0].name: required key is missing"], id="name"
    ),
    pytest.param(
        {'name = "acme"': 'name = ".hidden"'},
        [f"users[0].name: {NAME_RULE} (got '.hidden')"],
        id="name-leading-dot",
    ),
    pytest.param(
        {'name = "acme"': 'name = "-acme"'},
        [f"users[0].name: {NAME_RULE} (got '-acme')"],
        id="name-leading-dash",
    ),
    pytest.param(
        {'name = "acme"': 'name = "ac me"'},
        [f"users[0].name: {NAME_RULE} (got 'ac me')"],
        id="name-space",
    ),
    pytest.param(
        {'name = "acme"': 'name = "../etc"'},
        [f"users[0].name: {NAME_RULE} (got '../etc')"],
        id="name-path",
    ),
    pytest.param(
        {'name = "acme"': 'name = ""'},
        [f"users[0].name: {NAME_RULE} (got '')"],
        id="name-empty",
    ),
    pytest.param(
        {'name = "acme"': f'name = "{LONG_NAME}"'},
        [f"users[0].name: {NAME_RULE} (got {LONG_NAME!r})"],
        id="name-too-long",
    ),
    pytest.param(
        {USER: USER + USER},
        ["users[1].name: duplicate user name (got 'acme')"],
        id="name-duplicate",
    ),
    pytest.param(
        {USER: USER + USER.replace('"acme"', '"ACME"')},
        [
            (
                "users[1].name: duplicate user name, differs only in case from 'acme'"
                " (got 'ACME')"
            ),
        ],
        id="name-duplicate-case",
    ),
    pytest.param(
        {f'password = "{HASH}"\n': ""},
        ["users[0].password: required key is missing"],
        id="password-missing",
    ),
    pytest.param(
        {HASH: ARGON2I_HASH}, [f"users[0].password: {NOT_ARGON2ID}"], id="argon2i"
    ),
    pytest.param(
        {HASH: "$2b$12$R9h/cIPz0gi.URNNX3kh2OPST9/PgBkqquzi.Ss7KIUgO2t0jWMUW"},
        [f"users[0].password: {NOT_ARGON2ID}"],
        id="password-bcrypt",
    ),
    pytest.param(
        {HASH: HASH.rsplit("$", 1)[0] + "$"},
        [f"users[0].password: {NOT_ARGON2ID}"],
        id="password-truncated",
    ),
    pytest.param(
        {f'"{HASH}"': "12345"},
        ["users[0].password: must be a string"],
        id="password-not-string",
    ),
    pytest.param(
        {USER: USER + 'homedir = "/srv/acme"\n'},
        ["users[0].homedir: unknown key"],
        id="user-unknown-key",
    ),
    pytest.param(
        {USER: "", "[server]\n": 'users = "acme"\n\n[server]\n'},
        ["users: must be an array of tables ([[users]] sections)"],
        id="users-not-tables",
    ),
    pytest.param(
        {USER: "", "[server]\n": 'users = ["acme"]\n\n[server]\n'},
        ["users[0]: must be a table"],
        id="user-not-table",
    ),
    # top level
    pytest.param(
        {"[storage]\n": "[quota]\nbytes = 9100\n\n[storage]\n"},
        ["quota: unknown key"],
        id="unknown-section",
    ),
    # issue 3: TLS policy, access, defender, admin, per-user policy
    pytest.param(
        _add("tls", 'reuse = "sometimes"'),
        [
            "tls.reuse: must be one of required, ip-match, required-any-ip (got 'sometimes')"
        ],
        id="tls-reuse-unknown",
    ),
    pytest.param(
        _add("tls", 'min_version = "1.3"\nmax_version = "1.2"'),
        ["tls.max_version: below tls.min_version 1.3 (got '1.2')"],
        id="tls-max-below-min",
    ),
    pytest.param(
        _before_storage('[[tls.overrides]]\nnetworks = ["10.0.0.0/8"]\n\n'),
        ["tls.overrides[0]: sets neither reuse nor max_version"],
        id="tls-override-empty",
    ),
    pytest.param(
        _before_storage(
            '[[tls.overrides]]\nnetworks = ["10.0.0.0/8"]\nreuse = "ip-match"\n'
            '[[tls.overrides]]\nnetworks = ["10.0.0.0/8"]\nmax_version = "1.2"\n\n'
        ),
        [
            "tls.overrides[1].networks[0]: network listed twice, first at "
            "tls.overrides[0].networks[0] (got '10.0.0.0/8')"
        ],
        id="tls-override-network-twice",
    ),
    pytest.param(
        _before_storage('[access]\nallow = ["10.0.0.1/8"]\n\n'),
        [
            "access.allow[0]: host bits set; the network would be 10.0.0.0/8 "
            "(got '10.0.0.1/8')"
        ],
        id="access-allow-host-bits",
    ),
    pytest.param(
        _before_storage('[access]\nallow = "10.0.0.0/8"\n\n'),
        ["access.allow: must be an array (got '10.0.0.0/8')"],
        id="access-allow-not-array",
    ),
    pytest.param(
        _before_storage("[access]\nipv6_prefix_length = 16\n\n"),
        ["access.ipv6_prefix_length: must be 32 to 128 (got 16)"],
        id="ipv6-prefix-too-short",
    ),
    pytest.param(
        _before_storage("[defender]\nban_seconds = 600\nmax_ban_seconds = 60\n\n"),
        ["defender.max_ban_seconds: below defender.ban_seconds (600) (got 60)"],
        id="defender-max-below-ban",
    ),
    pytest.param(
        _before_storage("[defender]\nmax_failures = 0\n\n"),
        ["defender.max_failures: must be 1 to 1000 (got 0)"],
        id="defender-zero-failures",
    ),
    pytest.param(
        _add("server", 'implicit_listen = ["127.0.0.1:2121"]'),
        [
            "server.implicit_listen[0]: duplicate listener, same as server.listen "
            "(got '127.0.0.1:2121')"
        ],
        id="implicit-same-as-explicit",
    ),
    pytest.param(
        _before_storage(f'[admin]\nsocket = "/{"s" * 120}"\n\n'),
        [
            "admin.socket: longer than 107 bytes, too long for a socket "
            f"(got '/{'s' * 120}')"
        ],
        id="admin-socket-too-long",
    ),
    pytest.param(
        {USER: USER + 'allow = ["example.com"]\nreuse = "never"\n'},
        [
            "users[0].allow[0]: not an IP network (CIDR like 10.0.0.0/8, or one IP) "
            "(got 'example.com')",
            "users[0].reuse: must be one of required, ip-match, required-any-ip (got 'never')",
        ],
        id="user-policy-invalid",
    ),
    pytest.param(
        {
            USER: USER + 'max_version = "1.2"\n',
            "[tls]\n": '[tls]\nmin_version = "1.3"\n',
        },
        ["users[0].max_version: below tls.min_version 1.3 (got '1.2')"],
        id="user-max-below-min",
    ),
]


@pytest.mark.parametrize(("edits", "expected"), REJECTED)
def test_rejected(config_dir: Path, edits: dict[str, str], expected: list[str]) -> None:
    """Each broken rule yields exactly its message, with key path and value."""
    path, error = _problems(config_dir, _edited(edits))
    assert error.problems == [f"{path}: {line}" for line in expected]


def _first_override(cfg: GatewayConfig) -> PassiveOverride:
    return cfg.passive.overrides[0]


ACCEPTED: list[object] = [
    pytest.param(
        {LISTEN: 'listen = ["[::1]:21", "0.0.0.0:990", "[::]:990"]\n'},
        lambda cfg: cfg.server.listen,
        (
            ListenAddress("::1", 21),
            ListenAddress("0.0.0.0", 990),
            ListenAddress("::", 990),
        ),
        id="listen-forms",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "20000-29999"'},
        lambda cfg: (cfg.passive.port_min, cfg.passive.port_max),
        (20000, 29999),
        id="ports-10000",
    ),
    pytest.param(
        {'ports = "50000-50099"': 'ports = "65535-65535"'},
        lambda cfg: (cfg.passive.port_min, cfg.passive.port_max),
        (65535, 65535),
        id="ports-one",
    ),
    pytest.param(
        _add("passive", 'address = "ftp.example.com."'),
        lambda cfg: cfg.passive.address,
        "ftp.example.com.",
        id="address-hostname",
    ),
    pytest.param(
        _add("passive", 'address = "203.0.113.7"'),
        lambda cfg: cfg.passive.address,
        "203.0.113.7",
        id="address-ipv4",
    ),
    pytest.param(
        _before_storage(
            OVERRIDE.replace('"10.0.0.0/8"', '"10.1.2.3", "2001:db8::/32"')
            + OVERRIDE.replace('address = ""', 'address = "gw.example.com"')
        ),
        lambda cfg: cfg.passive.overrides,
        (
            PassiveOverride(
                (
                    ipaddress.ip_network("10.1.2.3/32"),
                    ipaddress.ip_network("2001:db8::/32"),
                ),
                "",
            ),
            PassiveOverride((ipaddress.ip_network("10.0.0.0/8"),), "gw.example.com"),
        ),
        id="overrides-overlap-first-match",
    ),
    pytest.param({USER: ""}, lambda cfg: cfg.users, (), id="no-users"),
    pytest.param(
        {'root = "data"': 'root = "/srv/ftps"'},
        lambda cfg: cfg.storage.root,
        Path("/srv/ftps"),
        id="root-absolute",
    ),
]


@pytest.mark.parametrize(("edits", "read", "expected"), ACCEPTED)
def test_accepted(
    config_dir: Path,
    edits: dict[str, str],
    read: Callable[[GatewayConfig], object],
    expected: object,
) -> None:
    """Valid edge values load as the value they stand for."""
    cfg = config.load(_write(config_dir, _edited(edits)))
    assert read(cfg) == expected


def test_full_config_loads(config_dir: Path) -> None:
    """Every key set loads into the expected dataclasses, relative paths anchored."""
    text = f"""\
[server]
listen = ["0.0.0.0:2121", "[::]:2121"]
banner = "Acme exchange"
idle_timeout_seconds = 600
login_timeout_seconds = 20
max_sessions = 64
max_sessions_per_ip = 4
max_sessions_per_user = 2
implicit_listen = ["0.0.0.0:990"]

[tls]
certificate = "certs/server.crt"
private_key = "certs/server.key"
min_version = "1.2"
max_version = "1.3"
reuse = "ip-match"

[[tls.overrides]]
networks = ["198.51.100.0/24"]
max_version = "1.2"

[access]
allow = ["198.51.100.0/24", "10.0.0.0/8"]
safe = ["10.1.0.0/16"]

[defender]
enabled = false
max_failures = 3
window_seconds = 60
ban_seconds = 120
max_ban_seconds = 600

[admin]
socket = "run/admin.sock"

[passive]
ports = "50000-50009"
address = "203.0.113.7"
connect_timeout_seconds = 15

[[passive.overrides]]
networks = ["10.0.0.0/8", "192.168.0.0/16"]
address = ""

[storage]
root = "data"

[logging]
level = "debug"

[[users]]
name = "acme"
password = "{HASH}"

[[users]]
name = "globex.corp"
password = "{HASH}"
allow = ["198.51.100.7"]
reuse = "required"
max_version = "1.2"
"""
    path = _write(config_dir, text)
    expected = GatewayConfig(
        source=path,
        server=ServerSettings(
            listen=(ListenAddress("0.0.0.0", 2121), ListenAddress("::", 2121)),
            banner="Acme exchange",
            idle_timeout_seconds=600,
            login_timeout_seconds=20,
            max_sessions=64,
            max_sessions_per_ip=4,
            max_sessions_per_user=2,
            implicit_listen=(ListenAddress("0.0.0.0", 990),),
        ),
        tls=TLSSettings(
            certificate=config_dir / "certs" / "server.crt",
            private_key=config_dir / "certs" / "server.key",
            min_version="1.2",
            max_version="1.3",
            reuse="ip-match",
            overrides=(
                TLSOverride(
                    (ipaddress.IPv4Network("198.51.100.0/24"),), max_version="1.2"
                ),
            ),
        ),
        passive=PassiveSettings(
            port_min=50000,
            port_max=50009,
            address="203.0.113.7",
            overrides=(
                PassiveOverride(
                    (
                        ipaddress.IPv4Network("10.0.0.0/8"),
                        ipaddress.IPv4Network("192.168.0.0/16"),
                    ),
                    "",
                ),
            ),
            connect_timeout_seconds=15,
        ),
        storage=StorageSettings(root=config_dir / "data"),
        users=(
            UserSettings("acme", HASH),
            UserSettings(
                "globex.corp",
                HASH,
                (ipaddress.IPv4Network("198.51.100.7/32"),),
                reuse="required",
                max_version="1.2",
            ),
        ),
        access=AccessSettings(
            allow=(
                ipaddress.IPv4Network("198.51.100.0/24"),
                ipaddress.IPv4Network("10.0.0.0/8"),
            ),
            safe=(ipaddress.IPv4Network("10.1.0.0/16"),),
        ),
        defender=DefenderSettings(
            enabled=False,
            max_failures=3,
            window_seconds=60,
            ban_seconds=120,
            max_ban_seconds=600,
        ),
        admin=AdminSettings(config_dir / "run" / "admin.sock"),
        log_level="debug",
    )
    assert config.load(path) == expected


def test_minimal_config_takes_dataclass_defaults(config_dir: Path) -> None:
    """Keys left out get the dataclass defaults, not a second copy of them."""
    cfg = config.load(_write(config_dir, BASE))
    assert cfg.server == ServerSettings(listen=(ListenAddress("127.0.0.1", 2121),))
    assert cfg.tls.min_version == TLSSettings.min_version
    assert cfg.passive == PassiveSettings(port_min=50000, port_max=50099)
    assert cfg.log_level == GatewayConfig.log_level


def test_relative_source_path(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Messages quote the path as the caller gave it; loaded paths are absolute."""
    monkeypatch.chdir(config_dir)
    _write(config_dir, BASE)
    assert config.load(Path("gateway.toml")).storage.root == config_dir / "data"
    _write(config_dir, _edited({'root = "data"': "root = 5"}))
    with pytest.raises(ConfigError) as caught:
        config.load(Path("gateway.toml"))
    assert caught.value.problems == [
        "gateway.toml: storage.root: must be a string (got 5)"
    ]


def test_every_problem_in_one_error(config_dir: Path) -> None:
    """Problems in several sections all come back at once, in section order, counted."""
    text = _edited(
        {
            LISTEN: 'listen = ["127.0.0.1:50050"]\n',
            'name = "acme"': 'name = ".acme"',
            "[storage]\n": "[storage]\nquota = 1\n",
        }
    )
    path, error = _problems(config_dir, text)
    assert str(error).splitlines() == [
        f"{path}: passive.ports: overlaps the control listener 127.0.0.1:50050",
        f"{path}: storage.quota: unknown key",
        f"{path}: users[0].name: {NAME_RULE} (got '.acme')",
        "3 configuration problems",
    ]


def test_one_problem_is_counted_singular(config_dir: Path) -> None:
    """The count line agrees in number with a single problem."""
    _path, error = _problems(config_dir, _edited({LISTEN: ""}))
    assert str(error).splitlines()[-1] == "1 configuration problem"


@pytest.mark.parametrize(
    "edits",
    [
        pytest.param({HASH: "hunter2-SECRET"}, id="plaintext-password"),
        pytest.param({"password =": "pasword ="}, id="misspelt-key"),
        pytest.param({f'"{HASH}"': '["hunter2-SECRET"]'}, id="wrong-type"),
        pytest.param(
            {USER: "", "[server]\n": 'users = ["acme:hunter2-SECRET"]\n[server]\n'},
            id="entry-not-table",
        ),
        pytest.param(
            {USER: "", "[server]\n": 'users = {password="hunter2-SECRET"}\n[server]\n'},
            id="users-not-array",
        ),
    ],
)
def test_secrets_never_in_messages(config_dir: Path, edits: dict[str, str]) -> None:
    """Neither a hash nor a pasted password appears in any configuration message."""
    _path, error = _problems(config_dir, _edited(edits))
    assert error.problems  # the edit did break something
    assert "SECRET" not in str(error)
    assert HASH not in str(error)


def test_toml_syntax_error(tmp_path: Path) -> None:
    """A TOML syntax error is one problem quoting tomllib's position."""
    path, error = _problems(tmp_path, "[server\nlisten = 1\n")
    assert len(error.problems) == 1
    assert re.fullmatch(
        rf"{re.escape(str(path))}: TOML syntax error: .*\(at line 1, column \d+\)",
        error.problems[0],
    )


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is one problem with the system's reason."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 (TOML requires it) is refused with the byte offset."""
    path = tmp_path / "gateway.toml"
    path.write_bytes(b'[server]\nbanner = "caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.problems == [
        f"{path}: cannot read: not UTF-8 text (invalid continuation byte at byte 22)"
    ]


def test_certificate_problems_are_reported(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Findings of certs.certificate_problems join the list, formatted like the rest."""
    calls: list[tuple[Path, Path]] = []

    def fake(certificate: Path, private_key: Path) -> list[tuple[str, str]]:
        calls.append((certificate, private_key))
        return [
            ("tls.certificate", "expired on 2020-01-01"),
            ("tls.private_key", "does not match the certificate"),
        ]

    monkeypatch.setattr(certs, "certificate_problems", fake)
    path, error = _problems(config_dir, _edited({'root = "data"': "root = 5"}))
    assert error.problems == [
        f"{path}: tls.certificate: expired on 2020-01-01",
        f"{path}: tls.private_key: does not match the certificate",
        f"{path}: storage.root: must be a string (got 5)",
    ]
    certs_dir = config_dir / "certs"
    assert calls == [(certs_dir / "server.crt", certs_dir / "server.key")]


def test_certificate_check_needs_both_paths(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a TLS path missing, the file check is skipped rather than fed a guess."""
    calls: list[tuple[Path, Path]] = []

    def fake(certificate: Path, private_key: Path) -> list[tuple[str, str]]:
        calls.append((certificate, private_key))
        return []

    monkeypatch.setattr(certs, "certificate_problems", fake)
    _problems(config_dir, _edited({'private_key = "certs/server.key"\n': ""}))
    assert calls == []


def test_missing_certificate_file(tmp_path: Path) -> None:
    """A certificate path naming no file is a tls.certificate problem (real files)."""
    path, error = _problems(tmp_path, BASE)
    assert any(
        line.startswith(f"{path}: tls.certificate: ") for line in error.problems
    ), error.problems


def test_summary(config_dir: Path) -> None:
    """The summary shows the effective settings and user names, never a hash."""
    text = _edited(
        {
            "[passive]\n": '[passive]\naddress = "203.0.113.7"\n',
            **_before_storage(OVERRIDE.replace('"10.0.0.0/8"', '"10.0.0.0/8", "::1"')),
            USER: USER + USER.replace("acme", "globex"),
        }
    )
    path = _write(config_dir, text)
    report = config.summary(config.load(path))
    certs_dir = config_dir / "certs"
    local = "local address of the control connection"
    assert report.splitlines() == [
        f"Configuration: {path}",
        "Listeners (explicit TLS): 127.0.0.1:2121",
        "Listeners (implicit TLS): none",
        "Banner: Partner file exchange",
        "Node name: the host name",
        "PROXY protocol from: nobody (off)",
        (
            "Logged-in sessions: at most 512, 16 per client address, 8 per user "
            "(all workers together, counted at login)"
        ),
        (
            "Connections not logged in yet: at most 256, 32 per client address, "
            "per worker process; when full, the longest-idle connection of the "
            "busiest address is closed to make room"
        ),
        "Client addresses: IPv6 counted per /64 (bans and limits), IPv4 per address",
        (
            "Timers: login timeout 30 s, idle timeout 300 s, shutdown grace 30 s, "
            "verified logins remembered 300 s"
        ),
        "Worker processes: auto (one per CPU core); IO loop watchdog: stuck after 5 s",
        "Active mode (PORT/EPRT): not supported",
        (
            "Access: WARNING: every client address may connect "
            "(access.allow is empty; list your partners' networks)"
        ),
        (
            "Defender: ban after 5 failed logins within 300 s, for 900 s "
            "(doubling on repeat, at most 86400 s)"
        ),
        (
            f"TLS: certificate {certs_dir / 'server.crt'}, "
            f"private key {certs_dir / 'server.key'}, versions 1.2-1.3, "
            "data connections: must resume the control connection's TLS session"
        ),
        (
            "Passive ports: 50000-50099 (100 ports), connect timeout 30 s, at most "
            "50% per user and 50% per client address"
        ),
        "Passive address: 203.0.113.7",
        f"Passive override: 10.0.0.0/8, ::1/128 -> {local}",
        f"Storage root: {config_dir / 'data'}",
        f"Admin socket: {config_dir / 'data' / '.ftps-gateway' / 'admin.sock'}",
        "Users (2): acme, globex",
        "Log level: info",
        "Audit log: stdout",
        "xferlog: off",
        "Upload sha256 in the audit log: on",
        "Hooks: none",
        "Cluster: off (bans, session limits and quota are this node's own)",
        "Metrics: off",
    ]
    assert "argon2" not in report
    assert HASH not in report


def test_summary_without_users(config_dir: Path) -> None:
    """A server nobody can log in to says so instead of listing an empty name list."""
    cfg = config.load(_write(config_dir, _edited({USER: ""})))
    assert "Users (0): none (nobody can log in)" in config.summary(cfg).splitlines()


def test_example_file_loads(config_dir: Path) -> None:
    """The shipped example is valid once its commented user gets a real hash."""
    text = EXAMPLE.read_text(encoding="utf-8")
    placeholder = "PASTE-OUTPUT-OF-ftps-gateway-hash-password"
    assert placeholder in text
    text = re.sub(
        r"^# (\[{1,2}[a-z.]+\]{1,2}$|[a-z_]+ = )", r"\1", text, flags=re.MULTILINE
    )
    # The hook examples name a program, a secret and a CA of a real host.
    (config_dir / "hook.secret").write_text("s3cret\n")
    for example, local in (
        ("/etc/ftps-gateway/hook.secret", config_dir / "hook.secret"),
        ("/etc/ftps-gateway/hooks-ca.pem", config_dir / "certs" / "server.crt"),
        ("/usr/local/bin/archive-delivery", Path(sys.executable)),
    ):
        assert example in text
        text = text.replace(example, str(local))
    cfg = config.load(_write(config_dir, text.replace(placeholder, HASH)))
    assert [(u.name, u.password_hash, u.groups) for u in cfg.users] == [
        ("acme", HASH, ("finance",))
    ]
    (user,) = cfg.users
    assert user.allow == (ipaddress.IPv4Network("198.51.100.0/24"),)
    assert (user.reuse, user.max_version) == ("required", "1.3")
    assert [m.path for m in cfg.groups[0].mounts] == ["/finance", "/outbound"]
    assert not config.summary(cfg).count("WARNING")
    assert cfg.tls.certificate == config_dir / "certs" / "server.crt"
    assert cfg.passive.address == "203.0.113.7"
    assert [override.address for override in cfg.passive.overrides] == [""]
    ingest, archive = cfg.hooks
    assert (ingest.name, ingest.kind, ingest.secret) == ("ingest", "url", b"s3cret")
    assert (archive.name, archive.kind) == ("archive", "command")
    assert cfg.cluster is not None
    assert cfg.cluster.redis_url == "redis://redis.internal:6379/0"


def test_example_file_documents_every_key() -> None:
    """Every key the loader reads appears, set, in the example file."""
    text = EXAMPLE.read_text(encoding="utf-8")
    keys = set(re.findall(r"^#? ?([a-z_0-9]+) = ", text, flags=re.MULTILINE))
    assert keys == {
        "listen",
        "banner",
        "idle_timeout_seconds",
        "login_timeout_seconds",
        "max_sessions",
        "max_sessions_per_ip",
        "max_sessions_per_user",
        "max_unauthenticated",
        "max_unauthenticated_per_ip",
        "implicit_listen",
        "certificate",
        "private_key",
        "min_version",
        "max_version",
        "reuse",
        "allow",
        "ipv6_prefix_length",
        "safe",
        "enabled",
        "max_failures",
        "window_seconds",
        "ban_seconds",
        "max_ban_seconds",
        "socket",
        "ports",
        "address",
        "connect_timeout_seconds",
        "max_ports_per_user_percent",
        "max_ports_per_ip_percent",
        "networks",
        "root",
        "level",
        "audit_file",
        "xferlog_file",
        "upload_sha256",
        "shutdown_grace_seconds",
        "node_name",
        "proxy_protocol_from",
        "workers",
        "login_cache_seconds",
        "loop_stall_seconds",
        "per_user_labels",
        "allow_public",
        "name",
        "password",
        "partial_retention_seconds",
        "path",
        "source",
        "permissions",
        "quota_bytes",
        "quota_files",
        "groups",
        "home",
        "home_permissions",
        "events",
        "users",
        "paths",
        "url",
        "secret_file",
        "ca_file",
        "timeout_seconds",
        "max_attempts",
        "max_age_seconds",
        "command",
        "redis_url",
        "key_prefix",
        "on_unavailable",
        "lease_seconds",
    }


def test_environment_references_fill_string_values(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Containers set the masquerade address, passive range and node name."""
    monkeypatch.setenv("FTPS_PASSIVE_ADDRESS", "203.0.113.44")
    monkeypatch.setenv("FTPS_PASSIVE_PORTS", "50100-50119")
    monkeypatch.delenv("FTPS_NODE_NAME", raising=False)
    text = _edited(
        {
            "[passive]\n": '[passive]\naddress = "${FTPS_PASSIVE_ADDRESS}"\n',
            'ports = "50000-50099"': 'ports = "${FTPS_PASSIVE_PORTS}"',
            "[server]\n": '[server]\nnode_name = "${FTPS_NODE_NAME:-node-a}"\n',
        }
    )
    cfg = config.load(_write(config_dir, text))
    assert cfg.passive.address == "203.0.113.44"
    assert (cfg.passive.port_min, cfg.passive.port_max) == (50100, 50119)
    assert cfg.server.node_name == "node-a"


def test_unset_environment_variable_is_a_config_error(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FTPS_PASSIVE_ADDRESS", raising=False)
    text = _edited({"[passive]\n": '[passive]\naddress = "${FTPS_PASSIVE_ADDRESS}"\n'})
    path, error = _problems(config_dir, text)
    assert error.problems == [
        f"{path}: passive.address: environment variable FTPS_PASSIVE_ADDRESS is not "
        "set (got '${FTPS_PASSIVE_ADDRESS}')"
    ]


def test_empty_strings_mean_the_documented_defaults(config_dir: Path) -> None:
    """node_name = "", audit_file = "", xferlog_file = "" (as ${VAR:-} gives them)."""
    text = _edited(
        {
            "[server]\n": '[server]\nnode_name = ""\n',
            "[storage]\n": '[logging]\naudit_file = ""\nxferlog_file = ""\n[storage]\n',
        }
    )
    cfg = config.load(_write(config_dir, text))
    assert cfg.server.node_name == ""
    assert (cfg.audit_file, cfg.xferlog_file) == (None, None)


def test_environment_reference_can_stand_for_a_list(
    config_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FTPS_ALLOW", "198.51.100.0/24, 203.0.113.7  10.0.0.0/8")
    monkeypatch.setenv("FTPS_LISTEN", "127.0.0.1:2121,[::1]:2121")
    text = _edited(
        {
            LISTEN: 'listen = "${FTPS_LISTEN}"\n',
            "[storage]\n": '[access]\nallow = "${FTPS_ALLOW}"\n[storage]\n',
        }
    )
    cfg = config.load(_write(config_dir, text))
    assert [str(n) for n in cfg.access.allow] == [
        "198.51.100.0/24", "203.0.113.7/32", "10.0.0.0/8",
    ]  # fmt: skip
    assert [(a.host, a.port) for a in cfg.server.listen] == [
        ("127.0.0.1", 2121), ("::1", 2121),
    ]  # fmt: skip
    monkeypatch.setenv("FTPS_ALLOW", "198.51.100.0/33")
    path, error = _problems(config_dir, text)
    assert error.problems == [
        f"{path}: access.allow[0]: not an IP network (CIDR like 10.0.0.0/8, or one IP) "
        "(got '198.51.100.0/33')"
    ]


def test_ip_match_is_refused_behind_a_proxy_balancer(config_dir: Path) -> None:
    text = _edited(
        {
            "[server]\n": '[server]\nproxy_protocol_from = ["10.0.0.5/32"]\n',
            "[tls]\n": '[tls]\nreuse = "ip-match"\n',
        }
    )
    path, error = _problems(config_dir, text)
    assert error.problems == [
        f'{path}: tls.reuse: "ip-match" cannot tell partners apart behind '
        "server.proxy_protocol_from (their data connections all come from the "
        'balancer); use "required" or "required-any-ip" (got \'ip-match\')'
    ]


@pytest.mark.parametrize("network", ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96"])
def test_proxy_protocol_from_every_address_is_refused(
    config_dir: Path, network: str
) -> None:
    """Trusting PROXY headers from anyone lets anyone claim any client address."""
    text = _edited(
        _add("server", f'proxy_protocol_from = ["10.0.0.5/32", "{network}"]')
    )
    path, error = _problems(config_dir, text)
    assert error.problems == [
        f"{path}: server.proxy_protocol_from[1]: trusts a PROXY header from every "
        "address (anyone could claim any client address, past bans and access.allow); "
        f"list the balancers' own addresses (got '{ipaddress.ip_network(network)}')"
    ]


@pytest.mark.parametrize(
    ("network", "warned"),
    [
        ("10.0.0.5/32", None),
        ("192.168.0.0/24", None),
        ("fd00:1:2:3::/64", None),
        ("10.0.0.0/8", "16777216 addresses"),
        ("2001:db8::/32", "79228162514264337593543950336 addresses"),
        ("2001:db8:1::/48", "public"),
        ("198.51.100.0/28", "public"),
    ],
)
def test_check_config_warns_on_large_or_public_proxy_ranges(
    config_dir: Path, network: str, warned: str | None
) -> None:
    """A balancer is a few addresses on a private network; anything else is a risk."""
    cfg = config.load(
        _write(
            config_dir, _edited(_add("server", f'proxy_protocol_from = ["{network}"]'))
        )
    )
    found = [w for w in config.warnings(cfg) if "proxy_protocol_from" in w]
    if warned is None:
        assert found == []
    else:
        assert len(found) == 1
        assert found[0].startswith("server.proxy_protocol_from[0]: ")
        assert warned in found[0]


def test_allow_active_mode_true_is_refused_with_the_reason(config_dir: Path) -> None:
    """Active mode is not supported (decision 0009): asking for it fails clearly."""
    path, error = _problems(
        config_dir, _edited(_add("server", "allow_active_mode = true"))
    )
    assert error.problems == [
        f"{path}: server.allow_active_mode: active mode (PORT/EPRT) is not supported: "
        "it cannot reach partners behind NAT or firewalls, and TLS hides PORT from "
        "NAT helpers (docs/decisions/0009-active-mode.md); remove the key, partners "
        "use PASV/EPSV (got True)"
    ]


def test_allow_active_mode_false_still_loads_with_a_warning(config_dir: Path) -> None:
    """Configs copied from the old example (``= false``) keep loading; check-config
    says the key is obsolete."""
    cfg = config.load(
        _write(config_dir, _edited(_add("server", "allow_active_mode = false")))
    )
    assert [w for w in config.warnings(cfg) if w.startswith("server.")] == [
        "server.allow_active_mode: obsolete, active mode is not supported; remove it"
    ]


def test_check_config_warns_when_the_passive_range_is_smaller_than_the_sessions(
    config_dir: Path,
) -> None:
    """Each session waiting for a data connection holds a port: 20 ports for 512
    sessions means 425s; and a user's cap below its session limit is said too."""
    text = _edited(
        {
            "[server]\n": "[server]\nworkers = 2\n",
            'ports = "50000-50099"': 'ports = "50000-50019"',
        }
    )
    found = config.warnings(config.load(_write(config_dir, text)))
    assert found == [
        "passive.ports: 20 ports for up to 512 sessions (server.max_sessions): a "
        "session waiting for its data connection holds a port, and PASV/EPSV gets 425 "
        "when none is free; give the range at least 512 ports",
        "passive.max_ports_per_user_percent: a user may hold 5 ports on one of the 2 "
        "workers (50% of its 10-port share), fewer than server.max_sessions_per_user "
        "(8): more of its sessions waiting for data connections at once get 425",
        "passive.max_ports_per_ip_percent: a client address may hold 5 ports on one of "
        "the 2 workers (50% of its 10-port share), fewer than "
        "server.max_sessions_per_ip (16): more of its sessions waiting for data "
        "connections at once get 425",
    ]


def test_a_range_sized_for_the_sessions_draws_no_warning(config_dir: Path) -> None:
    """max_sessions = 50 over 100 ports, one worker: nothing to say."""
    text = _edited({"[server]\n": "[server]\nworkers = 1\nmax_sessions = 50\n"})
    assert config.warnings(config.load(_write(config_dir, text))) == []

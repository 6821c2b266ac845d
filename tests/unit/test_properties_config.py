"""Config parsing under arbitrary documents: ``ConfigError`` or a config, nothing else.

A valid document (every section of the example) is mutated: a key gets a value of
any TOML type or an odd string, unknown keys and sections appear, sections turn into
arrays, and plain garbage is parsed. ``load_text`` must never let another exception
(KeyError, TypeError, ValueError, OverflowError...) escape: ``cli check-config`` turns
only ``ConfigError`` into a readable message.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftps_gateway import config
from ftps_gateway.errors import ConfigError
from support.credentials import PASSWORD_HASH

_SECTIONS: dict[str, dict[str, object]] = {
    "server": {
        "listen": ["127.0.0.1:2121"], "banner": "Partner file exchange",
        "idle_timeout_seconds": 300, "login_timeout_seconds": 30,
        "implicit_listen": [], "max_sessions": 512, "max_sessions_per_ip": 16,
        "max_sessions_per_user": 8,
        "shutdown_grace_seconds": 30, "node_name": "ftps-1",
        "proxy_protocol_from": ["10.0.0.5/32"], "workers": "auto",
        "login_cache_seconds": 300, "loop_stall_seconds": 5,
    },
    "tls": {"min_version": "1.2", "max_version": "1.3", "reuse": "required"},
    "passive": {"ports": "50000-50099", "address": "203.0.113.7",
                "connect_timeout_seconds": 30},
    "storage": {"partial_retention_seconds": 0},
    "access": {"allow": ["198.51.100.0/24", "10.0.0.0/8"], "safe": ["10.0.0.0/8"]},
    "defender": {"enabled": True, "max_failures": 5, "window_seconds": 300,
                 "ban_seconds": 900, "max_ban_seconds": 86400},
    "logging": {"level": "info"},
    "metrics": {"listen": "127.0.0.1:9120", "per_user_labels": False,
                "allow_public": False},
}  # fmt: skip
_ARRAYS: dict[str, list[dict[str, object]]] = {
    "tls.overrides": [{"networks": ["198.51.100.0/24"], "reuse": "required-any-ip",
                       "max_version": "1.2"}],
    "passive.overrides": [{"networks": ["10.0.0.0/8"], "address": ""}],
    "groups": [{"name": "finance", "mounts": [
        {"path": "/finance", "source": "finance", "permissions": "read"}]}],
    "users": [{"name": "acme", "password": PASSWORD_HASH, "groups": ["finance"],
               "allow": ["198.51.100.0/24"], "quota_bytes": 1000}],
}  # fmt: skip

ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "${UNSET_VARIABLE_FOR_TEST}",
        "${X:-}",
        "${",
        "}",
        "{user}",
        "{other}",
        "../../etc",
        "/",
        "\x00",
        "\u2028",
        "\udcff"[:0] + "\ufffd",
        "1.1",
        "1.0",
        "0",
        "-1",
        "99999999999999999999",
        "0.0.0.0:0",
        "[::1]:21",
        "[::1",
        "::1",
        "127.0.0.1:99999",
        "10.0.0.300/24",
        "1-0",
        "65535-65536",
        "a" * 5000,
        "auto",
        "none",
        "read-write",
        "nan",
        "$argon2id$v=19$m=8,t=1,p=1$x$y",
        "debug",
    ]
) | st.text(max_size=30)
SCALARS = st.one_of(
    ODD_STRINGS,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.datetimes(),
    st.dates(),
    st.times(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(
    sorted({key for table in _SECTIONS.values() for key in table}
           | {"certificate", "private_key", "root", "socket", "name", "password",
              "groups", "mounts", "path", "source", "permissions", "allow",
              "home", "quota_bytes", "quota_files", "networks", "address"})
) | st.text(max_size=10)  # fmt: skip


def toml_value(value: object) -> str:  # noqa: PLR0911 - one return per TOML type
    """A TOML literal for ``value`` (strings JSON-escaped, which TOML accepts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isfinite(value):
            return repr(value)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    assert isinstance(value, dict)
    return (
        "{"
        + ", ".join(
            f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()
        )
        + "}"
    )


def render(sections: dict[str, dict[str, object]],
           arrays: dict[str, list[dict[str, object]]]) -> str:  # fmt: skip
    """Sections as ``[name]`` tables, arrays as ``[[name]]`` tables."""
    out: list[str] = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{json.dumps(key)} = {toml_value(v)}" for key, v in table.items())
    for name, items in arrays.items():
        for item in items:
            out.append(f"[[{name}]]")
            out.extend(
                f"{json.dumps(key)} = {toml_value(v)}" for key, v in item.items()
            )
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory,
         cert_files: tuple[Path, Path, Path]) -> dict[str, dict[str, object]]:  # fmt: skip
    """The valid sections, with real certificate files and a storage root."""
    chain, key, _ = cert_files
    root = tmp_path_factory.mktemp("config-fuzz")
    (root / "storage" / "finance").mkdir(parents=True)
    sections = {name: dict(table) for name, table in _SECTIONS.items()}
    sections["tls"] |= {"certificate": str(chain), "private_key": str(key)}
    sections["storage"]["root"] = str(root / "storage")
    sections["admin"] = {"socket": str(root / "admin.sock")}
    return sections


def load(text: str, source: Path) -> None:
    """Only ConfigError may escape."""
    problems: list[str] = []
    try:
        config.load_text(text, source)
    except ConfigError as error:
        problems = error.problems or [""]
    assert all(isinstance(line, str) and line for line in problems)


FUZZ = settings(suppress_health_check=[HealthCheck.too_slow])


def test_base_document_is_valid(
    base: dict[str, dict[str, object]], tmp_path: Path
) -> None:
    """The starting point of the mutations loads: mutations test validation, not typos."""
    config.load_text(render(base, _ARRAYS), tmp_path / "gateway.toml")


@FUZZ
@given(data=st.data())
def test_mutated_documents_raise_only_config_error(
    base: dict[str, dict[str, object]], data: st.DataObject
) -> None:
    """Any key of any section (or array entry) set to any value: ConfigError at most."""
    sections = {name: dict(table) for name, table in base.items()}
    arrays = {name: [dict(item) for item in items] for name, items in _ARRAYS.items()}
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        targets = [*sections, *arrays]
        target = data.draw(st.sampled_from(targets))
        table = (sections[target] if target in sections
                 else data.draw(st.sampled_from(arrays[target])))  # fmt: skip
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        if action == "delete" and table:
            del table[data.draw(st.sampled_from(sorted(table)))]
        elif action == "set" and table:
            table[data.draw(st.sampled_from(sorted(table)))] = data.draw(VALUES)
        else:
            table[data.draw(KEYS)] = data.draw(VALUES)
    load(render(sections, arrays), Path("/etc/ftps-gateway/gateway.toml"))


@FUZZ
@given(
    document=st.dictionaries(
        KEYS | st.sampled_from([*_SECTIONS, "users", "groups", "admin"]),
        VALUES,
        max_size=6,
    )
)
def test_arbitrary_documents_raise_only_config_error(
    document: dict[str, object],
) -> None:
    """Top-level keys of any type (sections as strings, users as a table...)."""
    text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in document.items())
    load(text, Path("gateway.toml"))


@given(text=st.text(max_size=300) | st.sampled_from([
    "[server", "[[users]]\nname = 1", "users = 3", "[server]\nlisten = [1, [2]]",
    "a = 1\na = 2", "[tls]\n[tls]", 'x = "\\uD800"', "\ufeff[server]",
]))  # fmt: skip
def test_garbage_text_raises_only_config_error(text: str) -> None:
    """Not TOML at all, or TOML that is wrong at the syntax level: ConfigError."""
    load(text, Path("gateway.toml"))


@pytest.mark.parametrize("section_key", [("tls", "certificate"), ("storage", "root"),
                                         ("admin", "socket")])  # fmt: skip
def test_nul_in_a_path_is_a_config_error(
    base: dict[str, dict[str, object]], section_key: tuple[str, str]
) -> None:
    """Regression: a NUL in a path value raised ValueError out of load_text."""
    section, key = section_key
    sections = {name: dict(table) for name, table in base.items()}
    sections[section][key] = "certs/a\x00b"
    with pytest.raises(ConfigError, match=f"{section}.{key}: must not contain a NUL"):
        config.load_text(render(sections, _ARRAYS), Path("gateway.toml"))

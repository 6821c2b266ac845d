"""The ``[metrics]`` section: one case per rule, with the exact message an operator sees."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import argon2
import pytest

from ftps_gateway import config
from ftps_gateway.config import ListenAddress, MetricsSettings
from ftps_gateway.errors import ConfigError

HASH = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("x")
EXAMPLE = Path(__file__).parents[2] / "config" / "gateway.example.toml"
PUBLIC = (
    "a public or every-interface address; use loopback or a private address,"
    " or set metrics.allow_public = true"
)

BASE = f"""\
[server]
listen = ["127.0.0.1:2121", "[::1]:2122"]

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


def _write(directory: Path, metrics_section: str | None) -> Path:
    text = BASE if metrics_section is None else f"{BASE}\n[metrics]\n{metrics_section}"
    path = directory / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


REJECTED = [
    pytest.param('listen = "203.0.113.7:9120"', [f"metrics.listen: {PUBLIC} (got '203.0.113.7:9120')"], id="public-ipv4"),
    pytest.param('listen = "[2001:db8::1]:9120"', [f"metrics.listen: {PUBLIC} (got '[2001:db8::1]:9120')"], id="documentation-ipv6-is-not-private"),
    pytest.param('listen = "100.64.0.1:9120"', [f"metrics.listen: {PUBLIC} (got '100.64.0.1:9120')"], id="carrier-grade-nat"),
    pytest.param('listen = "172.32.0.1:9120"', [f"metrics.listen: {PUBLIC} (got '172.32.0.1:9120')"], id="just-outside-172-16-12"),
    pytest.param('listen = "0.0.0.0:9120"', [f"metrics.listen: {PUBLIC} (got '0.0.0.0:9120')"], id="every-ipv4-interface"),
    pytest.param('listen = "[::]:9120"', [f"metrics.listen: {PUBLIC} (got '[::]:9120')"], id="every-interface"),
    pytest.param('listen = "203.0.113.7:9120"\nallow_public = false', [f"metrics.listen: {PUBLIC} (got '203.0.113.7:9120')"], id="public-explicitly-refused"),
    pytest.param('listen = "localhost:9120"', ["metrics.listen: host is not an IP address (names are not resolved) (got 'localhost:9120')"], id="hostname"),
    pytest.param('listen = "127.0.0.1"', ["metrics.listen: not IP:PORT or [IPv6]:PORT (got '127.0.0.1')"], id="no-port"),
    pytest.param('listen = "127.0.0.1:70000"', ["metrics.listen: port must be 0 to 65535 (0: any free port) (got '127.0.0.1:70000')"], id="port-too-big"),
    pytest.param('listen = "::1:9120"', ["metrics.listen: an IPv6 address needs brackets, IPv4 must not have them (got '::1:9120')"], id="ipv6-without-brackets"),
    pytest.param("listen = 9120", ["metrics.listen: must be a string (got 9120)"], id="not-string"),
    pytest.param('listen = ["127.0.0.1:9120"]', ["metrics.listen: must be a string (got ['127.0.0.1:9120'])"], id="array"),
    pytest.param('listen = "127.0.0.1:50010"', ["metrics.listen: port inside passive.ports (got '127.0.0.1:50010')"], id="in-passive-range"),
    pytest.param('listen = "127.0.0.1:2121"', ["metrics.listen: same port as the control listener 127.0.0.1:2121 (got '127.0.0.1:2121')"], id="control-port"),
    pytest.param('listen = "0.0.0.0:2121"\nallow_public = true', ["metrics.listen: same port as the control listener 127.0.0.1:2121 (got '0.0.0.0:2121')"], id="control-port-every-interface"),
    pytest.param('listen = "[::]:2121"\nallow_public = true', ["metrics.listen: same port as the control listener 127.0.0.1:2121 (got '[::]:2121')"], id="control-port-dual-stack"),
    pytest.param(
        'listen = "198.51.100.1:50000"',
        [f"metrics.listen: {PUBLIC} (got '198.51.100.1:50000')", "metrics.listen: port inside passive.ports (got '198.51.100.1:50000')"],
        id="two-problems-one-pass",
    ),
    pytest.param('per_user_labels = "yes"', ["metrics.per_user_labels: must be true or false (got 'yes')"], id="per-user-not-bool"),
    pytest.param("allow_public = 1", ["metrics.allow_public: must be true or false (got 1)"], id="allow-public-not-bool"),
    pytest.param("port = 9120", ["metrics.port: unknown key"], id="unknown-key"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "expected"), REJECTED)
def test_rejected(config_dir: Path, section: str, expected: list[str]) -> None:
    """Each broken rule yields exactly its message, with key path and value."""
    path = _write(config_dir, section)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.problems == [f"{path}: {line}" for line in expected]


def test_metrics_not_a_table(config_dir: Path) -> None:
    """``metrics = ...`` instead of a ``[metrics]`` section is named as such."""
    path = config_dir / "gateway.toml"
    path.write_text(f'metrics = "127.0.0.1:9120"\n{BASE}', encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.problems == [
        f"{path}: metrics: must be a table (got '127.0.0.1:9120')"
    ]


ACCEPTED = [
    pytest.param(None, MetricsSettings(), id="absent-is-off"),
    pytest.param("", MetricsSettings(), id="empty-section-is-off"),
    pytest.param('listen = ""', MetricsSettings(), id="empty-string-is-off"),
    pytest.param('listen = "127.0.0.1:9120"', MetricsSettings(ListenAddress("127.0.0.1", 9120)), id="loopback"),
    pytest.param('listen = "[::1]:9120"', MetricsSettings(ListenAddress("::1", 9120)), id="ipv6-loopback"),
    pytest.param('listen = "10.1.2.3:9120"', MetricsSettings(ListenAddress("10.1.2.3", 9120)), id="private-10"),
    pytest.param('listen = "192.168.7.1:9120"', MetricsSettings(ListenAddress("192.168.7.1", 9120)), id="private-192"),
    pytest.param('listen = "172.31.255.1:9120"', MetricsSettings(ListenAddress("172.31.255.1", 9120)), id="private-172"),
    pytest.param('listen = "169.254.10.1:9120"', MetricsSettings(ListenAddress("169.254.10.1", 9120)), id="link-local"),
    pytest.param('listen = "[fd00::5]:9120"', MetricsSettings(ListenAddress("fd00::5", 9120)), id="unique-local-ipv6"),
    pytest.param('listen = "127.0.0.1:0"', MetricsSettings(ListenAddress("127.0.0.1", 0)), id="port-0"),
    pytest.param('listen = "127.0.0.2:2121"', MetricsSettings(ListenAddress("127.0.0.2", 2121)), id="control-port-other-address"),
    pytest.param('listen = "127.0.0.1:2122"', MetricsSettings(ListenAddress("127.0.0.1", 2122)), id="ipv6-listener-port-on-ipv4"),
    pytest.param('listen = "0.0.0.0:9120"\nallow_public = true', MetricsSettings(ListenAddress("0.0.0.0", 9120), allow_public=True), id="every-interface-allowed"),
    pytest.param('listen = "203.0.113.7:9120"\nallow_public = true', MetricsSettings(ListenAddress("203.0.113.7", 9120), allow_public=True), id="public-allowed"),
    pytest.param('listen = "127.0.0.1:9120"\nper_user_labels = true', MetricsSettings(ListenAddress("127.0.0.1", 9120), per_user_labels=True), id="per-user-labels"),
    pytest.param("per_user_labels = true", MetricsSettings(per_user_labels=True), id="per-user-labels-while-off"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "expected"), ACCEPTED)
def test_accepted(
    config_dir: Path, section: str | None, expected: MetricsSettings
) -> None:
    """Valid sections load into exactly these settings."""
    assert config.load(_write(config_dir, section)).metrics == expected


def test_off_by_default() -> None:
    """The dataclass defaults: no endpoint, no per-user labels, no public address."""
    assert MetricsSettings() == MetricsSettings(
        listen=None, per_user_labels=False, allow_public=False
    )


SUMMARIES = [
    pytest.param(None, "Metrics: off", id="off"),
    pytest.param(
        'listen = "127.0.0.1:9120"',
        "Metrics: http://127.0.0.1:9120/metrics (also /healthz, /readyz),"
        " per-user labels off",
        id="loopback",
    ),
    pytest.param(
        'listen = "[::1]:9120"\nper_user_labels = true',
        "Metrics: http://[::1]:9120/metrics (also /healthz, /readyz),"
        " per-user labels on",
        id="ipv6",
    ),
    pytest.param(
        'listen = "0.0.0.0:9120"\nallow_public = true',
        "Metrics: http://0.0.0.0:9120/metrics (also /healthz, /readyz),"
        " public (metrics.allow_public), per-user labels off",
        id="public",
    ),
]


@pytest.mark.parametrize(("section", "line"), SUMMARIES)
def test_summary(config_dir: Path, section: str | None, line: str) -> None:
    """check-config's summary ends with what the metrics endpoint does."""
    report = config.summary(config.load(_write(config_dir, section)))
    assert report.splitlines()[-1] == line


def test_example_file_metrics_section(config_dir: Path) -> None:
    """The shipped example turns the endpoint on at loopback, nothing else."""
    text = EXAMPLE.read_text(encoding="utf-8")
    text = re.sub(
        r"^# (\[{1,2}[a-z.]+\]{1,2}$|[a-z_]+ = )", r"\1", text, flags=re.MULTILINE
    ).replace("PASTE-OUTPUT-OF-ftps-gateway-hash-password", HASH)
    # The hook examples name a program, a secret and a CA of a real host.
    (config_dir / "hook.secret").write_text("s3cret\n")
    text = (
        text.replace("/etc/ftps-gateway/hook.secret", str(config_dir / "hook.secret"))
        .replace("/etc/ftps-gateway/hooks-ca.pem", str(config_dir / "certs/server.crt"))
        .replace("/usr/local/bin/archive-delivery", sys.executable)
    )
    path = config_dir / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    assert config.load(path).metrics == MetricsSettings(
        ListenAddress("127.0.0.1", 9120)
    )

"""GatewayMetrics: verbs move their series, labels stay inside their vocabularies."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ftps_gateway.metrics.gateway import GatewayMetrics, build_version
from ftps_gateway.metrics.vocabulary import (
    CHANNELS,
    DATA_REFUSALS,
    LOGIN_RESULTS,
    OTHER,
    OTHER_USER,
    SESSION_REFUSALS,
    SESSION_RESULTS,
    TLS_FAILURE_REASONS,
    TRANSFER_DIRECTIONS,
    TRANSFER_RESULTS,
    classify_tls_failure,
)

P = "ftps_gateway_"


def value(m: GatewayMetrics, name: str, **labels: str) -> float | None:
    """One sample's value, or None if the series does not exist."""
    return m.registry.get_sample_value(name, labels)


@pytest.fixture
def m() -> GatewayMetrics:
    """Metrics without the process collector (its values move on their own)."""
    return GatewayMetrics(process_metrics=False)


VERBS: list[object] = [
    pytest.param(
        lambda m: m.session_closed("idle-timeout"),
        f"{P}sessions_total",
        {"result": "idle-timeout"},
        id="session-closed",
    ),
    pytest.param(
        lambda m: m.session_refused("limit-per-ip"),
        f"{P}sessions_refused_total",
        {"reason": "limit-per-ip"},
        id="session-refused",
    ),
    pytest.param(
        lambda m: m.login("not-allowed-from-network"),
        f"{P}logins_total",
        {"result": "not-allowed-from-network"},
        id="login",
    ),
    pytest.param(
        lambda m: m.tls_handshake("data", "TLSv1.3", True),
        f"{P}tls_handshakes_total",
        {"channel": "data", "version": "TLSv1.3", "resumed": "true"},
        id="tls-handshake",
    ),
    pytest.param(
        lambda m: m.tls_handshake("control", "TLSv1.2", False),
        f"{P}tls_handshakes_total",
        {"channel": "control", "version": "TLSv1.2", "resumed": "false"},
        id="tls-handshake-control",
    ),
    pytest.param(
        lambda m: m.tls_failure("control", "no-shared-cipher"),
        f"{P}tls_failures_total",
        {"channel": "control", "reason": "no-shared-cipher"},
        id="tls-failure",
    ),
    pytest.param(
        lambda m: m.data_connection_refused("foreign-ip"),
        f"{P}data_connections_refused_total",
        {"reason": "foreign-ip"},
        id="data-refused",
    ),
    pytest.param(
        lambda m: m.transfer_finished("download", "truncated", 10, 1.0),
        f"{P}transfers_total",
        {"direction": "download", "result": "truncated"},
        id="transfer",
    ),
    pytest.param(
        lambda m: m.config_reloaded("invalid-config"),
        f"{P}config_reloads_total",
        {"result": "invalid-config"},
        id="reload",
    ),
]


@pytest.mark.parametrize(("call", "name", "labels"), VERBS)
def test_verb_moves_its_counter(
    m: GatewayMetrics,
    call: Callable[[GatewayMetrics], None],
    name: str,
    labels: dict[str, str],
) -> None:
    """Each verb adds one to exactly the series its arguments name."""
    assert value(m, name, **labels) == 0
    call(m)
    assert value(m, name, **labels) == 1
    call(m)
    assert value(m, name, **labels) == 2


def test_every_known_series_starts_at_zero(m: GatewayMetrics) -> None:
    """Every vocabulary value (and "other") is exported before its first event."""
    for result in (*SESSION_RESULTS, OTHER):
        assert value(m, f"{P}sessions_total", result=result) == 0
    for reason in (*SESSION_REFUSALS, OTHER):
        assert value(m, f"{P}sessions_refused_total", reason=reason) == 0
    for result in (*LOGIN_RESULTS, OTHER):
        assert value(m, f"{P}logins_total", result=result) == 0
    for reason in (*DATA_REFUSALS, OTHER):
        assert value(m, f"{P}data_connections_refused_total", reason=reason) == 0
    for channel in CHANNELS:
        for reason in (*TLS_FAILURE_REASONS, OTHER):
            labels = {"channel": channel, "reason": reason}
            assert value(m, f"{P}tls_failures_total", **labels) == 0
    for direction in TRANSFER_DIRECTIONS:
        assert value(m, f"{P}transfer_bytes_total", direction=direction) == 0
        for result in (*TRANSFER_RESULTS, OTHER):
            labels = {"direction": direction, "result": result}
            assert value(m, f"{P}transfers_total", **labels) == 0


def test_the_brief_vocabularies_are_all_there() -> None:
    """The reasons the handler was promised exist under these exact names."""
    assert {
        "not-allowed", "banned", "limit-total", "limit-per-ip", "limit-per-user",
        "draining",
    } <= set(SESSION_REFUSALS)  # fmt: skip
    assert {
        "ok", "bad-credentials", "not-allowed-from-network", "banned", "limit"
    } <= set(LOGIN_RESULTS)  # fmt: skip
    assert {
        "not-resumed", "foreign-ip", "prot-c", "passive-range-exhausted", "timeout",
        "tls-handshake-failed", "passive-address",
    } <= set(DATA_REFUSALS)  # fmt: skip
    vocabularies = (
        SESSION_RESULTS, SESSION_REFUSALS, LOGIN_RESULTS, DATA_REFUSALS,
        TLS_FAILURE_REASONS, TRANSFER_DIRECTIONS, TRANSFER_RESULTS,
    )  # fmt: skip
    for vocabulary in vocabularies:
        assert OTHER not in vocabulary
        assert len(set(vocabulary)) == len(vocabulary)


def test_sessions_active_follows_open_and_close(m: GatewayMetrics) -> None:
    """The gauge counts sessions opened and not yet closed."""
    m.session_opened()
    m.session_opened()
    assert value(m, f"{P}sessions_active") == 2
    m.session_closed("ok")
    assert value(m, f"{P}sessions_active") == 1
    assert value(m, f"{P}sessions_total", result="ok") == 1


UNKNOWN: list[object] = [
    pytest.param(lambda m: m.session_closed("weird"), f"{P}sessions_total",
                 {"result": OTHER}, id="session-result"),
    pytest.param(lambda m: m.session_refused("weird"), f"{P}sessions_refused_total",
                 {"reason": OTHER}, id="session-refusal"),
    pytest.param(lambda m: m.login("Bad Credentials"), f"{P}logins_total",
                 {"result": OTHER}, id="login-result"),
    pytest.param(lambda m: m.data_connection_refused("no-connection-within-timeout"),
                 f"{P}data_connections_refused_total", {"reason": OTHER},
                 id="data-refusal"),
    pytest.param(lambda m: m.tls_handshake("data", "TLSv1.1", False),
                 f"{P}tls_handshakes_total",
                 {"channel": "data", "version": OTHER, "resumed": "false"},
                 id="tls-version"),
    pytest.param(lambda m: m.tls_handshake("control", None, False),
                 f"{P}tls_handshakes_total",
                 {"channel": "control", "version": OTHER, "resumed": "false"},
                 id="tls-version-none"),
    pytest.param(lambda m: m.tls_failure("backdoor", "timeout"),
                 f"{P}tls_failures_total", {"channel": OTHER, "reason": "timeout"},
                 id="tls-channel"),
    pytest.param(lambda m: m.transfer_finished("sideways", "ok", 1, 1.0),
                 f"{P}transfers_total", {"direction": OTHER, "result": "ok"},
                 id="transfer-direction"),
    pytest.param(lambda m: m.transfer_finished("upload", "exploded", 1, 1.0),
                 f"{P}transfers_total", {"direction": "upload", "result": OTHER},
                 id="transfer-result"),
    pytest.param(lambda m: m.config_reloaded("maybe"), f"{P}config_reloads_total",
                 {"result": OTHER}, id="reload-result"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "name", "labels"), UNKNOWN)
def test_unknown_values_count_as_other(
    m: GatewayMetrics,
    call: Callable[[GatewayMetrics], None],
    name: str,
    labels: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A value outside the vocabulary is counted as "other", with one warning."""
    with caplog.at_level(logging.WARNING, logger="ftps_gateway"):
        call(m)
        call(m)
    assert value(m, name, **labels) == 2
    warnings = [r for r in caplog.records if "unknown" in r.getMessage()]
    assert len(warnings) == 1


def test_many_unknown_values_mint_no_series(m: GatewayMetrics) -> None:
    """After the first bogus value, thousands more leave the exposition's size alone."""
    # An unknown channel or direction adds one series set, once.
    m.tls_failure("nowhere", "x")
    m.transfer_finished("nowhere", "nothing", 1, 1.0)
    before = _series_count(m)
    for index in range(10_000):
        m.data_connection_refused(f"reason-{index}")
        m.tls_failure(f"channel-{index}", f"some-new-openssl-reason-{index}")
        m.transfer_finished(f"way-{index}", f"result-{index}", 1, 1.0)
    assert _series_count(m) == before
    assert value(m, f"{P}data_connections_refused_total", reason=OTHER) == 10_000


def _series_count(m: GatewayMetrics) -> int:
    return sum(len(family.samples) for family in m.registry.collect())


TLS_REASONS = [
    ("timeout", "timeout"),
    ("tls-handshake: timeout", "timeout"),
    ("eof-during-handshake", "peer-closed"),
    ("peer-disconnected", "peer-closed"),
    ("unexpected-eof-while-reading", "peer-closed"),
    ("wrong-version-number", "not-tls"),
    ("http-request", "not-tls"),
    ("HTTP_REQUEST", "not-tls"),
    ("unsupported-protocol", "protocol-version"),
    ("tlsv1-alert-protocol-version", "protocol-version"),
    ("version-too-low", "protocol-version"),
    ("no-shared-cipher", "no-shared-cipher"),
    ("no-suitable-signature-algorithm", "no-shared-cipher"),
    ("sslv3-alert-certificate-unknown", "certificate-rejected"),
    ("tlsv1-alert-unknown-ca", "certificate-rejected"),
    ("sslv3-alert-bad-certificate", "certificate-rejected"),
    ("SSLError", OTHER),
    ("", OTHER),
]


@pytest.mark.parametrize(("raw", "cause"), TLS_REASONS)
def test_tls_failure_reasons_are_grouped(raw: str, cause: str) -> None:
    """OpenSSL's many reasons fold into a few causes an operator can act on."""
    assert classify_tls_failure(raw) == cause
    assert cause == OTHER or cause in TLS_FAILURE_REASONS


def test_transfer_bytes_and_duration(m: GatewayMetrics) -> None:
    """Bytes count for every transfer; the duration histogram only for completed ones."""
    m.transfer_finished("upload", "ok", 1000, 2.0)
    m.transfer_finished("upload", "truncated", 500, 300.0)
    m.transfer_finished("download", "ok", 7, 0.01)
    assert value(m, f"{P}transfer_bytes_total", direction="upload") == 1500
    assert value(m, f"{P}transfer_bytes_total", direction="download") == 7
    duration = f"{P}transfer_duration_seconds"
    assert value(m, f"{duration}_count", direction="upload") == 1
    assert value(m, f"{duration}_sum", direction="upload") == 2.0
    assert value(m, f"{duration}_bucket", direction="upload", le="2.5") == 1
    assert value(m, f"{duration}_bucket", direction="upload", le="1.0") == 0
    assert value(m, f"{duration}_count", direction="download") == 1


def test_per_user_labels_are_off_by_default(m: GatewayMetrics) -> None:
    """Without the setting, a user name never reaches the exposition."""
    m.transfer_finished("upload", "ok", 10, 1.0, user="acme")
    assert b"acme" not in m.render()[0]
    assert b"user_" not in m.render()[0]


def test_per_user_labels_count_per_user() -> None:
    """With the setting, transfers and bytes are also counted per user."""
    m = GatewayMetrics(per_user_labels=True, process_metrics=False)
    m.transfer_finished("upload", "ok", 10, 1.0, user="acme")
    m.transfer_finished("upload", "aborted", 5, 1.0, user="acme")
    m.transfer_finished("download", "ok", 3, 1.0, user="globex")
    m.transfer_finished("download", "ok", 3, 1.0)  # no user: aggregate only
    transfers = f"{P}user_transfers_total"
    assert value(m, transfers, user="acme", direction="upload", result="ok") == 1
    assert value(m, transfers, user="acme", direction="upload", result="aborted") == 1
    assert (
        value(m, f"{P}user_transfer_bytes_total", user="acme", direction="upload") == 15
    )
    assert (
        value(m, f"{P}user_transfer_bytes_total", user="globex", direction="download")
        == 3
    )
    assert value(m, f"{P}transfers_total", direction="download", result="ok") == 2


def test_per_user_labels_are_capped(caplog: pytest.LogCaptureFixture) -> None:
    """Users beyond the cap share one label value; the first ones keep theirs."""
    m = GatewayMetrics(per_user_labels=True, max_user_labels=2, process_metrics=False)
    with caplog.at_level(logging.WARNING, logger="ftps_gateway"):
        for user in ("u1", "u2", "u3", "u4", "u1", "u3"):
            m.transfer_finished("upload", "ok", 1, 1.0, user=user)
    bytes_name = f"{P}user_transfer_bytes_total"
    assert value(m, bytes_name, user="u1", direction="upload") == 2
    assert value(m, bytes_name, user="u2", direction="upload") == 1
    assert value(m, bytes_name, user=OTHER_USER, direction="upload") == 3
    assert value(m, bytes_name, user="u3", direction="upload") is None
    assert value(m, bytes_name, user="u4", direction="upload") is None
    assert (
        len([r for r in caplog.records if "more than 2 users" in r.getMessage()]) == 1
    )


def test_other_user_cannot_be_a_user_name() -> None:
    """The overflow label cannot collide with a real user (names forbid parentheses)."""
    from ftps_gateway.config.users import _USER_NAME

    assert _USER_NAME.fullmatch(OTHER_USER) is None
    assert _USER_NAME.fullmatch("other") is not None  # why it is not plain "other"


def test_scrape_time_gauges(m: GatewayMetrics) -> None:
    """Passive ports, bans, the login queue and certificate expiry are read from
    their sources."""
    assert value(m, f"{P}passive_ports_in_use") is None  # absent until a source is set
    state = {"in_use": 3, "bans": 0, "waiting": 7}
    m.track_passive_ports(lambda: (state["in_use"], 100))
    m.track_bans(lambda: state["bans"])
    m.track_login_queue(lambda: state["waiting"])
    expiry = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    m.track_certificate_expiry(expiry)
    assert value(m, f"{P}passive_ports_in_use") == 3
    assert value(m, f"{P}passive_ports_free") == 97
    assert value(m, f"{P}bans_active") == 0
    assert value(m, f"{P}login_queue_waiting") == 7
    expiry_name = f"{P}tls_certificate_expiry_timestamp_seconds"
    assert value(m, expiry_name) == expiry.timestamp()
    state.update(in_use=100, bans=4)
    m.track_certificate_expiry(lambda: 1_900_000_000.0)
    assert value(m, f"{P}passive_ports_free") == 0
    assert value(m, f"{P}bans_active") == 4
    assert value(m, expiry_name) == 1_900_000_000.0


def test_failing_source_drops_its_series(
    m: GatewayMetrics, caplog: pytest.LogCaptureFixture
) -> None:
    """A source that raises leaves a gap in that scrape, not a failed scrape."""

    def broken() -> int:
        raise RuntimeError("defender gone")

    m.track_bans(broken)
    m.track_passive_ports(lambda: (1, 10))
    with caplog.at_level(logging.WARNING, logger="ftps_gateway"):
        assert value(m, f"{P}bans_active") is None
        assert value(m, f"{P}passive_ports_in_use") == 1
        m.render()
    assert (
        len([r for r in caplog.records if "reading bans failed" in r.getMessage()]) == 1
    )


def test_config_reload_timestamp(m: GatewayMetrics) -> None:
    """A good reload moves the last-success timestamp; a failed one does not."""
    name = f"{P}config_last_reload_success_timestamp_seconds"
    m._last_reload.set(1.0)
    m.config_reloaded("error")
    assert value(m, name) == 1.0
    m.config_reloaded("ok")
    moved = value(m, name)
    assert moved is not None
    assert moved > 1.0


def test_build_info_names_the_installed_version(m: GatewayMetrics) -> None:
    """build_info carries the distribution's version, from package metadata."""
    version = metadata.version("ftps-gateway")
    assert build_version() == version
    families = {
        f.name: f for f in text_string_to_metric_families(m.render()[0].decode())
    }
    (sample,) = families[f"{P}build_info"].samples
    assert sample.value == 1
    assert sample.labels["version"] == version


def test_own_registry_never_the_global_one() -> None:
    """Two instances count apart, and nothing lands in prometheus-client's default."""
    first = GatewayMetrics(process_metrics=False)
    second = GatewayMetrics(process_metrics=False)
    first.login("ok")
    assert value(first, f"{P}logins_total", result="ok") == 1
    assert value(second, f"{P}logins_total", result="ok") == 0
    global_names = {f.name for f in prometheus_client.REGISTRY.collect()}
    assert not any(name.startswith(P) for name in global_names)


def test_exposition_follows_prometheus_naming(m: GatewayMetrics) -> None:
    """Every family has the prefix; counters end in _total; no _created noise."""
    m.track_passive_ports(lambda: (0, 10))
    m.track_bans(lambda: 0)
    m.track_certificate_expiry(0.0)
    text = m.render()[0].decode()
    assert "_created" not in text
    for family in text_string_to_metric_families(text):
        assert family.name.startswith(P), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        else:
            assert not family.name.endswith("_total"), family.name


def test_process_metrics_are_included_by_default() -> None:
    """The standard process_* series (read from /proc: Linux) come along by default."""
    assert "process_start_time_seconds" in GatewayMetrics().render()[0].decode()


def test_openmetrics_when_asked(m: GatewayMetrics) -> None:
    """A scraper asking for OpenMetrics gets it; others get the text format."""
    _, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    body, content_type = m.render("")
    assert content_type.startswith("text/plain")
    assert body.endswith(b"\n")

"""The monitoring endpoint over real HTTP: /metrics, /healthz, /readyz, and the rest."""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ftps_gateway.errors import StartupError
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.service.health import HealthServer, ReadinessState

pytestmark = pytest.mark.integration


@dataclass
class Endpoint:
    """A running HealthServer and the knobs its tests turn."""

    server: HealthServer
    metrics: GatewayMetrics
    problems: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        host, port = self.server.address
        return f"http://{host}:{port}"

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request; error statuses do not raise."""
        request = urllib.request.Request(self.base + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, dict(error.headers), error.read()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    """A HealthServer on 127.0.0.1, port chosen by the OS; stopped, no thread left."""
    threads_before = set(threading.enumerate())
    metrics = GatewayMetrics()
    problems: list[str] = []
    server = HealthServer(metrics, "127.0.0.1", 0, readiness=lambda: problems)
    server.start()
    yield Endpoint(server, metrics, problems)
    server.stop()
    leaked = [t for t in threading.enumerate() if t not in threads_before]
    assert not [t for t in leaked if t.name == "health-http"], leaked


def _families(body: bytes) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Parsed exposition: family -> {sorted labels -> value} (samples of the family)."""
    parsed: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            parsed.setdefault(sample.name, {})[key] = sample.value
    return parsed


def test_port_zero_binds_a_real_port(endpoint: Endpoint) -> None:
    """With port 0 the address property reports the port the OS gave."""
    host, port = endpoint.server.address
    assert host == "127.0.0.1"
    assert port > 0


def test_metrics_scrape_shows_the_counters(endpoint: Endpoint) -> None:
    """Counters moved by verbs appear in a real scrape, parsed as Prometheus does."""
    m = endpoint.metrics
    m.session_opened()
    m.login("ok")
    m.login("bad-credentials")
    m.login("bad-credentials")
    m.data_connection_refused("not-resumed")
    m.data_connection_refused("made-up")
    m.tls_handshake("data", "TLSv1.3", True)
    m.transfer_finished("upload", "ok", 4096, 0.2)
    m.track_passive_ports(lambda: (2, 100))
    status, headers, body = endpoint.get("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    samples = _families(body)
    assert samples["ftps_gateway_sessions_active"][()] == 1
    logins = samples["ftps_gateway_logins_total"]
    assert logins[(("result", "ok"),)] == 1
    assert logins[(("result", "bad-credentials"),)] == 2
    assert logins[(("result", "banned"),)] == 0
    refused = samples["ftps_gateway_data_connections_refused_total"]
    assert refused[(("reason", "not-resumed"),)] == 1
    assert refused[(("reason", "other"),)] == 1
    handshakes = samples["ftps_gateway_tls_handshakes_total"]
    assert (
        handshakes[(("channel", "data"), ("resumed", "true"), ("version", "TLSv1.3"))]
        == 1
    )
    assert (
        samples["ftps_gateway_transfer_bytes_total"][(("direction", "upload"),)] == 4096
    )
    assert samples["ftps_gateway_passive_ports_free"][()] == 98
    assert "ftps_gateway_build_info" in samples


def test_metrics_scrape_moves_between_scrapes(endpoint: Endpoint) -> None:
    """Each scrape reads the registry afresh."""
    name = "ftps_gateway_sessions_refused_total"
    key = (("reason", "draining"),)
    assert _families(endpoint.get("/metrics")[2])[name][key] == 0
    endpoint.metrics.session_refused("draining")
    assert _families(endpoint.get("/metrics")[2])[name][key] == 1


def test_openmetrics_negotiation(endpoint: Endpoint) -> None:
    """A scraper that asks for OpenMetrics gets it."""
    request = urllib.request.Request(
        endpoint.base + "/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith(
            "application/openmetrics-text"
        )
        assert response.read().endswith(b"# EOF\n")


def test_healthz(endpoint: Endpoint) -> None:
    """/healthz answers 200 "ok" while the process runs, whatever readiness says."""
    endpoint.problems.append("draining")
    status, headers, body = endpoint.get("/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"


def test_readyz_flips_with_the_readiness_callable(endpoint: Endpoint) -> None:
    """/readyz is 200 with no problems, 503 listing each one per line, then 200."""
    assert endpoint.get("/readyz")[:3:2] == (200, b"ready\n")
    endpoint.problems.extend(["draining", "certificate expired\nforged line"])
    status, _, body = endpoint.get("/readyz")
    assert status == 503
    assert body.decode().splitlines() == ["draining", "certificate expired forged line"]
    endpoint.problems.clear()
    assert endpoint.get("/readyz")[0] == 200


def test_readyz_with_readiness_state() -> None:
    """ReadinessState fails at once on drain, and reports each failing check."""
    state = ReadinessState()
    passive_free = {"ports": 5}
    state.add_check(lambda: None if passive_free["ports"] else "no passive port free")
    server = HealthServer(GatewayMetrics(), readiness=state)
    server.start()
    try:
        endpoint = Endpoint(server, server.metrics)
        assert endpoint.get("/readyz")[0] == 200
        passive_free["ports"] = 0
        assert endpoint.get("/readyz")[:3:2] == (503, b"no passive port free\n")
        state.start_draining()
        assert state.draining
        assert endpoint.get("/readyz")[2].decode().splitlines() == [
            "draining",
            "no passive port free",
        ]
    finally:
        server.stop()


def test_readyz_fails_closed_when_the_check_raises(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A readiness callable that raises means not ready (and a logged traceback)."""

    def broken() -> list[str]:
        raise RuntimeError("boom")

    server = HealthServer(GatewayMetrics(), readiness=broken)
    server.start()
    try:
        with caplog.at_level(logging.ERROR, logger="ftps_gateway"):
            status, _, body = Endpoint(server, server.metrics).get("/readyz")
        assert (status, body) == (503, b"readiness check failed\n")
        assert any(r.exc_info for r in caplog.records)
    finally:
        server.stop()


@pytest.mark.parametrize(
    "path", ["/", "/metrics/", "/healthzz", "/favicon.ico", "/../etc"]
)
def test_unknown_paths_are_404(endpoint: Endpoint, path: str) -> None:
    """Only the three paths exist."""
    assert endpoint.get(path)[:3:2] == (404, b"not found\n")


def test_query_string_is_ignored(endpoint: Endpoint) -> None:
    """Scrapers may add parameters; the path alone decides."""
    assert endpoint.get("/healthz?verbose=1")[0] == 200


@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz", "/nope"])
def test_head_sends_headers_only(endpoint: Endpoint, path: str) -> None:
    """HEAD gets the GET's status and Content-Length, and no body."""
    get_status, _, get_body = endpoint.get(path)
    status, headers, body = endpoint.get(path, method="HEAD")
    assert status == get_status
    assert body == b""
    if path != "/metrics":  # process_* values may move between the two requests
        assert int(headers["Content-Length"]) == len(get_body)


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_are_refused(endpoint: Endpoint, method: str) -> None:
    """Read-only: anything but GET and HEAD gets 405 naming the allowed methods."""
    status, headers, _ = endpoint.get("/metrics", method=method)
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_server_header_names_no_version(endpoint: Endpoint) -> None:
    """The Server header says what answers, not which version or Python."""
    _, headers, _ = endpoint.get("/healthz")
    assert headers["Server"] == "ftps-gateway"


def test_keep_alive_serves_several_requests(endpoint: Endpoint) -> None:
    """One connection can scrape repeatedly (HTTP/1.1 keep-alive)."""
    host, port = endpoint.server.address
    connection = http.client.HTTPConnection(host, port, timeout=5)
    try:
        for path in ("/healthz", "/metrics", "/readyz"):
            connection.request("GET", path)
            response = connection.getresponse()
            response.read()
            assert response.status == 200
    finally:
        connection.close()


def test_requests_are_not_logged_at_info(
    endpoint: Endpoint,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A scrape every few seconds writes nothing at info, and nothing to stderr."""
    with caplog.at_level(logging.INFO):
        endpoint.get("/metrics")
        endpoint.get("/nope")
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    assert capfd.readouterr().err == ""


def test_busy_port_is_a_startup_error() -> None:
    """A port already taken fails start() with the config key to look at."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer(GatewayMetrics(), "127.0.0.1", port)
        with pytest.raises(
            StartupError, match=rf"^metrics.listen: cannot listen on 127.0.0.1:{port}: "
        ):
            server.start()
    assert server.address == ("127.0.0.1", port)
    server.stop()  # harmless when never started


def test_ipv6_loopback() -> None:
    """An IPv6 listen address works too."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = HealthServer(GatewayMetrics(), "::1", 0)
    try:
        server.start()
    except StartupError:
        pytest.skip("::1 not configured")
    try:
        host, port = server.address
        assert host == "::1"
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=5) as r:
            assert r.read() == b"ok\n"
    finally:
        server.stop()


def test_stop_closes_the_port(endpoint: Endpoint) -> None:
    """After stop, nothing listens on the address any more; stop twice is fine."""
    host, port = endpoint.server.address
    endpoint.server.stop()
    endpoint.server.stop()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((host, port), timeout=2),
    ):
        pass

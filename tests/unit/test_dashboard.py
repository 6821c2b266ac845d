"""The shipped Grafana dashboard asks only for metrics the server exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from ftps_gateway.metrics.gateway import GatewayMetrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
METRIC = re.compile(r"\bftps_gateway_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _exported() -> set[str]:
    metrics = GatewayMetrics(per_user_labels=True)
    metrics.track_passive_ports(lambda: (1, 10))
    metrics.track_bans(lambda: 0)
    metrics.track_certificate_expiry(2_000_000_000.0)
    body, _ = metrics.render()
    return {
        sample.name
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
    }


def test_every_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exported = _exported()
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried.update(METRIC.findall(target["expr"]))
    queried.update(METRIC.findall(json.dumps(dashboard["templating"])))
    unknown = sorted(name for name in queried if name not in exported)
    assert not unknown, (
        f"dashboard queries metrics the server does not export: {unknown}"
    )
    # And the dashboard covers what issue 5 names: failures by reason, TLS mix,
    # passive pool, certificate expiry, sessions and transfers.
    for needed in (
        "ftps_gateway_data_connections_refused_total",
        "ftps_gateway_sessions_refused_total",
        "ftps_gateway_tls_handshakes_total",
        "ftps_gateway_passive_ports_free",
        "ftps_gateway_tls_certificate_expiry_timestamp_seconds",
        "ftps_gateway_transfers_total",
        "ftps_gateway_sessions_active",
    ):
        assert needed in queried, needed


def test_histogram_series_are_real() -> None:
    exported = _exported()
    assert any(
        name.startswith("ftps_gateway_transfer_duration_seconds")
        and name.endswith(HISTOGRAM_SUFFIXES)
        for name in exported
    )


def test_unique_panel_ids_and_positions() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    positions = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(positions) == len(set(positions))

"""TLS contexts and policies without sockets: the start-up proof and the policy table."""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.config import TLSOverride, TLSSettings, UserSettings
from ftps_gateway.errors import StartupError
from ftps_gateway.policy.netpolicy import DataChannelPolicy, TLSPolicyTable
from ftps_gateway.tls import contexts as tls

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture
def factory(cert_files: tuple[Path, Path, Path]) -> tls.TLSContextFactory:
    chain, key, _ = cert_files
    return tls.TLSContextFactory(TLSSettings(chain, key))


def test_session_binding_holds_on_this_runtime(factory: tls.TLSContextFactory) -> None:
    """The start-up proof passes here (it runs in every GatewayServer too)."""
    tls.prove_session_binding(factory)


def test_session_binding_proof_catches_tickets_on_data_connections(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the seal, data connections would get TLS 1.3 tickets: refuse to start."""
    monkeypatch.setattr(tls, "seal_for_data_connections", lambda _context: None)
    with pytest.raises(StartupError, match="data connection received session tickets"):
        tls.prove_session_binding(factory)


def test_session_binding_proof_catches_shared_contexts(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One context shared by all sessions would let any session resume any other."""
    shared = factory.session_context()
    monkeypatch.setattr(factory, "session_context", lambda _policy=None: shared)
    with pytest.raises(StartupError, match="another session's context resumed"):
        tls.prove_session_binding(factory)


def test_policy_caps_the_version(factory: tls.TLSContextFactory) -> None:
    context = factory.session_context(factory.policy("1.2"))
    assert context.maximum_version == tls.ssl.TLSVersion.TLSv1_2
    tls.set_data_max_version(context, "1.2")
    assert context.maximum_version == tls.ssl.TLSVersion.TLSv1_2


def _settings(**changes: object) -> TLSSettings:
    base = {"certificate": None, "private_key": None}
    return TLSSettings(**{**base, **changes})  # type: ignore[arg-type]


NET = ipaddress.ip_network


def test_policy_table_networks_first_match_wins() -> None:
    table = TLSPolicyTable(
        _settings(
            overrides=(
                TLSOverride((NET("198.51.100.128/25"),), max_version="1.2"),
                TLSOverride((NET("198.51.100.0/24"),), reuse="ip-match"),
            )
        )
    )
    assert table.for_client("203.0.113.1") == DataChannelPolicy("required", "1.3")
    assert table.for_client("198.51.100.200") == DataChannelPolicy(
        "required", "1.2", "tls override #1 (198.51.100.128/25)"
    )
    assert table.for_client("::ffff:198.51.100.1") == DataChannelPolicy(
        "ip-match", "1.3", "tls override #2 (198.51.100.0/24)"
    )
    assert table.for_client("garbage") == DataChannelPolicy("required", "1.3")


def test_policy_table_user_refines_network() -> None:
    network = DataChannelPolicy("ip-match", "1.3", "tls override #1 (x)")
    plain = UserSettings("acme", "h")
    assert TLSPolicyTable.for_user(network, plain) is network
    strict = UserSettings("acme", "h", reuse="required", max_version="1.2")
    assert TLSPolicyTable.for_user(network, strict) == DataChannelPolicy(
        "required", "1.2", "user acme"
    )
    capped = DataChannelPolicy("required", "1.2")
    loose = UserSettings("acme", "h", max_version="1.3")
    assert TLSPolicyTable.for_user(capped, loose).max_version == "1.2"


def test_fresh_tickets_are_proven_on_this_runtime(
    factory: tls.TLSContextFactory,
) -> None:
    """The ctypes path to SSL_new_session_ticket works here and resumes a 2nd time."""
    refresher = tls.TicketRefresher()
    assert refresher.available, refresher.problem
    tls.prove_session_binding(factory, refresher)
    assert refresher.available, refresher.problem


def test_fresh_tickets_only_on_tls13(factory: tls.TLSContextFactory) -> None:
    refresher = tls.TicketRefresher()
    client = tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = tls.ssl.CERT_NONE
    pair = tls._memory_handshake(
        factory.session_context(factory.policy("1.2")), client, None
    )
    assert pair.server.version() == "TLSv1.2"
    assert not refresher.refresh(pair.server)


def test_broken_layout_switches_fresh_tickets_off(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the pointer does not check out, the server runs on without the refresh."""
    refresher = tls.TicketRefresher()
    monkeypatch.setattr(tls, "_SSL_POINTER_OFFSET", 8)  # points at ob_type instead
    tls.prove_session_binding(factory, refresher)
    assert not refresher.available
    assert "did not check out" in refresher.problem

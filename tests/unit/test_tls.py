"""TLS contexts and policies without sockets: the start-up proof and the policy table."""

from __future__ import annotations

import dataclasses
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
    """The start-up proof passes here, in shared mode (it runs in every GatewayServer)."""
    tls.prove_session_binding(factory)
    assert factory.mode == tls.SHARED, factory.mode_problem


def test_per_session_contexts_hold_too(cert_files: tuple[Path, Path, Path]) -> None:
    """The fallback (a context per session, public API only) passes the same proof."""
    chain, key, _ = cert_files
    factory = tls.TLSContextFactory(TLSSettings(chain, key), shared=False)
    tls.prove_session_binding(factory)
    assert factory.mode == tls.PER_SESSION


def test_shared_mode_without_id_context_falls_back(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One context without a per-session id context lets any session resume any other:
    the proof sees it and the factory falls back to a context per session."""
    monkeypatch.setattr(tls.openssl(), "set_id_context", lambda *_args: 1)
    tls.prove_session_binding(factory)
    assert factory.mode == tls.PER_SESSION
    assert "another session's TLS session resumed" in factory.mode_problem


def test_proof_catches_tickets_on_data_connections(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the per-connection setup (no seal, no id context) data connections get
    TLS 1.3 tickets in both modes: refuse to start."""
    monkeypatch.setattr(tls.SessionContext, "_configure", lambda *_a, **_k: None)
    with pytest.raises(StartupError, match="data connection received session tickets"):
        tls.prove_session_binding(factory)


def test_proof_catches_one_context_for_all_sessions(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-session mode on a context shared after all: refuse to start."""
    factory.use_per_session_contexts("test")
    contexts = {p: factory.new_context(p) for p in map(factory.policy, ("1.2", "1.3"))}
    monkeypatch.setattr(factory, "new_context", contexts.__getitem__)
    with pytest.raises(StartupError, match="another session's TLS session resumed"):
        tls.prove_session_binding(factory)


def test_proof_catches_a_missing_master_secret_check(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting any TLS 1.2 resumption would let a refused stranger in next time."""
    monkeypatch.setattr(
        tls.SessionContext,
        "resumed_here",
        lambda _self, data, _control: bool(data.session_reused),
    )
    with pytest.raises(StartupError, match="stranger's session from the data port"):
        tls.prove_session_binding(factory)


def _client() -> tls.ssl.SSLContext:
    client = tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = tls.ssl.CERT_NONE
    return client


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-session"])
def test_tls12_stranger_from_the_data_port_does_not_count_as_resumed(
    cert_files: tuple[Path, Path, Path], shared: bool
) -> None:
    """A stranger's full TLS 1.2 handshake on the data port gives it a session that
    OpenSSL resumes there; the master secret tells it from the partner's."""
    chain, key, _ = cert_files
    factory = tls.TLSContextFactory(TLSSettings(chain, key), shared=shared)
    victim = factory.session_context(factory.policy("1.2"))
    partner = _client()
    control = tls._memory_handshake(victim, partner, None, data=False)
    stranger = _client()
    first = tls._memory_handshake(victim, stranger, None, data=True)
    again = tls._memory_handshake(victim, stranger, first.client.session, data=True)
    assert again.server.session_reused  # OpenSSL alone would call it resumed
    assert not victim.resumed_here(again.server, control.server)
    own = tls._memory_handshake(victim, partner, control.client.session, data=True)
    assert victim.resumed_here(own.server, control.server)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-session"])
def test_user_cap_applies_to_data_connections_only(
    cert_files: tuple[Path, Path, Path], shared: bool
) -> None:
    """A user capped at 1.2: data connections negotiate 1.2, the control keeps 1.3."""
    chain, key, _ = cert_files
    factory = tls.TLSContextFactory(TLSSettings(chain, key), shared=shared)
    session = factory.session_context(factory.policy("1.3"))
    control = tls._memory_handshake(session, _client(), None, data=False)
    session.cap_data_version("1.2")
    assert session.data_max_version == tls.ssl.TLSVersion.TLSv1_2
    data = tls._memory_handshake(session, _client(), None, data=True)
    assert (control.server.version(), data.server.version()) == ("TLSv1.3", "TLSv1.2")
    other = factory.session_context(factory.policy("1.3"))  # another user's session
    tls._memory_handshake(other, _client(), None, data=False)
    assert tls._memory_handshake(
        other, _client(), None, data=True
    ).server.version() == ("TLSv1.3")


def test_shared_contexts_are_reused_and_renewed(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sessions share one context per policy; after an hour new sessions get a new one
    (bounding its ticket keys' life) while running sessions keep theirs."""
    first = factory.session_context()
    assert factory.session_context().context is first.context
    assert factory.session_context(factory.policy("1.2")).context is not first.context
    later = tls.time.monotonic() + tls.SHARED_CONTEXT_SECONDS + 1
    monkeypatch.setattr(tls.time, "monotonic", lambda: later)
    renewed = factory.session_context()
    assert renewed.context is not first.context
    assert factory.session_context().context is renewed.context


def test_control_session_leaves_no_tls12_session_in_the_shared_cache(
    factory: tls.TLSContextFactory,
) -> None:
    """``release`` drops a closed session's TLS 1.2 session from the shared cache."""
    session = factory.session_context(factory.policy("1.2"))
    client = _client()
    client.options |= tls.ssl.OP_NO_TICKET  # resumes from the server's cache
    cache = session.context.session_stats
    before = cache()["number"]
    control = tls._memory_handshake(session, client, None, data=False)
    data = tls._memory_handshake(session, client, control.client.session, data=True)
    assert session.resumed_here(data.server, control.server)
    assert cache()["number"] == before + 1
    session.release(data.server)  # resumed: the control session's, stays
    assert cache()["number"] == before + 1
    session.release(control.server)
    assert cache()["number"] == before


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
    pair = tls._memory_handshake(
        factory.session_context(factory.policy("1.2")), _client(), None, data=False
    )
    assert pair.server.version() == "TLSv1.2"
    assert not refresher.refresh(pair.server)


def test_broken_layout_falls_back_and_switches_fresh_tickets_off(
    factory: tls.TLSContextFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If connection pointers do not check out, the server still starts: a context per
    session, and no fresh tickets."""
    refresher = tls.TicketRefresher()
    monkeypatch.setattr(tls.OpenSSLAccess, "connection_pointer", lambda *_args: None)
    tls.prove_session_binding(factory, refresher)
    assert factory.mode == tls.PER_SESSION
    assert "binding unavailable" in factory.mode_problem
    assert not refresher.available
    assert "did not check out" in refresher.problem


def _tls13_pair(factory: tls.TLSContextFactory) -> tls._MemoryPair:
    client = tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = tls.ssl.CERT_NONE
    return tls._memory_handshake(factory.session_context(), client, None, data=False)


def test_a_pointer_to_another_connection_is_never_used(
    factory: tls.TLSContextFactory,
) -> None:
    """The SSL pointer at the offset must point back (app data) at the very object
    it was read from: with another live connection's SSL there (what a shifted
    layout can produce), no ticket is issued on that other connection."""
    refresher = tls.TicketRefresher()
    assert refresher.available, refresher.problem
    mine, other = _tls13_pair(factory).server, _tls13_pair(factory).server
    slot = tls.ctypes.c_void_p.from_address(
        id(mine._sslobj) + tls._SSL_POINTER_OFFSET  # type: ignore[attr-defined]
    )
    foreign = tls.ctypes.c_void_p.from_address(
        id(other._sslobj) + tls._SSL_POINTER_OFFSET  # type: ignore[attr-defined]
    ).value
    own = slot.value
    slot.value = foreign  # mine's slot now holds other's SSL*
    try:
        issued = refresher.refresh(mine)
    finally:
        slot.value = own
    assert not issued
    assert refresher.refresh(mine)  # its own pointer checks out


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"gil_disabled": True}, "free-threaded"),
        ({"trace_refs": True}, "trace-refs"),
        ({"object_header_bytes": 32}, "object header"),
        ({"implementation": "pypy"}, "not CPython"),
        ({"version": (3, 99)}, "untested Python 3.99"),
    ],
)
def test_builds_with_another_object_layout_turn_the_refresher_off(
    change: dict[str, object], problem: str
) -> None:
    """Free-threaded and trace-refs builds put the SSL pointer elsewhere: off, and
    the reason is what the server's start-up warning shows."""
    build = dataclasses.replace(tls.BuildFacts.current(), **change)  # type: ignore[arg-type]
    refresher = tls.TicketRefresher(build)
    assert not refresher.available
    assert problem in refresher.problem


def test_this_build_is_a_known_layout() -> None:
    """The test interpreter is a regular CPython build: the refresher is on."""
    assert tls.TicketRefresher(tls.BuildFacts.current()).available

"""The channels' TLSSocket, as the rest of the gateway reads it (``ftp.tlschannel``)."""

from __future__ import annotations

import socket
import ssl
import threading
from typing import TYPE_CHECKING

import pytest

from ftps_gateway.config import TLSSettings
from ftps_gateway.ftp.tlschannel import TLSSocket
from ftps_gateway.tls import contexts as tls

if TYPE_CHECKING:
    from pathlib import Path


def _client_context(ca: Path) -> ssl.SSLContext:
    """TLS 1.2 without tickets: it resumes from the server's session cache."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_TICKET
    return context


def _handshake(
    session: tls.SessionContext,
    client_context: ssl.SSLContext,
    client_session: ssl.SSLSession | None,
) -> tuple[TLSSocket, ssl.SSLSocket]:
    """A server TLSSocket and a client SSLSocket over a socket pair."""
    server_raw, client_raw = socket.socketpair()
    client = client_context.wrap_socket(
        client_raw, do_handshake_on_connect=False, session=client_session
    )
    done = threading.Thread(target=client.do_handshake)
    done.start()
    server = TLSSocket.wrap(server_raw, session, data=client_session is not None)
    while True:
        try:
            server.tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = server.outgoing.read()
            if pending:
                socket.socket.sendall(server, pending)
            server.incoming.write(socket.socket.recv(server, 65536))
    socket.socket.sendall(server, server.outgoing.read())
    done.join(10)
    return server, client


def test_release_forgets_a_sessions_tls12_session_through_the_tls_socket(
    cert_files: tuple[Path, Path, Path],
) -> None:
    """``SessionContext.release`` reads the SSL* through a channel's TLSSocket: a
    closed control session's TLS 1.2 session leaves the shared cache, a resumed data
    connection's (the same session) does not."""
    chain, key, ca = cert_files
    factory = tls.TLSContextFactory(TLSSettings(chain, key))
    tls.prove_session_binding(factory)
    session = factory.session_context(factory.policy("1.2"))
    cache = session.context.session_stats
    before = cache()["number"]
    client_context = _client_context(ca)
    control, control_client = _handshake(session, client_context, None)
    data, data_client = _handshake(session, client_context, control_client.session)
    assert data.session_reused
    assert session.resumed_here(data, control)
    assert cache()["number"] == before + 1
    session.release(data)  # resumed: the control session's, stays
    assert cache()["number"] == before + 1
    session.release(control)
    assert cache()["number"] == before
    for sock in (control, control_client, data, data_client):
        sock.close()


def test_plain_io_on_a_tls_socket_is_refused(
    cert_files: tuple[Path, Path, Path],
) -> None:
    """Nothing can write or read around TLS by mistake once it is on."""
    chain, key, _ = cert_files
    factory = tls.TLSContextFactory(TLSSettings(chain, key))
    server_raw, client_raw = socket.socketpair()
    server = TLSSocket.wrap(server_raw, factory.session_context(), data=False)
    with client_raw, server:
        for call in (server.send, server.sendall, server.recv, server.recv_into):
            with pytest.raises(ValueError, match="on a TLS socket"):
                call(b"x")

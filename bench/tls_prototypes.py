"""Reproduce the measurements behind docs/decisions/0001-tls-layer.md.

Run: python bench/tls_prototypes.py   (needs trustme and pyOpenSSL: pip install -e '.[test]')
Prints, for the stdlib ssl module and pyOpenSSL: whether a data connection resumes its own
control session's context (and not another's), how many bytes arrive after the handshake
(session tickets), and the cost of building one server context.
"""

from __future__ import annotations

import os
import socket
import ssl
import statistics
import tempfile
import threading
import time
from pathlib import Path

import trustme
from OpenSSL import SSL


def _peek_after_handshake(sock: ssl.SSLSocket) -> int:
    """Bytes the server sent after the handshake that the client has not read."""
    time.sleep(0.2)
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        return len(raw.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return 0
    finally:
        raw.close()


def stdlib_contexts(pem: Path) -> float:
    """Median microseconds to build a server context with load_cert_chain."""
    times = []
    for _ in range(300):
        start = time.perf_counter()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pem)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def pyopenssl_contexts(pem: Path) -> float:
    """Median microseconds to build a pyOpenSSL context from parsed objects."""
    from OpenSSL import crypto  # noqa: PLC0415

    data = pem.read_bytes()
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, data)
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, data)
    times = []
    for _ in range(300):
        start = time.perf_counter()
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.use_certificate(cert)
        context.use_privatekey(key)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def stdlib_resumption(pem: Path, ca: Path, version: ssl.TLSVersion) -> None:
    """Own context resumes with no tickets; another session's context does not resume."""
    listener = socket.create_server(("127.0.0.1", 0))
    own, other = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(2))
    for context in (own, other):
        context.load_cert_chain(pem)
    results: list[bool] = []

    def serve() -> None:
        conn, _ = listener.accept()
        control = own.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        own.num_tickets = 0  # sealed before the control handshake: control keeps 2
        control.do_handshake()
        control.sendall(b"x")
        for context in (own, other):
            data, _ = listener.accept()
            wrapped = context.wrap_socket(data, server_side=True)
            results.append(wrapped.session_reused)
            time.sleep(0.4)
            wrapped.close()
        control.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = ssl.create_default_context(cafile=str(ca))
    client.maximum_version = version
    control = client.wrap_socket(
        socket.create_connection(listener.getsockname()), server_hostname="localhost"
    )
    control_bytes = _peek_after_handshake(control)
    control.recv(1)
    after = []
    for _ in range(2):
        data = client.wrap_socket(
            socket.create_connection(listener.getsockname()),
            server_hostname="localhost",
            session=control.session,
        )
        after.append(_peek_after_handshake(data))
        data.close()
    thread.join()
    control.close()
    listener.close()
    print(
        f"stdlib {version.name}: control got {control_bytes} B after handshake; "
        f"data on own context resumed={results[0]} ticket bytes={after[0]}; "
        f"on another session's context resumed={results[1]}"
    )


def pyopenssl_tickets(pem: Path, ca: Path) -> None:
    """Bytes after a TLS 1.3 handshake with pyOpenSSL, default and OP_NO_TICKET."""
    for options, name in ((0, "default"), (SSL.OP_NO_TICKET, "OP_NO_TICKET")):
        listener = socket.create_server(("127.0.0.1", 0))

        def serve(opts: int = options, lsock: socket.socket = listener) -> None:
            conn, _ = lsock.accept()
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            context.use_certificate_chain_file(str(pem))
            context.use_privatekey_file(str(pem))
            context.set_options(opts)
            tls = SSL.Connection(context, conn)
            tls.set_accept_state()
            tls.do_handshake()
            time.sleep(0.5)
            tls.close()

        thread = threading.Thread(target=serve)
        thread.start()
        client = ssl.create_default_context(cafile=str(ca))
        sock = client.wrap_socket(
            socket.create_connection(listener.getsockname()),
            server_hostname="localhost",
        )
        print(f"pyOpenSSL {name}: {_peek_after_handshake(sock)} B after handshake")
        sock.close()
        thread.join()
        listener.close()


def main() -> None:
    """Run every prototype and print its figures."""
    directory = Path(tempfile.mkdtemp())
    authority = trustme.CA()
    leaf = authority.issue_cert("localhost", key_type=trustme.KeyType.ECDSA)
    pem, ca = directory / "server.pem", directory / "ca.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(pem))
    authority.cert_pem.write_to_path(str(ca))
    print(f"context build: stdlib {stdlib_contexts(pem):.0f} us, "
          f"pyOpenSSL {pyopenssl_contexts(pem):.0f} us (median of 300)")  # fmt: skip
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        stdlib_resumption(pem, ca, version)
    pyopenssl_tickets(pem, ca)


if __name__ == "__main__":
    main()

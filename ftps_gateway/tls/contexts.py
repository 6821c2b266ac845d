"""TLS contexts on the standard library ``ssl`` module, one per control session.

Why a context per control session (docs/decisions/0001-tls-layer.md has the numbers):

- Resumption is scoped to an ``SSL_CTX``: its session cache (TLS 1.2) and its ticket
  keys (TLS 1.3) are its own. A data connection that resumes on the control session's
  context has, provably, resumed *that* control session, not any session the server
  ever issued. ``SSLSocket.session_reused`` is public API to read the outcome.
- ``SSLContext.num_tickets`` is copied into each connection when it is created. The
  control connection is wrapped first with tickets on (clients need one to resume);
  then the context is switched to zero tickets, so data connections send none. Go TLS
  1.3 clients never read tickets on data connections and reset them, which truncates
  uploads (measured 5 of 5 on pyOpenSSL, which cannot turn tickets off).

The certificate chain and key are read once and snapshotted into an anonymous
in-memory file (``memfd``): every session context loads the same bytes, an operator
replacing the files on disk never exposes a half-written pair to a new session, and
the key never gets a second copy on disk.
"""

from __future__ import annotations

import _ssl
import ctypes
import os
import ssl
import sys
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ftps_gateway.errors import ConfigError, StartupError
from ftps_gateway.tls import certificates as certs

if TYPE_CHECKING:
    from pathlib import Path

    from ftps_gateway.config import TLSSettings

# AEAD-only suites for TLS 1.2 (TLS 1.3 suites are all AEAD). ECDHE for forward secrecy.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

# Tickets the control connection issues (TLS 1.3). Clients resume data connections
# from them; two is OpenSSL's default and covers clients that use each ticket once.
CONTROL_TICKETS = 2


@dataclass(frozen=True)
class TLSPolicy:
    """Protocol bounds for one session."""

    min_version: str = "1.2"
    max_version: str = "1.3"


class _PemSnapshot:
    """Key and chain, read once, in an in-memory file ``load_cert_chain`` can open."""

    def __init__(self, certificate: Path, private_key: Path) -> None:
        self.chain = certificate.read_bytes()
        pem = private_key.read_bytes() + b"\n" + self.chain
        self._fd = -1
        if sys.platform.startswith("linux"):
            self._fd = os.memfd_create("ftps-gateway-tls", os.MFD_CLOEXEC)
            os.write(self._fd, pem)
            self.path = f"/proc/self/fd/{self._fd}"
            self._certificate = self.path
            self._private_key: str | None = None
        else:  # pragma: no cover - the gateway is deployed on Linux
            self._certificate = str(certificate)
            self._private_key = str(private_key)

    def load_into(self, context: ssl.SSLContext) -> None:
        """Load the chain and key into ``context``."""
        context.load_cert_chain(self._certificate, self._private_key)

    def close(self) -> None:
        """Release the in-memory copy."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class TLSContextFactory:
    """Builds a fresh server context per control session from material loaded once."""

    def __init__(self, settings: TLSSettings) -> None:
        problems = certs.certificate_problems(
            settings.certificate, settings.private_key
        )
        if problems:
            raise ConfigError([f"{key}: {problem}" for key, problem in problems])
        self.default_policy = TLSPolicy(settings.min_version, settings.max_version)
        self.min_version = settings.min_version
        self._snapshot = _PemSnapshot(settings.certificate, settings.private_key)
        # From the bytes being served, not a second read of a file that may change.
        self.not_after = certs.leaf_not_after(self._snapshot.chain)
        # The descriptor goes with the factory: after a reload, the old factory lives
        # as long as sessions that have not done AUTH TLS yet still refer to it.
        weakref.finalize(self, self._snapshot.close)
        # Fail at start-up, not at the first client, if OpenSSL refuses the material.
        try:
            self.session_context()
        except ssl.SSLError as err:
            self._snapshot.close()
            raise ConfigError([f"tls.certificate: OpenSSL refused it: {err}"]) from err

    def policy(self, max_version: str) -> TLSPolicy:
        """The bounds for a session capped at ``max_version``."""
        return TLSPolicy(self.min_version, max_version)

    def session_context(self, policy: TLSPolicy | None = None) -> ssl.SSLContext:
        """Return a new context for one control session and its data connections."""
        policy = policy or self.default_policy
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[policy.min_version]
        context.maximum_version = _VERSIONS[policy.max_version]
        context.set_ciphers(TLS12_CIPHERS)
        context.options |= (
            ssl.OP_NO_COMPRESSION  # CRIME
            | ssl.OP_NO_RENEGOTIATION  # client-initiated renegotiation is a DoS lever
            | ssl.OP_CIPHER_SERVER_PREFERENCE
        )
        context.num_tickets = CONTROL_TICKETS
        self._snapshot.load_into(context)
        return context

    def close(self) -> None:
        """Release the in-memory key material."""
        self._snapshot.close()


def seal_for_data_connections(context: ssl.SSLContext) -> None:
    """Turn tickets off for every connection created on ``context`` from now on.

    Called right after the control connection is wrapped: OpenSSL copies the ticket
    count into each ``SSL`` object at creation, so the control connection keeps its
    tickets and every later data connection gets none.
    """
    context.num_tickets = 0


def set_data_max_version(context: ssl.SSLContext, max_version: str) -> None:
    """Cap the TLS version of data connections created on ``context`` from now on.

    Like ``num_tickets``, OpenSSL copies the version bounds into each connection at
    creation, so the control connection keeps what it negotiated.
    """
    context.maximum_version = _VERSIONS[max_version]


# --- fresh tickets on the control connection (TLS 1.3) -------------------------------

# CPython's _ssl object starts with PyObject_HEAD and a weak reference to the socket,
# then the SSL pointer (Modules/_ssl.c, PySSLSocket; unchanged from 3.7 to 3.13).
_SSL_POINTER_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)
_KNOWN_LAYOUTS = ((3, 11), (3, 12), (3, 13))
_TLS13 = 0x0304


class TicketRefresher:
    """Issue one more TLS 1.3 session ticket on a live control connection.

    Why: a TLS 1.3 ticket resumes once (OpenSSL 3 clients drop a session after
    using it), data connections send no tickets (Go clients reset them, truncating
    uploads), so a client that keeps one cached session (curl) could resume only its
    first data connection. After each data connection, the control connection sends
    a fresh ticket with its next reply, which the client reads anyway.

    Python's ``ssl`` has no binding for ``SSL_new_session_ticket``; this calls it
    through ctypes on the SSL pointer inside the ``_ssl`` object. That is private
    layout, so ``prove_session_binding`` checks it with real handshakes at start-up;
    if the check fails the refresher is off and the server says why (a warning), but
    still runs: only some TLS 1.3 clients' later transfers are affected.
    """

    def __init__(self) -> None:
        self.available = False
        self.problem = ""
        self.warned = False
        if sys.version_info[:2] not in _KNOWN_LAYOUTS:
            major, minor = sys.version_info[:2]
            self.problem = f"untested Python {major}.{minor}"
            return
        try:
            library = ctypes.CDLL(_ssl.__file__)
            self._new_ticket = library.SSL_new_session_ticket
            self._version = library.SSL_version
        except (OSError, AttributeError) as err:  # OpenSSL < 1.1.1 or no symbols
            self.problem = f"SSL_new_session_ticket unavailable: {err}"
            return
        for function in (self._new_ticket, self._version):
            function.argtypes = [ctypes.c_void_p]
            function.restype = ctypes.c_int
        self.available = True

    def _pointer(self, connection: ssl.SSLSocket | ssl.SSLObject) -> int | None:
        inner = getattr(connection, "_sslobj", None)
        if inner is None:
            return None
        pointer = ctypes.c_void_p.from_address(id(inner) + _SSL_POINTER_OFFSET).value
        # The layout guard: the pointer must answer for the version negotiated.
        if pointer is None or self._version(pointer) != _TLS13:
            return None
        return pointer

    def refresh(self, connection: ssl.SSLSocket | ssl.SSLObject) -> bool:
        """Queue a new ticket; it leaves with the connection's next write."""
        if not self.available or connection.version() != "TLSv1.3":
            return False
        pointer = self._pointer(connection)
        return pointer is not None and self._new_ticket(pointer) == 1


# --- start-up proof ------------------------------------------------------------------

_HANDSHAKE_ROUNDS = 10


def prove_session_binding(
    factory: TLSContextFactory, refresher: TicketRefresher | None = None
) -> None:
    """Prove with real handshakes in memory that the session binding holds here.

    For each TLS version: a data connection on its control session's context resumes
    (``session_reused``) and receives no session ticket; on another session's
    context the same session does not resume. If a Python or OpenSSL build behaves
    differently, the server refuses to start rather than enforce a policy that would
    refuse every partner or, worse, accept strangers.

    Raises:
        StartupError: naming what did not hold.
    """
    for attribute in ("session_reused", "session"):
        if not hasattr(ssl.SSLSocket, attribute):
            raise StartupError(f"this Python's ssl module lacks SSLSocket.{attribute}")
    if not hasattr(ssl.SSLContext, "num_tickets"):
        raise StartupError("this Python's ssl module lacks SSLContext.num_tickets")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    for version in (v for v in TLS_VERSION_NAMES if v >= factory.min_version):
        context = factory.session_context(factory.policy(version))
        control = _memory_handshake(context, client, None)
        seal_for_data_connections(context)
        problems = _binding_problems(factory, version, context, client, control)
        if problems:
            raise StartupError(
                f"TLS {version} session binding does not hold with "
                f"{ssl.OPENSSL_VERSION}: {'; '.join(problems)}"
            )
        if refresher is not None and version == "1.3" and refresher.available:
            _prove_refresh(context, client, control, refresher)


def _binding_problems(
    factory: TLSContextFactory,
    version: str,
    context: ssl.SSLContext,
    client: ssl.SSLContext,
    control: _MemoryPair,
) -> list[str]:
    session = control.client.session
    data = _memory_handshake(context, client, session)
    stranger = _memory_handshake(
        factory.session_context(factory.policy(version)), client, session
    ).client
    problems = []
    if not data.client.session_reused:
        problems.append("a data connection did not resume its control session")
    if stranger.session_reused:
        problems.append("another session's context resumed the session")
    if version == "1.3" and not control.tail:
        problems.append("the control connection received no session ticket")
    if data.tail:
        problems.append("a data connection received session tickets")
    return problems


TLS_VERSION_NAMES = tuple(_VERSIONS)


@dataclass
class _MemoryPair:
    """Both ends of an in-memory TLS connection, and the server's post-handshake."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    server_out: ssl.MemoryBIO
    client_in: ssl.MemoryBIO
    tail: int  # bytes the server sent after its handshake completed (tickets)


def _prove_refresh(
    context: ssl.SSLContext,
    client: ssl.SSLContext,
    control: _MemoryPair,
    refresher: TicketRefresher,
) -> None:
    """A refreshed ticket lets a second data connection resume; else switch off."""
    if not refresher.refresh(control.server):
        refresher.available = False
        refresher.problem = "the SSL pointer did not check out (layout changed?)"
        return
    control.server.write(b".")
    control.client_in.write(control.server_out.read())
    control.client.read(1)
    data = _memory_handshake(context, client, control.client.session).client
    if not data.session_reused:
        refresher.available = False
        refresher.problem = "a refreshed ticket did not resume"


def _memory_handshake(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    session: ssl.SSLSession | None,
) -> _MemoryPair:
    """Handshake two SSLObjects over memory BIOs.

    Returns the client end and how many bytes the server sent after its handshake
    completed (TLS 1.3 session tickets, or nothing).
    """
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    client = client_context.wrap_bio(client_in, client_out, session=session)
    done = {"client": False, "server": False}
    tail = 0
    for _ in range(_HANDSHAKE_ROUNDS):
        for name, end in (("client", client), ("server", server)):
            if done[name]:
                continue
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                continue
            done[name] = True
            if name == "server":
                tail = server_out.pending
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            break
    else:
        raise StartupError("TLS self-check: the in-memory handshake did not finish")
    # Let the client read what followed the handshake (tickets) into its session.
    server.write(b".")
    client_in.write(server_out.read())
    client.read(1)
    return _MemoryPair(client, server, server_out, client_in, tail)

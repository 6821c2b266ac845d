"""TLS contexts on the standard library ``ssl`` module, and what binds a data
connection to its control session.

The guarantee (docs/decisions/0001 and 0002): a data connection counts as resumed
only if it resumed *this* control session's TLS session; data connections get no
TLS 1.3 session tickets (Go clients never read them and reset, truncating uploads);
a user's maximum TLS version caps its data connections.

How it is kept (docs/decisions/0011 has the measurements):

- **Shared mode** (the default). One ``SSLContext`` per TLS policy, shared by every
  session of the process and renewed hourly, so a session costs no context build
  (``load_cert_chain`` was 0.66 ms and 42% of a session's instructions). Each control
  session gets a random 32-byte *session id context* set on every connection it owns
  (``SSL_set_session_id_context``): OpenSSL resumes a TLS 1.2 or 1.3 session only on
  a connection with the same id context, so another session's tickets and cached
  sessions do not resume. Per data connection, ``SSL_set_num_tickets(0)`` and the
  user's ``SSL_set_max_proto_version``. Python's ``ssl`` binds none of these; they
  are called through ctypes on the ``SSL*`` inside the ``_ssl`` object (private
  layout: checked on every connection against the context's ``SSL_CTX*``, and the
  whole mechanism is proven with real handshakes at start-up).
- **Per-session mode** (the fallback if that proof fails, e.g. on an untested
  Python). A fresh context per control session (its own ticket keys and session
  cache: nothing else can resume there), sealed to zero tickets right after the
  control connection is wrapped (OpenSSL copies the count into each connection at
  creation), the data cap set on the context after login. Public API only.

In both modes a TLS 1.2 data connection counts as resumed only if it carries the
control session's master secret: a refused stranger's *full* handshake on the
victim's data port would otherwise give the stranger a session that resumes there
next time (measured: it did, on ``main`` before this change). TLS 1.3 data
connections carry no tickets, so there is nothing to learn from them.

The certificate chain and key are read once and snapshotted into an anonymous
in-memory file (``memfd``): every context loads the same bytes, an operator replacing
the files on disk never exposes a half-written pair, and the key never gets a second
copy on disk.
"""

from __future__ import annotations

import _ssl
import ctypes
import logging
import os
import secrets
import ssl
import sys
import sysconfig
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ftps_gateway.errors import ConfigError, StartupError
from ftps_gateway.tls import certificates as certs

if TYPE_CHECKING:
    from pathlib import Path

    from ftps_gateway.config import TLSSettings

_log = logging.getLogger(__name__)

# AEAD-only suites for TLS 1.2 (TLS 1.3 suites are all AEAD). ECDHE for forward secrecy.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_WIRE_VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}
_TLS13 = 0x0304
TLS_VERSION_NAMES = tuple(_VERSIONS)

# Tickets the control connection issues (TLS 1.3). Clients resume data connections
# from them; two is OpenSSL's default and covers clients that use each ticket once.
CONTROL_TICKETS = 2

# A shared context (and so its ticket-encryption keys) serves new sessions this long;
# sessions keep the context they started on. Bounds how long one key protects tickets.
SHARED_CONTEXT_SECONDS = 3600.0

# OpenSSL's SSL_MAX_SID_CTX_LENGTH: the id context that scopes resumption.
SESSION_ID_CONTEXT_BYTES = 32
_MASTER_KEY_BYTES = 48  # TLS 1.2 master secret

SHARED = "shared"
PER_SESSION = "per-session"


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


# --- OpenSSL calls Python's ssl module does not bind ---------------------------------

# CPython's _ssl objects (Modules/_ssl.c, unchanged from 3.7 to 3.13): PySSLContext is
# PyObject_HEAD then the SSL_CTX pointer; PySSLSocket is PyObject_HEAD, a weak
# reference to the socket, then the SSL pointer -- on a regular build, where
# PyObject_HEAD is two pointers. Free-threaded (3.13t) and trace-refs builds have a
# larger header, so the pointers are elsewhere there (``BuildFacts``).
_CONTEXT_POINTER_OFFSET = 2 * ctypes.sizeof(ctypes.c_void_p)
_SSL_POINTER_OFFSET = 3 * ctypes.sizeof(ctypes.c_void_p)
_OBJECT_HEADER_BYTES = 2 * ctypes.sizeof(ctypes.c_void_p)
_KNOWN_LAYOUTS = ((3, 11), (3, 12), (3, 13))
# CPython stores the PySSLSocket in its SSL object's app data (SSL_set_app_data, ex
# data index 0) for its callbacks: the back-pointer that proves a pointer is ours.
_APP_DATA_INDEX = 0
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124

Connection = ssl.SSLSocket | ssl.SSLObject


@dataclass(frozen=True)
class BuildFacts:
    """What of the running interpreter decides where the SSL pointers live."""

    implementation: str  # sys.implementation.name
    version: tuple[int, int]
    gil_disabled: bool  # a free-threaded build (Py_GIL_DISABLED)
    trace_refs: bool  # a trace-refs build (Py_TRACE_REFS: two more header pointers)
    object_header_bytes: int  # object.__basicsize__: the size of PyObject_HEAD

    @classmethod
    def current(cls) -> BuildFacts:
        """The running interpreter."""
        major, minor = sys.version_info[:2]
        return cls(
            implementation=sys.implementation.name,
            version=(major, minor),
            gil_disabled=bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
            trace_refs=bool(sysconfig.get_config_var("Py_TRACE_REFS"))
            or hasattr(sys, "getobjects"),
            object_header_bytes=object.__basicsize__,
        )

    def layout_problem(self) -> str:
        """Why the fixed offsets cannot be trusted on this build, or ""."""
        if self.implementation != "cpython":
            return f"not CPython ({self.implementation})"
        if self.version not in _KNOWN_LAYOUTS:
            return f"untested Python {self.version[0]}.{self.version[1]}"
        if self.gil_disabled:
            return "a free-threaded CPython build (larger object header)"
        if self.trace_refs:
            return "a trace-refs CPython build (larger object header)"
        if self.object_header_bytes != _OBJECT_HEADER_BYTES:
            return f"an unexpected object header ({self.object_header_bytes} bytes)"
        return ""


class OpenSSLAccess:
    """ctypes bindings to the ``SSL*`` and ``SSL_CTX*`` behind Python's ssl objects.

    Every pointer is checked before use: a context pointer must answer for the
    context's ticket count and options, a connection pointer must belong to that
    context and point back (its app data) at the very ``_ssl`` object it was read
    from. ``available`` is False (with ``problem``) on a build whose object layout
    differs (``BuildFacts``: free-threaded, trace-refs, untested versions) or an
    OpenSSL without the symbols; callers then use public API only.
    """

    def __init__(self, build: BuildFacts | None = None) -> None:
        self.available = False
        self.problem = (build or BuildFacts.current()).layout_problem()
        if self.problem:
            return
        try:
            library = ctypes.CDLL(_ssl.__file__)
            self._bind(library)
        except (OSError, AttributeError) as err:  # OpenSSL < 1.1.1 or no symbols
            self.problem = f"OpenSSL symbols unavailable: {err}"
            return
        self.available = True

    def _bind(self, library: ctypes.CDLL) -> None:
        pointer, size, integer = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int

        def bind(name: str, restype: object, *argtypes: object) -> Any:
            function = getattr(library, name)
            function.restype = restype
            function.argtypes = list(argtypes)
            return function

        self.ctx_get_num_tickets = bind("SSL_CTX_get_num_tickets", size, pointer)
        self.ctx_get_options = bind("SSL_CTX_get_options", ctypes.c_uint64, pointer)
        self.ctx_remove_session = bind(
            "SSL_CTX_remove_session", integer, pointer, pointer
        )
        self.get_ssl_ctx = bind("SSL_get_SSL_CTX", pointer, pointer)
        self.set_id_context = bind(
            "SSL_set_session_id_context",
            integer,
            pointer,
            ctypes.c_char_p,
            ctypes.c_uint,
        )
        self.set_num_tickets = bind("SSL_set_num_tickets", integer, pointer, size)
        self.get_num_tickets = bind("SSL_get_num_tickets", size, pointer)
        self.ctrl = bind(
            "SSL_ctrl", ctypes.c_long, pointer, integer, ctypes.c_long, pointer
        )
        self.version = bind("SSL_version", integer, pointer)
        self.app_data = bind("SSL_get_ex_data", pointer, pointer, integer)
        self.session_reused = bind("SSL_session_reused", integer, pointer)
        self.get_session = bind("SSL_get_session", pointer, pointer)
        self.master_key = bind(
            "SSL_SESSION_get_master_key", size, pointer, ctypes.c_void_p, size
        )
        self.new_session_ticket = bind("SSL_new_session_ticket", integer, pointer)
        self.memcmp = bind("CRYPTO_memcmp", integer, pointer, pointer, size)
        self.cleanse = bind("OPENSSL_cleanse", None, pointer, size)

    def context_pointer(self, context: ssl.SSLContext) -> int | None:
        """The ``SSL_CTX*`` of ``context``, if it checks out."""
        if not self.available:
            return None
        pointer = ctypes.c_void_p.from_address(
            id(context) + _CONTEXT_POINTER_OFFSET
        ).value
        if (
            pointer is None
            or self.ctx_get_num_tickets(pointer) != context.num_tickets
            or self.ctx_get_options(pointer) != int(context.options)
        ):
            return None
        return pointer

    def connection_pointer(
        self, connection: Connection, context: int | None
    ) -> int | None:
        """The ``SSL*`` of ``connection``, if it belongs to the context ``context``."""
        inner = getattr(connection, "_sslobj", None)
        if not self.available or inner is None or context is None:
            return None
        pointer = ctypes.c_void_p.from_address(id(inner) + _SSL_POINTER_OFFSET).value
        # The context first: a plain field read, where the app data lookup follows
        # a pointer inside the SSL; a pointer that fails it is never followed.
        if pointer is None or self.get_ssl_ctx(pointer) != context:
            return None
        # The back-pointer: this SSL belongs to this very Python object, not to
        # another connection (of the same context) whose pointer a shifted layout
        # put at the offset.
        if self.app_data(pointer, _APP_DATA_INDEX) != id(inner):
            return None
        return pointer

    def same_master_key(self, first: int, second: int) -> bool | None:
        """Do two connections' sessions share one master secret (None: unknown)?"""
        sessions = [self.get_session(first), self.get_session(second)]
        if None in sessions:
            return None
        keys = [ctypes.create_string_buffer(_MASTER_KEY_BYTES) for _ in sessions]
        try:
            lengths = [
                self.master_key(session, key, _MASTER_KEY_BYTES)
                for session, key in zip(sessions, keys, strict=True)
            ]
            if 0 in lengths or lengths[0] != lengths[1]:
                return None
            return bool(self.memcmp(keys[0], keys[1], lengths[0]) == 0)
        finally:
            for key in keys:  # the secrets leave no copy in Python's heap
                self.cleanse(key, _MASTER_KEY_BYTES)


_ACCESS: OpenSSLAccess | None = None


def openssl() -> OpenSSLAccess:
    """The process's one ``OpenSSLAccess`` (symbols are looked up once)."""
    global _ACCESS  # noqa: PLW0603 - a process-wide cache of ctypes bindings
    if _ACCESS is None:
        _ACCESS = OpenSSLAccess()
    return _ACCESS


# --- one control session's TLS -------------------------------------------------------


class SessionContext:
    """The TLS of one control session: the context its connections are wrapped on.

    ``wrap_socket``/``wrap_bio`` configure each new connection for its role (the
    control connection first, then data connections); ``resumed_here`` is the TLS
    rule of the binding; ``release`` drops a connection's TLS 1.2 session from a
    shared context's cache once nothing can legitimately resume it.
    """

    def __init__(
        self,
        context: ssl.SSLContext,
        context_pointer: int | None,
        access: OpenSSLAccess | None,
    ) -> None:
        self.context = context
        self._context_pointer = context_pointer  # set in shared mode only
        self._access = access
        self._id = secrets.token_bytes(SESSION_ID_CONTEXT_BYTES)
        self._data_max_version: str | None = None
        self._unproven_tls12 = False  # per-session mode without master-key access

    @property
    def shared(self) -> bool:
        """A shared context, bound per connection (shared mode)."""
        return self._context_pointer is not None

    def wrap_socket(self, sock: object, *, data: bool) -> ssl.SSLSocket:
        """Wrap an accepted socket for a server-side handshake (not started yet)."""
        connection = self.context.wrap_socket(
            sock,  # type: ignore[arg-type]
            server_side=True,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,
        )
        try:
            self._configure(connection, data=data)
        except ssl.SSLError:
            connection.close()
            raise
        return connection

    def wrap_bio(
        self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, *, data: bool
    ) -> ssl.SSLObject:
        """The same over memory BIOs (the channels, ``ftp.tlschannel``; the
        start-up proof)."""
        connection = self.context.wrap_bio(incoming, outgoing, server_side=True)
        self._configure(connection, data=data)
        return connection

    def _configure(self, connection: Connection, *, data: bool) -> None:
        if not self.shared:
            if not data:
                # OpenSSL copied the ticket count into the control connection; every
                # later connection on this context (the data connections) gets none.
                self.context.num_tickets = 0
            return
        access = self._access
        assert access is not None  # noqa: S101 - shared mode has it by construction
        pointer = access.connection_pointer(connection, self._context_pointer)
        if (
            pointer is None
            or access.set_id_context(pointer, self._id, len(self._id)) != 1
        ):
            raise ssl.SSLError("TLS session binding unavailable on this connection")
        if not data:
            return
        if access.set_num_tickets(pointer, 0) != 1:
            raise ssl.SSLError("cannot turn tickets off on the data connection")
        if self._data_max_version is not None:  # a user's cap, below the policy's
            cap = _WIRE_VERSIONS[self._data_max_version]
            if access.ctrl(pointer, _SSL_CTRL_SET_MAX_PROTO_VERSION, cap, None) != 1:
                raise ssl.SSLError("cannot cap the data connection's TLS version")

    def cap_data_version(self, max_version: str) -> None:
        """Cap the TLS version of this session's data connections from now on.

        The control connection keeps what it negotiated (OpenSSL copies version
        bounds into each connection at creation).
        """
        if self.shared:
            self._data_max_version = max_version
        else:
            self.context.maximum_version = _VERSIONS[max_version]

    @property
    def data_max_version(self) -> ssl.TLSVersion:
        """The highest TLS version a data connection of this session may negotiate."""
        if self._data_max_version is not None:
            return _VERSIONS[self._data_max_version]
        return self.context.maximum_version

    def resumed_here(self, data: Connection, control: Connection) -> bool:
        """Did ``data`` resume ``control``'s TLS session (the binding's TLS rule)?

        TLS 1.3: resumed on this session's id context (or context) at all, since
        only the control connection issues tickets. TLS 1.2: also the same master
        secret, since a TLS 1.2 full handshake on a data connection (a stranger's,
        refused) leaves the stranger a session that would resume here.
        """
        reused = bool(data.session_reused)
        if data.version() != "TLSv1.2":
            return reused
        access = self._access
        pointers: tuple[int | None, int | None] = (None, None)
        if access is not None and access.available:
            context = self._context_pointer or access.context_pointer(self.context)
            pointers = (
                access.connection_pointer(data, context),
                access.connection_pointer(control, context),
            )
        if access is not None and pointers[0] is not None and pointers[1] is not None:
            return reused and access.same_master_key(pointers[0], pointers[1]) is True
        # No way to read the secrets (per-session mode on an untested Python): once a
        # TLS 1.2 data connection did a full handshake here, no later TLS 1.2
        # resumption can be told from the stranger's. Fail closed.
        if not reused:
            self._unproven_tls12 = True
            return False
        return not self._unproven_tls12

    def release(self, connection: object) -> None:
        """Forget ``connection``'s TLS 1.2 session in the shared cache (if it made one).

        Called when the control session closes, and after a data connection that did
        not resume: a shared context's session cache would otherwise keep it for
        OpenSSL's session timeout (2 hours). A resumed data connection's session is
        the control session's and stays.
        """
        access = self._access
        if not self.shared or access is None:
            return
        # Any connection object with CPython's ``_ssl`` object inside: an SSLSocket,
        # an SSLObject, or the channels' socket with its SSLObject (ftp.tlschannel).
        if getattr(connection, "_sslobj", None) is None:
            return
        pointer = access.connection_pointer(
            connection,  # type: ignore[arg-type]
            self._context_pointer,
        )
        if pointer is None or access.session_reused(pointer):
            return
        session = access.get_session(pointer)
        if session is not None:
            access.ctx_remove_session(self._context_pointer, session)


# --- the factory ---------------------------------------------------------------------


@dataclass
class _SharedEntry:
    context: ssl.SSLContext
    pointer: int
    born: float


class TLSContextFactory:
    """Hands each control session its ``SessionContext`` from material loaded once."""

    def __init__(self, settings: TLSSettings, *, shared: bool = True) -> None:
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
        self._access = openssl()
        self.mode = SHARED if shared and self._access.available else PER_SESSION
        self.mode_problem = "" if self.mode == SHARED else self._access.problem
        self._shared: dict[TLSPolicy, _SharedEntry] = {}
        # Fail at start-up, not at the first client, if OpenSSL refuses the material.
        try:
            self.session_context()
        except ssl.SSLError as err:
            self._snapshot.close()
            raise ConfigError([f"tls.certificate: OpenSSL refused it: {err}"]) from err

    def policy(self, max_version: str) -> TLSPolicy:
        """The bounds for a session capped at ``max_version``."""
        return TLSPolicy(self.min_version, max_version)

    def session_context(self, policy: TLSPolicy | None = None) -> SessionContext:
        """The TLS of a new control session (and of its data connections)."""
        policy = policy or self.default_policy
        if self.mode == PER_SESSION:
            return SessionContext(self.new_context(policy), None, self._access)
        entry = self._shared.get(policy)
        now = time.monotonic()
        if entry is None or now - entry.born > SHARED_CONTEXT_SECONDS:
            context = self.new_context(policy)
            pointer = self._access.context_pointer(context)
            if pointer is None:  # the layout check failed: never share unbound
                self.use_per_session_contexts("the SSL_CTX pointer did not check out")
                return SessionContext(context, None, self._access)
            entry = self._shared[policy] = _SharedEntry(context, pointer, now)
        return SessionContext(entry.context, entry.pointer, self._access)

    def use_per_session_contexts(self, problem: str) -> None:
        """Fall back to a fresh context per session (public API only)."""
        self.mode = PER_SESSION
        self.mode_problem = problem
        self._shared.clear()

    def new_context(self, policy: TLSPolicy) -> ssl.SSLContext:
        """A server context with the material loaded (0.66 ms: once per policy and hour
        in shared mode, once per session in per-session mode)."""
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


# --- fresh tickets on the control connection (TLS 1.3) -------------------------------


class TicketRefresher:
    """Issue one more TLS 1.3 session ticket on a live control connection.

    Why: a TLS 1.3 ticket resumes once (OpenSSL 3 clients drop a session after
    using it), data connections send no tickets (Go clients reset them, truncating
    uploads), so a client that keeps one cached session (curl) could resume only its
    first data connection. After each data connection, the control connection sends
    a fresh ticket with its next reply, which the client reads anyway.

    Python's ``ssl`` has no binding for ``SSL_new_session_ticket``; this calls it
    through ``OpenSSLAccess`` (private layout), so ``prove_session_binding`` checks it
    with real handshakes at start-up; if the check fails the refresher is off and
    the server says why (a warning), but still runs: only some TLS 1.3 clients'
    later transfers are affected.
    """

    def __init__(self, build: BuildFacts | None = None) -> None:
        self._access = openssl() if build is None else OpenSSLAccess(build)
        self.available = self._access.available
        self.problem = self._access.problem
        self.warned = False

    def _pointer(self, connection: Connection) -> int | None:
        access = self._access
        pointer = access.connection_pointer(
            connection, access.context_pointer(connection.context)
        )
        # The pointer must also answer for the version negotiated.
        if pointer is None or access.version(pointer) != _TLS13:
            return None
        return pointer

    def refresh(self, connection: Connection) -> bool:
        """Queue a new ticket; it leaves with the connection's next write."""
        if not self.available or connection.version() != "TLSv1.3":
            return False
        pointer = self._pointer(connection)
        return pointer is not None and self._access.new_session_ticket(pointer) == 1


# --- start-up proof ------------------------------------------------------------------

_HANDSHAKE_ROUNDS = 10


def prove_session_binding(
    factory: TLSContextFactory, refresher: TicketRefresher | None = None
) -> None:
    """Prove with real handshakes in memory that the session binding holds here.

    For each TLS version, on the factory's own ``SessionContext``s: a data
    connection resumes its control session and receives no session ticket; another
    session's TLS session does not count as resumed, nor does a session a stranger
    got from a full handshake on this session's data port; a user's cap holds on a
    data connection. If shared mode fails any of it, the factory falls back to a
    context per session (and says why); if that fails too, the server refuses to
    start rather than enforce a policy that would refuse every partner or, worse,
    accept strangers.

    Raises:
        StartupError: naming what did not hold.
    """
    for attribute in ("session_reused", "session"):
        if not hasattr(ssl.SSLSocket, attribute):
            raise StartupError(f"this Python's ssl module lacks SSLSocket.{attribute}")
    if not hasattr(ssl.SSLContext, "num_tickets"):
        raise StartupError("this Python's ssl module lacks SSLContext.num_tickets")
    if factory.mode == SHARED:
        problems = _binding_problems(factory)
        if problems:
            factory.use_per_session_contexts("; ".join(problems))
    if factory.mode == PER_SESSION:
        problems = _binding_problems(factory)
        if problems:
            raise StartupError(
                f"TLS session binding does not hold with {ssl.OPENSSL_VERSION}: "
                f"{'; '.join(problems)}"
            )
        if factory.mode_problem:
            _log.warning(
                "TLS: a context per session (%s): about 0.7 ms more CPU per session",
                factory.mode_problem,
            )
    if refresher is not None and refresher.available and "1.3" in _versions(factory):
        _prove_refresh(factory, refresher)


def _versions(factory: TLSContextFactory) -> list[str]:
    return [v for v in TLS_VERSION_NAMES if v >= factory.min_version]


def _client(*, tickets: bool = True) -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    if not tickets:  # TLS 1.2 resumption by session id: the server's session cache
        client.options |= ssl.OP_NO_TICKET
    return client


def _binding_problems(factory: TLSContextFactory) -> list[str]:
    problems: list[str] = []
    for version in _versions(factory):
        # TLS 1.2 clients resume from tickets or, without ticket support (older Java
        # among them), from the server's session cache: both paths are proven.
        for tickets in (True, False) if version == "1.2" else (True,):
            try:
                found = _version_problems(factory, version, tickets=tickets)
            except (ssl.SSLError, StartupError) as err:
                found = [f"a handshake failed: {err}"]
            how = "" if tickets else " (session cache)"
            problems.extend(f"TLS {version}{how}: {problem}" for problem in found)
    return problems


def _version_problems(
    factory: TLSContextFactory, version: str, *, tickets: bool
) -> list[str]:
    def client() -> ssl.SSLContext:
        return _client(tickets=tickets)

    policy = factory.policy(version)
    victim, partner = factory.session_context(policy), client()
    control = _memory_handshake(victim, partner, None, data=False)
    data = _memory_handshake(victim, partner, control.client.session, data=True)
    problems = []
    if control.server.version() != f"TLSv{version}":
        problems.append(f"the control connection negotiated {control.server.version()}")
    if not victim.resumed_here(data.server, control.server):
        problems.append("a data connection did not resume its control session")
    if version == "1.3" and not control.tail:
        problems.append("the control connection received no session ticket")
    if data.tail:
        problems.append("a data connection received session tickets")
    # Another session's TLS session, offered on this session's data port.
    # (Every pair stays referenced: OpenSSL drops a session from its cache when a
    # connection is freed without close_notify, which would hide a shared cache.)
    other, other_client = factory.session_context(policy), client()
    theirs = _memory_handshake(other, other_client, None, data=False)
    offered = _memory_handshake(victim, other_client, theirs.client.session, data=True)
    if offered.client.session_reused or victim.resumed_here(
        offered.server, control.server
    ):
        problems.append("another session's TLS session resumed")
    # A stranger's full handshake on the data port, then its session offered there.
    stranger = client()
    first = _memory_handshake(victim, stranger, None, data=True)
    again = _memory_handshake(victim, stranger, first.client.session, data=True)
    if victim.resumed_here(again.server, control.server):
        problems.append("a stranger's session from the data port counted as resumed")
    if version == "1.3" and "1.2" in _versions(factory):
        capped = factory.session_context(policy)
        _memory_handshake(capped, _client(), None, data=False)
        capped.cap_data_version("1.2")
        if _memory_handshake(capped, _client(), None, data=True).server.version() != (
            "TLSv1.2"
        ):
            problems.append("a data connection ignored the user's version cap")
    return problems


@dataclass
class _MemoryPair:
    """Both ends of an in-memory TLS connection, and the server's post-handshake."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    server_out: ssl.MemoryBIO
    client_in: ssl.MemoryBIO
    tail: int  # bytes the server sent after its handshake completed (tickets)


def _prove_refresh(factory: TLSContextFactory, refresher: TicketRefresher) -> None:
    """A refreshed ticket leaves with the next write and resumes; else switch off."""
    session, client = factory.session_context(factory.policy("1.3")), _client()
    control = _memory_handshake(session, client, None, data=False)
    plain = _write_one_byte(control)
    if not refresher.refresh(control.server):
        refresher.available = False
        refresher.problem = "the SSL pointer did not check out (layout changed?)"
        return
    if _write_one_byte(control) <= plain:
        refresher.available = False
        refresher.problem = "no ticket left with the next write"
        return
    data = _memory_handshake(session, client, control.client.session, data=True)
    if not session.resumed_here(data.server, control.server):
        refresher.available = False
        refresher.problem = "a refreshed ticket did not resume"


def _write_one_byte(pair: _MemoryPair) -> int:
    """Server writes one byte, the client reads it; the bytes that went over."""
    pair.server.write(b".")
    sent = pair.server_out.read()
    pair.client_in.write(sent)
    pair.client.read(1)
    return len(sent)


def _memory_handshake(
    server_context: SessionContext,
    client_context: ssl.SSLContext,
    session: ssl.SSLSession | None,
    *,
    data: bool,
) -> _MemoryPair:
    """Handshake two SSLObjects over memory BIOs.

    Returns both ends and how many bytes the server sent after its handshake
    completed (TLS 1.3 session tickets, or nothing).
    """
    server_in, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_in, client_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(server_in, server_out, data=data)
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

"""The partner's step-by-step FTPS connectivity diagnosis (``ftps-gateway self-test``).

The usual FTPS ticket says "425 can't open data connection" and nothing else. This
runs, from the partner's own network, every step a real client takes, stops at the
first blocking failure, and says for each failure what happened and what to do, in
words a firewall team can act on. It embeds what the server sees (``SITE DIAG``), so
one paste holds both sides' view.

The steps and their exit codes are listed in ``selftest.report``. The client side is
the standard library only (``socket``, ``ssl``, ``ftplib`` for reply parsing), so it
behaves like any other OpenSSL-based client would. Every data connection offers the
control connection's TLS session (as curl, lftp and ``client.ReusingFTP_TLS`` do);
one extra probe deliberately does not, to tell the partner whether a library that
cannot resume (stock ``ftplib``, several Go, .NET and Java libraries) is accepted.

No traffic goes anywhere but the host in the URL: a 227 address that differs from
the address connected to is reported, never contacted.
"""

from __future__ import annotations

import ftplib
import hashlib
import ipaddress
import secrets
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from ftps_gateway.selftest.report import Report, Status, Step

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

DEFAULT_TIMEOUT = 10.0
DEFAULT_REPEAT = 5
EXPIRY_WARNING_DAYS = 30
PROBE_SIZE = 64 * 1024
SCAN_WORKERS = 32
NOT_RESUMED_MARK = "not resumed"
MIN_SECRET_LENGTH = 3  # shorter strings would redact ordinary words

# OpenSSL verify codes (x509_vfy.h) -> our reason words.
_VERIFY_REASONS = {
    9: "certificate-not-yet-valid",
    10: "certificate-expired",
    18: "certificate-untrusted",  # self-signed leaf
    19: "certificate-untrusted",  # self-signed CA in the chain, not trusted
    20: "certificate-untrusted",  # issuer unknown
    21: "certificate-untrusted",  # cannot verify the leaf's signature
    62: "hostname-mismatch",
    64: "hostname-mismatch",  # IP address mismatch
}


# --- the target


@dataclass(frozen=True)
class Target:
    """What to test, parsed from ``ftps://user@host[:port]/[path]``."""

    host: str
    port: int
    user: str
    path: str  # "" or ending in "/": a directory; else the probe file's name
    implicit: bool

    def url(self) -> str:
        """The URL again, normalized, without any secret (for the report)."""
        scheme = "ftpsi" if self.implicit else "ftps"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{self.user}@{host}:{self.port}/{self.path.lstrip('/')}"


def parse_target(url: str, *, implicit: bool = False) -> Target:
    """Parse the self-test URL; ``ValueError`` says what is wrong (never the secret).

    ``ftps://`` is explicit TLS (port 21 by default), ``ftpsi://`` implicit TLS (port
    990 by default). A password in the URL is refused: command lines end up in shell
    histories, process lists and tickets.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ftps", "ftpsi"):
        raise ValueError("the URL must start with ftps:// (or ftpsi:// for implicit)")
    implicit = implicit or scheme == "ftpsi"
    if parts.password is not None:
        raise ValueError(
            "the URL holds a password; remove it and use a prompt, "
            "--password-file or the FTPS_PASSWORD environment variable"
        )
    if not parts.username:
        raise ValueError("the URL needs a user name: ftps://USER@HOST/")
    if not parts.hostname:
        raise ValueError("the URL needs a host: ftps://USER@HOST/")
    try:
        port = parts.port
    except ValueError as err:
        raise ValueError(f"bad port in the URL: {err}") from None
    if parts.query or parts.fragment:
        raise ValueError("the URL takes no ?query or #fragment")
    return Target(
        host=parts.hostname,
        port=port or (990 if implicit else 21),
        user=unquote(parts.username),
        path=unquote(parts.path),
        implicit=implicit,
    )


@dataclass(frozen=True)
class Options:
    """How to run the self-test (the command line's options)."""

    cafile: str | None = None
    pin: str | None = None  # "sha256:HEX" of the server certificate (DER)
    server_name: str | None = None  # name checked against the certificate
    timeout: float = DEFAULT_TIMEOUT
    read_only: bool = False
    repeat: int = DEFAULT_REPEAT
    scan_passive: int = 0


def parse_pin(text: str) -> str:
    """``sha256:AB:CD...`` or ``sha256:abcd...`` -> 64 lower-case hex digits."""
    algorithm, _, value = text.partition(":")
    digits = value.replace(":", "").strip().lower()
    if algorithm.lower() != "sha256" or len(digits) != 64:  # noqa: PLR2004 - SHA-256
        raise ValueError("--pin must be sha256: and 64 hex digits (colons allowed)")
    try:
        bytes.fromhex(digits)
    except ValueError:
        raise ValueError("--pin must be sha256: and 64 hex digits") from None
    return digits


def fingerprint(der: bytes) -> str:
    """The certificate's SHA-256 fingerprint as ``sha256:AB:CD:...``."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


# --- passive addresses


@dataclass(frozen=True)
class PassiveVerdict:
    """What a 227 address means, compared with the address connected to."""

    kind: str  # "same", "private", "different", "unspecified"
    explanation: str

    @property
    def ok(self) -> bool:
        """True if a client that trusts the 227 address reaches the right host."""
        return self.kind == "same"


# Addresses that only make sense inside a site. Listed, not ``is_private``: Python
# counts the documentation ranges (TEST-NET) as private, and they are used as
# public examples.
_INTERNAL_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
        "127.0.0.0/8", "169.254.0.0/16", "fc00::/7", "fe80::/10", "::1/128",
    )
)  # fmt: skip


def _is_internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return any(address in network for network in _INTERNAL_NETWORKS)


def classify_passive_address(advertised: str, connected: str) -> PassiveVerdict:
    """Compare the 227 reply's address with the control connection's peer address.

    A server behind NAT that advertises its own inside address sends every client
    that trusts the 227 reply (most GUI clients in PASV mode) to an address they
    cannot reach; TLS hides the reply from the NAT helpers that used to fix it.
    """
    adv = ipaddress.ip_address(advertised)
    conn = ipaddress.ip_address(connected)
    if conn.version == 6 and conn.ipv4_mapped is not None:  # noqa: PLR2004
        conn = conn.ipv4_mapped
    if adv == conn:
        return PassiveVerdict("same", f"advertises {adv}, the address connected to")
    if adv.is_unspecified:
        return PassiveVerdict(
            "unspecified",
            f"advertises {adv}, which is no address at all: the server's passive "
            "(masquerade) address setting is wrong",
        )
    if _is_internal(adv) and not _is_internal(conn):
        return PassiveVerdict(
            "private",
            f"advertises the private address {adv}, but you connected to {conn}: "
            "the server is behind NAT and announces its inside address (its "
            "NAT/masquerade address setting is missing or wrong)",
        )
    return PassiveVerdict(
        "different",
        f"advertises {adv}, but you connected to {conn}: the server's "
        "NAT/masquerade address setting does not match the address partners use",
    )


def port_ranges(ports: Iterable[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``"1-3, 7"``."""
    ordered = sorted(set(ports))
    runs: list[str] = []
    start = previous = None
    for port in [*ordered, None]:
        if port is not None and previous is not None and port == previous + 1:
            previous = port
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = port
    return ", ".join(runs)


def sample_ports(low: int, high: int, count: int) -> list[int]:
    """``count`` ports spread evenly over ``low..high``, both ends included."""
    span = high - low + 1
    if count >= span:
        return list(range(low, high + 1))
    if count <= 1:
        return [low]
    return sorted({low + round(i * (span - 1) / (count - 1)) for i in range(count)})


def parse_port_range(text: str) -> tuple[int, int] | None:
    """``"40000-40099"`` (SITE DIAG's passive-ports) -> ``(40000, 40099)``."""
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        return None


def parse_diag(reply: str) -> dict[str, str]:
    """The ``name: value`` lines of a SITE DIAG reply."""
    facts: dict[str, str] = {}
    for line in reply.splitlines()[1:-1]:
        name, sep, value = line.strip().partition(": ")
        if sep:
            facts[name] = value
    return facts


# --- running it


class _Failure(Exception):  # noqa: N818 - a step's outcome, raised to end the step
    """A step failed: what happened, what to do, and a stable reason word."""

    def __init__(
        self,
        reason: str,
        summary: str,
        action: str,
        *,
        details: dict[str, Any] | None = None,
        blocking: bool = True,
    ) -> None:
        super().__init__(summary)
        self.reason = reason
        self.summary = summary
        self.action = action
        self.details = details or {}
        self.blocking = blocking


class _Stopped(Exception):  # noqa: N818 - control flow, not an error
    """A blocking failure ended the run."""


@dataclass
class _Outcome:
    summary: str
    status: Status = Status.OK
    action: str = ""
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Download:
    data: bytes
    clean_close: bool
    resumed: bool


def run(target: Target, password: str, options: Options) -> Report:
    """Run every step against ``target`` and return the report (never raises)."""
    secret = (password,) if len(password) >= MIN_SECRET_LENGTH else ()
    report = Report(
        target=target.url(),
        started=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        secrets=secret,
    )
    runner = _Run(target, password, options, report)
    try:
        runner.all_steps()
    except _Stopped:
        pass
    finally:
        runner.close()
    return report


class _Run:
    """One self-test: the connection state shared by consecutive steps."""

    def __init__(
        self, target: Target, password: str, options: Options, report: Report
    ) -> None:
        self.target = target
        self.password = password
        self.options = options
        self.report = report
        self.server_name = options.server_name or target.host
        self.context = ssl.create_default_context(cafile=options.cafile)
        self.addresses: list[str] = []
        self.peer_ip = ""
        self.raw: socket.socket | None = None
        self.ftp = ftplib.FTP_TLS(context=self.context, timeout=options.timeout)
        self.ftp.host = self.server_name
        self.diag: dict[str, str] = {}
        self.data_port = 0
        self.use_epsv = True
        self.unclean_closes: list[str] = []
        self.pending_data: socket.socket | None = None  # connected, before TLS
        self.listing: ssl.SSLSocket | None = None  # LIST accepted, data to read

    # --- the sequence

    def all_steps(self) -> None:
        self._step("dns", self._dns)
        self._step("tcp", self._tcp)
        if self.target.implicit:
            self._step("tls", self._tls)
            self._step("banner", self._banner)
        else:
            self._step("banner", self._banner)
            self._step("auth-tls", self._auth_tls)
            self._step("tls", self._tls)
        self._step("login", self._login)
        self._step("protection", self._protection)
        self.diag = self._site_diag()
        self._step("passive", self._passive)
        connected = self._step("data-connect", self._data_connect)
        if self.options.scan_passive > 0:
            self._step("passive-scan", self._scan)
        if connected is None:
            raise _Stopped
        self._step("data-tls", self._data_tls)
        self._step("list", self._list)
        self._step("no-resumption", self._no_resumption)
        if self.options.read_only:
            self._skip("transfer", "skipped (--read-only)")
        else:
            self._step("transfer", self._transfer)
        self._step("repeat", self._repeat)
        view = self._site_diag()
        if view:
            self.report.server_view = view
            self._step(
                "server-view",
                lambda: _Outcome(_server_view_summary(view), Status.INFO),
            )
        self._step("shutdown", self._shutdown)

    def _step(self, stage: str, body: Callable[[], _Outcome]) -> _Outcome | None:
        started = time.monotonic()
        try:
            outcome = body()
        except _Failure as failure:
            self.report.add(
                Step(stage, Status.FAIL, time.monotonic() - started, failure.summary,
                     failure.action, failure.reason, failure.details)
            )  # fmt: skip
            if failure.blocking:
                raise _Stopped from failure
            return None
        except (OSError, EOFError, ftplib.Error, ValueError) as err:
            self.report.add(
                Step(stage, Status.FAIL, time.monotonic() - started,
                     f"unexpected: {_describe(err)}",
                     "run again; if it repeats, send this report to the operator",
                     "unexpected")
            )  # fmt: skip
            raise _Stopped from err
        self.report.add(
            Step(stage, outcome.status, time.monotonic() - started, outcome.summary,
                 outcome.action, outcome.reason, outcome.details)
        )  # fmt: skip
        return outcome

    def _skip(self, stage: str, summary: str) -> None:
        self.report.add(Step(stage, Status.SKIP, 0.0, summary))

    def close(self) -> None:
        """Close whatever is still open, quietly."""
        for sock in (self.ftp.sock, self.raw, self.pending_data, self.listing):
            if sock is not None:
                sock.close()

    # --- steps 1-2: DNS, TCP

    def _dns(self) -> _Outcome:
        host = self.target.host
        try:
            infos = socket.getaddrinfo(host, self.target.port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise _Failure(
                "dns-failed",
                f"{host} does not resolve: {err.strerror}",
                "check the host name; if it is right, your DNS cannot see it: ask "
                "your network team, or the operator whether the name is published",
            ) from err
        self.addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        literal = _is_ip(host)
        summary = (
            f"{host} is an address (no DNS needed)"
            if literal
            else f"{host} -> {', '.join(self.addresses)}"
        )
        return _Outcome(summary, details={"addresses": self.addresses})

    def _tcp(self) -> _Outcome:
        port, timeout = self.target.port, self.options.timeout
        errors: list[tuple[str, OSError]] = []
        for address in self.addresses:
            try:
                self.raw = socket.create_connection((address, port), timeout=timeout)
            except OSError as error:
                errors.append((address, error))
                continue
            self.peer_ip = _unmap(self.raw.getpeername()[0])
            local = self.raw.getsockname()[0]
            return _Outcome(
                f"connected to {self.peer_ip} port {port} from {_unmap(local)}",
                details={"peer": self.peer_ip, "local": _unmap(local)},
            )
        address, err = errors[0]
        where = f"{address} port {port}"
        if isinstance(err, ConnectionRefusedError):
            raise _Failure(
                "tcp-refused",
                f"{where} refused the connection (TCP reset): a host answered, but "
                "nothing listens on that port, or a firewall rejects it",
                f"check the port number; ask the operator whether the server runs "
                f"and listens on {where}; a closed port is not a firewall drop",
                details={"address": address, "port": port},
            )
        if isinstance(err, TimeoutError):
            raise _Failure(
                "tcp-timeout",
                f"{where} did not answer within {timeout:g} s: the packets are "
                "dropped on the way (a firewall), or the address is wrong",
                f"ask your firewall team to allow outbound TCP to {where}; ask the "
                "operator to allow inbound TCP from your public address to that "
                "port",
                details={"address": address, "port": port},
            )
        raise _Failure(
            "tcp-unreachable",
            f"{where}: {_describe(err)} (no route to that address)",
            "check the address and your network's routing or proxy settings",
            details={"address": address, "port": port},
        )

    # --- steps 3-4: banner, AUTH TLS, TLS handshake

    def _attach(self, sock: socket.socket) -> None:
        self.ftp.sock = sock
        self.ftp.af = sock.family
        self.ftp.file = sock.makefile("r", encoding=self.ftp.encoding)

    def _banner(self) -> _Outcome:
        if not self.target.implicit:
            if self.raw is None:
                raise _Failure("unexpected", "not connected", "run again")
            self._attach(self.raw)
        try:
            welcome = self.ftp.getresp()
        except EOFError:
            raise _Failure(
                "closed-before-greeting",
                "the server closed the connection without a greeting: it does not "
                "accept your address (not in its allow list, or banned after "
                "failed logins)",
                "send your public IP address to the operator and ask them to allow "
                "it (the server's SITE DIAG cannot run before login)",
            ) from None
        except TimeoutError:
            raise _Failure(
                "no-greeting",
                f"connected, but no greeting within {self.options.timeout:g} s: "
                "something in the path accepts connections and holds them (a "
                "proxy or load balancer with no server behind it)",
                "ask the operator whether the server is up behind its load "
                "balancer; check for a transparent proxy on your side",
            ) from None
        except ftplib.error_temp as err:
            raise _Failure(
                "greeting-refused",
                f"the server answered {err}: it refuses new sessions now",
                "wait and retry; if it repeats, ask the operator about session limits",
            ) from None
        return _Outcome(f"{welcome.splitlines()[-1]}")

    def _auth_tls(self) -> _Outcome:
        try:
            reply = self.ftp.voidcmd("AUTH TLS")
        except ftplib.error_perm as err:
            raise _Failure(
                "auth-tls-refused",
                f"AUTH TLS refused: {err}",
                "the server does not offer explicit FTPS on this port; if it uses "
                "implicit TLS (usually port 990) use ftpsi://",
            ) from None
        return _Outcome(reply)

    def _tls(self) -> _Outcome:
        if self.raw is None:
            raise _Failure("unexpected", "not connected", "run again")
        raw, self.raw = self.raw, None
        try:
            sock = self.context.wrap_socket(
                raw, server_hostname=self.server_name, suppress_ragged_eofs=False
            )
        except ssl.SSLCertVerificationError as err:
            raise self._certificate_failure(err) from None
        except (ssl.SSLError, OSError) as err:
            raise _Failure(
                "tls-handshake-failed",
                f"the TLS handshake failed: {_describe(err)}",
                "your TLS library and the server share no protocol version or "
                "cipher (the server needs TLS 1.2 or newer), or a middlebox broke "
                "the handshake; send this report to the operator",
            ) from None
        self.raw = None
        if not self.target.implicit:
            self.ftp.sock = sock
            self.ftp.file = sock.makefile("r", encoding=self.ftp.encoding)
        else:
            self._attach(sock)
        der = sock.getpeercert(binary_form=True) or b""
        facts = _certificate_facts(der)
        version, cipher = sock.version(), (sock.cipher() or ("?",))[0]
        facts.update({"version": version, "cipher": cipher})
        pin = self.options.pin
        if pin is not None and hashlib.sha256(der).hexdigest() != pin:
            raise _Failure(
                "pin-mismatch",
                f"the certificate received ({facts['fingerprint']}, issued by "
                f"{facts['issuer']}) is not the pinned one: something between you "
                "and the server presents its own certificate (a TLS-inspecting "
                "proxy or firewall), or this is not the right server",
                f"ask your network team to exclude {self.target.host} port "
                f"{self.target.port} and the server's passive ports from TLS "
                "inspection; FTPS cannot work through it",
                details=facts,
            )
        days = int(facts["days_left"])
        summary = (
            f"{version} {cipher}; certificate for {facts['subject']} "
            f"(names: {facts['names']}), issued by {facts['issuer']}, verified"
            f"{' against ' + self.options.cafile if self.options.cafile else ''}; "
            f"{self.server_name} matches; expires in {days} days\n"
            f"fingerprint {facts['fingerprint']}" + ("; matches --pin" if pin else "")
        )
        if days < EXPIRY_WARNING_DAYS:
            return _Outcome(
                summary,
                Status.WARN,
                "the server certificate expires soon: tell the operator",
                "certificate-expires-soon",
                facts,
            )
        return _Outcome(summary, details=facts)

    def _certificate_failure(self, err: ssl.SSLCertVerificationError) -> _Failure:
        reason = _VERIFY_REASONS.get(err.verify_code, "certificate-invalid")
        facts = self._peek_certificate()
        seen = (
            f" The server presented: {facts['subject']} (names: {facts['names']}), "
            f"issued by {facts['issuer']}, expires {facts['not_after']}, "
            f"{facts['fingerprint']}."
            if facts
            else ""
        )
        where = f"{self.target.host} port {self.target.port}"
        if reason == "hostname-mismatch":
            action = (
                f"connect with a name the certificate holds ({facts.get('names', '?')})"
                f"; if {self.server_name} is the name the operator gave you, the "
                "server's certificate is wrong: tell the operator. A TLS-inspecting "
                "proxy also causes this: compare the issuer with your company's proxy"
            )
        elif reason == "certificate-untrusted":
            action = (
                "if the issuer is your company's proxy or firewall, a TLS-inspecting "
                f"device sits in the path: ask your network team to exclude {where} "
                "and the passive ports from inspection. Otherwise ask the operator "
                "for the CA certificate, pass it with --cafile, and compare the "
                "fingerprint with the one the operator gives you (then use --pin)"
            )
        elif reason == "certificate-expired":
            action = "the server's certificate has expired: tell the operator"
        else:
            action = "send this report to the operator"
        facts["verify_code"] = err.verify_code
        return _Failure(
            reason,
            f"certificate not accepted: {err.verify_message}.{seen}",
            action,
            details=facts,
        )

    def _peek_certificate(self) -> dict[str, Any]:
        """Fetch the certificate again without verifying it, only to describe it."""
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        try:
            raw = socket.create_connection(
                (self.peer_ip, self.target.port), timeout=self.options.timeout
            )
            with raw:
                if not self.target.implicit:
                    peek = ftplib.FTP_TLS(timeout=self.options.timeout)
                    peek.sock = raw
                    peek.file = raw.makefile("r", encoding="utf-8")
                    peek.getresp()
                    peek.voidcmd("AUTH TLS")
                with insecure.wrap_socket(raw, server_hostname=self.server_name) as s:
                    der = s.getpeercert(binary_form=True) or b""
        except (OSError, EOFError, ftplib.Error):
            return {}
        return _certificate_facts(der)

    # --- steps 5-6: login, PBSZ/PROT

    def _login(self) -> _Outcome:
        user = self.target.user
        try:
            reply = self.ftp.sendcmd(f"USER {user}")
            if reply.startswith("3"):
                reply = self.ftp.sendcmd(f"PASS {self.password}")
        except ftplib.error_perm as err:
            raise _Failure(
                "login-refused",
                f"login as {user!r} refused: {err}",
                "check the user name and password (the server answers the same for "
                "an unknown user, a wrong password and an address not allowed for "
                "this user, on purpose); after several failures your address is "
                "banned for a while: ask the operator to check its audit log",
            ) from None
        except ftplib.error_temp as err:
            raise _Failure(
                "login-temporary",
                f"login as {user!r} not possible now: {err}",
                "too many sessions or a restart: wait and retry",
            ) from None
        return _Outcome(f"logged in as {user!r}: {reply.splitlines()[-1]}")

    def _protection(self) -> _Outcome:
        try:
            self.ftp.voidcmd("PBSZ 0")
            reply = self.ftp.voidcmd("PROT P")
        except ftplib.Error as err:
            raise _Failure(
                "prot-p-refused",
                f"the server refused encrypted data connections: {err}",
                "send this report to the operator",
            ) from None
        return _Outcome(f"PBSZ 0, PROT P: {reply}")

    def _site_diag(self) -> dict[str, str]:
        try:
            return parse_diag(self.ftp.sendcmd("SITE DIAG"))
        except ftplib.Error:
            return {}

    # --- steps 7-8: passive mode, data connection

    def _range_text(self) -> str:
        ports = self.diag.get("passive-ports")
        if ports:
            return f"ports {ports}"
        return f"port {self.data_port} (the server's whole range is unknown)"

    def _passive(self) -> _Outcome:
        details: dict[str, Any] = {}
        lines: list[str] = []
        problem: PassiveVerdict | None = None
        if ":" not in self.peer_ip:
            try:
                reply = self.ftp.sendcmd("PASV")
                advertised, port = ftplib.parse227(reply)
                verdict = classify_passive_address(advertised, self.peer_ip)
                details.update(
                    pasv_address=advertised, pasv_port=port, pasv_verdict=verdict.kind
                )
                lines.append(f"PASV: port {port}; {verdict.explanation}")
                self.data_port = port
                if not verdict.ok:
                    problem = verdict
            except ftplib.Error as err:
                lines.append(f"PASV refused ({err}); EPSV is needed")
                details["pasv_error"] = str(err)
        try:
            reply = self.ftp.sendcmd("EPSV")
            _host, self.data_port = ftplib.parse229(reply, (self.peer_ip, 0))
            lines.append(f"EPSV: port {self.data_port} on {self.peer_ip}")
            details["epsv_port"] = self.data_port
        except ftplib.Error as err:
            self.use_epsv = False
            lines.append(f"EPSV refused ({err}): PASV will be used")
            details["epsv_error"] = str(err)
            if "pasv_port" not in details:
                raise _Failure(
                    "passive-refused",
                    "\n".join(lines),
                    "the server offers no passive mode to you: send this report "
                    "to the operator",
                    details=details,
                ) from None
        if problem is not None:
            advertised = details["pasv_address"]
            raise _Failure(
                f"pasv-address-{problem.kind}",
                "\n".join(lines),
                f"server side: set the passive (NAT/masquerade) address to "
                f"{self.peer_ip}, the address partners connect to (ftps-gateway: "
                f'[passive] address = "{self.peer_ip}" or a [[passive.overrides]] '
                f"entry for your network). Until then, clients that trust the 227 "
                f"address connect to {advertised} and fail; use EPSV, or a client "
                "that ignores the 227 address (curl's default, lftp's "
                "ftp:fix-pasv-address)",
                details=details,
                blocking=False,
            )
        return _Outcome("\n".join(lines), details=details)

    def _connect_data(self, port: int) -> socket.socket:
        return socket.create_connection(
            (self.peer_ip, port), timeout=self.options.timeout
        )

    def _data_connect(self) -> _Outcome:
        port = self.data_port
        where = f"{self.peer_ip} port {port}"
        try:
            self.pending_data = self._connect_data(port)
        except TimeoutError:
            raise _Failure(
                "data-timeout",
                f"the data connection to {where} did not answer within "
                f"{self.options.timeout:g} s: a firewall drops it, yours "
                "(outbound) or the server's (inbound). The control port works, so "
                "the passive range is what is blocked.",
                self._firewall_rule(),
                details={"port": port, "range": self.diag.get("passive-ports")},
                blocking=False,  # the scan, if asked for, still runs; then stop
            ) from None
        except ConnectionRefusedError:
            raise _Failure(
                "data-refused",
                f"the data connection to {where} was refused (TCP reset): a "
                "firewall rejects it, or a load balancer forwarded it to a node "
                "that does not hold your session",
                self._firewall_rule()
                + "; server side: forward the passive range to the same node as "
                "the control connection (source-IP affinity)",
                details={"port": port, "range": self.diag.get("passive-ports")},
                blocking=False,
            ) from None
        return _Outcome(f"TCP connected to {where}", details={"port": port})

    def _firewall_rule(self) -> str:
        client = self.diag.get("client-ip", "your public address")
        return (
            f"allow TCP from {client} to {self.peer_ip} {self._range_text()}, "
            f"besides the control port {self.target.port}: outbound in your "
            "firewall, inbound in the server's"
        )

    def _scan(self) -> _Outcome:
        bounds = parse_port_range(self.diag.get("passive-ports", ""))
        low, high = bounds or (self.data_port, self.data_port + 65535)
        high = min(high, 65535)
        ports = sample_ports(low, high, self.options.scan_passive)
        probe_timeout = min(self.options.timeout, 3.0)

        def probe(port: int) -> str:
            try:
                with socket.create_connection((self.peer_ip, port), probe_timeout):
                    return "open"
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                return "timeout"
            except OSError:
                return "unreachable"

        with ThreadPoolExecutor(min(SCAN_WORKERS, len(ports))) as pool:
            results = dict(zip(ports, pool.map(probe, ports), strict=True))
        groups: dict[str, list[int]] = {}
        for port, result in results.items():
            groups.setdefault(result, []).append(port)
        summary = "\n".join(
            [
                (
                    f"probed {len(ports)} port(s) of {low}-{high} on {self.peer_ip} "
                    "(connect only, nothing sent):"
                ),
                *(f"  {kind}: {port_ranges(found)}" for kind, found in groups.items()),
                (
                    "refused = a TCP reset came back: the path to the server host "
                    "is open (the server only accepts on ports it opened for a "
                    "transfer); open = something accepted; timeout = dropped by a "
                    "firewall"
                ),
            ]
        )
        details = {kind: sorted(found) for kind, found in groups.items()}
        if "timeout" in groups or "unreachable" in groups:
            return _Outcome(summary, Status.WARN, self._firewall_rule(),
                            "passive-ports-blocked", details)  # fmt: skip
        return _Outcome(summary, details=details)

    # --- steps 9-10: TLS on data connections, LIST

    def _wrap_data(self, raw: socket.socket, resume: bool) -> ssl.SSLSocket:
        control = self.ftp.sock
        session = (
            control.session if resume and isinstance(control, ssl.SSLSocket) else None
        )
        return self.context.wrap_socket(
            raw,
            server_hostname=self.server_name,
            session=session,
            suppress_ragged_eofs=False,
        )

    def _open_data(self, resume: bool = True) -> ssl.SSLSocket:
        port = self._new_passive_port()
        return self._wrap_data(self._connect_data(port), resume)

    def _new_passive_port(self) -> int:
        if self.use_epsv:
            return ftplib.parse229(self.ftp.sendcmd("EPSV"), (self.peer_ip, 0))[1]
        return ftplib.parse227(self.ftp.sendcmd("PASV"))[1]

    def _read_all(self, conn: ssl.SSLSocket, what: str) -> tuple[bytes, bool]:
        chunks: list[bytes] = []
        clean = True
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except (ssl.SSLEOFError, ConnectionResetError):
            clean = False
            self.unclean_closes.append(what)
        return b"".join(chunks), clean

    def _download(self, command: str, conn: ssl.SSLSocket) -> _Download:
        """Send ``command`` for an open data connection; read all; 226 expected."""
        with conn:
            resumed = bool(conn.session_reused)
            reply = self.ftp.sendcmd(command)
            if not reply.startswith("1"):
                raise ftplib.error_reply(reply)
            data, clean = self._read_all(conn, command)
        self.ftp.voidresp()
        return _Download(data, clean, resumed)

    def _data_tls(self) -> _Outcome:
        """TLS on the data connection, and the server's verdict on it (150 or 425)."""
        raw, self.pending_data = self.pending_data, None
        if raw is None:
            raise _Failure("unexpected", "no data connection", "run again")
        try:
            conn = self._wrap_data(raw, resume=True)
        except (ssl.SSLError, OSError) as err:
            raw.close()
            raise _Failure(
                "data-tls-failed",
                f"TCP reached the passive port, but TLS failed: {_describe(err)}",
                "something on the path breaks TLS on the data connection (a "
                "TLS-inspecting proxy, or a load balancer that sent it to another "
                "node): send this report to both network teams",
            ) from None
        facts = {"version": conn.version(), "cipher": (conn.cipher() or ("?",))[0],
                 "resumed": conn.session_reused}  # fmt: skip
        try:
            reply = self.ftp.sendcmd("LIST")
        except ftplib.error_temp as err:
            conn.close()
            if NOT_RESUMED_MARK in str(err):
                raise _Failure(
                    "data-not-resumed",
                    f"the server refused the data connection: {err} (this client "
                    f"offered the control session; resumed: {facts['resumed']})",
                    "the control session could not be resumed: send this report "
                    "to the operator",
                    details=facts,
                ) from None
            raise
        if not reply.startswith("1"):
            conn.close()
            raise ftplib.error_reply(reply)
        self.listing = conn
        return _Outcome(
            f"{facts['version']} {facts['cipher']}, control session resumed: "
            f"{'yes' if facts['resumed'] else 'no'}; the server accepted it",
            details=facts,
        )

    def _list(self) -> _Outcome:
        conn, self.listing = self.listing, None
        if conn is None:
            raise _Failure("unexpected", "no data connection", "run again")
        with conn:
            data, _clean = self._read_all(conn, "LIST")
        self.ftp.voidresp()
        lines = data.decode("utf-8", "replace").splitlines()
        return _Outcome(
            f"{len(lines)} entries, {len(data)} bytes",
            details={"entries": len(lines), "bytes": len(data)},
        )

    def _no_resumption(self) -> _Outcome:
        conn = self._open_data(resume=False)
        try:
            self._download("LIST", conn)
        except ftplib.error_temp as err:
            if NOT_RESUMED_MARK not in str(err):
                raise
            return _Outcome(
                f"refused: {err}\nA client that does not resume the control "
                "connection's TLS session on data connections (Python ftplib, "
                "several Go, .NET and Java libraries) cannot transfer here; this "
                "self-test resumes, so it can.",
                Status.INFO,
                "your FTP library must resume TLS sessions (curl, lftp, WinSCP and "
                'FileZilla do), or ask the operator for reuse = "ip-match" for '
                "your account or network",
                "resumption-required",
                {"accepted": False},
            )
        return _Outcome(
            "accepted: a client that does not resume TLS sessions on data "
            "connections works here too (the server checks your address only)",
            Status.INFO,
            reason="resumption-optional",
            details={"accepted": True},
        )

    # --- steps 11-12: transfers

    def _probe_name(self) -> tuple[str, str]:
        """Where to put the probe: the URL's file name only if nothing is there.

        A partner's existing file is never overwritten (and so never deleted): any
        doubt about the name gives a unique name in the same directory.
        """
        path = self.target.path or "/"
        unique = f"ftps-selftest-{secrets.token_hex(6)}.probe"
        if path.endswith("/"):
            return path + unique, ""
        directory = path.rsplit("/", 1)[0] + "/"
        try:
            self.ftp.sendcmd(f"SIZE {path}")  # in TYPE I: ASCII mode may refuse SIZE
        except ftplib.error_perm:
            if self._is_directory(path):
                return f"{path}/{unique}", ""
            return path, ""
        except ftplib.Error:
            pass
        return directory + unique, f"{path} exists already, so it was left alone; "

    def _is_directory(self, path: str) -> bool:
        try:
            here = self.ftp.pwd()
            self.ftp.cwd(path)
        except ftplib.Error:
            return False
        self.ftp.cwd(here)
        return True

    def _transfer(self) -> _Outcome:
        self.ftp.voidcmd("TYPE I")  # byte for byte; ASCII mode may rewrite newlines
        name, note = self._probe_name()
        probe = (b"ftps-gateway self-test probe\n" + secrets.token_bytes(PROBE_SIZE))[
            :PROBE_SIZE
        ]
        digest = hashlib.sha256(probe).hexdigest()
        try:
            self._upload(name, probe)
        except ftplib.error_perm as err:
            raise _Failure(
                "upload-refused",
                f"upload of {name} refused: {err}",
                "your account may not upload there: give a path where you may "
                "(ftps://user@host/inbox/), or use --read-only",
            ) from None
        got = self._download(f"RETR {name}", self._open_data())
        deleted = self._delete(name)
        details: dict[str, Any] = {
            "path": name,
            "size": len(probe),
            "sha256": digest,
            "downloaded_size": len(got.data),
            "downloaded_sha256": hashlib.sha256(got.data).hexdigest(),
            "deleted": deleted,
        }
        if got.data != probe:
            raise _Failure(
                "probe-differs",
                f"{note}uploaded {len(probe)} bytes (sha256 {digest[:16]}...) to "
                f"{name}, downloaded {len(got.data)} bytes (sha256 "
                f"{details['downloaded_sha256'][:16]}...): the data was changed "
                "or cut on the way",
                "a middlebox alters FTP data connections, or ASCII mode is forced: "
                "send this report to both network teams",
                details=details,
            )
        summary = (
            f"{note}uploaded and downloaded {name}: {len(probe)} bytes, sha256 "
            f"{digest[:16]}... match; "
            + ("deleted afterwards" if deleted else "could NOT be deleted")
        )
        if not deleted:
            return _Outcome(summary, Status.WARN,
                            f"delete {name} by hand (no delete permission?)",
                            "probe-left-behind", details)  # fmt: skip
        return _Outcome(summary, details=details)

    def _upload(self, name: str, data: bytes) -> None:
        conn = self._open_data()
        with conn:
            reply = self.ftp.sendcmd(f"STOR {name}")
            if not reply.startswith("1"):
                raise ftplib.error_reply(reply)
            conn.sendall(data)
            conn.unwrap()  # close_notify: the server keeps uploads only with it
        self.ftp.voidresp()

    def _delete(self, name: str) -> bool:
        try:
            self.ftp.voidcmd(f"DELE {name}")
        except ftplib.Error:
            return False
        return True

    def _repeat(self) -> _Outcome:
        count = self.options.repeat
        resumed = 0
        for index in range(1, count + 1):
            try:
                result = self._download("NLST", self._open_data())
            except (ftplib.Error, OSError) as err:
                raise _Failure(
                    "repeat-failed",
                    f"transfer {index} of {count} on this session failed: "
                    f"{_describe(err)} (the first {index - 1} worked)",
                    "later transfers on one session fail: typical of TLS 1.3 "
                    "session tickets used up, or a per-session limit; send this "
                    "report to the operator",
                    details={"done": index - 1, "resumed": resumed},
                ) from None
            resumed += result.resumed
        return _Outcome(
            f"{count} more data connections on one session, all completed; "
            f"{resumed} resumed the control session",
            details={"count": count, "resumed": resumed},
        )

    # --- step 13: shutdown

    def _shutdown(self) -> _Outcome:
        reply = self.ftp.voidcmd("QUIT")
        control_clean = True
        try:
            if self.ftp.file is not None:
                self.ftp.file.read()
        except (ssl.SSLEOFError, ConnectionResetError):
            control_clean = False
        closes = list(self.unclean_closes)
        if not control_clean:
            closes.append("control connection")
        details = {"control_close_notify": control_clean, "unclean": closes}
        if closes:
            raise _Failure(
                "no-close-notify",
                f"QUIT: {reply} These TLS connections ended without close_notify: "
                f"{', '.join(closes)}",
                "strict clients report a truncation error after such transfers: "
                "send this report to the operator",
                details=details,
            )
        return _Outcome(
            f"QUIT: {reply} Every TLS connection ended with close_notify.",
            details=details,
        )


def _server_view_summary(view: dict[str, str]) -> str:
    return (
        f"the server sees you as {view.get('client-ip', '?')} (node "
        f"{view.get('node', '?')}, session {view.get('session', '?')}); "
        f"last data connection: {view.get('last-data-tls', '?')}"
    )


def _certificate_facts(der: bytes) -> dict[str, Any]:
    if not der:
        return {}
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.value.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    not_after = cert.not_valid_after_utc
    return {
        "subject": _common_name(cert.subject) or cert.subject.rfc4514_string(),
        "issuer": _common_name(cert.issuer) or cert.issuer.rfc4514_string(),
        "names": ", ".join(names) or "none",
        "not_after": not_after.strftime("%Y-%m-%d"),
        "days_left": (not_after - datetime.now(UTC)).days,
        "fingerprint": fingerprint(der),
    }


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else ""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _unmap(ip: str) -> str:
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if isinstance(err, ftplib.Error) else f"{type(err).__name__}: {text}"

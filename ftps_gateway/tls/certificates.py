"""Certificate and key inspection, and self-signed development certificates.

Plain Python on ``cryptography`` (no pyftpdlib, no ``ssl``). Inspection reports every
problem as text an operator can act on instead of raising, so ``check-config`` and
start-up can list them all at once.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    from pathlib import Path

    from cryptography.hazmat.primitives.asymmetric.types import (
        PrivateKeyTypes,
        PublicKeyTypes,
    )

__all__ = [
    "CERTIFICATE_KEY",
    "DEVELOPMENT_VALIDITY_DAYS",
    "EXPIRY_WARNING_DAYS",
    "PRIVATE_KEY_KEY",
    "certificate_not_after",
    "certificate_problems",
    "certificate_warnings",
    "generate_development_certificate",
]

# Configuration key paths the problems are reported under (errors.ConfigError format).
CERTIFICATE_KEY = "tls.certificate"
PRIVATE_KEY_KEY = "tls.private_key"

# See generate_development_certificate for why 397.
DEVELOPMENT_VALIDITY_DAYS = 397
# Backdating absorbs clock skew between this host and its first clients.
_BACKDATE = timedelta(minutes=5)
# certificate_warnings starts nagging this long before the leaf expires.
EXPIRY_WARNING_DAYS = 30
# X.520 upper bound for commonName; longer host names go in the SAN only.
_MAX_COMMON_NAME_CHARS = 64

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

_ENCRYPTED_KEY = (
    "private key is encrypted; give an unencrypted key readable only by the server"
)

_Problems = list[tuple[str, str]]


# --- inspection --------------------------------------------------------------------


def _read(path: Path, key: str, problems: _Problems) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append((key, f"file not found ({path})"))
    except OSError as err:
        problems.append((key, f"cannot read: {err.strerror or err} ({path})"))
    return None


def _load_chain(path: Path, problems: _Problems) -> list[x509.Certificate]:
    data = _read(path, CERTIFICATE_KEY, problems)
    if data is None:
        return []
    try:
        # All CERTIFICATE blocks in order, leaf first; other blocks (a key pasted into
        # the same file) are skipped, as OpenSSL's chain loading does.
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        problems.append((CERTIFICATE_KEY, f"no PEM certificate in file ({path})"))
        return []


def _load_key(path: Path, problems: _Problems) -> PrivateKeyTypes | None:
    data = _read(path, PRIVATE_KEY_KEY, problems)
    if data is None:
        return None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # A server that starts unattended has nobody to type a passphrase; the key is
        # protected by file permissions instead.
        problems.append((PRIVATE_KEY_KEY, _ENCRYPTED_KEY))
    except UnsupportedAlgorithm:
        problems.append((PRIVATE_KEY_KEY, f"unsupported private key type ({path})"))
    except ValueError:
        problems.append((PRIVATE_KEY_KEY, f"no PEM private key in file ({path})"))
    return None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _mismatch_problem(
    chain: list[x509.Certificate], key: PrivateKeyTypes
) -> str | None:
    """Compare SubjectPublicKeyInfo DER: works for every key type, no signing needed."""
    key_spki = _spki(key.public_key())
    if _spki(chain[0].public_key()) == key_spki:
        return None
    for number, cert in enumerate(chain[1:], start=2):
        if _spki(cert.public_key()) == key_spki:
            # The classic "cat intermediate.pem server.pem" order mistake.
            return (
                f"does not match the certificate (it matches certificate #{number} "
                "in the file; put the server certificate first)"
            )
    return "does not match the certificate"


def _date(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _validity_problems(chain: list[x509.Certificate], now: datetime) -> _Problems:
    problems: _Problems = []
    for number, cert in enumerate(chain, start=1):
        # Clients check every certificate they are sent, so an expired intermediate
        # breaks the handshake just like an expired leaf.
        which = "certificate" if number == 1 else f"certificate #{number} in the chain"
        if cert.not_valid_after_utc < now:
            expired = f"{which} expired on {_date(cert.not_valid_after_utc)}"
            problems.append((CERTIFICATE_KEY, expired))
        if cert.not_valid_before_utc > now:
            early = f"{which} not valid before {_date(cert.not_valid_before_utc)}"
            problems.append((CERTIFICATE_KEY, early))
    return problems


def certificate_problems(
    certificate: Path, private_key: Path, *, now: datetime | None = None
) -> list[tuple[str, str]]:
    """Return every reason the certificate chain and key cannot be served.

    Args:
        certificate: PEM file, leaf first, then intermediates.
        private_key: PEM file with the leaf's unencrypted private key.
        now: the moment to check validity at (tests); default: the current time.

    Returns:
        ``(key_path, problem)`` pairs, key path ``"tls.certificate"`` or
        ``"tls.private_key"``; empty when the pair is usable. Checks that need both
        files (key match, validity) run only once both files load.
    """
    problems: _Problems = []
    chain = _load_chain(certificate, problems)
    key = _load_key(private_key, problems)
    if chain and key is not None:
        mismatch = _mismatch_problem(chain, key)
        if mismatch is not None:
            problems.append((PRIVATE_KEY_KEY, mismatch))
    if chain:
        problems.extend(_validity_problems(chain, now or datetime.now(UTC)))
    return problems


def certificate_warnings(
    certificate: Path, private_key: Path, *, now: datetime | None = None
) -> list[str]:
    """Return things worth fixing that do not stop the server.

    A key readable by others is a leak waiting to happen, but refusing to start would
    turn a permissions slip into an outage; a certificate close to expiry still works
    today. Files that cannot be read or parsed yield no warning here: they are
    ``certificate_problems``.
    """
    warnings: list[str] = []
    try:
        mode = stat.S_IMODE(private_key.stat().st_mode)
    except OSError:
        mode = 0
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        warnings.append(
            f"private key file is readable by group or others (mode {mode:04o}); "
            f"run chmod 600 {private_key}"
        )
    elif mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.append(
            f"private key file is writable by group or others (mode {mode:04o}); "
            f"run chmod 600 {private_key}"
        )
    try:
        not_after = certificate_not_after(certificate)
    except (OSError, ValueError):
        return warnings
    left = not_after - (now or datetime.now(UTC))
    if timedelta(0) <= left < timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.append(
            f"certificate expires on {_date(not_after)} (in {left.days} days); renew it"
        )
    return warnings


def certificate_not_after(certificate: Path) -> datetime:
    """Return when the leaf (first) certificate in ``certificate`` expires, in UTC.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file holds no PEM certificate.
    """
    return leaf_not_after(certificate.read_bytes())


def leaf_not_after(chain_pem: bytes) -> datetime:
    """When the leaf (first) certificate of a PEM chain expires, in UTC.

    Raises:
        ValueError: no PEM certificate in ``chain_pem``.
    """
    return x509.load_pem_x509_certificates(chain_pem)[0].not_valid_after_utc


# --- development certificates ------------------------------------------------------


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name.lower())


def _permitted_subtree(name: x509.GeneralName) -> x509.GeneralName:
    if isinstance(name, x509.IPAddress):
        address = name.value
        return x509.IPAddress(ipaddress.ip_network(address))  # a /32 or /128
    return name


def _check_hostname(hostname: str) -> str:
    name = hostname.removesuffix(".")
    if "%" in name:
        raise ValueError(f"hostname must not carry a zone id: {hostname!r}")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if _HOSTNAME.fullmatch(name) is None:
            raise ValueError(
                f"not a DNS hostname or IP address: {hostname!r} "
                "(international names: give the xn-- form)"
            ) from None
    return name


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically, never with a mode wider than ``mode``.

    The temporary file is created by ``O_CREAT | O_EXCL`` with ``mode`` already set,
    so a private key never exists with default permissions, not even between
    ``open`` and ``chmod``; ``O_EXCL | O_NOFOLLOW`` refuse a planted file or symlink.
    ``os.replace`` then swaps it in: readers see the old file or the new one, and an
    existing symlink at ``path`` is replaced, not followed.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            # The umask can only remove bits; set the exact mode (0644 for the
            # certificate even under umask 077, so clients can be handed the file).
            os.fchmod(stream.fileno(), mode)
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _prepare_directory(out_dir: Path) -> None:
    try:
        out_dir.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        if not out_dir.is_dir():
            raise NotADirectoryError(f"not a directory: {out_dir}") from None
    else:
        out_dir.chmod(0o700)  # mkdir's mode is filtered by the umask


def generate_development_certificate(hostname: str, out_dir: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate and key for trying the gateway out.

    The certificate is its own trust anchor, so a client can use the file directly:
    ``curl --cacert server.crt``, ``ssl.create_default_context(cafile=...)``. For that
    it is marked as a CA (BasicConstraints CA=true, critical; KeyUsage keyCertSign):
    OpenSSL and Python's ``ssl`` (strictly so with ``VERIFY_X509_STRICT``, the
    default from Python 3.13) refuse a trust anchor that is not allowed to sign
    certificates. A CA certificate whose key leaks could sign certificates for other
    names, so the damage is capped: path_length=0 (no sub-CAs) and NameConstraints
    (critical) permitting only the names in the certificate itself. Still: trust it
    in test clients only, never in a system trust store.

    Names: ECDSA P-256 key; subjectAltName = ``hostname`` (as an IP address entry if
    it is an IP literal), ``localhost``, ``127.0.0.1``, ``::1``, without duplicates;
    ExtendedKeyUsage serverAuth.

    Validity: 397 days. The only limit that binds a self-signed certificate is
    Apple's 825 days for any TLS server certificate. 397 stays under the 398-day limit
    that applied to publicly trusted certificates from 2020 until CA/Browser Forum
    ballot SC-081 (200 days from 2026-03-15, 47 days by 2029), which concerns public
    CAs only.

    Files: ``server.crt`` (0644) and ``server.key`` (0600, never wider, even while
    being written), each replaced atomically if present. ``out_dir`` is created with
    mode 0700 if it does not exist.

    Returns:
        ``(certificate_path, key_path)``.

    Raises:
        ValueError: ``hostname`` is neither a DNS name nor an IP address.
        OSError: the directory or files cannot be written.
    """
    name = _check_hostname(hostname)
    alt_names: list[x509.GeneralName] = []
    for candidate in (name, "localhost", "127.0.0.1", "::1"):
        general_name = _general_name(candidate)
        if general_name not in alt_names:
            alt_names.append(general_name)

    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    common_name = (
        name
        if len(name) <= _MAX_COMMON_NAME_CHARS
        else "ftps-gateway development certificate"
    )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ftps-gateway development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_before = datetime.now(UTC) - _BACKDATE
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=DEVELOPMENT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            x509.NameConstraints(
                permitted_subtrees=[_permitted_subtree(n) for n in alt_names],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        # Key identifiers: strict verifiers (OpenSSL's X509_STRICT) require an SKI on
        # CA certificates.
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )

    _prepare_directory(out_dir)
    cert_path = out_dir / "server.crt"
    key_path = out_dir / "server.key"
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Key first: a crash in between leaves a new key with the old certificate, which
    # certificate_problems reports as a mismatch rather than serving silently.
    _write_private(key_path, key_pem, 0o600)
    _write_private(
        cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644
    )
    return cert_path, key_path

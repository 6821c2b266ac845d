"""Unit tests for ftps_gateway.certs (trustme and cryptography craft the inputs)."""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ftps_gateway.tls.certificates import (
    DEVELOPMENT_VALIDITY_DAYS,
    certificate_not_after,
    certificate_problems,
    certificate_warnings,
    generate_development_certificate,
)

if TYPE_CHECKING:
    from pathlib import Path

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
ENCRYPTED = (
    "private key is encrypted; give an unencrypted key readable only by the server"
)


def self_signed(not_before: datetime, not_after: datetime) -> tuple[bytes, bytes]:
    """Return (certificate PEM, key PEM) for a throwaway self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def good_pair(tmp_path: Path, ca: trustme.CA) -> tuple[Path, Path]:
    leaf = ca.issue_cert("ftp.example.test")
    cert = write(tmp_path / "server.crt", leaf.cert_chain_pems[0].bytes(), 0o644)
    key = write(tmp_path / "server.key", leaf.private_key_pem.bytes())
    return cert, key


# --- certificate_problems ----------------------------------------------------------


def test_good_pair_has_no_problems(good_pair: tuple[Path, Path]) -> None:
    """A matching, currently valid pair yields no problems."""
    assert certificate_problems(*good_pair) == []


def test_chain_file_is_accepted(tmp_path: Path, ca: trustme.CA) -> None:
    """A file holding leaf then intermediate is fine; the key matches the leaf."""
    leaf = ca.create_child_ca().issue_cert("ftp.example.test")
    assert len(leaf.cert_chain_pems) == 2
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    cert = write(tmp_path / "chain.crt", chain, 0o644)
    key = write(tmp_path / "server.key", leaf.private_key_pem.bytes())
    assert certificate_problems(cert, key) == []


def test_chain_in_wrong_order_says_so(tmp_path: Path, ca: trustme.CA) -> None:
    """Intermediate first: the mismatch message points at the order."""
    leaf = ca.create_child_ca().issue_cert("ftp.example.test")
    chain = b"".join(blob.bytes() for blob in reversed(leaf.cert_chain_pems))
    cert = write(tmp_path / "chain.crt", chain, 0o644)
    key = write(tmp_path / "server.key", leaf.private_key_pem.bytes())
    assert certificate_problems(cert, key) == [
        (
            "tls.private_key",
            (
                "does not match the certificate (it matches certificate #2 in the"
                " file; put the server certificate first)"
            ),
        )
    ]


def test_combined_key_and_certificate_file(tmp_path: Path, ca: trustme.CA) -> None:
    """One PEM file holding key and certificate can serve as both settings."""
    leaf = ca.issue_cert("ftp.example.test")
    both = write(
        tmp_path / "both.pem",
        leaf.private_key_pem.bytes() + leaf.cert_chain_pems[0].bytes(),
    )
    assert certificate_problems(both, both) == []


def test_mismatched_key(tmp_path: Path, ca: trustme.CA) -> None:
    """Another certificate's key is reported against tls.private_key."""
    one, two = ca.issue_cert("one.example"), ca.issue_cert("two.example")
    cert = write(tmp_path / "server.crt", one.cert_chain_pems[0].bytes(), 0o644)
    key = write(tmp_path / "server.key", two.private_key_pem.bytes())
    assert certificate_problems(cert, key) == [
        ("tls.private_key", "does not match the certificate")
    ]


def test_expired_certificate(tmp_path: Path) -> None:
    """An expired leaf is reported with its expiry date."""
    cert_pem, key_pem = self_signed(
        datetime(2020, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC)
    )
    cert = write(tmp_path / "server.crt", cert_pem, 0o644)
    key = write(tmp_path / "server.key", key_pem)
    assert certificate_problems(cert, key) == [
        ("tls.certificate", "certificate expired on 2021-01-01T00:00:00+00:00")
    ]


def test_not_yet_valid_certificate(tmp_path: Path) -> None:
    """A certificate valid only in the future is reported with its start date."""
    cert_pem, key_pem = self_signed(
        datetime(2026, 6, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )
    cert = write(tmp_path / "server.crt", cert_pem, 0o644)
    key = write(tmp_path / "server.key", key_pem)
    assert certificate_problems(cert, key, now=NOW) == [
        ("tls.certificate", "certificate not valid before 2026-06-01T00:00:00+00:00")
    ]


def test_expired_intermediate(tmp_path: Path, ca: trustme.CA) -> None:
    """An expired intermediate in the chain is reported by its position."""
    leaf = ca.issue_cert("ftp.example.test")
    old_pem, _ = self_signed(
        datetime(2020, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC)
    )
    cert = write(tmp_path / "chain.crt", leaf.cert_chain_pems[0].bytes() + old_pem)
    key = write(tmp_path / "server.key", leaf.private_key_pem.bytes())
    assert certificate_problems(cert, key) == [
        (
            "tls.certificate",
            "certificate #2 in the chain expired on 2021-01-01T00:00:00+00:00",
        )
    ]


@pytest.mark.parametrize(
    "private_format",
    [
        serialization.PrivateFormat.PKCS8,  # BEGIN ENCRYPTED PRIVATE KEY
        serialization.PrivateFormat.TraditionalOpenSSL,  # Proc-Type: 4,ENCRYPTED
    ],
)
def test_encrypted_key(
    tmp_path: Path, private_format: serialization.PrivateFormat
) -> None:
    """A passphrase-protected key is refused with a hint."""
    key_obj = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    cert_obj = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key_obj.public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=100))
        .sign(key_obj, hashes.SHA256())
    )
    cert = write(
        tmp_path / "server.crt", cert_obj.public_bytes(serialization.Encoding.PEM)
    )
    encrypted = key_obj.private_bytes(
        serialization.Encoding.PEM,
        private_format,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    key = write(tmp_path / "server.key", encrypted)
    assert certificate_problems(cert, key, now=NOW) == [("tls.private_key", ENCRYPTED)]


def test_missing_files(tmp_path: Path) -> None:
    """Both missing files are reported, each under its own key."""
    cert, key = tmp_path / "nope.crt", tmp_path / "nope.key"
    assert certificate_problems(cert, key) == [
        ("tls.certificate", f"file not found ({cert})"),
        ("tls.private_key", f"file not found ({key})"),
    ]


def test_empty_files(tmp_path: Path) -> None:
    """Empty files hold no PEM certificate and no PEM key."""
    cert = write(tmp_path / "server.crt", b"")
    key = write(tmp_path / "server.key", b"")
    assert certificate_problems(cert, key) == [
        ("tls.certificate", f"no PEM certificate in file ({cert})"),
        ("tls.private_key", f"no PEM private key in file ({key})"),
    ]


def test_swapped_files(good_pair: tuple[Path, Path]) -> None:
    """Certificate and key given the wrong way round: both are reported."""
    cert, key = good_pair
    assert certificate_problems(key, cert) == [
        ("tls.certificate", f"no PEM certificate in file ({key})"),
        ("tls.private_key", f"no PEM private key in file ({cert})"),
    ]


def test_directory_cannot_be_read(tmp_path: Path, good_pair: tuple[Path, Path]) -> None:
    """A directory is reported with the OS's reason."""
    _, key = good_pair
    assert certificate_problems(tmp_path, key) == [
        ("tls.certificate", f"cannot read: Is a directory ({tmp_path})")
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(good_pair: tuple[Path, Path]) -> None:
    """A file without read permission is reported with the OS's reason."""
    cert, key = good_pair
    key.chmod(0)
    assert certificate_problems(cert, key) == [
        ("tls.private_key", f"cannot read: Permission denied ({key})")
    ]


def test_certificate_not_after(tmp_path: Path) -> None:
    """certificate_not_after is the leaf's expiry in UTC."""
    cert_pem, _ = self_signed(
        datetime(2026, 1, 1, tzinfo=UTC), datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC)
    )
    other_pem, _ = self_signed(
        datetime(2026, 1, 1, tzinfo=UTC), datetime(2030, 1, 1, tzinfo=UTC)
    )
    cert = write(tmp_path / "chain.crt", cert_pem + other_pem)
    assert certificate_not_after(cert) == datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC)


def test_certificate_not_after_errors(tmp_path: Path) -> None:
    """certificate_not_after raises for unreadable or certificate-less files."""
    with pytest.raises(OSError, match="No such file"):
        certificate_not_after(tmp_path / "missing.crt")
    with pytest.raises(ValueError, match="PEM"):
        certificate_not_after(write(tmp_path / "empty.crt", b""))


# --- certificate_warnings ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (0o600, None),
        (0o400, None),
        (0o700, None),
        (0o644, "readable by group or others (mode 0644)"),
        (0o640, "readable by group or others (mode 0640)"),
        (0o604, "readable by group or others (mode 0604)"),
        (0o620, "writable by group or others (mode 0620)"),
    ],
)
def test_key_mode_warning(
    good_pair: tuple[Path, Path], mode: int, expected: str | None
) -> None:
    """A key accessible to others gets a chmod hint; a private one gets nothing."""
    cert, key = good_pair
    key.chmod(mode)
    warnings = certificate_warnings(cert, key)
    if expected is None:
        assert warnings == []
    else:
        assert warnings == [f"private key file is {expected}; run chmod 600 {key}"]


def test_key_mode_is_not_a_problem(good_pair: tuple[Path, Path]) -> None:
    """A world-readable key is a warning, not a problem: the server still starts."""
    cert, key = good_pair
    key.chmod(0o644)
    assert certificate_problems(cert, key) == []


def test_expiry_soon_warning(tmp_path: Path) -> None:
    """A leaf expiring within 30 days is worth a warning, not a problem."""
    cert_pem, key_pem = self_signed(
        NOW - timedelta(days=300), NOW + timedelta(days=10, hours=1)
    )
    cert = write(tmp_path / "server.crt", cert_pem, 0o644)
    key = write(tmp_path / "server.key", key_pem)
    assert certificate_problems(cert, key, now=NOW) == []
    [warning] = certificate_warnings(cert, key, now=NOW)
    assert warning.startswith("certificate expires on 2026-05-11T13:00:00+00:00")
    assert "(in 10 days)" in warning


def test_no_warnings_for_missing_files(tmp_path: Path) -> None:
    """Missing files are problems, not warnings."""
    assert certificate_warnings(tmp_path / "a", tmp_path / "b") == []


# --- generate_development_certificate --------------------------------------------


def handshake(cert: Path, key: Path, server_hostname: str) -> None:
    """Run a real TLS handshake over a socketpair; the client trusts only ``cert``."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    client_sock, server_sock = socket.socketpair()
    client_sock.settimeout(10)
    server_sock.settimeout(10)
    server_errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(server_sock, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (OSError, ssl.SSLError) as err:  # client gave up: record, do not raise
            server_errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(
            client_sock, server_hostname=server_hostname
        ) as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
    finally:
        client_sock.close()
        thread.join(10)
        server_sock.close()
    assert not thread.is_alive()
    assert server_errors == []


@pytest.fixture
def dev_pair(tmp_path: Path) -> tuple[Path, Path]:
    return generate_development_certificate("ftp.example.test", tmp_path / "certs")


def test_dev_files_and_modes(tmp_path: Path, dev_pair: tuple[Path, Path]) -> None:
    """server.crt is 0644, server.key 0600, the created directory 0700."""
    cert, key = dev_pair
    assert (cert, key) == (tmp_path / "certs/server.crt", tmp_path / "certs/server.key")
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in cert.parent.iterdir()) == ["server.crt", "server.key"]


def test_dev_modes_ignore_umask(tmp_path: Path) -> None:
    """The modes are exact whatever the umask (077 would make the cert 0600)."""
    old = os.umask(0o077)
    try:
        cert, key = generate_development_certificate("localhost", tmp_path / "d")
    finally:
        os.umask(old)
    assert stat.S_IMODE(cert.stat().st_mode) == 0o644
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_dev_pair_passes_inspection(dev_pair: tuple[Path, Path]) -> None:
    """The generated pair has no problems and no warnings."""
    assert certificate_problems(*dev_pair) == []
    assert certificate_warnings(*dev_pair) == []


@pytest.mark.parametrize(
    "server_hostname", ["localhost", "127.0.0.1", "::1", "ftp.example.test"]
)
def test_dev_certificate_is_its_own_trust_anchor(
    dev_pair: tuple[Path, Path], server_hostname: str
) -> None:
    """A client with cafile=server.crt completes a verified handshake by every name."""
    handshake(*dev_pair, server_hostname)


def test_dev_certificate_refuses_other_names(dev_pair: tuple[Path, Path]) -> None:
    """Hostname verification still applies: a name not in the SAN fails."""
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(*dev_pair, "other.example.test")


def test_dev_certificate_contents(dev_pair: tuple[Path, Path]) -> None:
    """SANs, CA flags, key usages, curve and validity are as documented."""
    cert = x509.load_pem_x509_certificate(dev_pair[0].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ftp.example.test", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical
    assert (basic.value.ca, basic.value.path_length) == (True, 0)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_cert_sign
    assert not usage.key_encipherment
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == timedelta(days=DEVELOPMENT_VALIDITY_DAYS) <= timedelta(days=825)
    assert cert.not_valid_before_utc <= datetime.now(UTC)
    assert cert.issuer == cert.subject


@pytest.mark.parametrize(
    ("hostname", "dns", "ips"),
    [
        ("localhost", ["localhost"], ["127.0.0.1", "::1"]),
        ("127.0.0.1", ["localhost"], ["127.0.0.1", "::1"]),
        ("192.0.2.7", ["localhost"], ["192.0.2.7", "127.0.0.1", "::1"]),
        ("2001:db8::7", ["localhost"], ["2001:db8::7", "127.0.0.1", "::1"]),
        ("FTP.Example.Test.", ["ftp.example.test", "localhost"], ["127.0.0.1", "::1"]),
    ],
)
def test_dev_certificate_sans_deduplicated(
    tmp_path: Path, hostname: str, dns: list[str], ips: list[str]
) -> None:
    """IP literals become IP SANs; duplicates and case differences collapse."""
    cert_path, _ = generate_development_certificate(hostname, tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == dns
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address(ip) for ip in ips
    ]


def test_dev_certificate_ip_hostname_handshake(tmp_path: Path) -> None:
    """A certificate made for an IP literal verifies against that IP."""
    cert, key = generate_development_certificate("127.0.0.1", tmp_path)
    handshake(cert, key, "127.0.0.1")


@pytest.mark.parametrize(
    "hostname", ["", "bad name", "-x.example", "a..b", "fe80::1%eth0", "bücher.example"]
)
def test_dev_certificate_refuses_bad_hostname(tmp_path: Path, hostname: str) -> None:
    """Hostnames that cannot go into a SAN are refused before anything is written."""
    with pytest.raises(ValueError, match="hostname"):
        generate_development_certificate(hostname, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dev_certificate_overwrites(tmp_path: Path) -> None:
    """Generating again replaces both files with a new matching pair, modes intact."""
    cert, key = generate_development_certificate("localhost", tmp_path)
    key.chmod(0o644)  # even a loosened old key is replaced by a 0600 one
    old_key = key.read_bytes()
    cert2, key2 = generate_development_certificate("localhost", tmp_path)
    assert (cert2, key2) == (cert, key)
    assert key.read_bytes() != old_key
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert certificate_problems(cert, key) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.crt", "server.key"]


def test_dev_certificate_replaces_symlink_not_target(tmp_path: Path) -> None:
    """A symlink planted at server.key is replaced, not written through."""
    victim = write(tmp_path / "victim", b"precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "server.key").symlink_to(victim)
    _, key = generate_development_certificate("localhost", out)
    assert victim.read_bytes() == b"precious"
    assert not key.is_symlink()


def test_dev_certificate_existing_dir_mode_kept(tmp_path: Path) -> None:
    """An existing output directory is used as is (its mode is the operator's)."""
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    generate_development_certificate("localhost", out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_dev_certificate_out_dir_is_a_file(tmp_path: Path) -> None:
    """A file where the directory should be is an error."""
    target = write(tmp_path / "file", b"")
    with pytest.raises(NotADirectoryError):
        generate_development_certificate("localhost", target)

"""Real FTPS clients (curl on OpenSSL, lftp on GnuTLS) against a gateway on loopback.

Client workarounds that would hide server mistakes are switched off (see
/work/shared/CLIENTS.md): curl runs with ``--ssl-reqd`` and, for PASV, with
``--no-ftp-skip-pasv-ip``; lftp with ``ftp:fix-pasv-address no`` and certificate
verification on. Passwords go through files in ``tmp_path``, not the command line.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import subprocess
from typing import TYPE_CHECKING

import pytest

from support.credentials import PASSWORD

if TYPE_CHECKING:
    from pathlib import Path

    from support.gateway import RunningGateway

pytestmark = [
    pytest.mark.integration,
    pytest.mark.clients,
    # Each client run has its own 60 s bound; a test makes up to four of them.
    pytest.mark.timeout(300),
]

CLIENT_TIMEOUT = 60
PAYLOAD_SIZE = 5 * 1024 * 1024

CURL = shutil.which("curl")
LFTP = shutil.which("lftp")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl binary not found on PATH")
needs_lftp = pytest.mark.skipif(LFTP is None, reason="lftp binary not found on PATH")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_payload(path: Path, seed: int) -> Path:
    """Write 5 MiB of reproducible pseudo-random bytes to ``path``."""
    path.write_bytes(random.Random(seed).randbytes(PAYLOAD_SIZE))
    return path


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a client, bounded, with its output captured."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=CLIENT_TIMEOUT, check=False
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    """Everything a failed client said, for assertion messages."""
    return (
        f"command: {result.args}\nexit code: {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


# --- curl ---------------------------------------------------------------------------


def curl_config(tmp_path: Path, user: str = "acme", password: str = PASSWORD) -> Path:
    """A curl config file carrying the credentials (kept off the command line)."""
    path = tmp_path / "curl-credentials.conf"
    path.write_text(f'user = "{user}:{password}"\n', encoding="utf-8")
    path.chmod(0o600)
    return path


def curl(gateway: RunningGateway, credentials: Path, *args: str) -> list[str]:
    """A verbose FTPS curl command line against ``gateway``."""
    assert CURL is not None
    return [
        CURL, "--silent", "--show-error", "--verbose",
        "--ssl-reqd", "--cacert", str(gateway.ca_file),
        "--config", str(credentials),
        "--connect-timeout", "10", "--max-time", str(CLIENT_TIMEOUT - 10),
        *args,
    ]  # fmt: skip


CURL_VARIANTS = {
    "epsv": ([], None),
    "pasv-advertised-address": (["--disable-epsv", "--no-ftp-skip-pasv-ip"], None),
    "tls-max-1.2": (["--tls-max", "1.2"], "TLSv1.2"),
    "tls-1.3": (["--tlsv1.3"], "TLSv1.3"),
}


@needs_curl
@pytest.mark.parametrize("variant", list(CURL_VARIANTS))
def test_curl_list_upload_download(
    gateway: RunningGateway, tmp_path: Path, variant: str
) -> None:
    """curl lists the home, uploads 5 MiB and downloads it back unchanged over FTPS."""
    options, tls_version = CURL_VARIANTS[variant]
    credentials = curl_config(tmp_path)
    base = f"ftp://{gateway.host}:{gateway.port}/"
    home = gateway.home()
    home.mkdir(parents=True, exist_ok=True)
    (home / "already-there.txt").write_text("hello\n", encoding="utf-8")

    listing = run(curl(gateway, credentials, *options, base))
    assert listing.returncode == 0, explain(listing)
    assert "already-there.txt" in listing.stdout, explain(listing)

    local = make_payload(tmp_path / "payload.bin", seed=len(variant))
    upload = run(
        curl(gateway, credentials, *options, "-T", str(local), base + "up.bin")
    )
    assert upload.returncode == 0, explain(upload)
    on_disk = home / "up.bin"
    assert on_disk.is_file(), explain(upload)
    assert sha256(on_disk) == sha256(local), explain(upload)

    downloaded = tmp_path / "downloaded.bin"
    download = run(
        curl(gateway, credentials, *options, "-o", str(downloaded), base + "up.bin")
    )
    assert download.returncode == 0, explain(download)
    assert sha256(downloaded) == sha256(local), explain(download)

    after = run(curl(gateway, credentials, *options, "--list-only", base))
    assert after.returncode == 0, explain(after)
    assert "up.bin" in after.stdout.split(), explain(after)

    transcript = upload.stderr + download.stderr
    why = explain(upload) + "\n" + explain(download)
    if "--disable-epsv" in options:
        # The data connections really went to the address the 227 reply advertised.
        assert "> PASV" in transcript, why
        assert "> EPSV" not in transcript, why
        assert not re.search(r"Skip \S+ for data connection", transcript), why
        advertised = re.findall(
            r"< 227 .*\((\d+),(\d+),(\d+),(\d+),\d+,\d+\)", transcript
        )
        assert advertised, why
        assert {".".join(octets) for octets in advertised} == {gateway.host}, why
    if tls_version is not None:
        used = re.findall(r"SSL connection using (TLSv[\d.]+)", transcript)
        assert used, why
        assert set(used) == {tls_version}, why


@needs_curl
def test_curl_without_ssl_reqd_is_refused_in_clear_text(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    """A clear-text curl login is refused: curl fails and no listing is printed."""
    assert CURL is not None
    home = gateway.home()
    home.mkdir(parents=True, exist_ok=True)
    (home / "secret-listing-entry.txt").write_text("x\n", encoding="utf-8")
    credentials = curl_config(tmp_path)
    result = run(
        [
            CURL, "--silent", "--show-error", "--verbose",
            "--config", str(credentials),
            "--connect-timeout", "10", "--max-time", "30",
            f"ftp://{gateway.host}:{gateway.port}/",
        ]
    )  # fmt: skip
    assert result.returncode != 0, explain(result)
    assert result.stdout == "", explain(result)
    assert "secret-listing-entry" not in result.stderr, explain(result)
    # The server answered USER (sent in clear text) with a refusal, so curl never
    # got as far as sending the password.
    assert re.search(r"^< 530 ", result.stderr, re.MULTILINE), explain(result)
    assert "> PASS" not in result.stderr, explain(result)
    assert "< 230" not in result.stderr, explain(result)


# --- lftp ---------------------------------------------------------------------------


def lftp_script(
    gateway: RunningGateway, tmp_path: Path, *, prefer_epsv: bool, commands: list[str]
) -> Path:
    """An lftp script (password inside, mode 0600): strict FTPS, then ``commands``."""
    settings = [
        "set cmd:fail-exit true",
        "set ftp:ssl-force true",
        "set ftp:ssl-protect-data true",
        "set ftp:ssl-protect-list true",
        "set ssl:verify-certificate true",
        f'set ssl:ca-file "{gateway.ca_file}"',
        "set ftp:fix-pasv-address no",
        f"set ftp:prefer-epsv {'yes' if prefer_epsv else 'no'}",
        "set net:max-retries 1",
        "set net:timeout 10",
        "set net:reconnect-interval-base 1",
        "set xfer:clobber on",
        "debug -t 5",
        f'open -u "acme,{PASSWORD}" ftp://{gateway.host}:{gateway.port}',
    ]
    path = tmp_path / "session.lftp"
    path.write_text("\n".join([*settings, *commands]) + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path


@needs_lftp
@pytest.mark.parametrize("prefer_epsv", [True, False], ids=["epsv", "pasv"])
def test_lftp_upload_download_list(
    gateway: RunningGateway, tmp_path: Path, prefer_epsv: bool
) -> None:
    """lftp (GnuTLS) uploads and downloads 5 MiB unchanged and lists it, one session."""
    assert LFTP is not None
    local = make_payload(tmp_path / "payload.bin", seed=7 if prefer_epsv else 8)
    downloaded = tmp_path / "downloaded.bin"
    script = lftp_script(
        gateway,
        tmp_path,
        prefer_epsv=prefer_epsv,
        commands=[
            f'put "{local}" -o up.bin',
            f'get up.bin -o "{downloaded}"',
            "cls -1",
        ],
    )
    result = run([LFTP, "-f", str(script)])
    assert result.returncode == 0, explain(result)
    assert "Fatal error" not in result.stderr, explain(result)
    assert "Certificate verification" not in result.stderr, explain(result)

    on_disk = gateway.home() / "up.bin"
    assert on_disk.is_file(), explain(result)
    assert sha256(on_disk) == sha256(local), explain(result)
    assert sha256(downloaded) == sha256(local), explain(result)
    assert "up.bin" in result.stdout.split(), explain(result)

    # The debug transcript shows which passive command was used, and that lftp did
    # its work on one control connection (a silent retry would open another).
    transcript = result.stderr
    if prefer_epsv:
        assert "---> EPSV" in transcript, explain(result)
        assert "---> PASV" not in transcript, explain(result)
    else:
        assert "---> PASV" in transcript, explain(result)
        assert "---> EPSV" not in transcript, explain(result)
        assert f"Connecting data socket to ({gateway.host})" in transcript or (
            f"Connecting data socket to {gateway.host}" in transcript
        ), explain(result)
    control_connections = re.findall(r"---- Connecting to ", transcript)
    assert len(control_connections) == 1, explain(result)
    assert "---> PROT P" in transcript, explain(result)

"""Change without downtime: SIGHUP to a real server process, and the reload CLI."""

from __future__ import annotations

import hashlib
import os
import signal
import ssl
from typing import TYPE_CHECKING

import pytest
import trustme

from ftps_gateway import cli
from ftps_gateway.selftest.client import ReusingFTP_TLS
from support.configs import admin_socket_path
from support.credentials import PASSWORD, PASSWORD_HASH
from support.gateway import RunningGateway
from support.process import GatewayProcess

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

pytestmark = pytest.mark.integration

BIG = 24 * 1024 * 1024


@pytest.fixture
def server_files(tmp_path: Path, ca: trustme.CA) -> dict[str, Path]:
    directory = tmp_path / "srv"
    directory.mkdir()
    files = {
        "dir": directory,
        "cert": directory / "server.crt",
        "key": directory / "server.key",
        "ca": directory / "ca.pem",
        "config": directory / "gateway.toml",
    }
    ca.cert_pem.write_to_path(str(files["ca"]))
    return files


def _install_leaf(ca: trustme.CA, files: dict[str, Path]) -> bytes:
    """Issue a new leaf, replace the files atomically, return its DER certificate."""
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    for blob, target in (
        (b"".join(b.bytes() for b in leaf.cert_chain_pems), files["cert"]),
        (leaf.private_key_pem.bytes(), files["key"]),
    ):
        staging = target.with_suffix(".new")
        staging.write_bytes(blob)
        staging.chmod(0o600)
        os.replace(staging, target)
    return ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())


def _write_config(files: dict[str, Path], users: list[str], extra: str = "") -> None:
    user_sections = "".join(
        f'[[users]]\nname = "{name}"\npassword = "{PASSWORD_HASH}"\n' for name in users
    )
    files["config"].write_text(
        f"""
[server]
listen = ["127.0.0.1:0"]
workers = 1
[tls]
certificate = "{files["cert"]}"
private_key = "{files["key"]}"
[passive]
ports = "41000-41999"
[storage]
root = "{files["dir"] / "storage"}"
[admin]
socket = "{admin_socket_path(files["dir"])}"
{extra}
{user_sections}
""",
        encoding="utf-8",
    )


def _client(port: int, files: dict[str, Path], user: str = "acme") -> ReusingFTP_TLS:
    ftp = ReusingFTP_TLS(
        context=ssl.create_default_context(cafile=str(files["ca"])), timeout=10
    )
    ftp.connect("127.0.0.1", port)
    ftp.login(user, PASSWORD)
    ftp.prot_p()
    return ftp


def test_sighup_serves_a_new_certificate_while_a_download_finishes(
    server_files: dict[str, Path], ca: trustme.CA
) -> None:
    files = server_files
    old_der = _install_leaf(ca, files)
    _write_config(files, ["acme"])
    payload = os.urandom(BIG)
    home = files["dir"] / "storage" / "home" / "acme"
    home.mkdir(parents=True)
    (home / "big.bin").write_bytes(payload)
    server = GatewayProcess(files["config"], files["ca"], workers=1)
    try:
        old_session = _client(server.port, files)
        assert old_session.sock.getpeercert(binary_form=True) == old_der
        old_session.voidcmd("TYPE I")
        conn, _ = old_session.ntransfercmd("RETR big.bin")
        received = bytearray(conn.recv(65536))

        new_der = _install_leaf(ca, files)
        _write_config(files, ["acme", "globex"])
        server.process.send_signal(signal.SIGHUP)
        assert server.wait_for("config_reload", 1)[-1]["result"] == "ok"

        new_session = _client(server.port, files, user="globex")
        assert new_session.sock.getpeercert(binary_form=True) == new_der
        new_session.quit()

        # The old session's download, begun before the reload, completes intact.
        while chunk := conn.recv(1 << 20):
            received += chunk
        conn.unwrap()
        conn.close()
        old_session.voidresp()
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        # ... and the old session keeps working under its old settings.
        assert old_session.nlst() == ["big.bin"]
        old_session.quit()

        # An invalid config is refused whole; the running one keeps serving.
        _write_config(files, ["acme"], extra="[defender]\nmax_failures = 0\n")
        server.process.send_signal(signal.SIGHUP)
        refused = server.wait_for("config_reload", 2)[-1]
        assert refused["result"] == "refused"
        assert any(
            "defender.max_failures" in str(problem) for problem in refused["problems"]
        )  # type: ignore[attr-defined]
        still = _client(server.port, files, user="globex")
        assert still.sock.getpeercert(binary_form=True) == new_der
        still.quit()
    finally:
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.stderr)


def test_reload_through_the_cli(
    start_gateway: Callable[..., RunningGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    gw = start_gateway()
    config_path = gw.root.parent / "gateway.toml"
    text = config_path.read_text(encoding="utf-8")
    config_path.write_text(
        text.replace("[server]\n", '[server]\nbanner = "Reloaded exchange"\n'),
        encoding="utf-8",
    )
    assert cli.main(["reload", "--config", str(config_path)]) == cli.EXIT_OK
    assert capsys.readouterr().out == "configuration reloaded\n"
    ftp = gw.client(login=False)
    assert ftp.welcome == "220 Reloaded exchange"
    ftp.quit()

    config_path.write_text(
        text.replace("[server]\n", '[server]\nlisten = ["127.0.0.1:1"]\n', 1).replace(
            'listen = ["127.0.0.1:0"]\n', "", 1
        ),
        encoding="utf-8",
    )
    assert cli.main(["reload", "--config", str(config_path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert "server.listen: changed; this takes effect only on restart" in err
    assert "reload refused; the server keeps its previous config" in err
    ftp = gw.client(login=False)
    assert ftp.welcome == "220 Reloaded exchange"
    ftp.quit()

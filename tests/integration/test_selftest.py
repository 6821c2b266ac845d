"""``ftps-gateway self-test`` against the real server on loopback (issue 6).

Each failure case asserts the stage, the stable exit code and the reason word, and
that the report says what to do. The password goes through the environment, as a
partner's script would pass it, and must never appear in the output.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from ftps_gateway import cli
from ftps_gateway.selftest import runner as selftest
from ftps_gateway.selftest.report import STAGE_BY_NAME
from support.credentials import PASSWORD
from support.gateway import RunningGateway

pytestmark = pytest.mark.integration

StartGateway = Callable[..., RunningGateway]
Run = Callable[..., tuple[int, dict[str, Any]]]


@pytest.fixture
def self_test(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Run:
    """Run the CLI verb with --json; return (exit code, parsed report)."""

    def run(
        gw: RunningGateway,
        *args: str,
        password: str = PASSWORD,
        path: str = "/",
        cafile: bool = True,
    ) -> tuple[int, dict[str, Any]]:
        monkeypatch.setenv("FTPS_PASSWORD", password)
        argv = ["self-test", f"ftps://acme@{gw.host}:{gw.port}{path}", "--json"]
        argv += ["--timeout", "5", "--repeat", "3", *args]
        if cafile:
            argv += ["--cafile", str(gw.ca_file)]
        code = cli.main(argv)
        out = capsys.readouterr().out
        assert password not in out
        return code, json.loads(out)

    return run


def _step(report: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["stage"] == stage)


def _failed(report: dict[str, Any], stage: str, reason: str) -> dict[str, Any]:
    assert report["failed_stage"] == stage
    assert report["failed_reason"] == reason
    assert report["exit_code"] == STAGE_BY_NAME[stage].exit_code
    step = _step(report, stage)
    assert step["status"] == "fail"
    assert step["action"]  # every failure says what to do
    return step


def test_all_stages_pass(gateway: RunningGateway, self_test: Run) -> None:
    """A healthy server: exit 0, every stage ok, and both sides' view in one report."""
    code, report = self_test(gateway)
    assert code == 0, report
    assert report["result"] == "passed"
    stages = [s["stage"] for s in report["steps"]]
    assert stages == [
        "dns", "tcp", "banner", "auth-tls", "tls", "login", "protection", "passive",
        "data-connect", "data-tls", "list", "no-resumption", "transfer", "repeat",
        "server-view", "shutdown",
    ]  # fmt: skip
    assert all(s["status"] in ("ok", "info") for s in report["steps"])
    assert all(s["seconds"] >= 0 for s in report["steps"])
    assert _step(report, "tls")["details"]["version"] == "TLSv1.3"
    assert _step(report, "passive")["details"]["pasv_verdict"] == "same"
    assert _step(report, "data-tls")["details"]["resumed"] is True
    transfer = _step(report, "transfer")["details"]
    assert transfer["sha256"] == transfer["downloaded_sha256"]
    assert transfer["deleted"] is True
    assert list(gateway.home().iterdir()) == []  # the probe file is gone
    assert _step(report, "repeat")["details"] == {"count": 3, "resumed": 3}
    view = report["server_view"]
    assert view["client-ip"] == "127.0.0.1"
    assert view["passive-ports"] == "40000-40999"
    assert view["last-data-tls"] == "TLSv1.3 resumed"


def test_the_default_server_refuses_clients_that_do_not_resume(
    gateway: RunningGateway, self_test: Run
) -> None:
    """reuse = "required": the report tells the partner what their library needs."""
    code, report = self_test(gateway)
    assert code == 0
    probe = _step(report, "no-resumption")
    assert probe["status"] == "info"
    assert probe["reason"] == "resumption-required"
    assert "not resumed" in probe["summary"]
    assert "must resume TLS sessions" in probe["action"]
    assert 'reuse = "ip-match"' in probe["action"]


def test_ip_match_accepts_clients_that_do_not_resume(
    start_gateway: StartGateway, self_test: Run
) -> None:
    """reuse = "ip-match": the report says a non-resuming client works."""
    gw = start_gateway(tls_extra='reuse = "ip-match"')
    code, report = self_test(gw)
    assert code == 0
    probe = _step(report, "no-resumption")
    assert probe["reason"] == "resumption-optional"
    assert probe["details"] == {"accepted": True}
    assert report["server_view"]["data-reuse"] == "ip-match (default)"


def test_human_report_names_each_step_and_the_result(
    gateway: RunningGateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without --json: one line per step with its timing, then the server's view."""
    monkeypatch.setenv("FTPS_PASSWORD", PASSWORD)
    url = f"ftps://acme@localhost:{gateway.port}/"
    code = cli.main(["self-test", url, "--cafile", str(gateway.ca_file)])
    out = capsys.readouterr().out
    assert code == 0
    assert "[ ok ] DNS resolution" in out
    assert "localhost -> " in out
    assert "What the server sees (SITE DIAG):" in out
    assert "RESULT: passed (exit code 0)" in out
    assert PASSWORD not in out


def test_wrong_password(gateway: RunningGateway, self_test: Run) -> None:
    """Exit 15; the report explains the deliberately uniform 530."""
    code, report = self_test(gateway, password="not the password")
    assert code == 15
    step = _failed(report, "login", "login-refused")
    assert "530" in step["summary"]
    assert "password" in step["action"]


def test_untrusted_certificate(gateway: RunningGateway, self_test: Run) -> None:
    """No --cafile: the system store does not know the test CA; exit 14."""
    code, report = self_test(gateway, cafile=False)
    assert code == 14
    step = _failed(report, "tls", "certificate-untrusted")
    assert step["details"]["fingerprint"].startswith("sha256:")
    assert "--cafile" in step["action"]
    assert "TLS-inspecting" in step["action"]


def test_hostname_mismatch(gateway: RunningGateway, self_test: Run) -> None:
    """The certificate holds localhost and 127.0.0.1, not the name checked."""
    code, report = self_test(gateway, "--servername", "ftp.example.com")
    assert code == 14
    step = _failed(report, "tls", "hostname-mismatch")
    assert "localhost, 127.0.0.1" in step["action"]


def test_pinned_fingerprint(gateway: RunningGateway, self_test: Run) -> None:
    """The right pin passes; another one is reported as interception."""
    code, report = self_test(gateway)
    real = _step(report, "tls")["details"]["fingerprint"]
    code, report = self_test(gateway, "--pin", real, "--read-only")
    assert code == 0
    assert "matches --pin" in _step(report, "tls")["summary"]
    code, report = self_test(gateway, "--pin", "sha256:" + "ab" * 32)
    assert code == 14
    step = _failed(report, "tls", "pin-mismatch")
    assert "TLS-inspecting proxy" in step["summary"]


@pytest.mark.parametrize("address", ["10.1.2.3", "192.0.2.7"])
def test_server_advertising_a_wrong_passive_address(
    start_gateway: StartGateway, self_test: Run, address: str
) -> None:
    """The 227 address is named as the server's NAT setting; EPSV still transfers.

    The advertised address is never contacted (nothing leaves the machine).
    """
    gw = start_gateway(extra=f'address = "{address}"')
    code, report = self_test(gw)
    assert code == 17
    step = _failed(report, "passive", "pasv-address-different")
    assert f"advertises {address}, but you connected to 127.0.0.1" in step["summary"]
    assert "NAT/masquerade" in step["summary"]
    assert '[passive] address = "127.0.0.1"' in step["action"]
    # Not blocking: the rest ran over EPSV, so the report is complete.
    assert _step(report, "transfer")["status"] == "ok"
    assert report["server_view"]["passive-address"] == address


def test_closed_control_port(gateway: RunningGateway, self_test: Run) -> None:
    """Nothing listens: a reset comes back at once, told apart from a drop; exit 11."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    closed = RunningGateway(gateway.server, "127.0.0.1", port, gateway.root,
                            gateway.ca_file)  # fmt: skip
    code, report = self_test(closed)
    assert code == 11
    step = _failed(report, "tcp", "tcp-refused")
    assert "refused the connection (TCP reset)" in step["summary"]
    assert "not a firewall drop" in step["action"]
    assert [s["stage"] for s in report["steps"]] == ["dns", "tcp"]


def test_read_only_skips_the_upload(gateway: RunningGateway, self_test: Run) -> None:
    """--read-only: no file is written, the rest still runs."""
    code, report = self_test(gateway, "--read-only")
    assert code == 0
    assert _step(report, "transfer")["status"] == "skip"
    assert _step(report, "repeat")["status"] == "ok"


def test_an_existing_file_named_in_the_url_is_left_alone(
    gateway: RunningGateway, self_test: Run
) -> None:
    """The probe never overwrites or deletes a partner's file."""
    keep = gateway.home() / "keep.txt"
    keep.write_bytes(b"partner data")
    code, report = self_test(gateway, path="/keep.txt")
    assert code == 0
    assert keep.read_bytes() == b"partner data"
    step = _step(report, "transfer")
    assert step["summary"].startswith("/keep.txt exists already")
    assert step["details"]["path"].startswith("/ftps-selftest-")
    assert sorted(p.name for p in gateway.home().iterdir()) == ["keep.txt"]


def test_upload_to_a_named_path(gateway: RunningGateway, self_test: Run) -> None:
    """A new file name in the URL is used for the probe, then deleted."""
    code, report = self_test(gateway, path="/probe.bin")
    assert code == 0
    assert _step(report, "transfer")["details"]["path"] == "/probe.bin"
    assert not (gateway.home() / "probe.bin").exists()


def test_passive_scan_reports_refused_ports_as_reachable(
    gateway: RunningGateway, self_test: Run
) -> None:
    """On loopback every idle passive port answers with a reset: the path is open."""
    code, report = self_test(gateway, "--scan-passive", "4", "--read-only")
    assert code == 0
    scan = _step(report, "passive-scan")
    assert scan["status"] == "ok"
    assert scan["details"] == {"refused": [40000, 40333, 40666, 40999]}
    assert "the path to the server host is open" in scan["summary"]


def test_run_in_process_returns_the_report(gateway: RunningGateway) -> None:
    """The library entry point, as a health check would call it."""
    target = selftest.parse_target(f"ftps://acme@127.0.0.1:{gateway.port}/")
    options = selftest.Options(cafile=str(gateway.ca_file), read_only=True, repeat=1)
    report = selftest.run(target, PASSWORD, options)
    assert report.exit_code == 0
    assert report.server_view is not None


def test_a_directory_named_without_slash_gets_a_unique_probe(
    gateway: RunningGateway, self_test: Run
) -> None:
    """ftps://user@host/inbox is a directory: the probe goes inside it."""
    (gateway.home() / "inbox").mkdir()
    code, report = self_test(gateway, path="/inbox")
    assert code == 0
    assert _step(report, "transfer")["details"]["path"].startswith(
        "/inbox/ftps-selftest-"
    )
    assert list((gateway.home() / "inbox").iterdir()) == []


def test_implicit_tls(
    start_gateway: StartGateway,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ftpsi://: TLS first, then the greeting; no AUTH TLS step."""
    gw = start_gateway(server_extra='implicit_listen = ["127.0.0.1:0"]')
    (port,) = [port for _host, port in gw.server.implicit_addresses]
    monkeypatch.setenv("FTPS_PASSWORD", PASSWORD)
    url = f"ftpsi://acme@127.0.0.1:{port}/"
    code = cli.main(["self-test", url, "--json", "--cafile", str(gw.ca_file)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    stages = [s["stage"] for s in report["steps"]]
    assert stages[:5] == ["dns", "tcp", "tls", "banner", "login"]


def test_implicit_tls_untrusted_still_describes_the_certificate(
    start_gateway: StartGateway, self_test: Run
) -> None:
    """The certificate is fetched again, unverified, only to describe it."""
    gw = start_gateway(server_extra='implicit_listen = ["127.0.0.1:0"]')
    (port,) = [port for _host, port in gw.server.implicit_addresses]
    implicit = RunningGateway(gw.server, gw.host, port, gw.root, gw.ca_file)
    code, report = self_test(implicit, "--implicit", cafile=False)
    assert code == 14
    step = _failed(report, "tls", "certificate-untrusted")
    assert "localhost, 127.0.0.1" in step["summary"]

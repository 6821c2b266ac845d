"""The self-test's pure parts: URL, pins, passive addresses, ports, report, exit codes."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import pytest

from ftps_gateway import cli
from ftps_gateway.ftp import replies
from ftps_gateway.selftest import runner as selftest
from ftps_gateway.selftest.report import (
    STAGES,
    Report,
    Status,
    Step,
    render_json,
    render_text,
)

# --- URL


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftps://acme@ftp.example.com/", ("ftp.example.com", 21, "acme", "/", False)),
        ("ftps://acme@ftp.example.com", ("ftp.example.com", 21, "acme", "", False)),
        (
            "ftps://acme@10.0.0.1:2121/in/x.bin",
            ("10.0.0.1", 2121, "acme", "/in/x.bin", False),
        ),
        ("ftpsi://acme@h/", ("h", 990, "acme", "/", True)),
        ("FTPS://a%40b@[2001:db8::1]:21/", ("2001:db8::1", 21, "a@b", "/", False)),
    ],
)
def test_parse_target(url: str, expected: tuple[object, ...]) -> None:
    t = selftest.parse_target(url)
    assert (t.host, t.port, t.user, t.path, t.implicit) == expected


def test_implicit_flag_changes_the_default_port() -> None:
    t = selftest.parse_target("ftps://acme@h/", implicit=True)
    assert (t.port, t.implicit) == (990, True)
    assert t.url() == "ftpsi://acme@h:990/"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://acme@h/", "must start with ftps://"),
        ("ftps://h/", "needs a user name"),
        ("ftps://acme@:21/", "needs a host"),
        ("ftps://acme@h:99999/", "bad port"),
        ("ftps://acme@h/?x=1", "takes no"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        selftest.parse_target(url)


def test_a_password_in_the_url_is_refused_without_echoing_it() -> None:
    with pytest.raises(ValueError, match="holds a password") as info:
        selftest.parse_target("ftps://acme:s3cret-pw@h/")
    assert "s3cret-pw" not in str(info.value)


def test_cli_refuses_a_password_in_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["self-test", "ftps://acme:s3cret-pw@h/"]) == 2
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.out + captured.err
    assert "--password-file" in captured.err


# --- password sources


def test_password_file_then_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parser = cli.build_parser()
    secret = tmp_path / "pw"
    secret.write_text("from-file\nignored\n", encoding="utf-8")
    monkeypatch.setenv("FTPS_PASSWORD", "from-env")
    args = parser.parse_args(
        ["self-test", "ftps://a@h/", "--password-file", str(secret)]
    )
    assert cli._self_test_password(args, "a") == "from-file"
    args = parser.parse_args(["self-test", "ftps://a@h/"])
    assert cli._self_test_password(args, "a") == "from-env"
    monkeypatch.setenv("OTHER", "other-env")
    args = parser.parse_args(["self-test", "ftps://a@h/", "--password-env", "OTHER"])
    assert cli._self_test_password(args, "a") == "other-env"


def test_no_password_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FTPS_PASSWORD", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli.main(["self-test", "ftps://a@h/"]) == 2
    assert "no password" in capsys.readouterr().err


def test_unreadable_password_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing"
    assert cli.main(["self-test", "ftps://a@h/", "--password-file", str(missing)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_dns_failure_is_stage_10(monkeypatch: pytest.MonkeyPatch) -> None:
    """No real lookup: getaddrinfo fails as it does for an unknown name."""

    def fail(*_args: object, **_kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    report = selftest.run(
        selftest.parse_target("ftps://a@ftp.example.invalid/"),
        "pw-not-shown",
        selftest.Options(),
    )
    assert report.exit_code == 10
    step = report.steps[0]
    assert (step.stage, step.reason) == ("dns", "dns-failed")
    assert "does not resolve" in step.summary


# --- pins and fingerprints


def test_parse_pin_accepts_colons_and_case() -> None:
    digest = "AB:" * 31 + "AB"
    assert selftest.parse_pin(f"sha256:{digest}") == "ab" * 32
    assert selftest.parse_pin("SHA256:" + "0f" * 32) == "0f" * 32


@pytest.mark.parametrize(
    "pin", ["md5:" + "00" * 32, "sha256:abc", "sha256:" + "zz" * 32]
)
def test_parse_pin_refuses_others(pin: str) -> None:
    with pytest.raises(ValueError, match="--pin"):
        selftest.parse_pin(pin)


def test_fingerprint_round_trips_through_parse_pin() -> None:
    shown = selftest.fingerprint(b"certificate")
    assert shown.startswith("sha256:")
    assert len(selftest.parse_pin(shown)) == 64


# --- passive addresses


@pytest.mark.parametrize(
    ("advertised", "connected", "kind"),
    [
        ("203.0.113.5", "203.0.113.5", "same"),
        ("203.0.113.5", "::ffff:203.0.113.5", "same"),
        ("10.0.0.5", "203.0.113.5", "private"),
        ("192.168.1.10", "198.51.100.1", "private"),
        ("100.64.1.1", "198.51.100.1", "private"),
        ("127.0.0.1", "198.51.100.1", "private"),
        ("198.51.100.9", "203.0.113.5", "different"),
        ("10.0.0.5", "10.0.0.6", "different"),
        ("0.0.0.0", "203.0.113.5", "unspecified"),
    ],
)
def test_classify_passive_address(advertised: str, connected: str, kind: str) -> None:
    verdict = selftest.classify_passive_address(advertised, connected)
    assert verdict.kind == kind
    assert verdict.ok == (kind == "same")
    if kind in ("private", "different"):
        assert "NAT/masquerade" in verdict.explanation


def test_port_helpers() -> None:
    assert selftest.port_ranges([7, 1, 2, 3, 9, 10]) == "1-3, 7, 9-10"
    assert selftest.port_ranges([]) == ""
    assert selftest.sample_ports(40000, 40099, 3) == [40000, 40050, 40099]
    assert selftest.sample_ports(1, 3, 10) == [1, 2, 3]
    assert selftest.sample_ports(5, 9, 1) == [5]
    assert selftest.parse_port_range("40000-40099") == (40000, 40099)
    assert selftest.parse_port_range("x") is None


def test_parse_diag() -> None:
    reply = (
        f"{replies.DIAG_HEAD}\n node: gw1\n client-ip: 203.0.113.5\n"
        f" last-data-tls: TLSv1.3 resumed\n{replies.DIAG_END}"
    )
    assert selftest.parse_diag(reply) == {
        "node": "gw1",
        "client-ip": "203.0.113.5",
        "last-data-tls": "TLSv1.3 resumed",
    }


# --- report and exit codes


def test_exit_codes_are_stable() -> None:
    """A contract for scripts: changing a number breaks partners' automation."""
    assert {s.name: s.exit_code for s in STAGES} == {
        "dns": 10, "tcp": 11, "banner": 12, "auth-tls": 13, "tls": 14, "login": 15,
        "protection": 16, "passive": 17, "data-connect": 18, "data-tls": 19,
        "list": 20, "transfer": 21, "repeat": 22, "shutdown": 23,
    }  # fmt: skip


def _report(*steps: Step) -> Report:
    report = Report("ftps://acme@h:21/", "2026-01-01T00:00:00Z", secrets=("hunter22",))
    for step in steps:
        report.add(step)
    return report


def test_first_failure_decides_the_exit_code() -> None:
    report = _report(
        Step("dns", Status.OK, 0.001, "h -> 203.0.113.5"),
        Step("passive", Status.FAIL, 0.01, "advertises 10.0.0.5", "fix NAT",
             "pasv-address-private"),
        Step("no-resumption", Status.INFO, 0.01, "refused"),
        Step("transfer", Status.FAIL, 0.02, "differs", "check", "probe-differs"),
    )  # fmt: skip
    assert report.exit_code == 17
    data = report.to_dict()
    assert (data["result"], data["failed_stage"], data["failed_reason"]) == (
        "failed", "passive", "pasv-address-private",
    )  # fmt: skip
    assert _report(Step("tls", Status.WARN, 0, "expires soon")).exit_code == 0


def test_rendering_redacts_secrets_and_shows_actions() -> None:
    report = _report(
        Step("login", Status.FAIL, 0.5, "refused for password hunter22", "check it",
             "login-refused"),
    )  # fmt: skip
    report.server_view = {"client-ip": "203.0.113.5", "node": "gw1"}
    text = render_text(report)
    assert "hunter22" not in text
    assert "[FAIL] Login" in text
    assert "what to do: check it" in text
    assert "client-ip  203.0.113.5" in text
    assert "RESULT: FAILED at 'Login' [login/login-refused] (exit code 15)" in text
    as_json = render_json(report)
    assert "hunter22" not in as_json
    assert json.loads(as_json)["steps"][0]["title"] == "Login"


def test_passed_report_counts_warnings() -> None:
    text = render_text(_report(Step("tls", Status.WARN, 0.1, "expires in 9 days")))
    assert "RESULT: passed with 1 warning (exit code 0)" in text

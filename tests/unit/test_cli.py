"""The command line, called in-process: exit codes and what it prints."""

from __future__ import annotations

import io
import json
import logging
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ftps_gateway import cli
from ftps_gateway.policy import passwords
from support.configs import write_config
from support.credentials import PASSWORD_HASH


def test_check_config_prints_a_redacted_summary(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A valid config exits 0 and summarizes users without their hashes."""
    path = write_config(tmp_path, cert_files)
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "acme" in out
    assert PASSWORD_HASH not in out
    assert "$argon2" not in out


def test_bad_config_exits_3_with_every_problem_and_no_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each problem is one line naming the key; the count follows; exit status 3."""
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:99999"]\nbogus = 1\n', encoding="utf-8"
    )
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"{path}: server.listen[0]: port must be 0 to 65535" in err
    assert f"{path}: server.bogus: unknown key" in err
    assert "configuration problems; fix them" in err
    assert "Traceback" not in err


def test_debug_adds_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--debug shows where a configuration error came from."""
    path = tmp_path / "gateway.toml"
    path.write_text("[server\n", encoding="utf-8")
    assert (
        cli.main(["--debug", "check-config", "--config", str(path)]) == cli.EXIT_CONFIG
    )
    assert "Traceback" in capsys.readouterr().err


def test_missing_config_file_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that does not exist is a configuration error, not a crash."""
    assert (
        cli.main(["serve", "--config", str(tmp_path / "nope.toml")]) == cli.EXIT_CONFIG
    )
    assert "nope.toml" in capsys.readouterr().err


def test_hash_password_reads_stdin_and_prints_an_argon2id_hash(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The password comes from stdin (never argv) and the hash verifies it."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret pass\n"))
    assert cli.main(["hash-password"]) == cli.EXIT_OK
    printed = capsys.readouterr().out.strip()
    assert passwords.is_argon2id_hash(printed)
    assert passwords.PasswordVerifier().verify(printed, "s3cret pass")


def test_hash_password_refuses_an_empty_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty line prints no hash and fails."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert cli.main(["hash-password"]) == cli.EXIT_FAILURE
    assert capsys.readouterr().out == ""


def test_gen_cert_writes_a_private_key_only_we_can_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """gen-cert writes server.crt and a 0600 server.key and says where."""
    assert (
        cli.main(["gen-cert", "--hostname", "ftp.example.com", "--out", str(tmp_path)])
        == 0
    )
    key = tmp_path / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (tmp_path / "server.crt").exists()
    assert str(key) in capsys.readouterr().out


def test_usage_errors_exit_2() -> None:
    """argparse's own exit status for a missing verb."""
    with pytest.raises(SystemExit) as exited:
        cli.main([])
    assert exited.value.code == cli.EXIT_USAGE


@pytest.fixture
def restored_loggers() -> Iterator[None]:
    """configure_logging changes process-wide loggers: put them back afterwards."""
    names = [
        "",
        "ftps_gateway",
        "pyftpdlib",
        "ftps_gateway.audit",
        "ftps_gateway.xferlog",
    ]
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in names
        for lg in [logging.getLogger(name)]
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        for handler in lg.handlers:
            if handler not in handlers:
                handler.close()
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.mark.usefixtures("restored_loggers")
def test_audit_and_xferlog_files(tmp_path: Path) -> None:
    """Both logs go to their files, one line per record, created with their folder."""
    from ftps_gateway.audit import AuditLog, Transfer

    audit_file = tmp_path / "logs" / "audit.jsonl"
    xferlog_file = tmp_path / "logs" / "xferlog"
    for name in ("ftps_gateway.audit", "ftps_gateway.xferlog"):
        logging.getLogger(name).handlers.clear()
    cli.configure_logging("info", False, audit_file, xferlog_file)
    log = AuditLog()
    log.event("login_ok", user="acme", password="never written")
    log.xferlog(Transfer(0.0, 2.4, "198.51.100.7", 10, "/a b", True, "acme", True))
    for handler in logging.getLogger("ftps_gateway.audit").handlers:
        handler.flush()
    (line,) = audit_file.read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert (record["event"], record["user"]) == ("login_ok", "acme")
    assert "password" not in record
    (xfer,) = xferlog_file.read_text(encoding="utf-8").splitlines()
    assert xfer.split()[5:] == [
        "2", "198.51.100.7", "10", "/a_b", "b", "_", "i", "r", "acme", "ftp", "0", "*",
        "c",
    ]  # fmt: skip
    assert oct(audit_file.stat().st_mode & 0o777) == "0o640"


@pytest.mark.usefixtures("restored_loggers")
def test_audit_file_follows_logrotate(tmp_path: Path) -> None:
    """A line after logrotate moved the file goes to a new file of the same name."""
    from ftps_gateway.audit import AuditLog

    audit_file = tmp_path / "audit.jsonl"
    logging.getLogger("ftps_gateway.audit").handlers.clear()
    cli.configure_logging("info", False, audit_file)
    log = AuditLog()
    log.event("connect", session="s1")
    audit_file.rename(tmp_path / "audit.jsonl.1")
    log.event("login_ok", session="s1")
    moved = (tmp_path / "audit.jsonl.1").read_text(encoding="utf-8").splitlines()
    fresh = audit_file.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["event"] for line in moved] == ["connect"]
    assert [json.loads(line)["event"] for line in fresh] == ["login_ok"]


@pytest.mark.usefixtures("restored_loggers")
def test_audit_lines_on_stdout_are_bare_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without an audit file, each event is one JSON line on stdout, nothing else."""
    from ftps_gateway.audit import AuditLog

    logging.getLogger("ftps_gateway.audit").handlers.clear()
    cli.configure_logging("info", False)
    log = AuditLog()
    log.event("connect", session="s1", password="never written")
    log.event("quit", session="s1")
    lines = capsys.readouterr().out.splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["event"] for r in records] == ["connect", "quit"]
    assert all("password" not in r for r in records)


@pytest.mark.usefixtures("restored_loggers")
def test_audit_file_write_errors_go_where_logging_sends_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A failing write is reported like any logging handler error, not raised."""
    from ftps_gateway.audit import AuditLog

    audit_file = tmp_path / "audit.jsonl"
    logger = logging.getLogger("ftps_gateway.audit")
    logger.handlers.clear()
    cli.configure_logging("info", False, audit_file)
    (handler,) = logger.handlers
    handler.stream.close()  # type: ignore[attr-defined]  # writes now raise ValueError
    AuditLog().event("connect", session="s1")
    handler.stream = None  # type: ignore[attr-defined]  # nothing left to flush
    assert "--- Logging error ---" in capsys.readouterr().err


def test_audit_timestamps_follow_the_clock_across_seconds(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The second's text is reused within a second and renewed after it."""
    from ftps_gateway import audit

    caplog.set_level(logging.INFO, logger="ftps_gateway.audit")
    log = audit.AuditLog()
    for now in (1_800_000_000.25, 1_800_000_000.999, 1_800_000_001.0, 1_799_999_999.5):
        monkeypatch.setattr(audit.time, "time", lambda now=now: now)
        log.event("noop", value=object())  # anything else is written as its str()
    stamps = [json.loads(r.getMessage())["ts"] for r in caplog.records]
    assert stamps == [
        "2027-01-15T08:00:00.250Z",
        "2027-01-15T08:00:00.999Z",
        "2027-01-15T08:00:01.000Z",
        "2027-01-15T07:59:59.500Z",
    ]


def test_check_config_warns_about_a_public_proxy_source(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """It loads (exit 0), but check-config says why the range is risky."""
    path = write_config(
        tmp_path, cert_files,
        server_extra='proxy_protocol_from = ["203.0.113.0/24"]',
    )  # fmt: skip
    assert cli.main(["check-config", "--config", str(path)]) == cli.EXIT_OK
    out = capsys.readouterr().out
    assert "warning: server.proxy_protocol_from[0]: 203.0.113.0/24 is public" in out

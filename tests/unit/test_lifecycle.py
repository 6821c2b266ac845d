"""What one process and a supervisor of workers share: binding, kept state, reload, signals."""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from ftps_gateway import config as config_module
from ftps_gateway.audit import AuditLog
from ftps_gateway.config import GatewayConfig, ListenAddress
from ftps_gateway.errors import ConfigError, StartupError
from ftps_gateway.metrics.gateway import GatewayMetrics
from ftps_gateway.service import lifecycle
from ftps_gateway.session.state import LIMIT_PER_IP, LoginSlot
from support.configs import write_config

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

RELOADS = "ftps_gateway_config_reloads_total"


@pytest.fixture
def systemd() -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET (short path)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(str(path))
            sock.settimeout(5)
            os.environ["NOTIFY_SOCKET"] = str(path)
            try:
                yield sock
            finally:
                del os.environ["NOTIFY_SOCKET"]


def _received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on ``sock``."""
    sock.setblocking(False)
    messages = []
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages


def _reloads(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """The config_reload audit records, without their time stamps."""
    return [
        {key: value for key, value in record.items() if key != "ts"}
        for record in records
        if record["event"] == "config_reload"
    ]


def _config(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], **kwargs: str
) -> GatewayConfig:
    return config_module.load(write_config(tmp_path, cert_files, **kwargs))


def _reload_to(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], server_extra: str
) -> tuple[list[str], list[GatewayConfig], GatewayMetrics]:
    """Start from the default config, rewrite it with ``server_extra``, reload.

    Returns:
        The problems, the configs handed to ``apply``, and the metrics counted.
    """
    current = _config(tmp_path, cert_files)
    write_config(tmp_path, cert_files, server_extra=server_extra)
    metrics = GatewayMetrics(process_metrics=False)
    applied: list[GatewayConfig] = []
    problems = lifecycle.reload_config(
        current, applied.append, audit=AuditLog(), metrics=metrics, tell_systemd=True
    )
    return problems, applied, metrics


def test_refused_reload_is_audited_counted_logged_and_told_to_systemd(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    systemd: socket.socket,
    audit_records: Callable[[], list[dict[str, object]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A change only a restart applies is refused once, on every channel, unapplied."""
    problems, applied, metrics = _reload_to(tmp_path, cert_files, "workers = 2")
    assert problems == ["server.workers: changed; this takes effect only on restart"]
    assert applied == []
    assert _reloads(audit_records()) == [
        {"event": "config_reload", "result": "refused", "problems": problems}
    ]
    assert metrics.registry.get_sample_value(RELOADS, {"result": "invalid-config"}) == 1
    assert metrics.registry.get_sample_value(RELOADS, {"result": "ok"}) == 0
    assert f"reload refused: {problems[0]}" in caplog.messages
    reloading, ready = _received(systemd)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert ready == "READY=1\nSTATUS=reload refused"


def test_accepted_reload_is_applied_then_reported(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    systemd: socket.socket,
    audit_records: Callable[[], list[dict[str, object]]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A valid config reaches ``apply``; the outcome says ok with the file it came from."""
    caplog.set_level(logging.INFO, logger="ftps_gateway")
    problems, applied, metrics = _reload_to(tmp_path, cert_files, "max_sessions = 7")
    path = tmp_path / "gateway.toml"
    assert problems == []
    assert [config.server.max_sessions for config in applied] == [7]
    assert _reloads(audit_records()) == [
        {"event": "config_reload", "result": "ok", "source": str(path)}
    ]
    assert metrics.registry.get_sample_value(RELOADS, {"result": "ok"}) == 1
    assert f"configuration reloaded from {path}" in caplog.messages
    assert _received(systemd)[-1] == "READY=1\nSTATUS=reloaded"


def test_a_worker_neither_counts_for_the_supervisor_nor_speaks_to_systemd(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    systemd: socket.socket,
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """Without metrics and systemd (supervisor, worker) only the audit line is written."""
    current = _config(tmp_path, cert_files)
    problems = lifecycle.reload_config(
        current, lambda _new: None, audit=AuditLog(), metrics=None, tell_systemd=False
    )
    assert problems == []
    assert [r["result"] for r in audit_records() if r["event"] == "config_reload"] == [
        "ok"
    ]
    assert _received(systemd) == []


def test_what_apply_refuses_is_reported_as_the_problems(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    audit_records: Callable[[], list[dict[str, object]]],
) -> None:
    """``apply`` raising a ConfigError (an unusable certificate) refuses the reload."""
    current = _config(tmp_path, cert_files)

    def refuse(_new: GatewayConfig) -> None:
        raise ConfigError(["tls.certificate: OpenSSL refused it"])

    problems = lifecycle.reload_config(
        current, refuse, audit=AuditLog(), metrics=None, tell_systemd=False
    )
    assert problems == ["tls.certificate: OpenSSL refused it"]
    assert audit_records()[-1]["result"] == "refused"


def test_kept_state_keeps_its_counts_under_new_limits(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A reload's limits apply to the next session; sessions counted before stay."""
    first = tmp_path / "first"
    first.mkdir()
    state = lifecycle.new_kept_state(
        _config(first, cert_files, server_extra="max_sessions_per_ip = 5")
    )
    answers: list[str | None] = []
    for user in ("acme", "globex"):
        state.login(LoginSlot("192.0.2.1", user), answers.append)
    lifecycle.update_kept_state(
        _config(tmp_path, cert_files, server_extra="max_sessions_per_ip = 2"), state
    )
    assert state.snapshot().per_address == {"192.0.2.1": 2}
    state.login(LoginSlot("192.0.2.1", "initech"), answers.append)
    assert answers == [None, None, LIMIT_PER_IP]


def test_bind_listeners_names_the_key_and_closes_what_it_bound() -> None:
    """One busy address fails the start with the config key; no socket is left open."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        fds_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(StartupError) as caught:
            lifecycle.bind_listeners(
                [ListenAddress("127.0.0.1", 0), ListenAddress("127.0.0.1", port)],
                "server.implicit_listen",
            )
        assert str(caught.value).startswith(
            f"server.implicit_listen: cannot listen on 127.0.0.1:{port}: "
        )
        assert len(os.listdir("/proc/self/fd")) == fds_before


def test_signal_handlers_map_the_three_signals_and_restore_when_asked() -> None:
    """SIGTERM drains, SIGINT stops, SIGHUP reloads; ``restore`` puts back the old ones."""
    before = {
        s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    heard: list[str] = []
    restore = lifecycle.install_signal_handlers(
        drain=lambda: heard.append("drain"),
        stop=lambda: heard.append("stop"),
        reload=lambda: heard.append("reload"),
    )
    try:
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.raise_signal(signum)
    finally:
        restore()
    assert heard == ["reload", "drain", "stop"]
    assert {s: signal.getsignal(s) for s in before} == before

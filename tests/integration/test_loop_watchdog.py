"""The loop watchdog on a real server: a stuck IO loop turns /readyz red, is logged
once with its stack and counted; a worker's stall reaches the supervisor's state.

The stall is real: a callback that blocks, run on the server's own IO loop (what a
slow disk under a file operation on the loop, or a bug, would do).
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftps_gateway import config as config_module
from ftps_gateway.policy.passwords import PasswordVerifier
from ftps_gateway.service import lifecycle, sharedstate
from ftps_gateway.service.server import GatewayServer, WorkerRole
from ftps_gateway.service.supervisor import Supervisor
from support.configs import write_config
from support.credentials import FAST_PARAMETERS
from support.gateway import RunningGateway
from support.metrics import scrape, values_in_files

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

StartGateway = Callable[..., RunningGateway]
METRICS = '[metrics]\nlisten = "127.0.0.1:0"'
STALL = "loop_stall_seconds = 1\nlogin_timeout_seconds = 5"


def _readyz(gw: RunningGateway) -> tuple[int, str]:
    assert gw.server.health is not None
    host, port = gw.server.health.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _block_loop(waker: object, held: threading.Event) -> None:
    """Run a callback on the IO loop that does not return until ``held`` is set."""

    def stuck_on_the_loop() -> None:
        held.wait(60)

    waker.call_soon_threadsafe(stuck_on_the_loop)  # type: ignore[attr-defined]


def test_a_stuck_loop_fails_readiness_is_logged_once_and_counted(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """/readyz says the loop is stalled while it is; one error names where it is
    stuck; the stall is counted; all clears when the loop turns again."""
    caplog.set_level(logging.INFO, logger="ftps_gateway")
    gw = start_gateway(sections=METRICS, server_extra=STALL)
    assert _readyz(gw) == (200, "ready\n")
    held = threading.Event()
    _block_loop(gw.server.waker, held)
    try:
        _until(lambda: _readyz(gw)[0] == 503, "/readyz to fail")
        assert _readyz(gw)[1].startswith("IO loop stalled for ")
        time.sleep(1.0)  # a few more pings: still one report
    finally:
        held.set()
    _until(lambda: _readyz(gw) == (200, "ready\n"), "/readyz to recover")
    stalls = [r for r in caplog.records if "has not turned" in r.getMessage()]
    assert len(stalls) == 1
    assert "stuck_on_the_loop" in stalls[0].getMessage()
    assert any("turned again" in r.getMessage() for r in caplog.records)
    assert gw.server.health is not None
    samples = scrape(gw.server.health.address[1])
    assert samples[("ftps_gateway_io_loop_stalls_total", ())] == 1
    assert samples[("ftps_gateway_io_loop_stalled", ())] == 0
    ftp = gw.client()  # and it serves
    assert ftp.voidcmd("NOOP").startswith("200")
    ftp.quit()


@pytest.fixture
def worker_metrics(tmp_path: Path) -> Iterator[None]:
    """This process's metrics in files while an in-thread worker runs."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    with values_in_files(folder):
        yield


@pytest.mark.usefixtures("worker_metrics")
def test_a_workers_stall_reaches_the_supervisors_readiness(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """A worker (its channel to a real StateService, as under the supervisor) reports
    its stall and its recovery; the supervisor's readiness check names it."""
    path = write_config(tmp_path, cert_files, server_extra=STALL)
    config = config_module.load(path)
    service = sharedstate.StateService(lifecycle.new_kept_state(config))
    supervisor_end, worker_end = sharedstate.channel_pair()
    service.serve(supervisor_end, 0)
    role = WorkerRole(
        index=0, count=1,
        explicit=lifecycle.bind_listeners(config.server.listen, "server.listen"),
        implicit=[], channel=worker_end,
    )  # fmt: skip
    server = GatewayServer(
        config, verifier=PasswordVerifier(parameters=FAST_PARAMETERS), worker=role
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ready = SimpleNamespace(state=service)
    held = threading.Event()
    try:
        assert Supervisor._stalled_workers_problem(ready) is None  # type: ignore[arg-type]
        _block_loop(server.waker, held)
        _until(lambda: 0 in service.loop_stalls, "the worker's report")
        problem = Supervisor._stalled_workers_problem(ready)  # type: ignore[arg-type]
        assert problem is not None
        assert problem.startswith("worker 1: IO loop stalled for ")
        held.set()
        _until(lambda: not service.loop_stalls, "the recovery report")
    finally:
        held.set()
        server.stop()
        thread.join(20)
        worker_end.close()
    assert not thread.is_alive()

"""A Go crypto/tls client uploads to a gateway on loopback (issue 3).

Go FTP libraries write an upload and close the data connection without ever reading
from it. A TLS 1.3 server that sends session tickets on data connections then gets a
TCP reset instead of the tail of the upload (CLIENTS.md). These tests upload 200 files
of varied size per TLS version with such a client and compare every file on disk with
what was sent; the data connections must resume the control session. With tickets
left on for data connections (``tls.seal_for_data_connections`` made a no-op), 182 of
200 TLS 1.3 uploads got 426 here: the test does catch the failure it is about.
``FTPS_GO_UPLOADS`` raises the count for a soak run.

The ``reuse`` tests need ``[tls] reuse = "required" | "ip-match"`` (issue 3).

The client comes from ``tests/clients/goftps`` and is built once per test run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from ftps_gateway.ftp import replies
from support import goclient
from support.credentials import PASSWORD
from support.gateway import RunningGateway

pytestmark = [
    pytest.mark.integration,
    pytest.mark.clients,
    pytest.mark.timeout(600),  # each client run is bounded by its own timeout
]

# 200 uploads per version, the count issue 3 asks for; raise it for a soak run.
UPLOADS = int(os.environ.get("FTPS_GO_UPLOADS", "200"))
MIN_SIZE = 64 * 1024
MAX_SIZE = 1024 * 1024


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go FTPS client, built from source for this test run."""
    return goclient.build(tmp_path_factory.getbasetemp() / "goftps-build")


def run_go(
    go_client: Path,
    gateway: RunningGateway,
    tmp_path: Path,
    **options: object,
) -> goclient.GoRun:
    """Run the Go client against ``gateway`` (keyword options as in ``goclient.run``)."""
    return goclient.run(
        go_client,
        addr=f"{gateway.host}:{gateway.port}",
        ca_file=gateway.ca_file,
        password_file=goclient.password_file(tmp_path, PASSWORD),
        **options,  # type: ignore[arg-type]
    )


def data_connections(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """The audit records of established data connections."""
    return [
        r
        for r in records
        if r["event"] == "tls_established" and r.get("channel") == "data"
    ]


@pytest.mark.parametrize(
    ("tls_max", "version"), [("1.3", "TLSv1.3"), ("1.2", "TLSv1.2")]
)
def test_go_uploads_arrive_complete(
    go_client: Path,
    start_gateway: Callable[..., RunningGateway],
    audit_records: Callable[[], list[dict[str, object]]],
    tmp_path: Path,
    tls_max: str,
    version: str,
) -> None:
    """200 Go uploads that close without reading all land whole, on resumed sessions."""
    gateway = start_gateway()
    prefix = f"go{tls_max.replace('.', '')}-"
    result = run_go(
        go_client, gateway, tmp_path,
        count=UPLOADS, min_size=MIN_SIZE, max_size=MAX_SIZE, prefix=prefix,
        tls_max=tls_max, resume=True, sessions=2,
    )  # fmt: skip
    summary = result.summary
    assert result.returncode == 0, result.explain()
    assert summary["failures"] == [], result.explain()
    assert summary["uploads_ok"] == UPLOADS, result.explain()
    assert set(summary["control_tls_versions"]) == {version}, result.explain()
    # The client's own view of each data connection.
    assert {u["tls_version"] for u in summary["uploads"]} == {version}
    assert all(u["resumed"] for u in summary["uploads"]), result.explain()

    expected = goclient.expected_uploads(prefix, UPLOADS, MIN_SIZE, MAX_SIZE)
    # The client reports what it sent; the recipe here must agree with it.
    assert {u["name"]: u["sha256"] for u in summary["uploads"]} == {
        name: want.sha256 for name, want in expected.items()
    }
    assert goclient.disk_problems(gateway.home(), prefix, expected) == []

    # The server's view: every data connection used the version and resumed.
    records = audit_records()
    data = data_connections(records)
    assert len(data) == UPLOADS
    assert {r["version"] for r in data} == {version}
    assert [r for r in data if r["resumed"] is not True] == []
    completed = [r for r in records if r["event"] == "upload_completed"]
    assert len(completed) == UPLOADS
    assert [r for r in records if r["event"] == "upload_failed"] == []


def test_go_without_resumption_is_refused_by_default(
    go_client: Path,
    start_gateway: Callable[..., RunningGateway],
    tmp_path: Path,
) -> None:
    """With the default ``reuse = "required"`` a data connection that does not
    resume its control session is refused with 425, and nothing is stored."""
    gateway = start_gateway()
    count = 3
    result = run_go(
        go_client, gateway, tmp_path,
        count=count, min_size=MIN_SIZE, max_size=MIN_SIZE, prefix="nores-",
        resume=False,
    )  # fmt: skip
    summary = result.summary
    assert result.returncode == 1, result.explain()
    assert summary["uploads_ok"] == 0, result.explain()
    assert len(summary["failures"]) == count, result.explain()
    for failure in summary["failures"]:
        assert failure["reply"] == replies.NOT_RESUMED, result.explain()
        assert failure["resumed"] is False, result.explain()
    # The control session survived each refusal: the client could QUIT normally.
    assert summary["session_errors"] == [], result.explain()
    assert sorted(p.name for p in gateway.home().iterdir()) == []


def test_go_without_resumption_passes_with_ip_match(
    go_client: Path,
    start_gateway: Callable[..., RunningGateway],
    audit_records: Callable[[], list[dict[str, object]]],
    tmp_path: Path,
) -> None:
    """``reuse = "ip-match"`` admits a client that cannot resume (TLS 1.3, no cache)."""
    gateway = start_gateway(tls_extra='reuse = "ip-match"')
    count = 20
    prefix = "ipmatch-"
    result = run_go(
        go_client, gateway, tmp_path,
        count=count, min_size=MIN_SIZE, max_size=4 * MIN_SIZE, prefix=prefix,
        resume=False,
    )  # fmt: skip
    assert result.returncode == 0, result.explain()
    assert result.summary["uploads_ok"] == count, result.explain()
    assert not any(u["resumed"] for u in result.summary["uploads"])
    expected = goclient.expected_uploads(prefix, count, MIN_SIZE, 4 * MIN_SIZE)
    assert goclient.disk_problems(gateway.home(), prefix, expected) == []
    data = data_connections(audit_records())
    assert len(data) == count
    assert {r["version"] for r in data} == {"TLSv1.3"}
    assert [r for r in data if r["resumed"] is not False] == []

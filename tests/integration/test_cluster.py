"""Two gateway nodes and one Redis act as one gateway (issue 15, end to end).

Each node is a real ``ftps-gateway serve`` process (``support.process``) with its own
config and node name; both share one storage root (as nodes on NFS would) and one
``redis-server`` on a Unix socket. Node a runs with ``workers = 2`` in the tests
marked so (its supervisor then holds the node's one Redis client and lease and
serves its workers through ``StateService``). Uploads on both nodes against one
quota are checked on the shared disk and in Redis' holdings. The figures the issue
asks for (a ban on every node within 2 s, a freed slot within 1 s, a dead node's
sessions and reservations within the lease) are printed, not asserted: the machine is shared, and timing assertions would
flake.
"""

from __future__ import annotations

import ftplib
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trustme

from ftps_gateway import cli
from ftps_gateway.ftp import replies
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.session.state import UNAVAILABLE
from ftps_gateway.storage import vfs
from support.certificates import write_certificate
from support.configs import write_config
from support.control import raw_connect
from support.credentials import PASSWORD, PASSWORD_HASH
from support.metrics import scrape
from support.process import GatewayProcess
from support.redis import RedisServer
from support.uploads import HEAD, begin, check_outcome, disk, finish, run_concurrently

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator


pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LEASE_SECONDS = 3
NodeFactory = "Callable[..., Node]"


class Node(GatewayProcess):
    """One gateway node: its config file, its name, its client connections."""

    def __init__(
        self, name: str, config_path: Path, ca_file: Path, workers: int = 1
    ) -> None:
        self.name = name
        self.config_path = config_path
        super().__init__(config_path, ca_file, workers=workers)

    def connect(self, source_ip: str = "127.0.0.1") -> ReusingFTP_TLS:
        """A control connection, not logged in."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        ftp = ReusingFTP_TLS(context=context, timeout=20)
        ftp.connect("127.0.0.1", self.port, source_address=(source_ip, 0))
        return ftp

    def greets(self, source_ip: str) -> bool:
        """True if a new connection hears the banner; False if dropped unheard."""
        with raw_connect(("127.0.0.1", self.port), source_ip) as sock:
            sock.settimeout(5)
            try:
                return sock.recv(64).startswith(b"220")
            except (TimeoutError, ConnectionResetError):
                return False

    def mode(self) -> str:
        """The ftps_gateway_cluster_mode label that is 1."""
        samples = scrape(self.metrics_port)
        for (name, labels), value in samples.items():
            if name == "ftps_gateway_cluster_mode" and value == 1:
                return dict(labels)["mode"]
        return ""


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """One storage root for every node (short: admin sockets live under it)."""
    root = Path(tempfile.mkdtemp(prefix="gw-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def start_node(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    redis_server: RedisServer,
    shared_root: Path,
) -> Iterator[Callable[..., Node]]:
    """Start nodes of one cluster; each stopped (and checked) at teardown."""
    started: list[Node] = []

    def start(
        name: str,
        *,
        on_unavailable: str = "refuse",
        extra: str = "",
        workers: int = 1,
        users: str | None = None,
        per_user: int = 2,
    ) -> Node:
        directory = tmp_path / name
        directory.mkdir()
        first = 41600 + 40 * len(started)
        path = write_config(
            directory,
            cert_files,
            passive_ports=f"{first}-{first + 39}",
            users=users,
            server_extra=(
                f'workers = {workers}\nnode_name = "{name}"\n'
                f"max_sessions_per_user = {per_user}\nlogin_timeout_seconds = 30"
            ),
            sections=(
                f'[cluster]\nredis_url = "{redis_server.url}"\n'
                f"lease_seconds = {LEASE_SECONDS}\ntimeout_seconds = 0.5\n"
                f'on_unavailable = "{on_unavailable}"\n'
                "[defender]\nmax_failures = 3\nban_seconds = 600\n"
                '[metrics]\nlisten = "127.0.0.1:0"\n'
                "[admin]\n"  # the default: a socket per node under storage.root
                f"{extra}"
            ),
        )
        text = path.read_text(encoding="utf-8")
        path.write_text(
            text.replace(str(directory / "storage"), str(shared_root)), encoding="utf-8"
        )
        node = Node(name, path, cert_files[2], workers)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.process.poll() is None:
            code = node.stop()
            assert not node.tracebacks(), node.stderr
            assert code == 0, "".join(node.stderr)


def _fail_login(node: Node, source_ip: str) -> None:
    ftp = node.connect(source_ip)
    with pytest.raises(ftplib.error_perm, match="^530 "):
        ftp.login("acme", "wrong password")
    ftp.close()


HELD: list[ReusingFTP_TLS] = []  # sessions a test keeps open until its end


def _takes_a_login(node: Node, *, keep: bool) -> bool:
    """True if ``node`` lets acme log in now (the session is kept in ``HELD``)."""
    ftp = node.connect()
    try:
        ftp.login("acme", PASSWORD)
    except ftplib.error_temp:
        ftp.close()
        return False
    if keep:
        HELD.append(ftp)
    else:
        ftp.quit()
    return True


def _elapsed_until(check: Callable[[], bool], seconds: float = 30) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "never happened"
        time.sleep(0.02)
    return time.monotonic() - started


def _ban_list(node: Node, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert cli.main(["ban", "list", "--config", str(node.config_path), "--json"]) == 0
    return [ban["ip"] for ban in json.loads(capsys.readouterr().out)]


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_failures_on_two_nodes_ban_on_both_and_ban_remove_on_one_lifts_it(
    start_node: Callable[..., Node], capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """max_failures counts both nodes; ban list and ban remove act for the cluster."""
    a, b = start_node("node-a", workers=workers), start_node("node-b")
    attacker = "127.0.0.5"
    # Three failures, two on a and one on b, at once (each reply takes 3 s, RFC 2577).
    threads = [
        threading.Thread(target=_fail_login, args=(node, attacker))
        for node in (a, a, b)
    ]
    for thread in threads:
        thread.start()
    # The node that scored the third failure audits the ban (before its 530, which
    # waits 3 s): from then on new connections to either node are dropped unheard
    # (several to node a: with two workers, each may take one).
    _elapsed_until(lambda: bool(a.events("ban") or b.events("ban")))
    took = _elapsed_until(
        lambda: not any(a.greets(attacker) for _ in range(4)) and not b.greets(attacker)
    )
    with capsys.disabled():
        print(
            f"\n[node a: {workers} worker(s)] banned on both nodes {took:.3f} s "
            "after the ban's audit line"
        )
    for thread in threads:
        thread.join(30)
    assert a.greets("127.0.0.6")  # only the offender
    assert _ban_list(a, capsys) == [attacker]
    assert _ban_list(b, capsys) == [attacker]
    assert cli.main(["ban", "remove", attacker, "--config", str(b.config_path)]) == 0
    assert capsys.readouterr().out == f"ban on {attacker} lifted\n"
    took = _elapsed_until(lambda: all(a.greets(attacker) for _ in range(4)))
    with capsys.disabled():
        print(f"ban remove on node b lifted it on node a within {took:.3f} s")
    assert b.greets(attacker)
    assert _ban_list(a, capsys) == []
    assert ("ftps_gateway_bans_active", ()) in scrape(a.metrics_port)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_per_user_limit_holds_across_nodes_and_quit_frees_the_slot(
    start_node: Callable[..., Node], capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """max_sessions_per_user = 2 over two nodes: the third login gets 421 anywhere;
    a QUIT on either node frees the slot for the other."""
    a, b = start_node("node-a", workers=workers), start_node("node-b")
    first, second = a.client(), b.client()
    for node in (a, a, b):
        ftp = node.connect()
        with pytest.raises(ftplib.error_temp) as refused:
            ftp.login("acme", PASSWORD)
        assert str(refused.value) == replies.LIMIT_REPLIES["limit-per-user"]
        ftp.close()
    first.quit()
    on_b = _elapsed_until(lambda: _takes_a_login(b, keep=True))
    second.quit()
    on_a = _elapsed_until(lambda: _takes_a_login(a, keep=False))
    with capsys.disabled():
        print(
            f"\n[node a: {workers} worker(s)] after QUIT on node a, node b took a "
            f"login within {on_b:.3f} s; after QUIT on node b, node a within "
            f"{on_a:.3f} s"
        )
    samples = scrape(a.metrics_port)
    assert samples[("ftps_gateway_redis_round_trip_seconds_count", ())] > 0
    assert a.mode() == "shared"
    for session in HELD:
        session.quit()
    HELD.clear()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_kill_9_of_a_node_frees_its_sessions_within_the_lease(
    start_node: Callable[..., Node], capsys: pytest.CaptureFixture[str], workers: int
) -> None:
    """A node killed with -9 says goodbye to nobody: its lease ends its sessions."""
    a, b = start_node("node-a", workers=workers), start_node("node-b")
    held = [a.client(), a.client()]
    ftp = b.connect()
    with pytest.raises(ftplib.error_temp):
        ftp.login("acme", PASSWORD)
    ftp.close()
    killed = time.monotonic()
    a.kill()  # the whole process group, supervisor and workers
    for session in held:
        session.close()

    _elapsed_until(lambda: _takes_a_login(b, keep=False), 30)
    with capsys.disabled():
        print(
            f"\n[node a: {workers} worker(s)] kill -9 of node a: its sessions were "
            f"free on node b after {time.monotonic() - killed:.2f} s "
            f"(lease_seconds = {LEASE_SECONDS})"
        )


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_redis_stopped_mid_run_local_mode_serves_on_and_comes_back(
    start_node: Callable[..., Node],
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    workers: int,
) -> None:
    """on_unavailable = "local": sessions and logins go on; shared again after."""
    a = start_node("node-a", on_unavailable="local", workers=workers)
    session = a.client()
    redis_server.stop()
    session.storbinary("STOR during-outage.txt", io.BytesIO(b"still here"))
    late = a.client()  # decided by node a alone
    _elapsed_until(lambda: a.mode() == "local")
    status, body = a.readyz()
    assert status == 200
    assert body.startswith("ready\nnote: Redis unreachable at unix://")
    modes = [record["mode"] for record in a.events("cluster_mode")]
    assert modes == ["shared", "local"]
    assert any("CLUSTER STATE UNAVAILABLE" in line for line in a.stderr)
    redis_server.start()
    back = _elapsed_until(lambda: a.mode() == "shared")
    with capsys.disabled():
        print(
            f"\n[{workers} worker(s), local] shared state again {back:.2f} s after "
            "Redis came back"
        )
    assert a.readyz() == (200, "ready\n")
    # The node wrote its two sessions back: the per-user limit sees them again.
    ftp = a.connect()
    with pytest.raises(ftplib.error_temp):
        ftp.login("acme", PASSWORD)
    ftp.close()
    assert redis_server.cli("HGET", "ftps-gateway:held:node-a", "u|acme") == "2"
    session.quit()
    late.quit()


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_redis_stopped_mid_run_refuse_mode_refuses_new_logins_until_back(
    start_node: Callable[..., Node],
    redis_server: RedisServer,
    capsys: pytest.CaptureFixture[str],
    workers: int,
) -> None:
    """on_unavailable = "refuse": running sessions go on, new logins get 421."""
    a = start_node("node-a", workers=workers)
    session = a.client()
    redis_server.stop()
    session.storbinary("STOR during-outage.txt", io.BytesIO(b"still here"))
    ftp = a.connect()
    with pytest.raises(ftplib.error_temp) as refused:
        ftp.login("acme", PASSWORD)
    assert str(refused.value) == replies.LIMIT_REPLIES["cluster-unavailable"]
    ftp.close()
    status, body = a.readyz()
    assert status == 503
    assert "Redis unreachable at unix://" in body
    assert a.mode() == "refusing"
    assert [r["reason"] for r in a.events("login_failed")] == ["cluster-unavailable"]
    refused_key = ("ftps_gateway_sessions_refused_total", (("reason", UNAVAILABLE),))
    _elapsed_until(lambda: scrape(a.metrics_port).get(refused_key) == 1)  # pushed
    redis_server.start()
    back = _elapsed_until(lambda: a.mode() == "shared")
    with capsys.disabled():
        print(
            f"\n[{workers} worker(s), refuse] shared state again {back:.2f} s after "
            "Redis came back"
        )
    a.client().quit()
    assert a.readyz() == (200, "ready\n")
    session.quit()


def _serve(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftps_gateway", "serve", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_bad_redis_url_syntax_is_a_check_config_error(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """check-config names cluster.redis_url and never shows the password."""
    path = write_config(
        tmp_path,
        cert_files,
        server_extra='node_name = "node-a"',
        sections='[cluster]\nredis_url = "redis://:hunter2-SECRET@redis:99999"',
    )
    checked = subprocess.run(
        [sys.executable, "-m", "ftps_gateway", "check-config", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert checked.returncode == 3
    assert f"{path}: cluster.redis_url: not a Redis URL" in checked.stderr
    assert "SECRET" not in checked.stderr + checked.stdout


@pytest.fixture
def unusable_redis(
    request: pytest.FixtureRequest, tmp_path: Path, ca: trustme.CA
) -> Iterator[tuple[str, str, str]]:
    """(what fails, the [cluster] lines, what the error must start with)."""
    kind = request.param
    directory = Path(tempfile.mkdtemp(prefix="redis-"))
    server: RedisServer | None = None
    try:
        if kind == "unreachable":
            lines = f'redis_url = "unix://{directory}/none.sock"'
            said = "Error 2 connecting"
        elif kind == "wrong-password":
            server = RedisServer(directory, password="right-one")
            lines = f'redis_url = "unix://:wrong-SECRET@{server.socket}"'
            said = "authentication failed"
        else:  # a certificate another CA signed
            chain, key, ca_file = write_certificate(ca, tmp_path, ["127.0.0.1"])
            server = RedisServer(directory, tls=(chain, key, ca_file))
            other = tmp_path / "other"
            other.mkdir()
            other_ca = write_certificate(trustme.CA(), other, ["127.0.0.1"])[2]
            lines = f'redis_url = "{server.tls_url}"\nca_file = "{other_ca}"'
            said = "TLS failed"
        yield kind, lines, said
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
@pytest.mark.parametrize(
    "unusable_redis", ["unreachable", "wrong-password", "tls"], indirect=True
)
def test_a_redis_unusable_at_start_up_stops_the_node(
    tmp_path: Path,
    cert_files: tuple[Path, Path, Path],
    unusable_redis: tuple[str, str, str],
    workers: int,
) -> None:
    """Unreachable, wrong password, TLS failure: a clear error naming
    cluster.redis_url, and no node (on_unavailable = "refuse", the default)."""
    _kind, lines, said = unusable_redis
    path = write_config(
        tmp_path,
        cert_files,
        server_extra=f'workers = {workers}\nnode_name = "node-a"',
        sections=f"[cluster]\n{lines}\ntimeout_seconds = 0.5",
    )
    done = _serve(path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(f"cannot start: cluster.redis_url: {said}")
    assert "the node does not start without its cluster state" in done.stderr
    assert "SECRET" not in done.stderr
    assert "listening" not in done.stderr  # nothing was bound


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_unreachable_redis_at_start_up_in_local_mode_starts_and_says_so(
    tmp_path: Path, cert_files: tuple[Path, Path, Path], workers: int
) -> None:
    """on_unavailable = "local": the node starts on its own state, loudly."""
    path = write_config(
        tmp_path,
        cert_files,
        server_extra=f'workers = {workers}\nnode_name = "node-a"',
        sections=(
            f'[cluster]\nredis_url = "unix://{tmp_path}/none.sock"\n'
            'timeout_seconds = 0.5\non_unavailable = "local"\n'
            '[metrics]\nlisten = "127.0.0.1:0"'
        ),
    )
    node = Node("node-a", path, cert_files[2], workers)
    try:
        node.client().quit()
        assert node.mode() == "local"
        assert [r["mode"] for r in node.events("cluster_mode")] == ["local"]
        status, body = node.readyz()
        assert status == 200
        assert body.startswith("ready\nnote: Redis unreachable at unix://")
    finally:
        assert node.stop() == 0


def test_a_node_with_two_workers_holds_one_lease(
    start_node: Callable[..., Node], redis_server: RedisServer
) -> None:
    """The supervisor holds the node's lease, whatever its worker count; a clean
    stop gives it back at once."""
    a, b = start_node("node-a", workers=2), start_node("node-b")
    nodes = redis_server.cli("ZRANGE", "ftps-gateway:nodes", "0", "-1").split()
    assert sorted(nodes) == ["node-a", "node-b"]
    session = a.client()
    assert redis_server.cli("HGET", "ftps-gateway:held:node-a", "u|acme") == "1"
    session.quit()
    _elapsed_until(
        lambda: redis_server.cli("HGET", "ftps-gateway:held:node-a", "u|acme") == ""
    )
    assert a.stop() == 0
    assert redis_server.cli("ZRANGE", "ftps-gateway:nodes", "0", "-1") == "node-b"
    assert b.mode() == "shared"


# --- quota reservations across nodes ---------------------------------------------------

QUOTA_BYTES = 1_000_000
UPLOADS = 8  # sessions uploading at once, alternately on node a and node b


def _user(name: str, extra: str = "") -> str:
    return f'[[users]]\nname = "{name}"\npassword = "{PASSWORD_HASH}"\n{extra}\n'


MOUNT_QUOTA = (
    f"""
[[groups]]
name = "partners"
[[groups.mounts]]
path = "/shared"
source = "shared/pool"
permissions = "read-write"
quota_bytes = {QUOTA_BYTES}
quota_files = 5
"""
    + _user("acme", 'groups = ["partners"]')
    + _user("globex", 'groups = ["partners"]')
)


def _uploading_session(node: Node, user: str) -> ReusingFTP_TLS:
    ftp = node.client(user, timeout=60)
    ftp.voidcmd("TYPE I")
    return ftp


def _reservations(redis_server: RedisServer) -> dict[str, str]:
    """Every reserved-bytes and reserved-files field in any node's holdings, dead
    nodes' included ({"node-a b|user acme": "262144", ...}; empty: none held)."""
    found = {}
    for key in redis_server.cli("--scan", "--pattern", "ftps-gateway:held:*").split():
        lines = redis_server.cli("HGETALL", key).splitlines()
        for name, value in zip(lines[::2], lines[1::2], strict=True):
            if name.startswith(("b|", "f|")):
                found[f"{key.rsplit(':', 1)[1]} {name}"] = value
    return found


@pytest.mark.parametrize(
    ("case", "size"),
    [("bytes", 300_000), ("files", 2_000), ("mount", 300_000)],
)
def test_uploads_on_two_nodes_never_pass_one_quota(
    start_node: Callable[..., Node],
    redis_server: RedisServer,
    shared_root: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    size: int,
) -> None:
    """8 sessions on two nodes (a with two workers) upload at once against one
    quota (a user's bytes, a user's files, or a mount shared by two users): the
    disk never holds more; the others got 452 and left nothing; no reservation is
    left in Redis afterwards."""
    if case == "mount":
        users_toml, folder, limit = MOUNT_QUOTA, shared_root / "shared" / "pool", 5
        users = ["acme", "globex"] * (UPLOADS // 2)
    else:
        line = f"quota_bytes = {QUOTA_BYTES}" if case == "bytes" else "quota_files = 3"
        users_toml, folder = _user("acme", line), shared_root / "home" / "acme"
        limit, users = (UPLOADS if case == "bytes" else 3), ["acme"] * UPLOADS
    a = start_node("node-a", workers=2, users=users_toml, per_user=UPLOADS)
    b = start_node("node-b", users=users_toml, per_user=UPLOADS)
    nodes = [a, b] * (UPLOADS // 2)
    sessions = [_uploading_session(n, u) for n, u in zip(nodes, users, strict=True)]
    names = [f"{user}-{n}-{node.name}.bin" for n, (user, node) in
             enumerate(zip(users, nodes, strict=True))]  # fmt: skip
    prefix = "/shared/" if case == "mount" else ""
    payloads = [os.urandom(size) for _ in names]
    uploads = run_concurrently(sessions, [f"STOR {prefix}{n}" for n in names], payloads)
    found = check_outcome(uploads, names, folder)  # 226 intact or 452, no temporaries
    stored = sum(u.stored for u in uploads)
    with capsys.disabled():
        print(
            f"\n[{case}] two nodes, {UPLOADS} uploads of {size} bytes at once: "
            f"{stored} stored, {UPLOADS - stored} refused (452); {found.bytes} bytes "
            f"in {len(found.files)} files on disk (quota {QUOTA_BYTES} bytes, "
            f"{limit} files)"
        )
    assert found.bytes <= QUOTA_BYTES, found
    assert len(found.files) <= limit, found
    assert any(u.stored for u in uploads), [u.reply for u in uploads]
    assert any(u.refused for u in uploads), [u.reply for u in uploads]
    assert {u.reply for u in uploads if not u.stored} == {replies.OVER_QUOTA}
    refusals = [
        e for n in (a, b) for e in n.events("upload_refused") if e["reason"] == "quota"
    ]
    assert len(refusals) == UPLOADS - stored
    assert {e["scope"] for e in refusals} == {
        "mount /shared" if case == "mount" else "user acme"
    }
    for ftp in sessions:
        ftp.quit()
    _elapsed_until(lambda: not _reservations(redis_server))  # released, all of them
    assert disk(folder) == found


@pytest.mark.parametrize("workers", [1, 2], ids=["one-worker", "two-workers"])
def test_kill_9_of_a_node_frees_its_reservations_within_the_lease(
    start_node: Callable[..., Node],
    redis_server: RedisServer,
    shared_root: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    workers: int,
) -> None:
    """An upload paused mid-transfer on node a holds the user's one file (and room
    for its bytes) across the cluster; after kill -9 of node a, node b sees that
    room and the session slot free again once a's lease ends."""
    users_toml = _user("acme", f"quota_bytes = {QUOTA_BYTES}\nquota_files = 1")
    a = start_node("node-a", workers=workers, users=users_toml)
    b = start_node("node-b", users=users_toml)
    home = shared_root / "home" / "acme"
    holder = _uploading_session(a, "acme")
    held = begin(holder, "STOR held.bin", os.urandom(100_000))
    assert held.conn is not None, held.reply
    _elapsed_until(lambda: sum(map(len, _temporaries(home))) == HEAD)  # written
    reserved = _reservations(redis_server)
    assert reserved.get("node-a f|user acme") == "1", reserved
    assert int(reserved.get("node-a b|user acme", "0")) > 0, reserved
    other = _uploading_session(b, "acme")  # the second of max_sessions_per_user = 2
    request.addfinalizer(other.close)  # also when an assertion fails
    assert not _takes_a_login(b, keep=False)
    # The file is held (and the room for a's bytes): anything more is refused.
    refused = finish(begin(other, "STOR second.bin", b"second"))
    assert refused.refused, refused.reply

    killed = time.monotonic()
    a.kill()  # the whole process group, supervisor and workers
    holder.close()
    held.conn.close()
    # What node a's upload wrote stays on disk (an unlocked temporary, for the
    # sweeper) and counts as bytes in every walk; the rest of the quota is free.
    leftover = sum(len(data) for data in _temporaries(home))
    fill = os.urandom(QUOTA_BYTES - leftover)
    session_free = quota_free = 0.0

    def probe() -> bool:
        nonlocal session_free, quota_free
        if not session_free and _takes_a_login(b, keep=False):
            session_free = time.monotonic() - killed
        if not quota_free:
            attempt = finish(begin(other, "STOR fill.bin", fill))
            if attempt.stored:
                quota_free = time.monotonic() - killed
            else:
                assert attempt.refused, attempt.reply
        return bool(session_free and quota_free)

    _elapsed_until(probe, 60)
    with capsys.disabled():
        print(
            f"\n[node a: {workers} worker(s)] kill -9 of node a with an upload "
            f"reserving on it: node b had the session slot free after "
            f"{session_free:.2f} s, the quota (1 file, {QUOTA_BYTES - leftover} "
            f"bytes) after {quota_free:.2f} s (lease_seconds = {LEASE_SECONDS})"
        )
    found = disk(home)
    assert found.files == {"fill.bin": fill}, found
    assert found.bytes + leftover == QUOTA_BYTES
    # Node a's holdings stopped counting when its lease ended; node b's heartbeat
    # deletes them afterwards.
    _elapsed_until(
        lambda: (
            redis_server.cli("ZRANGE", "ftps-gateway:nodes", "0", "-1") == "node-b"
            and not any(
                key.startswith("node-a ") for key in _reservations(redis_server)
            )
        )
    )
    other.quit()
    _elapsed_until(lambda: not _reservations(redis_server))


def _temporaries(folder: Path) -> list[bytes]:
    """The contents of the upload temporaries under ``folder``."""
    return [
        path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and vfs.is_upload_temp(path.name)
    ]

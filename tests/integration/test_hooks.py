"""Event hooks on a real gateway: a real HTTP(S) receiver and a real command.

The receiver (``support.hookreceiver``) checks signatures as the README's receiver
does; the command is a small Python script that writes what it received. Retries
use the real backoff (1 s, 2 s...), so these tests wait seconds, never assert them.
"""

from __future__ import annotations

import ftplib
import hashlib
import io
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from ftps_gateway import cli
from ftps_gateway.service.hookdelivery import signature
from support.credentials import PASSWORD_HASH
from support.gateway import RunningGateway
from support.hookreceiver import HookReceiver
from support.metrics import scrape

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

StartGateway = Callable[..., RunningGateway]
SECRET = b"s3cret-for-tests"
README = Path(__file__).resolve().parents[2] / "README.md"
EVENT_KEYS = {
    "id", "time", "node", "event", "user", "client_ip", "path", "size", "sha256",
    "session", "tls_version",
}  # fmt: skip
USERS = f"""
[[users]]
name = "acme"
password = "{PASSWORD_HASH}"
[[users]]
name = "beta"
password = "{PASSWORD_HASH}"
"""

# A hook command: records stdin and its FTPS_* environment, one file per run. With
# a "hang" file next to it, its first run records its pid (and a child's) and hangs.
SCRIPT = """#!{python}
import json, os, pathlib, subprocess, sys, time
out = pathlib.Path({out!r})
event = json.loads(sys.stdin.read())
env = {{k: v for k, v in os.environ.items() if k.startswith("FTPS_")}}
if (out / "hang").exists() and not (out / "hung").exists():
    child = subprocess.Popen(["sleep", "600"])
    (out / "hung").write_text(f"{{os.getpid()}} {{child.pid}}")
    time.sleep(600)
record = {{"event": event, "env": env, "path_env": os.environ.get("PATH"),
          "others": sorted(k for k in os.environ if not k.startswith("FTPS_"))}}
(out / f"{{time.time_ns()}}.json").write_text(json.dumps(record))
"""


@pytest.fixture
def receiver() -> Iterator[HookReceiver]:
    """A plain-HTTP receiver on loopback with the gateway's secret."""
    server = HookReceiver(SECRET)
    yield server
    server.close()


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    """The hook secret, with a trailing newline as editors write it."""
    path = tmp_path / "hook.secret"
    path.write_bytes(SECRET + b"\n")
    return path


@pytest.fixture
def command(tmp_path: Path) -> tuple[Path, Path]:
    """(the script, the folder it records into)."""
    out = tmp_path / "command-out"
    out.mkdir()
    script = tmp_path / "record-hook.py"
    script.write_text(SCRIPT.format(python=sys.executable, out=str(out)))
    script.chmod(0o755)
    return script, out


def url_hook(name: str, receiver: HookReceiver, secret: Path, extra: str = "") -> str:
    """A [[hooks]] table POSTing to ``receiver`` at /hook/<name>."""
    return (
        f'[[hooks]]\nname = "{name}"\nurl = "{receiver.url()}/{name}"\n'
        f'secret_file = "{secret}"\n{extra}\n'
    )


def recorded(out: Path, count: int, timeout: float = 60) -> list[dict[str, object]]:
    """Wait until the command recorded ``count`` runs; return them in order."""
    deadline = time.monotonic() + timeout
    while len(files := sorted(out.glob("*.json"))) < count:
        assert time.monotonic() < deadline, f"{len(files)} of {count} command runs"
        time.sleep(0.05)
    return [json.loads(path.read_text()) for path in files]


def store(ftp: ftplib.FTP, path: str, data: bytes) -> None:
    """STOR ``data`` to ``path``."""
    ftp.storbinary(f"STOR {path}", io.BytesIO(data))


def upload(gw: RunningGateway, path: str, data: bytes) -> None:
    """One session: STOR ``data`` to ``path``, QUIT."""
    ftp = gw.client()
    store(ftp, path, data)
    ftp.quit()


def for_hook(receiver: HookReceiver, name: str) -> list[dict[str, object]]:
    """Accepted events of the hook POSTing to /hook/<name>."""
    return [
        d.event
        for d in list(receiver.deliveries)
        if d.path == f"/hook/{name}" and 200 <= d.status < 300
    ]


def test_an_upload_fires_exactly_the_configured_hooks_with_the_right_fields(
    start_gateway: StartGateway,
    receiver: HookReceiver,
    secret_file: Path,
    command: tuple[Path, Path],
) -> None:
    """One upload is one event (one id) for every hook it matches and none other;
    url hooks get no real path, the command gets it and FTPS_* variables."""
    script, out = command
    hooks = (
        url_hook("web", receiver, secret_file,
                 'events = ["upload", "rename"]\npaths = ["/in/*"]')
        + url_hook("downloads", receiver, secret_file, 'events = ["download"]')
        + url_hook("beta", receiver, secret_file, 'events = ["upload"]\nusers = ["beta"]')
        + f'[[hooks]]\nname = "run"\nevents = ["upload"]\nusers = ["acme"]\n'
        f'command = ["{script}", "--flag"]\n'
    )  # fmt: skip
    gw = start_gateway(users=USERS, sections=hooks)
    (gw.home() / "in").mkdir()
    data = os.urandom(5000)
    ftp = gw.client()
    store(ftp, "/in/a.csv", data)
    store(ftp, "/x.csv", b"elsewhere")
    ftp.rename("/in/a.csv", "/in/b.csv")
    (web_upload, web_rename) = receiver.wait_for(2)
    # Up to 4 deliveries run at once: order holds per path, not across paths.
    runs = sorted(recorded(out, 2), key=lambda run: str(run["event"]["path"]))
    time.sleep(1.5)  # nothing else may arrive
    assert [d.path for d in receiver.deliveries] == ["/hook/web", "/hook/web"]
    assert len(recorded(out, 2)) == 2
    assert set(web_upload) == EVENT_KEYS
    assert web_upload["event"] == "upload"
    assert web_upload["path"] == "/in/a.csv"
    assert web_upload["size"] == len(data)
    assert web_upload["sha256"] == hashlib.sha256(data).hexdigest()
    assert web_upload["user"] == "acme"
    assert web_upload["client_ip"] == "127.0.0.1"
    assert web_upload["tls_version"] == "TLSv1.3"
    assert web_upload["node"] == gw.server.gateway.node_name
    assert re.fullmatch(r"[0-9a-f]{12}", str(web_upload["session"]))
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(web_upload["time"])
    )
    assert set(web_rename) == EVENT_KEYS | {"target"}
    assert (web_rename["event"], web_rename["path"], web_rename["target"]) == (
        "rename", "/in/a.csv", "/in/b.csv",
    )  # fmt: skip
    assert (web_rename["size"], web_rename["sha256"]) == (None, None)
    first, second = runs
    assert first["event"] == web_upload | {"real_path": str(gw.home() / "in/a.csv")}
    assert second["event"]["path"] == "/x.csv"
    env = first["env"]
    assert env["FTPS_ID"] == web_upload["id"]  # one happening, one id
    assert env["FTPS_EVENT"] == "upload"
    assert env["FTPS_PATH"] == "/in/a.csv"
    assert env["FTPS_REAL_PATH"] == str(gw.home() / "in/a.csv")
    assert env["FTPS_SIZE"] == str(len(data))
    assert env["FTPS_SHA256"] == hashlib.sha256(data).hexdigest()
    assert "FTPS_TARGET" not in env
    assert first["others"] == ["LANG", "PATH"]  # nothing of the gateway's environment
    assert all(d.signature_ok for d in receiver.deliveries)
    assert receiver.deliveries[0].headers["Content-Type"] == "application/json"
    ftp.quit()


def test_every_hookable_happening_reaches_the_hook(
    start_gateway: StartGateway, receiver: HookReceiver, secret_file: Path
) -> None:
    """download, mkdir, delete, rename, rmdir, login-failed and ban are events too."""
    kinds = '["download", "delete", "rename", "mkdir", "rmdir", "login-failed", "ban"]'
    gw = start_gateway(
        users=USERS,
        sections=url_hook("all", receiver, secret_file, f"events = {kinds}")
        + "[defender]\nmax_failures = 2\n",
    )
    ftp = gw.client()
    ftp.mkd("/d")
    ftp.sendcmd("XMKD /e")
    store(ftp, "/d/f.txt", b"twelve bytes")
    ftp.retrbinary("RETR /d/f.txt", lambda _: None)
    ftp.rename("/d/f.txt", "/d/g.txt")
    ftp.delete("/d/g.txt")
    ftp.rmd("/d")
    ftp.quit()
    for attempt in range(2):
        intruder = gw.client(source_ip="127.0.0.2", login=False)
        with pytest.raises(ftplib.error_perm):
            intruder.login(f"guess{attempt}", "wrong")
        intruder.close()
    # Up to 4 deliveries run at once: order holds per path, not across paths.
    events = receiver.wait_for(9)
    summary = [(e["event"], e.get("path"), e.get("target"), e["user"]) for e in events]
    expected = [
        ("mkdir", "/d", None, "acme"),
        ("mkdir", "/e", None, "acme"),
        ("download", "/d/f.txt", None, "acme"),
        ("rename", "/d/f.txt", "/d/g.txt", "acme"),
        ("delete", "/d/g.txt", None, "acme"),
        ("rmdir", "/d", None, "acme"),
        ("login-failed", None, None, "guess0"),
        ("login-failed", None, None, "guess1"),
        ("ban", None, None, None),
    ]
    assert sorted(summary, key=str) == sorted(expected, key=str)
    for path in ("/d", "/d/f.txt", "/d/g.txt"):
        mine = [item for item in summary if path in item[1:3]]
        assert mine == [item for item in expected if path in item[1:3]], path
    events = sorted(events, key=lambda e: expected.index(
        (e["event"], e.get("path"), e.get("target"), e["user"])))  # fmt: skip
    assert events[2]["size"] == 12
    assert events[2]["sha256"] is None  # only uploads carry one
    assert {e["client_ip"] for e in events[6:]} == {"127.0.0.2"}


def test_receiver_down_then_back_gets_every_event_in_order_per_file(
    start_gateway: StartGateway, receiver: HookReceiver, secret_file: Path
) -> None:
    """While the receiver answers 503 events queue (depth and age in /metrics); when
    it is back each is delivered once, and each file's events in their order."""
    hook = url_hook("web", receiver, secret_file, 'events = ["upload", "rename"]')
    gw = start_gateway(sections=hook + '[metrics]\nlisten = "127.0.0.1:0"\n')
    receiver.status = 503
    ftp = gw.client()
    for round_number in range(3):
        store(ftp, "/a.csv", f"a{round_number}".encode())
        store(ftp, "/b.csv", f"b{round_number}".encode())
    ftp.rename("/a.csv", "/c.csv")
    ftp.quit()
    assert gw.server.hooks is not None
    deadline = time.monotonic() + 30
    while gw.server.hooks.snapshot()[0] < 7 or len(receiver.deliveries) < 3:
        assert time.monotonic() < deadline  # all spooled, a few attempts refused
        time.sleep(0.05)
    assert gw.server.health is not None
    samples = scrape(gw.server.health.address[1])
    assert samples[("ftps_gateway_hook_events_queued", ())] == 7
    assert samples[("ftps_gateway_hook_oldest_queued_age_seconds", ())] > 0
    assert samples[("ftps_gateway_hook_deliveries_total", (("result", "failed"),))] >= 1
    receiver.status = 204
    events = receiver.wait_for(7)
    ids = [e["id"] for e in events]
    assert len(set(ids)) == 7
    per_file = [
        (e["event"], e["sha256"])
        for e in events
        if "/a.csv" in (e["path"], e.get("target"))
    ]
    assert per_file == [
        ("upload", hashlib.sha256(b"a0").hexdigest()),
        ("upload", hashlib.sha256(b"a1").hexdigest()),
        ("upload", hashlib.sha256(b"a2").hexdigest()),
        ("rename", None),
    ]
    b_order = [e["sha256"] for e in events if e["path"] == "/b.csv"]
    assert b_order == [hashlib.sha256(f"b{i}".encode()).hexdigest() for i in range(3)]
    deadline = time.monotonic() + 10
    while gw.server.hooks.snapshot()[0]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    samples = scrape(gw.server.health.address[1])
    assert samples[("ftps_gateway_hook_events_queued", ())] == 0
    assert (
        samples[("ftps_gateway_hook_deliveries_total", (("result", "delivered"),))] == 7
    )


def test_the_receiver_rejects_the_signature_when_the_secret_differs(
    start_gateway: StartGateway, secret_file: Path
) -> None:
    """A receiver keyed with another secret answers 401 to every attempt."""
    other = HookReceiver(b"not-the-gateway-secret")
    try:
        gw = start_gateway(
            sections=url_hook("web", other, secret_file, 'events = ["upload"]')
        )
        upload(gw, "/a.csv", b"x")
        deadline = time.monotonic() + 30
        while len(other.deliveries) < 2:  # the first attempt and a retry
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [d.status for d in other.deliveries[:2]] == [401, 401]
        assert not any(d.signature_ok for d in other.deliveries)
        body = other.deliveries[0].body
        given = other.deliveries[0].headers["X-FTPS-Gateway-Signature"]
        assert given == signature(SECRET, body)  # what the right secret accepts
        assert other.accepted() == []
    finally:
        other.close()


def test_the_readme_receiver_checks_the_signature(tmp_path: Path) -> None:
    """The README's 10-line receiver accepts a signed event and refuses a wrong one."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"## Hooks\n.*?```python\n(.*?)```", text, flags=re.DOTALL)
    assert match is not None, "README has no Hooks section with a receiver"
    code = match[1]
    assert len(code.strip().splitlines()) <= 10
    secret = tmp_path / "hook.secret"
    secret.write_bytes(SECRET + b"\n")
    code = code.replace("/etc/ftps-gateway/hook.secret", str(secret)).replace(
        "8080", "0"
    )
    script = tmp_path / "receiver.py"
    # Print the port it bound, then serve (the README's last line, split in two).
    served = re.sub(
        r"^(.*)\.serve_forever\(\)$",
        r"s = \1; print(s.server_address[1], flush=True); s.serve_forever()",
        code.rstrip(),
        flags=re.MULTILINE,
    )
    assert served != code.rstrip()
    script.write_text(served + "\n")
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        body = json.dumps({"id": "1", "event": "upload", "path": "/a"}).encode()

        def post(header: str) -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/", data=body, method="POST",
                headers={"X-FTPS-Gateway-Signature": header,
                         "Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=10) as reply:
                    return int(reply.status)
            except urllib.error.HTTPError as err:
                return err.code

        assert post(signature(SECRET, body)) == 204
        assert post(signature(b"other", body)) == 401
        assert post("") == 401
    finally:
        process.kill()
        process.communicate()  # reaps it and closes its stdout


def test_a_hanging_command_is_killed_at_its_timeout_and_retried(
    start_gateway: StartGateway, command: tuple[Path, Path]
) -> None:
    """The first run hangs: at timeout_seconds it and its child are killed; the
    retry delivers the same event."""
    script, out = command
    (out / "hang").touch()
    gw = start_gateway(
        sections=f'[[hooks]]\nname = "run"\nevents = ["upload"]\ncommand = ["{script}"]\n'
        "timeout_seconds = 1\n"
    )
    upload(gw, "/a.csv", b"payload")
    (run,) = recorded(out, 1, timeout=60)
    pid, child = (int(x) for x in (out / "hung").read_text().split())
    for gone in (pid, child):
        deadline = time.monotonic() + 10
        while Path(f"/proc/{gone}").exists() and _state(gone) != "Z":
            assert time.monotonic() < deadline, f"{gone} still runs"
            time.sleep(0.05)
    assert run["event"]["path"] == "/a.csv"
    deadline = time.monotonic() + 10  # the run wrote its file; its exit comes next
    while 'deliveries_total{result="delivered"} 1.0' not in (text := _metrics(gw)):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert 'ftps_gateway_hook_deliveries_total{result="failed"} 1.0' in text


def _metrics(gw: RunningGateway) -> str:
    return gw.server.gateway.metrics.render()[0].decode()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_dead_letter_after_the_last_attempt_then_hooks_list_and_retry(
    start_gateway: StartGateway,
    receiver: HookReceiver,
    secret_file: Path,
    audit_records: Callable[[], list[dict[str, object]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """After max_attempts the event moves to dead/ with its last error (audited);
    ``hooks list`` shows it and ``hooks retry`` delivers it."""
    gw = start_gateway(
        sections=url_hook(
            "web", receiver, secret_file, 'events = ["upload"]\nmax_attempts = 2'
        )
    )
    receiver.status = 500
    upload(gw, "/a.csv", b"x")
    deadline = time.monotonic() + 30
    while not [r for r in audit_records() if r["event"] == "hook_dead_lettered"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (dead,) = [r for r in audit_records() if r["event"] == "hook_dead_lettered"]
    assert dead["hook"] == "web"
    assert dead["kind"] == "upload"
    assert dead["attempts"] == 2
    assert dead["error"] == "HTTP 500"
    assert gw.server.hooks is not None
    (file,) = list((gw.server.hooks.folder / "dead").glob("*.json"))
    record = json.loads(file.read_text())
    assert (record["attempts"], record["last_error"]) == (2, "HTTP 500")
    assert record["event"]["id"] == dead["id"]
    assert len(receiver.deliveries) == 2

    config_path = str(gw.server.config.source)
    capsys.readouterr()
    assert cli.main(["hooks", "list", "--config", config_path, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert (listing["queue_total"], listing["dead_total"]) == (0, 1)
    assert listing["dead"][0]["id"] == dead["id"]
    assert listing["dead"][0]["last_error"] == "HTTP 500"
    assert cli.main(["hooks", "list", "--config", config_path]) == 0
    assert f"{dead['id']}  web  upload  /a.csv  attempts 2" in capsys.readouterr().out

    receiver.status = 204
    assert cli.main(["hooks", "retry", "--config", config_path, str(dead["id"])]) == 0
    (event,) = receiver.wait_for(1)
    assert event["id"] == dead["id"]
    assert not list((gw.server.hooks.folder / "dead").glob("*.json"))
    assert cli.main(["hooks", "retry", "--config", config_path, "no-such-id"]) == 1
    assert cli.main(["hooks", "retry", "--config", config_path]) == cli.EXIT_USAGE


def test_https_receiver_verified_against_ca_file(
    start_gateway: StartGateway,
    secret_file: Path,
    ca: trustme.CA,
    tmp_path: Path,
) -> None:
    """With ca_file the receiver's certificate verifies; without it the system store
    does not know the test CA and every attempt fails with a TLS error."""
    leaf = ca.issue_cert("127.0.0.1")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    leaf.configure_cert(context)
    receiver = HookReceiver(SECRET, context=context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        hooks = (
            f'[[hooks]]\nname = "trusted"\nevents = ["upload"]\n'
            f'url = "{receiver.url("https")}/trusted"\nsecret_file = "{secret_file}"\n'
            f'ca_file = "{ca_file}"\n'
            f'[[hooks]]\nname = "untrusted"\nevents = ["upload"]\n'
            f'url = "{receiver.url("https")}/untrusted"\nsecret_file = "{secret_file}"\n'
        )
        gw = start_gateway(sections=hooks)
        upload(gw, "/a.csv", b"x")
        (event,) = receiver.wait_for(1)
        assert event["path"] == "/a.csv"
        assert gw.server.hooks is not None
        deadline = time.monotonic() + 30
        while True:
            queued = gw.server.hook_spool.listing()["queue"]
            if queued and queued[0]["last_error"]:
                break
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert queued[0]["hook"] == "untrusted"
        assert "TLS" in queued[0]["last_error"]
        assert "CERTIFICATE_VERIFY_FAILED" in queued[0]["last_error"]
        assert [d.path for d in receiver.deliveries] == ["/hook/trusted"]
    finally:
        receiver.close()


def test_a_reload_that_adds_a_hook_applies_to_new_events(
    start_gateway: StartGateway, receiver: HookReceiver, secret_file: Path
) -> None:
    """A gateway started without hooks delivers after a reload adds one."""
    gw = start_gateway()
    upload(gw, "/before.csv", b"x")
    path = gw.server.config.source
    assert path is not None
    path.write_text(
        path.read_text() + url_hook("web", receiver, secret_file, 'events = ["upload"]')
    )
    assert gw.server.reload_from_thread() == []
    upload(gw, "/after.csv", b"y")
    (event,) = receiver.wait_for(1)
    assert event["path"] == "/after.csv"

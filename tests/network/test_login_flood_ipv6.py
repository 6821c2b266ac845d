"""A login flood from 1,000 addresses of one IPv6 /64, in a network namespace.

Issue 14, items 1 and 6: one IPv6 subscriber holds a whole /64, so counting attempts
and bans per /128 gave one attacker 2**64 fresh addresses. In a namespace of its own
the /64 ``2001:db8:1:2::/64`` is made local with an AnyIP route (``ip -6 route add
local ... dev lo``; ``ip_nonlocal_bind`` lets a client bind any address of it), and so
is ``2001:db8:2::/48`` for the server and two partners. 1,000 attacker addresses send
one wrong password each and reconnect after the answer; the login queue takes as many
of the /64's attempts as it has failures left before a ban (``[defender]
max_failures``, 5) and answers the rest 421; the /64 is banned as one address; the
partners' uncached logins (argon2id with production parameters) complete meanwhile.
Their times are printed, never asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from ftps_gateway.policy.passwords import hash_password
from network import netlab, nodes
from support import loginflood
from support.credentials import PASSWORD

pytestmark = [pytest.mark.network, pytest.mark.timeout(400)]

ATTACK_NET = "2001:db8:1:2::/64"
ATTACKERS = [f"2001:db8:1:2::a:{n:x}" for n in range(1, 1001)]
OWN_NET = "2001:db8:2::/48"  # the server's and the partners' addresses
SERVER = "2001:db8:2::1"
PARTNER = "2001:db8:2:1::10"  # logged in before the flood
STRANGER = "2001:db8:2:2::10"  # never seen before
PORT = 2121
METRICS = "127.0.0.1:9120"
MAX_FAILURES = 5  # the default
TESTS = Path(__file__).resolve().parents[1]


def _config(directory: Path, cert_files: tuple[Path, Path, Path]) -> Path:
    chain, key, _ = cert_files
    path = directory / "gateway.toml"
    path.write_text(
        f"""\
[server]
listen = ["[{SERVER}]:{PORT}"]
workers = 1
login_timeout_seconds = 30
login_cache_seconds = 0
max_sessions = 4096
max_unauthenticated = 4096
max_unauthenticated_per_ip = 4096
[tls]
certificate = "{chain}"
private_key = "{key}"
[passive]
ports = "50000-50031"
[storage]
root = "{directory / "storage"}"
[defender]
max_failures = {MAX_FAILURES}
window_seconds = 600
[metrics]
listen = "{METRICS}"
[admin]
socket = "{directory / "admin.sock"}"
[[users]]
name = "acme"
password = "{hash_password(PASSWORD)}"
""",
        encoding="utf-8",
    )
    return path


def _flood(lab: netlab.Lab, namespace: str, plan: loginflood.Plan) -> loginflood.Report:
    """Run the flood inside ``namespace`` (its addresses exist only there)."""
    argv = ["env", f"PYTHONPATH={TESTS}", sys.executable, "-m", "support.loginflood"]
    done = subprocess.run(
        lab.exec_argv(namespace, argv),
        input=json.dumps(asdict(plan)),
        capture_output=True,
        text=True,
        timeout=plan.seconds + 120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return loginflood.report_from_json(done.stdout)


def test_login_flood_from_1000_addresses_of_one_ipv6_64(
    tmp_path: Path, cert_files: tuple[Path, Path, Path]
) -> None:
    """The /64 gets as many attempts in as it has failures left, 421 for the rest,
    one ban for all of it; the partners' logins complete (times printed)."""
    nodes.require_lab()
    lab = netlab.Lab(tmp_path)
    with netlab.sigterm_interrupts():
        try:
            namespace = lab.add_namespace("gw")
            for network in (ATTACK_NET, OWN_NET):
                netlab.ip("-n", namespace, "-6", "route", "add", "local", network,
                          "dev", "lo")  # fmt: skip
            lab.sysctl(namespace, "net.ipv6.ip_nonlocal_bind", "1")
            config = _config(tmp_path, cert_files)
            audit = lab.start(
                namespace,
                [
                    sys.executable,
                    "-m",
                    "ftps_gateway",
                    "serve",
                    "--config",
                    str(config),
                ],
                "gw",
            )
            lab.wait_for_http(namespace, f"http://{METRICS}/readyz")
            report = _flood(
                lab,
                namespace,
                loginflood.Plan(
                    host=SERVER,
                    port=PORT,
                    sources=ATTACKERS,
                    per_source=1,
                    user="acme",
                    wrong_password="not the password",
                    password=PASSWORD,
                    partner_source=PARTNER,
                    fresh_source=STRANGER,
                    seconds=240,
                    partner_after=2.0,
                ),
            )
        finally:
            lab.close()
    for name, login in (
        ("partner, before the flood", report.baseline),
        ("partner (known address), during the flood", report.partner),
        ("partner (new /64), during the flood", report.fresh),
    ):
        assert login is not None
        took = f"{login.seconds:.2f} s" if login.seconds is not None else "-"
        print(f"uncached login, {name}: {took} ({login.reply})")
    print(
        f"flood replies: {report.replies}; all banned in {report.flood_seconds:.1f} s"
    )
    records = [
        json.loads(line)
        for line in audit.read_text(encoding="utf-8").splitlines()
        if line.startswith("{")
    ]
    assert report.partner is not None
    assert report.partner.reply.startswith("230"), report.partner
    assert report.fresh is not None
    assert report.fresh.reply.startswith("230"), report.fresh
    assert report.replies.get("421 login-queue-address", 0) > 0, report.replies
    # Exactly the budget was verified and failed: the ban stopped the rest.
    verified = [
        record
        for record in records
        if record["event"] == "login_failed" and record["reason"] == "bad-password"
    ]
    assert len(verified) == MAX_FAILURES
    assert report.banned == sorted(ATTACKERS)
    bans = [record["banned_ip"] for record in records if record["event"] == "ban"]
    assert bans == [ATTACK_NET]

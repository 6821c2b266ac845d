"""The self-test's report: stages, their stable exit codes, and how a report reads.

Kept apart from the probing (``selftest``) so that what a partner pastes into a
ticket, and what automation keys on (exit codes, ``reason`` words, JSON fields), can
be tested without a network and changed in one place.

Exit codes are a contract: scripts and monitoring branch on them. Add stages at the
end; never renumber.

======  =============  ==========================================================
code    stage          fails when
======  =============  ==========================================================
0       (all passed)   every step passed (warnings and notes do not count)
1       (internal)     the self-test itself broke; run again with ``--debug``
2       (usage)        bad arguments, a password in the URL, no password source
10      dns            the host name does not resolve
11      tcp            the control port refuses, times out or is unreachable
12      banner         no 220 greeting (address not allowed, banned, too many)
13      auth-tls       AUTH TLS refused (not an explicit-FTPS server?)
14      tls            handshake failed, certificate untrusted, expired, wrong
                       name, or not the pinned one (TLS-intercepting proxy)
15      login          user name or password refused
16      protection     PBSZ 0 / PROT P refused
17      passive        PASV/EPSV refused, or the 227 address is private or not
                       the address connected to (server NAT misconfiguration)
18      data-connect   the passive port refuses or does not answer (firewall)
19      data-tls       TLS on the data connection failed or was refused
20      list           LIST failed
21      transfer       probe upload/download failed or arrived different
22      repeat         a later transfer on the same session failed
23      shutdown       a TLS connection ended without close_notify
======  =============  ==========================================================
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

EXIT_PASSED = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Stage:
    """One kind of step: its stable name, exit code and title."""

    name: str
    exit_code: int
    title: str


STAGES: tuple[Stage, ...] = (
    Stage("dns", 10, "DNS resolution"),
    Stage("tcp", 11, "TCP connection to the control port"),
    Stage("banner", 12, "Server greeting"),
    Stage("auth-tls", 13, "AUTH TLS"),
    Stage("tls", 14, "TLS handshake and certificate"),
    Stage("login", 15, "Login"),
    Stage("protection", 16, "Data protection (PBSZ 0, PROT P)"),
    Stage("passive", 17, "Passive mode (PASV and EPSV)"),
    Stage("data-connect", 18, "Data connection to the passive port"),
    Stage("data-tls", 19, "TLS on the data connection"),
    Stage("list", 20, "Directory listing (LIST)"),
    Stage("transfer", 21, "Upload and download of a probe file"),
    Stage("repeat", 22, "Repeated transfers on one session"),
    Stage("shutdown", 23, "Clean TLS shutdown"),
)
STAGE_BY_NAME = {stage.name: stage for stage in STAGES}
# Steps that only inform: they never fail the run, whatever they find.
INFO_TITLES = {
    "passive-scan": "Passive port range scan",
    "no-resumption": "Data connection without TLS session resumption",
    "server-view": "The server's view (SITE DIAG)",
}


class Status(StrEnum):
    """How a step ended."""

    OK = "ok"
    WARN = "warn"  # works, but something needs attention
    INFO = "info"  # a fact for the partner, neither good nor bad
    FAIL = "fail"
    SKIP = "skip"


@dataclass
class Step:
    """One step of the run, as the report shows it."""

    stage: str
    status: Status
    seconds: float
    summary: str
    action: str = ""  # what to do; set on failures and warnings
    reason: str = ""  # a stable word for automation, e.g. "hostname-mismatch"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def title(self) -> str:
        """The human title of this step's stage."""
        stage = STAGE_BY_NAME.get(self.stage)
        return stage.title if stage else INFO_TITLES.get(self.stage, self.stage)


@dataclass
class Report:
    """Everything one self-test run found."""

    target: str  # the URL, without any secret
    started: str  # ISO 8601, UTC
    steps: list[Step] = field(default_factory=list)
    server_view: dict[str, str] | None = None
    secrets: tuple[str, ...] = ()  # strings that must never appear in the output

    def add(self, step: Step) -> None:
        """Append a step."""
        self.steps.append(step)

    @property
    def first_failure(self) -> Step | None:
        """The first failed step: it decides the exit code."""
        return next((s for s in self.steps if s.status is Status.FAIL), None)

    @property
    def exit_code(self) -> int:
        """0 if no step failed, else the failing stage's code (see the table)."""
        failed = self.first_failure
        if failed is None:
            return EXIT_PASSED
        stage = STAGE_BY_NAME.get(failed.stage)
        return stage.exit_code if stage else EXIT_INTERNAL

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (the ``--json`` output)."""
        failed = self.first_failure
        return {
            "tool": "ftps-gateway self-test",
            "target": self.target,
            "started": self.started,
            "result": "passed" if failed is None else "failed",
            "exit_code": self.exit_code,
            "failed_stage": failed.stage if failed else None,
            "failed_reason": failed.reason if failed else None,
            "steps": [
                {
                    "stage": s.stage,
                    "title": s.title,
                    "status": s.status.value,
                    "seconds": round(s.seconds, 3),
                    "summary": s.summary,
                    "action": s.action,
                    "reason": s.reason,
                    "details": s.details,
                }
                for s in self.steps
            ],
            "server_view": self.server_view,
        }


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Replace every secret in ``text`` by ``***`` (a last line of defence)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def render_json(report: Report) -> str:
    """The report as indented JSON, secrets redacted."""
    return redact(json.dumps(report.to_dict(), indent=2), report.secrets)


WIDTH = 88  # pasted into tickets and mails: keep lines short


def _wrap(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(
        text, WIDTH, initial_indent=first, subsequent_indent=rest,
        break_long_words=False, break_on_hyphens=False,
    )  # fmt: skip


_MARKS = {
    Status.OK: " ok ",
    Status.WARN: "WARN",
    Status.INFO: "note",
    Status.FAIL: "FAIL",
    Status.SKIP: "skip",
}


def render_text(report: Report) -> str:
    """The report for a human (and for pasting into a support ticket)."""
    lines = [f"ftps-gateway self-test of {report.target}", f"started {report.started}"]
    lines.append("")
    for step in report.steps:
        lines.append(f"[{_MARKS[step.status]}] {step.title:<45} {step.seconds:7.3f} s")
        for line in step.summary.splitlines():
            lines.extend(_wrap(line, "       ", "         "))
        if step.action:
            lines.extend(_wrap(f"what to do: {step.action}", "       ", "         "))
    if report.server_view:
        lines += ["", "What the server sees (SITE DIAG):"]
        width = max(len(name) for name in report.server_view)
        lines.extend(
            f"  {name:<{width}}  {value}" for name, value in report.server_view.items()
        )
    lines.append("")
    failed = report.first_failure
    if failed is None:
        warnings = sum(1 for s in report.steps if s.status is Status.WARN)
        note = f" with {warnings} warning{'s' if warnings != 1 else ''}"
        lines.append(f"RESULT: passed{note if warnings else ''} (exit code 0)")
    else:
        lines.append(
            f"RESULT: FAILED at {failed.title!r} "
            f"[{failed.stage}/{failed.reason}] (exit code {report.exit_code})"
        )
    return redact("\n".join(lines), report.secrets)

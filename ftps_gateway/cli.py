"""Command line: ``serve``, ``check-config``, ``hash-password``, ``gen-cert``, ``ban``,
``hooks``, ``reload``, ``explain``, ``self-test``.

Only this module turns exceptions into exit codes. Expected errors print one line per
problem and no traceback (``--debug`` adds it), as aiosmtpd's ``main`` does.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import logging.handlers
import os
import sys
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ftps_gateway import __version__, config
from ftps_gateway.audit import (
    AUDIT_LOGGER_NAME,
    XFERLOG_LOGGER_NAME,
    LineFileHandler,
    LineStreamHandler,
)
from ftps_gateway.config import tree as mounts
from ftps_gateway.errors import ConfigError, GatewayError, StartupError
from ftps_gateway.policy import passwords
from ftps_gateway.selftest import report as selftest_report
from ftps_gateway.selftest import runner as selftest
from ftps_gateway.service import admin, demo
from ftps_gateway.tls import certificates as certs

if TYPE_CHECKING:
    from collections.abc import Callable

    from ftps_gateway.service.server import GatewayServer

EXIT_OK = 0
EXIT_FAILURE = 1  # the server died (self-test: its own codes, selftest_report)
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_CONFIG = 3  # configuration or certificate unusable: restarting will not help

logger = logging.getLogger("ftps_gateway")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog="ftps-gateway", description="Secure explicit-FTPS partner file exchange."
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    parser.add_argument(
        "--debug", action="store_true", help="tracebacks and debug logs"
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = verbs.add_parser("serve", help="run the server")
    serve.add_argument(
        "--config", type=Path, help="gateway.toml; without it: built-in demo"
    )
    serve.add_argument("--demo-dir", type=Path, help="demo state directory")
    serve.add_argument("--listen", default=demo.DEFAULT_LISTEN, help="demo listener")
    serve.add_argument("--passive-ports", default=demo.DEFAULT_PASSIVE_PORTS,
                       help="demo passive port range")  # fmt: skip

    check = verbs.add_parser("check-config", help="validate a config and summarize it")
    check.add_argument("--config", type=Path, required=True)

    verbs.add_parser(
        "hash-password", help="read a password (terminal or stdin), print its hash"
    )

    gen = verbs.add_parser(
        "gen-cert", help="write a self-signed development certificate"
    )
    gen.add_argument("--hostname", required=True)
    gen.add_argument("--out", type=Path, required=True)

    ban = verbs.add_parser("ban", help="list or lift bans of a running server")
    ban_verbs = ban.add_subparsers(dest="ban_verb", required=True, metavar="ACTION")
    ban_list = ban_verbs.add_parser("list", help="addresses banned now")
    ban_list.add_argument("--config", type=Path, required=True)
    ban_list.add_argument("--json", action="store_true", help="machine-readable")
    ban_remove = ban_verbs.add_parser("remove", help="lift the ban on an address")
    ban_remove.add_argument("ip")
    ban_remove.add_argument("--config", type=Path, required=True)

    _add_hooks(verbs)

    worker = verbs.add_parser("worker", help=argparse.SUPPRESS)
    worker.add_argument("--config", type=Path, required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    worker.add_argument("--explicit-fds", default="")
    worker.add_argument("--implicit-fds", default="")
    worker.add_argument("--state-fd", type=int, required=True)

    reload = verbs.add_parser(
        "reload", help="make a running server re-read its config (like SIGHUP)"
    )
    reload.add_argument("--config", type=Path, required=True)
    explain = verbs.add_parser(
        "explain", help="show a user's effective tree: mounts, sources, permissions"
    )
    explain.add_argument("user")
    explain.add_argument("--config", type=Path, required=True)
    _add_self_test(verbs)
    return parser


def _add_hooks(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    hooks = verbs.add_parser("hooks", help="queued and dead-lettered hook events")
    actions = hooks.add_subparsers(dest="hooks_verb", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="events waiting or dead-lettered")
    listing.add_argument("--config", type=Path, required=True)
    listing.add_argument("--json", action="store_true", help="machine-readable")
    retry = actions.add_parser("retry", help="queue dead-lettered events again")
    retry.add_argument("ids", nargs="*", metavar="ID", help="event ids")
    retry.add_argument("--all", action="store_true", help="every dead-lettered event")
    retry.add_argument("--config", type=Path, required=True)


def _add_self_test(verbs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = verbs.add_parser(
        "self-test",
        help="diagnose a partner's connection to an FTPS server, step by step",
        description=(
            "Connect like a real client and test every step: DNS, TCP, TLS and the "
            "certificate, login, passive mode, data connections, transfers. Exit 0 "
            "when all passed, else the failing stage's code (see the README). The "
            "password is read from --password-file, the environment variable "
            "named by --password-env, a prompt, or one line on stdin; never argv."
        ),
    )
    check.add_argument("url", help="ftps://USER@HOST[:PORT]/[PATH] (ftpsi:// implicit)")
    check.add_argument(
        "--implicit",
        action="store_true",
        help="implicit TLS (like ftpsi://; default port 990)",
    )
    check.add_argument("--cafile", help="trust this CA file instead of the system's")
    check.add_argument("--pin", help="sha256:HEX fingerprint the certificate must have")
    check.add_argument(
        "--servername", help="name to check the certificate against (default: host)"
    )
    check.add_argument(
        "--password-file",
        type=Path,
        help="read the password from the first line of this file",
    )
    check.add_argument(
        "--password-env",
        default="FTPS_PASSWORD",
        metavar="NAME",
        help="environment variable with the password (default FTPS_PASSWORD)",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=selftest.DEFAULT_TIMEOUT,
        help="seconds per network operation (default %(default)s)",
    )
    check.add_argument(
        "--read-only", action="store_true", help="no probe upload (LIST and NLST only)"
    )
    check.add_argument(
        "--repeat",
        type=int,
        default=selftest.DEFAULT_REPEAT,
        help="transfers repeated on one session (default %(default)s)",
    )
    check.add_argument(
        "--scan-passive",
        type=int,
        default=0,
        metavar="N",
        help="probe N ports of the passive range (connect only; "
        "may disturb a transfer from your address running now)",
    )
    check.add_argument("--json", action="store_true", help="machine-readable report")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ftps-gateway`` command."""
    args = build_parser().parse_args(argv)
    verbs: dict[str, Callable[[], int]] = {
        "serve": lambda: _serve(args),
        "check-config": lambda: _check_config(args.config),
        "hash-password": _hash_password,
        "gen-cert": lambda: _gen_cert(args.hostname, args.out),
        "ban": lambda: _ban(args),
        "hooks": lambda: _hooks(args),
        "worker": lambda: _worker(args),
        "reload": lambda: _reload(args.config),
        "explain": lambda: _explain(args.config, args.user),
        "self-test": lambda: _self_test(args),
    }
    try:
        return verbs[args.verb]()
    except ConfigError as err:
        for problem in err.problems:
            print(problem, file=sys.stderr)
        count = len(err.problems)
        print(
            f"{count} configuration problem{'s' if count != 1 else ''}; "
            "fix them and run `ftps-gateway check-config` again.",
            file=sys.stderr,
        )
        _traceback_if(args.debug, err)
        return EXIT_CONFIG
    except GatewayError as err:
        prefix = "cannot start" if isinstance(err, StartupError) else "error"
        print(f"{prefix}: {err}", file=sys.stderr)
        _traceback_if(args.debug, err)
        return EXIT_FAILURE


def _traceback_if(debug: bool, err: BaseException) -> None:
    if debug:
        traceback.print_exception(err, file=sys.stderr)


def configure_logging(
    level: str,
    debug: bool,
    audit_file: Path | None = None,
    xferlog_file: Path | None = None,
) -> None:
    """Diagnostics to stderr; the audit trail as bare JSON lines to stdout or a file.

    Files are opened with ``WatchedFileHandler`` (``audit.LineFileHandler``): when
    logrotate moves one, the next line goes to a new file under the configured name.
    """
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    logging.getLogger("ftps_gateway").setLevel(
        logging.DEBUG if debug else level.upper()
    )
    logging.getLogger("pyftpdlib").setLevel(logging.DEBUG if debug else logging.WARNING)
    audit = logging.getLogger(AUDIT_LOGGER_NAME)
    if not audit.handlers:
        audit.addHandler(_line_handler(audit_file, sys.stdout))
    audit.setLevel(logging.INFO)
    audit.propagate = False
    xferlog = logging.getLogger(XFERLOG_LOGGER_NAME)
    xferlog.propagate = False
    if xferlog_file is None:
        xferlog.setLevel(logging.CRITICAL)  # off: AuditLog.xferlog skips formatting
    elif not xferlog.handlers:
        xferlog.addHandler(_line_handler(xferlog_file, None))
        xferlog.setLevel(logging.INFO)


def _line_handler(path: Path | None, stream: TextIO | None) -> logging.Handler:
    """One message per line, to ``path`` (created 0640 with its directory) or stream."""
    if path is None:
        handler: logging.Handler = LineStreamHandler(stream)
    else:
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            handler = LineFileHandler(path, encoding="utf-8")
            path.chmod(0o640)
        except OSError as err:
            raise StartupError(f"cannot write log file {path}: {err.strerror}") from err
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _serve(args: argparse.Namespace) -> int:
    from ftps_gateway.metrics.valuestore import keep_values_in  # noqa: PLC0415
    from ftps_gateway.service import supervisor as workers  # noqa: PLC0415 - keep other verbs light

    prepared: demo.Demo | None = None
    if args.config is None:
        prepared = demo.prepare(args.demo_dir or demo.default_state_dir(),
                                args.listen, args.passive_ports)  # fmt: skip
        cfg = prepared.config
    else:
        cfg = config.load(args.config)
    configure_logging(cfg.log_level, args.debug, cfg.audit_file, cfg.xferlog_file)
    # This process keeps its metrics in memory (a stray PROMETHEUS_MULTIPROC_DIR in
    # the environment must not put it into files); workers get their folder from
    # the supervisor (decision 0012).
    keep_values_in(None)
    count = workers.worker_count(cfg)
    if count > 1 and cfg.source is not None:
        supervisor = workers.Supervisor(cfg, count)
        if prepared is not None:
            host, port = supervisor.explicit[0].getsockname()[:2]
            _print_demo(prepared, host, port)
        return supervisor.run()
    from ftps_gateway.service.server import GatewayServer  # noqa: PLC0415

    server = GatewayServer(cfg)
    if prepared is not None:
        host, port = server.addresses[0]
        _print_demo(prepared, host, port)
    return _serve_until_stopped(server)


def _print_demo(prepared: demo.Demo, host: str, port: int) -> None:
    state = prepared.config.source.parent if prepared.config.source else "?"
    print(
        f"ftps-gateway demo ready on {host}:{port} "
        f"(user {demo.DEMO_USER!r}, state in {state})",
        flush=True,
    )
    print(
        f"password: in {prepared.password_file} (mode 0600, readable by you only)",
        flush=True,
    )
    warning = demo.exposure_warning(host)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    print(f"try it: {demo.try_it_line(prepared, host, port)}", flush=True)


def _worker(args: argparse.Namespace) -> int:
    """One worker process, started by ``serve``'s supervisor (not for operators)."""
    from ftps_gateway.service import supervisor as workers  # noqa: PLC0415

    cfg = config.load(args.config)
    configure_logging(cfg.log_level, args.debug, cfg.audit_file, cfg.xferlog_file)
    return _serve_until_stopped(workers.build_worker(args, cfg))


def _serve_until_stopped(server: GatewayServer) -> int:
    """Run ``server`` until a signal ends it (see ``install_signal_handlers``)."""
    server.install_signal_handlers()
    server.serve_forever()
    return EXIT_OK


def _check_config(path: Path) -> int:
    cfg = config.load(path)
    print(config.summary(cfg))
    for warning in config.warnings(cfg):
        print(f"warning: {warning}")
    for warning in certs.certificate_warnings(cfg.tls.certificate, cfg.tls.private_key):
        print(f"warning: {warning}")
    for user in cfg.users:
        for warning in mounts.plan_tree(cfg, user).warnings:
            print(f"warning: user {user.name}: {warning}")
    return EXIT_OK


def _admin_socket(config_path: Path) -> Path:
    """The admin socket named by a config (read only for that, so it stays cheap)."""
    return config.load(config_path).admin.socket


def _ban(args: argparse.Namespace) -> int:
    socket_path = _admin_socket(args.config)
    if args.ban_verb == "remove":
        answer = admin.request(socket_path, {"command": "unban", "ip": args.ip})
        if not answer["removed"]:
            print(f"{answer['ip']} is not banned", file=sys.stderr)
            return EXIT_FAILURE
        print(f"ban on {answer['ip']} lifted")
        return EXIT_OK
    bans = admin.request(socket_path, {"command": "bans"})["bans"]
    if args.json:
        print(json.dumps(bans, indent=2))
    elif not bans:
        print("no address is banned")
    else:
        print(f"{'ADDRESS':<40} {'REMAINING':>10} {'OFFENCES':>8}  UNTIL (UTC)")
        for ban in bans:
            until = datetime.fromtimestamp(ban["until"], tz=UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            )
            remaining = f"{ban['remaining_seconds']} s"
            print(f"{ban['ip']:<40} {remaining:>10} {ban['offences']:>8}  {until}")
    return EXIT_OK


def _hooks(args: argparse.Namespace) -> int:
    socket_path = _admin_socket(args.config)
    if args.hooks_verb == "retry":
        if bool(args.ids) == args.all:
            print("give event ids or --all (not both)", file=sys.stderr)
            return EXIT_USAGE
        ids = None if args.all else args.ids
        answer = admin.request(socket_path, {"command": "hooks-retry", "ids": ids})
        print(f"{answer['retried']} dead-lettered event(s) queued again")
        return EXIT_OK if answer["retried"] or args.all else EXIT_FAILURE
    spool = admin.request(socket_path, {"command": "hooks"})
    if args.json:
        print(json.dumps(spool, indent=2))
        return EXIT_OK
    for part, title in (("queue", "queued"), ("dead", "dead-lettered")):
        print(f"{title}: {spool[f'{part}_total']}")
        for item in spool[part]:
            when = item["dead_at"] if part == "dead" else item["next_at"]
            stamp = datetime.fromtimestamp(when or 0, tz=UTC).strftime("%H:%M:%S")
            names = item["path"] or "-"
            if item.get("target"):
                names += f" -> {item['target']}"
            error = f"  ({item['last_error']})" if item["last_error"] else ""
            print(
                f"  {item['id']}  {item['hook']}  {item['event']}  {names}  "
                f"attempts {item['attempts']}, {'since' if part == 'dead' else 'next'}"
                f" {stamp}{error}"
            )
    return EXIT_OK


def _reload(config_path: Path) -> int:
    # Validate here first: the operator sees every problem even if the running
    # server is someone else's (a wrong --config) or not running.
    socket_path = _admin_socket(config_path)
    problems = admin.request(socket_path, {"command": "reload"})["problems"]
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print("reload refused; the server keeps its previous config", file=sys.stderr)
        return EXIT_CONFIG
    print("configuration reloaded")
    return EXIT_OK


def _hash_password() -> int:
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("passwords differ; nothing printed", file=sys.stderr)
            return EXIT_FAILURE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return EXIT_FAILURE
    print(passwords.hash_password(password))
    return EXIT_OK


def _gen_cert(hostname: str, out: Path) -> int:
    cert_path, key_path = certs.generate_development_certificate(hostname, out)
    print(f"certificate: {cert_path}\nprivate key: {key_path} (mode 0600)")
    print("This certificate is self-signed: for development and tests only.")
    return EXIT_OK


def _explain(path: Path, user: str) -> int:
    """Print what ``user`` sees, and why (issue 4)."""
    cfg = config.load(path)
    try:
        print(mounts.explain(cfg, user))
    except LookupError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _self_test(args: argparse.Namespace) -> int:
    """Run the partner's diagnosis; the exit code names the failing stage (issue 6)."""
    if args.timeout <= 0 or args.repeat < 0 or args.scan_passive < 0:
        print(
            "ftps-gateway self-test: --timeout must be > 0; "
            "--repeat and --scan-passive >= 0",
            file=sys.stderr,
        )
        return selftest_report.EXIT_USAGE
    try:
        target = selftest.parse_target(args.url, implicit=args.implicit)
        pin = selftest.parse_pin(args.pin) if args.pin else None
        password = _self_test_password(args, target.user)
    except ValueError as err:
        print(f"ftps-gateway self-test: {err}", file=sys.stderr)
        return selftest_report.EXIT_USAGE
    options = selftest.Options(
        cafile=args.cafile,
        pin=pin,
        server_name=args.servername,
        timeout=args.timeout,
        read_only=args.read_only,
        repeat=args.repeat,
        scan_passive=args.scan_passive,
    )
    report = selftest.run(target, password, options)
    render = selftest_report.render_json if args.json else selftest_report.render_text
    print(render(report), flush=True)
    return report.exit_code


def _self_test_password(args: argparse.Namespace, user: str) -> str:
    """The password from a file, the environment, a prompt or stdin; never argv."""
    if args.password_file is not None:
        try:
            text = args.password_file.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(
                f"cannot read {args.password_file}: {err.strerror}"
            ) from None
        password = text.splitlines()[0] if text else ""
    elif os.environ.get(args.password_env):
        password = os.environ[args.password_env]
    elif sys.stdin.isatty():
        password = getpass.getpass(f"Password for {user}: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ValueError(
            "no password: use a prompt, --password-file, "
            f"or the {args.password_env} environment variable"
        )
    return password

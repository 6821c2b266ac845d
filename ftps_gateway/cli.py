"""Command line: ``serve``, ``check-config``, ``hash-password``, ``gen-cert``,
``explain``.

Only this module turns exceptions into exit codes. Expected errors print one line per
problem and no traceback (``--debug`` adds it), as aiosmtpd's ``main`` does.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from ftps_gateway import __version__, certs, config, demo, mounts, passwords
from ftps_gateway.audit import AUDIT_LOGGER_NAME
from ftps_gateway.errors import ConfigError, GatewayError, StartupError

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType

EXIT_OK = 0
EXIT_FAILURE = 1  # the server died, or a self-test failed
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

    explain = verbs.add_parser(
        "explain", help="show a user's effective tree: mounts, sources, permissions"
    )
    explain.add_argument("user")
    explain.add_argument("--config", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ftps-gateway`` command."""
    args = build_parser().parse_args(argv)
    verbs: dict[str, Callable[[], int]] = {
        "serve": lambda: _serve(args),
        "check-config": lambda: _check_config(args.config),
        "hash-password": _hash_password,
        "gen-cert": lambda: _gen_cert(args.hostname, args.out),
        "explain": lambda: _explain(args.config, args.user),
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


def configure_logging(level: str, debug: bool) -> None:
    """Diagnostics to stderr; the audit trail as bare JSON lines to stdout."""
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
        stream = logging.StreamHandler(sys.stdout)
        stream.setFormatter(logging.Formatter("%(message)s"))
        audit.addHandler(stream)
    audit.setLevel(logging.INFO)
    audit.propagate = False


def _serve(args: argparse.Namespace) -> int:
    from ftps_gateway.server import GatewayServer  # noqa: PLC0415 - keep other verbs light

    prepared: demo.Demo | None = None
    if args.config is None:
        prepared = demo.prepare(args.demo_dir or demo.default_state_dir(),
                                args.listen, args.passive_ports)  # fmt: skip
        cfg = prepared.config
    else:
        cfg = config.load(args.config)
    configure_logging(cfg.log_level, args.debug)
    server = GatewayServer(cfg)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        server.gateway.waker.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if prepared is not None:
        host, port = server.addresses[0]
        state = cfg.source.parent if cfg.source else "?"
        print(
            f"ftps-gateway demo ready on {host}:{port} "
            f"(user {demo.DEMO_USER!r}, state in {state})",
            flush=True,
        )
        print(f"try it: {demo.try_it_line(prepared, host, port)}", flush=True)
    server.serve_forever()
    return EXIT_OK


def _check_config(path: Path) -> int:
    cfg = config.load(path)
    print(config.summary(cfg))
    for warning in certs.certificate_warnings(cfg.tls.certificate, cfg.tls.private_key):
        print(f"warning: {warning}")
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

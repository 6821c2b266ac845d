"""The local admin socket: bans, reload, status and the hook spool, for the CLI.

A Unix socket (mode 0600, in a 0700 directory) rather than a network port: only
the service account and root can reach it, and no credentials are needed or stored.
One JSON object per line each way; a thread of its own serves it, so a slow admin
client never holds up the IO loop. Anything that changes sessions' state (reload)
is handed to the IO loop and waited for.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import socketserver
import stat
import threading
from typing import TYPE_CHECKING, Any, Protocol

from ftps_gateway.errors import GatewayError, StartupError
from ftps_gateway.session.state import ban_key

if TYPE_CHECKING:
    from pathlib import Path

    from ftps_gateway.audit import AuditLog
    from ftps_gateway.config import GatewayConfig
    from ftps_gateway.service.hookspool import SpoolAdmin
    from ftps_gateway.session.state import StateAdmin

logger = logging.getLogger("ftps_gateway")

MAX_REQUEST_BYTES = 4096
CLIENT_TIMEOUT_SECONDS = 10.0
# How long a server waits for its reload to run (GatewayServer.reload_from_thread);
# ``request`` waits a little longer, so the server's answer wins the race.
RELOAD_TIMEOUT_SECONDS = 30.0


class AdminError(GatewayError):
    """The admin socket could not be reached or answered an error."""


class AdminServer:
    """Serves admin requests for one ``GatewayServer`` on a Unix socket."""

    def __init__(self, path: Path, server: AdminTarget) -> None:
        """Bind the socket now, so a start-up problem is reported at start-up."""
        self.path = path
        self._server = server
        _prepare_socket_path(path)
        handler = type("_Handler", (_RequestHandler,), {"admin": self})
        try:
            self._unix = socketserver.ThreadingUnixStreamServer(str(path), handler)
        except OSError as err:
            raise StartupError(
                f"admin.socket: cannot listen on {path}: {err.strerror}"
            ) from err
        self._unix.daemon_threads = True
        path.chmod(0o600)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._unix.serve_forever, name="admin-socket", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving and remove the socket file."""
        if self._thread is not None:
            self._unix.shutdown()
            self._thread.join(5)
            self._thread = None
        self._unix.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:  # noqa: PLR0911 - one return per command
        """Carry out one request; errors come back as ``{"error": ...}``."""
        command = request.get("command")
        state = self._server.state_admin
        if command == "bans":
            return {"bans": [_ban_fields(ban) for ban in state.bans()]}
        if command == "unban":
            ip = request.get("ip")
            prefix = self._server.config.access.ipv6_prefix_length
            key = ban_key(ip, prefix) if isinstance(ip, str) else None
            if key is None:
                return {"error": f"not an IP address: {ip!r}"}
            removed = state.remove_ban(key)
            if removed:
                self._server.audit.event("unban", banned_ip=key)
            return {"removed": removed, "ip": key}
        if command == "reload":
            return {"problems": self._server.reload_from_thread()}
        if command in ("hooks", "hooks-retry"):
            return self._hooks(command, request.get("ids"))
        if command == "status":
            sessions, per_address, per_user = state.snapshot()
            return {
                "sessions": sessions,
                "addresses": len(per_address),
                "users_logged_in": sum(per_user.values()),
                "bans": len(state.bans()),
            }
        return {"error": f"unknown command: {command!r}"}

    def _hooks(self, command: str, ids: object) -> dict[str, Any]:
        """``hooks``: the spool's queued and dead events; ``hooks-retry``: queue dead
        ones again (``ids`` None: all of them)."""
        spool = self._server.hook_spool
        if command == "hooks":
            return spool.listing()
        if ids is not None and not (
            isinstance(ids, list) and all(isinstance(i, str) for i in ids)
        ):
            return {"error": "ids: a list of event ids, or null for all"}
        retried = spool.retry(ids)
        self._server.audit.event("hooks_retried", count=retried, ids=ids)
        return {"retried": retried}


class AdminTarget(Protocol):
    """What the admin socket works on: a single server or the worker supervisor."""

    @property
    def state_admin(self) -> StateAdmin: ...
    @property
    def config(self) -> GatewayConfig: ...
    @property
    def audit(self) -> AuditLog: ...
    @property
    def hook_spool(self) -> SpoolAdmin: ...
    def reload_from_thread(self) -> list[str]: ...


class _RequestHandler(socketserver.StreamRequestHandler):
    admin: AdminServer
    timeout = CLIENT_TIMEOUT_SECONDS

    def handle(self) -> None:
        line = self.rfile.readline(MAX_REQUEST_BYTES)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise TypeError("not an object")  # noqa: TRY301
            reply = self.admin.answer(request)
        except (ValueError, TypeError):
            reply = {"error": "a request is one JSON object on one line"}
        except Exception as err:
            logger.exception("admin request failed")
            reply = {"error": f"request failed: {err}"}
        self.wfile.write(json.dumps(reply).encode() + b"\n")


def _ban_fields(ban: Any) -> dict[str, Any]:
    return {
        "ip": ban.ip,
        "remaining_seconds": round(ban.remaining_seconds),
        "offences": ban.offences,
        "until": ban.until,
    }


def _prepare_socket_path(path: Path) -> None:
    """Make the 0700 directory; clear a stale socket, refuse a live one."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise StartupError(f"admin.socket: {path.parent}: {err.strerror}") from err
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"admin.socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left behind by a server that died
    else:
        raise StartupError(
            f"admin.socket: {path} is in use: is another ftps-gateway running?"
        )
    finally:
        probe.close()


def request(path: Path, payload: dict[str, Any]) -> dict[str, Any]:
    """Send one request to a running server's admin socket and return its answer.

    Raises:
        AdminError: no server answers on ``path``, or it answered an error.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(RELOAD_TIMEOUT_SECONDS + 5)
            client.connect(str(path))
            client.sendall(json.dumps(payload).encode() + b"\n")
            reply = client.makefile("rb").readline(1 << 20)
    except OSError as err:
        raise AdminError(
            f"no server answers on {path} ({err.strerror or err}); is it running, "
            "and is this its config?"
        ) from err
    try:
        answer = json.loads(reply)
    except ValueError as err:
        raise AdminError(f"unreadable answer from {path}") from err
    if not isinstance(answer, dict):
        raise AdminError(f"unreadable answer from {path}")
    if "error" in answer:
        raise AdminError(str(answer["error"]))
    return answer

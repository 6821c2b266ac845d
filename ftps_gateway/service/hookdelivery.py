"""Delivering one hook event, once: a command or a signed HTTP POST (issue 16).

``HookDelivery`` makes one attempt and says whether it worked; retries, backoff,
ordering and dead letters are the dispatcher's (``service.hooks``). It is called on
the dispatcher's delivery threads, never on the IO loop: a command may run until its
timeout, a receiver may take seconds per request.

- A command hook: argv, no shell, the event as JSON on stdin and as ``FTPS_*``
  variables, in its own process group, killed with that group at the timeout;
  exit 0 = delivered, the tail of stderr is the error otherwise.
- A URL hook: the JSON (without ``real_path``) POSTed with
  ``X-FTPS-Gateway-Signature: sha256=<hex HMAC>``; 2xx = delivered. ``urllib3``,
  one pool per hook, no redirects, no client retries (the spool retries), no proxy
  from the environment. Why urllib3 and not httpx: docs/decisions/0008-event-hooks.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import tempfile
import threading
from typing import TYPE_CHECKING, Any, Final

import urllib3

from ftps_gateway.metrics.gateway import build_version

if TYPE_CHECKING:
    from collections.abc import Iterable

    from ftps_gateway.config import HookSettings

MAX_RESPONSE_BYTES: Final = 64 * 1024
COMMAND_PATH: Final = "/usr/local/bin:/usr/bin:/bin"
SIGNATURE_HEADER: Final = "X-FTPS-Gateway-Signature"


class DeliveryError(Exception):
    """One attempt failed; the message is the event's ``last_error``."""


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-FTPS-Gateway-Signature`` value: ``sha256=<lower-case hex HMAC>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def event_body(event: dict[str, Any], *, with_real_path: bool) -> bytes:
    """The event as delivered: compact JSON, keys sorted (what is signed)."""
    shown = {k: v for k, v in event.items() if with_real_path or k != "real_path"}
    return json.dumps(shown, separators=(",", ":"), sort_keys=True).encode()


class HookDelivery:
    """Delivery attempts, made by several of the dispatcher's threads at once.

    Holds what outlives one attempt: the HTTP pools (one per hook, URL and CA, so a
    receiver's connections are reused) and the commands running now (so a stop can
    kill them).
    """

    def __init__(self, *, connections: int) -> None:
        """``connections``: kept-alive connections per pool (the delivery threads)."""
        self._connections = connections
        self._pools: dict[tuple[str, str, str], urllib3.PoolManager] = {}
        self._pools_lock = threading.Lock()
        self._processes: set[subprocess.Popen[bytes]] = set()

    def keep_pools_of(self, hooks: Iterable[HookSettings]) -> None:
        """After a reload: close the pools no hook uses now (a changed URL or CA)."""
        with self._pools_lock:
            keep = {(h.name, h.url, str(h.ca_file)) for h in hooks}
            for key in [key for key in self._pools if key not in keep]:
                self._pools.pop(key).clear()

    def kill_commands(self) -> None:
        """Kill every command running now, with its process group (at a stop)."""
        for process in list(self._processes):
            _kill_group(process)

    def close(self) -> None:
        """Close every pool's connections."""
        with self._pools_lock:
            for pool in self._pools.values():
                pool.clear()
            self._pools.clear()

    def deliver(self, hook: HookSettings, event: dict[str, Any]) -> None:
        """One attempt: returns when delivered.

        Raises:
            DeliveryError: it failed (the message says why, for ``last_error``).
        """
        if hook.command:
            self._run(hook, event)
        else:
            self._post(hook, event)

    def _run(self, hook: HookSettings, event: dict[str, Any]) -> None:
        """The command, with the event on stdin and in ``FTPS_*`` variables.

        No shell, no inherited environment (it may hold the gateway's secrets): PATH
        and LANG, then one variable per key that has a value. Its own process group,
        so the timeout kills what it started too.
        """
        env = {"PATH": COMMAND_PATH, "LANG": "C.UTF-8"}
        env |= {f"FTPS_{k.upper()}": str(v) for k, v in event.items() if v is not None}
        body = event_body(event, with_real_path=True)
        with tempfile.TemporaryFile() as stderr:
            try:
                process = subprocess.Popen(  # noqa: S603 - an operator's argv, no shell
                    hook.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    stderr=stderr, env=env, cwd="/", start_new_session=True,
                    close_fds=True,
                )  # fmt: skip
            except OSError as err:
                raise DeliveryError(f"cannot run {hook.command[0]}: {err}") from err
            self._processes.add(process)
            try:
                process.communicate(body, timeout=hook.timeout_seconds)
            except subprocess.TimeoutExpired:
                _kill_group(process)
                process.wait()
                raise DeliveryError(
                    f"timed out after {hook.timeout_seconds} s; killed"
                ) from None
            finally:
                self._processes.discard(process)
            code = process.returncode
            if code == 0:
                return
            stderr.seek(0, os.SEEK_END)
            stderr.seek(max(stderr.tell() - 300, 0))
            tail = stderr.read().decode("utf-8", "replace").strip()
        what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise DeliveryError(f"{what}: {tail}" if tail else what)

    def _post(self, hook: HookSettings, event: dict[str, Any]) -> None:
        """POST the signed JSON; 2xx = delivered. No redirects, no retries here."""
        body = event_body(event, with_real_path=False)
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature(hook.secret, body),
            "User-Agent": f"ftps-gateway/{build_version()}",
        }
        try:
            response = self._pool(hook).request(
                "POST", hook.url, body=body, headers=headers,
                timeout=urllib3.Timeout(total=hook.timeout_seconds),
                retries=False, redirect=False, preload_content=False,
            )  # fmt: skip
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise DeliveryError(_describe_http_error(err)) from err
        try:
            text = response.read(MAX_RESPONSE_BYTES)
        except (urllib3.exceptions.HTTPError, OSError):
            text = b""
        finally:
            if response.length_remaining == 0:
                response.release_conn()
            else:
                response.close()  # a body left unread: never reuse that connection
        if not 200 <= response.status < 300:  # noqa: PLR2004
            shown = text[:200].decode("utf-8", "replace").strip()
            raise DeliveryError(
                f"HTTP {response.status}" + (f": {shown}" if shown else "")
            )

    def _pool(self, hook: HookSettings) -> urllib3.PoolManager:
        key = (hook.name, hook.url, str(hook.ca_file))
        with self._pools_lock:
            pool = self._pools.get(key)
            if pool is None:
                pool = urllib3.PoolManager(
                    num_pools=4, maxsize=self._connections, cert_reqs="CERT_REQUIRED",
                    ca_certs=str(hook.ca_file) if hook.ca_file else None,
                )  # fmt: skip
                self._pools[key] = pool
            return pool


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _describe_http_error(err: BaseException) -> str:
    """A short, useful reason for a failed request (no traceback, no URL query)."""
    reason = getattr(err, "reason", None) or err
    text = str(reason)
    if isinstance(err, urllib3.exceptions.SSLError) or "CERTIFICATE_VERIFY" in text:
        return f"TLS: {text}"
    if isinstance(err, (urllib3.exceptions.TimeoutError, TimeoutError)):
        return f"timed out: {text}"
    return f"{type(reason).__name__}: {text}"

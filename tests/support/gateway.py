"""A real gateway serving on loopback in a background thread of the test process.

In-process, so tests can read the server's state and audit records directly; the
out-of-process form (signals, workers, kill -9) is ``support.process``. Depends on
``support.credentials`` and the ``ftps_gateway`` package.
"""

from __future__ import annotations

import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from ftps_gateway import config as config_module
from ftps_gateway.policy.passwords import PasswordVerifier
from ftps_gateway.selftest.client import ReusingFTP_TLS
from ftps_gateway.service.server import GatewayServer
from support.credentials import FAST_PARAMETERS, PASSWORD


@dataclass
class RunningGateway:
    """A gateway serving on loopback in a background thread."""

    server: GatewayServer
    host: str
    port: int
    root: Path
    ca_file: Path

    def home(self, user: str = "acme") -> Path:
        """The real home directory of ``user``."""
        return self.root / "home" / user

    def client(
        self,
        *,
        source_ip: str = "127.0.0.1",
        login: bool = True,
        user: str = "acme",
        password: str = PASSWORD,
    ) -> ReusingFTP_TLS:
        """A logged-in (or just connected) session with PROT P, resuming TLS sessions."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        ftp = ReusingFTP_TLS(context=context, timeout=10)
        ftp.connect(self.host, self.port, source_address=(source_ip, 0))
        if login:
            ftp.login(user, password)
            ftp.prot_p()
        return ftp


def serve_in_thread(
    config_path: Path, ca_file: Path
) -> tuple[RunningGateway, threading.Thread]:
    """Load ``config_path`` and serve it on a daemon thread named ``gateway``.

    Passwords are verified with the cheap test parameters. The caller stops it
    (``server.stop()``, then joins the thread).
    """
    cfg = config_module.load(config_path)
    server = GatewayServer(cfg, verifier=PasswordVerifier(parameters=FAST_PARAMETERS))
    thread = threading.Thread(target=server.serve_forever, name="gateway", daemon=True)
    thread.start()
    host, port = server.addresses[0]
    return RunningGateway(server, host, port, cfg.storage.root, ca_file), thread

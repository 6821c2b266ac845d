"""systemd's readiness protocol (``sd_notify``), in a few lines of stdlib.

With ``Type=notify`` systemd considers the service started only when it says
``READY=1``: after the listeners are bound and the workers run, not merely when the
process exists. ``RELOADING=1`` and ``STOPPING=1`` make ``systemctl status`` tell the
truth during a reload or a drain. Without ``NOTIFY_SOCKET`` (no systemd, Docker,
tests) every call does nothing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``) to systemd; True if a socket took them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.sendto("\n".join(states).encode(), address)
        return True
    return False


def reloading() -> bool:
    """``RELOADING=1`` with the monotonic timestamp systemd 253+ expects."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now}")

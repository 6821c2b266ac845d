"""A fake systemd notify socket's side: what the gateway told it."""

from __future__ import annotations

import socket


def notify_messages(sock: socket.socket, until: str) -> list[str]:
    """Datagrams received on ``sock`` until one contains ``until``."""
    seen = []
    while True:
        seen.append(sock.recv(4096).decode())
        if until in seen[-1]:
            return seen

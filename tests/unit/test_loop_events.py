"""The poller event bits the TLS channels register are the IO loop's own."""

from __future__ import annotations

import select

from pyftpdlib.ioloop import IOLoop

from ftps_gateway.ftp import tlschannel


def test_read_and_write_are_the_loops_event_bits() -> None:
    """On Linux the loop is epoll: WRITE must be EPOLLOUT (4). It was 2, which is
    EPOLLPRI: a channel that asked to be told when it can write never was."""
    loop = IOLoop()
    try:
        assert (tlschannel.READ, tlschannel.WRITE) == (loop.READ, loop.WRITE)
        if hasattr(select, "epoll"):
            assert tlschannel.WRITE == select.EPOLLOUT
    finally:
        loop.close()

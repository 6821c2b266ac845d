"""Probe for decision 0009: does an active-mode LIST work with allow_active_mode = true?

Runs against main at 0157852 (where the key was still accepted); from the shipped
version on, the key is refused. Run from the repository root with the test venv:
``.venv/bin/python docs/decisions/evidence/0009-active-probe.py``.
"""

import socket
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, "tests")
from support.certificates import write_certificate  # noqa: E402
from support.configs import write_config  # noqa: E402
from support.gateway import serve_in_thread  # noqa: E402

tmp = Path(tempfile.mkdtemp())
(tmp / "certs").mkdir()
certs = write_certificate(trustme.CA(), tmp / "certs", ["localhost", "127.0.0.1"])
path = write_config(
    tmp, certs, server_extra="login_timeout_seconds = 30\nallow_active_mode = true"
)
gw, thread = serve_in_thread(path, certs[2])
ftp = gw.client()
print("FEAT:", [line.strip() for line in ftp.sendcmd("FEAT").splitlines()[1:-1]])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
port = listener.getsockname()[1]
print("PORT ->", ftp.sendcmd(f"PORT 127,0,0,1,{port // 256},{port % 256}"))
listener.settimeout(5)
ftp.sock.settimeout(10)
ftp.putcmd("LIST")
start = time.monotonic()
conn, _ = listener.accept()
print(f"server connected back after {time.monotonic() - start:.2f}s")
print("reply:", ftp.getresp())
data = ftp.context.wrap_socket(conn, server_hostname="localhost", session=ftp.sock.session)
data.settimeout(10)
print("data TLS:", data.version(), "resumed", data.session_reused)
print("listing bytes:", len(data.recv(65536)))
try:
    print("final reply:", ftp.getresp())
except TimeoutError as err:
    print(f"no final reply after {time.monotonic() - start:.1f}s: {err!r}")
gw.server.stop()
thread.join(10)

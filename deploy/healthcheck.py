#!/usr/bin/env python3
"""Container health check: GET /healthz of the gateway's metrics listener.

Installed in the image as ``ftps-gateway-healthcheck`` (no curl needed). It finds
the listener the way the entrypoint finds the config ($FTPS_CONFIG, else
/etc/ftps-gateway/gateway.toml, else the shipped container config) and reads only
``[metrics] listen`` from it, expanding ``${NAME}`` references like the server does.
An every-interface address (0.0.0.0, ::) is asked on loopback. $FTPS_HEALTHCHECK_URL
overrides all of that. Exit 0: healthy; 1: not (the reason on stdout, which Docker
keeps in `docker inspect`).
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.request
from pathlib import Path

from ftps_gateway.config import expand_environment

TIMEOUT_SECONDS = 4.0
SHIPPED_CONFIG = "/usr/local/share/ftps-gateway/gateway.container.toml"
MOUNTED_CONFIG = "/etc/ftps-gateway/gateway.toml"


def config_path() -> Path:
    """The config the entrypoint serves (same order of precedence)."""
    if os.environ.get("FTPS_CONFIG"):
        return Path(os.environ["FTPS_CONFIG"])
    if Path(MOUNTED_CONFIG).is_file():
        return Path(MOUNTED_CONFIG)
    return Path(os.environ.get("FTPS_DEFAULT_CONFIG") or SHIPPED_CONFIG)


def health_url() -> str:
    """``http://HOST:PORT/healthz`` for the configured metrics listener."""
    if os.environ.get("FTPS_HEALTHCHECK_URL"):
        return os.environ["FTPS_HEALTHCHECK_URL"]
    path = config_path()
    with path.open("rb") as file:
        metrics = tomllib.load(file).get("metrics", {})
    listen = expand_environment(str(metrics.get("listen", "")))
    if not listen:
        raise LookupError(f"{path}: [metrics] listen is off; nothing to check")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in {"0.0.0.0", ""}:  # noqa: S104 - read from the config, not bound here
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    """Check once; print why when unhealthy."""
    try:
        url = health_url()
        if not url.startswith(("http://", "https://")):
            print(f"unhealthy: not an HTTP URL: {url}")  # noqa: T201 - Docker keeps it
            return 1
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as answer:  # noqa: S310 - scheme checked above
            body = answer.read(200).decode(errors="replace").strip()
            print(f"{url}: {answer.status} {body}")  # noqa: T201 - Docker keeps it
            return 0 if answer.status == 200 else 1  # noqa: PLR2004 - HTTP OK
    except Exception as err:  # noqa: BLE001 - any failure means unhealthy, with its reason
        print(f"unhealthy: {err}")  # noqa: T201 - Docker keeps it
        return 1


if __name__ == "__main__":
    sys.exit(main())

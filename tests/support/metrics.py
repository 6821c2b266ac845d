"""Reading a gateway's ``/metrics`` endpoint the way Prometheus would.

Parsed with prometheus_client's own text parser, so a test sees exactly what a
scraper sees. Imports nothing from the tests.
"""

from __future__ import annotations

import contextlib
import urllib.request
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from ftps_gateway.metrics.valuestore import keep_values_in

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``http://127.0.0.1:PORT/metrics``, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@contextlib.contextmanager
def values_in_files(folder: Path) -> Iterator[None]:
    """This process's metrics in multiprocess files under ``folder`` while an
    in-thread worker runs (as ``build_worker`` sets it up), then back in memory, so
    no later test's gateway writes files."""
    keep_values_in(str(folder))
    try:
        yield
    finally:
        keep_values_in(None)

"""Where this process's metric values live: in memory, or in prometheus-client's
multiprocess (mmap) files that the supervisor reads (decision 0012).

A process-wide choice, made once before any ``GatewayMetrics`` exists, and kept apart
from the metrics themselves: the CLI, the supervisor and a worker's start make it
(``keep_values_in``), a ``GatewayMetrics`` only checks that its role matches it
(``writes_to_files``), and the supervisor's reader (``service.workermetrics``) hands
the folder to workers under ``MULTIPROCESS_VARIABLE``.
"""

from __future__ import annotations

import os
from typing import Final

from prometheus_client import values

# prometheus-client's folder for a process's mmap files (multiprocess mode).
MULTIPROCESS_VARIABLE: Final = "PROMETHEUS_MULTIPROC_DIR"


def keep_values_in(folder: str | None) -> None:
    """Choose, for this whole process, where metric values live: ``None`` in memory
    (one process, the supervisor, tests), else in mmap files in ``folder`` (a worker).

    prometheus-client picks its value class (``values.ValueClass``) once, when
    ``prometheus_client.values`` is first imported, from ``PROMETHEUS_MULTIPROC_DIR``
    (0.26; every metric then calls ``values.ValueClass`` when it is created). Left
    to that, the mode would depend on whether the variable was set before some import,
    and an operator's stray variable would put a single server into files. So the
    class is set here, explicitly, before any ``GatewayMetrics`` exists. A worker's
    variable is set too: ``MmapedValue`` reads its folder from it when it opens a file;
    in memory it is removed (prometheus-client would warn on label removal, and no
    child process inherits it by accident).
    """
    if folder is None:
        values.ValueClass = values.MutexValue
        os.environ.pop(MULTIPROCESS_VARIABLE, None)
        return
    os.environ[MULTIPROCESS_VARIABLE] = folder
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


def writes_to_files() -> bool:
    """Whether this process's metrics write into multiprocess files."""
    return values.ValueClass is not values.MutexValue

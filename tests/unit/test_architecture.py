"""Architecture rules as tests: the import floors, and the pyftpdlib private names
the ``ftp/`` layer relies on (``ARCHITECTURE.md``, "Rules worth a unit test").

Owns two checkers that read source with ``ast`` (stdlib only; the package under
test is never imported, only pyftpdlib is, to look its names up), each run on the
real package and on small synthetic sources in ``tmp_path`` so that every rule is
seen to fail:

- ``check_imports``: every module imports only its own floor or the floors below
  (``FLOORS``), ``TYPE_CHECKING`` and function-local imports included; the floor-1
  modules form no runtime import cycle; ``selftest/`` stands apart; only ``ftp/`` and
  ``service/server.py`` import pyftpdlib.
- ``pyftpdlib_reliances``: every private (``_x``) name of pyftpdlib that ``ftp/``
  imports, reads, writes or overrides. ``PYFTPDLIB_PRIVATE_NAMES`` declares each one
  with its owner and a reason; the tests check that each declared name exists on the
  installed pyftpdlib and that the code relies on no undeclared one. pyproject pins
  pyftpdlib to the minor version this list was checked on: to move the pin, run
  this file against the new version and update the list.
"""

from __future__ import annotations

import ast
import collections
import functools
import importlib
import importlib.util
import inspect
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyftpdlib
import pytest

if TYPE_CHECKING:
    from collections.abc import Iterable

PACKAGE = "ftps_gateway"
_SPEC = importlib.util.find_spec(PACKAGE)  # found, not imported: the rules read source
assert _SPEC is not None
assert _SPEC.origin is not None
PACKAGE_DIR = Path(_SPEC.origin).parent

# --- part 1: import floors ------------------------------------------------------

# Floors, lowest first, keyed by the module or subpackage (relative to the package;
# "" is ftps_gateway/__init__.py itself). A module may import its own floor and the
# floors below; floor 0 (leaves) may import only the package root (for __version__),
# errors and, in a leaf package (metrics/), the package's own modules, never another
# leaf; floor 5 may import anything. A module without a floor is a violation:
# a new top-level module or subpackage must be placed here first.
FLOORS: dict[str, int] = {
    "": 0,
    "errors": 0,
    "audit": 0,
    "metrics": 0,
    "config": 1,
    "policy": 1,
    "tls": 1,
    "storage": 1,
    "session": 2,
    "ftp": 3,
    "service": 4,
    "cli": 5,
    "__main__": 5,
}
LEAF_IMPORTS = ("", "errors")  # what floor 0 may import from the package
SELFTEST = "selftest"  # the partner-side client: apart from the floors
SELFTEST_IMPORTERS = ("cli",)  # the only server-side module that may import it
PYFTPDLIB_IMPORTERS = ("ftp", "service.server")  # prefixes that may import pyftpdlib
ACYCLIC_FLOOR = 1  # several packages share it, so their import order is not given

FLOOR_RULES = {
    0: (
        "a leaf (errors, audit, metrics/) imports only ftps_gateway (__version__), "
        "errors and its own package's modules"
    ),
    1: "config/policy/tls/storage import only floors 0-1, never session, ftp, service or cli",
    2: "session imports floors 0-1 only; what it needs from above is a Protocol",
    3: "ftp imports floors 0-2 only",
    4: "service imports floors 0-3 only",
}


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``importer`` loads module ``target``."""

    importer: str  # dotted module name
    target: str  # dotted name of the module loaded (a submodule when one is named)
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``
    local: bool  # inside a function body (runs at call time)


def discover_modules(package_dir: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of the package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Walks one module, noting for each import whether it is type-only or local."""

    def __init__(self, module: str, is_package: bool, modules: Iterable[str]) -> None:
        self.module = module
        self.package_parts = module.split(".") if is_package else module.split(".")[:-1]
        self.modules = set(modules)
        self.type_checking = False
        self.local = False
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt | ast.expr) -> None:
        self.found.append(
            Import(self.module, target, node.lineno, self.type_checking, self.local)
        )

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        outer = self.type_checking
        self.type_checking = True
        for stmt in node.body:
            self.visit(stmt)
        self.type_checking = outer
        for stmt in node.orelse:  # the ``else`` of TYPE_CHECKING runs
            self.visit(stmt)

    def _visit_function(self, node: ast.AST) -> None:
        outer = self.local
        self.local = True
        self.generic_visit(node)
        self.local = outer

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._visit_function(node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._visit_function(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._visit_function(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            keep = len(self.package_parts) - (node.level - 1)
            base = ".".join(
                [*self.package_parts[:keep], *([node.module] if node.module else [])]
            )
        else:
            base = node.module or ""
        # One edge per module loaded, whatever the number of names taken from it.
        targets: dict[str, None] = {}
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            # ``from pkg import sub`` loads the submodule; ``from mod import name`` the module.
            targets[candidate if candidate in self.modules else base] = None
        for target in targets:
            self._add(target, node)

    def visit_Call(self, node: ast.Call) -> None:
        """``importlib.import_module("x")`` and ``__import__("x")`` with a literal."""
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0] if node.args else None
        if (
            name in {"import_module", "__import__"}
            and isinstance(first, ast.Constant)
            and isinstance(first.value, str)
        ):
            self._add(first.value, node)
        self.generic_visit(node)


def collect_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import of every module, resolved to the module it loads."""
    found = []
    for module, path in modules.items():
        collector = _ImportCollector(module, path.name == "__init__.py", modules)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        found.extend(collector.found)
    return found


def _relative(module: str, package: str) -> str | None:
    """``ftps_gateway.ftp.control`` -> ``ftp.control``; None outside the package."""
    if module == package:
        return ""
    if module.startswith(package + "."):
        return module[len(package) + 1 :]
    return None


def _under(relative: str, prefix: str) -> bool:
    return relative == prefix or relative.startswith(prefix + ".")


def floor_of(relative: str) -> int | None:
    """The floor of a module (relative name), or None when it has no place yet."""
    if relative in FLOORS:
        return FLOORS[relative]
    matches = [key for key in FLOORS if key and _under(relative, key)]
    return FLOORS[max(matches, key=len)] if matches else None


def _kind(edge: Import) -> str:
    if edge.type_checking:
        return " [under TYPE_CHECKING]"
    return " [function-local]" if edge.local else ""


def _selftest_problem(importer: str, target: str) -> str | None:
    if _under(importer, SELFTEST):
        if _under(target, SELFTEST):
            return None
        return "selftest imports nothing server-side (only ftps_gateway.selftest.*)"
    if importer in SELFTEST_IMPORTERS:
        return None
    return "no server module imports selftest except cli"


def _edge_problem(importer: str, target: str) -> str | None:
    """Why importing ``target`` from ``importer`` (relative names) breaks a rule."""
    if _under(importer, SELFTEST) or _under(target, SELFTEST):
        return _selftest_problem(importer, target)
    importer_floor, target_floor = floor_of(importer), floor_of(target)
    if importer_floor is None:
        return None  # reported once, as "has no floor"
    if target_floor is None:
        return "the imported module has no floor: place it in FLOORS"
    if importer_floor == 0:
        # A leaf package split by responsibility (metrics/) is still one leaf.
        own_package = importer.partition(".")[0] == target.partition(".")[0]
        allowed = target in LEAF_IMPORTS or own_package
    else:
        allowed = target_floor <= importer_floor
    return None if allowed else FLOOR_RULES[importer_floor]


def _shortest_cycle(
    graph: dict[str, dict[str, Import]], start: str
) -> list[Import] | None:
    """The edges of a shortest way from ``start`` back to itself (breadth first)."""
    came: dict[str, Import] = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for nxt, edge in sorted(graph.get(node, {}).items()):
            if nxt == start:
                path = [edge]
                while path[0].importer != start:
                    path.insert(0, came[path[0].importer])
                return path
            if nxt not in came:
                came[nxt] = edge
                queue.append(nxt)
    return None


def _cycles(edges: list[Import]) -> list[list[Import]]:
    """Each import cycle among ``edges`` once, as its edges."""
    graph: dict[str, dict[str, Import]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, {}).setdefault(edge.target, edge)
    cycles, reported = [], set()
    for start in sorted(graph):
        cycle = _shortest_cycle(graph, start)
        members = frozenset(edge.importer for edge in cycle or [])
        if cycle is not None and members not in reported:
            reported.add(members)
            cycles.append(cycle)
    return cycles


def check_imports(package_dir: Path, package: str = PACKAGE) -> list[str]:
    """Every import-rule violation as ``module -> imported (line N): rule``.

    Type-only imports count for the floors (none may point up) but not for the
    floor-1 cycle check, which is about import order at run time; function-local
    imports count for both (they run, only later).
    """
    modules = discover_modules(package_dir, package)
    problems = [
        f"{module}: has no floor: place it in FLOORS"
        for module in modules
        if floor_of(_relative(module, package) or "") is None
        and not _under(_relative(module, package) or "", SELFTEST)
    ]
    runtime_floor_one: list[Import] = []
    for edge in collect_imports(modules):
        importer = _relative(edge.importer, package) or ""
        where = f"{edge.importer} -> {edge.target} (line {edge.line})"
        if edge.target.split(".")[0] == "pyftpdlib" and not any(
            _under(importer, prefix) for prefix in PYFTPDLIB_IMPORTERS
        ):
            problems.append(
                f"{where}: only ftp/* and service/server.py import pyftpdlib{_kind(edge)}"
            )
        target = _relative(edge.target, package)
        if target is None or target == importer:
            continue
        rule = _edge_problem(importer, target)
        if rule is not None:
            problems.append(f"{where}: {rule}{_kind(edge)}")
        if (
            not edge.type_checking
            and floor_of(importer) == ACYCLIC_FLOOR
            and floor_of(target) == ACYCLIC_FLOOR
        ):
            runtime_floor_one.append(edge)
    for cycle in _cycles(runtime_floor_one):
        chain = " -> ".join(
            [cycle[0].importer] + [f"{e.target} (line {e.line})" for e in cycle]
        )
        first = cycle[0]
        problems.append(
            f"{first.importer} -> {first.target} (line {first.line}): floor-1 modules "
            f"import each other in a cycle at run time: {chain}"
        )
    return problems


def test_the_package_follows_the_import_floors() -> None:
    """No module of ftps_gateway imports up a floor, into a floor-1 cycle, across the
    selftest boundary, or pyftpdlib from outside ftp/ and service/server.py."""
    problems = check_imports(PACKAGE_DIR)
    assert not problems, "import rules broken:\n" + "\n".join(problems)


def test_the_checker_sees_the_real_package_imports() -> None:
    """The walk over the real package finds a runtime, a type-only and a
    function-local edge, so an empty violation list above is not a blind spot."""
    edges = {
        (e.importer, e.target, e.type_checking, e.local)
        for e in collect_imports(discover_modules(PACKAGE_DIR))
    }
    server, control = "ftps_gateway.service.server", "ftps_gateway.ftp.control"
    assert (server, control, False, False) in edges
    assert ("ftps_gateway.ftp.data", control, True, False) in edges
    assert ("ftps_gateway.cli", "ftps_gateway.service.supervisor", False, True) in edges


# A small package shaped like the real one, clean under every rule: relative
# imports, ``from pkg import sub``, TYPE_CHECKING within a floor, __version__.
CLEAN_TREE = {
    "__init__.py": '__version__ = "0"\n',
    "errors.py": "class GatewayError(Exception): ...\n",
    "audit.py": "from ftps_gateway import __version__\nfrom . import errors\n",
    "metrics/__init__.py": "",
    "metrics/gateway.py": (
        "import ftps_gateway\n"
        "from ftps_gateway.errors import GatewayError\n"
        "from .vocabulary import PREFIX\n"
        "from ftps_gateway.metrics import valuestore\n"
    ),
    "metrics/vocabulary.py": "",
    "metrics/valuestore.py": "",
    "config/__init__.py": (
        "from typing import TYPE_CHECKING\n"
        "from ftps_gateway.storage import vfs\n"
        "def plan():\n"
        "    from ftps_gateway.config import tree\n"
        "    from ..tls import certificates\n"
    ),
    "config/tree.py": (
        "from typing import TYPE_CHECKING\n"
        "from ..storage import vfs\n"
        "if TYPE_CHECKING:\n"
        "    from ftps_gateway.config import GatewayConfig\n"
    ),
    "storage/__init__.py": "",
    "storage/vfs.py": "from ftps_gateway.errors import GatewayError\n",
    "tls/__init__.py": "",
    "tls/certificates.py": "import ssl\nimport cryptography\n",
    "policy/__init__.py": "",
    "policy/netpolicy.py": (
        "import typing\nif typing.TYPE_CHECKING:\n    from ftps_gateway.config import X\n"
    ),
    "session/__init__.py": "",
    "session/runtime.py": (
        "from typing import TYPE_CHECKING, Protocol\n"
        "if TYPE_CHECKING:\n"
        "    from ftps_gateway.policy.netpolicy import AccessList\n"
        "    from ftps_gateway import audit, metrics\n"
    ),
    "ftp/__init__.py": "",
    "ftp/control.py": (
        "from pyftpdlib.handlers import FTPHandler\n"
        "from . import data\n"
        "from ftps_gateway.session.runtime import Gateway\n"
    ),
    "ftp/data.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from ftps_gateway.ftp.control import ControlHandler\n"
    ),
    "service/__init__.py": "",
    "service/server.py": (
        "from pyftpdlib.servers import FTPServer\n"
        "from ftps_gateway.ftp.control import ControlHandler\n"
    ),
    "service/supervisor.py": "from ftps_gateway.service import server\n",
    "selftest/__init__.py": "",
    "selftest/runner.py": "from .report import Report\nimport ftplib\nimport cryptography\n",
    "selftest/report.py": "",
    "cli.py": (
        "from ftps_gateway import __version__, config\n"
        "from ftps_gateway.selftest import runner\n"
        "def serve():\n"
        "    from ftps_gateway.service import supervisor\n"
    ),
    "__main__.py": "from ftps_gateway.cli import main\n",
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write a fake ``ftps_gateway`` package under ``root``; return its directory."""
    package_dir = root / PACKAGE
    for relative, text in files.items():
        path = package_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package_dir


def test_a_clean_synthetic_package_passes(tmp_path: Path) -> None:
    """The checker finds nothing in a package that keeps every rule."""
    assert check_imports(write_tree(tmp_path, CLEAN_TREE)) == []


# (file, source appended to it, the violation expected)
VIOLATIONS = [
    pytest.param(
        "storage/vfs.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from ftps_gateway.session.runtime import Gateway\n",
        "ftps_gateway.storage.vfs -> ftps_gateway.session.runtime (line 4): "
        + FLOOR_RULES[1]
        + " [under TYPE_CHECKING]",
        id="type-checking-import-up-a-floor",
    ),
    pytest.param(
        "session/runtime.py",
        "def later():\n    from ..ftp import control\n",
        "ftps_gateway.session.runtime -> ftps_gateway.ftp.control (line 6): "
        + FLOOR_RULES[2]
        + " [function-local]",
        id="function-local-relative-import-up",
    ),
    pytest.param(
        "session/runtime.py",
        "import ftps_gateway.service.server\n",
        "ftps_gateway.session.runtime -> ftps_gateway.service.server (line 5): "
        + FLOOR_RULES[2],
        id="plain-import-up",
    ),
    pytest.param(
        "audit.py",
        "from ftps_gateway import metrics\n",
        "ftps_gateway.audit -> ftps_gateway.metrics (line 3): " + FLOOR_RULES[0],
        id="leaf-imports-a-leaf",
    ),
    pytest.param(
        "metrics/gateway.py",
        "from ftps_gateway import audit\n",
        "ftps_gateway.metrics.gateway -> ftps_gateway.audit (line 5): "
        + FLOOR_RULES[0],
        id="leaf-package-module-imports-another-leaf",
    ),
    pytest.param(
        "metrics/vocabulary.py",
        "from ..config import tree\n",
        "ftps_gateway.metrics.vocabulary -> ftps_gateway.config.tree (line 1): "
        + FLOOR_RULES[0],
        id="leaf-package-module-imports-config",
    ),
    pytest.param(
        "errors.py",
        "from .config import tree\n",
        "ftps_gateway.errors -> ftps_gateway.config.tree (line 2): " + FLOOR_RULES[0],
        id="leaf-imports-config",
    ),
    pytest.param(
        "ftp/data.py",
        "from .. import service\n",
        "ftps_gateway.ftp.data -> ftps_gateway.service (line 4): " + FLOOR_RULES[3],
        id="two-dot-relative-package-import",
    ),
    pytest.param(
        "service/server.py",
        "import importlib\ndef f():\n    importlib.import_module('ftps_gateway.cli')\n",
        "ftps_gateway.service.server -> ftps_gateway.cli (line 5): "
        + FLOOR_RULES[4]
        + " [function-local]",
        id="dynamic-import",
    ),
    pytest.param(
        "selftest/runner.py",
        "from ftps_gateway.config import load\n",
        "ftps_gateway.selftest.runner -> ftps_gateway.config (line 4): "
        "selftest imports nothing server-side (only ftps_gateway.selftest.*)",
        id="selftest-imports-server-side",
    ),
    pytest.param(
        "selftest/runner.py",
        "from ftps_gateway import __version__\n",
        "ftps_gateway.selftest.runner -> ftps_gateway (line 4): "
        "selftest imports nothing server-side (only ftps_gateway.selftest.*)",
        id="selftest-imports-the-package-root",
    ),
    pytest.param(
        "service/server.py",
        "from ftps_gateway.selftest import runner\n",
        "ftps_gateway.service.server -> ftps_gateway.selftest.runner (line 3): "
        "no server module imports selftest except cli",
        id="server-imports-selftest",
    ),
    pytest.param(
        "storage/vfs.py",
        "def f():\n    import pyftpdlib.ioloop\n",
        "ftps_gateway.storage.vfs -> pyftpdlib.ioloop (line 3): only ftp/* and "
        "service/server.py import pyftpdlib [function-local]",
        id="pyftpdlib-outside-ftp",
    ),
    pytest.param(
        "service/supervisor.py",
        "from pyftpdlib.ioloop import IOLoop\n",
        "ftps_gateway.service.supervisor -> pyftpdlib.ioloop (line 2): only ftp/* and "
        "service/server.py import pyftpdlib",
        id="pyftpdlib-in-service-but-not-server",
    ),
    pytest.param(
        "tls/certificates.py",
        "from ftps_gateway import config\n",
        "ftps_gateway.config -> ftps_gateway.tls.certificates (line 5): floor-1 modules "
        "import each other in a cycle at run time: ftps_gateway.config -> "
        "ftps_gateway.tls.certificates (line 5) -> ftps_gateway.config (line 3)",
        id="floor-one-cycle-through-a-function-local-import",
    ),
    pytest.param(
        "newthing.py",
        "from ftps_gateway.service import server\n",
        "ftps_gateway.newthing: has no floor: place it in FLOORS",
        id="module-without-a-floor",
    ),
]


@pytest.mark.parametrize(("relative", "extra", "expected"), VIOLATIONS)
def test_the_checker_reports_each_violation(
    tmp_path: Path, relative: str, extra: str, expected: str
) -> None:
    """One bad import added to the clean package is reported as exactly one line."""
    files = dict(CLEAN_TREE)
    files[relative] = files.get(relative, "") + extra
    assert check_imports(write_tree(tmp_path, files)) == [expected]


def test_a_type_checking_import_closes_no_cycle(tmp_path: Path) -> None:
    """config imports netpolicy at run time while netpolicy imports config only for
    types: no cycle; the same netpolicy import at run time is one."""
    files = dict(CLEAN_TREE)
    files["config/__init__.py"] += "from ftps_gateway.policy import netpolicy\n"
    assert check_imports(write_tree(tmp_path / "typed", files)) == []
    files["policy/netpolicy.py"] += "from ftps_gateway.config import Y\n"
    assert check_imports(write_tree(tmp_path / "runtime", files)) == [
        "ftps_gateway.config -> ftps_gateway.policy.netpolicy (line 6): floor-1 modules "
        "import each other in a cycle at run time: ftps_gateway.config -> "
        "ftps_gateway.policy.netpolicy (line 6) -> ftps_gateway.config (line 4)"
    ]


# --- part 2: the pyftpdlib contract ------------------------------------------------

FTP_DIR = PACKAGE_DIR / "ftp"

# Every private name of pyftpdlib that ftp/ imports, reads, writes or overrides:
# name -> (where pyftpdlib defines it, what ftp/ needs it for). Derived by scanning
# ftp/*.py against pyftpdlib 2.2.0's source; the tests below keep it complete.
PYFTPDLIB_PRIVATE_NAMES: dict[str, tuple[str, str]] = {
    # module attributes
    "_ERRNOS_DISCONNECTED": (
        "pyftpdlib.ioloop",
        "tlschannel: which errnos mean the peer vanished, the same set pyftpdlib uses",
    ),
    "_FileReadWriteError": (
        "pyftpdlib.exceptions",
        "data: a failed upload write is raised as this so DTPHandler answers and closes",
    ),
    "_RetryError": (
        "pyftpdlib.exceptions",
        "tlschannel: recv() raises it to tell the IO loop 'no data yet, TLS wants more'",
    ),
    "_Scheduler": (
        "pyftpdlib.ioloop",
        "loop: TimerScheduler subclasses the timer heap to skip timers cancelled mid-batch",
    ),
    # the timer heap (loop.TimerScheduler.poll re-implements _Scheduler.poll)
    "_tasks": ("pyftpdlib.ioloop._Scheduler", "loop: the heap of pending timers"),
    "_cancellations": (
        "pyftpdlib.ioloop._Scheduler",
        "loop: cancelled-timer count that decides when to reheapify, as pyftpdlib does",
    ),
    "_repush": (
        "pyftpdlib.ioloop._CallLater",
        "loop: a timer reset() while due is pushed back, not run",
    ),
    # every channel (pyftpdlib's AsyncChat)
    "_closed": (
        "pyftpdlib.ioloop.AsyncChat",
        "control/data/tlschannel: no reply, timer or IO on a channel already closed",
    ),
    "_fileno": (
        "pyftpdlib.ioloop.AsyncChat",
        "tlschannel: _set_io_events registers the socket with the loop by its fd",
    ),
    "_wanted_io_events": (
        "pyftpdlib.ioloop.AsyncChat",
        "tlschannel: _set_io_events keeps pyftpdlib's event bookkeeping in step",
    ),
    "_current_io_events": (
        "pyftpdlib.ioloop.AsyncChat",
        "tlschannel: the events registered now (TLS read/write wants switch them)",
    ),
    # the control connection (pyftpdlib's FTPHandler)
    "_in_buffer": (
        "pyftpdlib.handlers.FTPHandler",
        "control: collect_incoming_data caps a line and refuses bare CR/LF in it",
    ),
    "_in_buffer_len": (
        "pyftpdlib.handlers.FTPHandler",
        "control: the running length of that buffer, reset with it",
    ),
    "_in_dtp_queue": (
        "pyftpdlib.handlers.FTPHandler",
        "control: an upload waiting for its data connection (drain, failed data path)",
    ),
    "_out_dtp_queue": (
        "pyftpdlib.handlers.FTPHandler",
        "control: a download or listing waiting for its data connection (same)",
    ),
    "_restart_position": (
        "pyftpdlib.handlers.FTPHandler",
        "fileverbs: the REST offset, consumed by STOR/APPE into an atomic upload",
    ),
    "_rnfr": (
        "pyftpdlib.handlers.FTPHandler",
        "fileverbs/control: the RNFR source, checked against mounts before RNTO",
    ),
    "_current_type": (
        "pyftpdlib.handlers.FTPHandler",
        "fileverbs/control: TYPE A or I, for partial-upload resume and the xferlog",
    ),
    "_dtp_acceptor": (
        "pyftpdlib.handlers.FTPHandler",
        "control: holds our PassiveListener where pyftpdlib keeps its PassiveDTP",
    ),
    "_dtp_connector": (
        "pyftpdlib.handlers.FTPHandler",
        "control: an active-mode connection on its way counts as a data path",
    ),
    "_shutdown_connecting_dtp": (
        "pyftpdlib.handlers.FTPHandler",
        "control: overridden to also drop a data connection still in its handshake",
    ),
    "_on_dtp_connection": (
        "pyftpdlib.handlers.FTPHandler",
        "control: called once data TLS is up, to start the queued transfer",
    ),
    "_on_dtp_close": (
        "pyftpdlib.handlers.FTPHandler",
        "control: overridden so a closed session arms no idle timer",
    ),
    "_make_epasv": (
        "pyftpdlib.handlers.FTPHandler",
        "control: overridden for PASV/EPSV ports from the range, address per network",
    ),
    "_available_facts": (
        "pyftpdlib.handlers.FTPHandler",
        "control: removes the unix.* MLST facts, which describe the server",
    ),
    "_extra_feats": (
        "pyftpdlib.handlers.FTPHandler",
        "control/hashverbs: FEAT lists AUTH TLS, PBSZ, PROT, HASH and the X* digests",
    ),
    "_current_facts": (
        "pyftpdlib.handlers.FTPHandler",
        "listings: the MLST facts the client chose (OPTS MLST), for MLSD off the loop",
    ),
    # the data connection (pyftpdlib's DTPHandler)
    "_idler": (
        "pyftpdlib.handlers.DTPHandler",
        "data: a refused connection cancels its idle timer before a quiet close",
    ),
    "_resp": (
        "pyftpdlib.handlers.DTPHandler",
        "data: the reply DTPHandler.close sends (quota, disk full, truncated upload)",
    ),
    "_data_wrapper": (
        "pyftpdlib.handlers.DTPHandler",
        "data: TYPE A line-ending conversion, applied in our own receive path",
    ),
}

SELF_NAMES = frozenset({"self", "cls"})


def is_private(name: str) -> bool:
    """``_x`` but not ``_`` or a dunder (``__init__`` is everyone's)."""
    return (
        name.startswith("_")
        and name != "_"
        and not (name.startswith("__") and name.endswith("__"))
    )


def resolve(dotted: str) -> Any:
    """The object at ``a.b.C.d``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:]:
            found = getattr(found, part)
        return found
    raise ImportError(dotted)


def _source_tree(obj: Any) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(obj)))
    except (OSError, TypeError):
        return None  # object, Exception...: no Python source


def names_defined_in(tree: ast.AST) -> set[str]:
    """Private names a piece of source defines: functions, classes, assignments to a
    name or to any attribute (``self._x = ...``, ``call._repush = ...``), imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return {name for name in names if is_private(name)}


@functools.cache
def instance_names(klass: type) -> frozenset[str]:
    """Private names an instance of ``klass`` has: class attributes, methods and
    slots along the MRO, plus every ``self.<name>`` its methods assign."""
    names = {name for k in klass.__mro__ for name in vars(k) if is_private(name)}
    for k in klass.__mro__:
        tree = _source_tree(k)
        for node in ast.walk(tree) if tree is not None else ():
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.ctx, ast.Store)
                and isinstance(node.value, ast.Name)
                and node.value.id == "self"
                and is_private(node.attr)
            ):
                names.add(node.attr)
    return frozenset(names)


def defined_on(owner: Any, name: str) -> bool:
    """Whether a pyftpdlib module or class (with its bases and instances) has ``name``."""
    if inspect.ismodule(owner):
        return hasattr(owner, name)
    return name in instance_names(owner)


def _pyftpdlib_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted pyftpdlib path, for one module's pyftpdlib imports."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            if node.module.split(".")[0] == "pyftpdlib":
                for alias in node.names:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pyftpdlib":
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name if alias.asname else local
    return aliases


def pyftpdlib_names(paths: Iterable[str]) -> set[str]:
    """Private names defined in the pyftpdlib modules that ``paths`` (imported
    objects) come from or live in, and on the classes along their MROs."""
    modules: set[types.ModuleType] = set()
    classes: set[type] = set()
    for path in paths:
        found = resolve(path)
        if inspect.ismodule(found):
            modules.add(found)
            continue
        modules.add(resolve(path.rpartition(".")[0]))
        home = inspect.getmodule(found)
        if home is not None:
            modules.add(home)
        if inspect.isclass(found):
            classes.update(found.__mro__)
    modules.update(inspect.getmodule(k) or pyftpdlib for k in classes)
    names: set[str] = set()
    for module in modules:
        if module.__name__.split(".")[0] == "pyftpdlib":
            tree = _source_tree(module)
            names |= names_defined_in(tree) if tree is not None else set()
    for klass in classes:
        names |= instance_names(klass)
    return names


def _dotted(node: ast.expr) -> str:
    return ast.unparse(node)


class _RelianceFinder(ast.NodeVisitor):
    """Notes where one module uses a private name that pyftpdlib defines.

    ``self._x`` (and class-body definitions: overrides, declarations) count only in
    a class that is a pyftpdlib subclass or mixed into one, checked against that
    pyftpdlib class; ``obj._x`` on anything else counts when any pyftpdlib module
    or class in scope defines ``_x``. So ``LoopWaker``-style classes of our own may
    reuse a name like ``_closed`` without it counting as a reliance."""

    def __init__(
        self, where: str, names_of: dict[str, set[str]], everything: set[str]
    ) -> None:
        self.where = where
        self.names_of = names_of  # ftp class name -> pyftpdlib names its self sees
        self.everything = everything
        self.cls: str | None = None
        self.found: dict[str, list[str]] = {}

    def note(self, name: str, node: ast.stmt | ast.expr) -> None:
        self.found.setdefault(name, []).append(f"{self.where}:{node.lineno}")

    def _use(self, obj: ast.expr, name: str, node: ast.expr) -> None:
        if not is_private(name):
            return
        if isinstance(obj, ast.Name) and obj.id in SELF_NAMES and self.cls is not None:
            if name in self.names_of.get(self.cls, set()):
                self.note(name, node)
        elif name in self.everything:
            self.note(name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if not node.level and module.split(".")[0] == "pyftpdlib":
            for part in module.split("."):
                if is_private(part):
                    self.note(part, node)
            for alias in node.names:
                if is_private(alias.name):
                    self.note(alias.name, node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "pyftpdlib":
                for part in alias.name.split("."):
                    if is_private(part):
                        self.note(part, node)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        outer, self.cls = self.cls, node.name
        own = self.names_of.get(node.name, set())
        pending: list[ast.stmt] = list(node.body)
        while pending:  # class-body definitions, also under if/try (TYPE_CHECKING)
            stmt = pending.pop()
            if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                targets: list[tuple[str, ast.stmt]] = [(stmt.name, stmt)]
            elif isinstance(stmt, ast.Assign):
                targets = [
                    (t.id, stmt) for t in stmt.targets if isinstance(t, ast.Name)
                ]
            elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                targets = [(stmt.target.id, stmt)]
            else:
                for field in ("body", "orelse", "finalbody"):
                    pending.extend(getattr(stmt, field, []))
                pending.extend(s for h in getattr(stmt, "handlers", []) for s in h.body)
                continue
            for name, where in targets:
                if is_private(name) and name in own:
                    self.note(name, where)
        self.generic_visit(node)
        self.cls = outer

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._use(node.value, node.attr, node)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Name)
            and func.id in {"getattr", "setattr", "hasattr", "delattr"}
            and len(node.args) > 1
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            self._use(node.args[0], node.args[1].value, node)
        self.generic_visit(node)


def _pyftpdlib_bases(
    trees: dict[Path, ast.Module],
) -> dict[str, set[type]]:
    """Each class of the files -> the pyftpdlib classes its ``self`` really is:
    its own pyftpdlib ancestors, and for a mixin those of every class using it."""
    bases: dict[str, list[str]] = {}
    direct: dict[str, set[type]] = {}
    for tree in trees.values():
        aliases = _pyftpdlib_aliases(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [_dotted(b) for b in node.bases]
                direct[node.name] = set()
                for base in bases[node.name]:
                    head, _, rest = base.partition(".")
                    if head in aliases:
                        found = resolve(".".join(filter(None, [aliases[head], rest])))
                        if inspect.isclass(found):
                            direct[node.name].add(found)

    def ancestry(name: str, seen: frozenset[str] = frozenset()) -> set[str]:
        local = {b.rpartition(".")[2] for b in bases.get(name, [])} & bases.keys()
        result = {name}
        for base in local - seen:
            result |= ancestry(base, seen | {name})
        return result

    family = {name: ancestry(name) for name in bases}
    own = {name: set().union(*(direct[a] for a in family[name])) for name in bases}
    return {
        name: set().union(
            own[name], *(own[user] for user in bases if name in family[user])
        )
        for name in bases
    }


def pyftpdlib_reliances(
    files: Iterable[Path], context: Iterable[Path] = ()
) -> dict[str, list[str]]:
    """Private pyftpdlib name -> where the files use it (``file.py:line``).

    ``context`` files are not searched, but their pyftpdlib imports and classes
    count: a module outside ftp/ touching ``handler._rnfr`` imports no pyftpdlib.
    """
    files = sorted(files)
    trees = {
        path: ast.parse(path.read_text(encoding="utf-8"), str(path))
        for path in [*files, *context]
    }
    seen_as = _pyftpdlib_bases(trees)
    names_of = {
        name: set().union(*(instance_names(k) for k in klasses))
        for name, klasses in seen_as.items()
    }
    imported = {p for tree in trees.values() for p in _pyftpdlib_aliases(tree).values()}
    everything = pyftpdlib_names(imported).union(*names_of.values())
    found: dict[str, list[str]] = {}
    for path in files:
        tree = trees[path]
        finder = _RelianceFinder(path.name, names_of, everything)
        finder.visit(tree)
        for name, places in finder.found.items():
            found.setdefault(name, []).extend(places)
    return found


def _place_order(place: str) -> tuple[str, int]:
    file, _, line = place.rpartition(":")
    return file, int(line)


def contract_problems(
    files: Iterable[Path], declared: dict[str, tuple[str, str]]
) -> list[str]:
    """What the declared list misses (a new reliance) or still lists (none left)."""
    found = pyftpdlib_reliances(files)
    problems = [
        f"undeclared pyftpdlib private name {name} ({', '.join(sorted(set(found[name]), key=_place_order))}): "
        "add it to PYFTPDLIB_PRIVATE_NAMES with its owner and a reason, or stop using it"
        for name in sorted(found.keys() - declared.keys())
    ]
    problems += [
        f"{name} is declared but not relied on: ftp/ no longer uses it (drop it) or "
        "pyftpdlib no longer defines it (see the existence test)"
        for name in sorted(declared.keys() - found.keys())
    ]
    return problems


@pytest.mark.parametrize("name", sorted(PYFTPDLIB_PRIVATE_NAMES))
def test_each_declared_pyftpdlib_private_name_exists(name: str) -> None:
    """The installed pyftpdlib still defines every private name ftp/ relies on."""
    owner, reason = PYFTPDLIB_PRIVATE_NAMES[name]
    assert defined_on(resolve(owner), name), (
        f"pyftpdlib {pyftpdlib.__ver__} no longer defines {owner}.{name}, "
        f"which ftp/ needs ({reason})"
    )


def test_ftp_relies_on_exactly_the_declared_pyftpdlib_private_names() -> None:
    """ftp/ uses no pyftpdlib private name that PYFTPDLIB_PRIVATE_NAMES does not
    declare, and the list declares none that ftp/ no longer uses."""
    problems = contract_problems(FTP_DIR.glob("*.py"), PYFTPDLIB_PRIVATE_NAMES)
    assert not problems, "\n".join(problems)


def test_no_module_outside_ftp_relies_on_pyftpdlib_private_names() -> None:
    """pyftpdlib's private names appear only in ftp/ (ARCHITECTURE.md rule 1)."""
    outside = [p for p in PACKAGE_DIR.rglob("*.py") if FTP_DIR not in p.parents]
    assert pyftpdlib_reliances(outside, context=FTP_DIR.glob("*.py")) == {}


def test_a_private_name_outside_ftp_is_found(tmp_path: Path) -> None:
    """A session module reading ``handler._rnfr`` imports no pyftpdlib itself; the
    names ftp/ brings in still make it count."""
    module = tmp_path / "gate.py"
    module.write_text("def source(handler):\n    return handler._rnfr\n")
    assert pyftpdlib_reliances([module]) == {}
    assert pyftpdlib_reliances([module], context=FTP_DIR.glob("*.py")) == {
        "_rnfr": ["gate.py:2"]
    }


SYNTHETIC_FTP_MODULE = """\
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.ioloop import AsyncChat, _Scheduler


class Mixin:
    def queued(self):
        return self._in_dtp_queue


class Handler(Mixin, FTPHandler):
    _current_type: str

    def _on_dtp_close(self):
        super()._on_dtp_close()

    def mine(self):
        self._pending = 1
        return getattr(self, "_rnfr")


class Standalone:
    def __init__(self):
        self._closed = False


def reset(call):
    call._repush = False


def _target():
    return _Scheduler
"""


def test_the_scanner_finds_each_kind_of_reliance(tmp_path: Path) -> None:
    """A private import, a mixin's read, a declaration, an override, a getattr and a
    foreign object's attribute count; our own names (even ``_closed`` on a class of
    ours, ``_target`` at module level) do not."""
    module = tmp_path / "handler.py"
    module.write_text(SYNTHETIC_FTP_MODULE, encoding="utf-8")
    assert pyftpdlib_reliances([module]) == {
        "_Scheduler": ["handler.py:2"],
        "_in_dtp_queue": ["handler.py:7"],
        "_current_type": ["handler.py:11"],
        "_on_dtp_close": ["handler.py:13", "handler.py:14"],
        "_rnfr": ["handler.py:18"],
        "_repush": ["handler.py:27"],
    }


def test_the_contract_fails_on_a_new_or_a_stale_reliance(tmp_path: Path) -> None:
    """A copy of ftp/ that touches one more pyftpdlib private name, and lacks loop.py,
    is reported both ways: the new name undeclared, loop.py's names stale."""
    for source in FTP_DIR.glob("*.py"):
        if source.name != "loop.py":
            (tmp_path / source.name).write_text(source.read_text(encoding="utf-8"))
    (tmp_path / "extra.py").write_text(
        "from ftps_gateway.ftp.control import ControlHandler\n\n\n"
        "class Louder(ControlHandler):\n"
        "    def epsv_all(self):\n"
        "        return self._epsvall\n",
        encoding="utf-8",
    )
    assert contract_problems(tmp_path.glob("*.py"), PYFTPDLIB_PRIVATE_NAMES) == [
        "undeclared pyftpdlib private name _epsvall (extra.py:6): add it to "
        "PYFTPDLIB_PRIVATE_NAMES with its owner and a reason, or stop using it",
        *[
            f"{name} is declared but not relied on: ftp/ no longer uses it (drop it) "
            "or pyftpdlib no longer defines it (see the existence test)"
            for name in ("_Scheduler", "_cancellations", "_repush", "_tasks")
        ],
    ]


def test_the_existence_check_sees_instance_attributes_and_fails_on_a_missing_name() -> (
    None
):
    """``_closed`` is set in AsyncChat.__init__, not a class attribute, and is found
    through FTPHandler's bases; a name pyftpdlib lacks is not found."""
    handler = resolve("pyftpdlib.handlers.FTPHandler")
    assert not hasattr(handler, "_closed")
    assert defined_on(handler, "_closed")
    assert defined_on(resolve("pyftpdlib.ioloop"), "_ERRNOS_DISCONNECTED")
    assert not defined_on(handler, "_no_such_name")
    assert not defined_on(resolve("pyftpdlib.ioloop"), "_no_such_name")

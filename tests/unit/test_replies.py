"""``ftp/replies.py`` is the one home of the reply texts the gateway writes (issue 13).

Two checks, both reading the real package: every constant in ``replies`` is a well
formed RFC 959 reply line (or a documented ``_TEXT`` for pyftpdlib to prefix), and no
other module of ``ftp/``, ``session/`` or ``service/`` spells a reply out as a string
literal (f-strings too). Together they make ``replies.X`` in a test the text a client
really gets. The source checker also runs on small synthetic sources, so that it is
seen to fail.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import textwrap
from pathlib import Path

import pytest

from ftps_gateway.ftp import replies
from support.control import exactly

_SPEC = importlib.util.find_spec("ftps_gateway")
assert _SPEC is not None
assert _SPEC.origin is not None
PACKAGE_DIR = Path(_SPEC.origin).parent
REPLIES_FILE = PACKAGE_DIR / "ftp" / "replies.py"
SCANNED = ("ftp", "session", "service")  # the floors that talk to a client

# RFC 959 section 4.2: a reply is a three-digit code (first digit 1-5), then a space
# (the last line) or a dash (a line of a multi-line reply), then text.
REPLY = re.compile(r"^[1-5][0-9][0-9][ -]")
TEXT_ONLY_SUFFIX = "_TEXT"  # the text alone: pyftpdlib puts the code in front


def reply_constants() -> dict[str, object]:
    """Every public constant of ``replies``, by name."""
    return {name: value for name, value in vars(replies).items() if name.isupper()}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the module, class and function docstring nodes in ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(
            node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
        ):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                found.add(id(body[0].value))
    return found


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return value if isinstance(value, str) else None


def reply_literals(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal in ``source`` that reads like a reply.

    A plain string (or bytes) literal counts if it starts like a reply; an f-string
    if its leading literal part does (its later parts follow a value, not a line
    start). Docstrings are prose, not replies, and are skipped.
    """
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            skip.update(id(part) for part in node.values)
            head = node.values[0] if node.values else None
            text = _text(head.value) if isinstance(head, ast.Constant) else None
        elif isinstance(node, ast.Constant) and id(node) not in skip:
            text = _text(node.value)
        else:
            continue
        if text is not None and REPLY.match(text):
            found.append((node.lineno, text))
    return found


def test_every_constant_is_a_reply_line_or_a_text() -> None:
    """Each constant starts with a valid 3-digit code and a space or dash, on one
    line; a ``_TEXT`` constant is the text alone; a dict holds reply lines."""
    problems = []
    constants = reply_constants()
    assert constants, "no constant found in ftp/replies.py"
    for name, value in constants.items():
        if isinstance(value, dict):
            lines = [(f"{name}[{key!r}]", line) for key, line in value.items()]
        else:
            lines = [(name, value)]
        for label, line in lines:
            if not isinstance(line, str):
                problems.append(f"{label}: not a string: {line!r}")
            elif "\r" in line or "\n" in line:
                problems.append(f"{label}: CR or LF inside a reply line: {line!r}")
            elif label.endswith(TEXT_ONLY_SUFFIX):
                if REPLY.match(line):
                    problems.append(f"{label}: a _TEXT carries no code: {line!r}")
            elif not REPLY.match(line):
                problems.append(f"{label}: no 3-digit code (1xx-5xx) and space or dash")
    assert problems == []


def test_no_module_but_replies_spells_a_reply_out() -> None:
    """No string literal or f-string in ``ftp/``, ``session/`` or ``service/``
    outside ``replies.py`` starts like a reply (``^[1-5][0-9][0-9][ -]``)."""
    files = sorted(
        path
        for floor in SCANNED
        for path in (PACKAGE_DIR / floor).glob("*.py")
        if path != REPLIES_FILE
    )
    assert len(files) > 10, files  # the package was found
    found = [
        f"{path.relative_to(PACKAGE_DIR)}:{line}: {text!r} (name it in ftp/replies.py)"
        for path in files
        for line, text in reply_literals(path.read_text(encoding="utf-8"))
    ]
    assert found == []


def test_replies_itself_is_seen_by_the_checker() -> None:
    """Run on ``replies.py``, the checker finds exactly its reply lines: it reads the
    real source the way the test above reads every other module."""
    lines = set()
    for value in reply_constants().values():
        for line in value.values() if isinstance(value, dict) else [value]:
            if isinstance(line, str) and REPLY.match(line):
                lines.add(line)
    found = reply_literals(REPLIES_FILE.read_text(encoding="utf-8"))
    assert {text for _, text in found} == lines


@pytest.mark.parametrize(
    ("source", "lines"),
    [
        pytest.param('self.respond("550 Nope.")', [1], id="literal"),
        pytest.param('x = 1\nself.push("211-Status\\r\\n")', [2], id="dash"),
        pytest.param('self.respond(f"550 {path} gone.")', [1], id="f-string"),
        pytest.param('self.respond("550 " + why)', [1], id="concatenated"),
        pytest.param('sock.send(b"421 Bye.\\r\\n")', [1], id="bytes"),
        pytest.param('R = {"x": "452 Full."}', [1], id="dict-value"),
        pytest.param('self.respond("550 %s." % why)', [1], id="percent"),
    ],
)
def test_checker_finds_a_reply_literal(source: str, lines: list[int]) -> None:
    """Each spelling of a reply outside replies.py is found, on its line."""
    assert [line for line, _ in reply_literals(source)] == lines


@pytest.mark.parametrize(
    "source",
    [
        pytest.param('"""550 is what pyftpdlib answers."""', id="module-docstring"),
        pytest.param(
            'def f():\n    """421 text."""\n    return replies.SHUTDOWN', id="docstring"
        ),
        pytest.param('x = f"{code} {text}"', id="f-string-without-literal-head"),
        pytest.param('x = f"port {port}: 200 ok"', id="code-inside"),
        pytest.param('x = "650 not a reply class"', id="sixth-class"),
        pytest.param('x = "2000 bytes"', id="four-digits"),
        pytest.param('y = "127.0.0.1:2121"', id="address"),
        pytest.param('if reply.startswith("226"):\n    pass', id="bare-code"),
    ],
)
def test_checker_leaves_other_strings_alone(source: str) -> None:
    """Prose, bare codes and strings that only contain a number are not replies."""
    assert reply_literals(textwrap.dedent(source)) == []


def test_exactly_matches_one_whole_reply_only() -> None:
    """The tests' ``match=exactly(...)`` takes the reply whole: no prefix, no suffix,
    and a ``.`` in the text is a dot."""
    pattern = re.compile(exactly(replies.LOGIN_FAILED, replies.LOGIN_FAILED_CLOSING))
    assert pattern.search(replies.LOGIN_FAILED)
    assert pattern.search(replies.LOGIN_FAILED_CLOSING)
    assert not pattern.search("530 Authentication failed")
    assert not pattern.search("530 Authentication failedX")
    assert not pattern.search("530 Authentication failed. Disconnecting. Now.")
    assert not pattern.search("x" + replies.LOGIN_FAILED)

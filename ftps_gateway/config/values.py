"""Reading TOML values: key paths, kinds, ``${VAR}`` and one-pass problem collection.

A ``Table`` wraps one TOML table: its getters type-check and parse a key, record any
problem under the key's full path (``FILE: tls.overrides[1].reuse: problem (got
VALUE)``) in the shared ``Problems`` and return a usable value, so that one pass over
the file finds every problem. Value parsers raise ``BadValueError``; the table adds
file, key and value. Config-internal API: ``loader``, ``users`` and ``parsers`` use it.

May import: nothing from the package (the standard library only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Generic, TypeGuard, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

_T = TypeVar("_T")

# TOML types as an operator names them; bool comes apart since Python's bool is an int.
_KIND_NAMES: Final[dict[type, str]] = {
    bool: "true or false",
    int: "an integer",
    str: "a string",
    list: "an array",
    dict: "a table",
}


class BadValueError(ValueError):
    """A value parser's complaint; the reader adds file, key path and value."""


_HIDDEN: Final = object()  # "no (got ...)": the value is secret, absent or meaningless


class Problems:
    """Every problem found so far, formatted ``FILE: key.path: problem (got VALUE)``."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, key: str, problem: str, value: object = _HIDDEN) -> None:
        got = "" if value is _HIDDEN else f" (got {value!r})"
        self.lines.append(f"{self.source}: {key}: {problem}{got}")


@dataclass(frozen=True)
class Entry(Generic[_T]):
    """One array element that parsed: where it was, what it said, what it means."""

    key: str
    text: str
    value: _T


def is_kind(value: object, kind: type[_T]) -> TypeGuard[_T]:
    # TOML true is a Python int too; for an integer key it is still a type error.
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


class Table:
    """One TOML table being read.

    Getters type-check and parse a key, record any problem under the table's key path
    and return a usable value; the table remembers which keys were asked for, so
    ``close`` can report every other key as unknown (a typo must not be silently
    ignored and leave a default in force).
    """

    def __init__(self, data: dict[str, object], path: str, problems: Problems) -> None:
        self.path = path
        self.problems = problems
        self._data = data
        self._seen: set[str] = set()

    def key(self, name: str) -> str:
        """The full key path of ``name`` in this table, as messages show it."""
        return f"{self.path}.{name}" if self.path else name

    def raw(
        self, name: str, kind: type[_T], *, required: bool, secret: bool = False
    ) -> _T | None:
        """Return the value of ``name`` if present and of ``kind``, else None."""
        self._seen.add(name)
        if name not in self._data:
            if required:
                self.problems.add(self.key(name), "required key is missing")
            return None
        value = self._data[name]
        if not is_kind(value, kind):
            shown = _HIDDEN if secret else value
            self.problems.add(self.key(name), f"must be {_KIND_NAMES[kind]}", shown)
            return None
        return value

    def required(
        self, name: str, parse: Callable[[str], _T], *, secret: bool = False
    ) -> _T | None:
        """Parse the required string ``name``; None if missing or invalid."""
        text = self.raw(name, str, required=True, secret=secret)
        if text is None:
            return None
        return self._parse(self.key(name), text, parse, secret=secret)

    def optional(self, name: str, parse: Callable[[str], _T], default: _T) -> _T:
        """Parse the optional string ``name``; ``default`` if absent or invalid."""
        text = self.raw(name, str, required=False)
        if text is None:
            return default
        value = self._parse(self.key(name), text, parse)
        return default if value is None else value

    def integer(self, name: str, low: int, high: int, default: int) -> int:
        """Read the optional integer ``name`` in ``low..high``."""
        value = self.raw(name, int, required=False)
        if value is None:
            return default
        if not low <= value <= high:
            self.problems.add(self.key(name), f"must be {low} to {high}", value)
            return default
        return value

    def flag(self, name: str, default: bool) -> bool:
        """Read the optional boolean ``name``."""
        value = self.raw(name, bool, required=False)
        return default if value is None else value

    def strings(
        self, name: str, parse: Callable[[str], _T], *, required: bool = True
    ) -> list[Entry[_T]]:
        """Read the array of strings ``name``: non-empty if ``required``.

        An optional array may be absent or empty. Returns the entries that parsed,
        with their key paths for follow-up checks (duplicates) by the caller.

        A string made of environment references (``"${FTPS_ALLOW}"``) stands for
        the array: its expansion is split at commas and blanks, so a container can
        set a list (allowlists, listeners) from one variable.
        """
        self._seen.add(name)
        given = self._data.get(name)
        if isinstance(given, str) and "${" in given:
            return self._strings_from_environment(name, given, parse, required=required)
        items = self.raw(name, list, required=required)
        if items is None:
            return []
        if required and not items:
            self.problems.add(self.key(name), "must not be empty", items)
        entries: list[Entry[_T]] = []
        for index, item in enumerate(items):
            key = f"{self.key(name)}[{index}]"
            if not isinstance(item, str):
                self.problems.add(key, "must be a string", item)
                continue
            value = self._parse(key, item, parse)
            if value is not None:
                entries.append(Entry(key, item, value))
        return entries

    def _strings_from_environment(
        self, name: str, text: str, parse: Callable[[str], _T], *, required: bool
    ) -> list[Entry[_T]]:
        try:
            expanded = expand_environment(text)
        except BadValueError as error:
            self.problems.add(self.key(name), str(error), text)
            return []
        words = [word for word in re.split(r"[,\s]+", expanded) if word]
        if required and not words:
            problem = "must not be empty (the environment gave nothing)"
            self.problems.add(self.key(name), problem, text)
        entries: list[Entry[_T]] = []
        for index, word in enumerate(words):
            key = f"{self.key(name)}[{index}]"
            value = self._parse(key, word, parse)
            if value is not None:
                entries.append(Entry(key, word, value))
        return entries

    def value(self, name: str) -> object | None:
        """The raw value of ``name`` (any kind), or None if absent; marks it read."""
        self._seen.add(name)
        return self._data.get(name)

    def table(self, name: str) -> Table:
        """The sub-table ``name``; an absent one reads as empty."""
        data = self.raw(name, dict, required=False)
        return Table(data or {}, self.key(name), self.problems)

    def tables(self, name: str, *, secret: bool = False) -> list[Table]:
        """The array of tables ``name`` (``[[name]]`` sections); absent means none.

        ``secret``: the entries hold secrets, so no message shows their values.
        """
        self._seen.add(name)
        items = self._data.get(name, [])
        if not isinstance(items, list):
            shown = _HIDDEN if secret else items
            problem = f"must be an array of tables ([[{self.key(name)}]] sections)"
            self.problems.add(self.key(name), problem, shown)
            return []
        readers: list[Table] = []
        for index, item in enumerate(items):
            key = f"{self.key(name)}[{index}]"
            if isinstance(item, dict):
                readers.append(Table(item, key, self.problems))
            else:
                self.problems.add(key, "must be a table", _HIDDEN if secret else item)
        return readers

    def given(self) -> frozenset[str]:
        """The keys this table actually contains."""
        return frozenset(self._data)

    def close(self) -> None:
        """Report every key that no getter asked for."""
        for name in self._data:
            if name not in self._seen:
                self.problems.add(self.key(name), "unknown key")

    def _parse(
        self, key: str, text: str, parse: Callable[[str], _T], *, secret: bool = False
    ) -> _T | None:
        try:
            return parse(expand_environment(text))
        except BadValueError as error:
            self.problems.add(key, str(error), _HIDDEN if secret else text)
            return None


# ${NAME} or ${NAME:-default} in a string value: containers set the masquerade
# address, the passive range or the node name from their environment.
_ENVIRONMENT_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_environment(text: str) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}`` with the environment's value.

    Only string values are expanded, and only this syntax (a ``$`` elsewhere, as in
    argon2 hashes, is left alone).

    Raises:
        BadValueError: a referenced variable is unset and has no default.
    """
    if "${" not in text:
        return text

    def substitute(match: re.Match[str]) -> str:
        name, default = match[1], match[2]
        value = os.environ.get(name)
        if value is None or (value == "" and default is not None):
            if default is None:
                raise BadValueError(f"environment variable {name} is not set")
            return default
        return value

    return _ENVIRONMENT_REFERENCE.sub(substitute, text)

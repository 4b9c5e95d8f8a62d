"""The one name policy: what a name read from a file or the wire may look like.

Leaf module (imports nothing of traceml but the error tree).  Grammars of names, labels and reserved
tables: ``docs/security.md`` ("Names").
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from traceml.errors import ConfigError

MAX_NAME = 128
MAX_LABEL = 256
MAX_ARG = 4096
MAX_ARGS = 1024

#: the writer's own namespaces: rollup tables (``rollup/<table>``, spec: docs/format.md)
ROLLUP_PREFIX = "rollup/"
RESERVED_TABLE_PREFIXES: tuple[str, ...] = (ROLLUP_PREFIX,)

_PART = r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*"
_PATH_NAME = re.compile(rf"{_PART}(?:/{_PART})*")
_COLUMN_NAME = re.compile(_PART)
#: characters a label may not hold: C0, DEL, C1, line/paragraph separators, bidi controls, surrogates
_NOT_LABEL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def name_problem(name: object, what: str = "table") -> str | None:
    """Why *name* is not a valid table / attachment name (``what`` says which), or None."""
    return _problem(name, what, _PATH_NAME, "parts of letters, digits, '_', '.', '+', '-' joined by '/'")


def column_problem(name: object) -> str | None:
    """Why *name* is not a valid column name, or None."""
    return _problem(name, "column", _COLUMN_NAME, "letters, digits, '_', '.', '+', '-'")


def _problem(name: object, what: str, pattern: re.Pattern[str], grammar: str) -> str | None:
    if not isinstance(name, str):
        return f"{what} name must be a str; found {type(name).__name__}"
    if not name:
        return f"{what} name is empty"
    if len(name) > MAX_NAME:
        return f"{what} name {shown(name)} is {len(name)} characters long; at most {MAX_NAME} are allowed"
    if pattern.fullmatch(name) is None:
        return (
            f"{what} name {shown(name)} breaks the name grammar: expected {grammar}, starting with a letter,"
            " a digit or '_' (see docs/security.md, 'Names')"
        )
    return None


def reserved_problem(table: str) -> str | None:
    """Why *table* may not be written by a peer or a caller (it is in the writer's namespace), or None."""
    for prefix in RESERVED_TABLE_PREFIXES:
        if table.startswith(prefix):
            return f"table {shown(table)} is in the writer's reserved namespace {prefix!r}; rename the table"
    return None


def label_problem(value: object, what: str, max_len: int = MAX_LABEL) -> str | None:
    """Why *value* is not a valid label (free text shown to people), or None."""
    if not isinstance(value, str):
        return f"{what} must be a str; found {type(value).__name__}"
    if len(value) > max_len:
        return f"{what} is {len(value)} characters long; at most {max_len} are allowed"
    bad = _NOT_LABEL.search(value)
    if bad is not None:
        return (
            f"{what} {shown(value)} holds the control character U+{ord(bad.group()):04X} at position {bad.start()};"
            " labels may not hold control, separator or bidi-override characters"
        )
    return None


def labels_problem(values: Iterable[object], what: str, max_len: int = MAX_LABEL) -> str | None:
    """The first :func:`label_problem` of *values* (fast path: one regex search over all of them)."""
    items = list(values)
    if all(type(v) is str for v in items):
        texts: list[str] = items  # type: ignore[assignment]
        longest = max(map(len, texts), default=0)
        if longest <= max_len and _NOT_LABEL.search("".join(texts)) is None:
            return None
    for i, value in enumerate(items):
        problem = label_problem(value, f"{what}[{i}]", max_len)
        if problem is not None:
            return problem
    return None


def check_table(name: object, *, reserved_ok: bool = False) -> str:
    """*name* if it is a table name a caller may write; raises :class:`ConfigError` saying why not."""
    problem = name_problem(name, "table")
    if problem is None and not reserved_ok:
        problem = reserved_problem(name)  # type: ignore[arg-type]
    if problem is not None:
        raise ConfigError(problem)
    return name  # type: ignore[return-value]


def check_column(name: object, table: str = "") -> str:
    problem = column_problem(name)
    if problem is not None:
        raise ConfigError(f"{table}: {problem}" if table else problem)
    return name  # type: ignore[return-value]


def check_attachment(name: object) -> str:
    problem = name_problem(name, "attachment")
    if problem is not None:
        raise ConfigError(problem)
    return name  # type: ignore[return-value]


def check_label(value: object, what: str, max_len: int = MAX_LABEL) -> str:
    problem = label_problem(value, what, max_len)
    if problem is not None:
        raise ConfigError(problem)
    return value  # type: ignore[return-value]


def check_command(args: Iterable[object], what: str = "command") -> list[str]:
    items = list(args)
    if len(items) > MAX_ARGS:
        raise ConfigError(f"{what} has {len(items)} arguments; at most {MAX_ARGS} are allowed")
    problem = labels_problem(items, what, MAX_ARG)
    if problem is not None:
        raise ConfigError(problem)
    return items  # type: ignore[return-value]


def safe_label(value: object, max_len: int = MAX_LABEL) -> str:
    """*value* as a valid label: forbidden characters become U+FFFD, cut to *max_len* (for rewriting old files)."""
    return _NOT_LABEL.sub("\ufffd", str(value))[:max_len]


def shown(value: str, limit: int = 60) -> str:
    """*value* quoted for an error message: ``repr`` (control characters become escapes), cut to *limit*."""
    text = ascii(value[:limit])
    return text + ("..." if len(value) > limit else "")

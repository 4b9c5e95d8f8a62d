"""Where commands write files: never outside the output they were given, never over a file unasked.

:func:`safe_filename` maps any name to one plain file name; :class:`OutputDir` opens without following
symbolic links and replaces a file only with ``overwrite``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from traceml.errors import OutputError, OutputExistsError

#: longest file name handed out, suffix included (most file systems allow 255 bytes; UTF-8 may
#: take 4 bytes a character, so 60 characters stay below it with room for a counter)
MAX_NAME_CHARS = 60
#: names Windows reserves in every directory, whatever the extension
WINDOWS_DEVICES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"COM{i}" for i in range(10)}
    | {f"LPT{i}" for i in range(10)}
    | {f"COM{c}" for c in "¹²³"}
    | {f"LPT{c}" for c in "¹²³"}
)
_KEEP = frozenset("._-+=@,")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def safe_filename(name: object, suffix: str = "", *, max_chars: int = MAX_NAME_CHARS) -> str:
    """One file name for ``name`` (any value read from a recording) ending in ``suffix``.

    Letters, digits and ``._-+=@,`` are kept; every other character (separators, spaces,
    control characters, markup) becomes ``_``.  Leading dots and trailing dots/spaces go, a
    Windows device name gets a ``_`` prefix, an empty result is ``_``.  A name that was changed
    or shortened ends in 8 hex digits of its hash, so two different names rarely collide.
    """
    text = unicodedata.normalize("NFC", str(name))
    kept = "".join(c if (c.isalnum() and c.isprintable()) or c in _KEEP else "_" for c in text)
    kept = kept.lstrip(".").rstrip(". ")
    if not kept:
        kept = "_"
    if kept.split(".")[0].upper() in WINDOWS_DEVICES:
        kept = "_" + kept
    budget = max(8, max_chars - len(suffix))
    if kept != text or len(kept) > budget:
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        kept = kept[: budget - 9].rstrip(". ") + "-" + digest
    return kept + suffix


class OutputDir:
    """A directory a command writes several files into; every path stays inside it.

    ``claim(name, suffix)`` gives a safe, unique (case-insensitively) file name; call
    :meth:`check` with every claimed path before writing the first, so that a refusal
    writes nothing; :meth:`open` creates a file without following a symbolic link.
    """

    def __init__(self, root: str | os.PathLike[str], *, overwrite: bool = False, option: str = "--out") -> None:
        self.root = Path(root)
        self.overwrite = overwrite
        self.option = option
        self._taken: set[str] = set()
        if self.root.exists() and not self.root.is_dir():
            raise OutputError(
                f"{option} {self.root} is a file; expected a directory to write into; choose another {option}"
            )

    def claim(self, name: object, suffix: str = "") -> Path:
        """A new path inside the directory for ``name`` (``-2``, ``-3``... when taken)."""
        base = safe_filename(name, suffix)
        candidate, n = base, 1
        while candidate.casefold() in self._taken:
            n += 1
            stem = base[: len(base) - len(suffix)] if suffix else base
            candidate = f"{stem}-{n}{suffix}"
        self._taken.add(candidate.casefold())
        return self.root / candidate

    def check(self, paths: Iterable[Path]) -> None:
        """Refuse before anything is written: an existing file without ``overwrite``, or a link."""
        for path in paths:
            check_new_file(path, overwrite=self.overwrite, option=self.option)

    def open(self, path: Path, mode: str = "w", **kwargs: object) -> IO[str]:
        """Create ``path`` (a claimed one) inside the directory, making the directory if needed."""
        if path.parent != self.root:
            raise OutputError(f"refusing to write {path}: not directly inside {self.root}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create the output directory {self.root}: {exc.strerror or exc}; choose another {self.option}"
            ) from exc
        return open_new_file(path, mode, overwrite=self.overwrite, option=self.option, **kwargs)

    def write_texts(self, paths: Iterable[Path], texts: Iterable[str]) -> None:
        """Write each text to its (claimed) path as UTF-8; an ``OSError`` is the caller's to word."""
        for path, text in zip(paths, texts, strict=True):
            with self.open(path, "w", encoding="utf-8") as f:
                f.write(text)


def check_new_file(path: str | os.PathLike[str], *, overwrite: bool, option: str = "--out") -> None:
    """Raise unless ``path`` may be created: it must not exist (or ``overwrite``) and not be a link."""
    target = Path(path)
    try:
        st = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        return  # nothing there to replace (a parent that is a file fails, and says so, on writing)
    except OSError as exc:
        raise OutputError(f"cannot use {option} {target}: {exc.strerror or exc}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(
            f"{option} {target} is a symbolic link; traceml does not write through links: remove it or choose another {option}"
        )
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{option} {target} is a directory; expected a file name; choose another {option}")
    if not overwrite:
        raise OutputExistsError(
            f"{target} already exists; traceml does not replace a file unasked: choose another {option}, "
            "or add --overwrite to replace it"
        )


def open_new_file(
    path: str | os.PathLike[str], mode: str = "w", *, overwrite: bool, option: str = "--out", **kwargs: object
) -> IO[str]:
    """Open ``path`` for writing: created new (exclusive) unless ``overwrite``; never through a link."""
    target = Path(path)
    check_new_file(target, overwrite=overwrite, option=option)
    flags = os.O_WRONLY | os.O_CREAT | _NOFOLLOW | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(target, flags, 0o644)
    except FileExistsError as exc:
        raise OutputExistsError(
            f"{target} already exists; choose another {option}, or add --overwrite to replace it"
        ) from exc
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}; choose another {option}") from exc
    return open(fd, mode, **kwargs)  # type: ignore[call-overload,no-any-return]

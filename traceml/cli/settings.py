"""Defaults for the commands' options from ``traceml.toml`` or ``[tool.traceml]`` in ``pyproject.toml``.

The command line wins over the file; an unknown command or option is an error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from traceml.errors import ConfigError

CONFIG_FILE = "traceml.toml"
PYPROJECT = "pyproject.toml"
#: a config file larger than this is refused
MAX_CONFIG_BYTES = 1 << 20


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError as exc:
            raise ConfigError(f"reading {path} needs Python 3.11 (tomllib) or the tomli package") from exc
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {len(raw)} bytes; expected under {MAX_CONFIG_BYTES}")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def find_config(explicit: Path | None, cwd: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The config table and the file it came from; None when there is none."""
    if explicit is not None:
        doc = _read_toml(explicit)
        if explicit.name == PYPROJECT:
            doc = doc.get("tool", {}).get("traceml", {})
        return explicit, doc
    here = cwd or Path.cwd()
    if (here / CONFIG_FILE).is_file():
        return here / CONFIG_FILE, _read_toml(here / CONFIG_FILE)
    if (here / PYPROJECT).is_file():
        table = _read_toml(here / PYPROJECT).get("tool", {}).get("traceml")
        if table is not None:
            return here / PYPROJECT, table
    return None


def load_config(explicit: Path | None, group: Any, cwd: Path | None = None) -> dict[str, dict[str, Any]]:
    """click ``default_map`` for ``group``'s commands, checked against their options."""
    found = find_config(explicit, cwd)
    if found is None:
        return {}
    path, table = found
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected a table of commands ([run], [report], ...)")
    commands = getattr(group, "commands", {})
    out: dict[str, dict[str, Any]] = {}
    for name, options in table.items():
        if name not in commands:
            raise ConfigError(
                f"{path}: [{name}] is not a traceml command; expected one of {', '.join(sorted(commands))}"
            )
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: {name} must be a table of options, e.g. [{name}]")
        params = {p.name: p for p in commands[name].params if getattr(p, "param_type_name", "") == "option" and p.name}
        defaults: dict[str, Any] = {}
        for key, value in options.items():
            attr = str(key).lstrip("-").replace("-", "_")
            if attr not in params or getattr(params[attr], "hidden", False):
                raise ConfigError(
                    f"{path}: [{name}] {key} is not an option of traceml {name}; see traceml {name} --help"
                )
            defaults[attr] = value
        out[name] = defaults
    return out


#: ``traceml -q``: set for the command (and the processes it starts) to leave out progress lines
QUIET_ENV = "TRACEML_QUIET"


def say(message: str) -> None:
    """A progress line on stdout ("wrote ...", "traceml: run ..."); ``traceml -q`` leaves it out."""
    import os

    if os.environ.get(QUIET_ENV) != "1":
        print(message, flush=True)

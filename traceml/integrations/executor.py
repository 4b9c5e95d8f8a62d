"""``python -m traceml.integrations.executor SCRIPT [ARGS...]``: the rank executor, plus zero-code integrations.

Exactly :mod:`traceml.runtime.executor` (same arguments, same exit status) with
:func:`traceml.integrations.autohook.install` first; what ``traceml run`` launches under torchrun.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from traceml.runtime import executor

    args = list(sys.argv[1:] if argv is None else argv)
    script_args = args[1:] if args and args[0] == "--" else args
    is_module = len(script_args) > 1 and script_args[0] == "-m"
    if script_args and (is_module or os.path.isfile(script_args[0])):
        from traceml.integrations import autohook
        from traceml.runtime import api

        sys.argv = list(script_args[1:] if is_module else script_args)  # what the agent records as the command line
        target = script_args[1] if is_module else script_args[0]
        if autohook.enabled() and api.init(script=target, auto_steps=True) is not None:
            autohook.install()
        try:
            executor.main(args)
        finally:
            autohook.uninstall()  # already undone by the executor's shutdown, unless the script restarted traceml
    else:
        executor.main(args)  # prints the usage / not-found message and exits 2


if __name__ == "__main__":
    main()

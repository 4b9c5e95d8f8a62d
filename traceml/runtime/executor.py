"""``python -m traceml.runtime.executor SCRIPT [ARGS...]``: run a training script under traceml.

Runs SCRIPT exactly as ``python SCRIPT ARGS...`` would, shuts the agent down and exits with the script's
own status.  Does not import torch.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

USAGE = "usage: python -m traceml.runtime.executor SCRIPT [ARGS...] | -m MODULE [ARGS...]"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args or args == ["-m"]:
        print(USAGE, file=sys.stderr)
        raise SystemExit(2)
    if args[0] == "-m":
        run_module(args[1], args[2:])
        return
    script = args[0]
    if not os.path.isfile(script):
        print(f"traceml: script {script!r} not found (cwd {os.getcwd()}); {USAGE}", file=sys.stderr)
        raise SystemExit(2)

    from traceml.runtime import api

    sys.argv = [script, *args[1:]]
    script_dir = os.path.dirname(os.path.abspath(script))
    if sys.path and sys.path[0] in ("", os.getcwd()):
        sys.path[0] = script_dir  # `python -m` put the cwd there; `python SCRIPT` puts the script's folder
    else:
        sys.path.insert(0, script_dir)
    api.init(script=script, auto_steps=True)  # zero-code steps unless TRACEML_NO_AUTO_STEPS
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            api.mark_failed()
        raise
    except BaseException:
        api.mark_failed()
        raise
    finally:
        api.shutdown()


def run_module(module: str, module_args: Sequence[str]) -> None:
    """``-m MODULE``: run it as ``python -m MODULE ARGS...`` would (the working folder on sys.path)."""
    from traceml.runtime import api

    sys.argv = [module, *module_args]  # runpy puts the module's file in argv[0]
    if not sys.path or sys.path[0] not in ("", os.getcwd()):
        sys.path.insert(0, os.getcwd())
    api.init(script=module, auto_steps=True)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        if exc.code not in (None, 0):
            api.mark_failed()
        raise
    except BaseException:
        api.mark_failed()
        raise
    finally:
        api.shutdown()


if __name__ == "__main__":
    main()

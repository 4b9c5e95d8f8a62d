"""The integrations stay optional and lazy: importing traceml (or traceml.integrations, or the
auto-attach hook) loads no framework, a missing framework says how to install it, and the
integrations' executor installs its import hooks only when asked.  Each check runs in a fresh
interpreter (real imports, no torch), so nothing the test process imported can hide a leak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("torch", "transformers", "accelerate", "lightning", "pytorch_lightning")


def python(code: str, env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRACEML_")}
    return subprocess.run(
        [sys.executable, *args] if not code else [sys.executable, "-c", textwrap.dedent(code)],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_importing_traceml_and_its_integrations_loads_no_framework() -> None:
    proc = python(
        f"""
        import json, sys
        import traceml, traceml.integrations
        import traceml.integrations.lightning, traceml.integrations.autohook, traceml.integrations.executor
        from traceml.integrations import autohook
        names = autohook.install(force=True)  # watches for the Trainer modules, imports none of them
        autohook.uninstall()
        print(json.dumps({{"loaded": [m for m in {HEAVY!r} if m in sys.modules], "hooks": names}}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    assert sorted(h.split(" [")[0] for h in out["hooks"]) == [
        "import hook for lightning.pytorch.trainer.trainer",
        "import hook for pytorch_lightning.trainer.trainer",
        "import hook for transformers.trainer",
    ]


def test_missing_transformers_names_the_extra() -> None:
    proc = python(
        """
        import sys
        sys.modules["transformers"] = None  # as if not installed
        from traceml.errors import MissingDependencyError
        try:
            import traceml.integrations.huggingface
        except MissingDependencyError as exc:
            print("MISSING", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "MISSING" in proc.stdout and "pip install 'traceml-recorder[hf]'" in proc.stdout


def test_missing_lightning_names_the_extra() -> None:
    proc = python(
        """
        import sys
        sys.modules["lightning"] = sys.modules["pytorch_lightning"] = None  # as if not installed
        from traceml.errors import MissingDependencyError
        import traceml.integrations.lightning as tl
        for get in (lambda: tl.TraceMLCallback, lambda: tl.callback_class("pytorch_lightning")):
            try:
                get()
            except MissingDependencyError as exc:
                print("MISSING", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MISSING")]
    assert len(lines) == 2 and all("pip install 'traceml-recorder[lightning]'" in line for line in lines)


def test_executor_installs_the_hooks_unless_turned_off(tmp_path: Path) -> None:
    script = tmp_path / "show_hooks.py"
    script.write_text(
        "import json, sys\n"
        "from traceml.runtime import patches\n"
        "hooks = [n for n in patches.active_patches() if 'auto-integration' in n]\n"
        "print('HOOKS', json.dumps({'hooks': hooks, 'argv': sys.argv}))\n"
    )
    for env, expected in (({}, 3), ({"TRACEML_NO_AUTO_INTEGRATIONS": "1"}, 0), ({"TRACEML_DISABLED": "1"}, 0)):
        proc = python("", env, "-m", "traceml.integrations.executor", str(script), "a", "--b")
        assert proc.returncode == 0, proc.stderr
        line = next(x for x in proc.stdout.splitlines() if x.startswith("HOOKS "))
        shown = json.loads(line[6:])
        assert len(shown["hooks"]) == expected, (env, shown)
        assert shown["argv"] == [str(script), "a", "--b"]


def test_executor_exit_status_is_the_scripts(tmp_path: Path) -> None:
    script = tmp_path / "fails.py"
    script.write_text("raise SystemExit(3)\n")
    assert python("", None, "-m", "traceml.integrations.executor", str(script)).returncode == 3
    usage = python("", None, "-m", "traceml.integrations.executor")
    assert usage.returncode == 2 and "usage" in usage.stderr

"""The run environment of a rank, sent once as the attachment ``environment/rank<N>``.

Reads torch only if the script already imported it; never initializes CUDA itself.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

from traceml._version import __version__


def git_commit(path: str | None, timeout_s: float = 2.0) -> str:
    """Commit of the git repository containing ``path`` ("" when none, or git is missing/slow)."""
    if not path:
        return ""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    try:
        out = subprocess.run(
            ["git", "-C", directory, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError, ValueError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _torch_facts() -> dict[str, Any]:
    torch = sys.modules.get("torch")
    if torch is None:
        return {"torch": "", "cuda": "", "cudnn": "", "device_count": 0, "devices": [], **distributed_facts()}
    facts: dict[str, Any] = {"torch": str(torch.__version__), "cuda": str(torch.version.cuda or "")}
    # CUDA facts only once the script itself initialized CUDA: on torch 2.11 reading them first
    # was seen to initialize CUDA in a CPU-only process (a context, GPU memory, seconds)
    cudnn = ""
    devices: list[str] = []
    count = 0
    try:
        if torch.cuda.is_initialized():
            cudnn = str(torch.backends.cudnn.version() or "")
            count = int(torch.cuda.device_count())
            devices = [str(torch.cuda.get_device_name(i)) for i in range(count)]
    except Exception:
        pass
    facts["cudnn"] = cudnn
    facts["device_count"] = count
    facts["devices"] = devices
    facts.update(distributed_facts())
    return facts


def distributed_facts() -> dict[str, Any]:
    """``backend`` and ``dist_world_size`` of torch.distributed's default group ("" / 0 when none)."""
    torch = sys.modules.get("torch")
    try:
        dist = torch.distributed if torch is not None else None
        if dist is not None and dist.is_available() and dist.is_initialized():
            return {"backend": str(dist.get_backend()), "dist_world_size": int(dist.get_world_size())}
    except Exception:
        pass
    return {"backend": "", "dist_world_size": 0}


def collect_environment(
    identity: Mapping[str, Any], wrapper: str = "none", script: str | None = None, git_timeout_s: float = 2.0
) -> dict[str, Any]:
    """Everything worth knowing about where and how this rank ran (a msgpack-able map)."""
    script = script if script is not None else (sys.argv[0] if sys.argv and sys.argv[0] else None)
    env: dict[str, Any] = {k: identity[k] for k in identity}
    env.update(_torch_facts())
    env.update(
        {
            "wrapper": wrapper,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "executable": sys.executable,
            "command": [str(a) for a in sys.argv],
            "cwd": os.getcwd(),
            "script": os.path.abspath(script) if script else "",
            "git_commit": git_commit(script, git_timeout_s),
            "traceml": __version__,
        }
    )
    return env

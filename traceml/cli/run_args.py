"""``traceml run``'s command line before click sees it: torchrun's spellings, ``-m``, ``--``, Slurm.

SCRIPT and everything after it pass to the script untouched.  Pure: no I/O but the returned notes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from traceml.errors import ConfigError

#: torchrun options that take a value, passed through (underscores and dashes both accepted)
TORCHRUN_VALUED = frozenset(
    {
        "--rdzv-backend",
        "--rdzv-endpoint",
        "--rdzv-id",
        "--rdzv-conf",
        "--max-restarts",
        "--monitor-interval",
        "--start-method",
        "--role",
        "--log-dir",
        "--logs-specs",
        "--redirects",
        "--tee",
        "--local-ranks-filter",
        "--local-addr",
        "--event-log-handler",
    }
)
#: torchrun flags, passed through
TORCHRUN_FLAGS = frozenset({"--standalone"})
#: torchrun options traceml cannot honour, with the reason
TORCHRUN_REFUSED = {
    "--no-python": "traceml runs SCRIPT with Python (it wraps it in its executor)",
    "--run-path": "traceml always runs SCRIPT as a path (or a module with -m)",
    "--module": "use traceml run -m MODULE",
}
#: the hidden option the rewritten command line carries torchrun's options in
TORCHRUN_ARG = "--torchrun-arg"


@dataclass
class RunArgs:
    """The command line rewritten for click, and what was found on the way."""

    args: list[str]
    torchrun: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _normal(name: str) -> str:
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def rewrite(tokens: Sequence[str], known: Mapping[str, bool]) -> RunArgs:
    """``known``: traceml run's option names -> whether each takes a value."""
    out: list[str] = []
    torchrun: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--":
            rest = list(tokens[i + 1 :])
            break
        if not token.startswith("-") or token == "-":
            rest = list(tokens[i:])
            break
        name, eq, value = token.partition("=")
        norm = _normal(name)
        if norm == "-m" or (name.startswith("-m") and not name.startswith("--") and len(name) > 2):
            module_rest = [name[2:]] if len(name) > 2 else []
            out.append("--module")
            rest = module_rest + list(tokens[i + 1 :])
            break
        if norm in known:
            out.append(norm + eq + value)
            if known[norm] and not eq:
                if i + 1 >= len(tokens):
                    raise ConfigError(f"option {norm} needs a value (e.g. {norm} VALUE)")
                out.append(tokens[i + 1])
                i += 1
        elif norm in TORCHRUN_VALUED:
            if eq:
                torchrun.append(f"{norm}={value}")
            elif i + 1 < len(tokens):
                torchrun.append(f"{norm}={tokens[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"torchrun option {norm} needs a value (e.g. {norm} VALUE)")
        elif norm in TORCHRUN_FLAGS:
            torchrun.append(norm)
        elif norm in TORCHRUN_REFUSED:
            raise ConfigError(f"torchrun's {norm} is not supported by traceml run: {TORCHRUN_REFUSED[norm]}")
        else:
            raise ConfigError(
                f"no such option: {token!r} (before SCRIPT, traceml run takes its own options and torchrun's;"
                " see traceml run --help; put the script's own options after SCRIPT, or after --)"
            )
        i += 1
    notes = []
    for arg in rest[1:]:
        norm = _normal(arg.partition("=")[0])
        if arg.startswith("--") and norm in known and norm not in ("--help",):
            notes.append(
                f"note: {arg.partition('=')[0]} after SCRIPT goes to the script, not to traceml run"
                " (put traceml run's options before SCRIPT)"
            )
    return RunArgs([*out, *(f"{TORCHRUN_ARG}={t}" for t in torchrun), "--", *rest], torchrun, notes)


# --- nproc-per-node and nnodes as torchrun spells them --------------------------------------


def gpu_count() -> int:
    """GPUs this node can use (NVML; ``CUDA_VISIBLE_DEVICES`` narrows it), 0 without a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def resolve_nproc(value: str, *, gpus: int | None = None, cpus: int | None = None) -> int:
    """``--nproc-per-node``: a number, or torchrun's ``auto`` (GPUs, else CPUs), ``gpu``, ``cpu``."""
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    gpus = gpu_count() if gpus is None and text in ("auto", "gpu") else (gpus or 0)
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    if text == "gpu":
        if gpus < 1:
            raise ConfigError("--nproc-per-node gpu: no GPU found on this node; use a number, cpu or auto")
        return gpus
    if text == "cpu":
        return cpus
    if text == "auto":
        return gpus if gpus > 0 else cpus
    raise ConfigError(f"--nproc-per-node {value!r}: expected a number, auto, gpu or cpu")


def parse_nnodes(value: str) -> tuple[int, int]:
    """``--nnodes N`` or torchrun's elastic ``MIN:MAX``."""
    m = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", str(value))
    if not m:
        raise ConfigError(f"--nnodes {value!r}: expected a number of nodes or MIN:MAX (e.g. 1:4)")
    low = int(m.group(1))
    high = int(m.group(2)) if m.group(2) else low
    if low < 1 or high < low:
        raise ConfigError(f"--nnodes {value!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    return low, high


# --- Slurm -------------------------------------------------------------------------------------


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[03-05,09],cpu1`` -> ``gpu03``."""
    text = nodelist.strip()
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", text)
    if not m:
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: expected host names like node[01-04]")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


@dataclass(frozen=True)
class SlurmDefaults:
    nnodes: int
    node_rank: int
    master_addr: str
    notes: tuple[str, ...] = ()


def slurm_defaults(env: Mapping[str, str]) -> SlurmDefaults | None:
    """Under a Slurm step (``SLURM_NODEID`` set): nodes, this node's rank and the first node's host."""
    if "SLURM_NODEID" not in env or "SLURM_JOB_NODELIST" not in env and "SLURM_NODELIST" not in env:
        return None
    try:
        nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or "1")
        node_rank = int(env["SLURM_NODEID"])
    except ValueError as exc:
        raise ConfigError(f"Slurm variables SLURM_NNODES/SLURM_NODEID are not numbers: {exc}") from exc
    master = first_host(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
    notes: list[str] = []
    tasks = env.get("SLURM_NTASKS")
    if tasks and tasks.isdigit() and int(tasks) > nnodes:
        notes.append(
            f"note: SLURM_NTASKS={tasks} on {nnodes} nodes: start one `traceml run` per node"
            " (srun --ntasks-per-node=1); traceml run starts the ranks itself"
        )
    return SlurmDefaults(nnodes, node_rank, master, tuple(notes))


def option_table(params: Iterable[object]) -> dict[str, bool]:
    """click parameters -> {option name: takes a value}."""
    table: dict[str, bool] = {}
    for p in params:
        opts = [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
        if getattr(p, "param_type_name", "") != "option":
            continue
        takes = not getattr(p, "is_flag", False) and not getattr(p, "count", False)
        for o in opts:
            table[o] = takes
    return table

"""Peak memory of the readers on crafted recordings (``tests/crafted_tml.py``).

For each crafted file, runs ``traceml inspect``, ``replay.open(...).summary()``, ``traceml report``
and ``traceml recover`` in a child process under an address-space cap and prints a table: file
size, the child's peak RSS, its exit status and the last line of its stderr.  The reader is safe
when peak RSS stays near the interpreter's own (about 100-200 MiB) whatever the file says, and
every refusal is a traceml error (exit 1 or 3), never a MemoryError or a kill.

    PYTHONPATH=$PWD python benchmarks/bench_crafted_recordings.py [--scale 1.0] [--cap-mib 4096] [--only NAME]
        [--checkout DIR]   # the traceml the children run (default: this one), e.g. to measure a baseline
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import crafted_tml

CASES = {
    # name: (builder, kwargs at scale 1)
    "attachment_of_empty_arrays": ("attachment_of_empty_arrays", {"n": 60_000_000}),
    "index_repeating_one_segment": ("index_repeating_one_segment", {"n": 2_500_000}),
    "segment_with_many_streams": ("segment_with_many_streams", {"n": 6_000_000}),
    "wide_schemas": ("wide_schemas", {"tables": 4_000, "columns": 1_000}),
    "zero_rows_i8": ("zero_rows", {"rows": 8_000_000, "columns": 30, "segments": 4}),
    "zero_rows_str": ("zero_rows", {"rows": 60_000_000, "columns": 4, "segments": 1, "dtype": "str"}),
    "tiny_segments": ("tiny_segments", {"n": 1_000_000}),
}

COMMANDS = {
    "inspect": lambda f, out: ["-m", "traceml", "-q", "inspect", "--json", str(f)],
    "summary": lambda f, out: ["-c", "import replay, sys; replay.open(sys.argv[1]).summary()", str(f)],
    "report": lambda f, out: ["-m", "traceml", "-q", "report", str(f), "-o", str(out / "report"), "--overwrite"],
    "recover": lambda f, out: ["-m", "traceml", "-q", "recover", str(f), "-o", str(out / "rec.tml"), "--overwrite"],
}


def _run(args: list[str], cap: int, checkout: str) -> tuple[int, float, str]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: the child never blocks on it
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=limit,
            text=True,
            cwd=checkout,
            env={**os.environ, "PYTHONPATH": checkout},
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        err = stderr.read().strip().splitlines()
    last = next((line for line in reversed(err) if line.strip()), "")
    return proc.returncode, usage.ru_maxrss / 1024, last[:110]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every case's size")
    parser.add_argument("--cap-mib", type=int, default=4096, help="address-space cap of each child")
    parser.add_argument("--only", action="append", help="run only these cases")
    parser.add_argument("--commands", default=",".join(COMMANDS))
    parser.add_argument("--checkout", default=str(Path(__file__).resolve().parent.parent), help="traceml to run")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        print("| case | file MiB | command | peak RSS MiB | exit | last stderr line |\n|---|---:|---|---:|---:|---|")
        for name, (builder, kwargs) in CASES.items():
            if opts.only and name not in opts.only:
                continue
            scaled = {k: max(1, int(v * opts.scale)) if k in ("n", "rows", "tables") else v for k, v in kwargs.items()}
            path = crafted_tml.BUILDERS[builder](out / f"{name}.tml", **scaled)
            size = path.stat().st_size / (1 << 20)
            for command in opts.commands.split(","):
                rc, rss, last = _run(COMMANDS[command](path, out), opts.cap_mib << 20, opts.checkout)
                print(f"| {name} | {size:.1f} | {command} | {rss:.0f} | {rc} | {last.replace('|', '/')} |", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()

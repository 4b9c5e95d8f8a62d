"""Nothing listens beyond loopback by default (docs/security.md): during a real 2-rank gloo run
under ``traceml run``, every listening socket of the whole process tree (the CLI, the aggregator,
torchrun and its rendezvous store, the ranks and gloo) is bound to a loopback address, with
torchrun's default static rendezvous, with ``--standalone`` and with a c10d rendezvous on a
loopback endpoint."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from traceml.cli.launch_plan import loopback_interface, plan_run, rank_env, training_command
from traceml.cli.torchrun_shim import TORCHRUN_SHIM

TRACEML = str(Path(sys.executable).parent / "traceml")
PROBE = Path(__file__).parent / "scripts" / "listen_probe.py"


def listeners(root: psutil.Process) -> list[tuple[int, str, str, int]]:
    """``(pid, name, ip, port)`` of every TCP socket in LISTEN and every bound UDP socket of the tree."""
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            name = " ".join(p.cmdline()[1:4])[:80]
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            udp = c.type == 2  # SOCK_DGRAM
            if c.status == psutil.CONN_LISTEN or (udp and c.laddr and not c.raddr):
                found.append((p.pid, name, c.laddr.ip, c.laddr.port))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "rendezvous",
    [
        [],  # traceml's default: torchrun's static rendezvous on --master-addr 127.0.0.1
        ["--standalone"],  # the c10d rendezvous on localhost:0, plus the store it shares with the ranks
        ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--rdzv-id", "listeners"],
    ],
    ids=["static", "standalone", "c10d-loopback"],
)
def test_every_listener_of_a_two_rank_gloo_run_is_loopback(tmp_path: Path, rendezvous: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACEML_", "GLOO_", "TORCH_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [TRACEML, "run", "--ui", "none", "--nproc-per-node", "2", "--out", str(tmp_path / "run.tml")]
    cmd += rendezvous
    cmd += [str(PROBE), str(tmp_path)]
    with open(tmp_path / "out.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if all((tmp_path / f"ready-{r}").exists() for r in range(2)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "out.log").read_text()
        assert all((tmp_path / f"ready-{r}").exists() for r in range(2)), (tmp_path / "out.log").read_text()
        found = listeners(psutil.Process(proc.pid))
        (tmp_path / "go").write_text("")
        assert proc.wait(timeout=120) == 0, (tmp_path / "out.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outside = [f for f in found if not ipaddress.ip_address(f[2].split("%")[0]).is_loopback]
    assert not outside, f"listening beyond loopback: {outside}"
    rank_pids = {int((tmp_path / f"ready-{r}").read_text()) for r in range(2)}
    # not vacuous: the aggregator, torchrun's rendezvous store and both ranks' gloo were listening
    assert rank_pids <= {f[0] for f in found}, found
    assert any("traceml.aggregator" in f[1] for f in found), found
    assert any(f[0] not in rank_pids and "aggregator" not in f[1] for f in found), found
    # torchrun (the shim) hosts the static store, or the c10d store and the one it shares with the ranks
    shim = {f[3] for f in found if f[1].startswith("-c import ipaddress")}
    assert len(shim) >= (2 if rendezvous else 1), found


def test_single_node_runs_keep_gloo_on_loopback_unless_told(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text("pass\n")
    lo = loopback_interface()
    assert lo is not None
    one = plan_run(str(script), nproc_per_node=2, runs_dir=str(tmp_path))
    assert rank_env(one, {})["GLOO_SOCKET_IFNAME"] == lo
    assert rank_env(one, {"GLOO_SOCKET_IFNAME": "eth7"})["GLOO_SOCKET_IFNAME"] == "eth7"
    multi = plan_run(str(script), nnodes=2, token="t", runs_dir=str(tmp_path))
    assert "GLOO_SOCKET_IFNAME" not in rank_env(multi, {})
    # torchrun runs through the shim that binds its store to the loopback --master-addr
    assert training_command(one)[2] == TORCHRUN_SHIM and "master_listen_fd" in TORCHRUN_SHIM
    assert f"--master-addr={one.master_addr}" in training_command(one) and one.master_addr == "127.0.0.1"

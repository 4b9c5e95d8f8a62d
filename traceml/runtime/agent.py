"""The per-process agent: tables, phase patches, sampler and sender threads, lifecycle.

:meth:`Agent.close` undoes every patch, stops both threads and sends ``rank_finished``; nothing outlives it.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from traceml.config import RankConfig
from traceml.runtime import patches
from traceml.runtime._failopen import disable_piece
from traceml.runtime.importhook import call_after_import
from traceml.runtime.samplers import (
    NvmlSampler,
    ProcessSampler,
    SamplerThread,
    SystemSampler,
    collect_environment,
    distributed_facts,
)
from traceml.runtime.sender import FileSink, Sender, Sink, StreamSink
from traceml.runtime.step import PhaseClock, StepTracker
from traceml.runtime.steprows import StepRows
from traceml.schema import STANDARD_TABLES
from traceml.store import BoundedTable
from traceml.transport import RankIdentity, TelemetryClient, hello, rank_identity_from_env


def thread_cpu_ns(native_id: int) -> int:
    """CPU time of the kernel thread ``native_id`` of this process, or -1 (ended, or not Linux).

    Never ``time.pthread_getcpuclockid(thread.ident)``: glibc reads the pthread's descriptor for
    it, and once the thread has ended and its stack is unmapped, that read is a segfault of the
    training process.  Linux names a thread's CPU clock by its kernel id (the clock id glibc
    builds: ``~tid << 3 | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED``); an ended thread's clock gives EINVAL.
    """
    if not sys.platform.startswith("linux"):
        return -1
    try:
        return time.clock_gettime_ns((~native_id << 3) | 6)
    except (OSError, ValueError, OverflowError):
        return -1


#: rows kept per table on the rank before the oldest are evicted (and counted as lost)
TABLE_CAPACITY: dict[str, int] = {
    "step_time": 16384,
    "step_gpu": 16384,
    "step_region": 16384,
    "step_memory": 16384,
    "process": 1024,
    "system": 1024,
    "system_gpu": 4096,
    "step_stack": 8192,
    "step_comm": 16384,
    "step_host": 16384,
}
#: what a table may grow to when steps come faster than the sender's period drains them
#: (~300 B per step_time row held: 131,072 rows are ~38 MiB; see docs/benchmarks.md, "Fast steps")
TABLE_MAX_CAPACITY: dict[str, int] = {
    "step_time": 131072,
    "step_gpu": 131072,
    "step_region": 131072,
    "step_memory": 131072,
}


class Agent:
    """Everything telemetry does inside one training process.

    ``start=False`` builds tables and patches but no threads (unit tests drive
    :meth:`Sender.flush` / :meth:`SamplerThread.tick` by hand).  ``h2d`` forces the
    host-to-device patch on or off (None: only where CUDA is available).  ``capacity``
    overrides rows kept per table (such a table never grows); ``stream_options`` go to the :class:`TelemetryClient`.
    ``gpu_timing``: CUDA event timing and step memory peaks for steps of a model on a CUDA
    device (None: only when telemetry leaves the process, i.e. a sender resolves the events).
    """

    def __init__(
        self,
        config: RankConfig,
        *,
        out: str | None = None,
        identity: RankIdentity | None = None,
        start: bool = True,
        h2d: bool | None = None,
        sender_period_s: float = 0.5,
        drain_timeout_s: float = 2.0,
        script: str | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        capacity: Mapping[str, int] | None = None,
        stream_options: Mapping[str, Any] | None = None,
        gpu_timing: bool | None = None,
        auto_steps: bool = False,
    ) -> None:
        self.config = config
        self.identity = identity if identity is not None else rank_identity_from_env()
        self.out = out if out is not None else config.out
        self.pid = os.getpid()
        self.started_ns = time.time_ns()
        self.closed = False
        #: set when an uncaught exception ended the script (sys.excepthook / the executor)
        self.failed = False
        self.script = script
        self.drain_timeout_s = drain_timeout_s
        self.clock_ns = clock_ns
        self._stream_options = dict(stream_options or {})
        caps = {**TABLE_CAPACITY, **(capacity or {})}
        self.tables: dict[str, BoundedTable] = {
            name: BoundedTable(schema, caps.get(name, 4096))
            for name, schema in STANDARD_TABLES.items()
            if name not in ("step_time", "step_timeline")
        }
        # one raw row per step makes both step_time and step_timeline (on the sender thread)
        self.tables = {"step_time": StepRows(caps.get("step_time", 4096)), **self.tables}
        self.clock = PhaseClock()
        self.tracker = StepTracker(self.clock, self.tables["step_time"], self.tables["step_region"])
        self.wrapper = "none"
        self.cuda_device: int | None = None
        self.gpu_timer: Any = None
        self._h2d = h2d
        self._model: Any = None
        #: called when the traced model changes (api.py disarms trace_step's C entry)
        self.on_model_change: Callable[[], None] | None = None
        self._patch_names: list[str] = []
        self._env_sent = False
        self._env_wrapper = ""
        self._dist_facts: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._auto_steps = auto_steps
        #: the residual's stack sampler (:mod:`traceml.runtime.stacks`), started with the threads
        self.stacks: Any = None
        #: DDP all-reduce timing (:mod:`traceml.runtime.comm`), built for the first DDP model
        self.comm: Any = None
        #: zero-code step boundaries (:mod:`traceml.runtime.autostep`), built once torch is imported
        self.autostep: Any = None
        self._thread_cpu: dict[int, int] = {}
        self._cost_steps_sent = 0

        self.sinks: list[Sink] = self._build_sinks()
        self.sender: Sender | None = None
        self.sampler: SamplerThread | None = None
        if self.sinks:
            self.sender = Sender(
                self.tables,
                self.sinks,
                period_s=sender_period_s,
                resolve=self._resolve_gpu,
                # a capacity given by the caller is kept as given; the defaults grow for bursts
                max_capacity={
                    name: max(caps.get(name, 4096), n)
                    for name, n in TABLE_MAX_CAPACITY.items()
                    if name not in (capacity or {})
                },
            )
            self.sampler = SamplerThread(self._build_samplers(), interval_s=config.interval_s, on_tick=self._on_tick)

        #: host RSS every few steps while no CUDA step memory takes the slot (:mod:`.hostmem`)
        self.host_memory: Any = None
        if self.sender is not None:
            try:
                from traceml.runtime.hostmem import host_step_memory

                self.host_memory = host_step_memory(self.tables["step_host"].append)
                self.tracker.memory = self.host_memory
            except Exception:
                disable_piece("host-step-memory", "the per-step host memory signal")
        self._gpu_timing = gpu_timing if gpu_timing is not None else self.sender is not None
        self._cuda_available = False
        try:
            hook = call_after_import("torch", self._on_torch)
            if hook is not None:
                self._patch_names.append(hook)
            self._install_excepthook()
            atexit.register(self._atexit)
            if start:
                self.start()
        except BaseException:
            self.close()  # a half-built agent must not leave patches or threads behind
            raise

    # -- construction --------------------------------------------------------------
    def _build_sinks(self) -> list[Sink]:
        sinks: list[Sink] = []
        cfg = self.config
        if cfg.streaming:
            assert cfg.aggregator_host is not None and cfg.aggregator_port is not None
            client = TelemetryClient(
                cfg.aggregator_host,
                cfg.aggregator_port,
                hello(cfg.run_id, cfg.token, self.identity),
                **{"max_frame_bytes": cfg.max_frame_bytes, **self._stream_options},
            )
            sinks.append(StreamSink(client))
        if self.out:
            path = recording_path(self.out, self.identity)
            try:
                from traceml.format import TmlWriter

                meta = {
                    "run_id": cfg.run_id,
                    "start_ns": self.started_ns,
                    "hosts": [self.identity.host],
                    "world_size": self.identity.world_size,
                    "command": [str(a) for a in sys.argv],
                    "recorded_by": f"rank {self.identity.rank}",
                }
                writer = TmlWriter(path, run_meta=meta, schemas=list(STANDARD_TABLES.values()))
                sinks.append(FileSink(writer, self.identity, meta, self.started_ns))
                self.out = path
            except Exception:
                disable_piece("sink-file-open", f"recording to {path!r}")
        return sinks

    def _build_samplers(self) -> list[tuple[str, Any, Any]]:
        t = self.tables
        samplers: list[tuple[str, Any, Any]] = []
        try:
            proc = ProcessSampler(self.clock_ns, cuda_device=lambda: self.cuda_device)
            samplers.append(("process", proc.sample, t["process"].append))
        except Exception:
            disable_piece("sampler-process-init", "the process sampler")
        if self.identity.local_rank == 0:  # one per node
            try:
                system = SystemSampler(self.identity.node_rank, self.clock_ns)
                samplers.append(("system", system.sample, t["system"].append))
            except Exception:
                disable_piece("sampler-system-init", "the system sampler")
            try:
                nvml = NvmlSampler(self.identity.node_rank, self.clock_ns)
                if nvml.available:
                    samplers.append(("nvml", nvml.sample, t["system_gpu"].append))
            except Exception:
                disable_piece("sampler-nvml-init", "the NVML GPU sampler")
        return samplers

    def start(self) -> None:
        if self.sender is not None and not self.sender.alive:
            self.sender.start()
        if self.sampler is not None and not self.sampler.alive:
            self.sampler.start()
        if self.stacks is None and self.sender is not None and self.config.stack_hz > 0:
            try:
                from traceml.runtime.stacks import StackSampler

                self.stacks = StackSampler(
                    self.clock, self.tracker, self.tables["step_stack"].append, self.config.stack_hz
                )
                self.stacks.start()
            except Exception:
                disable_piece("stacks-start", "the stack sampler")

    # -- torch ---------------------------------------------------------------------
    def _on_torch(self, torch: ModuleType) -> None:
        """Runs once torch is imported (now, or right after the script imports it)."""
        if self.closed:
            return
        from traceml.runtime.hooks import install_torch_hooks

        self._patch_names.extend(install_torch_hooks(self.clock, h2d=self._h2d))
        try:
            from traceml.runtime.comm import install_collectives

            if self.sender is not None and torch.distributed.is_available():
                clock = self.clock
                self._patch_names.extend(install_collectives(self._comm_timer, lambda: clock.owner))
        except Exception:
            disable_piece("comm-collectives", "timing torch.distributed collectives")
        if self._auto_steps:
            try:
                from traceml.runtime.autostep import AutoSteps

                self.autostep = AutoSteps(self.clock, self.tracker, on_model=self._adopt_model)
                self.autostep.install()  # undone by close()
            except Exception:
                disable_piece("auto-steps-install", "zero-code step detection")
        try:
            # asked once; a CPU build answers False without raising
            self._cuda_available = bool(torch.cuda.is_available())
        except Exception:
            disable_piece("cuda-check", "CUDA detection")
        self._arm_cuda_check()

    def _arm_cuda_check(self) -> None:
        if self._cuda_available and self._gpu_timing and self.gpu_timer is None:
            self.tracker.on_cuda_check = self._cuda_check

    def _cuda_check(self) -> bool:
        """At step start until decided: is this step's model on a CUDA device?  Then build the
        event timer.  Returns False once decided (the tracker stops asking)."""
        torch = sys.modules["torch"]
        if not torch.cuda.is_initialized():
            return True  # not yet: CUDA may come later (lazy init, model.to after the first step)
        device = _model_cuda_device(self._model)
        if device is None:
            return False  # a CPU model on a CUDA machine: nothing to time on the GPU
        try:
            from traceml.runtime.cuda import CudaStepMemory, GpuTimer, cuda_recorder

            dev = int(torch.cuda.current_device()) if device < 0 else device
            self.cuda_device = dev
            timer = GpuTimer(lambda: torch.cuda.Event(enable_timing=True), record=cuda_recorder(torch, dev))
            self.gpu_timer = timer
            self.clock.gpu = timer
            self.tracker.gpu = timer
            self.tracker.memory = CudaStepMemory(torch.cuda, dev, self.tables["step_memory"].append, torch._C)
        except Exception:
            disable_piece("cuda-setup", "GPU timing setup")
        return False

    def _resolve_gpu(self) -> None:
        timer = self.gpu_timer
        if timer is not None:
            append = self.tables["step_gpu"].append
            for row in timer.resolve():
                append(row)

    # -- the step ------------------------------------------------------------------
    def step_context(self, model: Any = None) -> StepTracker:
        if self.autostep is not None and self.autostep.active:
            self.autostep.yield_to_explicit()  # an explicit step always wins
        if model is not None and model is not self._model:
            self._attach_model(model)
        return self.tracker

    def _comm_timer(self) -> Any:
        """The all-reduce timer, built on first use (a collective called in a step, or a DDP model)."""
        if self.comm is None and not self.closed:
            from traceml.runtime.comm import CommTimer

            tracker = self.tracker
            self.comm = CommTimer(lambda: tracker.step, self.tables["step_comm"].append)
        return self.comm if self.tracker.depth else None

    def _attach_comm(self, model: Any) -> None:
        try:
            from traceml.runtime.comm import CommTimer, attach_ddp

            ddp = model
            for _ in range(4):  # torch.compile(DDP(...)): the DDP module is inside
                if hasattr(ddp, "register_comm_hook"):
                    break
                ddp = getattr(ddp, "_orig_mod", None)
            if ddp is None or not hasattr(ddp, "register_comm_hook"):
                return
            if self.comm is None:
                tracker = self.tracker
                self.comm = CommTimer(lambda: tracker.step, self.tables["step_comm"].append)
            attach_ddp(ddp, self.comm)
        except Exception:
            disable_piece("comm-attach", "timing DDP's all-reduce")

    def _adopt_model(self, model: Any) -> None:
        """The model of automatic steps (its forward is timed by the auto-step wrapper)."""
        if self._model is None:
            self._attach_model(model, wrap=False)

    def _attach_model(self, model: Any, wrap: bool = True) -> None:
        self._model = model
        if self.on_model_change is not None:
            self.on_model_change()  # api.py's trace_step entry re-checks the model
        if self.closed:
            return
        try:
            from traceml.runtime.hooks import wrap_forward, wrapper_kind

            self.wrapper = wrapper_kind(model)
            self._dist_facts = distributed_facts()  # now, while the process group surely exists
            if self.wrapper == "DDP":
                self._attach_comm(model)
            if not wrap:
                self._arm_cuda_check()
                return
            name = wrap_forward(self.clock, model)
            if name is not None:
                self._patch_names.append(name)
            self._arm_cuda_check()  # a new model may live on the GPU
        except Exception:
            disable_piece("forward-wrap", "timing the model's forward")

    # -- environment ---------------------------------------------------------------
    def environment(self) -> dict[str, Any]:
        env = collect_environment(self.identity.to_dict(), wrapper=self.wrapper, script=self.script)
        for key, value in self._dist_facts.items():
            if not env.get(key):
                env[key] = value
        env["started_ns"] = self.started_ns
        env["run_id"] = self.config.run_id
        auto = self.autostep
        env["step_source"] = "optimizer" if auto is not None and auto.active and auto.steps_recorded else "trace_step"
        return env

    def _on_tick(self) -> None:
        try:
            self._sample_cost()
        except Exception:
            disable_piece("cost", "measuring traceml's own cost")
        self._maybe_send_environment()

    def _threads_cpu_ns(self) -> int:
        """CPU time of traceml's own threads (sender, sampler, stacks) so far, plus the native stack
        samples' time on the training thread; -1 where not measurable."""
        threads = [
            getattr(self.sender, "_thread", None),
            getattr(self.sampler, "_thread", None),
            getattr(self.stacks, "_thread", None),
        ]
        for t in threads:
            tid = getattr(t, "native_id", None)
            if tid is None or t is None or not t.is_alive():
                continue  # not started, or ended: keep its last figure
            ns = thread_cpu_ns(tid)
            if ns >= 0:
                self._thread_cpu[tid] = ns
        if not self._thread_cpu:
            return -1
        return sum(self._thread_cpu.values()) + int(getattr(self.stacks, "native_ns", 0) or 0)

    def _sample_cost(self, final: bool = False) -> None:
        """Append a TRACEML_COST row (cumulative) when steps ran since the last one."""
        t = self.tracker
        if t.step == self._cost_steps_sent and not (final and t.step):
            return
        self._cost_steps_sent = t.step
        outside = self._threads_cpu_ns()  # and the memory steps' slow exits, which no sampled step sees
        if outside >= 0:
            outside += int(getattr(t, "rare_ns", 0) or 0)
        self.tables["traceml_cost"].append((time.time_ns(), t.step, t.cost_steps, t.cost_ns, outside))

    def _maybe_send_environment(self) -> None:
        """Sampler-thread tick: send the environment once the first step ran (DDP and the
        model wrapper are known by then), and again if the wrapper changes."""
        if self.sender is None or self.tracker.step == 0 or self._env_wrapper == self.wrapper:
            return
        self._send_environment()

    def _send_environment(self) -> None:
        if self.sender is None:
            return
        self._env_wrapper = self.wrapper
        self._env_sent = True
        self.sender.queue_attachment(f"environment/rank{self.identity.rank}", self.environment())

    # -- failure & exit ------------------------------------------------------------
    def mark_failed(self) -> None:
        self.failed = True

    def _install_excepthook(self) -> None:
        previous = sys.excepthook

        def traceml_excepthook(exc_type: Any, exc: Any, tb: Any) -> None:
            self.failed = True  # SystemExit never reaches here; KeyboardInterrupt is a failure
            previous(exc_type, exc, tb)

        try:
            self._patch_names.append(patches.patch_attribute(sys, "excepthook", traceml_excepthook, "sys.excepthook"))
        except Exception:
            disable_piece("excepthook", "failure detection (sys.excepthook)")

    def _atexit(self) -> None:
        self.close()

    def close(self) -> None:
        """Undo every patch, stop the threads (bounded drain), send rank_finished.  Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self.clock.enabled = False
        self.tracker.enabled = False
        self.clock.gpu = None
        if self.autostep is not None:
            self.autostep.close()
        for name in reversed(self._patch_names):
            patches.undo(name)
        self._patch_names.clear()
        self._model = None
        try:
            atexit.unregister(self._atexit)
        except Exception:
            pass
        if os.getpid() != self.pid:
            return  # a forked child: the threads and sockets are the parent's
        if self.sampler is not None:
            self.sampler.stop()
            if self.stacks is not None:
                self.stacks.stop()
            if self.host_memory is not None:
                self.host_memory.close()
            if self.comm is not None:
                self.comm.enabled = False
                try:
                    self.comm.flush()
                except Exception:
                    disable_piece("comm-flush", "timing DDP's all-reduce")
            try:
                self._sample_cost(final=True)
            except Exception:
                disable_piece("cost", "measuring traceml's own cost")
            if not self._env_sent:
                try:
                    self._send_environment()
                except Exception:
                    disable_piece("environment", "collecting the run environment")
        if self.sender is not None:
            self._drain_gpu(timeout_s=1.0)
            self.sender.close("failed" if self.failed else "ok", drain_timeout_s=self.drain_timeout_s)

    def _drain_gpu(self, timeout_s: float) -> None:
        """Give in-flight CUDA events a bounded moment to complete (still no synchronize)."""
        timer = self.gpu_timer
        deadline = time.monotonic() + timeout_s
        while timer is not None and timer.pending_steps and time.monotonic() < deadline:
            self._resolve_gpu()
            if timer.pending_steps:
                time.sleep(0.01)

    # -- introspection ---------------------------------------------------------------
    @property
    def threads_alive(self) -> list[str]:
        out = []
        if self.sender is not None and self.sender.alive:
            out.append("sender")
        if self.sampler is not None and self.sampler.alive:
            out.append("sampler")
        if self.stacks is not None and self.stacks.alive:
            out.append("stacks")
        return out

    def drops(self) -> Mapping[str, int]:
        return {name: t.lost for name, t in self.tables.items() if t.lost}


def recording_path(out: str, identity: RankIdentity) -> str:
    """Where this rank records: ``out`` itself for a single process; with several ranks each
    gets its own file (``{rank}`` in ``out`` is replaced, else ``.rank<N>`` goes before the
    extension) so that ranks never write into one file."""
    if "{rank}" in out:
        return out.replace("{rank}", str(identity.rank))
    if identity.world_size <= 1:
        return out
    root, ext = os.path.splitext(out)
    return f"{root}.rank{identity.rank}{ext or '.tml'}"


def _model_cuda_device(model: Any) -> int | None:
    """CUDA device index of the model's first parameter or buffer; None when it is on the CPU
    (or elsewhere); -1 when there is no model or it holds no tensor (then: the current device)."""
    if model is None:
        return -1
    try:
        for tensors in (model.parameters(), model.buffers()):
            for t in tensors:
                return int(t.device.index or 0) if t.is_cuda else None
    except Exception:
        return -1
    return -1

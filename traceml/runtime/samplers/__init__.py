"""Background samplers of a rank: process, system (local rank 0), NVML GPUs, run environment.

Each sampler takes a clock (``() -> ns``) so tests inject time, returns rows as tuples in
its table's column order, and never runs on the training thread.
"""

from traceml.runtime.samplers.environment import collect_environment, distributed_facts, git_commit
from traceml.runtime.samplers.nvml import NvmlSampler
from traceml.runtime.samplers.process import ProcessSampler
from traceml.runtime.samplers.system import SystemSampler
from traceml.runtime.samplers.thread import SamplerThread

__all__ = [
    "NvmlSampler",
    "ProcessSampler",
    "SamplerThread",
    "SystemSampler",
    "collect_environment",
    "distributed_facts",
    "git_commit",
]

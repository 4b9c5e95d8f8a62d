"""Every number a diagnosis rule compares against, in one place (documented in docs/diagnosis.md).

Shares are fractions of the step (0.10 = 10 %).  Changing a value here changes the rule; the
docs table and the rule tests name these constants, so keep the three in step.
"""

from __future__ import annotations

# --- which steps are analysed -----------------------------------------------------------
#: the warm-up skipped at the start of the run (defined beside the step selection every view shares)
from traceml.views.steps import WARMUP_MAX_FRACTION, WARMUP_STEPS  # noqa: F401

#: fewer analysable steps than this (per rank) and the step rules abstain
MIN_STEPS = 5
#: a finding may be critical only when it rests on at least this many steps; otherwise warn
MIN_STEPS_CRITICAL = 20
#: the trailing window shown next to the whole run ("last N steps")
RECENT_STEPS = 100

# --- step-time shares (median over ranks of each rank's share of step time) ----------------
INPUT_WARN = 0.10
INPUT_CRITICAL = 0.25
H2D_WARN = 0.10
H2D_CRITICAL = 0.25
RESIDUAL_WARN = 0.15
RESIDUAL_CRITICAL = 0.30
#: forward + backward + optimizer share at or above which the run is called compute-bound
COMPUTE_BOUND_SHARE = 0.85

# --- stragglers -----------------------------------------------------------------------------
#: culprit's excess time over the other ranks, as a fraction of the typical step
STRAGGLER_WARN = 0.10
STRAGGLER_CRITICAL = 0.25
#: a smaller excess is timer and scheduler jitter, not a straggler, however large a share of a
#: microsecond step it is (steps of a few µs differ by tens of µs from one wake-up to the next)
STRAGGLER_MIN_GAP_US = 50.0
#: a cause (input / compute / communication / other) is named when it explains this much of the gap
STRAGGLER_CAUSE_SHARE = 0.70
#: a rank's own exposed collective time (``step_comm``) must exceed the other ranks' by this much,
#: beyond what waiting for another rank's non-synchronised excess explains, to count as its cause
STRAGGLER_COMM_MIN_GAP_US = STRAGGLER_MIN_GAP_US

# --- memory creep ---------------------------------------------------------------------------
#: band edges, as fractions of the window's samples: baseline, middle, recent
CREEP_BANDS = ((0.10, 0.25), (0.45, 0.55), (0.85, 1.0))
#: fewer samples (per rank and source) and the creep rule abstains
CREEP_MIN_SAMPLES = 20
#: growth must exceed max(CREEP_NOISE_SIGMAS * robust sigma of the baseline band, the floors below)
CREEP_NOISE_SIGMAS = 3.0
CREEP_MIN_BYTES = 8 * 1024 * 1024
CREEP_MIN_FRACTION = 0.02
#: a creep is confirmed (not early) with this many samples and a growth of this fraction or bytes
CREEP_CONFIRM_SAMPLES = 60
CREEP_CONFIRM_FRACTION = 0.10
CREEP_CONFIRM_BYTES = 1024 * 1024 * 1024
#: a confirmed creep whose recent level is at least this fraction of capacity is critical
CREEP_CAPACITY_CRITICAL = 0.90

# --- GPU utilization (SYSTEM_GPU) ---------------------------------------------------------
LOW_GPU_UTIL_WARN = 30.0
LOW_GPU_UTIL_CRITICAL = 10.0
#: fewer samples per GPU within the window and the rule abstains
GPU_UTIL_MIN_SAMPLES = 3

# --- the residual explained (stack samples, traceml.runtime.stacks) -------------------------
#: fewer residual samples in the window and the residual is not explained
STACK_MIN_SAMPLES = 20
#: share of the residual samples spent reading data at which the residual counts as input
STACK_INPUT_SHARE = 0.5

# --- communication (DDP all-reduce, traceml.runtime.comm) ------------------------------------
#: exposed all-reduce share of the step (the all-reduce not hidden behind backward), taken on the
#: rank that waits least (a straggler makes the others wait inside the all-reduce)
COMM_WARN = 0.20
COMM_CRITICAL = 0.40

# --- resources (traceml.diagnosis.pressure) ---------------------------------------------------
#: GPU memory reserved / total, or host RAM used / total (90th percentile of the window)
MEM_PRESSURE_WARN = 0.90
MEM_PRESSURE_CRITICAL = 0.97
#: (largest - smallest) / largest peak memory between ranks, and a floor in bytes
MEM_IMBALANCE_WARN = 0.25
MEM_IMBALANCE_CRITICAL = 0.50
MEM_IMBALANCE_MIN_BYTES = 256 * 1024 * 1024
#: node CPU busy (system.cpu_pct, mean over the window) and the samples it needs
HOST_CPU_WARN = 90.0
HOST_CPU_CRITICAL = 98.0
HOST_MIN_SAMPLES = 3
#: GPU temperature (system_gpu.temp_c, 90th percentile), in °C
GPU_TEMP_WARN = 85.0
GPU_TEMP_CRITICAL = 90.0

# --- the live verdict (traceml.diagnosis.live) ------------------------------------------------
#: the live view diagnoses the steps of the last this many seconds ...
LIVE_WINDOW_S = 5.0
#: ... but at least this many steps (and at most RECENT_STEPS)
LIVE_MIN_STEPS = 10

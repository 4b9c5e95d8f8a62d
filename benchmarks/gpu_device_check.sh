#!/usr/bin/env bash
# One prepared run of the CUDA paths on a lent GPU machine (see docs/benchmarks.md):
# the gpu-marked tests, then a real `traceml run` of a CUDA script, inspected.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts="" -m gpu tests/test_runtime_gpu.py tests/test_integrations_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
timeout 120 python3 -c "from traceml.cli import main; main()" run --ui none --out "$OUT/gpu_run.tml" tests/scripts/device_cuda_train.py --steps 300 2>&1 | tail -30 | tee "$OUT/gpu_run.log"
python3 -c "from traceml.cli import main; main()" inspect "$OUT/gpu_run.tml" 2>&1 | tee "$OUT/gpu_inspect.log"
python3 - "$OUT/gpu_run.tml" <<'PY' 2>&1 | tee "$OUT/gpu_tables.log"
import sys
import numpy as np
from traceml.format import open_recording
r = open_recording(sys.argv[1])
for t in ("step_time", "step_gpu", "step_memory", "process", "system_gpu"):
    d = r.read_table(t)
    for rank, cols in d.items():
        n = len(next(iter(cols.values())))
        med = {k: float(np.median(v)) for k, v in cols.items() if v.dtype.kind in "if" and k not in ("ts_ns",)}
        print(t, "rank", rank, "rows", n, {k: round(v, 1) for k, v in med.items()})
PY

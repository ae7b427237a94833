#!/usr/bin/env bash
# The GPU checks in one device call, with llmtrace installed the way users install it
# (pip builds the C recorder; nothing from PYTHONPATH but carried wheels).
#   bash benchmarks/gpu_session.sh OUT checks   GPU tests, table 1 (decode), tables 2-4 (end to end)
#   bash benchmarks/gpu_session.sh OUT cost     table 5: tracing on vs off, 2 rounds interleaved
#   bash benchmarks/gpu_session.sh OUT sanity   GPU tests, recorder stress, the quickstart on CUDA (~3 min)
#   bash benchmarks/gpu_session.sh OUT busy     device busy vs CUPTI (gpu_device_busy.py), the eager quickstart
#                                               with kernel records (launch-bound)
# Several parts run in one call: gpu_session.sh OUT sanity busy
# Carry .whl (orjson for Python 3.12: see GPU_NOTES.md). Results land under OUT.
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT checks|cost|sanity|busy ...}
shift
parts=${*:-checks}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
python3 - <<'PY' || exit 1
import llmtrace.recorder as r, torch
from llmtrace import native_stacks
print("recorder backend:", r.BACKEND, "| GIL-free stack reads:", native_stacks.reader() is not None,
      "| torch", torch.__version__, "|", torch.cuda.get_device_name())
assert r.BACKEND == "c", "the C recorder was not built"
PY
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
backends() {  # the recorder each traced process ran, from its spool header
  python3 - "$1" <<'PY'
import glob, sys
from llmtrace.spool_format import read_spool
for p in sorted(glob.glob(sys.argv[1] + "/spool/*.lts")):
    h = read_spool(p).header
    print("  spool", h["process_name"], "backend", h["backend"])
PY
}
for part in $parts; do
echo "== $part"
if [ "$part" = checks ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_model_runner.py \
    tests/test_triton_attention.py tests/test_fused_ops.py tests/test_recorder.py tests/test_sampler.py 2>&1 | tail -3
  python3 scripts/recorder_stress.py 5
  python3 benchmarks/gpu_decode.py --skip-transformers --json "$out/decode.json" 2>&1 | tee "$out/decode.txt" | tail -12
  python3 benchmarks/gpu_e2e.py --out /tmp/e2e --skip-transformers 2>&1 | tee "$out/e2e.txt" | tail -30
  backends /tmp/e2e/llama2_7b
  cp /tmp/e2e/results.json "$out/e2e.json"; cp /tmp/e2e/llama2_7b/report.md "$out/report.md" 2>/dev/null
elif [ "$part" = sanity ]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_model_runner.py \
    tests/test_triton_attention.py tests/test_fused_ops.py tests/test_recorder.py tests/test_sampler.py \
    tests/test_stack_sampler.py 2>&1 | tail -3
  python3 scripts/recorder_stress.py 5
  python3 -m llmtrace.cli run --config examples/quickstart.yaml --out /tmp/qs --set model.device=cuda 2>&1 \
    | tee "$out/quickstart.txt" | grep -E "ms/token|tok/s|error" | head -5
  backends /tmp/qs
elif [ "$part" = busy ]; then
  python3 benchmarks/gpu_device_busy.py --json "$out/busy.json" 2>&1 | tee "$out/busy.txt" | tail -16
  python3 -m llmtrace.cli run --config examples/quickstart.yaml --out /tmp/qs_eager --set model.device=cuda \
    --set engine.cuda_graphs=false --set trace.device_activity=200 > "$out/quickstart_eager.txt" 2>&1
  grep -E "ms/token|Device|launch-bound|error" "$out/quickstart_eager.txt" | head -8
  cp /tmp/qs_eager/report.md "$out/quickstart_eager_report.md" 2>/dev/null
else
  python3 benchmarks/gpu_e2e.py --out /tmp/cost --skip-engine --skip-transformers --tracing-cost 2 2>&1 \
    | tee "$out/cost.txt" | tail -12
  backends /tmp/cost/cost_0_on
  cp /tmp/cost/results.json "$out/cost.json"
fi
done

#!/usr/bin/env bash
# A foreign pipeline on the GPU: examples/pipelines/thread_queue_server.py with its model on
# CUDA, recorded by `llmtrace record` (automatic instrumentation: CUDA-event forward spans,
# sync.wait at the host copies), planted and clean; prints each report's breakdown and
# findings. Run after gpu_session.sh's install step (or on its own: it installs too).
#   bash benchmarks/gpu_foreign.sh OUT
set -uo pipefail
out=${1:?usage: gpu_foreign.sh OUT}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
for variant in planted clean; do
  env=(PIPELINE_DEVICE=cuda); [ "$variant" = clean ] && env+=(PIPELINE_CLEAN=1)
  env "${env[@]}" python3 -m llmtrace.cli record --out "/tmp/foreign_$variant" -- python3 \
    examples/pipelines/thread_queue_server.py --requests 32 > "$out/record_$variant.txt" 2>&1
  echo "== $variant: $(grep '"pipeline"' "$out/record_$variant.txt")"
  python3 -m llmtrace.cli analyze --json "/tmp/foreign_$variant" > "$out/report_$variant.json"
  python3 - "$out/report_$variant.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bd = r["breakdown"]
print(bd["headline"], "| steps", bd["steps"], bd["steps_from"]["source"])
dev = [s for s in bd["stages"]]
for s in r["suggestions"]:
    print(" ", s["id"], round(s["est_saving_ms_per_token"], 3), [x["function"] for x in s["evidence"].get("responsible", [])][:2])
PY
done
python3 - <<'PY'
from llmtrace.load import load_trace
t = load_trace("/tmp/foreign_planted")
fwd = [s for s in t.spans if s.stage == "forward"]
print("forward spans", len(fwd), "with device time", sum(s.device_start_ns is not None for s in fwd))
PY

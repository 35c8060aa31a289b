#!/usr/bin/env bash
# The GPU benchmarks in one command (run on the GPU machine, repo root; `make bench-gpu`):
#   benchmarks/results/engine_h200.json  engine + LoRA kernels (issue 10 keys)
#   benchmarks/results/e2e_h200.json     serving loop end to end (issue 11 keys)
#   benchmarks/results/churn_h200.json   adapter churn (issue 12 keys)
#   benchmarks/results/tp_h200x2.json    tensor parallelism TP=2 vs TP=1 (issue 15 keys; needs 2 GPUs,
#                                        skipped on one: run `bash scripts/bench_gpu.sh tp` on nvidia-h200-x2),
#                                        with CUDA graphs; tp_h200x2_70b.json: the 70B layer shape (4 layers);
#                                        allreduce_h200x2.json: symmetric-memory all-reduce vs NCCL
#   benchmarks/results/fp8_h200.json     FP8 base (+ FP8 KV) vs bf16 (issue 14 keys)
#   benchmarks/results/dora_h200.json    32 DoRA vs 32 plain LoRA adapters at batch 64 (issue 16 key)
# Each figure is printed next to its limit measured in the same run. Pass stage names to run a
# subset: `bash scripts/bench_gpu.sh engine lora`.
set -uo pipefail
source scripts/gpu_env.sh
RESULTS=${RESULTS:-benchmarks/results}
WORK=${WORK:-/tmp/loraserve-bench}
mkdir -p "$RESULTS" "$WORK"
stages=${*:-engine lora e2e churn fp8 dora tp}
for stage in $stages; do
  echo "=== $stage ==="
  case $stage in
    engine) python3 benchmarks/bench_engine.py --json "$WORK/engine.json" --profile "$WORK/profile" ;;
    lora)   python3 benchmarks/bench_lora_kernels.py --json "$WORK/lora.json" ;;
    e2e)    python3 benchmarks/bench_e2e.py --out "$WORK/e2e" --json "$WORK/e2e.json" ;;
    churn)  python3 benchmarks/bench_churn.py --json "$WORK/churn.json" ;;
    fp8)    python3 benchmarks/bench_fp8.py --json "$WORK/fp8.json" ;;
    dora)   python3 benchmarks/bench_dora.py --json "$WORK/dora.json" ;;
    tp)     python3 benchmarks/bench_allreduce.py --json "$WORK/allreduce.json"      # symmetric memory vs NCCL
            python3 benchmarks/bench_allreduce.py --fused-norm --json "$WORK/fused_norm.json"   # all-reduce + RMSNorm kernel
            python3 benchmarks/bench_tp.py --tp-graphs --compare-ar --json "$WORK/tp.json"   # TP=2 with CUDA graphs
            python3 benchmarks/bench_tp.py --tp-graphs --shape 70b --json "$WORK/tp70b.json" ;;
  esac || echo "stage $stage FAILED"
done
python3 - "$WORK" "$RESULTS" <<'PY'
import json, os, sys
work, results = sys.argv[1:]
def load(name):
    p = os.path.join(work, name)
    return json.load(open(p)) if os.path.exists(p) else {}
merged = {"engine_h200.json": {**load("engine.json"), **load("lora.json")},
          "e2e_h200.json": load("e2e.json"), "churn_h200.json": load("churn.json"),
          "tp_h200x2.json": load("tp.json"), "tp_h200x2_70b.json": load("tp70b.json"),
          "allreduce_h200x2.json": load("allreduce.json"), "fused_norm_h200x2.json": load("fused_norm.json"),
          "fp8_h200.json": load("fp8.json"), "dora_h200.json": load("dora.json")}
for name, data in merged.items():
    if data:
        with open(os.path.join(results, name), "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {os.path.join(results, name)}")
PY

#!/usr/bin/env bash
# One prepared command for a GPU machine (H100/H200): install the carried wheels if needed, run the speed
# benchmarks, write their results under $OUT (default bench/out). Finishes in about 5 minutes.
#
# The GPU image has torch, transformers, peft and accelerate but neither trl nor datasets. Carry them as wheels in
# .whl/ (see bench/README.md for the download command); pyarrow is installed from there only when the image's is
# older than datasets needs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
BUDGET_S=${BENCH_BUDGET_S:-300}
started=$(date +%s)

if [ -d .whl ]; then
  wheels=$(ls .whl/*.whl | grep -v pyarrow)
  if ! python3 -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
    wheels="$wheels $(ls .whl/pyarrow-*.whl 2>/dev/null)"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/gpu.txt"

# Training: TRL DPOTrainer vs mrpo, every layout. The order puts what was never measured on a GPU first (the
# compiled packed decoder -- the default there --, prefix-shared rows, token-budget micro-batches bucketed and as
# is), so that it survives the time budget; K=4 packed and TRL's gradient checkpointing come last.
python3 bench/train_vs_trl.py --size qwen0.5b --compile --budget-s "$BUDGET_S" \
  --only trl_gc0 mrpo_k1_packed_compiled mrpo_k1_shared mrpo_k1_padded_budget mrpo_k1_padded_budget_exact \
    mrpo_k1_packed mrpo_k1_padded mrpo_k4_packed trl_gc1 \
  --output "$OUT/train_vs_trl.json" 2>&1 | grep -v -i warn | tee "$OUT/train_vs_trl.log"

# Precompute: our reference scoring (padded and prefix-shared rows) vs a bare forward, if time is left.
left=$(( BUDGET_S + 120 - ($(date +%s) - started) ))
if [ "$left" -gt 60 ]; then
  timeout "$left" python3 bench/precompute_vs_forward.py --size small --device cuda --pairs 2000 \
    --batch-tokens 32768 --skip-trl --output "$OUT/precompute_vs_forward.json" 2>&1 | grep -v -i warn \
    | tee "$OUT/precompute_vs_forward.log"
fi

# The one table.
python3 bench/gpu_table.py "$OUT/train_vs_trl.json" "$OUT/precompute_vs_forward.json" | tee "$OUT/table.txt"

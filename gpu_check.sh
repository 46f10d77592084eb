#!/usr/bin/env bash
# The GPU checklist (correctness, throughput against the challenge's own script, the benchmark suite)
# in one command, on a machine with a CUDA GPU:
#
#   bash gpu_check.sh            # writes everything under $OUT (default ./gpu_out), a table last
#
# For the side-by-side, put the challenge's root train_gpt.py at reference/train_gpt.py (git-ignored;
# never commit it) and a sentencepiece model at data/tokenizers/fineweb_1024_bpe.model.
set -euo pipefail
cd "$(dirname "$0")"
out="${OUT:-gpu_out}"
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$out/gpus.txt"

# 1. Correctness on the GPU: a 60 s run on the synthetic corpus with compile on, graph breaks
#    logged, every evaluation audited, and the artifact round trip.
python data/synthetic.py --out "$out/synthetic" --docs 20000 --seed 1337
python data/prepare.py --input "$out/synthetic/synthetic.jsonl" --out "$out/synthetic_shards" --vocab-size 1024 \
  --val-docs 500
TORCH_LOGS=graph_breaks DATA_PATH="$out/synthetic_shards" MAX_WALLCLOCK_SECONDS=60 VAL_LOSS_EVERY=0 \
  EVAL_STRIDE=64 HEDGE_ENABLED=1 EVAL_AUDIT=1 LOG_DIR="$out" RUN_ID=gpu_correctness \
  python train_gpt.py > "$out/gpu_correctness.out" 2>&1
grep -c -i "graph break" "$out/gpu_correctness.out" > "$out/graph_breaks.count" || true

# 2. Throughput against the reference: the baseline shape on the same random-token shards, 80 steps
#    after 20 untimed warm-up steps, one GPU (accumulation 8), one after the other.
if [ -f reference/train_gpt.py ] && [ -f data/tokenizers/fineweb_1024_bpe.model ]; then
  python - "$out/random_shards" <<'PY'
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from data.prepare import write_shard
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(2):
    write_shard(folder / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 50_000_000).astype(np.uint16))
write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 1024, 1_048_577).astype(np.uint16))
PY
  shape="DATA_PATH=$out/random_shards TOKENIZER_PATH=data/tokenizers/fineweb_1024_bpe.model VOCAB_SIZE=1024
    ITERATIONS=80 WARMUP_STEPS=20 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=20 MAX_WALLCLOCK_SECONDS=0"
  env $shape RUN_ID=reference python reference/train_gpt.py > "$out/reference.out" 2>&1
  env $shape RUN_ID=ours LOG_DIR="$out" python train_gpt.py > "$out/ours.out" 2>&1
fi

# 3. The benchmark suite: baseline, recurrent per phase, dense vs frozen MoE, evaluation methods.
python bench.py --suite --steps 10 --warmup 3 --eval-tokens 1048576 --json "$out/suite.json" | tee "$out/suite.txt"

echo
echo "== correctness"
grep -E "^(final_|audit |total_eval_time|Total submission)" "$out/gpu_correctness.out" || true
echo "graph breaks: $(cat "$out/graph_breaks.count" 2>/dev/null || echo '?')"
if [ -f "$out/ours.out" ]; then
  echo "== throughput, baseline shape, step_avg at step 80 (reference, ours)"
  grep -h -E "^step:80/80 .*step_avg" "$out/reference.out" "$out/ours.out" || true
fi
echo "== suite"
cat "$out/suite.txt"

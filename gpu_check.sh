#!/usr/bin/env bash
# The GPU checklist (correctness, throughput against the challenge's own script, the benchmark suite)
# in one command, on a machine with a CUDA GPU:
#
#   bash gpu_check.sh [all|correctness|reference|suite]   # default all; each part alone is sized for a
#                                                          # 10-minute slot (not yet timed on a GPU)
#
# Everything goes under $OUT (default ./gpu_out); a table of figures beside their goals comes last.
# The side-by-side needs the challenge's root train_gpt.py at reference/train_gpt.py (git-ignored,
# never committed); when it is missing and the network answers, it is downloaded there.
set -euo pipefail
cd "$(dirname "$0")"
part="${1:-all}"
case "$part" in all|correctness|reference|suite) ;; *) echo "usage: bash gpu_check.sh [all|correctness|reference|suite]" >&2; exit 2 ;; esac
out="${OUT:-gpu_out}"
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$out/gpus.txt"
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }

# Both the correctness run and the side-by-side use the synthetic corpus's tokenizer (vocab 1024),
# so nothing has to be downloaded or carried.
shards="$out/synthetic_shards"
if ! compgen -G "$shards/*_train_*.bin" >/dev/null; then
  python data/synthetic.py --out "$out/synthetic" --docs 20000 --seed 1337
  python data/prepare.py --input "$out/synthetic/synthetic.jsonl" --out "$shards" --vocab-size 1024 --val-docs 500
fi

# 1. Correctness on the GPU: a 60 s run with compile on, graph breaks logged, every evaluation
#    audited, and the artifact round trip.
if want correctness; then
  TORCH_LOGS=graph_breaks DATA_PATH="$shards" MAX_WALLCLOCK_SECONDS=60 VAL_LOSS_EVERY=0 \
    EVAL_STRIDE=64 HEDGE_ENABLED=1 EVAL_AUDIT=1 LOG_DIR="$out" RUN_ID=gpu_correctness \
    python train_gpt.py > "$out/gpu_correctness.out" 2>&1 || echo "correctness run exited $?" >&2
  grep -c -i "graph break" "$out/gpu_correctness.out" > "$out/graph_breaks.count" || true
fi

# 2. Throughput against the reference: the baseline shape (its defaults and ours: 9 x 512, vocab
#    1024, seq 1024, 524,288 tokens a step, accumulation 8 on one GPU) on the same random-token
#    shards, 80 timed steps after 20 untimed warm-up steps each, one after the other.
if want reference; then
  if [ ! -f reference/train_gpt.py ]; then
    mkdir -p reference
    curl -fsSL --max-time 30 https://raw.githubusercontent.com/openai/parameter-golf/main/train_gpt.py \
      -o reference/train_gpt.py.part && mv reference/train_gpt.py.part reference/train_gpt.py \
      || { rm -f reference/train_gpt.py.part; echo "reference/train_gpt.py missing and not downloadable: skipping the side-by-side" >&2; }
  fi
  if [ -f reference/train_gpt.py ]; then
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
    shape="DATA_PATH=$out/random_shards TOKENIZER_PATH=$shards/tokenizer.model VOCAB_SIZE=1024
      ITERATIONS=80 WARMUP_STEPS=20 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=20 MAX_WALLCLOCK_SECONDS=0"
    env $shape RUN_ID=reference python reference/train_gpt.py > "$out/reference.out" 2>&1 || echo "reference exited $?" >&2
    env $shape RUN_ID=ours LOG_DIR="$out" python train_gpt.py > "$out/ours.out" 2>&1 || echo "ours exited $?" >&2
  fi
fi

# 3. The benchmark suite: baseline, recurrent per phase, dense vs frozen MoE, evaluation methods,
#    each row beside its goal.
if want suite; then
  python bench.py --suite --steps 10 --warmup 3 --eval-tokens 1048576 --json "$out/suite.json" | tee "$out/suite.txt"
fi

echo
if [ -f "$out/gpu_correctness.out" ]; then
  echo "== correctness (goal: no graph break, round trip within 0.01 bpb of the unquantized model, every audit passed)"
  grep -E "^(final_|audit |total_eval_time|Total submission)" "$out/gpu_correctness.out" || true
  echo "graph breaks: $(cat "$out/graph_breaks.count" 2>/dev/null || echo '?')"
fi
if [ -f "$out/ours.out" ] && [ -f "$out/reference.out" ]; then
  echo "== throughput, baseline shape (goal: >= 1.3x the reference's tokens/s, MFU >= 45%)"
  python - "$out/reference.out" "$out/ours.out" <<'PY'
import re, sys
sys.path.insert(0, ".")
import bench
import train_gpt
cfg, _ = train_gpt.load_config({})
model = train_gpt.GPT(**train_gpt.model_kwargs(cfg))
avg = {}
for name, path in zip(("reference", "ours"), sys.argv[1:]):
    found = re.findall(r"^step:80/80 .*step_avg:([0-9.]+)ms", open(path).read(), re.M)
    if not found:
        print(f"{name}: no step:80/80 line in {path}")
        continue
    avg[name] = float(found[-1])
    tokens_per_s = cfg.train_batch_tokens / (avg[name] / 1000)
    print(f"{name:<10} step_avg {avg[name]:9.2f} ms  {tokens_per_s:10.0f} tokens/s  MFU {100 * bench.mfu(cfg, model, tokens_per_s):5.1f}%")
if len(avg) == 2:
    ratio = avg["reference"] / avg["ours"]
    print(f"ours / reference tokens/s: {ratio:.3f}x (goal >= 1.3x: {'met' if ratio >= 1.3 else 'NOT met'})")
PY
fi
if [ -f "$out/suite.txt" ]; then
  echo "== suite"
  cat "$out/suite.txt"
fi

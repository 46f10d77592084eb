#!/usr/bin/env bash
# The GPU checklist on a machine with one CUDA GPU (an H100 or H200, torch 2.11 or later), offline:
#
#   bash tools/gpu_check.sh [all|correctness|reference|suite]   # default all
#
# correctness (goal <= 4 min, cut off at 5): a compiled bf16 run of the recurrent model with every
#   evaluation audited, the artifact round trip, and the graphs and recompiles it compiled;
# reference (<= 5 min): the challenge's root train_gpt.py and ours at the baseline shape on the same
#   random-token shards, the same steps after warm-up: step_avg, tokens/s, MFU and their ratio;
# suite (<= 5 min): tools/bench.py --suite at full size (baseline, recurrent per depth, dense vs frozen
#   MoE, evaluation speed), its rows printed as they finish.
#
# Nothing is downloaded: the data is made here (the synthetic corpus, random tokens), and the
# reference is read from reference/train_gpt.py (at the repository's root), which you place there yourself (git-ignored,
# never committed). Every part runs even when an earlier one fails, each is cut off at its time
# limit, and the summary prints last with each part's exit code and duration; the script exits 1
# when a part failed. Everything is written under $GPU_CHECK_OUT (default gpu_out/ at the repository's root).
set -u
cd "$(dirname "$0")/.."
repo=$PWD
part="${1:-all}"
usage="usage: bash tools/gpu_check.sh [all|correctness|reference|suite]"
case "$part" in
  all|correctness|reference|suite) ;;
  -h|--help) echo "$usage"; sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
out="${GPU_CHECK_OUT:-gpu_out}"
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 out repo
# A rerun on the same machine finds its compiled kernels here instead of compiling them again.
export TORCHINDUCTOR_CACHE_DIR="$out/inductor_cache"
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }
declare -A took rc

# timed NAME LIMIT_S: runs the part NAME (a function below) under a time limit, records its exit
# code and seconds.
timed() {
  local name=$1 limit=$2 start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" bash -c "$name"
  rc[$name]=$?
  took[$name]=$((SECONDS - start))
  echo "== $name: exit ${rc[$name]} after ${took[$name]}s"
}

{ nvidia-smi -L; python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0],
'grouped_mm:', hasattr(torch.nn.functional, 'grouped_mm') or hasattr(torch, '_grouped_mm'))"
  python -c "import zstandard" 2>/dev/null && echo "zstandard: yes" || echo "zstandard: no (artifacts use zlib)"; } 2>&1 | tee "$out/machine.txt"

# The synthetic corpus and its 1024-piece tokenizer (the correctness run's data, the side-by-side's
# tokenizer), made once, outside the timed parts; a marker written last tells a whole one.
corpus() {
  [ -f "$out/synthetic_shards/done" ] && return 0
  rm -rf "$out/synthetic" "$out/synthetic_shards"
  python data/synthetic.py --out "$out/synthetic" --docs 4000 --seed 1337 &&
    python data/prepare.py --input "$out/synthetic/synthetic.jsonl" --out "$out/synthetic_shards" --vocab-size 1024 \
      --val-docs 200 && touch "$out/synthetic_shards/done"
}

correctness() {
  rm -f "$out/gpu_correctness.out"
  # PRESET=gpu_check: the recurrent model, small enough that its graphs compile quickly: two depth
  # phases, XSA, value embeddings, SWA; sliding, Hedge and TTT, each audited; full GPTQ and QUANT=auto on the device.
  env TORCH_LOGS=graph_breaks,recompiles DATA_PATH="$out/synthetic_shards" PRESET=gpu_check \
    LOG_DIR="$out" RUN_ID=gpu_correctness python train_gpt.py > "$out/gpu_correctness.out" 2>&1
}

reference() {
  rm -f "$out/reference.out" "$out/ours.out"
  if [ ! -f reference/train_gpt.py ]; then
    echo "reference/train_gpt.py is missing: copy the challenge's root train_gpt.py (github.com/openai/parameter-golf)"
    echo "to reference/train_gpt.py at the repository's root (on an offline machine, carry it with the repo), then rerun"
    return 3
  fi
  if [ ! -f "$out/random_shards/done" ]; then
    python - "$out/random_shards" <<'PY' || return 1
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, ".")
from data.prepare import write_shard
folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
write_shard(folder / "fineweb_train_000000.bin", rng.integers(0, 1024, 32_000_000).astype(np.uint16))
write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 1024, 1_048_577).astype(np.uint16))
(folder / "done").touch()
PY
  fi
  local shape="DATA_PATH=$out/random_shards TOKENIZER_PATH=$out/synthetic_shards/tokenizer.model VOCAB_SIZE=1024
    ITERATIONS=50 WARMUP_STEPS=10 VAL_LOSS_EVERY=0 TRAIN_LOG_EVERY=10 MAX_WALLCLOCK_SECONDS=0" status=0
  # The reference writes its model files where it runs: there, not in the repo.
  mkdir -p "$out/reference_run"
  (cd "$out/reference_run" && env $shape RUN_ID=reference python "$repo/reference/train_gpt.py") > "$out/reference.out" 2>&1 ||
    { status=$?; echo "reference exited $status"; }
  env $shape RUN_ID=ours LOG_DIR="$out" python train_gpt.py > "$out/ours.out" 2>&1 || { status=$?; echo "ours exited $status"; }
  return $status
}

suite() {
  rm -f "$out/suite.txt"
  python tools/bench.py --suite --steps 5 --warmup 2 --eval-tokens 1048576 --json "$out/suite.json" 2>&1 | tee "$out/suite.txt"
  return "${PIPESTATUS[0]}"
}

export -f correctness reference suite
if want correctness || want reference; then
  start=$SECONDS
  corpus > "$out/corpus.out" 2>&1 || { echo "making the synthetic corpus failed:"; tail -n 5 "$out/corpus.out"; }
  echo "== corpus: $((SECONDS - start))s"
fi
want correctness && timed correctness 300
want reference && timed reference 300
want suite && timed suite 300

echo
echo "=================== summary ==================="
cat "$out/machine.txt"
failed=0
for name in correctness reference suite; do
  [ -n "${rc[$name]+x}" ] || continue
  echo "part $name: exit ${rc[$name]}, ${took[$name]}s"
  [ "${rc[$name]}" = 0 ] || failed=1
done
if [ -n "${rc[correctness]+x}" ] && [ -f "$out/gpu_correctness.out" ]; then
  echo "== correctness (goals: within 4 min; round trip within 0.01 bpb of the unquantized model; every audit passed;"
  echo "   no eager fallback)"
  grep -E "^(final_|audit |compile:|WARNING|total_eval_time|Total submission|stopping_early|step:[0-9]+/[0-9]+ train_loss|peak memory|calibration:|quant:auto)" \
    "$out/gpu_correctness.out" | tail -n 30
  grep -E "Traceback|Error|error:" "$out/gpu_correctness.out" | tail -n 5
  echo "graph break / recompile log lines: $(grep -c -E 'Graph break|Recompiling' "$out/gpu_correctness.out")"
fi
if [ -n "${rc[reference]+x}" ] && { [ -f "$out/ours.out" ] || [ -f "$out/reference.out" ]; }; then
  echo "== throughput, baseline shape (goal: >= 1.3x the reference's tokens/s, MFU >= 45%)"
  python - "$out/reference.out" "$out/ours.out" <<'PY'
import os, re, sys
sys.path.insert(0, ".")
sys.path.insert(0, "tools")
import bench
import train_gpt
cfg, _ = train_gpt.load_config({})
model = train_gpt.build_model(cfg.model, train_gpt.torch.device("meta"))
peak, source = bench.peak_tflops() if bench.torch.cuda.is_available() else (float("nan"), "no GPU")
avg = {}
for name, path in zip(("reference", "ours"), sys.argv[1:]):
    text = open(path).read() if os.path.exists(path) else ""
    found = re.findall(r"^step:50/50 .*step_avg:([0-9.]+)ms", text, re.M)
    if not found:
        print(f"{name}: no step:50/50 line in {path}; its last lines:")
        print("\n".join(text.splitlines()[-5:]))
        continue
    avg[name] = float(found[-1])
    tokens_per_s = cfg.train_batch_tokens / (avg[name] / 1000)
    print(f"{name:<10} step_avg {avg[name]:9.2f} ms  {tokens_per_s:10.0f} tokens/s  "
          f"MFU {100 * bench.mfu(cfg, model, tokens_per_s, peak):5.1f}%")
print(f"MFU is against {peak:g} TFLOP/s, {source}")
if len(avg) == 2:
    ratio = avg["reference"] / avg["ours"]
    print(f"ours / reference tokens/s: {ratio:.3f}x (goal >= 1.3x: {'met' if ratio >= 1.3 else 'NOT met'})")
PY
  grep -E "^(compile:|peak memory)" "$out/ours.out"
fi
if [ -n "${rc[suite]+x}" ] && [ -f "$out/suite.txt" ]; then
  echo "== suite"
  cat "$out/suite.txt"
fi
exit $failed

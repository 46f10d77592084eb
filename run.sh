#!/usr/bin/env bash
# The main job. With GPUs: the challenge's baseline on all of them, its shards fetched first if missing.
# Without: the embedded synthetic corpus (made if missing) and PRESET=cpu_embedded, or PRESET=cpu on a
# DATA_PATH of yours, at the model size that suits this CPU's speed.
# Any env var you set (see `python train_gpt.py --help`) passes through and wins over the preset.
set -euo pipefail
cd "$(dirname "$0")"

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ]; then
  # FINEWEB_HUB_DIR: a local mirror of the hub; FINEWEB_TRAIN_SHARDS: how many training shards.
  shards=./data/datasets/fineweb10B_sp1024/fineweb_train_*.bin
  if [ -z "${DATA_PATH:-}" ] && ! compgen -G "$shards" >/dev/null; then
    python data/fineweb.py --variant sp1024 --train-shards "${FINEWEB_TRAIN_SHARDS:-80}" \
      ${FINEWEB_HUB_DIR:+--hub-dir "$FINEWEB_HUB_DIR"}
  fi
  exec torchrun --standalone --nproc_per_node="$gpus" train_gpt.py
fi

if [ -z "${DATA_PATH:-}" ]; then
  export DATA_PATH=./data/synthetic/shards PRESET="${PRESET:-cpu_embedded}"
  if ! compgen -G "$DATA_PATH/*_train_*.bin" >/dev/null; then
    python data/synthetic.py --out ./data/synthetic/docs --docs 20000 --seed 1337
    python data/prepare.py --input ./data/synthetic/docs/synthetic.jsonl --out "$DATA_PATH" --vocab-size 1024 --val-docs 500
  fi
fi
export PRESET="${PRESET:-cpu}"
# What this machine can do. torch.compile on the CPU needs a C++ compiler; it costs ~40 s once (in
# the untimed warm-up steps) and buys ~1.35x the steps (docs/perf_notes.md 1). A CPU with native bf16
# dot products (AMX, AVX-512 BF16) multiplies bf16 matrices 7-10x faster than float32: bf16 as on
# CUDA (1.39-1.47x the steps, docs/perf_notes.md 7 and 12); elsewhere it is emulated, slower.
if command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1; then
  export COMPILE="${COMPILE:-1}" WARMUP_STEPS="${WARMUP_STEPS:-2}"
fi
if grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo 2>/dev/null; then
  export AUTOCAST="${AUTOCAST:-1}"
fi
# The model size and warm-down for this machine's speed, from a few untimed eager steps of each size (~10-30 s):
# a slower CPU trains a smaller model in the same budget (tools/cpu_size.py; a size you set is kept).
sizes=$(python tools/cpu_size.py)
eval "$sizes"
exec python train_gpt.py

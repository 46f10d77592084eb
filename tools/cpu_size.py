"""The CPU job's model size for this machine's speed: run.sh asks it before training, outside the timed budget.

    eval "$(python tools/cpu_size.py)"       # prints `export ...` lines: the size, the warm-down, RUN_ID
    python tools/cpu_size.py --size 3x160    # the given size with its warm-down fitted, for probes

With a fixed wall-clock budget the best model size depends on how many tokens the machine can train on in it
(the compute-optimal framing of docs/perf_notes.md 26): a CPU with a quarter of the throughput wants a smaller
model. This times a few eager steps of the sizes of LADDER, smallest first, under this process's settings (PRESET,
threads, AUTOCAST, the env vars of train_gpt.py), estimates the tokens each would train on in MAX_WALLCLOCK_SECONDS,
stops at the first with fewer than TOKENS_PER_PARAM a block parameter (the ratio where the fixed-budget probes found
the best size), and picks the size whose ratio is nearest it. Its warm-down is fitted to the last WARMDOWN_SHARE of
the steps the budget allows (WARMDOWN_ITERS counts steps, so a fixed count covers a slow machine's whole run). The
reasons go to stderr and into the run's log (logs/<RUN_ID>.txt, and its metrics stream as a "size" event); a
relaunch under the same RUN_ID (a resume) reuses the first launch's choice, which its checkpoints need.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402
import train_gpt  # noqa: E402  (bench put the repository on the path)

# Blocks x width, 4 query / 2 KV heads each, from the smallest block parameter count up.
LADDER = ((2, 96), (3, 96), (2, 128), (3, 128), (3, 160), (4, 192), (4, 256), (5, 320))
TOKENS_PER_PARAM = 8.0  # the fixed-budget probes' choice (docs/perf_notes.md 26)
# The warm-down's share of the steps (45%): its length matters little (docs/perf_notes.md 4: 40% to 80% of the steps
# within 0.0007 bpb), and a run 10% slower than measured still starts it after the early warm-down warning's mark.
WARMDOWN_SHARE = 0.9 * (1 - train_gpt.WARMDOWN_EARLY)
COMPILE_SPEEDUP = 1.35  # compiled steps per eager step of the CPU job (docs/perf_notes.md 1, 26)
SIZE_VARS = ("NUM_LAYERS", "MODEL_DIM", "NUM_HEADS", "NUM_KV_HEADS")


class SizeError(Exception):
    """Bad input: one line, exit 2."""


def size_env(size: tuple[int, int]) -> dict:
    layers, dim = size
    return {"NUM_LAYERS": str(layers), "MODEL_DIM": str(dim), "NUM_HEADS": "4", "NUM_KV_HEADS": "2"}


def parse_size(text: str) -> tuple[int, int]:
    layers, _, dim = text.partition("x")
    if not (layers.isdigit() and dim.isdigit() and int(layers) > 0 and int(dim) > 0 and int(dim) % 8 == 0):
        raise SizeError(f"--size {text!r}: expected BLOCKSxWIDTH with the width a multiple of 8, e.g. 3x160")
    return int(layers), int(dim)


def measure(env: dict, size: tuple[int, int] | None, steps: int) -> dict:
    """Eager tokens/s of `steps` training steps (after one untimed) at `size` (None: the env's own), and the size's
    block parameters."""
    cfg, _ = train_gpt.load_config({**env, **(size_env(size) if size else {}), "COMPILE": "0", "RUN_ID": "cpu_size"})
    rt = train_gpt.init_runtime(cfg)
    pieces = train_gpt.assemble(cfg, rt)
    params = list(pieces.model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        stream = bench.random_stream(cfg, Path(tmp))
        train_gpt.train_step(cfg, rt, pieces.model, params, pieces.optimizers, stream, 0, 1.0)
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            train_gpt.train_step(cfg, rt, pieces.model, params, pieces.optimizers, stream, step, 1.0)
        seconds = time.perf_counter() - t0
    return {"size": f"{cfg.num_layers}x{cfg.model_dim}", "eager_tokens_per_s": steps * cfg.train_batch_tokens / seconds,
            "block_params": sum(p.numel() for name, p in pieces.model.named_parameters() if name.startswith("blocks."))}


def plan(cfg, row: dict, compiled: bool) -> dict:
    """The tokens and steps `row`'s size would train in the budget, and the warm-down fitted to them."""
    tokens_per_s = row["eager_tokens_per_s"] * (COMPILE_SPEEDUP if compiled else 1.0)
    steps = min(cfg.iterations, cfg.max_wallclock_seconds * tokens_per_s / cfg.train_batch_tokens)
    tokens_per_param = steps * cfg.train_batch_tokens / row["block_params"]
    return {**row, "tokens_per_s": tokens_per_s, "steps": steps, "tokens_per_param": tokens_per_param,
            "warmdown_iters": max(1, round(WARMDOWN_SHARE * steps))}


def choose(rows: list[dict]) -> dict:
    return min(rows, key=lambda r: abs(math.log(r["tokens_per_param"] / TOKENS_PER_PARAM)))


def previous_choice(metrics: Path) -> dict | None:
    """The choice a first launch under this RUN_ID logged, if any."""
    if not metrics.exists():
        return None
    try:
        events = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise SizeError(f"{metrics}: cannot read the first launch's choice ({e})") from None
    return next((e for e in events if isinstance(e, dict) and e.get("event") == "size"), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, help="measure this size (BLOCKSxWIDTH) instead of choosing one")
    parser.add_argument("--steps", type=int, default=2, help="timed eager steps a size (after one untimed)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise SizeError(f"--steps {args.steps}: must be at least 1")
    env = {k: v for k, v in os.environ.items() if k in train_gpt.CONFIG_FIELDS or k == "PRESET"}
    cfg, _ = train_gpt.load_config(env)
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the exports alone: run.sh evaluates it
        exports = choice(cfg, env, args)
    if exports:
        print("export " + " ".join(f"{k}={v}" for k, v in {**exports, "RUN_ID": cfg.run_id}.items()))
    return 0


def choice(cfg, env: dict, args) -> dict:
    """The settings to export (a first launch's, or measured), logged with why."""
    users = [name for name in SIZE_VARS if name in env] if args.size is None else []
    if not cfg.max_wallclock_seconds or (users and "WARMDOWN_ITERS" in env):
        why = "no wall-clock budget (MAX_WALLCLOCK_SECONDS=0)" if not cfg.max_wallclock_seconds else \
            "the size and WARMDOWN_ITERS are set"
        if args.size:
            raise SizeError(f"--size {args.size[0]}x{args.size[1]}: {why}: there is nothing to fit")
        print(f"cpu_size: {why}: nothing to choose")
        return {}
    first = previous_choice(Path(cfg.log_dir) / f"{cfg.run_id}.jsonl")
    log = train_gpt.Logger(Path(cfg.log_dir) / f"{cfg.run_id}.txt")
    if first is not None:
        log(f"cpu_size: {first['exports']} as the first launch of RUN_ID={cfg.run_id} chose")
        return first["exports"]
    compiled = env.get("COMPILE") == "1"
    rows, t0 = [], time.perf_counter()
    for size in [None] if users else [args.size] if args.size else LADDER:
        rows.append(plan(cfg, measure(env, size, args.steps), compiled))
        if rows[-1]["tokens_per_param"] < TOKENS_PER_PARAM:  # a larger size trains on fewer tokens a parameter still
            break
    chosen = choose(rows)
    exports = {} if users else size_env(parse_size(chosen["size"]))
    if "WARMDOWN_ITERS" not in env:
        exports["WARMDOWN_ITERS"] = str(chosen["warmdown_iters"])
    threads, bf16 = torch.get_num_threads(), env.get("AUTOCAST") == "1"
    speeds = ", ".join(f"{r['size']} {r['tokens_per_s']:,.0f} tok/s ({r['tokens_per_param']:.1f}/param)"
                       for r in rows)
    seconds = time.perf_counter() - t0
    log(f"cpu_size: {threads} thread(s), {'bf16' if bf16 else 'float32'}, "
        f"{'compiled (x' + str(COMPILE_SPEEDUP) + ' the eager speed)' if compiled else 'eager'}: {speeds}; "
        f"measured in {seconds:.0f} s")
    why = f"{', '.join(users)} set" if users else "given" if args.size else \
        f"the nearest to the probes' best, {TOKENS_PER_PARAM:g}"
    log.event("size", f"cpu_size: {chosen['size']} ({why}): ~{chosen['steps']:.0f} steps of {cfg.train_batch_tokens:,} "
                      f"tokens in {cfg.max_wallclock_seconds:g} s, {chosen['tokens_per_param']:.1f} tokens a block "
                      f"parameter; {' '.join(f'{k}={v}' for k, v in exports.items())}",
              **chosen, threads=threads, bf16=bf16, compiled=compiled, exports=exports, seconds=seconds)
    return exports


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (SizeError, train_gpt.ConfigError, train_gpt.InputError) as e:
        print(f"cpu_size.py: {e}", file=sys.stderr)
        sys.exit(2)

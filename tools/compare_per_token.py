"""Compare two runs token by token, as MoE-vs-dense studies do.

    python tools/compare_per_token.py RUN_A RUN_B [--png PLOT] [--json OUT]

RUN_A and RUN_B are the folders train_gpt.py writes with PER_TOKEN_LOSS_EVERY=N
(LOG_DIR/<RUN_ID>_per_token/), or a LOG_DIR/<RUN_ID> prefix of them. For every save the two runs
share (step_000200, ..., final) it prints the mean loss of each and r², the squared Pearson
correlation of their per-token validation losses: how much of one run's difficulty per token the
other shares. A PNG of r² by step is drawn when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


class UsageError(Exception):
    pass


def run_folder(arg: str) -> Path:
    path = Path(arg)
    for candidate in (path, Path(f"{arg}_per_token")):
        if candidate.is_dir() and any(candidate.glob("*.npz")):
            return candidate
    raise UsageError(f"{arg}: no per-token saves (*.npz) there or in {arg}_per_token")


def load(path: Path) -> tuple[int, np.ndarray]:
    try:
        with np.load(path) as saved:
            return int(saved["step"]), saved["loss"].astype(np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: not a per-token save ({e})") from None


def r_squared(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) ** 2 / denom ** 2 if denom > 0 else float("nan")


def compare(folder_a: Path, folder_b: Path) -> list[dict]:
    names = sorted({p.stem for p in folder_a.glob("*.npz")} & {p.stem for p in folder_b.glob("*.npz")},
                   key=lambda n: (n == "final", n))
    if not names:
        raise UsageError(f"{folder_a} and {folder_b} share no saves: were they run with the same PER_TOKEN_LOSS_EVERY?")
    rows = []
    for name in names:
        step_a, a = load(folder_a / f"{name}.npz")
        step_b, b = load(folder_b / f"{name}.npz")
        if len(a) != len(b):
            raise UsageError(f"{name}: {len(a)} tokens in {folder_a} but {len(b)} in {folder_b}: "
                             f"not the same validation set")
        rows.append({"save": name, "step_a": step_a, "step_b": step_b, "tokens": len(a), "mean_a": float(a.mean()),
                     "mean_b": float(b.mean()), "r2": r_squared(a, b)})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'save':<12} {'step_a':>7} {'step_b':>7} {'tokens':>9} {'mean_a':>8} {'mean_b':>8} {'r2':>7}"]
    for r in rows:
        lines.append(f"{r['save']:<12} {r['step_a']:>7} {r['step_b']:>7} {r['tokens']:>9} {r['mean_a']:>8.4f} "
                     f"{r['mean_b']:>8.4f} {r['r2']:>7.4f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, labels: tuple[str, str]) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step_a"] for r in rows], [r["r2"] for r in rows], marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("r² of per-token losses")
    ax.set_title(f"{labels[0]} vs {labels[1]}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return True


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--png", type=Path, help="also draw r² by step here (needs matplotlib)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = compare(run_folder(args.run_a), run_folder(args.run_b))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(rows, indent=2))
        tmp.replace(args.json)
    if args.png:
        if plot(rows, args.png, (args.run_a, args.run_b)):
            print(f"plot: {args.png}")
        else:
            print("matplotlib is not installed: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

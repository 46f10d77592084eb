"""Draw PNG plots of training runs from their metrics streams.

    python tools/plot.py RUN... --out DIR

Each RUN is a metrics stream, LOG_DIR/<RUN_ID>.jsonl, or the LOG_DIR/<RUN_ID> of it (bare or with any of
the run's extensions: .jsonl, .json, .txt, .ptz); runs are labelled by their RUN_ID. A resumed run appends to
its stream: what the resumed part logs replaces what the earlier part logged from that step on. Into DIR
(made if missing), each 1000 x 600 pixels:

    loss_step.png     train (solid) and validation (dashed) loss against step, every run overlaid, with each
                      run's depth phase changes (dotted) and warm-down start (dash-dot) marked
    loss_time.png     the same against training time in seconds
    bpb_methods.png   val_bpb of every evaluation method (prequant, roundtrip, sliding, hedge, ttt), bars per run
    moe_load.png      the MoE runs' Gini and entropy (bits) of each MoE layer's expert load over training
    moe_share.png     the MoE runs' share of each expert (layers x experts) at the last training step measured
    per_token_r2.png  with exactly two runs that saved per-token losses (PER_TOKEN_LOSS_EVERY): the second's
                      against the first's at their last shared save, with r² (tools/compare_per_token.py)

The plots a run cannot have (no MoE run, no evaluation yet, not two runs with per-token saves) are skipped
with a note. A missing run, a file that is not a metrics stream, or a run without training steps: one line,
exit 2, and nothing written; so too when a PNG cannot be written (each is written to a temporary name and
renamed, so none is ever half-written).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from compare_per_token import UsageError, compare, load, run_folder  # noqa: E402

SIZE_INCHES = (10, 6)
DPI = 100
PIXELS = (SIZE_INCHES[0] * DPI, SIZE_INCHES[1] * DPI)
PLOTS = ("loss_step.png", "loss_time.png", "bpb_methods.png", "moe_load.png", "moe_share.png", "per_token_r2.png")
RUN_EXTENSIONS = (".jsonl", ".json", ".txt", ".ptz")
EVAL_ORDER = ("prequant", "roundtrip", "sliding", "hedge", "ttt")
# Above this many cells a heatmap's numbers no longer fit in them.
ANNOTATED_CELLS_MAX = 128
RUN_LINESTYLES = ("-", "--", ":", "-.")
PHASE_LINESTYLE, WARMDOWN_LINESTYLE = ":", "-."


@dataclass
class Run:
    label: str
    stream: Path
    events: list[dict]  # the run's history: events with a step, in the order they happened
    evals: dict[str, dict]  # method -> its eval event


class Marker(NamedTuple):
    what: str
    step: int
    seconds: float


class LoadBalance(NamedTuple):
    steps: list[int]
    layers: list[int]
    gini: np.ndarray  # steps x layers
    entropy: np.ndarray  # steps x layers, bits
    experts: int


# ----------------------------------------------------------------------------------------------
# Reading runs
# ----------------------------------------------------------------------------------------------

def stream_path(arg: str) -> Path:
    base = next((arg[:-len(ext)] for ext in RUN_EXTENSIONS if arg.endswith(ext)), arg)
    path = Path(f"{base}.jsonl")
    if not path.is_file():
        raise UsageError(f"{arg}: no metrics stream {path}")
    return path


def read_events(path: Path) -> list[dict]:
    events = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if not (isinstance(event, dict) and isinstance(event.get("event"), str)):
                raise UsageError(f"{path}:{number}: not a metrics stream (each line a JSON object with an event)")
            events.append(event)
    return events


def position(event: dict) -> tuple[int, int]:
    """Where in the run an event with a step was logged: a train event and its moe statistics end their step,
    the rest are logged at the start of the next (depth phase, validation, warm-down), after them."""
    return event["step"], 0 if event["event"] == "train" or event.get("mode") == "train" else 1


def history(events: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """The events with a step, in the order they happened, and the last eval event of each method.

    Within one run no event is logged before one already read, so one that is begins a resumed part (the resumed
    event itself, at its checkpoint's step, comes first): it replaces all that the earlier part logged after it (a
    wall-clock depth phase or warm-down may fall at another step the second time), and of two events of a kind at
    the same place the later wins."""
    stepped, evals = [], {}
    for event in events:
        if event["event"] == "eval":
            evals[event["method"]] = event
        elif isinstance(event.get("step"), int):
            while stepped and position(stepped[-1]) > position(event):
                stepped.pop()
            kind, at = (event["event"], event.get("mode")), len(stepped)
            while at and position(stepped[at - 1]) == position(event):
                at -= 1
                if (stepped[at]["event"], stepped[at].get("mode")) == kind:
                    del stepped[at]
                    break
            stepped.append(event)
    return stepped, evals


def labels_of(paths: list[Path]) -> list[str]:
    """RUN_IDs, with the folder in front where two runs share one."""
    stems = [p.stem for p in paths]
    return [f"{p.parent.name}/{p.stem}" if stems.count(p.stem) > 1 else p.stem for p in paths]


def load_runs(args: list[str]) -> list[Run]:
    paths = [stream_path(arg) for arg in args]
    runs = []
    for label, path in zip(labels_of(paths), paths):
        events, evals = history(read_events(path))
        run = Run(label, path, events, evals)
        if not of(run, "train"):
            raise UsageError(f"{path}: no train events: the run logged no training step yet")
        runs.append(run)
    return runs


# ----------------------------------------------------------------------------------------------
# What each plot draws
# ----------------------------------------------------------------------------------------------

def of(run: Run, kind: str, mode: str | None = None) -> list[dict]:
    return [e for e in run.events if e["event"] == kind and e.get("mode") == mode]


def series(run: Run, kind: str, field: str, axis: str) -> tuple[list[float], list[float]]:
    """(step, or training seconds) and the field of each train or val event."""
    events = of(run, kind)
    xs = [e["step"] if axis == "step" else e["train_time_ms"] / 1000 for e in events]
    return xs, [e[field] for e in events]


def seconds_at(run: Run, step: int) -> float:
    """The training time at a step, from the train events around it (they may be logged every few steps)."""
    train = of(run, "train")
    return float(np.interp(step, [0] + [e["step"] for e in train], [0.0] + [e["train_time_ms"] / 1000 for e in train]))


def markers(run: Run) -> list[Marker]:
    """Each depth phase change after the start, then the warm-down's start. A run resumed inside the warm-down
    logs it again at its first step: the earliest is the start."""
    found = [Marker(f"repeats {e['repeats']}", e["step"], seconds_at(run, e["step"]))
             for e in of(run, "depth_phase") if e["step"] > 0]
    warmdowns = of(run, "warmdown")
    if warmdowns:
        found.append(Marker("warm-down", warmdowns[0]["step"], warmdowns[0]["train_time_ms"] / 1000))
    return found


def in_eval_order(methods: set[str]) -> list[str]:
    """The known methods in the order a run evaluates them, then any other."""
    return [m for m in EVAL_ORDER if m in methods] + sorted(methods - set(EVAL_ORDER))


def eval_bpb(run: Run) -> dict[str, float]:
    return {method: run.evals[method]["val_bpb"] for method in in_eval_order(set(run.evals))}


def load_balance(run: Run) -> LoadBalance | None:
    events = of(run, "moe", "train")
    if not events:
        return None
    return LoadBalance([e["step"] for e in events], events[-1]["layers"], np.array([e["gini"] for e in events]),
                   np.array([e["entropy"] for e in events]), len(events[-1]["share"][0]))


def final_shares(run: Run) -> tuple[int, list[int], np.ndarray]:
    """The step, layers and share of each expert (layers x experts) of the run's last train-mode moe event."""
    last = of(run, "moe", "train")[-1]
    return last["step"], last["layers"], np.array(last["share"])


def per_token_pair(runs: list[Run]) -> tuple[dict, np.ndarray, np.ndarray]:
    """compare_per_token's row for the last save both runs share (`final` when both finished) and each run's
    per-token losses at it."""
    if len(runs) != 2:
        raise UsageError(f"it compares exactly two runs, not {len(runs)}")
    folders = [run_folder(str(run.stream.with_suffix(""))) for run in runs]
    row = compare(*folders)[-1]
    return row, load(folders[0] / f"{row['save']}.npz")[1], load(folders[1] / f"{row['save']}.npz")[1]


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

def figure(rows: int = 1, cols: int = 1, **kwargs) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(rows, cols, figsize=SIZE_INCHES, dpi=DPI, layout="constrained", squeeze=False,
                             **kwargs)
    return fig, axes


def color(index: int) -> str:
    return f"C{index % 10}"


def legend_outside(ax, **kwargs):
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small", **kwargs)


def draw_loss(runs: list[Run], axis: str) -> Figure:
    fig, axes = figure()
    ax = axes[0, 0]
    for index, run in enumerate(runs):
        ax.plot(*series(run, "train", "train_loss", axis), color=color(index), linewidth=1, label=f"{run.label} train")
        val_x, val_y = series(run, "val", "val_loss", axis)
        if val_x:
            ax.plot(val_x, val_y, color=color(index), linestyle="--", marker="o", markersize=4,
                    label=f"{run.label} val")
        for marker in markers(run):
            x = marker.step if axis == "step" else marker.seconds
            where = f"step {marker.step}" if axis == "step" else f"{marker.seconds:.1f} s"
            ax.axvline(x, color=color(index), alpha=0.8, linewidth=1.5,
                       linestyle=WARMDOWN_LINESTYLE if marker.what == "warm-down" else PHASE_LINESTYLE,
                       label=f"{run.label} {marker.what} at {where}")
    ax.set_xlabel("step" if axis == "step" else "training time (s)")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"loss against {'step' if axis == 'step' else 'training time'}")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    return fig


def draw_bpb(runs: list[Run]) -> Figure:
    fig, axes = figure()
    ax = axes[0, 0]
    bpbs = [eval_bpb(run) for run in runs]
    methods = in_eval_order({m for bpb in bpbs for m in bpb})
    width = 0.8 / len(runs)
    for index, (run, bpb) in enumerate(zip(runs, bpbs)):
        places = [i + (index - (len(runs) - 1) / 2) * width for i, m in enumerate(methods) if m in bpb]
        bars = ax.bar(places, [bpb[m] for m in methods if m in bpb], width, color=color(index), label=run.label)
        ax.bar_label(bars, fmt="%.4f", rotation=90, padding=3, fontsize="small")
    values = [v for b in bpbs for v in b.values()]
    # Methods differ in the third decimal: an axis from zero would hide that, so it spans the values.
    span = max(max(values) - min(values), 0.01 * max(values))
    ax.set_ylim(min(values) - span, max(values) + span)
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("val_bpb")
    ax.set_title("bits per byte of each evaluation method")
    ax.grid(axis="y", alpha=0.3)
    legend_outside(ax)
    return fig


def draw_moe_load(runs: list[Run]) -> Figure:
    fig, axes = figure(2, 1, sharex=True)
    gini_ax, entropy_ax = axes[0, 0], axes[1, 0]
    balances = [load_balance(run) for run in runs]
    all_layers = sorted({layer for balance in balances for layer in balance.layers})
    layer_colors = {layer: color(i) for i, layer in enumerate(all_layers)}
    for index, balance in enumerate(balances):
        style = RUN_LINESTYLES[index % len(RUN_LINESTYLES)]
        for column, layer in enumerate(balance.layers):
            gini_ax.plot(balance.steps, balance.gini[:, column], color=layer_colors[layer], linestyle=style)
            entropy_ax.plot(balance.steps, balance.entropy[:, column], color=layer_colors[layer], linestyle=style)
    for experts in sorted({balance.experts for balance in balances}):
        entropy_ax.axhline(np.log2(experts), color="grey", linewidth=1.5, linestyle="--")
    gini_ax.set_ylabel("Gini of expert load")
    entropy_ax.set_ylabel("entropy (bits)")
    entropy_ax.set_xlabel("step")
    gini_ax.set_title("MoE load balance per layer")
    handles = [Line2D([], [], color=c, label=f"layer {layer}") for layer, c in layer_colors.items()]
    handles.append(Line2D([], [], color="grey", linestyle="--", label="entropy of a uniform load"))
    handles += [Line2D([], [], color="black", linestyle=RUN_LINESTYLES[i % len(RUN_LINESTYLES)], label=run.label)
                for i, run in enumerate(runs)]
    for ax in (gini_ax, entropy_ax):
        ax.grid(alpha=0.3)
    legend_outside(gini_ax, handles=handles)
    return fig


def draw_moe_share(runs: list[Run]) -> Figure:
    fig, axes = figure(1, len(runs))
    shares = [final_shares(run) for run in runs]
    top = max(float(share.max()) for _, _, share in shares)
    for ax, run, (step, layers, share) in zip(axes[0], runs, shares):
        image = ax.imshow(share, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_xticks(range(share.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"{run.label} at step {step}")
        if share.size <= ANNOTATED_CELLS_MAX:
            for (row, col), value in np.ndenumerate(share):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize="small",
                        color="black" if value > top / 2 else "white")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of the routed slots")
    return fig


def draw_per_token(runs: list[Run], row: dict, losses_a: np.ndarray, losses_b: np.ndarray) -> Figure:
    fig, axes = figure()
    ax = axes[0, 0]
    # Per-token losses are far too many to scatter: a hexbin of counts on a log scale.
    cells = ax.hexbin(losses_a, losses_b, gridsize=60, bins="log", mincnt=1, cmap="viridis")
    low, high = min(losses_a.min(), losses_b.min()), max(losses_a.max(), losses_b.max())
    ax.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--", label="equal loss")
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"{runs[0].label}: loss per token (nats)")
    ax.set_ylabel(f"{runs[1].label}: loss per token (nats)")
    ax.set_title(f"per-token losses at {row['save']} ({row['tokens']:,} tokens): r² = {row['r2']:.4f}")
    ax.legend(loc="upper left", fontsize="small")
    fig.colorbar(cells, ax=ax, label="tokens")
    return fig


def drawings(runs: list[Run]) -> tuple[dict[str, Figure], list[str]]:
    """The figure of every plot the runs have, by file name, and a note for each that is skipped."""
    figures = {"loss_step.png": draw_loss(runs, "step"), "loss_time.png": draw_loss(runs, "seconds")}
    notes = []
    evaluated = [run for run in runs if run.evals]
    if evaluated:
        figures["bpb_methods.png"] = draw_bpb(evaluated)
    else:
        notes.append("bpb_methods.png: no run has eval events (not evaluated yet)")
    moe_runs = [run for run in runs if of(run, "moe", "train")]
    if moe_runs:
        figures["moe_load.png"], figures["moe_share.png"] = draw_moe_load(moe_runs), draw_moe_share(moe_runs)
    else:
        notes.append("moe_load.png, moe_share.png: no run has train-mode moe events")
    try:
        figures["per_token_r2.png"] = draw_per_token(runs, *per_token_pair(runs))
    except UsageError as e:
        notes.append(f"per_token_r2.png: {e}")
    return figures, notes


def save(fig: Figure, path: Path):
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        tmp.replace(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="LOG_DIR/<RUN_ID> or its .jsonl")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the folder for the PNGs (made if missing)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out}: not a folder")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    figures, notes = drawings(runs)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, fig in figures.items():
            save(fig, args.out / name)
            print(f"plot: {args.out / name}")
    except OSError as e:
        print(f"error: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"skipped {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

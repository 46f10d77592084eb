"""tools/plot.py: each plot's data from real runs' metrics streams, the figures drawn from it, the PNGs'
size and content, a resumed run's history, and bad input."""

import errno
import json
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from matplotlib.figure import Figure

import plot
from conftest import ROOT, TINY_ENV, run_trainer
from plot import Marker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_ENVS = {
    "dense": {"NUM_REPEATS": "2", "DEPTH_SCHEDULE": "1@0,2@0.5"},
    "moe": {"MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2"},
}


@pytest.fixture(scope="module")
def logs(tmp_path_factory, data_dir, tokenizer_path):
    """A dense run with a depth schedule and a MoE run, both evaluated with sliding windows and saving
    per-token losses; 8 steps, the warm-down from step 7."""
    logs = tmp_path_factory.mktemp("plot") / "logs"
    common = {**TINY_ENV, "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tokenizer_path), "LOG_DIR": str(logs),
              "ITERATIONS": "8", "VAL_LOSS_EVERY": "2", "PER_TOKEN_LOSS_EVERY": "4", "EVAL_STRIDE": "32"}
    with ThreadPoolExecutor(len(RUN_ENVS)) as pool:
        outs = list(pool.map(lambda run: run_trainer({**common, **RUN_ENVS[run], "RUN_ID": run}, ROOT), RUN_ENVS))
    for out in outs:
        assert out.returncode == 0, out.stderr[-2000:]
    return logs


def raw(logs, run_id: str, kind: str, mode: str | None = None) -> list[dict]:
    """The stream's events of a kind, read here without the tool."""
    events = [json.loads(line) for line in (logs / f"{run_id}.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == kind and e.get("mode") == mode]


def png_pixels(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_every_plot_is_a_png_of_the_fixed_size_with_coloured_content(logs, tmp_path):
    out_dir = tmp_path / "made" / "plots"
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), str(logs / "dense"),
                           str(logs / "moe.jsonl"), "--out", str(out_dir)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"plot: {out_dir / name}" for name in plot.PLOTS]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(plot.PLOTS)  # no temporary file left
    assert all(name in plot.__doc__ for name in plot.PLOTS)
    for name in plot.PLOTS:
        assert png_pixels(out_dir / name) == plot.PIXELS
        rgb = matplotlib.image.imread(out_dir / name)[..., :3]
        assert rgb.shape[:2] == plot.PIXELS[::-1]
        # Text and axes alone are grey: the data is what is coloured.
        coloured = int((rgb.max(axis=-1) - rgb.min(axis=-1) > 0.15).sum())
        colours = len(np.unique((np.round(rgb * 255).astype(np.int64) * [1 << 16, 1 << 8, 1]).sum(axis=-1)))
        assert colours > 50 and coloured > 2000, f"{name} looks blank: {colours} colours, {coloured} coloured pixels"


def test_the_loss_plots_overlay_every_run_with_its_series_and_markers(logs):
    runs = plot.load_runs([str(logs / "dense"), str(logs / "moe")])
    for axis, x_of in (("step", lambda e: e["step"]), ("seconds", lambda e: e["train_time_ms"] / 1000)):
        lines = {line.get_label(): line for line in plot.draw_loss(runs, axis).axes[0].get_lines()}
        expected = set()
        for run_id in RUN_ENVS:
            for kind, field in (("train", "train_loss"), ("val", "val_loss")):
                line, events = lines[f"{run_id} {kind}"], raw(logs, run_id, kind)
                assert list(line.get_xdata()) == [x_of(e) for e in events]
                assert list(line.get_ydata()) == [e[field] for e in events]
                expected.add(f"{run_id} {kind}")
            for marker in plot.markers(next(r for r in runs if r.label == run_id)):
                where = f"step {marker.step}" if axis == "step" else f"{marker.seconds:.1f} s"
                line = lines[f"{run_id} {marker.what} at {where}"]
                assert list(line.get_xdata()) == [marker.step if axis == "step" else marker.seconds] * 2
                expected.add(line.get_label())
        assert set(lines) == expected


def test_depth_phase_and_warmdown_markers_are_at_the_events_steps_and_times(logs):
    dense, moe = plot.load_runs([str(logs / "dense"), str(logs / "moe")])
    phase, = [e for e in raw(logs, "dense", "depth_phase") if e["step"] > 0]
    train_ms = {e["step"]: e["train_time_ms"] for e in raw(logs, "dense", "train")}
    warmdown, = raw(logs, "dense", "warmdown")
    assert (phase["step"], warmdown["step"]) == (4, 7)  # DEPTH_SCHEDULE 2@0.5 and WARMDOWN_ITERS=2 of 8
    assert plot.markers(dense) == [Marker("repeats 2", 4, train_ms[4] / 1000),
                                   Marker("warm-down", 7, warmdown["train_time_ms"] / 1000)]
    assert [m.what for m in plot.markers(moe)] == ["warm-down"]


def write_stream(path, events: list[dict]):
    path.write_text("".join(json.dumps({"time": 0.0, **event}) + "\n" for event in events))


def train(step: int, part: int) -> dict:
    """A train event whose loss and time say which part of the run logged it."""
    return {"event": "train", "step": step, "train_loss": 10.0 * part + step, "train_time_ms": 100.0 * step + part}


def test_a_resumed_run_keeps_what_its_resumed_part_logged(tmp_path):
    first = [{"event": "depth_phase", "repeats": 1, "step": 0, "frac": 0.0},
             {"event": "val", "step": 0, "val_loss": 9.0, "val_bpb": 9.0, "train_time_ms": 0.0},
             *[train(s, 1) for s in (1, 2, 3, 4)], {"event": "depth_phase", "repeats": 2, "step": 4, "frac": 0.5},
             train(5, 1), train(6, 1)]  # crashed after step 6
    # Resumed from step 3's checkpoint: under a wall clock the phase now falls at step 5, with the warm-down.
    second = [train(4, 2), train(5, 2), {"event": "depth_phase", "repeats": 2, "step": 5, "frac": 0.5},
              {"event": "warmdown", "step": 5, "train_time_ms": 520.0}, train(6, 2), train(7, 2)]
    # Resumed from step 6's, inside the warm-down, which it logs again; finishes and evaluates.
    third = [{"event": "warmdown", "step": 6, "train_time_ms": 630.0}, train(7, 3), train(8, 3),
             {"event": "val", "step": 8, "val_loss": 3.5, "val_bpb": 4.0, "train_time_ms": 803.0},
             {"event": "eval", "method": "roundtrip", "val_loss": 3.6, "val_bpb": 4.1}]
    # Resumed where it stopped and evaluated again.
    fourth = [{"event": "eval", "method": "roundtrip", "val_loss": 3.6, "val_bpb": 4.2}]
    write_stream(tmp_path / "r.jsonl", first + second + third + fourth)
    run, = plot.load_runs([str(tmp_path / "r")])
    assert plot.series(run, "train", "train_loss", "step") == ([1, 2, 3, 4, 5, 6, 7, 8],
                                                               [11, 12, 13, 24, 25, 26, 37, 38])
    assert plot.series(run, "val", "val_loss", "seconds") == ([0.0, 0.803], [9.0, 3.5])
    assert plot.markers(run) == [Marker("repeats 2", 5, 0.502), Marker("warm-down", 5, 0.52)]
    assert plot.eval_bpb(run) == {"roundtrip": 4.2}


def test_a_resumed_event_drops_what_followed_its_checkpoint_before_the_next_train_event(tmp_path):
    """Logging every 10 steps, resumed from step 3: the first part's wall-clock phase at step 4 must go, though the
    resumed part logs nothing before step 10 and its own phase at step 6."""
    first = [*[train(s, 1) for s in (1, 2, 3)], {"event": "depth_phase", "repeats": 2, "step": 4, "frac": 0.5},
             train(5, 1)]
    second = [{"event": "resumed", "step": 3, "train_time_ms": 300.0, "checkpoint": "c"},
              {"event": "depth_phase", "repeats": 2, "step": 6, "frac": 0.5}, train(10, 2)]
    write_stream(tmp_path / "r.jsonl", first + second)
    run, = plot.load_runs([str(tmp_path / "r")])
    assert plot.series(run, "train", "train_loss", "step") == ([1, 2, 3, 10], [11, 12, 13, 30])
    assert [(m.what, m.step) for m in plot.markers(run)] == [("repeats 2", 6)]


def test_the_bars_are_each_runs_bpb_per_evaluation_method(logs):
    runs = plot.load_runs([str(logs / "dense"), str(logs / "moe")])
    ax = plot.draw_bpb(runs).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["prequant", "roundtrip", "sliding"]
    assert [bars.get_label() for bars in ax.containers] == list(RUN_ENVS)
    for run, bars in zip(runs, ax.containers):
        bpb = {e["method"]: e["val_bpb"] for e in raw(logs, run.label, "eval")}
        assert plot.eval_bpb(run) == bpb and list(bpb) == ["prequant", "roundtrip", "sliding"]
        assert [bar.get_height() for bar in bars] == list(bpb.values())
    shown = {t.get_text() for t in ax.texts}
    assert all(f"{e['val_bpb']:.4f}" in shown for run_id in RUN_ENVS for e in raw(logs, run_id, "eval"))


def test_the_moe_plots_draw_each_layers_load_and_the_last_shares(logs):
    dense, moe = plot.load_runs([str(logs / "dense"), str(logs / "moe")])
    events = raw(logs, "moe", "moe", "train")
    assert plot.load_balance(dense) is None
    balance = plot.load_balance(moe)
    assert balance.steps == [e["step"] for e in events] == list(range(1, 9)) and balance.layers == [0, 1]
    gini_ax, entropy_ax = plot.draw_moe_load([moe]).axes[:2]
    for ax, field in ((gini_ax, "gini"), (entropy_ax, "entropy")):
        curves = [line for line in ax.get_lines() if len(line.get_xdata()) > 2]  # not the uniform reference
        assert [list(line.get_ydata()) for line in curves] == [[e[field][i] for e in events] for i in (0, 1)]
    assert list(entropy_ax.get_lines()[-1].get_ydata()) == [2.0, 2.0]  # log2 of 4 experts
    figures, notes = plot.drawings([dense, moe])
    images = [image for ax in figures["moe_share.png"].axes for image in ax.get_images()]
    assert len(images) == 1  # the dense run has no panel
    assert np.array_equal(images[0].get_array(), np.array(events[-1]["share"]))
    assert figures["moe_share.png"].axes[0].get_title() == "moe at step 8"


def test_the_per_token_plot_is_the_two_runs_final_losses_with_their_r2(logs):
    runs = plot.load_runs([str(logs / "dense"), str(logs / "moe")])
    row, dense_losses, moe_losses = plot.per_token_pair(runs)
    finals = [np.load(logs / f"{run_id}_per_token" / "final.npz")["loss"].astype(np.float64) for run_id in RUN_ENVS]
    assert row["save"] == "final"
    assert np.array_equal(dense_losses, finals[0]) and np.array_equal(moe_losses, finals[1])
    r2 = float(np.corrcoef(*finals)[0, 1] ** 2)
    assert row["r2"] == pytest.approx(r2, rel=1e-9) and 0.3 < r2 < 1
    ax = plot.draw_per_token(runs, row, dense_losses, moe_losses).axes[0]
    assert f"r² = {r2:.4f}" in ax.get_title() and f"{len(finals[0]):,} tokens" in ax.get_title()
    assert ax.get_xlabel().startswith("dense") and ax.get_ylabel().startswith("moe")
    assert ax.collections[0].get_array().sum() == len(finals[0])  # every token in some hexagon


def test_plots_the_runs_cannot_have_are_skipped_with_a_note(logs, tmp_path, capsys):
    assert plot.main([str(logs / "dense"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpb_methods.png", "loss_step.png", "loss_time.png"]
    out = capsys.readouterr().out
    assert "skipped moe_load.png, moe_share.png: no run has train-mode moe events" in out
    assert "skipped per_token_r2.png: it compares exactly two runs, not 1" in out


def test_a_run_is_named_by_its_stream_or_any_of_its_files(logs, tmp_path):
    for arg in ("dense", "dense.jsonl", "dense.json", "dense.txt", "dense.ptz"):
        assert plot.stream_path(str(logs / arg)) == logs / "dense.jsonl"
    (tmp_path / "a.b.jsonl").write_text((logs / "dense.jsonl").read_text())
    assert plot.stream_path(str(tmp_path / "a.b")) == tmp_path / "a.b.jsonl"
    other = tmp_path / "again"
    other.mkdir()
    (other / "dense.jsonl").write_text((logs / "dense.jsonl").read_text())
    assert [run.label for run in plot.load_runs([str(logs / "dense"), str(other / "dense"), str(logs / "moe")])] == [
        "logs/dense", "again/dense", "moe"]


def bad_input(logs, tmp_path, case: str) -> tuple[list[str], str]:
    """The arguments of a bad case (a good run first, so reading one run is not yet writing) and what its error
    must name."""
    bad = tmp_path / "bad.jsonl"
    if case == "missing":
        return [str(logs / "dense"), str(tmp_path / "nothing")], "nothing"
    if case == "text log":
        bad.write_text((logs / "dense.txt").read_text())
    elif case == "summary":
        bad.write_text((logs / "dense.json").read_text())
    elif case == "other JSON lines":
        bad.write_text('{"step": 1, "loss": 2.5}\n')
    elif case == "no train events":
        write_stream(bad, raw(logs, "dense", "eval"))
        return [str(logs / "dense"), str(bad)], "no train events"
    elif case == "out is a file":
        bad.write_text("")
        return [str(logs / "dense"), "--out", str(bad)], "not a folder"
    return [str(logs / "dense"), str(bad)], "bad.jsonl:1: not a metrics stream"


@pytest.mark.parametrize("case", ["missing", "text log", "summary", "other JSON lines", "no train events",
                                  "out is a file"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(logs, tmp_path, capsys, case):
    args, named = bad_input(logs, tmp_path, case)
    out_dir = tmp_path / "out"
    if "--out" not in args:
        args += ["--out", str(out_dir)]
    assert plot.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and named in captured.err
    assert captured.out == "" and not out_dir.exists()


def test_the_command_exits_2_on_a_missing_run(logs, tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "plot.py"), str(logs / "dense"),
                           str(tmp_path / "nothing"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nothing" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_png_that_cannot_be_written_is_one_line_exit_2_and_leaves_no_part(logs, tmp_path, monkeypatch, capsys):
    def full_disk(fig, path, **kwargs):
        Path(path).write_bytes(PNG_SIGNATURE)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    assert plot.main([str(logs / "dense"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and err.count("\n") == 1 and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []

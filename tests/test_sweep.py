"""tools/sweep.py: configurations x seeds, skipped when finished, resumed when interrupted, Ctrl-C, the table."""

import csv
import dataclasses
import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import sweep
import train_gpt
from conftest import ROOT, clean_env
from records.check import MIN_IMPROVEMENT, improvement_p_value

SWEEP = ROOT / "tools" / "sweep.py"
# A stand-in for train_gpt.py where only the sweep's own behaviour is under test: it notes its launch, sleeps a
# little, notes its end, and writes a summary whose metric comes from MATRIX_LR and SEED (its config left empty),
# or exits 3 when FAKE_FAIL names it.
FAKE_TRAINER = """
import json, os, sys, time
from pathlib import Path
run_id, logs = os.environ["RUN_ID"], Path(os.environ["LOG_DIR"])
with open(logs / "launches.jsonl", "a") as f:
    f.write(json.dumps({"run_id": run_id, "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": time.time(),
                        "resume": os.environ.get("RESUME_FROM")}) + "\\n")
time.sleep(0.4)
with open(logs / "launches.jsonl", "a") as f:
    f.write(json.dumps({"run_id": run_id, "end": time.time()}) + "\\n")
if os.environ.get("FAKE_FAIL") == run_id:
    print("error: diverged")
    sys.exit(3)
value = float(os.environ.get("MATRIX_LR", "0.04")) * 100 + int(os.environ["SEED"]) / 100
(logs / f"{run_id}.json").write_text(json.dumps({"config": {}, "roundtrip_val_bpb": value, "steps": 6,
                                                 "tokens_per_s": 1000.0, "bytes_total": 100}))
"""


@pytest.fixture
def process_env(monkeypatch):
    """The sweep called in this process sees no setting of a developer's shell, as clean_env() gives a child."""
    for name in train_gpt.CONFIG_FIELDS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch, process_env):
    script = tmp_path / "fake_train_gpt.py"
    script.write_text(FAKE_TRAINER)
    monkeypatch.setattr(sweep, "launcher", lambda nproc: [sys.executable, str(script)])
    return script


def error_of(capsys, args: list[str]) -> str:
    """Runs the sweep expecting bad input: exit 2 and one line on stderr, which is returned."""
    assert sweep.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def launches(folder: Path) -> list[dict]:
    """Each fake run's RUN_ID, GPUs, RESUME_FROM, start and end."""
    runs = {}
    for line in (folder / "logs" / "launches.jsonl").read_text().splitlines():
        noted = json.loads(line)
        runs.setdefault(noted["run_id"], {}).update(noted)
    return sorted(runs.values(), key=lambda run: run["start"])


# ----------------------------------------------------------------------------------------------
# Configurations and runs
# ----------------------------------------------------------------------------------------------

def test_the_grid_is_the_product_of_its_axes_each_point_named_by_its_settings():
    found = sweep.grid_configurations(["MATRIX_LR=0.02,0.04", "NUM_LAYERS=4,6"])
    assert [(c.name, c.env) for c in found] == [
        ("MATRIX_LR=0.02,NUM_LAYERS=4", {"MATRIX_LR": "0.02", "NUM_LAYERS": "4"}),
        ("MATRIX_LR=0.02,NUM_LAYERS=6", {"MATRIX_LR": "0.02", "NUM_LAYERS": "6"}),
        ("MATRIX_LR=0.04,NUM_LAYERS=4", {"MATRIX_LR": "0.04", "NUM_LAYERS": "4"}),
        ("MATRIX_LR=0.04,NUM_LAYERS=6", {"MATRIX_LR": "0.04", "NUM_LAYERS": "6"})]
    assert sweep.grid_configurations(["DATA_PATH=/d/x y"])[0].name == "DATA_PATH=_d_x_y"  # a plain file name


def test_named_configurations_then_the_grid_run_seed_by_seed_as_name_s_seed(tmp_path):
    configurations = sweep.configurations_of(["NUM_LAYERS=4"], ["lr2:MATRIX_LR=0.02 PRESET='cpu'", "base:"])
    assert [(c.name, c.env) for c in configurations] == [
        ("lr2", {"MATRIX_LR": "0.02", "PRESET": "cpu"}), ("base", {}), ("NUM_LAYERS=4", {"NUM_LAYERS": "4"})]
    runs = sweep.plan_runs(configurations, [1, 2], {"ITERATIONS": "5"}, tmp_path)
    assert [r.run_id for r in runs] == ["lr2_s1", "base_s1", "NUM_LAYERS=4_s1", "lr2_s2", "base_s2", "NUM_LAYERS=4_s2"]
    assert runs[3].env == {"ITERATIONS": "5", "MATRIX_LR": "0.02", "PRESET": "cpu", "SEED": "2", "RUN_ID": "lr2_s2",
                           "LOG_DIR": str(tmp_path), "CHECKPOINT_EVERY_SECONDS": "60"}
    by_steps = sweep.plan_runs(configurations, [1], {"CHECKPOINT_EVERY_STEPS": "100"}, tmp_path)
    assert all("CHECKPOINT_EVERY_SECONDS" not in r.env for r in by_steps)  # the user's checkpointing stands


def test_gpu_slots_give_each_run_at_a_time_its_own_devices():
    assert sweep.gpu_slots(None, 1, []) == [{}]
    assert sweep.gpu_slots(2, 1, ["4", "5", "6"]) == [{"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}]
    assert sweep.gpu_slots(4, 2, ["0", "1", "2", "3"]) == [{"CUDA_VISIBLE_DEVICES": "0,1"},
                                                          {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert sweep.launcher(2)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                     str(ROOT / "train_gpt.py")]


@pytest.mark.parametrize("args,says", [
    (["--grid", "MATRIX_LR"], "--grid 'MATRIX_LR': expected NAME=VALUE"),
    (["--grid", "MATRIX_LR=0.02,"], "without an empty value"),
    (["--grid", "MATRX_LR=0.02,0.04"], "MATRX_LR is not a setting of train_gpt.py; did you mean MATRIX_LR?"),
    (["--grid", "MATRIX_LR=fast"], "MATRIX_LR='fast': expected a number"),
    (["--grid", "SEED=1,2"], "SEED: the sweep sets it for each run (use --seeds)"),
    (["--grid", "MATRIX_LR=0.02", "--env", "MATRX_LR=0.03"],
     "env var MATRX_LR is not a setting of train_gpt.py; did you mean MATRIX_LR?"),
    (["--grid", "MATRIX_LR=0.02", "--env", "RUN_ID=x"], "the sweep sets RUN_ID for each run"),
    (["--config", "a:MATRIX_LR=0.02", "--config", "a:MATRIX_LR=0.04"], "configuration names used twice: a"),
    (["--config", "a b:MATRIX_LR=0.02"], "expected NAME:K=V"),
    (["--grid", "MATRIX_LR=0.02", "--baseline", "nope"], "--baseline nope: not a configuration of this call"),
    (["--grid", "MATRIX_LR=0.02", "--seeds", "1,x"], "--seeds '1,x': expected integers"),
    (["--grid", "MATRIX_LR=0.02", "--margin", "record", "--metric", "tokens_per_s"], "--margin record: needs"),
    (["--grid", "MATRIX_LR=0.02", "--gpus", "3", "--nproc-per-run", "2"], "--gpus 3: must be a positive multiple"),
    (["--grid", "MATRIX_LR=0.02", "--gpus", "1"], "--gpus 1: this machine has 0 CUDA device(s) visible"),
    (["--grid", "MATRIX_LR=0.02", "--bogus"], "unrecognized arguments: --bogus"),
    ([], "nothing to run"),
])
def test_bad_input_is_one_line_exit_2_and_runs_nothing(args, says, tmp_path, capsys, monkeypatch, process_env):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: [])
    assert says in error_of(capsys, ["--dir", str(tmp_path / "sw"), *args])
    assert not (tmp_path / "sw").exists()


# ----------------------------------------------------------------------------------------------
# What is done already
# ----------------------------------------------------------------------------------------------

def test_a_config_differs_in_what_changes_the_experiment_not_where_or_how_it_ran():
    cfg = json.loads(json.dumps(dataclasses.asdict(train_gpt.load_config({"RUN_ID": "a_s1", "SEED": "1"})[0])))
    assert sweep.config_differences(cfg, dict(cfg)) == []
    where = {"run_id": "b", "log_dir": "/elsewhere", "resume_from": "auto", "checkpoint_every_seconds": 60.0,
             "checkpoint_every_steps": 7, "dry_run": True, "compile": "0", "train_log_every": 3}
    assert sweep.config_differences(cfg, {**cfg, **where}) == []
    assert sweep.config_differences(cfg, {**cfg, "matrix_lr": 0.02}) == ["MATRIX_LR=0.04 there, 0.02 here"]
    assert sweep.config_differences(cfg, {**cfg, "data_path": "/other"}) == [
        f"DATA_PATH={cfg['data_path']!r} there, '/other' here"]
    model = {**cfg["model"], "num_layers": 3}
    assert sweep.config_differences(cfg, {**cfg, "num_layers": 3, "model": model}) == ["NUM_LAYERS=9 there, 3 here"]
    assert sweep.config_differences(cfg, {**cfg, "model": model})[0].startswith("MODEL={")  # derived only
    assert sweep.config_differences({k: v for k, v in cfg.items() if k != "seed"}, cfg) == [
        "SEED=(absent) there, 1 here"]
    by_epochs = {**cfg, "epochs": 2, "doc_mode": True}
    assert sweep.config_differences({**by_epochs, "iterations": 123}, by_epochs) == []  # the data set it


def finished_summary(folder: Path, run_id: str, seed: int, settings: dict, **figures) -> Path:
    """A summary as train_gpt.py writes one for the run the sweep plans (its config resolved as a run's)."""
    env = {**settings, "SEED": str(seed), "RUN_ID": run_id, "LOG_DIR": str(folder / "logs"),
           "CHECKPOINT_EVERY_SECONDS": "60"}
    config = dataclasses.asdict(train_gpt.load_config(env)[0])
    path = folder / "logs" / f"{run_id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "roundtrip_val_bpb": 1.25, "steps": 5, **figures}))
    return path


def test_finished_runs_are_skipped_interrupted_ones_resumed_and_one_made_otherwise_refused(tmp_path, capsys,
                                                                                          process_env):
    folder = tmp_path / "sw"
    args = ["--dir", str(folder), "--config", "c:MATRIX_LR=0.02", "--seeds", "1,2,3", "--dry-run"]
    summary = finished_summary(folder, "c_s1", 1, {"MATRIX_LR": "0.02"})
    (folder / "logs" / "c_s2_step0000003.ckpt").write_bytes(b"")
    assert sweep.main(args) == 0
    plan = capsys.readouterr().out
    assert "  done    c_s1: roundtrip_val_bpb 1.25000" in plan
    assert "  resume  c_s2 from step 3: SEED=2 RUN_ID=c_s2 RESUME_FROM=auto" in plan
    assert "  run     c_s3: SEED=3 RUN_ID=c_s3\n" in plan
    assert not (folder / "sweep.json").exists()  # a dry run writes nothing

    assert "--metric roundtrip_val_bpp: not in c_s1's summary, whose numeric keys are roundtrip_val_bpb, steps" in \
        error_of(capsys, args + ["--metric", "roundtrip_val_bpp"])

    config = json.loads(summary.read_text())
    summary.write_text(json.dumps({**config, "config": {**config["config"], "matrix_lr": 0.03}}))
    assert f"c_s1: its summary {summary} was made with other settings: MATRIX_LR=0.03 there, 0.02 here" in \
        error_of(capsys, args)


def test_a_sweeps_name_binds_its_configurations_and_fixed_settings(tmp_path, capsys, fake_trainer):
    folder = tmp_path / "sw"
    base = ["--dir", str(folder), "--env", "ITERATIONS=5"]
    assert sweep.main(base + ["--config", "a:MATRIX_LR=0.02"]) == 0
    finished_summary(folder, "a_s1337", 1337, {"ITERATIONS": "5", "MATRIX_LR": "0.02"})  # as train_gpt.py writes it
    assert "configuration a: MATRIX_LR=0.02 there, MATRIX_LR=0.03 here" in \
        error_of(capsys, base + ["--config", "a:MATRIX_LR=0.03"])
    assert "--env ITERATIONS: '5' there, '6' here" in \
        error_of(capsys, ["--dir", str(folder), "--env", "ITERATIONS=6", "--config", "a:MATRIX_LR=0.02"])
    # More configurations and seeds join it; the finished run is not run again.
    assert sweep.main(base + ["--config", "a:MATRIX_LR=0.02", "--config", "b:MATRIX_LR=0.03", "--seeds", "1337,1"]) == 0
    assert [r["run_id"] for r in launches(folder)] == ["a_s1337", "b_s1337", "a_s1", "b_s1"]
    assert "skip a_s1337: finished" in capsys.readouterr().out
    assert json.loads((folder / "sweep.json").read_text())["configurations"] == {"a": {"MATRIX_LR": "0.02"},
                                                                                "b": {"MATRIX_LR": "0.03"}}


def test_a_second_sweep_in_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys, fake_trainer):
    folder = tmp_path / "sw"
    (folder / "logs").mkdir(parents=True)
    with open(folder / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "another sweep is running there" in error_of(capsys, ["--dir", str(folder), "--config", "a:"])
    assert not (folder / "logs" / "launches.jsonl").exists()
    assert sweep.main(["--dir", str(folder), "--config", "a:"]) == 0  # once it is gone


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------

def test_with_gpus_runs_go_n_at_a_time_each_on_its_own_and_a_failure_is_reported_not_fatal(
        tmp_path, capsys, monkeypatch, fake_trainer):
    monkeypatch.setattr(sweep, "visible_gpus", lambda: ["0", "1"])
    folder = tmp_path / "sw"
    code = sweep.main(["--dir", str(folder), "--grid", "MATRIX_LR=0.02,0.04", "--seeds", "1,2,3", "--gpus", "2",
                       "--env", "FAKE_FAIL=MATRIX_LR=0.04_s2"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED MATRIX_LR=0.04_s2 (exit 3: diverged) after " in out and ": error: diverged (output: " in out
    started = launches(folder)
    assert len(started) == 6
    for run in started:  # while one ran, at most one other did, and on the other GPU
        others = [o for o in started if o is not run and o["start"] < run["end"] and run["start"] < o["end"]]
        assert len(others) <= 1 and all(o["gpus"] != run["gpus"] for o in others) and run["gpus"] in ("0", "1")
    assert started[1]["start"] < started[0]["end"]  # two at once from the start
    rows = list(csv.DictReader((folder / "table.csv").open()))
    assert [(r["n"], r["not_counted"]) for r in rows] == [("3", ""), ("2", "s2: exit 3: diverged")]


def test_a_second_ctrl_c_kills_runs_that_do_not_stop(tmp_path, monkeypatch):
    script = tmp_path / "stubborn.py"
    script.write_text("import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      "open(sys.argv[1], 'w').close()\ntime.sleep(30)\n")
    ready = tmp_path / "ready"
    monkeypatch.setattr(sweep, "launcher", lambda nproc: [sys.executable, str(script), str(ready)])
    runner = sweep.Runner([{}], 1, "roundtrip_val_bpb")

    def press_ctrl_c_twice():  # as the sweep's handler does with each: note it for the loop
        while not ready.exists():
            time.sleep(0.05)
        for _ in range(2):
            runner.signals.append(signal.SIGINT)
            time.sleep(0.5)

    threading.Thread(target=press_ctrl_c_twice, daemon=True).start()
    started = time.monotonic()
    runner.run_all([sweep.Run("c", seed, f"c_s{seed}", {"LOG_DIR": str(tmp_path)}) for seed in (1, 2)])
    assert time.monotonic() - started < 15
    assert runner.stopped == {"c_s1": "no checkpoint: it starts over, killed by SIGKILL"}
    assert [r.run_id for r in runner.not_started] == ["c_s2"]


def watch_until(proc: subprocess.Popen, condition, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended first:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def trains(jsonl: Path) -> bool:
    return jsonl.is_file() and any(json.loads(line)["event"] == "train"
                                   for line in jsonl.read_text().splitlines() if line.endswith("}"))


def test_ctrl_c_checkpoints_the_running_run_and_the_same_command_continues_and_tabulates(
        tiny_env, tmp_path, capsys, process_env):
    """2 configurations x 2 seeds, stopped by Ctrl-C in the second run; then the same command."""
    folder, logs = tmp_path / "sw", tmp_path / "sw" / "logs"
    # Training capped at 1.5 s on any machine: the signal, sent at the first step, finds the run training.
    settings = {**{k: v for k, v in tiny_env.items() if k not in ("LOG_DIR", "RUN_ID")}, "ITERATIONS": "100000",
                "MAX_WALLCLOCK_SECONDS": "1.5", "TRAIN_LOG_EVERY": "10"}
    args = ["--dir", str(folder), "--grid", "MATRIX_LR=0.02,0.04", "--seeds", "1,2",
            *(f"--env={k}={v}" for k, v in settings.items())]
    first = subprocess.Popen([sys.executable, str(SWEEP), *args], env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watch_until(first, lambda: trains(logs / "MATRIX_LR=0.04_s1.jsonl"))
    os.killpg(first.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to the sweep's whole process group
    printed = first.communicate(timeout=120)[0]
    assert first.returncode == 130, printed
    assert "stopped by Ctrl-C: MATRIX_LR=0.04_s1 (checkpoint at step " in printed
    assert "; 2 run(s) not started; the same command continues the sweep" in printed
    assert sorted(logs.glob("MATRIX_LR=0.04_s1_step*.ckpt")) and not (logs / "MATRIX_LR=0.04_s1.json").exists()
    stopped = (logs / "MATRIX_LR=0.04_s1.txt").read_text()
    assert "preempted: SIGTERM at step " in stopped and stopped.endswith("exit:5\n")  # SIGTERM, not the SIGINT
    finished = (logs / "MATRIX_LR=0.02_s1.json").stat().st_mtime_ns

    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "skip MATRIX_LR=0.02_s1: finished" in printed
    assert (logs / "MATRIX_LR=0.02_s1.json").stat().st_mtime_ns == finished
    assert "resumed: from " in (logs / "MATRIX_LR=0.04_s1.txt").read_text()

    metric = {(lr, seed): json.loads((logs / f"MATRIX_LR={lr}_s{seed}.json").read_text())["roundtrip_val_bpb"]
              for lr in ("0.02", "0.04") for seed in (1, 2)}
    rows = list(csv.DictReader((folder / "table.csv").open()))
    assert [(r["configuration"], r["n"]) for r in rows] == [("MATRIX_LR=0.02", "2"), ("MATRIX_LR=0.04", "2")]
    markdown = (folder / "table.md").read_text()
    for row, lr in zip(rows, ("0.02", "0.04")):
        values = [metric[lr, 1], metric[lr, 2]]
        assert float(row["mean"]) == pytest.approx(statistics.mean(values), rel=1e-12)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), rel=1e-9)
        assert f"| {row['configuration']} | 2 | {statistics.mean(values):.5f} ± {statistics.stdev(values):.5f} |" \
            in markdown
    base = statistics.mean([metric["0.02", 1], metric["0.02", 2]])
    assert float(rows[1]["delta"]) == pytest.approx(statistics.mean([metric["0.04", 1], metric["0.04", 2]]) - base)
    b = [metric["0.04", 1], metric["0.04", 2]]
    assert float(rows[1]["p"]) == pytest.approx(improvement_p_value(b, base, 0)[1])
    assert markdown in printed


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def summaries_of(values: dict) -> dict:
    return {run_id: {"roundtrip_val_bpb": bpb, "roundtrip_val_loss": bpb * 0.8, "steps": 10 + i,
                     "tokens_per_s": 1000.0 * (i + 1), "bytes_total": 500 + i}
            for i, (run_id, bpb) in enumerate(values.items())}


CONFIGURATIONS = [sweep.Configuration("a", {}), sweep.Configuration("b", {"MATRIX_LR": "0.02"}),
                  sweep.Configuration("c", {"MATRIX_LR": "0.08"})]
VALUES = {"a_s1": 1.30, "a_s2": 1.32, "a_s3": 1.29, "b_s1": 1.25, "b_s2": 1.27, "b_s3": 1.24, "c_s2": 1.20}


def test_the_table_has_each_configurations_mean_std_and_records_t_test_against_the_named_baseline():
    summaries = {**summaries_of(VALUES), "c_s3": {"roundtrip_val_bpb": None, "withheld": "audit failed"}}
    rows = sweep.table_rows(CONFIGURATIONS, [1, 2, 3], summaries, {"c_s1": "exit 3: diverged"}, "roundtrip_val_bpb",
                            "b", "0", False)
    a, b, c = ([VALUES[f"{name}_s{seed}"] for seed in (1, 2, 3) if f"{name}_s{seed}" in VALUES] for name in "abc")
    assert [(r["configuration"], r["n"]) for r in rows] == [("a", 3), ("b", 3), ("c", 1)]
    assert rows[0]["mean"] == pytest.approx(statistics.mean(a)) and rows[0]["std"] == pytest.approx(statistics.stdev(a))
    assert rows[0]["delta"] == pytest.approx(statistics.mean(a) - statistics.mean(b))
    assert rows[0]["p"] == pytest.approx(improvement_p_value(a, statistics.mean(b), 0.0)[1])
    assert rows[1]["delta"] is None and rows[1]["p"] is None  # the baseline
    assert rows[2]["std"] is None and rows[2]["p"] is None
    assert rows[2]["delta"] == pytest.approx(c[0] - statistics.mean(b))
    assert rows[2]["not_counted"] == "s1: exit 3: diverged; s3: withheld (audit failed)"
    assert rows[0]["steps"] == pytest.approx(11) and rows[0]["tokens_per_s"] == pytest.approx(2000)
    text = sweep.markdown("s", rows, "roundtrip_val_bpb", "b", "0", False, [1, 2, 3])
    assert f"| c | 1 | {c[0]:.5f} ± n/a | {c[0] - statistics.mean(b):.5f} | n/a |" in text
    assert "| b | 3 |" in text and "| (baseline) | n/a |" in text and "lower is better" in text
    assert list(csv.reader(sweep.csv_text(rows).splitlines()))[3][3:8] == [repr(c[0]), "n/a", repr(rows[2]["delta"]),
                                                                          "n/a", "0.0"]


def test_higher_is_better_and_the_record_margin_turn_the_test_as_records_check_does():
    rows = sweep.table_rows(CONFIGURATIONS[:2], [1, 2, 3], summaries_of(VALUES), {}, "roundtrip_val_bpb", "a",
                            "record", False)
    b = [VALUES[f"b_s{seed}"] for seed in (1, 2, 3)]
    margin = MIN_IMPROVEMENT * sum(b) / sum(0.8 * v for v in b)
    assert rows[1]["margin"] == pytest.approx(margin)
    assert rows[1]["p"] == pytest.approx(improvement_p_value(b, rows[0]["mean"], margin)[1])
    higher = sweep.table_rows(CONFIGURATIONS[:2], [1, 2, 3], summaries_of(VALUES), {}, "roundtrip_val_bpb", "a",
                              "0.01", True)
    assert higher[1]["p"] == pytest.approx(improvement_p_value([-v for v in b], -rows[0]["mean"], 0.01)[1])
    assert higher[1]["p"] > 0.9  # lower values are worse now

"""The metrics stream (logs/<RUN_ID>.jsonl), progress lines, time left, and the early warm-down warning."""

import json
import re

import pytest

import train_gpt
from conftest import ROOT, run_trainer
from test_eval import CPU, config, stream, tables
from test_model import randomize, tiny_model
from train_gpt import Evaluator, Logger, load_config


def events(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_train_validation_depth_moe_and_evaluation_line_is_an_event_with_its_numbers(tiny_env):
    env = {**tiny_env, "ITERATIONS": "6", "VAL_LOSS_EVERY": "3", "TRAIN_LOG_EVERY": "2", "EVAL_STRIDE": "32",
           "NUM_REPEATS": "2", "DEPTH_SCHEDULE": "1@0,2@0.5", "MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2",
           "CHECKPOINT_EVERY_STEPS": "4"}
    out = run_trainer(env, ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    logs = ROOT / env["LOG_DIR"]
    stream_events, summary = events(logs / "t.jsonl"), json.loads((logs / "t.json").read_text())
    kinds = {}
    for event in stream_events:
        kinds.setdefault(event["event"], []).append(event)
    train = kinds["train"]
    text = re.findall(r"step:(\d+)/6 train_loss:(\S+) train_time:(\d+)ms step_avg:\S+ tok_s:(\d+) time_left:(\d+)s",
                      out.stdout)
    assert [e["step"] for e in train] == [int(s) for s, *_ in text] == [1, 2, 3, 4, 5, 6]
    for event, (_, loss, train_ms, tok_s, left) in zip(train, text):
        assert f"{event['train_loss']:.4f}" == loss and f"{event['train_time_ms']:.0f}" == train_ms
        assert f"{event['tok_s']:.0f}" == tok_s and f"{event['time_left_s']:.0f}" == left
    val = kinds["val"]
    assert [e["step"] for e in val] == [0, 3, 6] and val[-1]["val_bpb"] == summary["val_bpb"]
    assert [(e["repeats"], e["step"]) for e in kinds["depth_phase"]] == [(1, 0), (2, 3)]
    assert [e["step"] for e in kinds["warmdown"]] == [5]  # WARMDOWN_ITERS=2 of 6: step 5 is the first below peak
    moe_train = [e for e in kinds["moe"] if e["mode"] == "train"]
    assert [e["step"] for e in moe_train] == [1, 2, 3, 4, 5, 6] and moe_train[-1]["layers"] == [0, 1]
    assert all(len(share) == 4 and abs(sum(share) - 1) < 1e-9 for share in moe_train[-1]["share"])
    evals = {e["method"]: e for e in kinds["eval"]}
    assert evals["roundtrip"]["val_bpb"] == summary["roundtrip_val_bpb"]
    assert evals["sliding"]["val_bpb"] == summary["sliding_val_bpb"]
    assert evals["prequant"]["val_bpb"] == summary["val_bpb"]
    assert all(isinstance(e["time"], float) for e in stream_events)
    assert [e["step"] for e in kinds["checkpoint"]] == [4] and kinds["checkpoint"][0]["path"].endswith("_step0000004.ckpt")
    tried, = kinds["export"]
    assert {k: tried[k] for k in ("scheme", "bytes_total", "fits")} == {
        k: summary["quant"]["tried"][0][k] for k in ("scheme", "bytes_total", "fits")}
    artifact, = kinds["artifact"]
    assert (artifact["bytes_total"], artifact["bytes_model"]) == (summary["bytes_total"], summary["bytes_model"])


def test_a_named_evaluation_reports_progress_at_most_every_tenth(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "PROGRESS_AFTER_SECONDS", 0.0)
    log = Logger(tmp_path / "p.txt")
    cfg = config(EVAL_STRIDE=1)
    ev = Evaluator(cfg, CPU, stream(16 * 40 + 1), tables(), log=log)
    model = randomize(tiny_model())
    train_gpt.score_first(ev, train_gpt.sliding_method(cfg, ev, model), name="sliding")
    train_gpt.score_first(ev, train_gpt.sliding_method(cfg, ev, model))  # unnamed, as the audit's: silent
    progress = [e for e in events(tmp_path / "p.jsonl") if e["event"] == "progress"]
    fractions = [e["fraction"] for e in progress]
    assert 5 <= len(progress) <= 9 and all(e["name"] == "sliding" for e in progress)
    assert [int(10 * f) for f in fractions] == sorted(set(int(10 * f) for f in fractions)) and fractions[-1] < 1
    lines = re.findall(r"eval_progress sliding: (\d+)% tok_s:\d+ left:\d+s", (tmp_path / "p.txt").read_text())
    assert [int(p) for p in lines] == [round(100 * f) for f in fractions]


def test_a_short_evaluation_prints_no_progress(tmp_path):
    log = Logger(tmp_path / "p.txt")
    cfg = config()
    ev = Evaluator(cfg, CPU, stream(16 * 40 + 1), tables(), log=log)
    ev.standard(randomize(tiny_model()), "val")
    assert "progress" not in (tmp_path / "p.txt").read_text()


@pytest.mark.parametrize("cap, iterations, elapsed, left", [(0, 100, 500.0, 49.5), (10, 100, 500.0, 9.5),
                                                            (10, 1000, 4000.0, 6.0), (100, 10, 500.0, 4.5)])
def test_time_left_is_the_cap_or_the_steps_left_at_this_pace(tmp_path, cap, iterations, elapsed, left):
    cfg, _ = load_config({"MAX_WALLCLOCK_SECONDS": str(cap), "ITERATIONS": str(iterations)})
    log = Logger(tmp_path / "t.txt")
    train_gpt.train_log_line(cfg, 1, 2.5, elapsed, log)
    assert events(tmp_path / "t.jsonl")[0]["time_left_s"] == pytest.approx(left)


@pytest.mark.parametrize("cap, iterations, warmdown, step_ms, warns", [
    (120, 20000, 1200, 1700.0, True),  # ~70 steps in the budget, all of them in the warm-down
    (120, 20000, 30, 1700.0, False),
    (0, 100, 60, 10.0, True),
    (0, 100, 50, 10.0, False),
    (0, 100, 0, 10.0, False)])
def test_a_warmdown_that_starts_before_half_the_budget_is_warned_with_one_that_fits(tmp_path, cap, iterations,
                                                                                   warmdown, step_ms, warns):
    env = {"MAX_WALLCLOCK_SECONDS": str(cap), "ITERATIONS": str(iterations), "WARMDOWN_ITERS": str(warmdown)}
    cfg, _ = load_config(env)
    log = Logger(tmp_path / "w.txt")
    train_gpt.check_warmdown(cfg, step_ms, log)
    warned = events(tmp_path / "w.jsonl") if (tmp_path / "w.jsonl").stat().st_size else []
    assert bool(warned) == warns
    if warns:
        event = warned[0]
        assert event["lr_scale_step1"] == train_gpt.lr_scale(cfg, 1, step_ms) and event["warmdown_start"] < 0.5
        fitted, _ = load_config({**env, "WARMDOWN_ITERS": str(event["fitting_warmdown_iters"])})
        quiet = Logger(tmp_path / "q.txt")
        train_gpt.check_warmdown(fitted, step_ms, quiet)
        assert (tmp_path / "q.jsonl").stat().st_size == 0  # the suggested value fits
        assert "warning: warmdown_early: " in (tmp_path / "w.txt").read_text()

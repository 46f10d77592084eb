"""Depth recurrence end to end: scheduled depth phases, SWA at full depth, export at the final depth."""

import json
import re
import sys

from conftest import ROOT, run_trainer
from train_gpt import parse_artifact

SCHEDULE_ENV = {"NUM_LAYERS": "2", "DEPTH_SCHEDULE": "1@0,2@0.3,3@0.6", "XSA_LAST_N": "2",
                "NUM_VALUE_EMBEDS": "1", "ACTIVATION": "leaky_relu2", "ITERATIONS": "20", "WARMUP_STEPS": "0"}


def phases_in(stdout: str) -> list[tuple[int, int]]:
    return [(int(r), int(s)) for r, s in re.findall(r"^depth_phase repeats:(\d+) step:(\d+)", stdout, re.M)]


def test_depth_follows_the_schedule_and_export_uses_the_final_depth(tiny_env):
    env = {**tiny_env, **SCHEDULE_ENV, "SWA_ENABLED": "1", "SWA_START_FRAC": "0.3", "SWA_EVERY": "2"}
    out = run_trainer(env, ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert phases_in(out.stdout) == [(1, 0), (2, 6), (3, 12)]
    summary = json.loads((ROOT / env["LOG_DIR"] / "t.json").read_text())
    assert [p["repeats"] for p in summary["depth_phases"]] == [1, 2, 3]
    assert [round(p["frac"], 2) for p in summary["depth_phases"]] == [0.0, 0.3, 0.6]
    # snapshots only from weights trained at full depth (from step 12 on): steps 14, 16, 18, 20
    assert summary["swa_snapshots"] == 4
    header, _ = parse_artifact((ROOT / summary["artifact_path"]).read_bytes(), summary["artifact_path"])
    assert header["model"]["num_repeats"] == 3 and header["model"]["xsa_last_n"] == 2
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05


def test_two_ranks_change_depth_at_the_same_step_under_a_wall_clock(tiny_env):
    env = {**tiny_env, **SCHEDULE_ENV, "ITERATIONS": "100000", "MAX_WALLCLOCK_SECONDS": "4",
           "GRAD_ACCUM_STEPS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = run_trainer(env, ROOT, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r for r, _ in phases_in(out.stdout)] == [1, 2, 3]
    assert "depth_phases_agreed ranks:2" in out.stdout


def test_resume_keeps_the_depth_phase(tiny_env):
    env = {**tiny_env, **SCHEDULE_ENV, "CHECKPOINT_EVERY_STEPS": "5"}
    straight = run_trainer({**env, "RUN_ID": "straight"}, ROOT)
    assert straight.returncode == 0
    assert run_trainer({**env, "RUN_ID": "R", "FAULT_AT_STEP": "17"}, ROOT).returncode != 0
    resumed = run_trainer({**env, "RUN_ID": "R", "RESUME_FROM": "auto"}, ROOT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = json.loads((ROOT / env["LOG_DIR"] / "straight.json").read_text())
    b = json.loads((ROOT / env["LOG_DIR"] / "R.json").read_text())
    assert a["depth_phases"] == b["depth_phases"]
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6


def test_weight_averages_equal_hand_computations():
    import torch

    from train_gpt import WeightAverage

    model = torch.nn.Linear(3, 2)
    snapshots = []
    swa, ema = WeightAverage("swa"), WeightAverage("ema", decay=0.9)
    for step in range(4):
        with torch.no_grad():
            model.weight.add_(step + 1.0)
        snapshots.append(model.weight.detach().clone())
        swa.add(model, step)
        ema.add(model, step)
    like = model.state_dict()
    assert torch.allclose(swa.average(like)["weight"], sum(snapshots) / 4)
    expected = snapshots[0]
    for w in snapshots[1:]:
        expected = 0.9 * expected + 0.1 * w
    assert torch.allclose(ema.average(like)["weight"], expected)


def test_ema_run_reports_raw_and_averaged(tiny_env):
    env = {**tiny_env, **SCHEDULE_ENV, "EMA_DECAY": "0.9"}
    out = run_trainer(env, ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((ROOT / env["LOG_DIR"] / "t.json").read_text())
    assert summary["ema_snapshots"] == 8 and "raw_val_bpb" in summary  # every step of the last phase
    assert re.search(r"^ema: snapshots:8 raw val_bpb:\S+ averaged val_loss:\S+ val_bpb:\S+$", out.stdout, re.M)


def test_warm_up_primes_every_depth_and_changes_nothing(tiny_env):
    env = {**tiny_env, **SCHEDULE_ENV, "WARMUP_STEPS": "2", "RUN_ID": "primed"}
    primed = run_trainer(env, ROOT)
    plain = run_trainer({**env, "WARMUP_STEPS": "0", "RUN_ID": "plain"}, ROOT)
    assert primed.returncode == 0 and plain.returncode == 0, primed.stderr[-2000:]
    assert [line for line in primed.stdout.splitlines() if line.startswith("warmup_step:2/2")] == [
        "warmup_step:2/2 repeats:1", "warmup_step:2/2 repeats:2", "warmup_step:2/2 repeats:3"]
    a = json.loads((ROOT / env["LOG_DIR"] / "primed.json").read_text())
    b = json.loads((ROOT / env["LOG_DIR"] / "plain.json").read_text())
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-6

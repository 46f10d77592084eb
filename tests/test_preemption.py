"""Preemption: a scheduler's SIGTERM or SIGUSR1 checkpoints every rank at one step boundary; the resume is exact."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, clean_env, run_trainer
from test_checkpoint import TORCHRUN

PREEMPT_ENV = {"ITERATIONS": "100", "VAL_LOSS_EVERY": "40", "TRAIN_LOG_EVERY": "1", "WARMDOWN_ITERS": "30",
               "GRAD_ACCUM_STEPS": "1", "EMA_DECAY": "0.9"}
EXACT = ("steps", "val_loss", "val_bpb", "roundtrip_val_loss", "roundtrip_val_bpb", "bytes_model", "tokens_seen")


def signalled(env: dict, launcher: list[str], sig: int, until, only_rank: int | None = None) -> tuple[int, str]:
    """Runs the trainer and sends `sig` to its whole process group (as a scheduler does), or to one rank's worker
    only, at the first line printed that `until` accepts; the exit code and everything printed."""
    proc = subprocess.Popen(launcher + [str(ROOT / "train_gpt.py")], cwd=ROOT, env={**clean_env(), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if until(line):
            if only_rank is None:
                os.killpg(proc.pid, sig)
            else:
                os.kill(worker_of_rank(proc.pid, only_rank), sig)
            break
    printed += proc.stdout.read()
    return proc.wait(timeout=120), "".join(printed)


def worker_of_rank(launcher_pid: int, rank: int) -> int:
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in map(int, children):
        if f"\0RANK={rank}\0".encode() in b"\0" + Path(f"/proc/{pid}/environ").read_bytes():
            return pid
    raise AssertionError(f"no worker of rank {rank} among {children}")


def past_step(step: int):
    return lambda line: bool(m := re.match(r"step:(\d+)/\d+ train_loss", line)) and int(m.group(1)) >= step


def preempt_and_resume(env: dict, launcher: list[str], sig: int, name: str, only_rank=None) -> tuple[str, dict]:
    code, printed = signalled({**env, "RUN_ID": "P"}, launcher, sig, past_step(5), only_rank)
    logs = ROOT / env["LOG_DIR"]
    step = int(re.search(rf"preempted: {name} at step (\d+): checkpoint ", printed).group(1))
    assert 5 <= step < 100 and not (logs / "P.json").exists() and not (logs / "P.ptz").exists()
    assert (logs / f"P_step{step:07d}.ckpt").is_file()
    assert "the same command with RESUME_FROM=auto RUN_ID=P" in printed and "exit:5" in printed
    resumed = run_trainer({**env, "RUN_ID": "P", "RESUME_FROM": "auto"}, ROOT, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed: from {logs / f'P_step{step:07d}.ckpt'} step:{step}" in resumed.stdout
    return printed, json.loads((logs / "P.json").read_text())


def uninterrupted(env: dict, launcher: list[str] | None = None) -> dict:
    out = run_trainer({**env, "RUN_ID": "U"}, ROOT, launcher=launcher)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((ROOT / env["LOG_DIR"] / "U.json").read_text())


def assert_same_run(a: dict, b: dict, env: dict):
    assert {k: a[k] for k in EXACT} == {k: b[k] for k in EXACT}
    logs = ROOT / env["LOG_DIR"]
    assert (logs / "U.ptz").read_bytes() == (logs / "P.ptz").read_bytes()  # the same weights, bit for bit


def test_sigusr1_checkpoints_and_exits_5(tiny_env):
    env = {**tiny_env, **PREEMPT_ENV, "RUN_ID": "S"}
    code, printed = signalled(env, [sys.executable], signal.SIGUSR1, past_step(5))
    step = int(re.search(r"preempted: SIGUSR1 at step (\d+): checkpoint ", printed).group(1))
    assert code == 5 and (ROOT / env["LOG_DIR"] / f"S_step{step:07d}.ckpt").is_file()


@pytest.mark.parametrize("only_rank", [None, 1])
def test_sigterm_to_a_two_process_run_stops_both_ranks_at_one_step_and_resumes_exactly(tiny_env, only_rank):
    """Sent to the whole job (torchrun passes it on), or to rank 1 alone: both ranks checkpoint at one step."""
    env = {**tiny_env, **PREEMPT_ENV}
    notice = "SIGTERM" if only_rank is None else "a signal to another rank"
    printed, resumed = preempt_and_resume(env, TORCHRUN, signal.SIGTERM, notice, only_rank)
    assert printed.count("preempted: ") == 1 and resumed["world_size"] == 2  # rank 0 speaks for both
    assert_same_run(uninterrupted(env, TORCHRUN), resumed, env)


@pytest.mark.parametrize("stop", ["ITERATIONS", "MAX_WALLCLOCK_SECONDS"])
def test_a_notice_during_the_last_validation_checkpoints_the_finished_training(tiny_env, stop):
    env = {**tiny_env, "VAL_BATCH_SIZE": "64", "RUN_ID": "L"}  # a slow last validation
    if stop == "ITERATIONS":
        env, last_line = {**env, "ITERATIONS": "3"}, past_step(3)
    else:
        env, last_line = {**env, "ITERATIONS": "100000", "MAX_WALLCLOCK_SECONDS": "1"}, re.compile("stopping_early").match
    code, printed = signalled(env, [sys.executable], signal.SIGTERM, last_line)
    step = int(re.search(r"preempted: SIGTERM at step (\d+): checkpoint ", printed).group(1))
    resumed = run_trainer({**env, "RESUME_FROM": "auto"}, ROOT)
    assert code == 5 and resumed.returncode == 0 and "train_loss" not in resumed.stdout  # it only evaluates
    assert json.loads((ROOT / env["LOG_DIR"] / "L.json").read_text())["steps"] == step
    kinds = [json.loads(line)["event"] for line in (ROOT / env["LOG_DIR"] / "L.jsonl").read_text().splitlines()]
    assert kinds.count("preempted") == 1 and kinds.count("stop") == (stop == "MAX_WALLCLOCK_SECONDS")


def test_a_signal_after_training_ends_the_process_as_before(tiny_env):
    env = {**tiny_env, "ITERATIONS": "2", "EVAL_STRIDE": "1", "RUN_ID": "E"}  # a slow sliding evaluation
    code, printed = signalled(env, [sys.executable], signal.SIGTERM, lambda line: line.startswith("Serialized"))
    assert code == -signal.SIGTERM and "preempted" not in printed

"""Checkpoints, exact resume, the crash hook, the NaN guard and distributed faults."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_ENV, clean_env, run_trainer
from train_gpt import InputError, load_checkpoint

RESUME_ENV = {"ITERATIONS": "40", "VAL_LOSS_EVERY": "20", "TRAIN_LOG_EVERY": "10", "WARMDOWN_ITERS": "10",
              "SWA_ENABLED": "1", "SWA_START_FRAC": "0.4", "SWA_EVERY": "5", "TRAIN_BATCH_TOKENS": "1024"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def summary(env, run_id):
    return json.loads((ROOT / env["LOG_DIR"] / f"{run_id}.json").read_text())


def crash_and_resume(env, run_id, launcher=None, resume_launcher=None, resume_env=None):
    crashed = run_trainer({**env, "RUN_ID": run_id, "CHECKPOINT_EVERY_STEPS": "10", "FAULT_AT_STEP": "27"}, ROOT,
                          launcher=launcher)
    assert crashed.returncode != 0
    ckpts = sorted(p.name for p in (ROOT / env["LOG_DIR"]).glob(f"{run_id}_step*.ckpt"))
    assert ckpts == [f"{run_id}_step0000010.ckpt", f"{run_id}_step0000020.ckpt"]
    assert not (ROOT / env["LOG_DIR"] / f"{run_id}.ptz").exists()
    resumed = run_trainer({**env, "RUN_ID": run_id, "CHECKPOINT_EVERY_STEPS": "10", "RESUME_FROM": "auto",
                           **(resume_env or {})}, ROOT, launcher=resume_launcher or launcher)
    assert resumed.returncode == 0, resumed.stderr[:3000] + resumed.stderr[-3000:]
    assert f"resumed: from {ROOT / env['LOG_DIR'] / f'{run_id}_step0000020.ckpt'} step:20" in resumed.stdout
    return resumed


def test_resume_after_a_crash_equals_the_uninterrupted_run(tiny_env):
    env = {**tiny_env, **RESUME_ENV}
    assert run_trainer({**env, "RUN_ID": "A"}, ROOT).returncode == 0
    resumed = crash_and_resume(env, "B")
    a, b = summary(env, "A"), summary(env, "B")
    assert a["steps"] == b["steps"] == 40 and a["swa_snapshots"] == b["swa_snapshots"] == 5
    for key in ("val_loss", "roundtrip_val_loss", "raw_val_loss", "tokens_seen"):
        assert abs(a[key] - b[key]) <= 1e-6, key
    log = (ROOT / env["LOG_DIR"] / "B.txt").read_text()
    assert log.count("step:40/40 val_loss:") == 1 and "warning: resumed with changed" not in resumed.stdout
    # only the last two checkpoints are kept
    assert sorted(p.name for p in (ROOT / env["LOG_DIR"]).glob("B_step*.ckpt")) == ["B_step0000030.ckpt",
                                                                                  "B_step0000040.ckpt"]


def test_two_process_resume_equals_the_uninterrupted_two_process_run(tiny_env):
    env = {**tiny_env, **RESUME_ENV, "GRAD_ACCUM_STEPS": "1"}
    assert run_trainer({**env, "RUN_ID": "A2"}, ROOT, launcher=TORCHRUN).returncode == 0
    crash_and_resume(env, "B2", launcher=TORCHRUN)
    a, b = summary(env, "A2"), summary(env, "B2")
    assert a["steps"] == b["steps"] == 40 and b["world_size"] == 2
    for key in ("val_loss", "roundtrip_val_loss"):
        assert abs(a[key] - b[key]) <= 1e-6, key


def test_resume_on_another_world_size_with_the_same_global_batch(tiny_env):
    env = {**tiny_env, **RESUME_ENV}
    assert run_trainer({**env, "RUN_ID": "A1", "GRAD_ACCUM_STEPS": "2"}, ROOT).returncode == 0
    crash_and_resume({**env, "GRAD_ACCUM_STEPS": "1"}, "W", launcher=TORCHRUN, resume_launcher=[sys.executable],
                     resume_env={"GRAD_ACCUM_STEPS": "2"})
    a, b = summary(env, "A1"), summary(env, "W")
    assert b["world_size"] == 1 and a["steps"] == b["steps"] == 40
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-4


def test_checkpoint_from_another_config_is_refused(tiny_env):
    env = {**tiny_env, "ITERATIONS": "4", "CHECKPOINT_EVERY_STEPS": "2", "RUN_ID": "C"}
    assert run_trainer(env, ROOT).returncode == 0
    out = run_trainer({**env, "MODEL_DIM": "64", "RESUME_FROM": "auto"}, ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "is from another config: MODEL_DIM=32 there, 64 here" in out.stderr


def test_changed_learning_rate_is_allowed_and_said(tiny_env):
    env = {**tiny_env, "ITERATIONS": "4", "CHECKPOINT_EVERY_STEPS": "2", "RUN_ID": "L"}
    assert run_trainer(env, ROOT).returncode == 0
    out = run_trainer({**env, "RESUME_FROM": "auto", "MATRIX_LR": "0.01"}, ROOT)
    assert out.returncode == 0 and "warning: resumed with changed settings MATRIX_LR" in out.stdout


@pytest.fixture(scope="module")
def sound_checkpoint(data_dir, tokenizer_path, tmp_path_factory) -> bytes:
    """A 2-step run's checkpoint, shared by the cases that damage a copy of it."""
    logs = tmp_path_factory.mktemp("sound")
    env = {**TINY_ENV, "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tokenizer_path), "LOG_DIR": str(logs),
           "RUN_ID": "D", "ITERATIONS": "2", "CHECKPOINT_EVERY_STEPS": "2"}
    assert run_trainer(env, ROOT).returncode == 0
    return (logs / "D_step0000002.ckpt").read_bytes()


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_checkpoint_is_refused(tiny_env, sound_checkpoint, damage):
    env = {**tiny_env, "ITERATIONS": "2", "CHECKPOINT_EVERY_STEPS": "2", "RUN_ID": "D"}
    path = ROOT / env["LOG_DIR"] / "D_step0000002.ckpt"
    blob = bytearray(sound_checkpoint)
    if damage == "truncate":
        blob = blob[:len(blob) // 2]
    elif damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    else:
        blob = bytearray()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(blob))
    out = run_trainer({**env, "RESUME_FROM": str(path)}, ROOT)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and str(path) in out.stderr


def test_resume_auto_without_checkpoints_is_refused(tiny_env):
    out = run_trainer({**tiny_env, "RUN_ID": "none", "RESUME_FROM": "auto"}, ROOT)
    assert out.returncode == 2 and "no checkpoint of RUN_ID=none" in out.stderr


def test_checkpoint_loads_without_pickle_code(tiny_env):
    env = {**tiny_env, "ITERATIONS": "2", "CHECKPOINT_EVERY_STEPS": "2", "RUN_ID": "P"}
    assert run_trainer(env, ROOT).returncode == 0
    ckpt = load_checkpoint(ROOT / env["LOG_DIR"] / "P_step0000002.ckpt")
    assert ckpt["step"] == 2 and isinstance(ckpt["model"]["tok_emb.weight"], torch.Tensor)
    assert len(ckpt["optimizers"][1]["state"]) > 0  # Muon momentum travels with the checkpoint


def test_divergence_stops_with_the_group_and_the_last_good_checkpoint(tiny_env):
    env = {**tiny_env, "ITERATIONS": "20", "CHECKPOINT_EVERY_STEPS": "1", "RUN_ID": "N", "TIED_EMBED_LR": "1e30",
           "WARMUP_STEPS": "0"}
    out = run_trainer(env, ROOT)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "error: non-finite" in out.stdout and "parameter group:" in out.stdout
    step = int(out.stdout.split("non-finite ")[1].split(" at step ")[1].split(" ")[0])
    good = ROOT / env["LOG_DIR"] / f"N_step{step - 1:07d}.ckpt"
    assert f"last good checkpoint: {good}" in out.stdout and good.is_file()
    assert f"RESUME_FROM={good}" in out.stdout and "TIED_EMBED_LR=5e+29" in out.stdout
    assert not (ROOT / env["LOG_DIR"] / "N.ptz").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_survivors_of_a_dead_rank_stop_with_a_message(tiny_env):
    env = {**clean_env(), **tiny_env, "ITERATIONS": "50", "FAULT_AT_STEP": "3", "FAULT_RANK": "1",
           "DIST_TIMEOUT_SECONDS": "5", "GRAD_ACCUM_STEPS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "train_gpt.py")], cwd=ROOT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    start = time.monotonic()
    out0, err0 = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == -9  # the crash hook
    assert procs[0].returncode == 1 and time.monotonic() - start < 100
    assert "error: rank 0: a collective with the other ranks failed" in err0


def test_a_log_folder_that_cannot_be_made_is_refused(tiny_env, tmp_path):
    (tmp_path / "blocker").write_text("a file where the log folder should be")
    out = run_trainer({**tiny_env, "LOG_DIR": str(tmp_path / "blocker" / "logs")}, ROOT)
    assert out.returncode == 2 and "cannot write the log" in out.stderr


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    import errno

    import train_gpt

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_gpt.os, "fsync", full)
    with pytest.raises(InputError, match="No space left on device"):
        train_gpt.write_atomic(tmp_path / "model.ptz", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def test_checkpoints_by_training_time(tiny_env):
    env = {**tiny_env, "ITERATIONS": "30", "CHECKPOINT_EVERY_SECONDS": "0.2", "RUN_ID": "S"}
    out = run_trainer(env, ROOT)
    assert out.returncode == 0, out.stderr
    written = [line for line in out.stdout.splitlines() if line.startswith("checkpoint: ")]
    assert len(written) >= 2
    kept = sorted((ROOT / env["LOG_DIR"]).glob("S_step*.ckpt"))
    assert len(kept) == 2 and str(kept[-1]) in written[-1]

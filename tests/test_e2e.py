"""End to end on the CPU: a few steps through export and round trip, and each bad input's exit code."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT, run_trainer
from data.prepare import write_shard

CONTRACT_KEYS = {"run_id", "world_size", "device", "config", "steps", "train_time_ms", "tokens_seen", "tokens_per_s",
                 "params_total", "params_trainable", "val_loss", "val_bpb", "roundtrip_val_loss", "roundtrip_val_bpb",
                 "val_bytes", "bytes_model", "bytes_code", "bytes_total", "artifact_path", "peak_mem_mib"}


def summary_of(env) -> dict:
    return json.loads((ROOT / env["LOG_DIR"] / f"{env['RUN_ID']}.json").read_text())


def test_cpu_run_trains_exports_and_round_trips(tiny_env):
    out = run_trainer(tiny_env, ROOT)
    assert out.returncode == 0, out.stderr
    summary = summary_of(tiny_env)
    assert CONTRACT_KEYS <= set(summary)
    assert summary["steps"] == 6 and summary["tokens_seen"] == 6 * 1024 and summary["world_size"] == 1
    assert summary["config"]["num_layers"] == 2 and summary["config"]["grad_accum_steps"] == 8
    assert summary["bytes_code"] == len((ROOT / "train_gpt.py").read_bytes())
    assert summary["bytes_total"] == summary["bytes_code"] + summary["bytes_model"]
    assert summary["over_limit"] is False
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05
    log = (ROOT / tiny_env["LOG_DIR"] / "t.txt").read_text()
    assert re.search(r"^step:6/6 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms", log, re.M)
    assert re.search(r"^step:6/6 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms", log, re.M)
    final = re.search(r"^final_int8_zstd_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", log, re.M)
    assert final and float(final.group(2)) == round(summary["roundtrip_val_bpb"], 8)
    first = float(re.search(r"^step:1/6 train_loss:(\S+)", log, re.M).group(1))
    last = float(re.search(r"^step:6/6 train_loss:(\S+)", log, re.M).group(1))
    assert last < first


def test_over_limit_is_reported_and_still_written(tiny_env):
    out = run_trainer({**tiny_env, "ARTIFACT_LIMIT_BYTES": "1000", "ITERATIONS": "1"}, ROOT)
    assert out.returncode == 0, out.stderr
    assert summary_of(tiny_env)["over_limit"] is True and "WARNING over_limit" in out.stdout


def test_wallclock_cap_stops_the_run(tiny_env):
    out = run_trainer({**tiny_env, "ITERATIONS": "100000", "MAX_WALLCLOCK_SECONDS": "2"}, ROOT)
    assert out.returncode == 0, out.stderr
    assert "stopping_early: wallclock_cap" in out.stdout
    summary = summary_of(tiny_env)
    assert summary["steps"] < 100000 and 2000 <= summary["train_time_ms"] < 6000


def assert_input_error(out, *needles):
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0]


def test_no_shards_says_how_to_make_them(tiny_env, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_input_error(run_trainer({**tiny_env, "DATA_PATH": str(tmp_path / "empty")}, ROOT),
                       "no *_train_*.bin shards", "data/prepare.py", "data/fineweb.py")


def copy_data(tiny_env, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_env["DATA_PATH"], dst)
    return dst


def test_corrupt_shard_is_refused(tiny_env, tmp_path):
    data = copy_data(tiny_env, tmp_path)
    shard = data / "tiny_train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-7])
    assert_input_error(run_trainer({**tiny_env, "DATA_PATH": str(data)}, ROOT), str(shard), "declares")


def test_token_id_beyond_vocab_is_refused(tiny_env, tmp_path):
    data = copy_data(tiny_env, tmp_path)
    write_shard(data / "tiny_val_000000.bin", np.array([1, 5, 330, 7] * 40, dtype=np.uint16))
    assert_input_error(run_trainer({**tiny_env, "DATA_PATH": str(data)}, ROOT), "token id 330", "VOCAB_SIZE=320")


def test_tokenizer_larger_than_vocab_is_refused(tiny_env):
    assert_input_error(run_trainer({**tiny_env, "VOCAB_SIZE": "256"}, ROOT), "VOCAB_SIZE=256")


def test_bad_env_value_is_refused(tiny_env):
    assert_input_error(run_trainer({**tiny_env, "NUM_KV_HEADS": "3"}, ROOT), "NUM_KV_HEADS")


def test_explicit_accumulation_that_does_not_divide_is_refused(tiny_env):
    assert_input_error(run_trainer({**tiny_env, "GRAD_ACCUM_STEPS": "3"}, ROOT), "TRAIN_BATCH_TOKENS")


def test_scores_below_the_source_entropy_are_flagged(tiny_env, tmp_path):
    data = copy_data(tiny_env, tmp_path)
    env = {**tiny_env, "DATA_PATH": str(data), "ITERATIONS": "1"}
    for bits, flagged in ((1e9, True), (1.0, False)):
        (data / "meta.json").write_text(json.dumps({"val_utf8_bytes": 1000, "val_entropy_bits": bits}))
        out = run_trainer(env, ROOT)
        assert out.returncode == 0, out.stderr
        summary = summary_of(env)
        assert summary["source_bpb"] == bits / 1000 and summary["below_source_entropy"] is flagged
        assert ("WARNING below_source_entropy" in out.stdout) is flagged


EVAL_ENV = {"EVAL_STRIDE": "16", "HEDGE_ENABLED": "1", "HEDGE_CHUNK_TOKENS": "64", "TTT_STEPS": "1",
            "TTT_CHUNK_TOKENS": "512", "EVAL_AUDIT": "1", "EVAL_AUDIT_TOKENS": "700", "PER_TOKEN_LOSS_EVERY": "3"}


def test_every_evaluation_method_is_audited_scored_logged_and_summarised(tiny_env):
    out = run_trainer({**tiny_env, **EVAL_ENV}, ROOT)
    assert out.returncode == 0, out.stderr
    summary, log = summary_of(tiny_env), out.stdout
    for name in ("sliding", "hedge", "ttt"):
        assert summary[f"{name}_val_bpb"] > 0 and name in summary["eval_ms"]
        exact = re.search(rf"^final_{name}_exact val_loss:\S+ val_bpb:(\d+\.\d{{8}})$", log, re.M)
        assert exact and float(exact.group(1)) == round(summary[f"{name}_val_bpb"], 8)
        assert re.search(rf"^audit {name}: max_prob_sum_error:\S+ causal:true .* passed$", log, re.M)
    audit = summary["audit"]
    assert audit["causal"] is True and audit["max_prob_sum_error"] < 1e-3 and audit["passed"] is True
    assert set(audit["methods"]) == {"standard", "sliding", "hedge", "ttt"}
    assert set(summary["hedge_weights"]) == {"neural", "unigram", "bigram", "trigram", "tempered"}
    assert summary["eval_fit"]["estimated_full_split_s"] > 0 and "fits_600s:" in log
    saves = sorted(p.name for p in (ROOT / tiny_env["LOG_DIR"] / "t_per_token").iterdir())
    assert saves == ["final.npz", "step_000000.npz", "step_000003.npz", "step_000006.npz"]
    with np.load(ROOT / tiny_env["LOG_DIR"] / "t_per_token" / "final.npz") as final:
        assert final["loss"].dtype == np.float16 and len(final["loss"]) == summary["val_tokens"]
        assert int(final["step"]) == 6
        assert abs(final["loss"].astype(np.float64).mean() - summary["val_loss"]) < 1e-3


def test_per_token_comparison_of_two_runs(tiny_env, tmp_path):
    env = {**tiny_env, "PER_TOKEN_LOSS_EVERY": "3"}
    for run_id, seed in (("a", "1"), ("b", "2")):
        assert run_trainer({**env, "RUN_ID": run_id, "SEED": seed}, ROOT).returncode == 0
    logs = ROOT / tiny_env["LOG_DIR"]
    cmd = [sys.executable, str(ROOT / "compare_per_token.py"), str(logs / "a"), str(logs / "b_per_token"),
           "--json", str(tmp_path / "r2.json")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r2.json").read_text())
    assert [r["save"] for r in rows] == ["step_000000", "step_000003", "step_000006", "final"]
    assert all(0 <= r["r2"] <= 1 for r in rows) and rows[-1]["r2"] > 0.3  # same text, different seeds
    assert "step_000003" in out.stdout and "r2" in out.stdout.splitlines()[0]
    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nothing"), str(logs / "b")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nothing" in missing.stderr

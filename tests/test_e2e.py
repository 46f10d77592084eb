"""End to end on the CPU: a few steps through export and round trip, and each bad input's exit code."""

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

import train_gpt
from conftest import ROOT, clean_env, run_trainer
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
    # A submission counts the code packed; the file's own size is reported beside it.
    source = (ROOT / "train_gpt.py").read_bytes()
    assert summary["bytes_code"] == len(train_gpt.pack_program(train_gpt.program_of(source))) < len(source)
    assert summary["bytes_code_file"] == len(source)
    assert summary["bytes_total"] == summary["bytes_code"] + summary["bytes_model"]
    assert summary["over_limit"] is False
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05
    log = (ROOT / tiny_env["LOG_DIR"] / "t.txt").read_text()
    assert re.search(r"^step:6/6 train_loss:\d+\.\d{4} train_time:\d+ms step_avg:\d+\.\d{2}ms", log, re.M)
    assert re.search(r"^step:6/6 val_loss:\d+\.\d{4} val_bpb:\d+\.\d{4} train_time:\d+ms", log, re.M)
    final = re.search(r"^final_int8_zstd_roundtrip_exact val_loss:(\d+\.\d{8}) val_bpb:(\d+\.\d{8})$", log, re.M)
    assert final and float(final.group(2)) == round(summary["roundtrip_val_bpb"], 8)
    # What records/check.py ties a log to: the code and tokenizer that ran, and how the run ended.
    code_sha = hashlib.sha256((ROOT / "train_gpt.py").read_bytes()).hexdigest()
    tokenizer_sha = hashlib.sha256(Path(tiny_env["TOKENIZER_PATH"]).read_bytes()).hexdigest()
    assert re.search(rf"^Code sha256: {code_sha}$", log, re.M) and re.search(rf"^tokenizer: \S+ sha256:{tokenizer_sha}$",
                                                                            log, re.M)
    assert log.rstrip().endswith("exit:0")
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
    out = run_trainer({**tiny_env, **EVAL_ENV, "SCORE_METHOD": "hedge"}, ROOT)
    assert out.returncode == 0, out.stderr
    summary, log = summary_of(tiny_env), out.stdout
    # The claimed score is named, and its final line is the last one, as the challenge's reviewers read a log.
    assert summary["metric"] == "hedge" and re.findall(r"^final_\S+_exact", log, re.M)[-1] == "final_hedge_exact"
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
    cmd = [sys.executable, str(ROOT / "tools" / "compare_per_token.py"), str(logs / "a"), str(logs / "b_per_token"),
           "--json", str(tmp_path / "r2.json")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r2.json").read_text())
    assert [r["save"] for r in rows] == ["step_000000", "step_000003", "step_000006", "final"]
    assert all(0 <= r["r2"] <= 1 for r in rows) and rows[-1]["r2"] > 0.3  # same text, different seeds
    assert "step_000003" in out.stdout and "r2" in out.stdout.splitlines()[0]
    missing = subprocess.run(cmd[:2] + [str(tmp_path / "nothing"), str(logs / "b")], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "nothing" in missing.stderr


def test_moe_run_reports_load_statistics_and_parameter_accounting(tiny_env):
    env = {**tiny_env, "MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2", "MOE_D_FFN": "32", "MOE_FROZEN": "1",
           "MOE_INIT": "sparse", "MOE_AUX_COEF": "0.01", "MOE_BIAS_UPDATE": "0.001", "VAL_LOSS_EVERY": "3"}
    out = run_trainer(env, ROOT)
    assert out.returncode == 0, out.stderr
    summary = summary_of(tiny_env)
    moe = summary["moe"]
    assert moe["layers"] == [0, 1] and len(moe["gini"]) == len(moe["entropy"]) == 2
    assert all(0 <= g < 1 for g in moe["gini"]) and all(0 <= h <= 2 for h in moe["entropy"])
    assert len(moe["val"]["gini"]) == 2
    assert summary["params_trainable"] < summary["params_total"] and summary["params_stored"] < summary["params_total"]
    assert re.search(r"^moe_train layers:0,1 gini:\S+ entropy_bits:\S+ effective_experts:\S+ dead:\S+$", out.stdout, re.M)
    assert re.search(r"^moe_val layers:0,1 ", out.stdout, re.M)
    assert re.search(r"^params: total:\d+ trainable:\d+ \(\d+\.\d\d%\) active_per_token:\d+ stored:\d+$", out.stdout, re.M)


def test_dry_run_counts_without_data(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--dry-run"], cwd=tmp_path, capture_output=True,
                         text=True, env={**clean_env(), "PRESET": "some_study_b1"}, timeout=120)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout.split("dry_run: ")[1])
    assert counts["params_total"] - counts["params_trainable"] == 1_209_925_632
    assert not (tmp_path / "logs").exists()
    bad = subprocess.run([sys.executable, str(ROOT / "train_gpt.py"), "--dryrun"], cwd=tmp_path, capture_output=True,
                         text=True, env=clean_env())
    assert bad.returncode == 2 and "--dryrun" in bad.stderr


def test_doc_mode_epochs_log_each_epoch(tiny_env):
    env = {**tiny_env, "DOC_MODE": "1", "EPOCHS": "2", "TRAIN_SUBSET_DOCS": "48", "TRAIN_SEQ_LEN": "64",
           "TRAIN_BATCH_TOKENS": "1024", "WARMUP_STEPS": "0"}
    del env["ITERATIONS"]
    out = run_trainer(env, ROOT)
    assert out.returncode == 0, out.stderr
    assert "epochs:2 docs:48 docs_per_step:16 steps_per_epoch:3 iterations:6" in out.stdout
    epochs = re.findall(r"^epoch:(\d)/2 train_loss:\S+ val_loss:(\S+) val_ppl:(\S+) val_bpb:\S+$", out.stdout, re.M)
    assert [e[0] for e in epochs] == ["1", "2"]
    assert all(abs(math.exp(float(loss)) - float(ppl)) < 0.01 * float(ppl) for _, loss, ppl in epochs)
    assert summary_of(tiny_env)["steps"] == 6


def test_quant_auto_passes_over_what_does_not_fit(tiny_env):
    env = {**tiny_env, "MODEL_DIM": "256", "ITERATIONS": "3"}  # matrices big enough to be quantized
    assert run_trainer({**env, "QUANT": "int8", "RUN_ID": "q8"}, ROOT).returncode == 0
    int8 = summary_of({**env, "RUN_ID": "q8"})
    out = run_trainer({**env, "QUANT": "auto", "ARTIFACT_LIMIT_BYTES": str(int8["bytes_total"] - 1)}, ROOT)
    assert out.returncode == 0, out.stderr
    summary = summary_of(env)
    tried = summary["quant"]["tried"]
    assert tried[0]["scheme"] == "int8" and not tried[0]["fits"] and tried[0]["bytes_total"] == int8["bytes_total"]
    kept = next(row for row in tried if row["scheme"] == summary["quant"]["scheme"])
    assert kept["fits"] and kept["scheme"] != "int8"
    assert summary["bytes_total"] == kept["bytes_total"] < int8["bytes_total"] and not summary["over_limit"]
    assert abs(summary["roundtrip_val_bpb"] - summary["val_bpb"]) < 0.05
    scheme = kept["scheme"]
    assert re.search(rf"^final_{scheme}_zstd_roundtrip_exact val_loss:\S+ val_bpb:\S+$", out.stdout, re.M)
    assert f"quant:auto chose {scheme}" in out.stdout
    groups = kept["groups"]
    assert {"embedding", "attention", "mlp", "scalars"} <= set(groups)
    assert all(g["compressed_bytes"] <= g["stored_bytes"] * 1.01 + 64 for g in groups.values())
    assert re.search(r"^quant:int8 group:mlp params:\d+ fp32_bytes:\d+ stored_bytes:\d+ compressed_bytes:\d+ ratio:"
                     r"\S+ codes:\S+ floats:\S+$", out.stdout, re.M)


def test_quant_table_compares_every_scheme_on_a_checkpoint(tiny_env, tmp_path):
    env = {**tiny_env, "MODEL_DIM": "128", "ITERATIONS": "2", "CHECKPOINT_EVERY_STEPS": "2"}
    assert run_trainer(env, ROOT).returncode == 0
    checkpoint = next((ROOT / env["LOG_DIR"]).glob("t_step*.ckpt"))
    cmd = [sys.executable, str(ROOT / "tools" / "quant_table.py"), str(checkpoint), "--json", str(tmp_path / "q.json")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "q.json").read_text())
    assert [(r["scheme"], r["rounding"]) for r in rows] == [("none", "-")] + [
        (s, r) for s in ("int8", "int6", "mixed", "int5", "int4") for r in ("clip search", "gptq", "gptq+lqer")]
    assert rows[0]["val_bpb"] == summary_of(env)["val_bpb"]
    by = {(r["scheme"], r["rounding"]): r for r in rows}
    assert by["int6", "gptq"]["bytes_model"] < by["int8", "gptq"]["bytes_model"]
    assert by["int4", "gptq+lqer"]["bytes_model"] > by["int4", "gptq"]["bytes_model"]  # the corrections' bytes
    assert all(abs(r["delta_bpb"]) < 0.05 for r in rows)
    assert "clip search bytes" in out.stdout and len(re.findall(r"^(int\d|mixed) ", out.stdout, re.M)) == 5
    bad = subprocess.run(cmd[:2] + [str(tmp_path / "q.json")], capture_output=True, text=True, env=clean_env())
    assert bad.returncode == 2 and "checkpoint" in bad.stderr and bad.stderr.count("\n") == 1


def test_the_audit_of_doc_mode_keeps_the_documents_and_passes_an_honest_model(tiny_env):
    """The audit's perturbed tokens must not move a BOS: DOC_MODE's windows follow the documents, and
    a moved boundary changed which targets were scored, which read as a look-ahead (exit 4)."""
    done = run_trainer({**tiny_env, "DOC_MODE": "1", "TRAIN_BATCH_TOKENS": "512", "EVAL_AUDIT": "1", "ITERATIONS": "3"},
                       ROOT)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    assert "audit standard:" in done.stdout and "causal:true" in done.stdout
    # Only each document's first TRAIN_SEQ_LEN targets are scored: the lines and the summary say how many.
    fraction = summary_of(tiny_env)["scored_fraction"]
    assert 0.5 < fraction < 1
    assert re.search(rf"^final_prequant_exact val_loss:\S+ val_bpb:\S+ scored_fraction:{fraction:.4f}$", done.stdout, re.M)
    assert re.search(rf"^final_int8_zstd_roundtrip_exact .* scored_fraction:{fraction:.4f}$", done.stdout, re.M)


def test_a_failed_standard_audit_leaves_no_headline_number(tiny_env, monkeypatch):
    """With EVAL_AUDIT=1 the audits come first: when the standard evaluation fails its audit, neither
    the pre-quantization nor the round-trip line carries a number, and the summary says why."""
    import torch

    import train_gpt
    from test_eval import jittery

    leaky_standard = jittery(train_gpt.standard_method, 0.0, leak=True)  # reads the target after its own
    monkeypatch.setitem(train_gpt.EVAL_METHODS, "standard", leaky_standard)
    cfg, notes = train_gpt.load_config({**tiny_env, "EVAL_AUDIT": "1", "EVAL_STRIDE": "32"})
    rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
    summary = train_gpt.run(cfg, rt, train_gpt.Logger(Path(cfg.log_dir) / "t.txt"), notes)
    text = (Path(cfg.log_dir) / "t.txt").read_text()
    assert "audit standard:" in text and "FAILED their audit (standard): not scored" in text
    assert not re.search(r"^final_(prequant|int8_\w+_roundtrip)\S* val_loss:", text, re.M), text[-800:]
    assert summary["val_bpb"] is None and summary["roundtrip_val_bpb"] is None and "standard" in summary["withheld"]
    assert summary["sliding_val_bpb"] > 0  # the other methods passed their audits and are scored


def test_a_tokenizer_other_than_the_shards_was_made_with_is_refused(tiny_env, tmp_path):
    """meta.json names the tokenizer's SHA-256: another one would count another text's bytes (exit 2)."""
    import hashlib

    data = tmp_path / "data"
    shutil.copytree(tiny_env["DATA_PATH"], data)
    right = hashlib.sha256(Path(tiny_env["TOKENIZER_PATH"]).read_bytes()).hexdigest()
    for sha, refused in (("0" * 64, True), (right, False)):
        (data / "meta.json").write_text(json.dumps({"tokenizer_sha256": sha}))
        done = run_trainer({**tiny_env, "DATA_PATH": str(data), "ITERATIONS": "1"}, ROOT)
        assert (done.returncode == 2) == refused, done.stderr[-500:]
        assert ("is not the one the shards" in done.stderr) == refused


def test_validation_bytes_far_from_the_texts_are_flagged(tiny_env, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_env["DATA_PATH"], data)
    summary = None
    for utf8_bytes, flagged in ((10**6, True), (None, False)):
        if utf8_bytes is None:  # the text's own byte count, from the run that was flagged
            utf8_bytes = summary["val_bytes"]
        (data / "meta.json").write_text(json.dumps({"val_utf8_bytes": utf8_bytes}))
        done = run_trainer({**tiny_env, "DATA_PATH": str(data), "ITERATIONS": "1"}, ROOT)
        assert done.returncode == 0, done.stderr[-500:]
        assert ("WARNING val_bytes_mismatch" in done.stdout) == flagged
        summary = summary_of(tiny_env)

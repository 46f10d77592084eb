"""bench.py: the suite's goals, its graph count per depth phase, MFU, and gpu_check.sh's usage."""
import json
import os
import subprocess
import sys

import pytest

import bench
from conftest import ROOT


def row(name, device="cuda:0", **figures):
    return {"name": name, "device": device, "mfu": None, "graphs": None, "tokens_per_s": 0.0, **figures}


@pytest.mark.parametrize("r,met", [
    (row("train baseline", mfu=0.46), True),
    (row("train baseline", mfu=0.44), False),
    (row("train baseline (cpu scale)", device="cpu"), None),
    (row("train recurrent@3", mfu=0.41, graphs=1), True),
    (row("train recurrent@3", mfu=0.41, graphs=2), False),
    (row("train recurrent@2", mfu=0.39, graphs=1), False),
    (row("train recurrent@4 (cpu scale)", device="cpu", graphs=1), True),
    (row("train recurrent@4 (cpu scale)", device="cpu", graphs=3), False),
    (row("train recurrent@4 (cpu scale)", device="cpu"), None),
    (row("train moe_frozen", vs_dense_step_time=1.19), True),
    (row("train moe_frozen (cpu scale)", device="cpu", vs_dense_step_time=1.21), False),
    (row("eval hedge", tokens_per_s=131_000), True),
    (row("eval sliding", tokens_per_s=129_000), False),
    (row("eval hedge (cpu scale)", device="cpu", tokens_per_s=200_000), None),
    (row("eval standard"), None),
])
def test_every_suite_row_is_judged_against_its_goal(r, met):
    goal, verdict = bench.judge(r)
    assert verdict is met and goal


def test_the_suite_counts_one_graph_per_depth_phase_when_compiling(monkeypatch):
    """The recurrent shape at CPU scale, compiled with the backend that needs no C++ compiler: each
    depth phase of the schedule adds exactly one graph."""
    import torch
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="aot_eager", **kw))
    for name, value in dict(COMPILE="1", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="16",
                            TRAIN_BATCH_TOKENS="64", VOCAB_SIZE="64", NUM_VALUE_EMBEDS="0").items():
        monkeypatch.setenv(name, value)
    rows = bench.measure("recurrent", steps=1, warmup=1, cpu_scale=True)
    assert [r["shape"] for r in rows] == ["recurrent@2", "recurrent@3", "recurrent@4"]
    assert [r["graphs"] for r in rows] == [1, 1, 1]


def test_mfu_counts_the_matmuls_and_attention_of_the_current_depth(monkeypatch):
    import train_gpt
    monkeypatch.setenv("BENCH_PEAK_TFLOPS", "1")
    cfg, _ = train_gpt.load_config(dict(VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2",
                                        NUM_KV_HEADS="1", TRAIN_SEQ_LEN="16", NUM_REPEATS="3"))
    model = train_gpt.GPT(cfg.model)
    for repeats in (1, 3):
        model.set_repeats(repeats)
        per_pass = sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)
        flops = 6 * (repeats * per_pass + 64 * 32) + 12 * (2 * repeats) * 32 * 16
        assert bench.mfu(cfg, model, 1e12, bench.peak_tflops()[0]) == pytest.approx(flops)


def test_the_optimizer_benchmark_times_batched_muon_against_one_matrix_at_a_time(monkeypatch):
    for name, value in dict(MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", VOCAB_SIZE="64").items():
        monkeypatch.setenv(name, value)
    row = bench.measure_optimizer("small", repeats=1)
    assert row["matrices"] == 4 * 7 and row["batches"] == 5  # 4 blocks: q, k, v, out, fc, proj, resid_mix
    assert row["batched_ms"] > 0 and row["one_at_a_time_ms"] > 0 and row["speedup"] > 0


def test_gpu_check_refuses_an_unknown_part():
    done = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "everything"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage" in done.stderr
    assert subprocess.run(["bash", "-n", str(ROOT / "tools" / "gpu_check.sh")]).returncode == 0


def run_sh_config(env: dict) -> dict:
    done = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True,
                          env={**os.environ, "DRY_RUN": "1", "NUM_LAYERS": "4", "MODEL_DIM": "192",
                               "WARMDOWN_ITERS": "300", **env})  # the size and warm-down set: nothing to measure
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("config: "))
    return json.loads(line[len("config: "):])


def test_run_sh_keeps_the_corpus_tuned_settings_off_a_users_data(tmp_path):
    """The value embedding, Muon LR and momentum warm-up tuned on the embedded corpus overfit a small
    real text (perf_notes.md 19): on a DATA_PATH of the user's, the harness's defaults hold."""
    cfg = run_sh_config({"DATA_PATH": str(tmp_path)})
    assert (cfg["num_value_embeds"], cfg["matrix_lr"], cfg["muon_momentum_warmup_steps"]) == (0, 0.04, 500)
    assert cfg["max_wallclock_seconds"] == 220.0
    assert run_sh_config({"DATA_PATH": str(tmp_path), "MATRIX_LR": "0.01"})["matrix_lr"] == 0.01


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0),
                                       ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200 NVL", 835.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_mfu_divides_by_the_datasheet_peak_of_the_device_found_and_names_it(monkeypatch, name, peak):
    monkeypatch.delenv("BENCH_PEAK_TFLOPS", raising=False)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None: name)
    tflops, source = bench.peak_tflops()
    assert tflops == peak and name in source and "datasheet" in source


def test_an_unknown_device_is_measured_and_the_env_var_wins(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(bench, "measured_matmul_tflops", lambda: 123.0)
    monkeypatch.delenv("BENCH_PEAK_TFLOPS", raising=False)
    assert bench.peak_tflops() == (123.0, "Some GPU measured 8192^3 bf16 matmul")
    monkeypatch.setenv("BENCH_PEAK_TFLOPS", "500")
    assert bench.peak_tflops() == (500.0, "BENCH_PEAK_TFLOPS")


def test_the_evaluation_benchmark_scores_every_token_with_each_method():
    """A benchmark that times a method without running it (a generator never consumed) reads as fast."""
    tiny = dict(NUM_LAYERS="1", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="64",
                VAL_BATCH_SIZE="4096", COMPILE="0")
    rows = bench.measure_eval("small", 1000, 1, **tiny)
    assert [(r["method"], r["scored"]) for r in rows] == [("standard", 1000), ("sliding", 1000), ("hedge", 1000)]


@pytest.mark.parametrize("tool", ["bench.py", "quant_table.py", "compare_per_token.py", "plot.py", "gpu_check.sh",
                                  "settings_doc.py", "sweep.py"])
def test_every_tool_answers_help(tool):
    launcher = ["bash"] if tool.endswith(".sh") else [sys.executable]
    done = subprocess.run(launcher + [str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage" in done.stdout.lower()

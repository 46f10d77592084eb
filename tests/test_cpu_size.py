"""tools/cpu_size.py: the CPU job's size for the machine's speed, and run.sh's use of it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cpu_size  # noqa: E402

# Steps of a few hundred tokens: the ladder's measurement takes seconds.
QUICK = {"PRESET": "cpu", "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "256", "MAX_WALLCLOCK_SECONDS": "220"}


def fake_speeds(monkeypatch, tokens_per_s: dict):
    """measure() returning the given eager tokens/s a size, with the real block parameter counts."""
    measured = []

    def measure(env, size, steps):
        label = f"{size[0]}x{size[1]}" if size else f"{env['NUM_LAYERS']}x{env['MODEL_DIM']}"
        layers, dim = map(int, label.split("x"))
        measured.append(label)
        return {"size": label, "eager_tokens_per_s": tokens_per_s[label], "block_params": layers * 7 * dim * dim}
    monkeypatch.setattr(cpu_size, "measure", measure)
    return measured


def run_main(monkeypatch, capsys, tmp_path, env: dict, argv=()):
    for name in [*cpu_size.SIZE_VARS, "WARMDOWN_ITERS", "COMPILE", "AUTOCAST", "RUN_ID"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"PRESET": "cpu", "LOG_DIR": str(tmp_path), **env}.items():
        monkeypatch.setenv(name, value)
    assert cpu_size.main(list(argv)) == 0
    return capsys.readouterr()


def exported(out: str) -> dict:
    lines = out.out.splitlines()
    assert len(lines) <= 1 and all(line.startswith("export ") for line in lines), out.out
    return dict(item.split("=", 1) for line in lines for item in line.split()[1:])


def ladder_at(speed: float) -> dict:
    return {f"{a}x{b}": speed for a, b in cpu_size.LADDER}


def test_a_slower_machine_gets_a_smaller_model_and_a_warmdown_fitted_to_its_steps(monkeypatch, capsys, tmp_path):
    widths = {}
    for run_id, speed in (("fast", 20000.0), ("slow", 2500.0)):
        measured = fake_speeds(monkeypatch, ladder_at(speed))
        out = exported(run_main(monkeypatch, capsys, tmp_path, {"RUN_ID": run_id}))
        assert out["RUN_ID"] == run_id
        assert out["WARMDOWN_ITERS"] == str(round(cpu_size.WARMDOWN_SHARE * 220 * speed / 8192))
        # The size whose tokens a block parameter are nearest the probes' best.
        ratio = {(a, b): 220 * speed / (a * 7 * b * b) for a, b in cpu_size.LADDER}
        nearest = min(ratio, key=lambda size: abs(math.log(ratio[size] / cpu_size.TOKENS_PER_PARAM)))
        assert (int(out["NUM_LAYERS"]), int(out["MODEL_DIM"])) == nearest
        # Smallest first, up to the first size below the ratio: the larger ones are further from it still.
        below = next(i for i, size in enumerate(cpu_size.LADDER) if ratio[size] < cpu_size.TOKENS_PER_PARAM)
        assert measured == [f"{a}x{b}" for a, b in cpu_size.LADDER[:below + 1]]
        assert (out["NUM_HEADS"], out["NUM_KV_HEADS"]) == ("4", "2")
        widths[run_id] = nearest[1]
    assert widths["slow"] < widths["fast"]


def test_a_compiled_run_is_planned_at_the_compiled_speed(monkeypatch, capsys, tmp_path):
    fake_speeds(monkeypatch, ladder_at(2500.0))
    out = exported(run_main(monkeypatch, capsys, tmp_path, {"COMPILE": "1"}))
    assert out["WARMDOWN_ITERS"] == str(round(cpu_size.WARMDOWN_SHARE * 220 * 2500 * cpu_size.COMPILE_SPEEDUP / 8192))


def test_the_choice_and_why_go_to_the_runs_log_and_a_relaunch_reuses_it(monkeypatch, capsys, tmp_path):
    fake_speeds(monkeypatch, ladder_at(20000.0))
    out = run_main(monkeypatch, capsys, tmp_path, {"RUN_ID": "r"})
    first = exported(out)
    log = (tmp_path / "r.txt").read_text()
    speeds = log.splitlines()[0]
    assert speeds.startswith("cpu_size: ") and "thread(s), float32, eager: " in speeds
    assert speeds.count(" 20,000 tok/s") >= 2 and f"{cpu_size.LADDER[0][0]}x{cpu_size.LADDER[0][1]} 20,000" in speeds
    assert f"cpu_size: {first['NUM_LAYERS']}x{first['MODEL_DIM']} (the nearest" in log
    assert "cpu_size:" in out.err and "cpu_size:" not in out.out
    events = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["size"]
    assert {**events[0]["exports"], "RUN_ID": "r"} == first
    # A relaunch (a resume) must keep the size its checkpoints have, whatever the machine measures now.
    measured = fake_speeds(monkeypatch, ladder_at(500.0))
    assert exported(run_main(monkeypatch, capsys, tmp_path, {"RUN_ID": "r"})) == first
    assert measured == []
    assert "as the first launch of RUN_ID=r chose" in (tmp_path / "r.txt").read_text()


def test_a_size_you_set_is_kept_and_gets_a_fitted_warmdown(monkeypatch, capsys, tmp_path):
    measured = fake_speeds(monkeypatch, {"2x96": 4000.0})
    out = exported(run_main(monkeypatch, capsys, tmp_path, {"NUM_LAYERS": "2", "MODEL_DIM": "96"}))
    assert measured == ["2x96"]
    assert set(out) == {"WARMDOWN_ITERS", "RUN_ID"}
    assert out["WARMDOWN_ITERS"] == str(round(cpu_size.WARMDOWN_SHARE * 220 * 4000 / 8192))


def test_a_warmdown_you_set_is_kept(monkeypatch, capsys, tmp_path):
    fake_speeds(monkeypatch, ladder_at(20000.0))
    out = exported(run_main(monkeypatch, capsys, tmp_path, {"WARMDOWN_ITERS": "77"}))
    assert "MODEL_DIM" in out and "WARMDOWN_ITERS" not in out


@pytest.mark.parametrize("env", [{"NUM_LAYERS": "2", "WARMDOWN_ITERS": "5"}, {"MAX_WALLCLOCK_SECONDS": "0"}])
def test_nothing_to_fit_prints_nothing_and_measures_nothing(monkeypatch, capsys, tmp_path, env):
    measured = fake_speeds(monkeypatch, {})
    out = run_main(monkeypatch, capsys, tmp_path, env)
    assert out.out == "" and measured == [] and "nothing to choose" in out.err


@pytest.mark.parametrize("args,env,problem", [
    (["--size", "3by160"], {}, "--size '3by160': expected BLOCKSxWIDTH"),
    (["--size", "3x100"], {}, "the width a multiple of 8"),
    (["--size", "3x160"], {"MAX_WALLCLOCK_SECONDS": "0"}, "no wall-clock budget"),
    ([], {"MAX_WALLCLOCK_SECONDS": "soon"}, "MAX_WALLCLOCK_SECONDS='soon'"),
    (["--steps", "0"], {}, "--steps 0: must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, env, problem):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "cpu_size.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PRESET": "cpu", **env})
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and problem in done.stderr, done.stderr
    assert not (tmp_path / "logs").exists()  # nothing written


def test_an_unreadable_metrics_stream_of_the_run_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "r.jsonl").write_text("{not json\n")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "cpu_size.py")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PRESET": "cpu", "RUN_ID": "r"})
    assert done.returncode == 2 and done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "r.jsonl: cannot read the first launch's choice" in done.stderr
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["r.jsonl"]


def run_sh_config(tmp_path, env: dict) -> tuple[dict, str]:
    done = subprocess.run(["bash", str(ROOT / "run.sh")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **QUICK, "DATA_PATH": str(tmp_path), "LOG_DIR": str(tmp_path / "logs"),
                               "DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.startswith("config: "))
    return json.loads(line[len("config: "):]), done.stderr


def test_run_sh_trains_the_measured_size_with_its_warmdown(tmp_path):
    cfg, err = run_sh_config(tmp_path, {})
    assert (cfg["num_layers"], cfg["model_dim"]) in cpu_size.LADDER
    event = json.loads((tmp_path / "logs" / f"{cfg['run_id']}.jsonl").read_text().splitlines()[0])
    assert event["exports"]["WARMDOWN_ITERS"] == str(cfg["warmdown_iters"])
    assert event["size"] == f"{cfg['num_layers']}x{cfg['model_dim']}" and event["eager_tokens_per_s"] > 0
    assert f"cpu_size: {event['size']} (the nearest" in err
    mine, _ = run_sh_config(tmp_path, {"NUM_LAYERS": "2", "MODEL_DIM": "64", "NUM_HEADS": "2"})
    assert (mine["num_layers"], mine["model_dim"], mine["num_heads"]) == (2, 64, 2)

"""records/make_record.py: the runs of N seeds become a folder check.py passes, or nothing is written."""

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env, run_trainer

import train_gpt

MAKE = [sys.executable, str(ROOT / "records" / "make_record.py")]
ARGS = ["--track", "track_cpu_embedded", "--name", "tiny", "--author", "a", "--github-id", "b", "--blurb", "c",
        "--date", "2026-12-03"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, tokenizer_path):
    """Three seeds of one tiny config, and a fourth run with another model width."""
    from conftest import TINY_ENV

    logs = tmp_path_factory.mktemp("runs")
    env = {**TINY_ENV, "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tokenizer_path), "LOG_DIR": str(logs)}
    for seed, extra in (("1337", {}), ("42", {}), ("7", {}), ("8", {"MODEL_DIM": "48"})):
        out = run_trainer({**env, **extra, "SEED": seed, "RUN_ID": f"tiny_seed{seed}"}, ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
    return env, logs


def make(root, summaries, *extra):
    return subprocess.run(MAKE + ARGS + ["--root", str(root), *extra, *map(str, summaries)], capture_output=True,
                          text=True, env=clean_env())


def test_three_seeds_make_a_folder_that_passes_and_whose_packed_code_reproduces_a_seed(runs, tmp_path):
    env, logs = runs
    (tmp_path / "records").mkdir()
    out = make(tmp_path, [logs / f"tiny_seed{s}.json" for s in (1337, 42, 7)])
    folder = tmp_path / "records" / "track_cpu_embedded" / "2026-12-03_tiny"
    assert out.returncode == 0 and f"ok {folder}" in out.stdout, out.stdout + out.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["README.md", "requirements.txt", "submission.json", "train_gpt.py"]
        + [f"train_seed{s}.{ext}" for s in (1337, 42, 7) for ext in ("txt", "json")])
    packed = (folder / "train_gpt.py").read_bytes()
    assert train_gpt.program_of(packed) == train_gpt.program_of((ROOT / "train_gpt.py").read_bytes())
    submission = json.loads((folder / "submission.json").read_text())
    assert submission["track"] == "cpu_embedded" and submission["seeds"] == [1337, 42, 7]
    assert submission["bytes_code"] == len(packed) and "metric" not in submission
    assert set(submission["seed_results"]["42"]) == {"val_loss", "val_bpb", "artifact_bytes", "steps", "step_avg_ms",
                                                     "eval_time_s"}
    assert "zstandard" in (folder / "requirements.txt").read_text()
    readme = (folder / "README.md").read_text()
    assert "NUM_LAYERS=2" in readme and "SEED=$seed" in readme and "python train_gpt.py" in readme
    # The packed file, run from the folder with the README's settings, gives seed 1337's final line again.
    settings = dict(item.split("=", 1) for item in re.search(r"RUN_ID=seed\$seed (.*) \\", readme).group(1).split())
    rerun = subprocess.run([sys.executable, "train_gpt.py"], cwd=folder, capture_output=True, text=True, env={
        **clean_env(), **settings, "SEED": "1337", "RUN_ID": "again", "DATA_PATH": env["DATA_PATH"],
        "TOKENIZER_PATH": env["TOKENIZER_PATH"], "LOG_DIR": str(tmp_path / "again")})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    final = re.compile(r"^final_\S+_roundtrip_exact .*$", re.M)
    assert final.findall(rerun.stdout) == final.findall((folder / "train_seed1337.txt").read_text())


def test_runs_that_disagree_are_refused_and_nothing_is_written(runs, tmp_path):
    _, logs = runs
    (tmp_path / "records").mkdir()
    out = make(tmp_path, [logs / "tiny_seed1337.json", logs / "tiny_seed8.json"])
    assert out.returncode == 2 and "ran different configs: MODEL_DIM=48 vs 32" in out.stderr, out.stderr
    other = tmp_path / "train_gpt.py"
    other.write_text((ROOT / "train_gpt.py").read_text().replace("return 0", "return 0  # the same program", 1)
                     .replace("def main() -> int:", "def main() -> int:\n    pass", 1))
    out = make(tmp_path, [logs / "tiny_seed1337.json", logs / "tiny_seed42.json"], "--code", str(other))
    assert out.returncode == 2 and "the logs ran another program" in out.stderr, out.stderr
    shutil.copy(logs / "tiny_seed42.json", tmp_path / "copy.json")
    shutil.copy(logs / "tiny_seed42.txt", tmp_path / "copy.txt")
    out = make(tmp_path, [logs / "tiny_seed42.json", tmp_path / "copy.json"])
    assert out.returncode == 2 and "two runs share a seed" in out.stderr, out.stderr
    for extra, expected in ((["--code", str(tmp_path / "missing.py")], "not a train_gpt.py that loads"),
                            (["--metric", "prequant"], "metric 'prequant' is not a score"),
                            (["--metric", "sliding"], "has no passed audit of sliding")):
        out = make(tmp_path, [logs / "tiny_seed1337.json", logs / "tiny_seed42.json"], *extra)
        assert out.returncode == 2 and expected in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not list((tmp_path / "records").rglob("*"))


def test_a_run_without_zstandard_says_so_and_so_does_its_record(tmp_path, data_dir, tokenizer_path):
    """zstandard missing: the banner, the summary and the score line say zlib, and the record's README warns."""
    from conftest import TINY_ENV

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "zstandard.py").write_text("raise ImportError('zstandard is blocked for this test')\n")
    env = {**TINY_ENV, "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tokenizer_path),
           "LOG_DIR": str(tmp_path / "logs"), "PYTHONPATH": str(blocker)}
    for seed in ("1", "2"):
        out = run_trainer({**env, "SEED": seed, "RUN_ID": f"z{seed}"}, ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
    log = (tmp_path / "logs" / "z1.txt").read_text()
    assert re.search(r"^world_size:.* compressor:zlib \(zstandard is not installed", log, re.M)
    assert re.search(r"^final_int8_zlib_roundtrip_exact ", log, re.M)
    assert json.loads((tmp_path / "logs" / "z1.json").read_text())["compressor"] == "zlib"
    (tmp_path / "records").mkdir()
    out = make(tmp_path, [tmp_path / "logs" / "z1.json", tmp_path / "logs" / "z2.json"])
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / "records" / "track_cpu_embedded" / "2026-12-03_tiny"
    assert "**The artifact was compressed with zlib, not zstd**" in (folder / "README.md").read_text()
    assert "zstandard" not in (folder / "requirements.txt").read_text().split("\n", 1)[1]
    assert json.loads((folder / "submission.json").read_text())["compressor"] == "zlib"

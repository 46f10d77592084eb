"""records/check.py: a folder passes only when its submission.json is what its logs and code say."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "records"))
import check  # noqa: E402

CHECK = [sys.executable, str(ROOT / "records" / "check.py")]
CODE = b"print('a train_gpt.py')\n"


def log_text(seed: int, loss: float, bpb: float, model_bytes: int, code: int = len(CODE)) -> str:
    return "\n".join([
        f'config: {{"seed": {seed}, "artifact_limit_bytes": 16000000, "num_layers": 4}}',
        "step:10/10 train_loss:1.5000 train_time:100ms step_avg:10.00ms tok_s:1000",
        f"Serialized model int8+zstd: {model_bytes} bytes",
        f"Code size: {code} bytes",
        f"Total submission size int8+zstd: {model_bytes + code} bytes",
        f"final_int8_zstd_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:10ms",
        f"final_int8_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}", ""])


def make_folder(root, name="2026-11-22_x", track="track_cpu_embedded", losses=(1.40, 1.41, 1.39), model_bytes=1000,
                **overrides):
    folder = root / "records" / track / name
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# x\n")
    (folder / "train_gpt.py").write_bytes(CODE)
    seeds = [1337, 42, 7][:len(losses)]
    for seed, loss in zip(seeds, losses):
        (folder / f"train_seed{seed}.txt").write_text(log_text(seed, loss, loss / 2, model_bytes))
    submission = {"author": "a", "github_id": "a", "name": name, "blurb": "b", "date": "2026-11-22",
                  "val_loss": round(sum(losses) / len(losses), 8), "val_bpb": round(sum(losses) / len(losses) / 2, 8),
                  "bytes_total": model_bytes + len(CODE), "bytes_code": len(CODE), "seeds": seeds, **overrides}
    (folder / "submission.json").write_text(json.dumps(submission))
    return folder


def run(*args):
    return subprocess.run(CHECK + [str(a) for a in args], capture_output=True, text=True)


def test_a_good_folder_passes(tmp_path):
    out = run(make_folder(tmp_path))
    assert out.returncode == 0 and out.stdout.startswith("ok "), out.stdout


def test_the_committed_records_pass():
    folders = sorted((ROOT / "records").glob("*/*/"))
    assert folders
    out = run(*folders)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("change,expected", [
    (lambda f: (f / "train_gpt.py").unlink(), "train_gpt.py is missing"),
    (lambda f: (f / "README.md").unlink(), "README.md is missing"),
    (lambda f: [p.unlink() for p in f.glob("*.txt")], "no train log"),
    (lambda f: patch(f, val_bpb="0.7"), "val_bpb has the wrong type"),
    (lambda f: patch(f, seeds=[1337, 42, 8]), "seeds"),
    (lambda f: patch(f, val_bpb=0.71), "val_bpb 0.71 disagrees"),
    (lambda f: patch(f, val_loss=1.4001), "val_loss 1.4001 disagrees"),
    (lambda f: patch(f, bytes_code=len(CODE) + 1), "bytes_code"),
    (lambda f: (f / "train_gpt.py").write_bytes(CODE + b"#"), "not the code that made it"),
    (lambda f: patch(f, bytes_total=999), "bytes_total 999 is not the largest total"),
    (lambda f: patch(f, date="22/11/2026"), "not an ISO date"),
    (lambda f: patch(f, track="track_10min_16mb"), "not the folder's track"),
    (lambda f: patch(f, seed_results={"42": {"val_bpb": 0.1}}), "seed_results for seed 42"),
    (lambda f: patch(f, metric="sliding"), "no final_sliding_exact line"),
])
def test_each_disagreement_is_refused(tmp_path, change, expected):
    folder = make_folder(tmp_path)
    change(folder)
    out = run(folder)
    assert out.returncode == 1 and expected in out.stdout, out.stdout


def patch(folder, **fields):
    path = folder / "submission.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_an_artifact_over_the_limit_is_refused(tmp_path):
    out = run(make_folder(tmp_path, model_bytes=16_000_000))
    assert out.returncode == 1 and "over the limit of 16000000 bytes" in out.stdout


def test_a_record_claim_needs_enough_improvement_at_p_below_one_percent(tmp_path):
    make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.40, 1.40))
    previous = "records/track_cpu_embedded/2026-11-01_old"
    good = make_folder(tmp_path, name="2026-11-22_good", losses=(1.380, 1.381, 1.379), record=True,
                       previous_record=previous)
    assert run(good).returncode == 0
    small = make_folder(tmp_path, name="2026-11-22_small", losses=(1.397, 1.396, 1.398), record=True,
                        previous_record=previous)
    out = run(small)
    assert out.returncode == 1 and "record claim not shown" in out.stdout
    noisy = make_folder(tmp_path, name="2026-11-22_noisy", losses=(1.36, 1.39, 1.37), record=True,
                        previous_record=previous)
    out = run(noisy)
    assert out.returncode == 1 and "p = " in out.stdout
    unnamed = make_folder(tmp_path, name="2026-11-22_unnamed", record=True)
    assert "must name previous_record" in run(unnamed).stdout


@pytest.mark.parametrize("t,dof,p", [(2.92, 2, 0.05), (6.965, 2, 0.01), (2.326, 10**6, 0.01), (0.0, 4, 0.5),
                                     (-1.0, 5, 0.8184)])
def test_student_t_tail(t, dof, p):
    assert math.isclose(check.t_upper_tail(t, dof), p, abs_tol=2e-4)


def test_leaderboard_lists_passing_folders_best_first(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "README.md").write_text("intro\n<!-- leaderboard:start -->\nold\n<!-- leaderboard:end -->\nend\n")
    make_folder(tmp_path, name="2026-11-20_worse", losses=(1.5, 1.5, 1.5))
    make_folder(tmp_path, name="2026-11-21_better", losses=(1.2, 1.2, 1.2))
    broken = make_folder(tmp_path, name="2026-11-22_broken")
    patch(broken, val_bpb=0.1)
    out = run("--leaderboard", "--root", tmp_path)
    assert out.returncode == 1 and "2026-11-22_broken" in out.stderr
    text = (tmp_path / "records" / "README.md").read_text()
    assert text.startswith("intro\n") and text.endswith("end\n") and "old" not in text
    assert text.index("2026-11-21_better") < text.index("2026-11-20_worse") and "broken" not in text
    assert "### track_10min_16mb\n\nNo submissions yet." in text


def test_usage_errors_exit_2(tmp_path):
    assert run().returncode == 2
    out = run(tmp_path / "nothing")
    assert out.returncode == 2 and out.stderr.count("\n") == 1

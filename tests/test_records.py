"""records/check.py: a folder passes only when its submission.json is what its logs and code say."""

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "records"))
import check  # noqa: E402

CHECK = [sys.executable, str(ROOT / "records" / "check.py")]
CODE = b"print('a train_gpt.py')\n"
SEEDS = (1337, 42, 7)
PREVIOUS = "records/track_cpu_embedded/2026-11-01_old"
TOKENIZER = "ab" * 32


def log_text(seed: int, loss: float, bpb: float, model_bytes: int, code: int = len(CODE),
             limit: int = 16_000_000, sha: str = hashlib.sha256(CODE).hexdigest(), tokenizer: str = TOKENIZER,
             doc_mode: bool = False, audits: dict | None = None, extra: tuple = (), end: str = "exit:0") -> str:
    audits = {"standard": "passed", "sliding": "passed", **(audits or {})}
    return "\n".join([
        f'config: {{"seed": {seed}, "artifact_limit_bytes": {limit}, "num_layers": 4, "doc_mode": {json.dumps(doc_mode)}}}',
        f"Code sha256: {sha}",
        f"tokenizer: ./tok.model sha256:{tokenizer}",
        "step:10/10 train_loss:1.5000 train_time:100ms step_avg:10.00ms tok_s:1000",
        *(f"audit {name}: max_prob_sum_error:1.0e-07 causal:true {verdict}" for name, verdict in audits.items()),
        *extra,
        f"final_prequant_exact val_loss:{loss - 0.01:.8f} val_bpb:{bpb - 0.01:.8f}",
        f"Serialized model int8+zstd: {model_bytes} bytes",
        f"Code size: {code} bytes",
        f"Total submission size int8+zstd: {model_bytes + code} bytes",
        f"final_int8_zstd_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:10ms",
        f"final_int8_zstd_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}",
        f"final_sliding_exact val_loss:{loss - 0.02:.8f} val_bpb:{bpb - 0.02:.8f}", *([end] if end else []), ""])


def make_folder(root, name="2026-11-22_x", track="track_cpu_embedded", losses=(1.40, 1.41, 1.39), model_bytes=1000,
                bpb_per_nat=0.5, log=None, **overrides):
    """A passing folder in a fake repo at `root`, with `overrides` applied to its submission.json and
    `log` to its logs."""
    folder = root / "records" / track / name
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# x\n")
    (folder / "train_gpt.py").write_bytes(CODE)
    seeds = list(SEEDS[:len(losses)])
    for seed, loss in zip(seeds, losses):
        (folder / f"train_seed{seed}.txt").write_text(log_text(seed, loss, loss * bpb_per_nat, model_bytes,
                                                                **(log or {})))
    mean = sum(losses) / len(losses)
    date = name[:10] if name[:4].isdigit() else "2026-11-22"  # the folder's date, as make_record.py writes it
    submission = {"author": "a", "github_id": "a", "name": name, "blurb": "b", "date": date,
                  "val_loss": round(mean, 8), "val_bpb": round(mean * bpb_per_nat, 8), "bytes_total": model_bytes + len(CODE),
                  "bytes_code": len(CODE), "seeds": seeds, **overrides}
    (folder / "submission.json").write_text(json.dumps(submission))
    return folder


def patch(folder, **fields):
    path = folder / "submission.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def patch_literal(folder, key, literal):
    """Sets a field to a number written exactly as `literal`, which json.dumps would not keep."""
    path = folder / "submission.json"
    marker = "@@literal@@"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: marker}).replace(f'"{marker}"', literal))


def run(*args, cwd=None):
    return subprocess.run(CHECK + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def test_a_good_folder_passes_from_any_directory(tmp_path):
    folder = make_folder(tmp_path)
    out = run(folder, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == f"ok {folder}\n", out.stdout
    out = run("track_cpu_embedded/2026-11-22_x", cwd=tmp_path / "records")
    assert out.returncode == 0, out.stdout


def test_the_committed_records_pass():
    folders = sorted(p for p in (ROOT / "records").glob("*/*") if p.is_dir())
    assert folders
    out = run(*folders)
    assert out.returncode == 0, out.stdout


def write_log(folder, seed, **changes):
    (folder / f"train_seed{seed}.txt").write_text(log_text(seed, 1.40, 0.70, 1000, **changes))


@pytest.mark.parametrize("change,expected", [
    (lambda f: (f / "train_gpt.py").unlink(), "train_gpt.py is missing"),
    (lambda f: (f / "README.md").unlink(), "README.md is missing"),
    (lambda f: (f / "submission.json").unlink(), "submission.json is missing"),
    (lambda f: [p.unlink() for p in f.glob("*.txt")], "no train log"),
    (lambda f: (f / "submission.json").write_text("{"), "submission.json does not parse"),
    (lambda f: patch(f, val_bpb="0.7"), "val_bpb has the wrong type (str)"),
    (lambda f: patch(f, bytes_total=1024.0), "bytes_total has the wrong type (float)"),
    (lambda f: patch(f, record="yes"), "record has the wrong type (str)"),
    (lambda f: patch(f, seeds=[True, 42, 7]), "seeds must be a non-empty list of distinct integers"),
    (lambda f: patch(f, author=None), "author has the wrong type (null)"),
    (lambda f: patch(f, date="20261122"), "not an ISO date"),
    (lambda f: patch(f, track="track_10min_16mb"), "not the folder's track"),
    (lambda f: patch(f, seeds=[1337, 42, 8]), "the logs' seeds [7, 42, 1337] are not submission.json's seeds"),
    (lambda f: patch(f, seeds=[1337, 42]), "the logs' seeds"),
    (lambda f: (f / "extra.log").write_text(log_text(42, 1.4, 0.7, 1000)), "repeats seed 42"),
    (lambda f: (f / "notes.txt").write_text("no config here\n"), "notes.txt has no config line"),
    (lambda f: patch(f, val_bpb=0.71), "val_bpb 0.71 disagrees with the logs' mean 0.70000000"),
    (lambda f: patch(f, val_loss=1.4001), "val_loss 1.4001 disagrees"),
    (lambda f: patch_literal(f, "val_loss", "1.40000200"), "val_loss 1.400002 disagrees"),
    (lambda f: patch(f, bytes_code=len(CODE) + 1), "bytes_code 25 is not train_gpt.py's size 24"),
    (lambda f: (f / "train_gpt.py").write_bytes(CODE + b"#"), "not the code that made it"),
    (lambda f: write_log(f, 42, code=99), "train_seed42.txt says Code size 99"),
    (lambda f: patch(f, bytes_total=999), "bytes_total 999 is not the largest total"),
    (lambda f: patch(f, seed_results={"42": {"val_bpb": 0.1}}), "seed_results for seed 42: val_bpb 0.1 disagrees"),
    (lambda f: patch(f, seed_results={"5": {}}), "seed_results names seed '5', which has no log"),
    (lambda f: patch(f, metric="int6_lzma_roundtrip"), "no final_int6_lzma_roundtrip_exact line"),
    (lambda f: write_log(f, 42, limit=1000), "over the limit of 1000 bytes"),
])
def test_each_disagreement_is_refused(tmp_path, change, expected):
    folder = make_folder(tmp_path)
    change(folder)
    out = run(folder)
    assert out.returncode == 1 and expected in out.stdout, out.stdout
    assert "Traceback" not in out.stderr


def test_every_problem_is_listed_not_just_the_first(tmp_path):
    folder = make_folder(tmp_path, name="x")
    (folder / "README.md").unlink()
    patch(folder, val_bpb=0.9, bytes_code=1)
    lines = run(folder).stdout.splitlines()
    for expected in ("README.md is missing", "YYYY-MM-DD_<name>", "val_bpb 0.9 disagrees", "bytes_code 1 is not"):
        assert any(expected in line for line in lines), lines
    assert all(line.startswith(f"{folder}: ") for line in lines)


def test_rounded_figures_pass_and_another_metric_can_be_scored(tmp_path):
    folder = make_folder(tmp_path, losses=(1.40001234, 1.41002345, 1.39003456))
    patch_literal(folder, "val_loss", "1.4000")  # the mean is 1.40002345: within rounding
    assert run(folder).returncode == 0
    patch(folder, metric="sliding", val_loss=1.38002345, val_bpb=round(1.40002345 / 2 - 0.02, 8))
    out = run(folder)
    assert out.returncode == 0, out.stdout


def test_an_artifact_over_16mb_is_refused(tmp_path):
    out = run(make_folder(tmp_path, model_bytes=16_000_000))
    assert out.returncode == 1 and "over the limit of 16000000 bytes" in out.stdout


def claim(tmp_path, name, losses, **fields):
    return make_folder(tmp_path, name=name, losses=losses, record=True, **{"previous_record": PREVIOUS, **fields})


def test_a_real_improvement_passes_and_prints_its_p_value(tmp_path):
    make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.40, 1.40))
    out = run(claim(tmp_path, "2026-11-22_good", (1.380, 1.381, 1.379)))
    assert out.returncode == 0 and "record claim shown: mean improvement 0.02000" in out.stdout, out.stdout
    p = float(out.stdout.split("p = ")[1].split()[0])
    assert 0 < p < 0.01


@pytest.mark.parametrize("name,losses,fields,expected", [
    ("2026-11-22_small", (1.397, 1.396, 1.398), {}, "mean improvement 0.00300"),
    ("2026-11-22_noisy", (1.36, 1.39, 1.37), {}, "p = 0.0667 (needs < 0.01)"),
    ("2026-11-22_single", (1.30,), {}, "needs at least 2 seeds"),
    ("2026-11-22_nowhere", (1.30, 1.30), {"previous_record": "records/track_cpu_embedded/2026-01-01_gone"},
     "does not exist"),
])
def test_a_record_claim_without_a_significant_improvement_is_refused(tmp_path, name, losses, fields, expected):
    make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.40, 1.40))
    folder = claim(tmp_path, name, losses)
    if fields:
        patch(folder, **fields)
    out = run(folder)
    assert out.returncode == 1 and expected in out.stdout, out.stdout


def test_a_record_claim_must_name_the_previous_record(tmp_path):
    out = run(make_folder(tmp_path, record=True))
    assert out.returncode == 1 and "must name previous_record" in out.stdout, out.stdout


def test_a_record_claim_over_a_failing_previous_record_is_refused(tmp_path):
    old = make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.40, 1.40))
    patch(old, val_loss=1.5)
    out = run(claim(tmp_path, "2026-11-22_good", (1.380, 1.381, 1.379)))
    assert out.returncode == 1 and "does not pass its own checks" in out.stdout, out.stdout


@pytest.mark.parametrize("t,dof,p,tol", [(2.92, 2, 0.05, 2e-4), (6.965, 2, 0.01, 2e-5), (2.326, 10**6, 0.01, 2e-4),
                                         (0.0, 4, 0.5, 1e-12), (-1.0, 5, 0.8184, 2e-4), (1.0, 1, 0.25, 1e-12)])
def test_student_t_tail(t, dof, p, tol):
    assert math.isclose(check.t_upper_tail(t, dof), p, abs_tol=tol)


@pytest.mark.parametrize("a,b,x,expected", [(1, 1, 0.3, 0.3), (3, 1, 0.6, 0.6 ** 3), (1, 2, 0.9, 1 - 0.1 ** 2)])
def test_incomplete_beta_against_closed_forms(a, b, x, expected):
    assert math.isclose(check.incomplete_beta(a, b, x), expected, rel_tol=1e-12)


def fake_repo_with_readme(tmp_path):
    (tmp_path / "records").mkdir()
    shutil.copy(ROOT / "records" / "README.md", tmp_path / "records" / "README.md")
    return (ROOT / "records" / "README.md").read_text()


def test_leaderboard_lists_passing_folders_best_first(tmp_path):
    original = fake_repo_with_readme(tmp_path)
    make_folder(tmp_path, name="2026-11-20_worse", losses=(1.5, 1.5, 1.5))
    make_folder(tmp_path, name="2026-11-21_better", losses=(1.2, 1.2, 1.2), author="b|c")
    broken = make_folder(tmp_path, name="2026-11-22_broken")
    patch(broken, val_bpb=0.1)
    out = run("--leaderboard", "--root", tmp_path, cwd=tmp_path)
    assert out.returncode == 1 and "2026-11-22_broken: submission.json val_bpb" in out.stderr
    text = (tmp_path / "records" / "README.md").read_text()
    assert text.split(check.START)[0] == original.split(check.START)[0]
    assert text.split(check.END)[1] == original.split(check.END)[1]
    board = text.split(check.START)[1].split(check.END)[0]
    assert board.index("2026-11-21_better") < board.index("2026-11-20_worse") and "broken" not in board
    assert "| 0.6000 | 1.2000 | 1,024 | 3 | 2026-11-21 | [2026-11-21_better](track_cpu_embedded/2026-11-21_better/) " \
           "| b\\|c |" in board
    assert "### track_10min_16mb\n\nNo submissions yet." in board


def test_leaderboard_of_no_folders_says_so(tmp_path):
    fake_repo_with_readme(tmp_path)
    assert run("--leaderboard", "--root", tmp_path).returncode == 0
    board = (tmp_path / "records" / "README.md").read_text().split(check.START)[1].split(check.END)[0]
    assert board.count("No submissions yet.") == len(check.TRACKS) and "|" not in board


def test_usage_errors_exit_2(tmp_path):
    assert run().returncode == 2
    out = run(tmp_path / "nothing")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert run("--leaderboard", "--root", tmp_path).returncode == 2  # no records/README.md


# The fooling cases of issue 16: each was passed by the old checker --------------------------------

@pytest.mark.parametrize("metric", ["prequant", "swa", "int8_zstd"])
def test_the_unquantized_model_or_any_unaudited_line_is_not_a_score(tmp_path, metric):
    folder = make_folder(tmp_path)
    patch(folder, metric=metric)
    out = run(folder)
    assert out.returncode == 1 and f"metric {metric!r} is not a score" in out.stdout, out.stdout


def test_a_method_is_a_score_only_where_every_log_passed_its_audit(tmp_path):
    folder = make_folder(tmp_path)
    patch(folder, metric="sliding", val_loss=1.38, val_bpb=0.68)
    assert run(folder).returncode == 0
    write_log(folder, 42, audits={"sliding": "FAILED"})
    assert "train_seed42.txt has no passed audit of sliding" in run(folder).stdout
    (folder / "train_seed42.txt").write_text(log_text(42, 1.40, 0.70, 1000).replace("audit sliding", "audit other"))
    out = run(folder)
    assert out.returncode == 1 and "train_seed42.txt has no passed audit of sliding" in out.stdout, out.stdout


@pytest.mark.parametrize("extra,end,expected", [
    (("audit hedge: max_prob_sum_error:1.0e-07 causal:false FAILED",), "exit:4", "reports: audit hedge"),
    (("final_hedge FAILED its audit: not scored",), "exit:0", "reports: final_hedge FAILED"),
    (("WARNING below_source_entropy: val_bpb 0.4000 < source_bpb 0.4377: the evaluation is wrong",), "exit:0",
     "reports: WARNING below_source_entropy"),
    (("WARNING val_bytes_mismatch: the scored targets stand for 10 bytes",), "exit:0", "reports: WARNING val_bytes"),
    ((), "exit:4", "ended with exit:4"),
    ((), "", "has no exit: line: the run did not finish"),
    (("error: rank 1: a collective with the other ranks failed",), "exit:0", "reports: error: rank 1"),
])
def test_a_log_that_reports_a_failure_or_did_not_finish_is_refused(tmp_path, extra, end, expected):
    folder = make_folder(tmp_path)
    write_log(folder, 42, extra=extra, end=end)
    out = run(folder)
    assert out.returncode == 1 and expected in out.stdout, out.stdout


def test_code_of_the_same_size_but_other_bytes_is_refused(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "train_gpt.py").write_bytes(CODE.replace(b"a", b"b"))
    out = run(folder)
    assert out.returncode == 1 and "ran code with SHA-256" in out.stdout and "Code size" not in out.stdout, out.stdout
    write_log(folder, 42, sha="")
    assert "train_seed42.txt has no Code sha256 line" in run(folder).stdout


def test_a_claim_must_beat_the_tracks_best_not_an_older_record(tmp_path):
    """A 1.35 claim against an old 1.40 while 1.30 stands passed with p = 8e-5."""
    make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.41, 1.39), date="2026-11-01")
    make_folder(tmp_path, name="2026-11-10_best", losses=(1.30, 1.31, 1.29), date="2026-11-10")
    out = run(claim(tmp_path, "2026-11-22_claim", (1.350, 1.351, 1.349)))
    assert out.returncode == 1 and ("previous_record records/track_cpu_embedded/2026-11-01_old is not the track's "
                                    "best before this claim: records/track_cpu_embedded/2026-11-10_best") in out.stdout
    # A folder dated after the claim does not count against it.
    make_folder(tmp_path, name="2026-12-01_later", losses=(1.20, 1.21, 1.19), date="2026-12-01")
    out = run(claim(tmp_path, "2026-11-23_claim", (1.250, 1.251, 1.249), previous_record=PREVIOUS.replace(
        "2026-11-01_old", "2026-11-10_best")))
    assert out.returncode == 0 and "record claim shown" in out.stdout, out.stdout


def test_identical_seed_losses_show_no_significance(tmp_path):
    make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.40, 1.40))
    out = run(claim(tmp_path, "2026-11-22_same", (1.30, 1.30, 1.30)))
    assert out.returncode == 1 and "scores are all equal (1.3)" in out.stdout, out.stdout


def test_claims_across_tokenizers_are_tested_in_bits_per_byte(tmp_path):
    """Fewer nats per token with a tokenizer of shorter tokens is no gain: bits per byte decide."""
    make_folder(tmp_path, name="2026-11-01_old", losses=(1.40, 1.40, 1.40))
    other = {"tokenizer": "cd" * 32}
    out = run(claim(tmp_path, "2026-11-22_short_tokens", (1.20, 1.21, 1.19), bpb_per_nat=0.6, log=other))
    assert out.returncode == 1 and "bits per byte (the tokenizers differ)" in out.stdout, out.stdout
    out = run(claim(tmp_path, "2026-11-23_better_bytes", (1.30, 1.31, 1.29), bpb_per_nat=0.5 * 1.30 / 1.40 * 0.9,
                    log=other))
    assert out.returncode == 0 and "bits per byte (the tokenizers differ)" in out.stdout, out.stdout


def test_logs_of_different_tokenizers_are_refused(tmp_path):
    folder = make_folder(tmp_path)
    write_log(folder, 42, tokenizer="cd" * 32)
    out = run(folder)
    assert out.returncode == 1 and "the logs scored with different tokenizers" in out.stdout, out.stdout


@pytest.mark.parametrize("track,refused", [("track_10min_16mb", True), ("track_non_record_16mb", True),
                                           ("track_cpu_embedded", False)])
def test_doc_mode_is_refused_on_the_stream_tracks(tmp_path, track, refused):
    folder = make_folder(tmp_path, track=track, log={"doc_mode": True})
    out = run(folder)
    assert (out.returncode == 1 and "ran with DOC_MODE" in out.stdout) == refused, out.stdout


# The challenge's own folders: their logs' shapes, their submission.json fields ---------------------

CHALLENGE_CODE = b"print('the challenge baseline')\n" * 3


def challenge_log(seed: int, loss: float, bpb: float, model_bytes: int, code: int = len(CHALLENGE_CODE),
                  compressed: bool = False) -> str:
    """A log in the shape of the challenge's records (2026-03 baseline and its successors)."""
    code_lines = ([f"Code size (uncompressed): {code * 5} bytes", f"Code size (compressed): {code} bytes"]
                  if compressed else [f"Code size: {code} bytes"])
    return "\n".join([
        f"seed:{seed}", "step:20000/20000 val_loss:2.0600 val_bpb:1.2200 train_time:600000ms",
        "Serialized model: 67224983 bytes", *code_lines, "Total submission size: 67272625 bytes",
        f"Serialized model int8+zlib: {model_bytes} bytes (payload:17178912 raw_torch:17224025 payload_ratio:3.91x)",
        f"Total submission size int8+zlib: {model_bytes + code} bytes",
        f"final_int8_zlib_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:1400ms",
        f"final_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}", ""])


def challenge_folder(root, name="2026-03-18_baseline", folder_track="track_10min_16mb", losses=(2.07, 2.08, 2.06),
                     model_bytes=15_800_000, **overrides):
    folder = root / "records" / folder_track / name
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("# x\n")
    (folder / "train_gpt.py").write_bytes(CHALLENGE_CODE)
    (folder / "requirements.txt").write_text("zstandard\n")  # not a log
    for seed, loss in zip(SEEDS, losses):
        (folder / f"train_seed{seed}.log").write_text(challenge_log(seed, loss, loss * 0.59, model_bytes + seed))
    mean = sum(losses) / len(losses)
    submission = {"author": "a", "github_id": "a", "name": name, "blurb": "b", "date": "2026-03-18T14:56:29Z",
                  "track": "10min_16mb", "val_loss": round(mean, 8), "val_bpb": round(mean * 0.59, 8),
                  "bytes_total": model_bytes + 1337 + len(CHALLENGE_CODE), **overrides}
    (folder / "submission.json").write_text(json.dumps(submission))
    return folder


def test_the_challenges_own_folders_pass_in_their_shapes(tmp_path):
    """Their seeds from `seed:` lines, an ISO date and time, `track: 10min_16mb`, one seed's bytes_total, no
    bytes_code or seeds fields, and `Serialized model …: N bytes (payload…)` lines."""
    folder = challenge_folder(tmp_path)
    out = run(folder)
    assert out.returncode == 0 and "not this harness's" in out.stdout, out.stdout
    (folder / "train.log").write_bytes((folder / "train_seed1337.log").read_bytes())  # as several of theirs do
    out = run(folder)
    assert out.returncode == 0 and "train_seed1337.log is a copy of train.log: read once" in out.stdout, out.stdout
    other = challenge_folder(tmp_path, name="2026-03-19_other", folder_track="track_non_record_16mb",
                             track="non-record-unlimited-compute-16mb")
    assert run(other).returncode == 0, run(other).stdout


@pytest.mark.parametrize("change,expected", [
    (lambda f: patch(f, val_bpb=1.2), "val_bpb 1.2 disagrees"),
    (lambda f: (f / "train_gpt.py").write_bytes(CHALLENGE_CODE + b"#"), "not the code that made it"),
    (lambda f: patch(f, bytes_total=15_900_000), "bytes_total 15900000 is not the largest total"),
    (lambda f: patch(f, seeds=[1, 2, 3]), "are not submission.json's seeds"),
    (lambda f: patch(f, track="cpu_embedded"), "not the folder's track"),
    (lambda f: (f / "train_seed42.log").write_text(challenge_log(42, 2.07, 1.22, 16_000_000)),
     "train_seed42.log's Total submission size 16000096 is over the limit"),
    (lambda f: (f / "train_seed42.log").write_text(challenge_log(42, 2.07, 1.22, 1000).replace(
        "final_int8_zlib_roundtrip_exact", "final_int8_zlib_sliding_exact")), "score different things"),
    (lambda f: (f / "train_seed42.log").write_text(challenge_log(1337, 2.07, 1.22, 1000)), "repeats seed 1337"),
    (lambda f: patch(f, seed_results={"42": {"val_bpb": round(2.08 * 0.59, 8), "artifact_bytes": 15_000_000}}),
     "seed_results for seed 42: artifact_bytes 15000000 is not train_seed42.log's Total submission size"),
])
def test_tampered_copies_of_the_challenges_folders_are_refused(tmp_path, change, expected):
    folder = challenge_folder(tmp_path)
    change(folder)
    out = run(folder)
    assert out.returncode == 1 and expected in out.stdout, out.stdout


def test_a_packed_train_gpt_counts_its_compressed_size_and_is_tied_by_its_program(tmp_path):
    import train_gpt

    program = "print('the program')\n" * 50
    packed = train_gpt.pack_program(program)
    assert check.packed_program(packed) == program.encode()
    source_sha = hashlib.sha256(b"# the source, with comments\n" + program.encode()).hexdigest()
    program_line = f"Program sha256: {hashlib.sha256(program.encode()).hexdigest()}"
    folder = make_folder(tmp_path, log={"code": len(packed), "sha": source_sha, "extra": (program_line,)})
    (folder / "train_gpt.py").write_bytes(packed)
    patch(folder, bytes_code=len(packed), bytes_total=1000 + len(packed))
    out = run(folder)
    assert out.returncode == 0, out.stdout
    # Another program packed, or the same literal behind a wrapper that runs something else: refused.
    wrapper_end = packed.rindex(b'"""') + 3
    other_wrapper = packed[:wrapper_end] + b"\nprint('not the program')".ljust(len(packed) - wrapper_end, b"#")
    for tampered in (train_gpt.pack_program(program.replace("the program", "the pr0gram")), other_wrapper):
        (folder / "train_gpt.py").write_bytes(tampered)
        out = run(folder)
        assert out.returncode == 1 and "ran code with SHA-256" in out.stdout, out.stdout


def test_a_claim_can_beat_the_challenges_own_best(tmp_path):
    """The challenge's folders stand as previous records at their submission.json's figures."""
    challenge_folder(tmp_path, name="2026-03-18_old", losses=(2.07, 2.08, 2.06))
    best = challenge_folder(tmp_path, name="2026-03-20_best", losses=(2.00, 2.01, 1.99))
    patch(best, val_loss=1.0)  # its logs no longer agree: it stands at its claim all the same
    folder = make_folder(tmp_path, name="2026-11-22_claim", track="track_10min_16mb", losses=(0.98, 0.97, 0.99),
                         bpb_per_nat=0.59, record=True, previous_record="records/track_10min_16mb/2026-03-18_old")
    out = run(folder)
    assert out.returncode == 1 and "is not the track's best before this claim" in out.stdout, out.stdout
    patch(folder, previous_record="records/track_10min_16mb/2026-03-20_best")
    out = run(folder)
    assert "is the challenge's own folder, taken at its submission.json's figures" in out.stdout, out.stdout
    assert out.returncode == 0 and "record claim shown" in out.stdout, out.stdout


def test_the_cpu_track_takes_only_this_harness_logs(tmp_path):
    folder = challenge_folder(tmp_path, folder_track="track_cpu_embedded", track="cpu_embedded",
                              bytes_code=len(CHALLENGE_CODE), seeds=list(SEEDS))
    out = run(folder)
    assert out.returncode == 1 and "has no config line" in out.stdout, out.stdout


def test_a_harness_folder_cannot_pass_as_the_challenges_by_dropping_its_config_lines(tmp_path):
    folder = make_folder(tmp_path, track="track_10min_16mb")
    for log in folder.glob("*.txt"):
        log.write_text(re.sub(r"^config: .*\"seed\": (\d+).*$", r"seed:\1", log.read_text(), flags=re.M))
    out = run(folder)
    assert out.returncode == 1 and "has no config line" in out.stdout and "not this harness's" not in out.stdout


def test_the_challenges_logs_never_score_the_unquantized_model(tmp_path):
    folder = challenge_folder(tmp_path)
    for log in folder.glob("*.log"):
        text = log.read_text()
        log.write_text(text + text.splitlines()[-1].replace("final_int8_zlib_roundtrip_exact", "final_prequant_exact")
                       + "\n")
    out = run(folder)
    assert out.returncode == 1 and "unquantized model's (prequant): not a score" in out.stdout, out.stdout


def test_a_folder_of_only_a_submission_does_not_stand_as_a_previous_record(tmp_path):
    junk = tmp_path / "records" / "track_10min_16mb" / "2026-01-01_junk"
    junk.mkdir(parents=True)
    (junk / "submission.json").write_text(json.dumps({"author": "a", "github_id": "a", "name": "n", "blurb": "b",
                                                      "val_bpb": 9.0, "bytes_total": 1, "date": "2026-01-01"}))
    undated = challenge_folder(tmp_path, name="2026-01-02_undated")
    patch(undated, date=None)
    folder = make_folder(tmp_path, name="2026-11-22_claim", track="track_10min_16mb", losses=(0.98, 0.97, 0.99),
                         record=True, previous_record="records/track_10min_16mb/2026-01-01_junk")
    out = run(folder)
    assert out.returncode == 1 and "2026-01-01_junk does not pass its own checks" in out.stdout, out.stdout
    challenge_folder(tmp_path, name="2026-01-03_standing")
    patch(folder, date="03/12/2026", previous_record="records/track_10min_16mb/2026-01-03_standing")
    out = run(folder)
    assert out.returncode == 1 and "not an ISO date" in out.stdout and "Traceback" not in out.stderr, out.stderr
    out = run("--leaderboard", "--root", tmp_path)
    assert "Traceback" not in out.stderr, out.stderr


def test_a_harness_folders_date_is_its_names(tmp_path):
    folder = make_folder(tmp_path, date="2026-01-01")
    out = run(folder)
    assert out.returncode == 1 and "date 2026-01-01 is not the folder's 2026-11-22" in out.stdout, out.stdout


def test_the_leaderboard_lists_a_challenge_folder_without_val_loss_or_seeds(tmp_path):
    fake_repo_with_readme(tmp_path)
    folder = challenge_folder(tmp_path)
    path = folder / "submission.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "val_loss"}))
    out = run("--leaderboard", "--root", tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| - | 15,801,433 | - | 2026-03-18T14:56:29Z |" in (tmp_path / "records" / "README.md").read_text()

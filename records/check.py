"""Checks record folders against their own logs, and regenerates the leaderboard.

    python records/check.py FOLDER [FOLDER ...]
    python records/check.py --leaderboard [--root REPO]

A folder passes when its files are there, submission.json's figures are what its logs say (the mean
of the seeds' final lines) and what its train_gpt.py weighs, the total fits the byte limit, and a
record claim beats the previous record by at least 0.005 nats at p < 0.01 over its seeds. Exit 0
when every folder passes, 1 with one line per problem otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from pathlib import Path

TRACKS = ("track_10min_16mb", "track_non_record_16mb", "track_cpu_embedded")
REQUIRED = {"author": str, "github_id": str, "name": str, "blurb": str, "date": str, "val_loss": (int, float),
            "val_bpb": (int, float), "bytes_total": int, "bytes_code": int, "seeds": list}
DEFAULT_LIMIT = 16_000_000
MIN_IMPROVEMENT = 0.005  # nats, as the challenge asks of a new record
MAX_P = 0.01
START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"


class UsageError(Exception):
    pass


# Student's t distribution, for the significance of a record claim ---------------------------------

def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by Lentz's continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * result


def t_upper_tail(t: float, dof: int) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))
    return tail if t >= 0 else 1.0 - tail


def improvement_p_value(losses: list[float], previous: float) -> tuple[float, float]:
    """Mean improvement over the previous record, and the one-sided p-value of it being at least
    MIN_IMPROVEMENT (one-sample t-test of the seeds' losses against previous - MIN_IMPROVEMENT)."""
    n = len(losses)
    mean = sum(losses) / n
    improvement = previous - mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1))
    if sd == 0:
        return improvement, 0.0 if improvement > MIN_IMPROVEMENT else 1.0
    t = (improvement - MIN_IMPROVEMENT) / (sd / math.sqrt(n))
    return improvement, t_upper_tail(t, n - 1)


# Logs -----------------------------------------------------------------------------------------

def read_log(path: Path) -> dict:
    """What check.py needs from one of the harness's logs."""
    text = path.read_text(errors="replace")
    log = {"path": path, "finals": {}}
    config = re.search(r"^config: (\{.*\})$", text, re.M)
    if config:
        try:
            log["config"] = json.loads(config.group(1))
        except json.JSONDecodeError:
            pass
    for key, pattern in (("code", r"^Code size: (\d+) bytes$"), ("total", r"^Total submission size \S+: (\d+) bytes$"),
                         ("model", r"^Serialized model \S+: (\d+) bytes$")):
        found = re.findall(pattern, text, re.M)
        if found:
            log[key] = int(found[-1])
    for name, loss, bpb in re.findall(r"^final_(\S+)_exact val_loss:(\S+) val_bpb:(\S+)$", text, re.M):
        log["finals"][name] = (float(loss), float(bpb))
    return log


def metric_of(log: dict, metric: str | None) -> tuple[float, float] | None:
    if metric:
        return log["finals"].get(metric)
    roundtrips = [name for name in log["finals"] if name.endswith("_roundtrip")]
    return log["finals"][roundtrips[-1]] if roundtrips else None


# One folder -----------------------------------------------------------------------------------

def repo_root(folder: Path) -> Path:
    for parent in folder.resolve().parents:
        if parent.name == "records":
            return parent.parent
    raise UsageError(f"{folder}: not inside a records/ folder")


def check_folder(folder: Path, seen: tuple = ()) -> tuple[list[str], dict | None]:
    """Problems with one folder (empty when it passes), and its submission.json."""
    problems = []
    say = problems.append
    if folder.parent.name not in TRACKS:
        say(f"the folder is not in a track folder ({', '.join(TRACKS)})")
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}_\S+", folder.name):
        say("the folder name is not YYYY-MM-DD_<name>")
    for name in ("README.md", "submission.json", "train_gpt.py"):
        if not (folder / name).is_file():
            say(f"{name} is missing")
    logs = sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".log") and p.is_file())
    if not logs:
        say("no train log (*.txt or *.log)")
    try:
        submission = json.loads((folder / "submission.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        if (folder / "submission.json").is_file():
            say(f"submission.json does not parse ({e})")
        return problems, None
    if not isinstance(submission, dict):
        return problems + ["submission.json is not an object"], None
    for key, kind in REQUIRED.items():
        if key not in submission:
            say(f"submission.json lacks {key}")
        elif isinstance(submission[key], bool) or not isinstance(submission[key], kind):
            say(f"submission.json {key} has the wrong type ({type(submission[key]).__name__})")
    if problems:
        return problems, submission
    check_fields(submission, folder, say)
    check_logs(submission, folder, [read_log(p) for p in logs], say, seen)
    return problems, submission


def check_fields(submission: dict, folder: Path, say):
    try:
        datetime.date.fromisoformat(submission["date"])
    except ValueError:
        say(f"submission.json date {submission['date']!r} is not an ISO date")
    seeds = submission["seeds"]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) != len(seeds):
        say("submission.json seeds must be a non-empty list of distinct integers")
    if "track" in submission and submission["track"] != folder.parent.name:
        say(f"submission.json track {submission['track']!r} is not the folder's track {folder.parent.name!r}")


def close(claimed: float, actual: float) -> bool:
    """Submissions may round to 4 decimals; with more decimals they must match the logs' mean."""
    decimals = len(repr(float(claimed)).split(".")[1]) if "." in repr(float(claimed)) else 0
    return abs(claimed - actual) <= (5e-5 if decimals <= 4 else 1e-6)


def check_logs(submission: dict, folder: Path, logs: list[dict], say, seen: tuple):
    metric = submission.get("metric")
    by_seed = {}
    for log in logs:
        name = log["path"].name
        seed = log.get("config", {}).get("seed")
        if seed is None:
            say(f"{name} has no config line with a seed")
            continue
        if seed in by_seed:
            say(f"{name} repeats seed {seed}")
        by_seed[seed] = log
        if metric_of(log, metric) is None:
            say(f"{name} has no final_{metric or '<scheme>_<compressor>_roundtrip'}_exact line")
    if set(by_seed) != set(submission["seeds"]) or len(logs) != len(submission["seeds"]):
        say(f"the logs' seeds {sorted(by_seed)} are not submission.json's seeds {sorted(submission['seeds'])} "
            f"(one log a seed)")
    values = [metric_of(log, metric) for log in by_seed.values()]
    if not values or None in values:
        return
    losses = [v[0] for v in values]
    for index, key in ((0, "val_loss"), (1, "val_bpb")):
        mean = sum(v[index] for v in values) / len(values)
        if not close(submission[key], mean):
            say(f"submission.json {key} {submission[key]} disagrees with the logs' mean {mean:.8f}")
    check_bytes(submission, folder, list(by_seed.values()), say)
    seed_results = submission.get("seed_results", {})
    for seed, result in seed_results.items() if isinstance(seed_results, dict) else ():
        log = by_seed.get(int(seed)) if str(seed).lstrip("-").isdigit() else None
        if log is None or not isinstance(result, dict):
            say(f"seed_results names seed {seed}, which has no log")
            continue
        loss, bpb = metric_of(log, metric)
        if ("val_loss" in result and not close(result["val_loss"], loss)) or (
                "val_bpb" in result and not close(result["val_bpb"], bpb)):
            say(f"seed_results for seed {seed} disagree with {log['path'].name}")
    if submission.get("record"):
        check_record(submission, folder, losses, say, seen)


def check_bytes(submission: dict, folder: Path, logs: list[dict], say):
    code = (folder / "train_gpt.py").read_bytes()
    if submission["bytes_code"] != len(code):
        say(f"submission.json bytes_code {submission['bytes_code']} is not train_gpt.py's size {len(code)}")
    for log in logs:
        if log.get("code") != len(code):
            say(f"{log['path'].name} says Code size {log.get('code')}, but train_gpt.py has {len(code)} bytes: "
                f"not the code that made it")
    totals = [log for log in logs if "total" in log]
    if not totals:
        say("no log has a Total submission size line")
        return
    largest = max(totals, key=lambda log: log["total"])
    if submission["bytes_total"] != largest["total"]:
        say(f"submission.json bytes_total {submission['bytes_total']} is not the largest total in the logs "
            f"({largest['total']}, {largest['path'].name})")
    if "model" in largest and submission["bytes_total"] - submission["bytes_code"] != largest["model"]:
        say(f"bytes_total - bytes_code is not {largest['path'].name}'s serialized model ({largest['model']} bytes)")
    limit = int(largest.get("config", {}).get("artifact_limit_bytes", DEFAULT_LIMIT))
    limit = min(limit, DEFAULT_LIMIT)
    if submission["bytes_total"] > limit:
        say(f"bytes_total {submission['bytes_total']} is over the limit of {limit} bytes")


def check_record(submission: dict, folder: Path, losses: list[float], say, seen: tuple):
    previous_name = submission.get("previous_record")
    if not isinstance(previous_name, str):
        say("a record claim must name previous_record (the previous record's folder)")
        return
    previous = repo_root(folder) / previous_name
    if previous.resolve() in seen or previous.resolve() == folder.resolve():
        say(f"previous_record {previous_name} leads back to this folder")
        return
    if not previous.is_dir():
        say(f"previous_record {previous_name} does not exist")
        return
    problems, prior = check_folder(previous, seen + (folder.resolve(),))
    if problems or prior is None:
        say(f"previous_record {previous_name} does not pass its own checks")
        return
    if len(losses) < 2:
        say("a record claim needs at least 2 seeds for its significance (3 are usual)")
        return
    improvement, p = improvement_p_value(losses, float(prior["val_loss"]))
    if improvement < MIN_IMPROVEMENT or p >= MAX_P:
        say(f"record claim not shown: mean improvement {improvement:.5f} nats over {previous_name} "
            f"(needs >= {MIN_IMPROVEMENT}), p = {p:.4f} (needs < {MAX_P})")


# The leaderboard ------------------------------------------------------------------------------

def leaderboard(root: Path) -> tuple[str, list[str]]:
    """The markdown tables of every passing folder, per track, best first; and the failures."""
    failures, rows = [], {track: [] for track in TRACKS}
    for folder in sorted(root.glob("records/*/*/")):
        problems, submission = check_folder(folder)
        if problems:
            failures += [f"{folder.relative_to(root)}: {p}" for p in problems]
        elif folder.parent.name in rows:
            rows[folder.parent.name].append((submission, folder.relative_to(root / "records")))
    parts = []
    for track, entries in rows.items():
        parts.append(f"### {track}\n")
        if not entries:
            parts.append("No submissions yet.\n")
            continue
        parts.append("| val_bpb | val_loss | bytes_total | seeds | date | name | author |\n|---|---|---|---|---|---|---|")
        for s, path in sorted(entries, key=lambda e: e[0]["val_bpb"]):
            parts.append(f"| {s['val_bpb']:.4f} | {s['val_loss']:.4f} | {s['bytes_total']:,} | {len(s['seeds'])} | "
                         f"{s['date']} | [{s['name']}]({path.as_posix()}/) | {s['author']} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n", failures


def write_leaderboard(root: Path) -> list[str]:
    readme = root / "records" / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise UsageError(f"{readme} has no {START} ... {END} markers")
    table, failures = leaderboard(root)
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{START}\n{table}{END}{tail}")
    tmp.replace(readme)
    return failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--leaderboard", action="store_true", help="check every folder and rewrite the table")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the repository holding records/ (default: this script's)")
    args = parser.parse_args(argv)
    try:
        if args.leaderboard:
            failures = write_leaderboard(args.root)
            for line in failures:
                print(line, file=sys.stderr)
            print(f"leaderboard: {args.root / 'records' / 'README.md'}")
            return 1 if failures else 0
        if not args.folders:
            raise UsageError("name at least one record folder (or --leaderboard)")
        failed = False
        for folder in args.folders:
            if not folder.is_dir():
                raise UsageError(f"{folder}: no such folder")
            problems, _ = check_folder(folder)
            for problem in problems:
                print(f"{folder}: {problem}")
            if not problems:
                print(f"ok {folder}")
            failed = failed or bool(problems)
        return 1 if failed else 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

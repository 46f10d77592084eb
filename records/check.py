"""Checks record folders against their own logs, and regenerates the leaderboard.

    python records/check.py FOLDER [FOLDER ...]
    python records/check.py --leaderboard [--root REPO]

A folder passes when its files are there, submission.json's figures are what its logs say (the mean
of the seeds' final lines, of the artifact's round trip or of an audited method) and its
train_gpt.py is the code every log ran (SHA-256), no log reports a failure, the total fits the byte
limit, and a record claim beats the track's best by at least 0.005 nats at p < 0.01 over its seeds.
Exit 0 when every folder passes, 1 with one line per problem otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import hashlib
import json
import lzma
import math
import re
import sys
from pathlib import Path

# What submission.json's `track` may say in each folder of records/: the challenge writes its own
# folders' tracks in several spellings.
TRACK_NAMES = {"track_10min_16mb": ("track_10min_16mb", "10min_16mb"),
               "track_non_record_16mb": ("track_non_record_16mb", "non_record_16mb", "non-record-16mb",
                                         "non-record-unlimited-compute-16mb"),
               "track_cpu_embedded": ("track_cpu_embedded", "cpu_embedded")}
TRACKS = tuple(TRACK_NAMES)
HARNESS_TRACKS = ("track_cpu_embedded",)  # tracks whose folders must hold this harness's logs
FILES = ("README.md", "submission.json", "train_gpt.py")
REQUIRED = {"author": str, "github_id": str, "name": str, "blurb": str, "date": str, "val_bpb": (int, float),
            "bytes_total": int}
# The challenge's own folders may lack these; a folder of this harness's logs must have them.
HARNESS_REQUIRED = {"val_loss": (int, float), "bytes_code": int, "seeds": list}
OPTIONAL = {**HARNESS_REQUIRED, "track": str, "metric": str, "record": bool, "previous_record": str,
            "seed_results": dict}
DEFAULT_LIMIT = 16_000_000  # every track is a 16 MB (decimal) track
MIN_IMPROVEMENT = 0.005  # nats, as the challenge asks of a new record
MAX_P = 0.01
START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"
STREAM_TRACKS = ("track_10min_16mb", "track_non_record_16mb")  # scored on the whole stream, never DOC_MODE
AUDITED_METHODS = ("sliding", "hedge", "ttt")  # scorable only where every log's audit of them passed
# Folders whose logs predate the `Code sha256` and `exit:` lines: their code is pinned here by its
# SHA-256 instead, and their logs are tied to it by size as before.
PINNED = {"track_cpu_embedded/2026-11-22_run_sh_default":
          "8ab031a102e77657c8aed33ff532d4632c6c89f1ecb12a8de13df0f4a342ab7d",
          "track_cpu_embedded/2026-12-01_run_sh_bf16_220s":
          "bfd88a08752213ae2f103524be4bd36cc9513b19996d60a10d705e96be80b350"}

CONFIG = re.compile(r"^config: (\{.*\})$", re.M)
SEED = re.compile(r"^\s*seed[:=] ?(\d+)\s*$", re.M)  # the challenge's logs: `seed:1337` or `  seed: 42`
DATE = re.compile(r"(\d{4}-\d{2}-\d{2})(?:T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?Z?)?")
# The counted code: this harness's `Code size: N bytes (packed: M bytes)` counts M; the challenge's logs
# say `Code size: N bytes`, or `Code size (compressed): N bytes` beside the uncompressed size.
CODE_SIZE = re.compile(r"^Code size(?: \((compressed|uncompressed)\))?: (\d+) bytes(?: \(packed: (\d+) bytes.*\))?$",
                       re.M)
SIZES = {"total": re.compile(r"^Total submission size \S+: (\d+) bytes\b", re.M),
         "model": re.compile(r"^Serialized model \S+: (\d+) bytes\b", re.M)}
FINAL = re.compile(r"^final_(\S+)_exact val_loss:(\S+) val_bpb:(\S+)(?: .*)?$", re.M)
CODE_SHA = re.compile(r"^Code sha256: ([0-9a-f]{64})$", re.M)
PROGRAM_SHA = re.compile(r"^Program sha256: ([0-9a-f]{64})\b", re.M)
# Lines only this harness writes: a log with any of them must be read as the harness's, config and all.
HARNESS_LINE = re.compile(r"^(?:config: |Code sha256: |Program sha256: |exit:\d+$)", re.M)
# train_gpt.py's PACK_HEAD and PACK_TAIL: the wrapper of a packed train_gpt.py, byte for byte.
PACK_HEAD, PACK_TAIL = b'#coding:latin-1\nimport lzma\n_="""', b'"""\nexec(lzma.decompress(_.encode("latin-1")))\n'
TOKENIZER = re.compile(r"^tokenizer: \S+ sha256:([0-9a-f]{64})$", re.M)
TOKENIZER_PATH = re.compile(r"^val_bpb:enabled tokenizer_path=(\S+)$", re.M)
AUDIT = re.compile(r"^audit (\S+): .* (passed|FAILED)$", re.M)
FAILURE = re.compile(r"^(?:.*\bFAILED\b.*|WARNING .*|error: .*)$", re.M)
EXIT = re.compile(r"^exit:(\d+)$", re.M)


class UsageError(Exception):
    pass


@dataclasses.dataclass
class Verdict:
    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # worth printing even when the folder passes
    submission: dict | None = None
    tokenizer: str | None = None  # what its logs scored with, when they agree
    harness: bool = True  # whether its logs are this harness's (a `config:` line), not the challenge's own
    complete: bool = False  # files, logs and the required fields there: what a previous record must have

    def say(self, problem: str):
        self.problems.append(problem)


# Student's t distribution, for the significance of a record claim ---------------------------------

def beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b), evaluated by the modified Lentz method."""
    tiny = 1e-300  # stands in for a zero denominator, which would stop the recurrence

    def nonzero(value: float) -> float:
        return value if abs(value) > tiny else tiny

    c, d = 1.0, 1.0 / nonzero(1.0 - (a + b) * x / (a + 1))
    result = d
    for m in range(1, 300):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for coefficient in (even, odd):
            d = 1.0 / nonzero(1.0 + coefficient * d)
            c = nonzero(1.0 + coefficient / c)
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean: use the symmetry
        return 1.0 - incomplete_beta(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    return math.exp(log_front) / a * beta_fraction(a, b, x)


def t_upper_tail(t: float, dof: int) -> float:
    """P(T > t) for Student's t with `dof` degrees of freedom."""
    tail = 0.5 * incomplete_beta(dof / 2, 0.5, dof / (dof + t * t))
    return tail if t >= 0 else 1.0 - tail


def improvement_p_value(losses: list[float], previous: float, margin: float = MIN_IMPROVEMENT
                        ) -> tuple[float, float | None]:
    """Mean improvement over the previous record, and the one-sided p-value of it being at least
    `margin` (one-sample t-test of the seeds' losses against previous - margin); None when the
    seeds' losses are all equal, which leaves nothing to measure the noise by."""
    n = len(losses)
    mean = sum(losses) / n
    improvement = previous - mean
    sd = math.sqrt(sum((x - mean) ** 2 for x in losses) / (n - 1))
    if sd == 0:
        return improvement, None
    t = (improvement - margin) / (sd / math.sqrt(n))
    return improvement, t_upper_tail(t, n - 1)


# submission.json ------------------------------------------------------------------------------

class Figure(float):
    """A JSON number that remembers how many decimals it was written with, since a figure rounded to
    4 decimals earns a rounding-sized tolerance and one written in full must match the logs."""
    decimals: int


def parse_figure(text: str) -> Figure:
    figure = Figure(text)
    mantissa, _, exponent = text.lower().partition("e")
    figure.decimals = max(0, len(mantissa.partition(".")[2]) - int(exponent or 0))
    return figure


def agrees(claimed: float, measured: float) -> bool:
    tolerance = 5e-5 if getattr(claimed, "decimals", 0) <= 4 else 1e-6
    return abs(claimed - measured) <= tolerance


def has_type(value, kind) -> bool:
    # JSON true/false are Python ints: never let them pass as numbers
    return isinstance(value, bool) if kind is bool else isinstance(value, kind) and not isinstance(value, bool)


def json_type(value) -> str:
    """The JSON name of a parsed value's type, in the words a submitter knows (never `Figure`)."""
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "str"), (list, "list"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def is_seed(value) -> bool:
    return has_type(value, int)


def read_submission(folder: Path, verdict: Verdict) -> dict | None:
    path = folder / "submission.json"
    if not path.is_file():
        return None  # already reported as missing
    try:
        submission = json.loads(path.read_text(), parse_float=parse_figure)
    except ValueError as e:  # bad JSON or bad UTF-8
        verdict.say(f"submission.json does not parse ({e})")
        return None
    if not isinstance(submission, dict):
        verdict.say("submission.json is not an object")
        return None
    return submission


def check_types(submission: dict, verdict: Verdict) -> bool:
    """Whether every field has the type the later checks rely on."""
    fine = True
    required = {**REQUIRED, **(HARNESS_REQUIRED if verdict.harness else {})}
    for key, kind in {**REQUIRED, **OPTIONAL}.items():
        if key not in submission:
            if key in required:
                verdict.say(f"submission.json lacks {key}")
                fine = False
        elif not has_type(submission[key], kind):
            verdict.say(f"submission.json {key} has the wrong type ({json_type(submission[key])})")
            fine = False
    return fine


def check_fields(submission: dict, folder: Path, verdict: Verdict) -> bool:
    """The fields' values on their own; whether the seeds are usable for comparing with the logs."""
    named = re.fullmatch(r"(\d{4}-\d{2}-\d{2})_.+", folder.name)
    if date_of(submission) is None:
        verdict.say(f"submission.json date {submission['date']!r} is not an ISO date YYYY-MM-DD")
    elif verdict.harness and named and date_of(submission) != named.group(1):
        verdict.say(f"submission.json date {submission['date']} is not the folder's {named.group(1)}")
    if "track" in submission and submission["track"] not in TRACK_NAMES.get(folder.parent.name, ()):
        verdict.say(f"submission.json track {submission['track']!r} is not the folder's track {folder.parent.name!r}")
    seeds = submission.get("seeds")
    if seeds is None:
        return True  # the challenge's folders may leave them out: the logs' seeds are taken
    if not seeds or not all(is_seed(s) for s in seeds) or len(set(seeds)) != len(seeds):
        verdict.say("submission.json seeds must be a non-empty list of distinct integers")
        return False
    return True


def date_of(submission: dict) -> str | None:
    """The YYYY-MM-DD of `date`, which the challenge's folders may write as an ISO date and time."""
    found = DATE.fullmatch(submission["date"])
    return found.group(1) if found and parses_as_date(found.group(1)) else None


def parses_as_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


# Logs -----------------------------------------------------------------------------------------

def log_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".txt", ".log")
                  and p.stem.lower() != "readme" and not p.name.startswith("requirements"))


def read_log(path: Path) -> dict:
    """What check.py needs from one of the harness's logs."""
    text = path.read_text(errors="replace")
    log = {"path": path, "text": text, "config": read_config(text), "finals": read_finals(text),
           "audits": {name: verdict == "passed" for name, verdict in AUDIT.findall(text)},
           "failures": FAILURE.findall(text), "exits": [int(code) for code in EXIT.findall(text)],
           "code_sha256": CODE_SHA.findall(text), "program_sha256": PROGRAM_SHA.findall(text),
           "tokenizer": read_tokenizer(text), "harness": bool(HARNESS_LINE.search(text))}
    if log["config"] is not None:
        log["seed"] = log["config"].get("seed")
    elif SEED.search(text):
        log["seed"] = int(SEED.search(text).group(1))
    counted = [int(packed or size) for kind, size, packed in CODE_SIZE.findall(text) if kind != "uncompressed"]
    if counted:
        log["code"] = counted[-1]
    for key, pattern in SIZES.items():
        found = pattern.findall(text)
        if found:
            log[key] = int(found[-1])
    return log


def read_tokenizer(text: str) -> str | None:
    """The tokenizer a log scored with: its SHA-256, or for a log from before that line, its file name."""
    found = TOKENIZER.search(text) or TOKENIZER_PATH.search(text)
    return (found.group(1) if found.re is TOKENIZER else Path(found.group(1)).name) if found else None


def read_config(text: str) -> dict | None:
    found = CONFIG.search(text)  # the first: the config the run started with, whatever follows
    if not found:
        return None
    try:
        config = json.loads(found.group(1))
    except ValueError:
        return None
    return config if isinstance(config, dict) else None


def read_finals(text: str) -> list[tuple[str, float, float]]:
    finals = []
    for name, loss, bpb in FINAL.findall(text):
        try:
            finals.append((name, float(loss), float(bpb)))
        except ValueError:
            continue  # not a figure: as if the line were absent, which is then reported
    return finals


def metric_of(log: dict, metric: str | None) -> tuple[float, float] | None:
    """(val_loss, val_bpb) of the scored line: the last final line of that name; by default the last
    round trip through the artifact, or in the challenge's logs their last final line."""
    def scored(name: str) -> bool:
        return name == metric if metric is not None else name.endswith("_roundtrip") or not log["harness"]

    found = [(loss, bpb) for name, loss, bpb in log["finals"] if scored(name)]
    return found[-1] if found else None


def metric_line(metric: str | None) -> str:
    return f"final_{metric if metric is not None else '<scheme>_<compressor>_roundtrip'}_exact"


def logs_by_seed(logs: list[dict], metric: str | None, verdict: Verdict) -> dict[int, dict]:
    by_seed = {}
    for log in logs:
        name = log["path"].name
        if log["config"] is None and verdict.harness:
            verdict.say(f"{name} has no config line")
            continue
        seed = log.get("seed")
        if not is_seed(seed):
            verdict.say(f"{name}'s config has no integer seed" if verdict.harness else f"{name} has no seed: line")
            continue
        if seed in by_seed and by_seed[seed]["text"] == log["text"]:
            verdict.notes.append(f"{name} is a copy of {by_seed[seed]['path'].name}: read once")
            continue
        if seed in by_seed:
            verdict.say(f"{name} repeats seed {seed} of {by_seed[seed]['path'].name}")
            continue
        by_seed[seed] = log
        if metric_of(log, metric) is None:
            verdict.say(f"{name} has no {metric_line(metric)} line")
    return by_seed


# One folder -----------------------------------------------------------------------------------

def check_folder(folder: Path, seen: tuple = ()) -> Verdict:
    """Every problem with one folder (none when it passes), and its submission.json."""
    folder = folder.resolve()
    verdict = Verdict()
    check_place(folder, verdict)
    for name in FILES:
        if not (folder / name).is_file():
            verdict.say(f"{name} is missing")
    logs = [read_log(p) for p in log_paths(folder)]
    if not logs:
        verdict.say("no train log (*.txt or *.log)")
    verdict.harness = any(log["harness"] for log in logs) or folder.parent.name in HARNESS_TRACKS
    if not verdict.harness:
        verdict.notes.append("the logs are not this harness's (no config: line): figures, sizes and seeds are "
                             "checked against them; the code by its size only, and no audit")
    submission = verdict.submission = read_submission(folder, verdict)
    if submission is None or not check_types(submission, verdict) or not check_fields(submission, folder, verdict):
        return verdict
    verdict.complete = bool(logs) and all((folder / name).is_file() for name in FILES) and date_of(submission)
    metric = submission.get("metric")
    if not check_metric(metric, logs, verdict):
        return verdict
    check_runs(folder, logs, verdict)
    by_seed = logs_by_seed(logs, metric, verdict)
    if set(by_seed) != set(submission.get("seeds", by_seed)):
        verdict.say(f"the logs' seeds {sorted(by_seed)} are not submission.json's seeds "
                    f"{sorted(submission['seeds'])} (one log a seed)")
    if by_seed:
        check_bytes(submission, folder, list(by_seed.values()), verdict)
    check_seed_results(submission.get("seed_results", {}), by_seed, metric, verdict)
    measured = [metric_of(log, metric) for log in by_seed.values()]
    if not measured or None in measured:
        return verdict  # the missing lines are reported: a mean over the rest would mislead
    check_means(submission, measured, verdict)
    if submission.get("record", False):
        check_record(submission, folder, measured, verdict, seen)
    return verdict


def check_metric(metric: str | None, logs: list[dict], verdict: Verdict) -> bool:
    """A score is the artifact's round trip, or a method whose audit passed in every log: never the
    unquantized model, nor a method nothing checked."""
    if metric is None or metric.endswith("_roundtrip"):
        return True
    if not verdict.harness:
        return True  # the challenge's logs name their own lines, and no audit of theirs can be read
    if metric not in AUDITED_METHODS:
        verdict.say(f"metric {metric!r} is not a score: the artifact's round trip (the default) or an audited "
                    f"method ({', '.join(AUDITED_METHODS)})")
        return False
    for log in logs:
        if not log["audits"].get(metric):
            verdict.say(f"{log['path'].name} has no passed audit of {metric} (EVAL_AUDIT=1): it cannot be the score")
    return True


def check_runs(folder: Path, logs: list[dict], verdict: Verdict):
    """Every run finished cleanly, reported no failure or warning, and scored what its track scores."""
    pinned = f"{folder.parent.name}/{folder.name}" in PINNED
    for log in logs:
        name = log["path"].name
        for line in log["failures"]:
            verdict.say(f"{name} reports: {line[:160]}")
        if not verdict.harness:
            continue
        if not pinned and not log["exits"]:
            verdict.say(f"{name} has no exit: line: the run did not finish")
        elif log["exits"] and log["exits"][-1] != 0:
            verdict.say(f"{name} ended with exit:{log['exits'][-1]}")
        if folder.parent.name in STREAM_TRACKS and log["config"] and log["config"].get("doc_mode"):
            verdict.say(f"{name} ran with DOC_MODE, which scores part of each document: "
                        f"not a {folder.parent.name} score")
    scored = {log["finals"][-1][0] for log in logs if log["finals"] and not verdict.harness}
    if len(scored) > 1:
        verdict.say(f"the logs' last final lines score different things ({', '.join(sorted(scored))})")
    if any("prequant" in name for name in scored):
        verdict.say("the logs' last final line is the unquantized model's (prequant): not a score")
    tokenizers = {log["tokenizer"] for log in logs}
    if len(tokenizers) > 1:
        verdict.say(f"the logs scored with different tokenizers ({', '.join(sorted(map(str, tokenizers)))})")
    verdict.tokenizer = tokenizers.pop() if len(tokenizers) == 1 else None


def check_place(folder: Path, verdict: Verdict):
    if folder.parent.name not in TRACKS or folder.parent.parent.name != "records":
        verdict.say(f"the folder is not in records/<track>/ for a track of {', '.join(TRACKS)}")
    named = re.fullmatch(r"(\d{4}-\d{2}-\d{2})_(.+)", folder.name)
    if not named or not parses_as_date(named.group(1)):
        verdict.say("the folder name is not YYYY-MM-DD_<name>")


def check_means(submission: dict, measured: list[tuple[float, float]], verdict: Verdict):
    for index, key in enumerate(("val_loss", "val_bpb")):
        mean = sum(values[index] for values in measured) / len(measured)
        if key in submission and not agrees(submission[key], mean):
            verdict.say(f"submission.json {key} {submission[key]} disagrees with the logs' mean {mean:.8f}")


def check_seed_results(results: dict, by_seed: dict[int, dict], metric: str | None, verdict: Verdict):
    for key, result in results.items():
        log = by_seed.get(int(key)) if re.fullmatch(r"-?\d+", key) else None
        if log is None:
            verdict.say(f"seed_results names seed {key!r}, which has no log")
            continue
        if not isinstance(result, dict):
            verdict.say(f"seed_results for seed {key} is not an object")
            continue
        measured = metric_of(log, metric)
        if measured is None:
            continue  # already reported
        for index, field in enumerate(("val_loss", "val_bpb")):
            claimed = result.get(field)
            if field in result and not (has_type(claimed, (int, float)) and agrees(claimed, measured[index])):
                verdict.say(f"seed_results for seed {key}: {field} {claimed} disagrees with "
                            f"{log['path'].name}'s {measured[index]:.8f}")
        if "artifact_bytes" in result and result["artifact_bytes"] != log.get("total"):
            verdict.say(f"seed_results for seed {key}: artifact_bytes {result['artifact_bytes']} is not "
                        f"{log['path'].name}'s Total submission size {log.get('total')}")


def check_bytes(submission: dict, folder: Path, logs: list[dict], verdict: Verdict):
    code_path = folder / "train_gpt.py"
    code = len(code_path.read_bytes()) if code_path.is_file() else None
    if code is not None and verdict.harness:
        check_code_identity(folder, code_path.read_bytes(), logs, verdict)
    if code is not None and submission.get("bytes_code", code) != code:
        verdict.say(f"submission.json bytes_code {submission['bytes_code']} is not train_gpt.py's size {code}")
    for log in logs:
        name = log["path"].name
        if "code" not in log:
            verdict.say(f"{name} has no Code size line")
        elif code is not None and log["code"] != code:
            verdict.say(f"{name} says Code size {log['code']}, but train_gpt.py has {code} bytes: "
                        f"not the code that made it")
        if "total" not in log:
            verdict.say(f"{name} has no Total submission size line")
    totals = [log for log in logs if "total" in log]
    if totals and code is not None:
        check_total(submission, code, totals, verdict)
    check_limit(submission, logs, verdict)


def packed_program(code: bytes) -> bytes | None:
    """The program a packed train_gpt.py runs, else None: only train_gpt.py's exact wrapper around one string
    literal counts, so that no other code can run beside the program."""
    if not (code.startswith(PACK_HEAD) and code.endswith(PACK_TAIL)):
        return None
    try:
        literal = ast.literal_eval(code[len(PACK_HEAD) - 3:len(code) - len(PACK_TAIL) + 3].decode("latin-1"))
        return lzma.decompress(literal.encode("latin-1")) if isinstance(literal, str) else None
    except (SyntaxError, ValueError, lzma.LZMAError, UnicodeEncodeError):
        return None


def check_code_identity(folder: Path, code: bytes, logs: list[dict], verdict: Verdict):
    """The folder's train_gpt.py is the code each log ran, by the SHA-256 the run logged at its start: of
    the file itself, or, packed, of the program it holds (the code without comments and docstrings)."""
    sha = hashlib.sha256(code).hexdigest()
    program = packed_program(code)
    program_sha = hashlib.sha256(program).hexdigest() if program is not None else None
    pinned = PINNED.get(f"{folder.parent.name}/{folder.name}")
    if pinned:
        if sha != pinned:
            verdict.say(f"train_gpt.py (SHA-256 {sha[:12]}...) is not the code pinned for this folder")
        return
    for log in logs:
        name = log["path"].name
        if not log["code_sha256"]:
            verdict.say(f"{name} has no Code sha256 line")
        elif program_sha is not None and log["program_sha256"][-1:] == [program_sha]:
            continue
        elif log["code_sha256"][-1] != sha:
            verdict.say(f"{name} ran code with SHA-256 {log['code_sha256'][-1][:12]}..., not this train_gpt.py "
                        f"({sha[:12]}...)")


def check_total(submission: dict, code: int, totals: list[dict], verdict: Verdict):
    """bytes_total is the largest seed's, so that every seed's artifact fits (the challenge's own folders
    may give another seed's: check_limit holds every seed to the limit)."""
    largest = max(totals, key=lambda log: log["total"])
    if not verdict.harness:
        largest = next((log for log in totals if log["total"] == submission["bytes_total"]), largest)
    name = largest["path"].name
    if submission["bytes_total"] != largest["total"]:
        verdict.say(f"submission.json bytes_total {submission['bytes_total']} is not the largest total in the "
                    f"logs ({largest['total']}, {name})")
    if "model" not in largest:
        verdict.say(f"{name} has no Serialized model line")
    elif submission["bytes_total"] - code != largest["model"]:
        verdict.say(f"bytes_total - the code's {code} bytes is not {name}'s serialized model "
                    f"({largest['model']} bytes)")


def check_limit(submission: dict, logs: list[dict], verdict: Verdict):
    # a run may have been held to a tighter limit, but no track allows more than 16 MB
    limits = [(log["config"] or {}).get("artifact_limit_bytes") for log in logs]
    limit = min([DEFAULT_LIMIT] + [value for value in limits if has_type(value, int)])
    if submission["bytes_total"] > limit:
        verdict.say(f"bytes_total {submission['bytes_total']} is over the limit of {limit} bytes")
    for log in logs:
        if log.get("total", 0) > limit:
            verdict.say(f"{log['path'].name}'s Total submission size {log['total']} is over the limit of {limit} bytes")


def check_record(submission: dict, folder: Path, measured: list[tuple[float, float]], verdict: Verdict,
                 seen: tuple):
    name = submission.get("previous_record")
    if date_of(submission) is None:
        return  # reported: without a date there is no track's best to compare with
    if name is None:
        verdict.say("a record claim must name previous_record (the track's best folder before it)")
        return
    if folder.parent.parent.name != "records":
        verdict.say(f"previous_record {name} cannot be found: this folder is not in records/<track>/")
        return
    previous = (folder.parents[2] / name).resolve()
    if previous in seen or previous == folder:
        verdict.say(f"previous_record {name} leads back to this folder")
        return
    if not previous.is_dir():
        verdict.say(f"previous_record {name} does not exist")
        return
    prior = check_folder(previous, seen + (folder,))
    if standing(prior) is None:
        verdict.say(f"previous_record {name} does not pass its own checks ({prior.problems[0]})")
        return
    if prior.problems:
        verdict.notes.append(f"previous_record {name} is the challenge's own folder, taken at its submission.json's "
                             f"figures (val_bpb {prior.submission['val_bpb']})")
    best = track_best(folder, date_of(submission), seen + (folder,))
    if best is not None and best[0] != previous:
        verdict.say(f"previous_record {name} is not the track's best before this claim: "
                    f"{best[0].relative_to(folder.parents[2]).as_posix()} (val_bpb {best[1]['val_bpb']})")
        return
    if len(measured) < 2:
        verdict.say("a record claim needs at least 2 seeds for its significance (3 are usual)")
        return
    losses, bpbs = [loss for loss, _ in measured], [bpb for _, bpb in measured]
    if verdict.tokenizer is not None and verdict.tokenizer == prior.tokenizer and "val_loss" in prior.submission:
        values, against, margin, unit = losses, float(prior.submission["val_loss"]), MIN_IMPROVEMENT, "nats"
    else:
        # Nats per token of two tokenizers are not comparable: bits per byte are, and the margin in
        # them is 0.005 nats at this claim's own bytes per token.
        values, against, unit = bpbs, float(prior.submission["val_bpb"]), "bits per byte (the tokenizers differ)"
        margin = MIN_IMPROVEMENT * sum(bpbs) / sum(losses)
    improvement, p = improvement_p_value(values, against, margin)
    if p is None:
        verdict.say(f"record claim not shown: the seeds' scores are all equal ({values[0]}), which leaves no "
                    f"spread to measure significance by (did the seeds change anything?)")
        return
    figures = (f"mean improvement {improvement:.5f} {unit} over {name} (needs >= {margin:.5f}), "
               f"p = {p:.3g} (needs < {MAX_P})")
    if improvement < margin or p >= MAX_P:
        verdict.say(f"record claim not shown: {figures}")
    else:
        verdict.notes.append(f"record claim shown: {figures}")


def standing(verdict: Verdict) -> dict | None:
    """The submission a folder stands for as a previous record: one that passes, or one of the challenge's
    own folders (logs this checker cannot fully read, but its files, logs and fields there), taken at its
    claim; None for any other failing folder."""
    if not verdict.problems:
        return verdict.submission
    return verdict.submission if verdict.complete and not verdict.harness else None


def track_best(folder: Path, date: str, seen: tuple) -> tuple[Path, dict] | None:
    """The folder of `folder`'s track, other than it, dated no later than `date`, standing as a record
    (see `standing`) with the lowest val_bpb: the record a claim on that date must beat."""
    best = None
    for other in sorted(p.resolve() for p in folder.parent.iterdir() if p.is_dir()):
        if other == folder or other in seen:
            continue
        submission = standing(check_folder(other, seen))
        if submission is None or date_of(submission) > date:
            continue
        if best is None or submission["val_bpb"] < best[1]["val_bpb"]:
            best = (other, submission)
    return best


# The leaderboard ------------------------------------------------------------------------------

def cell(text: str) -> str:
    # a name with | or brackets would break the table or its link
    return re.sub(r"([|\[\]])", r"\\\1", text)


def table(entries: list[tuple[dict, Path]]) -> list[str]:
    lines = ["| val_bpb | val_loss | bytes_total | seeds | date | name | author |", "|---|---|---|---|---|---|---|"]
    for s, path in sorted(entries, key=lambda entry: entry[0]["val_bpb"]):
        loss, seeds = (f"{s['val_loss']:.4f}" if "val_loss" in s else "-"), len(s["seeds"]) if "seeds" in s else "-"
        lines.append(f"| {s['val_bpb']:.4f} | {loss} | {s['bytes_total']:,} | {seeds} | "
                     f"{s['date']} | [{cell(s['name'])}]({path.as_posix()}/) | {cell(s['author'])} |")
    return lines


def leaderboard(root: Path) -> tuple[str, list[str]]:
    """The markdown tables of every passing folder, per track, best first; and the failures."""
    failures, rows = [], {track: [] for track in TRACKS}
    for folder in sorted(p for p in root.glob("records/*/*") if p.is_dir()):
        verdict = check_folder(folder)
        if verdict.problems:
            failures += [f"{folder.relative_to(root)}: {problem}" for problem in verdict.problems]
        else:
            rows[folder.parent.name].append((verdict.submission, folder.relative_to(root / "records")))
    parts = []
    for track, entries in rows.items():
        parts += [f"### {track}", ""] + (table(entries) if entries else ["No submissions yet."]) + [""]
    return "\n".join(parts).rstrip() + "\n", failures


def write_leaderboard(root: Path) -> tuple[Path, list[str]]:
    readme = root / "records" / "README.md"
    if not readme.is_file():
        raise UsageError(f"{readme}: no such file")
    text = readme.read_text()
    if START not in text or END not in text.split(START, 1)[1]:
        raise UsageError(f"{readme} has no {START} ... {END} markers")
    tables, failures = leaderboard(root)
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    tmp = readme.with_name(readme.name + ".tmp")
    tmp.write_text(f"{head}{START}\n{tables}{END}{tail}")
    tmp.replace(readme)  # a reader never sees half a README
    return readme, failures


def check_folders(folders: list[Path]) -> bool:
    """Prints each folder's verdict; whether all passed."""
    missing = [str(folder) for folder in folders if not folder.is_dir()]
    if missing:
        raise UsageError(f"no such folder: {', '.join(missing)}")
    passed = True
    for folder in folders:
        verdict = check_folder(folder)
        for problem in verdict.problems:
            print(f"{folder}: {problem}")
        if not verdict.problems:
            print(f"ok {folder}")
        for note in verdict.notes:
            print(f"{folder}: {note}")
        passed = passed and not verdict.problems
    return passed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--leaderboard", action="store_true", help="check every folder and rewrite the table")
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="the repository holding records/ (default: this script's)")
    args = parser.parse_args(argv)
    try:
        if args.leaderboard:
            if args.folders:
                raise UsageError("--leaderboard checks every folder: name none")
            readme, failures = write_leaderboard(args.root)
            for line in failures:
                print(line, file=sys.stderr)
            print(f"leaderboard: {readme}")
            return 1 if failures else 0
        if not args.folders:
            raise UsageError("name at least one record folder (or --leaderboard)")
        return 0 if check_folders(args.folders) else 1
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

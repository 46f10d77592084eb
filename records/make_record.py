"""Makes a record folder from the runs of N seeds, then checks it with check.py.

    python records/make_record.py --track track_cpu_embedded --name my_run --author NAME --github-id ID \
        --blurb "what is new" logs/my_run_seed1337.json logs/my_run_seed42.json logs/my_run_seed7.json

Each run is named by its summary (logs/<RUN_ID>.json); its log (logs/<RUN_ID>.txt) sits beside it.
The runs must share one config (apart from the seed and where they wrote) and one program, and that
program must be the given train_gpt.py's: the folder gets it packed (the form a submission counts),
the logs as train_seed<SEED>.txt, the summaries, requirements.txt, submission.json with the
challenge's fields and this harness's, and a README with the exact command. Exit 0 when the new
folder passes check.py, 1 when it does not (the folder stays, with the problems printed), 2 for bad
input (nothing written).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import platform
import re
import shutil
import sys
from pathlib import Path

import check

ROOT = Path(__file__).resolve().parent.parent
# Settings that may differ between the runs of one record: where each run wrote, read and resumed from.
PER_RUN = {"seed", "run_id", "log_dir", "data_path", "tokenizer_path", "resume_from", "checkpoint_every_seconds",
           "checkpoint_every_steps", "dist_timeout_seconds", "eval_audit_seed", "fault_at_step", "fault_rank"}
CHALLENGE_TRACK = {"track_10min_16mb": "10min_16mb", "track_non_record_16mb": "non_record_16mb",
                   "track_cpu_embedded": "cpu_embedded"}
TORCH = re.compile(r"^world_size:\d+ .* torch:(\S+)$", re.M)
STEP_AVG = re.compile(r"^step:(\d+)/\d+ (?:val_loss|train_loss):\S+ .*train_time:(\d+)ms step_avg:(\S+)ms", re.M)


class InputError(Exception):
    pass


def load_train_gpt(path: Path):
    """The trainer at `path` as a module: its packing and its settings' defaults."""
    spec = importlib.util.spec_from_file_location("record_train_gpt", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look themselves up there
    try:
        spec.loader.exec_module(module)
    except (OSError, SyntaxError) as e:
        raise InputError(f"--code {path}: not a train_gpt.py that loads ({e})") from None
    return module


def read_run(summary_path: Path) -> dict:
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{summary_path}: not a readable summary ({e})") from None
    log_path = summary_path.with_suffix(".txt")
    if not isinstance(summary, dict) or not log_path.is_file():
        raise InputError(f"{summary_path}: not a summary with its log {log_path.name} beside it")
    log = check.read_log(log_path)
    if log["config"] is None or not log["code_sha256"] or not log["program_sha256"]:
        raise InputError(f"{log_path}: no config:, Code sha256: or Program sha256: line (a log of this harness?)")
    if not log["exits"] or log["exits"][-1] != 0 or "total" not in log or "code" not in log:
        raise InputError(f"{log_path}: the run did not finish with exit:0 and its Code size and Total submission "
                         f"size lines")
    return {"summary": summary, "log": log, "summary_path": summary_path}


def check_runs_agree(runs: list[dict], settings: set[str]):
    """One config (its settings, apart from PER_RUN), one program, one machine shape, distinct seeds."""
    first = runs[0]
    for run in runs[1:]:
        a, b = first["log"]["config"], run["log"]["config"]
        differ = sorted(k for k in settings - PER_RUN if a.get(k) != b.get(k))
        if differ:
            raise InputError(f"{run['log']['path'].name} and {first['log']['path'].name} ran different configs: "
                             + ", ".join(f"{k.upper()}={b.get(k)!r} vs {a.get(k)!r}" for k in differ[:5]))
        if run["log"]["program_sha256"][-1] != first["log"]["program_sha256"][-1]:  # the source's or the packed file's
            raise InputError(f"{run['log']['path'].name} and {first['log']['path'].name} ran different programs "
                             f"(Program sha256)")
        for key in ("world_size", "device"):
            if run["summary"].get(key) != first["summary"].get(key):
                raise InputError(f"{run['log']['path'].name} ran with {key} {run['summary'].get(key)}, "
                                 f"{first['log']['path'].name} with {first['summary'].get(key)}")
    seeds = [run["log"]["config"]["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        raise InputError(f"two runs share a seed ({seeds}): one run a seed")


def scored(run: dict, metric: str | None) -> tuple[float, float]:
    figures = check.metric_of(run["log"], metric)
    if figures is None:
        raise InputError(f"{run['log']['path'].name} has no {check.metric_line(metric)} line: "
                         f"{'that method did not run or was withheld' if metric else 'the run did not score'}")
    return figures


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def seed_result(run: dict, metric: str | None) -> dict:
    summary, (loss, bpb) = run["summary"], scored(run, metric)
    steps = summary.get("steps", 0)
    eval_ms = sum((summary.get("eval_ms") or {}).values()) or summary.get("roundtrip_eval_ms", 0.0)
    return {"val_loss": round(loss, 8), "val_bpb": round(bpb, 8), "artifact_bytes": run["log"]["total"],
            "steps": steps, "step_avg_ms": round(summary.get("train_time_ms", 0.0) / max(steps, 1), 2),
            "eval_time_s": round(eval_ms / 1000, 1)}


def command_settings(train_gpt, config: dict) -> list[str]:
    """The env vars that differ from the defaults, as the runs resolved them: the exact settings."""
    settings = []
    for name, f in train_gpt.CONFIG_FIELDS.items():
        key = f.name
        if key in PER_RUN or key == "preset" or (key == "iterations" and config.get("epochs")):
            continue
        value = config.get(key, f.default)
        if value != f.default:
            text = str(int(value)) if isinstance(value, bool) else str(value)
            settings.append(f"{name}={text}" if re.fullmatch(r"[\w@.,:/+-]+", text) else f"{name}={text!r}")
    return settings


def readme(args, runs: list[dict], submission: dict, settings: list[str], launcher: str, notes: list[str]) -> str:
    rows = [f"| {seed} | {r['steps']} | {r['val_loss']:.8f} | {r['val_bpb']:.8f} | {r['artifact_bytes']:,} | "
            f"{r['step_avg_ms']:.2f} | {r['eval_time_s']:.1f} |" for seed, r in submission["seed_results"].items()]
    env = " ".join(settings)
    seeds = " ".join(str(s) for s in submission["seeds"])
    return "\n".join([
        f"# {args.name}", "", args.blurb, "",
        "## Result", "",
        f"val_bpb **{submission['val_bpb']:.8f}** (std {submission['val_bpb_std']:.8f}), val_loss "
        f"{submission['val_loss']:.8f} (std {submission['val_loss_std']:.8f}), mean of {len(runs)} seeds; scored "
        f"line: `final_{submission.get('metric') or runs[0]['summary']['metric']}_exact`. Largest artifact "
        f"{submission['bytes_total']:,} bytes (code {submission['bytes_code']:,} bytes, packed; compressor "
        f"{submission['compressor']}).", "",
        "| seed | steps | val_loss | val_bpb | bytes_total | step_avg_ms | eval_time_s |",
        "|---|---|---|---|---|---|---|",
        *rows, "", *notes,
        "## Command", "",
        "From this folder, with the data of the runs (`DATA_PATH`, `TOKENIZER_PATH` for your machine):", "",
        "```bash", "pip install -r requirements.txt",
        f"for seed in {seeds}; do", f"  SEED=$seed RUN_ID=seed$seed {env} \\", f"    {launcher}", "done", "```", "",
        "`train_gpt.py` here is the packed form of the harness's `train_gpt.py` (comments and docstrings removed, "
        "lzma-compressed behind a short wrapper): it runs the same program, whose SHA-256 each log names in its "
        "`Program sha256:` line. `python train_gpt.py --help` lists the settings.", "",
        "## Machine", "",
        f"{submission['hardware']}; torch {submission['pytorch_version']}; made on {platform.platform()}.", ""])


def comparison(root: Path, previous_record: str) -> dict:
    """The challenge's comparison fields against the previous record's claimed val_bpb."""
    previous = root / previous_record
    prior = check.read_submission(previous, check.Verdict()) if previous.is_dir() else None
    if not isinstance(prior, dict) or not check.has_type(prior.get("val_bpb"), (int, float)):
        raise InputError(f"--previous-record {previous_record}: no folder with a submission.json and its val_bpb "
                         f"under {root}")
    return {"comparison_baseline_bpb": float(prior["val_bpb"])}


def make(args) -> Path:
    runs = [read_run(path) for path in args.summaries]
    train_gpt = load_train_gpt(args.code)
    check_runs_agree(runs, {f.name for f in train_gpt.CONFIG_FIELDS.values()})
    program = train_gpt.program_of(args.code.read_bytes())
    if hashlib.sha256(program.encode()).hexdigest() != runs[0]["log"]["program_sha256"][-1]:
        raise InputError(f"the logs ran another program than {args.code} (Program sha256 differs): pass the "
                         f"train_gpt.py they ran with --code")
    packed = train_gpt.pack_program(program)
    counted = {run["log"]["code"] for run in runs}
    if counted != {len(packed)}:
        raise InputError(f"the code packs to {len(packed)} bytes here, but the logs counted {sorted(counted)} "
                         f"(another lzma library?): make the folder on the machine that trained")
    claimed = runs[0]["summary"].get("metric", "")  # SCORE_METHOD's: a round trip is check.py's default
    metric = args.metric or (None if claimed.endswith("_roundtrip") else claimed or None)
    verdict = check.Verdict()
    if not check.check_metric(metric, [run["log"] for run in runs], verdict) or verdict.problems:
        raise InputError(verdict.problems[0])
    results = {str(run["log"]["config"]["seed"]): seed_result(run, metric) for run in runs}
    losses, bpbs = zip(*(scored(run, metric) for run in runs))
    (loss, loss_std), (bpb, bpb_std) = mean_std(list(losses)), mean_std(list(bpbs))
    totals = [run["log"]["total"] for run in runs]
    compressor = runs[0]["summary"].get("compressor", "?")
    first = runs[0]
    world, device = first["summary"].get("world_size", 1), first["summary"].get("device", "cpu")
    torch_version = (TORCH.findall(first["log"]["text"]) or ["?"])[-1]
    submission = {
        "author": args.author, "github_id": args.github_id, "name": args.name, "blurb": args.blurb,
        "date": args.date, "track": CHALLENGE_TRACK[args.track], "val_loss": round(loss, 8), "val_bpb": round(bpb, 8),
        "val_loss_std": round(loss_std, 8), "val_bpb_std": round(bpb_std, 8),
        "seeds": [run["log"]["config"]["seed"] for run in runs], "seed_results": results,
        "artifact_bytes_mean": round(sum(totals) / len(totals)), "artifact_bytes_max": max(totals),
        "bytes_total": max(totals), "bytes_code": len(packed), "compressor": compressor,
        "hardware": args.hardware or f"{world}x {device.split(':')[0]}", "pytorch_version": torch_version,
        **({"metric": metric} if metric else {}),
        **({"record": True, "previous_record": args.previous_record} if args.record else {}),
    }
    if args.record and not args.previous_record:
        raise InputError("--record needs --previous-record (the track's best folder, from the repository root)")
    if args.previous_record:
        submission.update(comparison(args.root, args.previous_record))
        submission["delta_vs_leaderboard_bpb"] = round(bpb - submission["comparison_baseline_bpb"], 8)
    folder = args.root / "records" / args.track / f"{args.date}_{args.name}"
    if folder.exists():
        raise InputError(f"{folder} exists: choose another --name or remove it")
    notes = []
    if compressor != "zstd":
        notes += [f"**The artifact was compressed with {compressor}, not zstd** (the zstandard package was missing on "
                  f"the machine that trained): its size and score lines are those of {compressor}.", ""]
    settings = command_settings(train_gpt, first["log"]["config"])
    launcher = (f"torchrun --standalone --nproc_per_node={world} train_gpt.py" if world > 1 else "python train_gpt.py")
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / "train_gpt.py").write_bytes(packed)
        for run in runs:
            seed = run["log"]["config"]["seed"]
            shutil.copyfile(run["log"]["path"], tmp / f"train_seed{seed}.txt")
            shutil.copyfile(run["summary_path"], tmp / f"train_seed{seed}.json")
        (tmp / "requirements.txt").write_text(
            f"# torch {torch_version} as the runs had it (the challenge's image brings torch)\nnumpy\nsentencepiece\n"
            + ("zstandard\n" if compressor == "zstd" else ""))
        (tmp / "submission.json").write_text(json.dumps(submission, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(args, runs, submission, settings, launcher, notes))
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path, help="logs/<RUN_ID>.json of each seed's run")
    parser.add_argument("--track", required=True, choices=check.TRACKS)
    parser.add_argument("--name", required=True, help="the folder's name after its date: letters, digits, _ . -")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", required=True, help="one or two sentences on what is new")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="YYYY-MM-DD (default: today)")
    parser.add_argument("--metric", help="the scored line: sliding, hedge or ttt, audited in every log (default: "
                        "the runs' SCORE_METHOD)")
    parser.add_argument("--record", action="store_true", help="claim a record over --previous-record")
    parser.add_argument("--previous-record", help="the track's best folder, e.g. records/track_10min_16mb/<folder>")
    parser.add_argument("--hardware", help="e.g. '8xH100 80GB SXM' (default: world size x device type)")
    parser.add_argument("--code", type=Path, default=ROOT / "train_gpt.py", help="the train_gpt.py the runs ran")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository whose records/ gets the folder "
                        "(default: this one; a checkout of the challenge's for a submission there)")
    args = parser.parse_args(argv)
    try:
        if not re.fullmatch(r"[\w.-]+", args.name) or not check.parses_as_date(args.date):
            raise InputError(f"--name {args.name!r} / --date {args.date!r}: a name of letters, digits, _ . - and "
                             f"a date YYYY-MM-DD")
        folder = make(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"made {folder}")
    verdict = check.check_folder(folder)
    claim = [line for line in verdict.notes + verdict.problems if line.startswith("record claim")]
    if claim:  # check.py's own test of the claim, as it will print it for a reviewer
        with open(folder / "README.md", "a") as f:
            f.write("## Significance\n\n" + "".join(f"check.py: {line}.\n" for line in claim))
    return 0 if check.check_folders([folder]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

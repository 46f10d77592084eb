"""Run train_gpt.py over configurations x seeds, resumably, and tabulate a metric against a baseline.

    python tools/sweep.py --name NAME [--grid K=V1,V2 ...] [--config NAME:K=V[ K=V ...] ...] [--seeds 1,2,3]
                          [--env K=V ...] [--gpus N [--nproc-per-run K]] [--metric KEY] [--baseline NAME]
                          [--higher-is-better] [--margin X|record] [--dir DIR] [--dry-run]

Each configuration (a point of the --grid product, or a named --config) runs once per seed as
RUN_ID=<configuration>_s<seed>, logging to sweeps/NAME/logs/. A run whose summary is there, made with the
settings this call gives it, is skipped; one with checkpoints and no summary is resumed (RESUME_FROM=auto).
Ctrl-C stops the running runs at a checkpoint, and the same command continues. At the end, sweeps/NAME/table.md
and table.csv: per configuration the metric's mean and std over its seeds, the difference from the baseline's
mean and the p-value of records/check.py's t-test. Exit 0 when every run finished, 1 when one failed, 2 for bad
input, 130 when stopped by Ctrl-C (143 by SIGTERM). The rules in full: docs/tools.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import difflib
import fcntl
import glob
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import train_gpt  # noqa: E402
from records.check import MIN_IMPROVEMENT, improvement_p_value  # noqa: E402

TRAIN_GPT = ROOT / "train_gpt.py"
# Settings the sweep gives each run itself.
OWNED = {"RUN_ID": "", "LOG_DIR": "", "RESUME_FROM": "", "DRY_RUN": "", "SEED": " (use --seeds)"}
CHECKPOINTING = ("CHECKPOINT_EVERY_SECONDS", "CHECKPOINT_EVERY_STEPS")
CHECKPOINT_SECONDS = "60"
# What train_gpt.py lets a resume change without a warning is where and how a run ran: a finished run that
# differs only there is the same experiment. Not its data, though: train_gpt.py lets data move between a
# checkpoint and its resume, but another DATA_PATH here may be other data, and one table must not mix two.
SAME_EXPERIMENT = (train_gpt.RESUME_FREE - {"data_path", "tokenizer_path"}) | {"dry_run"}
# The note train_gpt.py gives (and runs on with) for an env var that looks like a misspelt setting.
MISSPELT_NOTE = "warning: env var "
EXIT_MEANINGS = {2: "bad input", 3: "diverged", 4: "failed its audit", 5: "preempted"}  # 1: its output says
NAME = re.compile(r"[A-Za-z0-9._,=+-]+")
POLL_SECONDS = 0.1
ABSENT = object()


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every error of this tool
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------
# What to run
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Configuration:
    name: str
    env: dict  # setting -> its value as an env var


@dataclass
class Run:
    configuration: str
    seed: int
    run_id: str
    env: dict  # what the sweep sets: --env, the configuration's settings, SEED, RUN_ID, LOG_DIR, checkpointing
    status: str = "new"  # new, resume or done
    summary: dict | None = None

    @property
    def launch_env(self) -> dict:
        return {**self.env, **({"RESUME_FROM": "auto"} if self.status == "resume" else {})}

    @property
    def log_dir(self) -> Path:
        return Path(self.env["LOG_DIR"])


def assignment(text: str, flag: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise UsageError(f"{flag} {text!r}: expected NAME=VALUE")
    return key, value


def grid_configurations(grids: list[str]) -> list[Configuration]:
    """The product of the --grid axes, in the order given, each point named by its settings."""
    axes = {}
    for text in grids:
        key, values = assignment(text, "--grid")
        if key in axes:
            raise UsageError(f"--grid {text!r}: {key} has a --grid already")
        if "" in values.split(","):
            raise UsageError(f"--grid {text!r}: expected {key}=V1,V2,... without an empty value")
        axes[key] = values.split(",")
    if not axes:
        return []
    points = itertools.product(*([(key, value) for value in values] for key, values in axes.items()))
    return [Configuration(grid_name(point), dict(point)) for point in points]


def grid_name(point: tuple[tuple[str, str], ...]) -> str:
    """MATRIX_LR=0.02,NUM_LAYERS=4: the settings, with characters a file name should not hold as _."""
    return re.sub(r"[^A-Za-z0-9._,=+-]", "_", ",".join(f"{key}={value}" for key, value in point))


def named_configuration(text: str) -> Configuration:
    """'lr2:MATRIX_LR=0.02 NUM_LAYERS=4' (shell quoting allowed in the settings; none at all: the defaults)."""
    name, colon, body = text.partition(":")
    if not colon or not NAME.fullmatch(name):
        raise UsageError(f"--config {text!r}: expected NAME:K=V K=V ..., the NAME of letters, digits and ._,=+-")
    try:
        words = shlex.split(body)
    except ValueError as e:
        raise UsageError(f"--config {text!r}: {e}") from None
    env = {}
    for word in words:
        key, value = assignment(word, f"--config {name}:")
        if key in env:
            raise UsageError(f"--config {text!r}: {key} is set twice")
        env[key] = value
    return Configuration(name, env)


def configurations_of(grids: list[str], configs: list[str]) -> list[Configuration]:
    """The named configurations, then the grid's points; every one named uniquely and setting only settings."""
    found = [named_configuration(text) for text in configs] + grid_configurations(grids)
    if not found:
        raise UsageError("nothing to run: give --grid K=V1,V2 and/or --config NAME:K=V")
    names = [c.name for c in found]
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise UsageError(f"configuration names used twice: {', '.join(twice)}")
    for configuration in found:
        for key in configuration.env:
            check_setting(key, f"configuration {configuration.name}")
    return found


def check_setting(key: str, where: str):
    if key in OWNED:
        raise UsageError(f"{where}: {key}: the sweep sets it for each run{OWNED[key]}")
    if key not in train_gpt.CONFIG_FIELDS:
        close = difflib.get_close_matches(key, list(train_gpt.CONFIG_FIELDS), n=1)
        raise UsageError(f"{where}: {key} is not a setting of train_gpt.py"
                         + (f"; did you mean {close[0]}?" if close else " (see python train_gpt.py --help)"))


def fixed_env(env_args: list[str]) -> dict:
    """What every run gets: the settings of the sweep's own environment, then --env (which may also carry other
    variables, e.g. OMP_NUM_THREADS)."""
    fixed = {key: value for key, value in os.environ.items() if key in train_gpt.CONFIG_FIELDS}
    for text in env_args:
        key, value = assignment(text, "--env")
        if key in OWNED:
            raise UsageError(f"--env {text!r}: the sweep sets {key} for each run{OWNED[key]}")
        fixed[key] = value
    return dict(sorted(fixed.items()))


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(word, 10) for word in text.split(",")]
    except ValueError:
        raise UsageError(f"--seeds {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if len(set(seeds)) < len(seeds):
        raise UsageError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def plan_runs(configurations: list[Configuration], seeds: list[int], fixed: dict, log_dir: Path) -> list[Run]:
    """Every configuration's first seed before any second: a sweep stopped early still covers them all."""
    runs = []
    for seed in seeds:
        for configuration in configurations:
            run_id = f"{configuration.name}_s{seed}"
            env = {**fixed, **configuration.env, "SEED": str(seed), "RUN_ID": run_id, "LOG_DIR": str(log_dir)}
            if not any(key in env for key in CHECKPOINTING):
                env["CHECKPOINT_EVERY_SECONDS"] = CHECKPOINT_SECONDS
            runs.append(Run(configuration.name, seed, run_id, env))
    return runs


# ----------------------------------------------------------------------------------------------
# What is done already
# ----------------------------------------------------------------------------------------------

def resolved_config(run: Run, world_size: int) -> dict:
    """The config `python train_gpt.py --dry-run` prints for the run's environment (less its dry_run flag), from
    the same resolver called here: one import for the sweep instead of one a run."""
    try:
        cfg, notes = train_gpt.load_config({**os.environ, **run.env}, world_size)
    except train_gpt.InputError as e:
        raise UsageError(f"{run.run_id}: {e}") from None
    for note in notes:
        if note.startswith(MISSPELT_NOTE):
            raise UsageError(f"{run.run_id}: {note.removeprefix('warning: ')}")
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_differences(recorded: dict, resolved: dict) -> list[str]:
    """How a finished run's config differs from the one this call resolves, as NAME=there, here: its settings
    (or, when none differs, what was derived from them); [] when it is the same experiment."""
    ignored = SAME_EXPERIMENT | ({"iterations"} if resolved.get("epochs") else set())  # EPOCHS: the data sets it
    differing = sorted(name for name in (recorded.keys() | resolved.keys()) - ignored
                       if recorded.get(name, ABSENT) != resolved.get(name, ABSENT))
    settings = [name for name in differing if name.upper() in train_gpt.CONFIG_FIELDS]
    return [f"{name.upper()}={shown(recorded.get(name, ABSENT))} there, {shown(resolved.get(name, ABSENT))} here"
            for name in settings or differing]


def shown(value) -> str:
    text = "(absent)" if value is ABSENT else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checkpoints(run: Run) -> list[Path]:
    return sorted(run.log_dir.glob(f"{glob.escape(run.run_id)}_step*.ckpt"))


def classify(run: Run, resolved: dict):
    """done (its summary made with this config), resume (checkpoints, no summary) or new; a summary made with
    another config is refused, not overwritten."""
    path = run.log_dir / f"{run.run_id}.json"
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{path}: not a summary ({e}); move it away to rerun {run.run_id}") from None
        differences = config_differences(summary.get("config", {}), resolved)
        if differences:
            raise UsageError(f"{run.run_id}: its summary {path} was made with other settings: "
                             f"{'; '.join(differences)}; move it away to rerun it, or use another --name")
        run.status, run.summary = "done", summary
    elif checkpoints(run):
        run.status = "resume"


def metric_value(summary: dict, metric: str, run_id: str) -> float | None:
    """The run's figure; None when withheld (its evaluation failed its audit)."""
    if metric not in summary:
        numeric = sorted(key for key, value in summary.items() if is_number(value))
        raise UsageError(f"--metric {metric}: not in {run_id}'s summary, whose numeric keys are {', '.join(numeric)}")
    value = summary[metric]
    if value is not None and not is_number(value):
        raise UsageError(f"--metric {metric}: {run_id}'s is {value!r}, not a number")
    return value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def definition_of(path: Path, configurations: list[Configuration], fixed: dict) -> dict:
    """The sweep's definition once this call joins it: sweep.json binds each configuration name to its settings
    and the sweep to its fixed ones (--env); a call may run more or fewer configurations and seeds, but may not
    give a name other settings."""
    mine = {c.name: c.env for c in configurations}
    if not path.is_file():
        return {"env": fixed, "configurations": mine}
    recorded = read_definition(path)
    problems = [f"--env {key}: {shown(recorded['env'].get(key, ABSENT))} there, {shown(fixed.get(key, ABSENT))} here"
                for key in sorted(recorded["env"].keys() | fixed.keys())
                if recorded["env"].get(key, ABSENT) != fixed.get(key, ABSENT)]
    problems += [f"configuration {name}: {settings_text(recorded['configurations'][name])} there, "
                 f"{settings_text(env)} here" for name, env in mine.items()
                 if recorded["configurations"].get(name, env) != env]
    if problems:
        raise UsageError(f"sweep {path.parent} was defined otherwise ({path}): {'; '.join(problems)}; "
                         f"use another --name")
    return {"env": fixed, "configurations": {**recorded["configurations"], **mine}}


def read_definition(path: Path) -> dict:
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: not a sweep's definition ({e}); use another --name") from None
    if not (isinstance(recorded, dict) and {"env", "configurations"} <= recorded.keys()):
        raise UsageError(f"{path}: not a sweep's definition (no env or configurations); use another --name")
    return recorded


def settings_text(env: dict) -> str:
    return " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items()) or "(the defaults)"


# ----------------------------------------------------------------------------------------------
# Where and how runs are launched
# ----------------------------------------------------------------------------------------------

def visible_gpus() -> list[str]:
    """The CUDA devices this process sees, named as the children's CUDA_VISIBLE_DEVICES must name them."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [name.strip() for name in listed.split(",")] if listed else [str(i) for i in range(count)]
    return names[:count]


def gpu_slots(gpus: int | None, nproc: int, devices: list[str]) -> list[dict]:
    """What each of the runs at a time adds to its environment: without --gpus one slot and the devices as they
    are; with --gpus N, N/K slots of K GPUs each (K = --nproc-per-run)."""
    if gpus is None:
        return [{}]
    if gpus < 1 or gpus % nproc:
        raise UsageError(f"--gpus {gpus}: must be a positive multiple of --nproc-per-run {nproc}")
    if len(devices) < gpus:
        raise UsageError(f"--gpus {gpus}: this machine has {len(devices)} CUDA device(s) visible")
    return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i:i + nproc])} for i in range(0, gpus, nproc)]


def launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(TRAIN_GPT)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(TRAIN_GPT)]


@dataclass
class Active:
    run: Run
    process: subprocess.Popen
    slot: dict
    output: io.TextIOBase
    started: float


class Runner:
    """Runs the runs, as many at a time as there are slots. A SIGINT or SIGTERM to the sweep stops them: each run
    gets SIGTERM (train_gpt.py then checkpoints at its next step boundary and exits 5) and no other starts; a
    second signal kills them (they resume from their last periodic checkpoint)."""

    def __init__(self, slots: list[dict], nproc: int, metric: str):
        self.free, self.nproc, self.metric = list(slots), nproc, metric
        self.active: list[Active] = []
        self.signals: list[int] = []  # received, in order; the loop acts on them, never the handler
        self.acted_on = 0
        self.problem: UsageError | None = None
        self.failed: dict[str, str] = {}  # run id -> why
        self.stopped: dict[str, str] = {}  # run id -> where it stopped
        self.not_started: list[Run] = []

    @property
    def stopping(self) -> bool:
        return bool(self.signals) or self.problem is not None

    def run_all(self, runs: list[Run]):
        queue = list(runs)
        previous = {sig: signal.signal(sig, lambda signum, frame: self.signals.append(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.active or (queue and not self.stopping):
                self.act_on_signals()
                while queue and self.free and not self.stopping:
                    self.start(queue.pop(0), len(runs) - len(queue), len(runs))
                self.reap()
                time.sleep(POLL_SECONDS)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.not_started = queue

    def act_on_signals(self):
        if len(self.signals) == self.acted_on:
            return
        first = self.acted_on == 0
        self.acted_on = len(self.signals)
        if first:
            self.stop_all()
        else:
            for active in self.active:
                with contextlib.suppress(ProcessLookupError):  # it may have ended meanwhile
                    os.killpg(active.process.pid, signal.SIGKILL)  # torchrun's workers too

    def stop_all(self):
        # To the launched process alone: torchrun passes it on to its workers, which must get it once.
        for active in self.active:
            active.process.send_signal(signal.SIGTERM)

    def start(self, run: Run, position: int, total: int):
        slot = self.free.pop(0)
        output = open(run.log_dir / f"{run.run_id}.out", "a", encoding="utf-8")
        # A session of its own: a terminal's Ctrl-C reaches the sweep alone, which stops the run at a checkpoint.
        process = subprocess.Popen(launcher(self.nproc), env={**os.environ, **run.launch_env, **slot}, stdout=output,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.active.append(Active(run, process, slot, output, time.monotonic()))
        where = f" on CUDA_VISIBLE_DEVICES={slot['CUDA_VISIBLE_DEVICES']}" if slot else ""
        verb = f"resume {run.run_id} from step {checkpoint_step(checkpoints(run)[-1])}" if run.status == "resume" \
            else f"start {run.run_id}"
        say(f"[{position}/{total}] {verb}{where}")

    def reap(self):
        for active in [a for a in self.active if a.process.poll() is not None]:
            self.active.remove(active)
            self.free.append(active.slot)
            active.output.close()
            self.finished(active, active.process.returncode)

    def finished(self, active: Active, code: int):
        run, seconds = active.run, time.monotonic() - active.started
        if code == 0:
            run.status, run.summary = "done", json.loads((run.log_dir / f"{run.run_id}.json").read_text())
            try:
                value = metric_value(run.summary, self.metric, run.run_id)
            except UsageError as e:
                self.problem = e
                self.stop_all()
                return
            say(f"done {run.run_id} in {seconds:.0f}s: {self.metric} {figure(value)}")
        elif self.stopping:
            self.stopped[run.run_id] = stop_description(run, code)
        else:
            self.failed[run.run_id] = exit_description(code)
            last = last_line(run.log_dir / f"{run.run_id}.out")
            say(f"FAILED {run.run_id} ({self.failed[run.run_id]}) after {seconds:.0f}s: {last} "
                f"(output: {run.log_dir / run.run_id}.out)")


def checkpoint_step(path: Path) -> int:
    return int(re.search(r"_step(\d+)\.ckpt$", path.name).group(1))


def exit_description(code: int) -> str:
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}" + (f": {EXIT_MEANINGS[code]}" if code in EXIT_MEANINGS else "")


def stop_description(run: Run, code: int) -> str:
    saved = checkpoints(run)
    where = f"checkpoint at step {checkpoint_step(saved[-1])}" if saved else "no checkpoint: it starts over"
    return f"{where}, {exit_description(code)}" if code != 5 else where


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def say(line: str):
    print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------

def mean_and_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None with fewer values than each needs)."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def p_value(values: list[float], baseline_mean: float, margin: float, higher_is_better: bool) -> float | None:
    """records/check.py's one-sided t-test that the seeds' mean beats the baseline's mean by at least the margin;
    None with fewer than 2 seeds, or none of their spread to measure the noise by."""
    if len(values) < 2:
        return None
    sign = -1.0 if higher_is_better else 1.0  # the test counts lower values as better
    return improvement_p_value([sign * v for v in values], sign * baseline_mean, margin)[1]


def record_margin(metric: str, summaries: list[dict]) -> float | None:
    """records/check.py's bar in the metric's units: MIN_IMPROVEMENT nats, for bits per byte at the
    configuration's own bytes per token (as check.py converts it)."""
    if metric.endswith("val_loss"):
        return MIN_IMPROVEMENT
    loss_key = metric.removesuffix("bpb") + "loss"
    losses = [s.get(loss_key) for s in summaries]
    if not summaries or not all(is_number(loss) for loss in losses):
        return None
    return MIN_IMPROVEMENT * sum(s[metric] for s in summaries) / sum(losses)


def configuration_row(configuration: Configuration, seeds: list[int], summaries: dict, failures: dict,
                      metric: str) -> dict:
    """The configuration's seeds counted (those with a value of the metric) and why the others are not."""
    counted, not_counted = [], []
    for seed in seeds:
        run_id = f"{configuration.name}_s{seed}"
        summary = summaries.get(run_id)
        if summary is None:
            not_counted.append(f"s{seed}: {failures.get(run_id, 'not run')}")
        elif metric_value(summary, metric, run_id) is None:
            not_counted.append(f"s{seed}: withheld ({summary.get('withheld', 'no value')})")
        else:
            counted.append(summary)
    mean, std = mean_and_std([s[metric] for s in counted])
    return {"configuration": configuration.name, "settings": settings_text(configuration.env), "n": len(counted),
            "values": [s[metric] for s in counted], "mean": mean, "std": std,
            **{key: mean_and_std([s[key] for s in counted if is_number(s.get(key))])[0]
               for key in ("steps", "tokens_per_s", "bytes_total")},
            "not_counted": "; ".join(not_counted), "summaries": counted}


def table_rows(configurations: list[Configuration], seeds: list[int], summaries: dict, failures: dict, metric: str,
               baseline: str, margin: str, higher_is_better: bool) -> list[dict]:
    """One row per configuration; delta (its mean less the baseline's) and p against the baseline's mean."""
    rows = [configuration_row(c, seeds, summaries, failures, metric) for c in configurations]
    base = next(row for row in rows if row["configuration"] == baseline)
    for row in rows:
        row["margin"] = record_margin(metric, row["summaries"]) if margin == "record" else float(margin)
        comparable = row is not base and row["mean"] is not None and base["mean"] is not None
        row["delta"] = row["mean"] - base["mean"] if comparable else None
        row["p"] = p_value(row["values"], base["mean"], row["margin"], higher_is_better) \
            if comparable and row["margin"] is not None else None
    return rows


def figure(value: float | None, decimals: int = 5) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{decimals}f}"


def markdown(name: str, rows: list[dict], metric: str, baseline: str, margin: str, higher_is_better: bool,
             seeds: list[int]) -> str:
    better = "higher" if higher_is_better else "lower"
    lines = [f"# Sweep {name}: {metric}, {better} is better", "",
             f"| configuration | n | {metric} (mean ± std) | Δ mean vs {baseline} | p | steps | tokens/s | "
             f"bytes_total | not counted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        delta = "(baseline)" if r["configuration"] == baseline else figure(r["delta"])
        p = "n/a" if r["p"] is None else f"{r['p']:.3g}"
        lines.append(f"| {r['configuration']} | {r['n']} | {figure(r['mean'])} ± {figure(r['std'])} | {delta} | {p} | "
                     f"{figure(r['steps'], 1)} | {figure(r['tokens_per_s'], 0)} | {figure(r['bytes_total'], 0)} | "
                     f"{r['not_counted']} |")
    bar = ("records/check.py's record bar (0.005 nats, in the metric's units)" if margin == "record"
           else f"{float(margin):g}")
    lines += ["", f"Seeds {', '.join(map(str, seeds))}; std is the sample standard deviation. Δ: the configuration's "
              f"mean less {baseline}'s. p: records/check.py's one-sided t-test of the configuration's seeds against "
              f"{baseline}'s mean, that its mean is {better} by at least the margin, {bar} ({baseline}'s own spread "
              f"is not counted); n/a with fewer than 2 seeds or no spread."]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("configuration", "settings", "n", "mean", "std", "delta", "p", "margin", "steps", "tokens_per_s",
               "bytes_total", "not_counted")


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["n/a" if row[column] is None else row[column] for column in CSV_COLUMNS])
    return out.getvalue()


def write_atomic(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------

def arguments(argv: list[str]) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0], epilog="The rules in full: docs/tools.md.")
    parser.add_argument("--name", help="the sweep's name: its folder is sweeps/NAME (or --dir)")
    parser.add_argument("--dir", type=Path, help="the sweep's folder, instead of sweeps/NAME")
    parser.add_argument("--grid", action="append", default=[], metavar="K=V1,V2",
                        help="an axis of the grid (repeatable): the configurations are the product of the axes")
    parser.add_argument("--config", action="append", default=[], metavar="NAME:K=V...",
                        help="a named configuration (repeatable), run before the grid's")
    parser.add_argument("--seeds", default=str(train_gpt.CONFIG_FIELDS["SEED"].default),
                        help="SEED of each run of a configuration, e.g. 1,2,3 (default: train_gpt.py's)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V", help="set for every run (repeatable)")
    parser.add_argument("--gpus", type=int, help="run N at a time, each on its own GPUs (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--nproc-per-run", type=int, default=1, metavar="K",
                        help="launch each run with torchrun --standalone --nproc_per_node=K (with --gpus: K GPUs "
                             "each, N/K runs at a time)")
    parser.add_argument("--metric", default="roundtrip_val_bpb", help="the summary's numeric key to tabulate")
    parser.add_argument("--baseline", help="the configuration the others are compared with (default: the first)")
    parser.add_argument("--higher-is-better", action="store_true", help="for a metric such as tokens_per_s")
    parser.add_argument("--margin", default="0",
                        help="p tests an improvement of at least this, in the metric's units; 'record': "
                             "records/check.py's bar of 0.005 nats (val_loss and val_bpb metrics)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and what is done, and exit")
    args = parser.parse_args(argv)
    if not (args.name or args.dir):
        raise UsageError("give the sweep a --name (or a --dir)")
    if args.name and not NAME.fullmatch(args.name):
        raise UsageError(f"--name {args.name!r}: letters, digits and ._,=+- only")
    if args.nproc_per_run < 1:
        raise UsageError(f"--nproc-per-run {args.nproc_per_run}: must be at least 1")
    check_margin(args.margin, args.metric, args.higher_is_better)
    return args


def check_margin(margin: str, metric: str, higher_is_better: bool):
    if margin == "record":
        if higher_is_better or not metric.endswith(("val_loss", "val_bpb")):
            raise UsageError(f"--margin record: needs a val_loss or val_bpb metric, lower is better (not {metric})")
        return
    try:
        if not math.isfinite(float(margin)):
            raise ValueError
    except ValueError:
        raise UsageError(f"--margin {margin!r}: expected a number or 'record'") from None


def plan_text(plan: Plan, nproc: int, metric: str) -> str:
    """The runs, each as the environment it adds to the sweep's: what all share on the first line."""
    runs = plan.runs
    shared = {key: value for key, value in runs[0].env.items()
              if key not in ("RUN_ID", "SEED") and all(run.env.get(key) == value for run in runs)}
    devices = " | ".join(slot["CUDA_VISIBLE_DEVICES"] for slot in plan.slots if slot)
    where = f" (CUDA_VISIBLE_DEVICES={devices})" if devices else ""
    lines = [f"sweep {plan.name}: {len(plan.configurations)} configuration(s) x {len(plan.seeds)} seed(s) = "
             f"{len(runs)} runs, {len(plan.slots)} at a time{where}",
             f"each: {settings_text(shared)} {shlex.join(launcher(nproc))}"]
    for run in runs:
        if run.status == "done":
            lines.append(f"  done    {run.run_id}: {metric} {figure(run.summary[metric])}")
            continue
        own = {key: value for key, value in run.launch_env.items() if shared.get(key) != value}
        status = f"resume  {run.run_id} from step {checkpoint_step(checkpoints(run)[-1])}" \
            if run.status == "resume" else f"run     {run.run_id}"
        lines.append(f"  {status}: {settings_text(own)}")
    return "\n".join(lines)


def stop_text(runner: Runner) -> str:
    cause = "Ctrl-C" if runner.signals[0] == signal.SIGINT else signal.Signals(runner.signals[0]).name
    stopped = ", ".join(f"{run_id} ({where})" for run_id, where in runner.stopped.items()) or "no run was running"
    return (f"stopped by {cause}: {stopped}; {len(runner.not_started)} run(s) not started; "
            f"the same command continues the sweep")


@dataclass
class Plan:
    name: str
    folder: Path
    configurations: list[Configuration]
    baseline: str
    seeds: list[int]
    fixed: dict  # what every run gets: --env and the settings of the sweep's environment
    slots: list[dict]
    runs: list[Run]
    resolved: dict  # run id -> the config train_gpt.py resolves for it


def plan_of(args: argparse.Namespace) -> Plan:
    """The runs the arguments ask for, each with its config resolved: all of the input checked, nothing read
    from the sweep's folder."""
    folder = args.dir or Path("sweeps") / args.name
    configurations = configurations_of(args.grid, args.config)
    baseline = args.baseline or configurations[0].name
    if baseline not in [c.name for c in configurations]:
        raise UsageError(f"--baseline {baseline}: not a configuration of this call "
                         f"({', '.join(c.name for c in configurations)})")
    seeds, fixed = parse_seeds(args.seeds), fixed_env(args.env)
    slots = gpu_slots(args.gpus, args.nproc_per_run, visible_gpus() if args.gpus else [])
    runs = plan_runs(configurations, seeds, fixed, (folder / "logs").resolve())
    return Plan(args.name or folder.name, folder, configurations, baseline, seeds, fixed, slots, runs,
                {run.run_id: resolved_config(run, args.nproc_per_run) for run in runs})


def take_stock(plan: Plan, metric: str) -> dict:
    """Classifies the runs by what the folder holds; returns the sweep's definition once this call joins it."""
    definition = definition_of(plan.folder / "sweep.json", plan.configurations, plan.fixed)
    for run in plan.runs:
        classify(run, plan.resolved[run.run_id])
        if run.summary is not None:
            metric_value(run.summary, metric, run.run_id)  # a misspelt metric, found before anything runs
    return definition


@contextlib.contextmanager
def sweep_lock(folder: Path):
    """One sweep at a time in a folder: two would launch the same runs into the same files."""
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"{folder}: another sweep is running there (it holds {folder / '.lock'})") from None
        yield


def execute(plan: Plan, args: argparse.Namespace) -> int:
    """Runs what is not finished, then writes and prints the table (not when stopped)."""
    for run in plan.runs:
        if run.status == "done":
            say(f"skip {run.run_id}: finished ({args.metric} {figure(run.summary[args.metric])})")
    runner = Runner(plan.slots, args.nproc_per_run, args.metric)
    runner.run_all([run for run in plan.runs if run.status != "done"])
    if runner.problem:
        raise UsageError(f"{runner.problem}; the runs still running were stopped at a checkpoint")
    if runner.signals:
        say(stop_text(runner))
        return 128 + runner.signals[0]
    summaries = {run.run_id: run.summary for run in plan.runs if run.summary is not None}
    rows = table_rows(plan.configurations, plan.seeds, summaries, runner.failed, args.metric, plan.baseline,
                      args.margin, args.higher_is_better)
    table = markdown(plan.name, rows, args.metric, plan.baseline, args.margin, args.higher_is_better, plan.seeds)
    write_atomic(plan.folder / "table.md", table)
    write_atomic(plan.folder / "table.csv", csv_text(rows))
    say(f"\n{table}\ntable: {plan.folder / 'table.md'}, {plan.folder / 'table.csv'}")
    return 1 if runner.failed else 0


def sweep(args: argparse.Namespace) -> int:
    plan = plan_of(args)
    if args.dry_run:
        take_stock(plan, args.metric)
        say(plan_text(plan, args.nproc_per_run, args.metric))
        return 0
    with sweep_lock(plan.folder):
        definition = take_stock(plan, args.metric)
        write_atomic(plan.folder / "sweep.json", json.dumps({**definition, "seeds": plan.seeds}, indent=2) + "\n")
        return execute(plan, args)


def main(argv: list[str]) -> int:
    try:
        return sweep(arguments(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any run started, or after all ended
        say("stopped by Ctrl-C: no run was running; the same command continues the sweep")
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

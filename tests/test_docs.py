"""README.md and docs/: every command they show is exercised by a test or by CI, and every link resolves.

The commands are the lines of the pages' fenced shell blocks (```bash, ```sh, ```shell, ```console or a
bare ```; output goes in ```text). Each is reduced to a key, the program and the script it runs (plus a
mode flag such as --suite or --dry-run), and REGISTRY names the tests that run that command or its code
path. A page that shows a new command fails here until the command has a test named below. The cheap
ones (--help, --dry-run) are also run as the page shows them.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

# A journal of past measurements, and a page generated from the code: neither is a how-to.
NOT_CHECKED_FOR_COMMANDS = {"perf_notes.md", "settings.md"}
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
# Flags that select what a script does (so each mode needs its own test); other flags only tune it.
MODE_FLAGS = {"--help", "--dry-run", "--suite", "--checkpoint", "--eval", "--export", "--profile",
              "--optimizer", "--check"}
CHEAP_FLAGS = {"--help", "--dry-run"}
LAUNCHERS = {"torchrun", "srun"}
# Shell-only lines, and the commands CI itself runs (.ci/run): no pytest test runs them, CI does.
SHELL_BUILTINS = {"cd", "export"}
CI = "CI"
ALLOWED = {
    "cd": CI,
    "export": CI,
    "pip install -r requirements.txt": CI,
    "python -m pytest": CI,
}

E2E = "tests/test_e2e.py"
# key -> the tests that run the command or its code path
REGISTRY = {
    "python train_gpt.py": [
        f"{E2E}::test_cpu_run_trains_exports_and_round_trips",
        f"{E2E}::test_every_evaluation_method_is_audited_scored_logged_and_summarised",
        "tests/test_checkpoint.py::test_resume_after_a_crash_equals_the_uninterrupted_run",
    ],
    "python train_gpt.py --help": ["tests/test_config.py::test_help_lists_every_variable_with_its_default"],
    "python train_gpt.py --dry-run": [
        f"{E2E}::test_dry_run_counts_without_data",
        "tests/test_moe.py::test_some_presets_match_the_study_counts_on_the_meta_device",
        "tests/test_config.py::test_presets_set_defaults_that_env_vars_override",
    ],
    "torchrun train_gpt.py": [
        "tests/test_distributed.py::test_two_ranks_match_one_rank_with_accumulation",
        "tests/test_distributed.py::test_two_nodes_under_c10d_rendezvous_match_one_process_and_only_global_rank_0_writes",
    ],
    # srun itself is SLURM's; the torchrun c10d rendezvous it starts on each node is tested.
    "srun torchrun train_gpt.py": [
        "tests/test_distributed.py::test_two_nodes_under_c10d_rendezvous_match_one_process_and_only_global_rank_0_writes",
    ],
    "bash run.sh": [
        "tests/test_bench.py::test_run_sh_keeps_the_corpus_tuned_settings_off_a_users_data",
        "tests/test_cpu_size.py::test_run_sh_trains_the_measured_size_with_its_warmdown",
        f"{E2E}::test_cpu_run_trains_exports_and_round_trips",
    ],
    "python data/synthetic.py": ["tests/test_synthetic.py::test_cli_writes_jsonl"],
    "python data/prepare.py": [
        "tests/test_prepare.py::test_jsonl_with_a_trained_tokenizer",
        "tests/test_prepare.py::test_txt_blank_lines_and_a_given_tokenizer",
    ],
    "python data/fineweb.py": [
        "tests/test_fineweb.py::test_download_lays_files_out_like_the_challenge",
        "tests/test_fineweb.py::test_the_hub_fetcher_asks_hf_hub_download_for_the_dataset_repo",
    ],
    "python tools/bench.py": [
        "tests/test_bench.py::test_mfu_counts_the_matmuls_and_attention_of_the_current_depth",
        "tests/test_bench.py::test_the_suite_counts_one_graph_per_depth_phase_when_compiling",
    ],
    "python tools/bench.py --help": ["tests/test_bench.py::test_every_tool_answers_help"],
    "python tools/bench.py --suite": [
        "tests/test_bench.py::test_every_suite_row_is_judged_against_its_goal",
        "tests/test_bench.py::test_the_suite_counts_one_graph_per_depth_phase_when_compiling",
    ],
    # The code path: no test runs bench.py's own checkpoint timing.
    "python tools/bench.py --checkpoint": [
        "tests/test_checkpoint.py::test_resume_after_a_crash_equals_the_uninterrupted_run",
    ],
    "python tools/bench.py --eval": ["tests/test_bench.py::test_the_evaluation_benchmark_scores_every_token_with_each_method"],
    # The code path: no test runs bench.py's own export timing.
    "python tools/bench.py --export": [
        "tests/test_export.py::test_artifact_round_trip_rebuilds_the_model",
        "tests/test_export.py::test_the_smallest_legal_model_of_every_kind_exports_and_reloads",
    ],
    # The code path (the training step it profiles): no test runs torch.profiler.
    "python tools/bench.py --profile": ["tests/test_bench.py::test_the_suite_counts_one_graph_per_depth_phase_when_compiling"],
    "python tools/bench.py --optimizer": [
        "tests/test_bench.py::test_the_optimizer_benchmark_times_batched_muon_against_one_matrix_at_a_time",
    ],
    "python tools/quant_table.py": [f"{E2E}::test_quant_table_compares_every_scheme_on_a_checkpoint"],
    "python tools/compare_per_token.py": [f"{E2E}::test_per_token_comparison_of_two_runs"],
    "python tools/cpu_size.py": [
        "tests/test_cpu_size.py::test_run_sh_trains_the_measured_size_with_its_warmdown",
        "tests/test_cpu_size.py::test_a_slower_machine_gets_a_smaller_model_and_a_warmdown_fitted_to_its_steps",
    ],
    "python tools/plot.py": ["tests/test_plot.py::test_every_plot_is_a_png_of_the_fixed_size_with_coloured_content"],
    "python tools/sweep.py": [
        "tests/test_sweep.py::test_ctrl_c_checkpoints_the_running_run_and_the_same_command_continues_and_tabulates",
        "tests/test_sweep.py::test_with_gpus_runs_go_n_at_a_time_each_on_its_own_and_a_failure_is_reported_not_fatal",
    ],
    "python tools/sweep.py --dry-run": [
        "tests/test_sweep.py::test_finished_runs_are_skipped_interrupted_ones_resumed_and_one_made_otherwise_refused",
    ],
    # Its parts need a GPU: on the CPU only the argument handling runs.
    "bash tools/gpu_check.sh": [
        "tests/test_bench.py::test_gpu_check_refuses_an_unknown_part",
        "tests/test_bench.py::test_every_tool_answers_help",
    ],
    "bash tools/gpu_check.sh --help": ["tests/test_bench.py::test_every_tool_answers_help"],
    "python tools/pack_code.py": ["tests/test_packed.py::test_the_pack_command_writes_the_packed_file"],
    "python records/make_record.py": [
        "tests/test_make_record.py::test_three_seeds_make_a_folder_that_passes_and_whose_packed_code_reproduces_a_seed",
    ],
    "python records/check.py": [
        "tests/test_records.py::test_a_good_folder_passes_from_any_directory",
        "tests/test_records.py::test_leaderboard_lists_passing_folders_best_first",
    ],
    "python tools/settings_doc.py": ["tests/test_config.py::test_the_settings_reference_is_generated_from_the_code"],
    "python tools/settings_doc.py --check": [
        "tests/test_config.py::test_the_settings_reference_is_generated_from_the_code",
    ],
}


def command_pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "records" / "README.md"] + sorted(
        p for p in (ROOT / "docs").glob("*.md") if p.name not in NOT_CHECKED_FOR_COMMANDS)


def link_pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def fenced_blocks(text: str) -> list[tuple[str, int, list[str]]]:
    """(language, line number of the first body line, body lines) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, language, start = opened.group(1), opened.group(2).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        blocks.append((language, start + 1, lines[start:i]))
        i += 1
    return blocks


def command_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of each shell command in the text's shell blocks; backslash-continued
    lines joined, comment lines and blank lines dropped, a console block's output lines too."""
    found = []
    for language, first, body in fenced_blocks(text):
        if language not in SHELL_LANGUAGES:
            continue
        pending, pending_at = "", 0
        for offset, raw in enumerate(body):
            line = raw.strip()
            if language == "console":
                if not (line.startswith("$ ") or pending):
                    continue
                line = line[2:] if line.startswith("$ ") else line
            if not pending and (not line or line.startswith("#")):
                continue
            if not pending:
                pending_at = first + offset
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            found.append((pending_at, pending + line))
            pending = ""
        if pending:
            found.append((pending_at, pending))
    return found


def tokens_of(command: str) -> list[str]:
    """Shell words, with $(...) substitutions and [optional] usage groups taken out first, so that a
    pipe inside them does not end the command."""
    command = re.sub(r"\$\([^()]*\)", "SUBST", command)
    command = re.sub(r"\[[^\[\]]*\]", " ", command)
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def simple_commands(command: str) -> list[list[str]]:
    """The words of each command of a line: split at ; && || and &, and of a pipeline only its first
    stage (what is piped into is a filter)."""
    commands, current, piped = [], [], False
    for token in tokens_of(command):
        if token in {";", "&&", "||", "&"}:
            if current and not piped:
                commands.append(current)
            current, piped = [], False
        elif token == "|":
            if current and not piped:
                commands.append(current)
            current, piped = [], True
        elif not piped:
            current.append(token)
    if current and not piped:
        commands.append(current)
    return commands


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
SCRIPT_RUNNERS = {"python", "bash", "sh"}


def key_of(words: list[str]) -> str | None:
    """`PRESET=x python tools/bench.py --suite --json f` -> `python tools/bench.py --suite`: the
    launchers, the program and its script, and the first mode flag; any other program whole."""
    words = list(words)
    while words and ASSIGNMENT.match(words[0]):
        words.pop(0)
    parts = []
    while words and words[0] in LAUNCHERS:
        parts.append(words.pop(0))
        while words and words[0].startswith("-"):
            words.pop(0)
    if not words:
        return " ".join(parts) or None
    program = "python" if re.fullmatch(r"python3?(\.\d+)?", words[0]) else words[0]
    if not parts and program in SHELL_BUILTINS:
        return program
    if program == "python" and words[1:2] == ["-m"] and len(words) > 2:
        return " ".join(parts + ["python", "-m", words[2]])
    if program in SCRIPT_RUNNERS:
        parts.append(program)
        words.pop(0)
        while words and words[0].startswith("-"):
            words.pop(0)
        if words:
            parts.append(words.pop(0))
    elif parts:  # what a launcher runs: torchrun train_gpt.py
        parts.append(words.pop(0))
    else:
        return " ".join(words)
    mode = next((w for w in words if w in MODE_FLAGS), None)
    return " ".join(parts + ([mode] if mode else []))


def shown_commands(pages: list[Path], root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(where, command line, key) of every command the pages show."""
    shown = []
    for page in pages:
        for line_no, line in command_lines(page.read_text(encoding="utf-8")):
            for words in simple_commands(line):
                key = key_of(words)
                if key:
                    shown.append((f"{page.relative_to(root)}:{line_no}", line, key))
    return shown


def unregistered(shown: list[tuple[str, str, str]]) -> list[str]:
    return [f"{where}: {key!r} (from: {line})" for where, line, key in shown
            if key not in REGISTRY and key not in ALLOWED]


def test_every_command_shown_is_registered_with_the_tests_that_run_it():
    shown = shown_commands(command_pages())
    assert len(shown) > 20, "the extractor found almost no commands: is it broken?"
    missing = unregistered(shown)
    assert missing == [], "commands that no test is registered for (add them to REGISTRY):\n" + "\n".join(missing)


def test_every_registered_command_is_still_shown():
    keys = {key for _, _, key in shown_commands(command_pages())}
    stale = sorted(set(REGISTRY) - keys)
    assert stale == [], f"REGISTRY entries that no page shows any more: {stale}"


def defined_tests(path: Path) -> set[str]:
    """The names of the test functions a file defines, read with ast: nothing is imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")}


def test_every_registered_test_exists():
    bad = []
    for key, node_ids in REGISTRY.items():
        assert node_ids, f"{key!r} names no test"
        for node_id in node_ids:
            file, _, name = node_id.partition("::")
            path = ROOT / file
            if not (path.is_file() and name and name.split("[")[0] in defined_tests(path)):
                bad.append(f"{key!r}: {node_id}")
    assert bad == [], "registered tests that do not exist:\n" + "\n".join(bad)


def runs(line: str, command: str) -> bool:
    """Whether the line runs the command, perhaps with more flags: its words, in order, are there."""
    words = iter(line.split())
    return all(word in words for word in command.split())


def test_what_ci_runs_is_in_ci():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command, by in ALLOWED.items():
        assert by == CI
        if command not in SHELL_BUILTINS:
            assert any(runs(line, command) for line in ci), f"{command!r} is allowed as CI's, but .ci/run does not run it"


def cheap_commands() -> list[tuple[str, str]]:
    seen, cheap = set(), []
    for where, line, key in shown_commands(command_pages()):
        if key.split()[-1] in CHEAP_FLAGS and line not in seen:
            seen.add(line)
            cheap.append((where, line))
    return cheap


@pytest.mark.parametrize("where,line", cheap_commands(), ids=[w for w, _ in cheap_commands()])
def test_the_cheap_commands_run_as_shown(where, line, tmp_path):
    """--help and --dry-run lines run from the repository root exactly as the page shows them, `python`
    being this interpreter."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{where}: {line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("line,key", [
    ("python train_gpt.py", "python train_gpt.py"),
    ("PRESET=recurrent,cpu python train_gpt.py --dry-run     # counts", "python train_gpt.py --dry-run"),
    ("COMPILE=1 AUTOCAST=1 python tools/bench.py --suite --steps 6 --warmup 2", "python tools/bench.py --suite"),
    ("python tools/bench.py --shape baseline --steps 5", "python tools/bench.py"),
    ("python tools/bench.py --checkpoint --shape baseline", "python tools/bench.py --checkpoint"),
    ("torchrun --standalone --nproc_per_node=8 train_gpt.py   # one machine", "torchrun train_gpt.py"),
    ("srun --nodes=2 torchrun --nnodes=$SLURM_NNODES --rdzv_endpoint=$(scontrol show hostnames | head -n1):29500 "
     "train_gpt.py", "srun torchrun train_gpt.py"),
    ("bash tools/gpu_check.sh [all|correctness|reference|suite]   # default all", "bash tools/gpu_check.sh"),
    ("python data/prepare.py --input FILE... --out DIR [--tokenizer MODEL | --vocab-size N]", "python data/prepare.py"),
    ("python3 -m pytest -q", "python -m pytest"),
    ("pip install -r requirements.txt   # torch", "pip install -r requirements.txt"),
    ("cd /tmp && RUN_ID=a python train_gpt.py | tee out.txt", None),
])
def test_a_command_line_reduces_to_its_key(line, key):
    keys = [key_of(words) for words in simple_commands(line)]
    if key is None:  # a compound line: each command, the filter after the pipe left out
        assert keys == ["cd", "python train_gpt.py"]
    else:
        assert keys == [key]


def test_an_unregistered_command_on_a_page_is_reported(tmp_path):
    """The check's own check: a page that shows a command no test runs fails, naming it and its line."""
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n```bash\n# a comment\nbash run.sh\nFOO=1 python tools/new_tool.py --go \\\n  --far\n```\n\n"
                    "```text\nname  tokens/s\n```\n\n```console\n$ python train_gpt.py --help\nPRESET  str\n```\n")
    shown = shown_commands([page], tmp_path)
    assert [(where, key) for where, _, key in shown] == [
        ("page.md:5", "bash run.sh"), ("page.md:6", "python tools/new_tool.py"), ("page.md:15", "python train_gpt.py --help")]
    assert unregistered(shown) == ["page.md:6: 'python tools/new_tool.py' (from: FOO=1 python tools/new_tool.py --go --far)"]


# ----------------------------------------------------------------------------------------------
# Links
# ----------------------------------------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def outside_fences(text: str) -> list[str]:
    """The text's lines, those of fenced blocks blanked."""
    lines, fence = [], ""
    for line in text.splitlines():
        opened = FENCE.match(line)
        if opened and (not fence or line.strip().startswith(fence)):
            fence = "" if fence else opened.group(1)
            lines.append("")
        else:
            lines.append("" if fence else line)
    return lines


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation dropped (backticks too),
    spaces to hyphens, -1, -2 ... on repeats."""
    found, counts = set(), {}
    for line in outside_fences(page.read_text(encoding="utf-8")):
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not heading:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")
        found.add(slug if slug not in counts else f"{slug}-{counts[slug]}")
        counts[slug] = counts.get(slug, 0) + 1
    return found


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of the page (outside code) whose file, or heading, does not exist."""
    bad = []
    prose = re.sub(r"`[^`\n]*`", "", "\n".join(outside_fences(page.read_text(encoding="utf-8"))))
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            bad.append(f"{page.relative_to(root)}: {target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            bad.append(f"{page.relative_to(root)}: {target} (no such heading)")
    return bad


@pytest.mark.parametrize("page", link_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page):
    assert broken_links(page) == []


def test_a_broken_link_is_reported(tmp_path):
    (tmp_path / "there.md").write_text("# A heading, with `code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md) [ok](there.md#a-heading-with-code) [ok](there.md#twice-1) [web](https://x.org)\n"
                    "`[no](x.md)` [gone](missing.md) [bad anchor](there.md#nowhere)\n```\n[no](y.md)\n```\n")
    assert broken_links(page, tmp_path) == ["page.md: missing.md (no such file)",
                                            "page.md: there.md#nowhere (no such heading)"]

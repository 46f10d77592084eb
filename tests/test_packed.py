"""Packed code: train_gpt.py in the form a submission counts runs exactly as the source does."""

import ast
import re
import subprocess
import sys

import pytest

from conftest import ROOT, clean_env

import train_gpt

# Issue 18 set the goal at 40,000 bytes (met at 39,486); issue 19's pruning and issue 20's preemption, metrics stream,
# progress and warm-down check (all required) took it past. A feature that crosses this budget needs a decision.
PACKED_BUDGET = 44_000

TRICKY = '''"""The module's docstring."""
import os  # a comment after code
TEXT = """a string literal   
   
# that holds a hash and a blank line"""  # and a comment after it


class OnlyDoc:
    """A class whose body is its docstring."""


def f(x):
    """A docstring before code."""
    # a comment line
    return f"{x!r} # not a comment", 'single # quoted'  # trailing
'''


def test_stripping_removes_comments_docstrings_and_blank_lines_and_nothing_else():
    program = train_gpt.strip_program(TRICKY)
    assert "#" not in program.replace("# that holds", "").replace("# not a comment", "").replace("# quoted", "")
    assert "docstring" not in program and "\n\n\n" not in program
    assert 'TEXT = """a string literal   \n   \n# that holds a hash and a blank line"""' in program
    assert "class OnlyDoc:\n    pass\n" in program
    namespace = {}
    exec(program, namespace)
    assert namespace["f"](1) == ("1 # not a comment", "single # quoted")
    assert namespace["TEXT"] == 'a string literal   \n   \n# that holds a hash and a blank line'
    assert train_gpt.strip_program(program) == program  # packing a packed file's program changes nothing


@pytest.mark.parametrize("source,expected", [
    ('def f(): "doc"; return 1\n', "def f(): return 1\n"),
    ('def g():\n    """doc"""; return 2\n', "def g():\n    return 2\n"),
    ('def h():\n    "implicitly" "joined"\n    return 3\n', "def h():\n    return 3\n"),
    ('def u():\n    "\u00e9 doc"; return "\u00e9"\n', 'def u():\n    return "\u00e9"\n'),
])
def test_docstrings_on_one_line_with_code_or_in_pieces_are_cut_whole(source, expected):
    assert train_gpt.strip_program(source) == expected


def test_a_stripping_that_would_change_the_program_stops_with_one_line(monkeypatch):
    monkeypatch.setattr(train_gpt.tokenize, "COMMENT", train_gpt.tokenize.NAME)  # "strip" every name instead
    with pytest.raises(train_gpt.InputError, match="stripping its comments and docstrings would change its program"):
        train_gpt.strip_program("x = 1  # one\n")


def without_docstrings(tree: ast.AST) -> str:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def test_the_trainers_program_is_its_syntax_tree_without_docstrings_and_packs_within_budget():
    source = (ROOT / "train_gpt.py").read_text()
    program = train_gpt.strip_program(source)
    assert without_docstrings(ast.parse(program)) == without_docstrings(ast.parse(source))
    packed = train_gpt.pack_program(program)
    assert train_gpt.program_of(packed) == program
    assert len(packed) <= PACKED_BUDGET, len(packed)


@pytest.mark.parametrize("byte", [b"\\", b'"', b"\r", b"\0", b"\n", b"\xff"])
def test_every_byte_survives_the_string_literal(byte):
    program = "DATA = " + repr(bytes(range(256)) * 4 + byte * 9) + "\n"
    assert train_gpt.program_of(train_gpt.pack_program(program)) == program


def run(code_path, env, *args):
    return subprocess.run([sys.executable, str(code_path), *args], env={**clean_env(), **env}, capture_output=True,
                          text=True, cwd=code_path.parent, timeout=300)


# What differs between two runs of one program: the code's own lines, times, speeds, memory.
CODE_LINES = re.compile(r"^(Code sha256|Code size).*$|\d+(\.\d+)?m?s\b|tok_s:\d+|peak memory.*$|time:\S+", re.M)


def test_the_packed_file_runs_the_same_run(tiny_env, tmp_path):
    """Same log apart from the code's own lines and times, same figures, same exit codes; --help and --dry-run."""
    packed_path = tmp_path / "packed" / "train_gpt.py"
    packed_path.parent.mkdir()
    packed_path.write_bytes(train_gpt.pack_program(train_gpt.program_of((ROOT / "train_gpt.py").read_bytes())))
    logs = {}
    for name, path in (("source", ROOT / "train_gpt.py"), ("packed", packed_path)):
        out = run(path, {**tiny_env, "RUN_ID": name, "EVAL_STRIDE": "32", "EVAL_AUDIT": "1",
                        "EVAL_AUDIT_SEED": "5"})
        assert out.returncode == 0, out.stderr[-2000:]
        logs[name] = (tmp_path / "logs" / f"{name}.txt").read_text()
    source, packed = (re.sub(r"\b(source|packed)\b", "X", CODE_LINES.sub("", logs[n])) for n in ("source", "packed"))
    assert source.splitlines() == packed.splitlines()
    finals = [re.findall(r"^final_.*_exact .*$", logs[n], re.M) for n in ("source", "packed")]
    assert finals[0] == finals[1] and len(finals[0]) == 3
    sizes = [re.search(r"^Code size: (\d+) bytes \(packed: (\d+) bytes", logs[n], re.M).groups() for n in logs]
    assert sizes[0][1] == sizes[1][0] == sizes[1][1] == str(len(packed_path.read_bytes()))
    totals = [re.search(r"^Total submission size \S+: (\d+) bytes", logs[n], re.M).group(1) for n in logs]
    assert totals[0] == totals[1]
    programs = [re.search(r"^Program sha256: (\w+)$", logs[n], re.M).group(1) for n in logs]
    assert programs[0] == programs[1]
    for args in (["--help"], ["--dry-run"]):
        outs = [run(path, {"RUN_ID": "d"}, *args) for path in (ROOT / "train_gpt.py", packed_path)]
        assert outs[0].returncode == outs[1].returncode == 0 and outs[0].stdout == outs[1].stdout
    bad = [run(path, {**tiny_env, "ITERATIONS": "zero"}) for path in (ROOT / "train_gpt.py", packed_path)]
    assert bad[0].returncode == bad[1].returncode == 2 and bad[0].stderr == bad[1].stderr


def test_the_pack_command_writes_the_packed_file(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "pack_code.py"), "--out", str(tmp_path / "t.py")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    packed = (tmp_path / "t.py").read_bytes()
    assert f"{tmp_path / 't.py'}: {len(packed)} bytes" in out.stdout
    assert train_gpt.program_of(packed) == train_gpt.program_of((ROOT / "train_gpt.py").read_bytes())

"""The synthetic corpus: deterministic, parseable back to its exact entropy, plain single-line ASCII."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT
from data import synthetic
from data.synthetic import Lexicon, generate, parse

SAMPLE = 2000


@pytest.fixture(scope="module")
def docs():
    return list(generate(SAMPLE, seed=1337))


def test_same_seed_same_corpus_and_documents_do_not_depend_on_the_count(docs):
    assert list(generate(50, seed=1337)) == docs[:50]
    assert list(generate(5, seed=1338)) != docs[:5]


def test_parse_recovers_every_documents_exact_entropy(docs):
    for text, bits in docs:
        assert math.isclose(parse(text), bits, rel_tol=0, abs_tol=1e-6), text[:80]


def test_parse_refuses_text_the_grammar_cannot_make(docs):
    text = docs[0][0]
    for bad in (text + " Extra words.", text.replace(".", "!", 1), "Hello world.", text[:-1]):
        with pytest.raises(ValueError):
            parse(bad)


def test_text_format(docs):
    for text, _ in docs:
        assert text.isascii() and text.isprintable()
        assert "\n" not in text and "  " not in text and text == text.strip()
        assert text[0].isupper() and text[-1] in '.!?"'


def test_corpus_statistics(docs):
    total_bytes = sum(len(t) for t, _ in docs)
    bits_per_byte = sum(b for _, b in docs) / total_bytes
    assert 0.3 < bits_per_byte < 1.5
    assert 400 < total_bytes / len(docs) < 2500
    lengths = sorted(len(t) for t, _ in docs)
    assert lengths[len(lengths) // 10] * 3 < lengths[9 * len(lengths) // 10]  # varied lengths
    words = {w for t, _ in docs for w in synthetic.TOKEN.findall(t)}
    assert len(words) > 1000


def test_names_recur_within_a_document(docs):
    long_docs = [t for t, _ in docs if len(t) > 1500]
    assert long_docs
    for text in long_docs[:20]:
        name = synthetic.TOKEN.findall(text)[synthetic.TOKEN.findall(text).index("named") + 1]
        assert text.count(name) >= 2


def test_lexicon_exclusion_renormalises():
    lex = Lexicon(["a", "b", "c"], [1.0, 2.0, 1.0])
    assert lex.bits(1, set()) == pytest.approx(1.0)
    assert lex.bits(1, {"a"}) == pytest.approx(-math.log2(2 / 3))
    with pytest.raises(ValueError):
        Lexicon(["a", "a"], [1.0, 1.0])


def test_cli_writes_jsonl(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "data" / "synthetic.py"), "--out", str(tmp_path / "d"),
                          "--docs", "30", "--seed", "5"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in (tmp_path / "d" / "synthetic.jsonl").read_text().splitlines()]
    assert [(r["text"], r["entropy_bits"]) for r in rows] == list(generate(30, seed=5))
    assert "bits_per_byte:" in out.stdout
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["synthetic.jsonl"]


@pytest.mark.parametrize("args", [["--docs", "0"], ["--docs", "-3"]])
def test_cli_refuses_bad_arguments(tmp_path, args):
    out = subprocess.run([sys.executable, str(ROOT / "data" / "synthetic.py"), "--out", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1


def test_cli_refuses_an_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = subprocess.run([sys.executable, str(ROOT / "data" / "synthetic.py"), "--out", str(blocker / "d"),
                          "--docs", "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--out" in out.stderr

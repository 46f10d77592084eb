"""data/prepare.py: the shard writer, text to shards, the validation split, meta.json, refusals."""

import gzip
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data.prepare import split_on_separator, write_shard  # noqa: E402

PREPARE = ROOT / "data" / "prepare.py"
BOS = 1
WORDS = ("the a cat dog bird sat ran over under big small red house tree river stone and but when "
         "then light dark friend café naïve 1984 42").split()


def make_docs(n: int, seed: int, lines: int = 1) -> list[str]:
    """Documents of `lines` lines of words; text that the nmt_nfkc normalizer leaves as it is."""
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))).capitalize() + "."
                      for _ in range(lines))
            for _ in range(n)]


def run_prepare(*args):
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def read_shard(path: Path) -> np.ndarray:
    blob = path.read_bytes()
    header = np.frombuffer(blob[:1024], dtype="<i4")
    assert header[:2].tolist() == [20240520, 1] and not header[3:].any()
    assert len(blob) == 1024 + 2 * int(header[2])
    return np.frombuffer(blob[1024:], dtype="<u2")


def shard_docs(folder: Path, split: str, sp) -> list[str]:
    """The split's shards concatenated, cut at every BOS, each document decoded."""
    tokens = np.concatenate([read_shard(p) for p in sorted(folder.glob(f"fineweb_{split}_*.bin"))]).tolist()
    assert tokens[0] == BOS, "every document starts with BOS, the first one included"
    docs, current = [], []
    for token in tokens[1:] + [BOS]:
        if token == BOS:
            docs.append(sp.decode(current))
            current = []
        else:
            current.append(token)
    return docs


def final_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory) -> Path:
    """A tiny tokenizer of the challenge's settings, made independently of prepare.py."""
    prefix = tmp_path_factory.mktemp("tok") / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(make_docs(300, seed=0)), model_prefix=str(prefix), vocab_size=320,
        model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
        normalization_rule_name="nmt_nfkc", add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp(tokenizer_model):
    return spm.SentencePieceProcessor(model_file=str(tokenizer_model))


# ----------------------------------------------------------------------------------------------
# write_shard
# ----------------------------------------------------------------------------------------------

def test_write_shard_bytes_exactly(tmp_path):
    write_shard(tmp_path / "x_val_000000.bin", np.array([1, 2, 300, 65535], dtype=np.int64))
    blob = (tmp_path / "x_val_000000.bin").read_bytes()
    assert blob[:12] == (20240520).to_bytes(4, "little") + (1).to_bytes(4, "little") + (4).to_bytes(4, "little")
    assert blob[12:1024] == bytes(1012)
    assert blob[1024:] == bytes([1, 0, 2, 0, 0x2C, 0x01, 0xFF, 0xFF])
    assert final_files(tmp_path) == ["x_val_000000.bin"]


def test_write_shard_refusals_leave_nothing(tmp_path):
    write_shard(tmp_path / "a.bin", np.array([5], dtype=np.uint16))
    before = (tmp_path / "a.bin").read_bytes()
    for bad in (np.array([65536]), np.array([-1]), np.zeros((2, 2), dtype=np.uint16),
                np.broadcast_to(np.uint16(1), (2**31,))):  # 2**31 tokens without allocating them
        with pytest.raises(ValueError):
            write_shard(tmp_path / "a.bin", bad)
    assert (tmp_path / "a.bin").read_bytes() == before
    assert final_files(tmp_path) == ["a.bin"]


def test_separator_split_matches_str_split_across_chunk_boundaries():
    rng = random.Random(1)
    for _ in range(500):
        separator = "".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4)))
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 50)))
        size = rng.randint(1, 6)
        chunks = [text[i:i + size] for i in range(0, len(text), size)]
        assert list(split_on_separator(iter(chunks), separator)) == text.split(separator)


# ----------------------------------------------------------------------------------------------
# Text to shards
# ----------------------------------------------------------------------------------------------

def test_jsonl_with_a_trained_tokenizer(tmp_path):
    # "qxv" appears only, and often, in validation documents: a tokenizer trained on them would
    # have pieces for it
    val = [doc + " qxvqxv" * 20 for doc in make_docs(10, seed=1)]
    docs = val + make_docs(200, seed=2)
    rows = [{"text": text, "entropy_bits": 0.5 + i, "id": i} for i, text in enumerate(docs)]
    out = run_prepare("--input", write_jsonl(tmp_path / "c.jsonl", rows), "--out", tmp_path / "o",
                      "--vocab-size", 400, "--val-docs", 10)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["tokenizer"] == str((tmp_path / "o" / "tokenizer.model").resolve())
    assert meta["tokenizer_sha256"] == hashlib.sha256(Path(meta["tokenizer"]).read_bytes()).hexdigest()
    assert (tmp_path / "o" / "tokenizer.vocab").is_file()
    trained = spm.SentencePieceProcessor(model_file=meta["tokenizer"])
    space = trained.piece_to_id("\u2581")
    assert space != trained.unk_id() and trained.id_to_piece(space) == "\u2581"
    assert not any("qx" in trained.id_to_piece(i) for i in range(trained.vocab_size()))
    assert (meta["val_docs"], meta["train_docs"], meta["vocab_size"]) == (10, 200, trained.vocab_size())
    assert meta["val_utf8_bytes"] == sum(len(text.encode("utf-8")) for text in val)
    assert meta["val_entropy_bits"] == pytest.approx(sum(0.5 + i for i in range(10)))
    assert shard_docs(tmp_path / "o", "val", trained) == val
    assert shard_docs(tmp_path / "o", "train", trained) == docs[10:]
    assert meta["val_tokens"] == len(read_shard(tmp_path / "o" / "fineweb_val_000000.bin"))
    assert meta["train_tokens"] == len(read_shard(tmp_path / "o" / "fineweb_train_000000.bin"))


def test_trained_tokenizer_has_the_space_piece_even_without_spaces(tmp_path):
    rows = [{"text": "".join(random.Random(i).choice("abcdefgh") for _ in range(40))} for i in range(60)]
    out = run_prepare("--input", write_jsonl(tmp_path / "c.jsonl", rows), "--out", tmp_path / "o",
                      "--vocab-size", 300, "--val-docs", 5)
    assert out.returncode == 0, out.stderr
    trained = spm.SentencePieceProcessor(model_file=str(tmp_path / "o" / "tokenizer.model"))
    assert trained.piece_to_id("\u2581") != trained.unk_id()


def test_tokenizer_training_is_deterministic(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in make_docs(120, seed=3)])
    for name in ("a", "b"):
        assert run_prepare("--input", path, "--out", tmp_path / name, "--vocab-size", 350,
                           "--val-docs", 10).returncode == 0
    # the model file also records where it was trained, so compare what it encodes with
    assert (tmp_path / "a" / "tokenizer.vocab").read_bytes() == (tmp_path / "b" / "tokenizer.vocab").read_bytes()
    assert ((tmp_path / "a" / "fineweb_train_000000.bin").read_bytes()
            == (tmp_path / "b" / "fineweb_train_000000.bin").read_bytes())


def test_txt_blank_lines_and_a_given_tokenizer(tmp_path, tokenizer_model, sp):
    docs = make_docs(30, seed=4, lines=3)
    docs[0] = docs[0].replace("\n", "\r\n", 1)  # kept as written, so counted in the validation bytes
    # blank separators of every kind: one or several empty lines, a line of spaces, CRLF
    text = ("\n\n".join(docs[:10]) + "\n \n" + "\n\n\n".join(docs[10:20]) + "\r\n\r\n"
            + "\n\n".join(docs[20:]) + "\n")
    (tmp_path / "in.txt").write_bytes(text.encode("utf-8"))
    out = run_prepare("--input", tmp_path / "in.txt", "--out", tmp_path / "o", "--tokenizer", tokenizer_model,
                      "--val-docs", 20)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert (meta["val_docs"], meta["train_docs"]) == (20, 10)
    assert meta["val_utf8_bytes"] == sum(len(d.encode("utf-8")) for d in docs[:20])
    # nmt_nfkc reads a line break as a space
    assert shard_docs(tmp_path / "o", "val", sp) == [" ".join(d.split()) for d in docs[:20]]
    assert shard_docs(tmp_path / "o", "train", sp) == [" ".join(d.split()) for d in docs[20:]]
    assert meta["tokenizer"] == str(tokenizer_model.resolve()) and "val_entropy_bits" not in meta
    assert meta["tokenizer_sha256"] == hashlib.sha256(tokenizer_model.read_bytes()).hexdigest()
    assert not (tmp_path / "o" / "tokenizer.model").exists()


@pytest.mark.parametrize("separator,raw", [("<|endoftext|>", "<|endoftext|>"), ("\n---\n", "\\n---\\n"),
                                           ("\t\u00a7", "\\t\\u00a7")])
def test_doc_sep_with_escapes(tmp_path, tokenizer_model, sp, separator, raw):
    docs = make_docs(6, seed=5, lines=2)
    text = separator.join(docs[:3] + ["  ", "x\x00y"] + docs[3:])  # a blank piece is no document; NUL is a space
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    out = run_prepare("--input", tmp_path / "in.txt", "--out", tmp_path / "o", "--tokenizer", tokenizer_model,
                      "--val-docs", 2, "--doc-sep", raw)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert (meta["val_docs"], meta["train_docs"]) == (2, 5)
    expected = [d.replace("\n", " ") for d in docs[2:3] + ["x y"] + docs[3:]]
    assert shard_docs(tmp_path / "o", "train", sp) == expected


def test_gzip_inputs_in_order_and_shard_size(tmp_path, tokenizer_model, sp):
    first, second = make_docs(5, seed=6), make_docs(40, seed=7)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t, "entropy_bits": 3}) + "\n" for t in first))
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(second))
    out = run_prepare("--input", tmp_path / "a.jsonl.gz", tmp_path / "b.txt.gz", "--out", tmp_path / "o",
                      "--tokenizer", tokenizer_model, "--val-docs", 5, "--shard-tokens", 100)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["val_entropy_bits"] == 15 and meta["val_docs"] == 5
    assert shard_docs(tmp_path / "o", "val", sp) == first
    assert shard_docs(tmp_path / "o", "train", sp) == second
    sizes = [len(read_shard(p)) for p in sorted((tmp_path / "o").glob("fineweb_train_*.bin"))]
    assert len(sizes) > 2 and set(sizes[:-1]) == {100} and 0 < sizes[-1] <= 100
    assert sum(sizes) == meta["train_tokens"] and meta["train_shards"] == len(sizes)


def test_entropy_bits_summed_only_when_every_val_doc_has_them(tmp_path, tokenizer_model):
    rows = [{"text": "one two", "entropy_bits": 4}, {"text": "three"}, {"text": "four", "entropy_bits": 1}]
    out = run_prepare("--input", write_jsonl(tmp_path / "c.jsonl", rows), "--out", tmp_path / "o",
                      "--tokenizer", tokenizer_model, "--val-docs", 2)
    assert out.returncode == 0, out.stderr
    assert "val_entropy_bits" not in json.loads((tmp_path / "o" / "meta.json").read_text())


def test_a_rerun_replaces_the_previous_shards(tmp_path, tokenizer_model):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in make_docs(60, seed=8)])
    args = ("--input", path, "--out", tmp_path / "o", "--tokenizer", tokenizer_model, "--val-docs", 5)
    assert run_prepare(*args, "--shard-tokens", 50).returncode == 0
    assert len(list((tmp_path / "o").glob("fineweb_train_*.bin"))) > 3
    assert run_prepare(*args).returncode == 0
    assert final_files(tmp_path / "o") == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "meta.json"]


# ----------------------------------------------------------------------------------------------
# Refusals: exit 2, one line on stderr, nothing under a final name
# ----------------------------------------------------------------------------------------------

BAD_JSONL = '{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n'


@pytest.mark.parametrize("name,content,extra,message", [
    ("missing.jsonl", None, [], "missing.jsonl: no such input file"),
    ("in.csv", "a,b\n", [], "in.csv: unknown input type"),
    ("in.jsonl", BAD_JSONL, [], "in.jsonl:3: invalid JSON"),
    ("in.jsonl", '{"text": "x"}\n{"body": "y"}\n', [], 'in.jsonl:2: no "text" string'),
    ("in.jsonl", '{"text": "x"}\n{"text": 5}\n', [], 'in.jsonl:2: no "text" string'),
    ("in.jsonl", '{"text": "a"}\n{"text": "b"}\n', ["--val-docs", 2], "only 2 documents"),
    ("in.txt.gz", "not gzip", [], "in.txt.gz: cannot read"),
    ("in.txt", "x\n\ny\n", ["--doc-sep", ""], "--doc-sep"),
    ("in.txt", "x\n\ny\n", ["--val-docs", 0], "--val-docs"),
])
def test_bad_input_with_a_given_tokenizer(tmp_path, tokenizer_model, name, content, extra, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    out = run_prepare("--input", tmp_path / name, "--out", tmp_path / "o", "--tokenizer", tokenizer_model,
                      "--val-docs", 1, *extra)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert final_files(tmp_path / "o") == []


@pytest.mark.parametrize("source,message", [
    ([], "one of the arguments --tokenizer --vocab-size is required"),
    (["--vocab-size", 300, "--tokenizer", "t.model"], "not allowed with"),
    (["--vocab-size", 65537], "--vocab-size=65537"),
    (["--vocab-size", 200], "--vocab-size=200"),
    (["--tokenizer", "nothing.model"], "nothing.model: tokenizer not found"),
    (["--tokenizer", "junk.model"], "junk.model: not a sentencepiece model"),
    (["--tokenizer", "nospace.model"], "no standalone"),
    (["--vocab-size", 300, "--val-docs", 3], "only 3 documents"),
])
def test_bad_tokenizer_choices(tmp_path, source, message):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    nospace = tmp_path / "nospace"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["abcabcabd"] * 50), model_prefix=str(nospace),
                                   vocab_size=270, model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
                                   hard_vocab_limit=False, minloglevel=2)
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in make_docs(3, seed=9)])
    source = [tmp_path / s if str(s).endswith(".model") else s for s in source]
    out = run_prepare("--input", path, "--out", tmp_path / "o", *source)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr
    assert final_files(tmp_path / "o") == []


def test_a_failed_rerun_leaves_the_previous_output_untouched(tmp_path, tokenizer_model):
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": t} for t in make_docs(30, seed=10)])
    assert run_prepare("--input", good, "--out", tmp_path / "o", "--tokenizer", tokenizer_model,
                       "--val-docs", 3).returncode == 0
    before = {name: (tmp_path / "o" / name).read_bytes() for name in final_files(tmp_path / "o")}
    (tmp_path / "bad.jsonl").write_text(good.read_text() + "{broken\n")
    out = run_prepare("--input", tmp_path / "bad.jsonl", "--out", tmp_path / "o", "--vocab-size", 300,
                      "--val-docs", 3)
    assert out.returncode == 2 and "bad.jsonl:31: invalid JSON" in out.stderr
    assert {name: (tmp_path / "o" / name).read_bytes() for name in final_files(tmp_path / "o")} == before

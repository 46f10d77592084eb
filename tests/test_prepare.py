"""data/prepare.py: text to shards, the validation split, meta.json, and its refusals."""

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from conftest import BOS, ROOT, make_docs
from data.prepare import write_shard
from train_gpt import read_shard

PREPARE = [sys.executable, str(ROOT / "data" / "prepare.py")]


def prepare(*args, timeout=120):
    return subprocess.run(PREPARE + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def split_docs(shard_paths, sp) -> list[str]:
    tokens = np.concatenate([np.asarray(read_shard(p)) for p in shard_paths]).tolist()
    assert tokens[0] == BOS
    docs, current = [], []
    for t in tokens[1:] + [BOS]:
        if t == BOS:
            docs.append(sp.decode(current))
            current = []
        else:
            current.append(t)
    return docs


def test_write_shard_bytes_exactly(tmp_path):
    write_shard(tmp_path / "a_val_000000.bin", np.array([1, 2, 300], dtype=np.int64))
    blob = (tmp_path / "a_val_000000.bin").read_bytes()
    header = np.frombuffer(blob[:1024], dtype="<i4")
    assert header[:3].tolist() == [20240520, 1, 3] and not header[3:].any()
    assert blob[1024:] == b"\x01\x00\x02\x00\x2c\x01"
    with pytest.raises(ValueError):
        write_shard(tmp_path / "b.bin", np.array([70000]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_val_000000.bin"]


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    docs = make_docs(300, seed=4)
    rows = [{"text": t, "entropy_bits": 10.0 + i} for i, t in enumerate(docs)]
    (d / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return d / "c.jsonl", docs


def test_jsonl_to_shards_with_a_trained_tokenizer(tmp_path, jsonl_corpus):
    path, docs = jsonl_corpus
    out = prepare("--input", path, "--out", tmp_path / "out", "--vocab-size", 400, "--val-docs", 20)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=meta["tokenizer"])
    assert sp.PieceToId("\u2581") != sp.unk_id()
    assert meta["val_docs"] == 20 and meta["train_docs"] == 280 and meta["vocab_size"] == sp.vocab_size()
    assert meta["val_utf8_bytes"] == sum(len(d.encode("utf-8")) for d in docs[:20])
    assert meta["val_entropy_bits"] == pytest.approx(sum(10.0 + i for i in range(20)))
    val = sorted((tmp_path / "out").glob("*_val_*.bin"))
    assert split_docs(val, sp) == docs[:20]
    assert split_docs(sorted((tmp_path / "out").glob("*_train_*.bin")), sp) == docs[20:]
    assert meta["val_tokens"] == sum(len(read_shard(p)) for p in val)


def test_txt_blank_lines_gzip_and_a_given_tokenizer(tmp_path, tokenizer_path):
    docs = make_docs(40, seed=5)
    with gzip.open(tmp_path / "in.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n\n".join(docs) + "\n")
    out = prepare("--input", tmp_path / "in.txt.gz", "--out", tmp_path / "o", "--tokenizer", tokenizer_path,
                  "--val-docs", 5, "--shard-tokens", 500)
    assert out.returncode == 0, out.stderr
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    train = sorted((tmp_path / "o").glob("*_train_*.bin"))
    assert len(train) > 1 and all(len(read_shard(p)) <= 500 for p in train)
    assert split_docs(train, sp) == docs[5:]
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["tokenizer"] == str(tokenizer_path.resolve()) and "val_entropy_bits" not in meta
    assert not (tmp_path / "o" / "tokenizer.model").exists()


def test_doc_sep_with_escapes(tmp_path, tokenizer_path):
    (tmp_path / "in.txt").write_text("one doc\nstill one<|endoftext|>two\n\nstill two<|endoftext|>  <|endoftext|>three")
    out = prepare("--input", tmp_path / "in.txt", "--out", tmp_path / "o", "--tokenizer", tokenizer_path,
                  "--val-docs", 1, "--doc-sep", "<|endoftext|>")
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert (meta["val_docs"], meta["train_docs"]) == (1, 2)
    (tmp_path / "in2.txt").write_text("a b\n---\nc d\n---\ne f")
    out = prepare("--input", tmp_path / "in2.txt", "--out", tmp_path / "o2", "--tokenizer", tokenizer_path,
                  "--val-docs", 1, "--doc-sep", "\\n---\\n")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "o2" / "meta.json").read_text())["train_docs"] == 2


def test_nul_is_a_space_and_empty_documents_are_skipped(tmp_path, tokenizer_path):
    rows = [{"text": "a\x00b"}, {"text": "   "}, {"text": "c d"}, {"text": "e"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = prepare("--input", tmp_path / "in.jsonl", "--out", tmp_path / "o", "--tokenizer", tokenizer_path,
                  "--val-docs", 1)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "o" / "meta.json").read_text())
    assert meta["val_utf8_bytes"] == 3 and meta["train_docs"] == 2


@pytest.mark.parametrize("name,content,extra,message", [
    ("missing.jsonl", None, [], "no such input file"),
    ("in.csv", "a,b", [], "unknown input type"),
    ("in.jsonl", '{"text": "ok"}\n{broken', [], "in.jsonl:2: not valid JSON"),
    ("in.jsonl", '{"body": "x"}', [], "in.jsonl:1: no string \"text\" field"),
    ("in.jsonl", '{"text": "only one"}', [], "need more than --val-docs"),
    ("in.jsonl", '{"text": "x"}', ["--val-docs", "0"], "--val-docs"),
])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, tokenizer_path, name, content, extra, message):
    if content is not None:
        (tmp_path / name).write_text(content)
    out = prepare("--input", tmp_path / name, "--out", tmp_path / "o", "--tokenizer", tokenizer_path, *extra)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_bad_tokenizers_are_refused(tmp_path, jsonl_corpus):
    path, _ = jsonl_corpus
    (tmp_path / "junk.model").write_bytes(b"junk")
    out = prepare("--input", path, "--out", tmp_path / "o", "--tokenizer", tmp_path / "junk.model")
    assert out.returncode == 2 and "not a sentencepiece model" in out.stderr
    out = prepare("--input", path, "--out", tmp_path / "o", "--tokenizer", tmp_path / "none.model")
    assert out.returncode == 2 and "not found" in out.stderr
    out = prepare("--input", path, "--out", tmp_path / "o", "--vocab-size", 100000)
    assert out.returncode == 2 and "--vocab-size" in out.stderr
    out = prepare("--input", path, "--out", tmp_path / "o")
    assert out.returncode == 2  # neither --tokenizer nor --vocab-size

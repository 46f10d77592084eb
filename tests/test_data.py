"""Data: shard validation, the token stream's split invariance, validation tokens, byte tables."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BOS, ROOT, encode_docs, make_docs
from data.prepare import write_shard
from train_gpt import (InputError, Runtime, TokenStream, build_byte_tables, load_config, load_validation_tokens,
                       read_shard, resolve_tokenizer)


def raw_shard(path: Path, header: list[int], body: bytes) -> Path:
    h = np.zeros(256, dtype="<i4")
    h[:len(header)] = header
    path.write_bytes(h.tobytes() + body)
    return path


def test_valid_shard_round_trips(tmp_path):
    tokens = np.array([1, 5, 7, 65535, 0], dtype=np.uint16)
    write_shard(tmp_path / "x_train_000000.bin", tokens)
    assert np.array_equal(read_shard(tmp_path / "x_train_000000.bin"), tokens)


@pytest.mark.parametrize("header,body,message", [
    ([20240520, 1, 3], b"\x01\x00" * 2, "declares 3 tokens"),
    ([20240520, 1, 2], b"\x01\x00" * 3, "declares 2 tokens"),
    ([12345, 1, 2], b"\x01\x00" * 2, "wrong magic"),
    ([20240520, 2, 2], b"\x01\x00" * 2, "unsupported version"),
    ([20240520, 1, -1], b"", "declares -1 tokens"),
])
def test_bad_shards_are_refused_with_the_file_named(tmp_path, header, body, message):
    path = raw_shard(tmp_path / "bad_train_000000.bin", header, body)
    with pytest.raises(InputError, match=message) as err:
        read_shard(path)
    assert str(path) in str(err.value)


def test_truncated_header_is_refused(tmp_path):
    path = tmp_path / "t_train_000000.bin"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="truncated header"):
        read_shard(path)


def test_token_id_beyond_vocab_is_refused_with_its_position(tmp_path):
    write_shard(tmp_path / "v_train_000000.bin", np.array([1, 2, 3, 900, 4], dtype=np.uint16))
    stream = TokenStream([tmp_path / "v_train_000000.bin"], vocab_size=512)
    with pytest.raises(InputError, match="token id 900 at position 3 >= VOCAB_SIZE=512"):
        stream.read(0, 5)
    with pytest.raises(InputError, match="token id 900"):
        load_validation_tokens([tmp_path / "v_train_000000.bin"], 2, 512)


def make_stream(tmp_path, sizes=(500, 333, 700)) -> TokenStream:
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"s_train_{i:06d}.bin")
        write_shard(files[-1], (np.arange(start, start + n) % 1000).astype(np.uint16))
        start += n
    return TokenStream(files, vocab_size=1000)


def test_stream_reads_across_shards_and_wraps(tmp_path):
    stream = make_stream(tmp_path)
    assert np.array_equal(stream.read(490, 20), np.arange(490, 510))
    assert np.array_equal(stream.read(1530, 6), np.array([1530, 1531, 1532, 0, 1, 2]) % 1000)


def step_tokens(stream, world: int, accum: int, step: int) -> list[tuple]:
    env = {"TRAIN_BATCH_TOKENS": "256", "TRAIN_SEQ_LEN": "16", "GRAD_ACCUM_STEPS": str(accum), "VOCAB_SIZE": "1000"}
    cfg, _ = load_config(env, world_size=world)
    seqs = []
    for rank in range(world):
        rt = Runtime(rank, world, 0, torch.device("cpu"), False)
        for micro in range(accum):
            x, y = stream.micro_batch(cfg, rt, step, micro)
            assert torch.equal(x[:, 1:], y[:, :-1])
            seqs += [tuple(row.tolist()) + (int(t[-1]),) for row, t in zip(x, y)]
    return sorted(seqs)


@pytest.mark.parametrize("world,accum", [(2, 2), (4, 1), (1, 1), (8, 2)])
def test_global_batch_is_the_same_whatever_the_split(tmp_path, world, accum):
    stream = make_stream(tmp_path)
    for step in (0, 3, 11):
        assert step_tokens(stream, world, accum, step) == step_tokens(stream, 1, 4, step)


def test_consecutive_steps_cover_the_stream_without_gaps(tmp_path):
    stream = make_stream(tmp_path)
    starts = [seq[0] for step in range(3) for seq in step_tokens(stream, 2, 2, step)]
    assert starts == [(16 * i) % 1000 for i in range(48)]


def test_validation_is_trimmed_to_whole_sequences(tmp_path):
    write_shard(tmp_path / "v_val_000000.bin", np.arange(1, 108, dtype=np.uint16))
    tokens = load_validation_tokens([tmp_path / "v_val_000000.bin"], 10, 200)
    assert len(tokens) == 101 and tokens[0] == 1 and tokens[-1] == 101


def count_text_bytes(sp, tables, texts: list[str]) -> int:
    ids = torch.from_numpy(encode_docs(sp, texts).astype(np.int64))
    return int(tables.count(ids[:-1], ids[1:]).sum())


HAND_COUNTED = [("Hello world", 11), ("The cat sat.", 12), ("café au lait", 13), ("naïve über", 12),
                ("中文 and 日本", 17), ("a  b", 4), ("x", 1)]


@pytest.mark.parametrize("text,nbytes", HAND_COUNTED)
def test_byte_tables_count_utf8_bytes_of_text(tokenizer, text, nbytes):
    tables = build_byte_tables(tokenizer, 320)
    normalized = tokenizer.decode(tokenizer.encode(text))
    assert len(normalized.encode("utf-8")) == count_text_bytes(tokenizer, tables, [text])
    if normalized == text:
        assert count_text_bytes(tokenizer, tables, [text]) == nbytes


def test_byte_tables_over_documents_equal_their_utf8_bytes(tokenizer):
    docs = make_docs(30, seed=9)
    tables = build_byte_tables(tokenizer, 320)
    assert count_text_bytes(tokenizer, tables, docs) == sum(len(d.encode("utf-8")) for d in docs)


def test_byte_table_entries(tokenizer):
    tables = build_byte_tables(tokenizer, 400)
    assert len(tables.base_bytes) == 400 and bool(tables.is_boundary[320:].all())
    for i in range(4):  # pad, bos, eos, unk
        assert tables.is_boundary[i] and tables.base_bytes[i] == 0
    byte_id = tokenizer.PieceToId("<0xE4>")
    assert tables.base_bytes[byte_id] == 1 and not tables.has_leading_space[byte_id]
    space = tokenizer.PieceToId("\u2581")
    assert tables.base_bytes[space] == 0 and tables.has_leading_space[space]
    # a leading space counts after a word, not after BOS
    word = tokenizer.encode("the")[-1]
    assert not tables.is_boundary[word]
    prev = torch.tensor([BOS, word])
    target = torch.tensor([space, space])
    assert tables.count(prev, target).tolist() == [0, 1]


SP1024 = ROOT.parent / "shared" / "data" / "fineweb_1024_bpe.model"


def load_tokenizer(path: Path, vocab_size: int):
    cfg, _ = load_config({"TOKENIZER_PATH": str(path), "VOCAB_SIZE": str(vocab_size), "RUN_ID": "t"})
    return resolve_tokenizer(cfg, {})[1]


@pytest.mark.skipif(not SP1024.is_file(), reason="the challenge tokenizer is not beside this checkout")
def test_challenge_tokenizer_reference_case():
    sp = load_tokenizer(SP1024, 1024)
    tables = build_byte_tables(sp, 1024)
    space = sp.PieceToId("\u2581")
    assert tables.has_leading_space[space] and tables.base_bytes[space] == 0 and not tables.is_boundary[space]
    assert tables.is_boundary[:4].all()  # pad, bos, eos, unk (this model has no byte-fallback pieces)
    the = sp.PieceToId("\u2581the")
    assert tables.base_bytes[the] == 3 and tables.has_leading_space[the]
    for text, nbytes in HAND_COUNTED:
        if sp.decode(sp.encode(text)) == text:
            assert count_text_bytes(sp, tables, [text]) == nbytes, text


def test_tokenizer_problems_are_input_errors(tmp_path, tokenizer_path):
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "missing.model", 320)
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a sentencepiece model"):
        load_tokenizer(tmp_path / "junk.model", 320)
    with pytest.raises(InputError, match="VOCAB_SIZE=100"):
        load_tokenizer(tokenizer_path, 100)

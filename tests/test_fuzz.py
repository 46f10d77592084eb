"""Random and damaged bytes fed to every loader: a clean InputError each time, never another failure."""

import io
import lzma
import random
import zlib

import numpy as np
import pytest
import torch
import zstandard

import train_gpt
from data.prepare import write_shard
from test_model import randomize, tiny_model
from train_gpt import CHECKPOINT_MAGIC, InputError, load_checkpoint, parse_artifact, read_shard

CASES = 150


def mutations(blob: bytes, rng: random.Random):
    """Random bytes, truncations, single flipped bytes and overwritten runs of a valid file."""
    for _ in range(CASES):
        kind = rng.choice(("random", "truncate", "flip", "splice"))
        if kind == "random":
            yield bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 2048)))
        elif kind == "truncate":
            yield blob[:rng.randint(0, len(blob) - 1)]
        elif kind == "flip":
            i = rng.randrange(len(blob))
            yield blob[:i] + bytes([blob[i] ^ (1 << rng.randrange(8))]) + blob[i + 1:]
        else:
            i = rng.randrange(len(blob))
            yield blob[:i] + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))) + blob[i + 64:]


def test_shard_loader(tmp_path):
    """Damaged shards are refused, or read as exactly what their header and size say; targeted damage
    to each header field is always refused."""
    good = tmp_path / "good_train_000000.bin"
    write_shard(good, np.arange(1, 500, dtype=np.uint16))
    blob = good.read_bytes()
    path = tmp_path / "fuzz_train_000000.bin"
    refused = 0
    for damaged in mutations(blob, random.Random(1)):
        path.write_bytes(damaged)
        try:
            tokens = read_shard(path)
            train_gpt.check_token_ids(tokens, 512, path, 0)
        except InputError:
            refused += 1
            continue
        header = np.frombuffer(damaged[:train_gpt.SHARD_HEADER_BYTES], dtype="<i4")
        assert (header[0], header[1]) == (train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION)
        assert len(damaged) == train_gpt.SHARD_HEADER_BYTES + 2 * int(header[2]) == train_gpt.SHARD_HEADER_BYTES + 2 * len(tokens)
        assert np.array_equal(np.asarray(tokens), np.frombuffer(damaged[train_gpt.SHARD_HEADER_BYTES:], dtype="<u2"))
    assert refused > CASES // 2
    header = np.frombuffer(blob[:train_gpt.SHARD_HEADER_BYTES], dtype="<i4").copy()
    for field, value in ((0, 1), (1, 2), (2, 498), (2, 500), (2, -1)):  # magic, version, token count
        bad = header.copy()
        bad[field] = value
        path.write_bytes(bad.tobytes() + blob[train_gpt.SHARD_HEADER_BYTES:])
        with pytest.raises(InputError):
            read_shard(path)
    path.write_bytes(blob[:100])
    with pytest.raises(InputError, match="truncated header"):
        read_shard(path)


@pytest.mark.parametrize("gptq", [False, True])
def test_artifact_loader(tmp_path, monkeypatch, gptq):
    if gptq:  # GPTQ's and LQER's fields too: experts stored as their transposes, corrections
        from test_gptq import CPU, RandomStream, calibration

        monkeypatch.setattr(train_gpt, "QUANT_MIN_NUMEL", 256)
        cfg, model = calibration({"MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2"})
        hessians = train_gpt.input_hessians(cfg, CPU, model, RandomStream(64), 0)
        blob, _ = train_gpt.build_artifact(model, "int5", rounding=train_gpt.Rounding(hessians, lqer_rank=2,
                                                                                      lqer_tensors=2))
        assert b'"transposed":true' in blob and b'"lqer_rank":2' in blob
    else:
        blob, _ = train_gpt.build_artifact(randomize(tiny_model()))
    outcomes = {"refused": 0, "loaded": 0}
    for damaged in mutations(blob, random.Random(2)):
        try:
            header, state = parse_artifact(damaged, "fuzz")
            train_gpt.model_from_artifact(header, state, "fuzz", "cpu")
            outcomes["loaded"] += 1
        except InputError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > CASES * 0.9


@pytest.fixture(scope="module")
def checkpoint_blob():
    import hashlib

    buf = io.BytesIO()
    torch.save({"format": 1, "config": {}, "step": 3, "train_ms": 1.0, "model": {"w": torch.randn(40, 40)},
                "optimizers": [], "average": {}, "depth": {}, "rng": {}}, buf)
    data = buf.getvalue()
    return CHECKPOINT_MAGIC + hashlib.sha256(data).digest() + data


def test_checkpoint_loader(tmp_path, checkpoint_blob):
    """The undamaged checkpoint loads; every damaged copy of it is refused with one clean error."""
    path = tmp_path / "fuzz.ckpt"
    path.write_bytes(checkpoint_blob)
    assert load_checkpoint(path)["step"] == 3
    for damaged in mutations(checkpoint_blob, random.Random(3)):
        if damaged == checkpoint_blob:
            continue
        path.write_bytes(damaged)
        with pytest.raises(InputError):
            load_checkpoint(path)


def test_checkpoint_with_a_valid_checksum_but_foreign_contents(tmp_path):
    import hashlib

    import argparse

    code = io.BytesIO()
    torch.save({"format": 1, "payload": argparse.Namespace(run="anything")}, code)  # needs pickle code to load
    for data in (b"not a torch file", b"PK\x03\x04" + bytes(200), code.getvalue()):
        (tmp_path / "x.ckpt").write_bytes(CHECKPOINT_MAGIC + hashlib.sha256(data).digest() + data)
        with pytest.raises(InputError, match="contents do not load"):
            load_checkpoint(tmp_path / "x.ckpt")


def rebuilt(blob: bytes, edit) -> bytes:
    """The artifact with its header edited (and its payload replaced, checksum recomputed, if `edit` returns one)."""
    import hashlib
    import json
    import struct

    start = len(train_gpt.ARTIFACT_MAGIC) + 4
    (length,) = struct.unpack("<I", blob[len(train_gpt.ARTIFACT_MAGIC):start])
    header, payload = json.loads(blob[start:start + length]), blob[start + length:]
    payload = edit(header, payload) or payload
    header.update(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    text = json.dumps(header).encode()
    return train_gpt.ARTIFACT_MAGIC + struct.pack("<I", len(text)) + text + payload


def bomb(codec: str):
    def edit(header, payload):
        zeros = b"\0" * (192 << 20)  # whatever the header claims; compressed fast (the loader does not care)
        data = {"zlib": lambda: zlib.compress(zeros, 1), "lzma": lambda: lzma.compress(zeros, preset=1),
                "zstd": lambda: zstandard.ZstdCompressor(level=1).compress(zeros)}[codec]()
        header["streams"] = [{**header["streams"][0], "codec": codec, "payload_bytes": len(data)}]
        for part in (p for entry in header["tensors"] for p in entry["parts"]):
            part["stream"] = 0
        header["streams"][0]["raw_bytes"] = sum(p["nbytes"] for e in header["tensors"] for p in e["parts"])
        return data
    return edit


@pytest.mark.parametrize("edit", [
    lambda h, p: h["streams"][0].update(raw_bytes=10 ** 12),
    lambda h, p: h["streams"][0].update(raw_bytes=0),
    lambda h, p: h["tensors"][0]["parts"][0].update(nbytes=-5),
    lambda h, p: h["tensors"][0]["parts"][0].update(stream=-1),
    lambda h, p: h["tensors"][0]["parts"][0].update(stream=99),
    lambda h, p: h.update(format=3),
    bomb("zlib"), bomb("lzma"), bomb("zstd")])
def test_a_crafted_header_is_refused_without_inflating_what_it_claims(edit):
    import tracemalloc

    crafted = rebuilt(train_gpt.build_artifact(randomize(tiny_model()))[0], edit)
    tracemalloc.start()
    try:
        with pytest.raises(InputError):
            parse_artifact(crafted, "crafted")
        assert tracemalloc.get_traced_memory()[1] < 128 << 20  # bytes at the peak: lzma-9's window, not the bomb
    finally:
        tracemalloc.stop()

"""Export: int8 rows, the artifact format, its checks, and atomic writes."""

import json
import math
import struct

import pytest
import torch

import train_gpt
from test_model import randomize, tiny_model
from train_gpt import (ARTIFACT_MAGIC, InputError, build_artifact, dequantize_rows, load_config, model_from_artifact,
                       parse_artifact, quantize_rows, write_atomic)


@pytest.mark.parametrize("bits", [8, 6, 5])
def test_integer_rows_error_is_within_half_a_step_where_not_clipped(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 300)
    q, scale = quantize_rows(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (64,)
    assert q.abs().max() <= qmax
    back = dequantize_rows(q, scale)
    inside = w.abs() <= (scale.float() * qmax)[:, None]
    assert torch.all((back - w).abs()[inside] <= (scale.float()[:, None] / 2).expand_as(w)[inside] + 1e-6)


@pytest.mark.parametrize("bits", [8, 6, 5])
def test_clip_search_never_does_worse_than_no_clip(bits):
    torch.manual_seed(1)
    # Heavy-tailed rows (Laplace), as trained weights have: clipping the tail pays at low bit widths.
    w = torch.distributions.Laplace(0.0, 1.0).sample((32, 512)) * torch.rand(32, 1)
    q, scale = quantize_rows(w, bits)
    err = (dequantize_rows(q, scale) - w).square().sum(1)
    qmax = 2 ** (bits - 1) - 1
    plain = w.abs().max(1).values / qmax
    unclipped = (torch.round(w / plain[:, None]) * plain[:, None] - w).square().sum(1)
    assert torch.all(err <= unclipped * 1.01)
    if bits == 5:
        assert err.sum() < 0.95 * unclipped.sum()


@pytest.mark.parametrize("bits", [8, 6, 5, 3])
def test_bit_packing_round_trips(bits):
    torch.manual_seed(2)
    qmax = 2 ** (bits - 1) - 1
    q = torch.randint(-qmax, qmax + 1, (1001,), dtype=torch.int8)
    packed = train_gpt.pack_bits(q, bits)
    assert packed.dtype == torch.uint8 and len(packed) == math.ceil(1001 / 8) * bits
    assert torch.equal(train_gpt.unpack_bits(packed, bits, 1001), q)


def test_near_zero_rows_survive_the_round_trip():
    w = torch.zeros(4, 100)
    w[1] = 1e-9
    w[2] = torch.linspace(-1e-4, 1e-4, 100)
    q, scale = quantize_rows(w, 8)
    back = dequantize_rows(q, scale)
    assert torch.isfinite(back).all()
    assert (back - w).abs().max() < 1e-6


def cfg_for(model_env=None):
    env = {"VOCAB_SIZE": "64", "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "TRAIN_BATCH_TOKENS": "1024", **(model_env or {})}
    return load_config(env)[0]


def read_artifact(path):
    return parse_artifact(path.read_bytes(), path)


def exported(tmp_path, monkeypatch=None):
    model = randomize(tiny_model())
    path = tmp_path / "m.ptz"
    blob, _ = build_artifact(model)
    write_atomic(path, blob)
    return model, path, len(blob), read_artifact(path)[0]["compressor"]


def test_artifact_round_trip_rebuilds_the_model(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "QUANT_MIN_NUMEL", 1024)  # make the tiny matrices take the integer path
    model, path, size, method = exported(tmp_path)
    assert path.stat().st_size == size and method == "zstd"
    header, state = read_artifact(path)
    assert {e["encoding"] for e in header["tensors"]} == {"int_rows", "fp16"}
    loaded = model_from_artifact(*read_artifact(path), path, "cpu")
    x = torch.randint(0, 64, (2, 16))
    ref = model(x, x)
    assert abs(loaded(x, x).item() - ref.item()) < 0.02 * ref.item()
    for name, t in model.state_dict().items():
        assert loaded.state_dict()[name].shape == t.shape


def test_zlib_fallback_is_named_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(train_gpt, "zstandard", None)
    _, path, _, method = exported(tmp_path)
    assert method == "zlib" and read_artifact(path)[0]["compressor"] == "zlib"
    model_from_artifact(*read_artifact(path), path, "cpu")


def test_corrupt_byte_fails_the_checksum(tmp_path):
    _, path, _, _ = exported(tmp_path)
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(InputError, match="checksum mismatch"):
        read_artifact(path)


@pytest.mark.parametrize("keep", [5, 40, -100])
def test_truncated_artifact_is_refused(tmp_path, keep):
    _, path, _, _ = exported(tmp_path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(InputError, match=str(path)):
        read_artifact(path)


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "x.ptz"
    path.write_bytes(b"PK\x03\x04 something else entirely")
    with pytest.raises(InputError, match="bad magic"):
        read_artifact(path)


def rewrite_header(path, edit):
    blob = path.read_bytes()
    (n,) = struct.unpack("<I", blob[8:12])
    header = json.loads(blob[12:12 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(ARTIFACT_MAGIC + struct.pack("<I", len(new)) + new + blob[12 + n:])


def test_artifact_whose_config_does_not_fit_its_tensors_is_refused(tmp_path):
    _, path, _, _ = exported(tmp_path)
    rewrite_header(path, lambda h: h["model"].update(model_dim=64, num_heads=4))
    with pytest.raises(InputError, match="does not fit this model"):
        model_from_artifact(*read_artifact(path), path, "cpu")


def test_layout_pointing_past_the_payload_is_refused(tmp_path):
    _, path, _, _ = exported(tmp_path)
    rewrite_header(path, lambda h: h["tensors"][0]["parts"][0].update(offset=10**9))
    with pytest.raises(InputError, match="shorter than its layout"):
        read_artifact(path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "missing_dir" / "a.ptz"
    with pytest.raises(InputError, match="cannot write"):
        write_atomic(target, b"data")
    write_atomic(tmp_path / "ok.bin", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.bin"]


SMALLEST = dict(VOCAB_SIZE="2", MODEL_DIM="2", NUM_HEADS="1", NUM_KV_HEADS="1", MLP_MULT="0.5", NUM_LAYERS="1")
KINDS = {"flat": {}, "recurrent": dict(NUM_REPEATS="2"), "moe": dict(MOE_NUM_EXPERTS="1", MOE_TOP_K="1"),
         "frozen_moe": dict(MOE_NUM_EXPERTS="1", MOE_TOP_K="1", MOE_FROZEN="1"), "untied": dict(TIE_EMBEDDINGS="0"),
         "value_embeds_xsa": dict(NUM_VALUE_EMBEDS="1", XSA_LAST_N="1")}


@pytest.mark.parametrize("scheme", sorted(train_gpt.QUANT_SCHEMES))
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_smallest_legal_model_of_every_kind_exports_and_reloads(kind, scheme):
    """One block, width 2, vocab 2: a flat stack of one block has no U-Net skips (a 0 x dim tensor),
    which the artifact must carry as it carries any other."""
    cfg, _ = load_config({**SMALLEST, **KINDS[kind]})
    model = train_gpt.GPT(cfg.model)
    header, tensors = train_gpt.parse_artifact(train_gpt.build_artifact(model, scheme)[0], "memory")
    reloaded = train_gpt.model_from_artifact(header, tensors, "memory", "cpu")
    idx = torch.zeros(1, 3, dtype=torch.long)
    torch.testing.assert_close(reloaded(idx, idx), model(idx, idx), atol=1e-2, rtol=0)


@pytest.mark.parametrize("length", [0, 1, 7, 64, 65])
def test_byte_shuffle_is_undone_exactly(length):
    data = bytes(range(256))[:length] * 3
    shuffled = train_gpt.byte_shuffle(data, 2)
    assert len(shuffled) == len(data) and train_gpt.byte_shuffle(shuffled, 2, inverse=True) == data
    if len(data) >= 4:
        assert shuffled[:2] == data[0:1] + data[2:3]  # the even bytes first


def every_trial(parts, family):
    codes = parts[0][1] is not None
    sizes = {}
    for layout in ((True, False) if codes else (0, 2)):
        raw = b"".join(train_gpt.part_bytes(p, bits, codes and layout) for p, bits in parts)
        raw = train_gpt.byte_shuffle(raw, layout) if not codes and layout else raw
        for codec in train_gpt.CODEC_FAMILIES[family]:
            sizes[(layout, codec)] = len(train_gpt.CODECS[codec][0](raw))
    return sizes


@pytest.mark.parametrize("family", ["zstd", "zlib"])
def test_a_small_stream_is_stored_in_its_smallest_layout_and_codec(family):
    torch.manual_seed(3)
    w = torch.distributions.Laplace(0.0, 1.0).sample((256, 512))
    codes = [(quantize_rows(w, 5)[0], 5)]  # Laplace codes: one a byte compresses better than bit-packed
    floats = [(torch.randn(4096).half() * 0.01, None)]
    for parts in (codes, floats):
        chosen = train_gpt.smallest_stream(parts, family)
        sizes = every_trial(parts, family)
        assert len(chosen["data"]) == min(sizes.values())
        layout = chosen["layout"].get("packed", chosen["layout"].get("shuffle"))
        assert sizes[(layout, chosen["codec"])] == len(chosen["data"])
    assert train_gpt.smallest_stream(codes, family)["layout"] == {"packed": False}


@pytest.mark.parametrize("codec", ["zstd", "lzma", "zlib"])
def test_every_layout_and_codec_decodes_exactly(codec):
    torch.manual_seed(4)
    q = quantize_rows(torch.randn(64, 96), 5)[0]
    floats = torch.randn(333).half()
    for packed, shuffle in ((True, 0), (False, 2)):
        codes_raw, floats_raw = train_gpt.part_bytes(q, 5, packed), train_gpt.part_bytes(floats, None, False)
        stored = [codes_raw, train_gpt.byte_shuffle(floats_raw, shuffle) if shuffle else floats_raw]
        data = [train_gpt.CODECS[codec][0](raw) for raw in stored]
        streams = [{"codec": codec, "raw_bytes": len(codes_raw), "payload_bytes": len(data[0]), "packed": packed},
                   {"codec": codec, "raw_bytes": len(floats_raw), "payload_bytes": len(data[1]), "shuffle": shuffle}]
        decoded = [(train_gpt.decode_stream(b"".join(data), streams, k, "m"), packed and k == 0) for k in range(2)]
        layout = [{"name": "q", "encoding": "raw", "parts": [{"dtype": "int8", "shape": list(q.shape), "stream": 0,
                                                              "offset": 0, "nbytes": len(codes_raw), "bits": 5}]},
                  {"name": "f", "encoding": "raw", "parts": [{"dtype": "float16", "shape": [333], "stream": 1,
                                                              "offset": 0, "nbytes": len(floats_raw)}]}]
        state = train_gpt.decode_tensors(decoded, layout, "m")
        assert torch.equal(state["q"], q) and torch.equal(state["f"], floats)


def test_sdclip_clips_each_row_at_k_standard_deviations():
    torch.manual_seed(5)
    w = torch.distributions.Laplace(0.0, 1.0).sample((16, 400)) * torch.rand(16, 1)
    for k in (2.0, 12.0):
        q, scale = quantize_rows(w, 5, sdclip_k=k)
        exact = k * w.std(1, correction=0) / 15
        assert torch.all(scale.float() >= exact) and torch.all(scale.float() <= exact * (1 + 2 ** -10))
        clip = k * w.std(1, correction=0)[:, None]
        assert torch.equal(q, torch.round(w.clamp(-clip, clip) / scale.float()[:, None]).clamp(-15, 15).to(torch.int8))
    assert not torch.equal(quantize_rows(w, 5, sdclip_k=2.0)[0], quantize_rows(w, 5)[0])

"""Full GPTQ: the rounding, the Hessians of the matrices' inputs, the artifact that carries both."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import train_gpt
from conftest import ROOT, encode_docs, make_docs, run_trainer
from data.prepare import write_shard
from test_export import KINDS, SMALLEST
from test_model import randomize
from train_gpt import Runtime, dequantize_rows, input_hessians, load_config, quantize_rows

CPU = Runtime(0, 1, 0, torch.device("cpu"), False)


def correlated_inputs(n: int, cols: int) -> torch.Tensor:
    """Inputs whose features are correlated and of unequal size, as a layer's are: where GPTQ pays."""
    torch.manual_seed(0)
    x = torch.randn(n, cols) @ (torch.randn(cols, cols) / cols ** 0.5 + 0.3 * torch.eye(cols))
    x[:, :4] *= 10
    return x


@pytest.mark.parametrize("bits", [8, 6, 5, 4])
def test_gptq_moves_the_outputs_far_less_than_rounding_at_the_same_scales(bits):
    x = correlated_inputs(2048, 192)
    w = torch.randn(96, 192) * 0.02
    q_round, scale_round = quantize_rows(w, bits)
    q, scale = quantize_rows(w, bits, gptq=train_gpt.gptq_factor(x.T @ x, 0.01))
    assert torch.equal(scale, scale_round) and q.dtype == torch.int8
    assert int(q.abs().max()) <= 2 ** (bits - 1) - 1

    def output_error(q):
        return float(((dequantize_rows(q, scale) - w) @ x.T).square().sum())

    assert output_error(q) < 0.5 * output_error(q_round)


def test_gptq_with_uncorrelated_inputs_of_one_size_is_plain_rounding():
    """H = I: no error has anywhere to go, so each weight goes to its nearest level, as without GPTQ."""
    torch.manual_seed(1)
    w = torch.distributions.Laplace(0.0, 1.0).sample((40, 300))
    for bits in (8, 5, 4):
        identity = train_gpt.gptq_factor(torch.eye(300), 0.01)
        assert torch.equal(quantize_rows(w, bits, gptq=identity)[0], quantize_rows(w, bits)[0])


class RandomStream:
    """Training micro-batches drawn from (step, micro): what input_hessians reads, and only that."""

    def __init__(self, vocab: int):
        self.vocab, self.calls = vocab, []

    def micro_batch(self, cfg, rt, step, micro):
        self.calls.append((step, micro))
        gen = torch.Generator().manual_seed(step * 100 + micro)
        x = torch.randint(0, self.vocab, (2, 16), generator=gen)
        return x, x


def calibration(env: dict, **model_env):
    cfg, _ = load_config({"VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4",
                          "NUM_KV_HEADS": "2", "TRAIN_BATCH_TOKENS": "64", "TRAIN_SEQ_LEN": "16",
                          "QUANT_GPTQ": "1", "QUANT_CALIB_BATCHES": "3", "GRAD_ACCUM_STEPS": "2", **env})
    torch.manual_seed(0)
    model = randomize(train_gpt.GPT(cfg.model))
    return cfg, model


def test_hessians_are_the_inputs_gram_matrices_of_the_calibration_batches_after_training():
    cfg, model = calibration({})
    stream = RandomStream(64)
    seen = {"fc": [], "head": []}
    hook = model.blocks[1].ffn.fc.register_forward_pre_hook(lambda m, args: seen["fc"].append(args[0].clone()))
    hessians = input_hessians(cfg, CPU, model, stream, first_step=7)
    hook.remove()
    assert stream.calls == [(7, 0), (7, 1), (8, 0)]  # the micro-batches after training's last step
    x = torch.cat([a.reshape(-1, a.size(-1)) for a in seen["fc"]])
    torch.testing.assert_close(hessians["blocks.1.ffn.fc.weight"], x.T @ x)
    h = torch.cat([model.hidden(stream.micro_batch(cfg, CPU, s, m)[0])[0].reshape(-1, 32) for s, m in stream.calls[:3]])
    torch.testing.assert_close(hessians["tok_emb.weight"], h.T @ h)  # the tied head's input
    assert hessians["blocks.0.attn.c_k.weight"] is hessians["blocks.0.attn.c_q.weight"]
    quantized = {name for name, t in model.state_dict().items() if train_gpt.tensor_group(name, t) != "scalars"}
    assert quantized <= set(hessians)
    for name in quantized:
        assert hessians[name].shape == (model.state_dict()[name].shape[-1],) * 2


def test_each_expert_gets_the_gram_matrix_of_the_tokens_routed_to_it():
    cfg, model = calibration({"MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2"})
    moe = model.blocks[1].ffn
    with torch.no_grad():  # biases that matter: the routing's and the experts'
        for m in train_gpt.moe_modules(model):
            m.route_bias.normal_(std=1.0), m.b1.normal_(std=1.0), m.w1.normal_(std=0.3)
    inputs = []
    hook = moe.register_forward_pre_hook(lambda m, args: inputs.append(args[0].reshape(-1, 32).clone()))
    loads = [m.load.clone() for m in train_gpt.moe_modules(model)]
    hessians = input_hessians(cfg, CPU, model, RandomStream(64), first_step=0)
    hook.remove()
    x = torch.cat(inputs)
    chosen = (x @ moe.router.weight.T + moe.route_bias).topk(2, dim=-1).indices
    for e in range(4):
        routed = x[(chosen == e).any(-1)]
        hidden = moe.activation(routed @ moe.w1[e] + moe.b1[e])
        torch.testing.assert_close(hessians[f"blocks.1.ffn.w1:{e}"], routed.T @ routed)
        torch.testing.assert_close(hessians[f"blocks.1.ffn.w2:{e}"], hidden.T @ hidden)
    for layer in range(2):
        name = f"blocks.{layer}.ffn"
        routed = sum(hessians[f"{name}.w1:{e}"] for e in range(4))  # every token reaches top_k = 2 experts
        torch.testing.assert_close(routed, 2 * hessians[f"{name}.router.weight"])
        assert hessians[f"{name}.w2:0"].shape == (cfg.model.moe_expert_width,) * 2
    for module, load in zip(train_gpt.moe_modules(model), loads):
        assert torch.equal(module.load, load)  # calibration is not counted as evaluation's routing


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_gptq_artifact_reloads_exactly_its_dequantized_weights(kind, monkeypatch):
    monkeypatch.setattr(train_gpt, "QUANT_MIN_NUMEL", 16)
    cfg, _ = load_config({**SMALLEST, **KINDS[kind], "MODEL_DIM": "8", "NUM_HEADS": "2", "VOCAB_SIZE": "16",
                          "TRAIN_BATCH_TOKENS": "32", "TRAIN_SEQ_LEN": "16", "GRAD_ACCUM_STEPS": "1"})
    torch.manual_seed(0)
    model = randomize(train_gpt.GPT(cfg.model))
    hessians = input_hessians(cfg, CPU, model, RandomStream(16), first_step=0)
    blob, _ = train_gpt.build_artifact(model, "int4", rounding=train_gpt.Rounding(hessians))
    header, tensors = train_gpt.parse_artifact(blob, "memory")
    reloaded = train_gpt.model_from_artifact(header, tensors, "memory", "cpu").state_dict()
    gptq_rounded = 0
    for entry in header["tensors"]:
        if entry["encoding"] != "int_rows":
            continue
        name, t = entry["name"], model.state_dict()[entry["name"]]
        encoding, q, scale = train_gpt.quantize_tensor(name, t, entry["bits"], train_gpt.Rounding(hessians))
        expected = dequantize_rows(q, scale)
        if encoding.get("transposed"):  # an expert stack, rounded as its transposes
            expected = expected.view(t.size(0), t.size(2), t.size(1)).transpose(1, 2)
        assert torch.equal(reloaded[name], expected.reshape(t.shape)), name
        plain = dequantize_rows(*quantize_rows(t.reshape(-1, t.size(-1)), entry["bits"])).reshape(t.shape)
        gptq_rounded += not torch.equal(reloaded[name], plain)
    assert gptq_rounded > 0
    if kind == "moe":
        assert any(e.get("transposed") for e in header["tensors"])
    if kind == "frozen_moe":
        assert not any(".w1" in e["name"] for e in header["tensors"])  # frozen experts: still 0 bytes


def test_the_reserve_comes_out_of_the_training_budget_and_must_leave_some():
    assert load_config({"MAX_WALLCLOCK_SECONDS": "100"})[0].train_budget_ms == 100_000
    gptq = load_config({"MAX_WALLCLOCK_SECONDS": "100", "QUANT_GPTQ": "1", "WARMDOWN_ITERS": "10"})[0]
    assert gptq.train_budget_ms == 80_000
    assert load_config({"MAX_WALLCLOCK_SECONDS": "100", "QUANT": "auto"})[0].train_budget_ms == 80_000
    # The loop's clock reads the reserve: at 80 s of 100 the budget is spent and the learning rate is down to 0.
    assert train_gpt.budget_progress(gptq, 10, 80_000) == 1.0 and train_gpt.lr_scale(gptq, 100, 80_000) == 0.0
    assert train_gpt.budget_progress(gptq, 10, 40_000) == 0.5 and train_gpt.lr_scale(gptq, 100, 40_000) > 0.0
    assert load_config({"MAX_WALLCLOCK_SECONDS": "0", "QUANT_GPTQ": "1"})[0].train_budget_ms == 0
    with pytest.raises(train_gpt.ConfigError, match="GPTQ_RESERVE_SECONDS=100: must be less than"):
        load_config({"MAX_WALLCLOCK_SECONDS": "100", "QUANT_GPTQ": "1", "GPTQ_RESERVE_SECONDS": "100"})


def test_training_and_calibration_over_the_budget_is_a_warning(tmp_path):
    cfg, _ = load_config({"MAX_WALLCLOCK_SECONDS": "100", "QUANT_GPTQ": "1", "GPTQ_RESERVE_SECONDS": "5"})
    for run, (train_s, seconds, warned) in enumerate(((95.0, 4.5, False), (95.0, 5.5, True), (96.0, 4.5, True))):
        summary = {"train_time_ms": 1000 * train_s}
        train_gpt.calibration_report(cfg, seconds, summary, train_gpt.Logger(tmp_path / f"{run}.txt"))
        lines = (tmp_path / f"{run}.txt").read_text().splitlines()
        assert any(line.startswith("WARNING calibration_over_budget") for line in lines) == warned
        assert summary["calibration"]["within_budget"] == (not warned)
        event, = (json.loads(line) for line in (tmp_path / f"{run}.jsonl").read_text().splitlines())
        assert (event["event"], event["seconds"], event["within_budget"]) == ("calibration", seconds, not warned)


@pytest.mark.parametrize("env, needs", [({"QUANT_GPTQ_DAMP": "0.1"}, "QUANT_GPTQ=1"),
                                        ({"QUANT_CALIB_BATCHES": "4"}, "QUANT_GPTQ=1 or QUANT=auto"),
                                        ({"GPTQ_RESERVE_SECONDS": "5"}, "QUANT_GPTQ=1 or QUANT=auto"),
                                        ({"QUANT_LQER_TENSORS": "5"}, "QUANT_LQER_RANK")])
def test_a_quantization_setting_without_its_feature_is_refused(env, needs):
    with pytest.raises(train_gpt.ConfigError, match=f"does nothing without {needs}"):
        load_config(env)
    load_config({**env, "QUANT_GPTQ": "1", "QUANT_LQER_RANK": "2"})


def test_the_artifact_is_a_function_of_the_training_data_alone(tiny_env, data_dir, tokenizer, tmp_path):
    """GPTQ's calibration and QUANT=auto's choice read training tokens only: runs whose validation texts differ
    compute the same calibration losses and write the same bytes."""
    other = tmp_path / "other_validation"
    shutil.copytree(data_dir, other)
    write_shard(other / "tiny_val_000000.bin", encode_docs(tokenizer, make_docs(60, seed=9)))
    env = {**tiny_env, "MODEL_DIM": "128", "MOE_NUM_EXPERTS": "2", "MOE_TOP_K": "1", "MOE_LAYERS": "1",
           "QUANT_GPTQ": "1", "QUANT": "auto", "QUANT_CALIB_BATCHES": "4", "ITERATIONS": "3", "QUANT_LQER_RANK": "2"}
    blobs, choices = [], []
    for run_id, data in (("a", data_dir), ("b", other)):
        out = run_trainer({**env, "DATA_PATH": str(data), "RUN_ID": run_id}, ROOT)
        assert out.returncode == 0, out.stderr
        assert re.search(r"^calibration: tokens:1024 time:\S+s reserve:0s training_and_calibration:\S+s "
                         r"within_budget:true$", out.stdout, re.M)
        choices.append(re.findall(r"^quant:\w+\+zstd bytes_total:\d+ fits:true calibration_loss:\S+$", out.stdout, re.M))
        blobs.append((Path(env["LOG_DIR"]) / f"{run_id}.ptz").read_bytes())
    assert len(choices[0]) == len(train_gpt.AUTO_ORDER) and choices[0] == choices[1]
    header = train_gpt.parse_artifact(blobs[0], "a")[0]
    assert any(e.get("transposed") for e in header["tensors"])  # the trained experts went through GPTQ too
    assert sum(e.get("lqer_rank") == 2 for e in header["tensors"]) == 3
    assert blobs[0] == blobs[1]


def test_auto_keeps_the_lowest_calibration_loss_of_what_fits_and_scores_only_it(tiny_env):
    sizes = {}
    for limit in ("16000000", None):
        if limit is None:  # a limit that int8 and int6 miss
            limit = str((sizes["int6"] + sizes["mixed"]) // 2)
        env = {**tiny_env, "MODEL_DIM": "128", "QUANT": "auto", "ITERATIONS": "3", "ARTIFACT_LIMIT_BYTES": limit}
        out = run_trainer(env, ROOT)
        assert out.returncode == 0, out.stderr
        summary = json.loads((Path(env["LOG_DIR"]) / "t.json").read_text())
        tried = summary["quant"]["tried"]
        sizes = {row["scheme"]: row["bytes_total"] for row in tried}
        assert [row["scheme"] for row in tried] == list(train_gpt.AUTO_ORDER)
        fitting = [row for row in tried if row["fits"]]
        best = min(fitting, key=lambda row: row["calibration_loss"])
        assert summary["quant"]["scheme"] == best["scheme"] and summary["bytes_total"] == best["bytes_total"]
        assert [row["roundtrip_val_bpb"] is not None for row in tried] == [row is best for row in tried]
        assert f"quant:auto chose {best['scheme']} (of those that fit" in out.stdout
    assert {row["scheme"] for row in fitting} == {"mixed", "int5", "int4"}


def test_lqer_corrects_the_matrices_rounded_worst_and_reloads_exactly(monkeypatch):
    monkeypatch.setattr(train_gpt, "QUANT_MIN_NUMEL", 256)
    cfg, model = calibration({})
    hessians = input_hessians(cfg, CPU, model, RandomStream(64), first_step=0)
    state = model.state_dict()
    plain = train_gpt.Rounding(hessians)
    corrected = train_gpt.Rounding(hessians, lqer_rank=4, lqer_tensors=2)
    header, tensors = train_gpt.parse_artifact(train_gpt.build_artifact(model, "int4", rounding=corrected)[0], "m")
    reloaded = train_gpt.model_from_artifact(header, tensors, "m", "cpu").state_dict()
    quantized = {e["name"]: train_gpt.quantize_tensor(e["name"], state[e["name"]], e["bits"], plain)
                 for e in header["tensors"] if e["encoding"] == "int_rows"}

    def weighted_error(name, w):
        h = hessians[name].diagonal()
        return float(((state[name] - w).square() * h / h.mean()).sum())

    rounded = {name: dequantize_rows(q, scale) for name, (_, q, scale) in quantized.items()}
    worst = sorted(rounded, key=lambda n: weighted_error(n, rounded[n]), reverse=True)[:2]
    assert sorted(e["name"] for e in header["tensors"] if e.get("lqer_rank") == 4) == sorted(worst)
    factors = train_gpt.low_rank_corrections(state, quantized, corrected)
    assert sorted(factors) == sorted(worst)
    for name, (a_t, a_scale, b, b_scale) in factors.items():
        expected = rounded[name] + dequantize_rows(a_t, a_scale).T @ dequantize_rows(b, b_scale)
        assert torch.equal(reloaded[name], expected)  # the round trip is exact with a correction too
        assert weighted_error(name, reloaded[name]) < 0.9 * weighted_error(name, rounded[name])
        assert int(a_t.abs().max()) <= 7 and int(b.abs().max()) <= 7
    for name in set(rounded) - set(worst):
        assert torch.equal(reloaded[name], rounded[name])


def test_lqer_ranks_matrices_by_the_error_their_inputs_see():
    """An error in columns whose inputs are silent costs nothing: the smaller error on busy inputs is corrected."""
    w = torch.zeros(8, 16)
    quiet, busy = w.clone(), w.clone()
    quiet[:, :8], busy[:, 8:] = 0.5, 0.1  # rounded to zero: `quiet` moved 25x more, on silent inputs
    h = torch.diag(torch.cat([torch.full((8,), 1e-3), torch.ones(8)]))
    zero = (torch.zeros(8, 16, dtype=torch.int8), torch.ones(8, dtype=torch.float16))
    quantized = {"quiet": ({"encoding": "int_rows"}, *zero), "busy": ({"encoding": "int_rows"}, *zero)}
    rounding = train_gpt.Rounding({"quiet": h, "busy": h}, lqer_rank=1, lqer_tensors=1)
    assert list(train_gpt.low_rank_corrections({"quiet": quiet, "busy": busy}, quantized, rounding)) == ["busy"]
    without = train_gpt.Rounding({}, lqer_rank=1, lqer_tensors=1)
    assert list(train_gpt.low_rank_corrections({"quiet": quiet, "busy": busy}, quantized, without)) == ["quiet"]


def test_hessians_are_summed_in_float32_under_bf16_autocast():
    """On a GPU the forward runs under bf16 autocast: the Gram matrices (and the experts' routing) must not."""
    cfg, model = calibration({"MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2"})
    bf16 = Runtime(0, 1, 0, torch.device("cpu"), False, bf16=True)
    hessians = input_hessians(cfg, bf16, model, RandomStream(64), first_step=0)
    assert {h.dtype for h in hessians.values()} == {torch.float32}

"""Mixture of experts: dispatch against a naive reference, granularity, frozen experts, balancing,
load statistics, parameter accounting of the SoME presets, and DOC_MODE's padding."""

import dataclasses
import math

import numpy as np
import pytest
import torch

import train_gpt
from train_gpt import (GPT, ConfigError, DocStream, Evaluator, MoE, Runtime, build_artifact, load_config,
                       load_statistics, model_from_artifact, moe_modules, padded_expert_matmul,
                       parameter_counts, parse_artifact)

CPU = Runtime(0, 1, 0, torch.device("cpu"), False)


def moe(frozen=False, init="normal", dim=32, experts=8, top_k=2, d_ffn=16, seed=0, layer=0) -> MoE:
    torch.manual_seed(seed)
    spec = dataclasses.replace(load_config({"RUN_ID": "x"})[0].model, model_dim=dim, moe_experts=experts,
                               moe_top_k=top_k, moe_expert_width=d_ffn, moe_init=init, moe_frozen=frozen)
    return MoE(spec, layer)  # the defaults' relu2, sparsity 0.9 and seed 1337


def naive(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: what the grouped dispatch must equal."""
    logits = x @ layer.router.weight.T
    choice = (logits + layer.route_bias).topk(layer.top_k, dim=-1).indices
    gates = torch.softmax(logits.gather(-1, choice), dim=-1)
    out = torch.zeros_like(x)
    for t in range(len(x)):
        for slot in range(layer.top_k):
            e = choice[t, slot]
            h = layer.activation(x[t] @ layer.w1[e] + layer.b1[e])
            out[t] = out[t] + gates[t, slot] * (h @ layer.w2[e] + layer.b2[e])
    return out


@pytest.mark.parametrize("dim,d_ffn", [(32, 16), (30, 18)])  # 30/18: not 16-byte aligned, the padded path
def test_dispatch_equals_the_naive_reference_values_and_gradients(dim, d_ffn):
    layer = moe(dim=dim, d_ffn=d_ffn)
    x = torch.randn(40, dim, requires_grad=True)
    out, _ = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    ref = naive(layer, x2)
    assert torch.allclose(out, ref, atol=1e-5)
    grad = torch.randn_like(out)
    params = [x, layer.router.weight, layer.w1, layer.b1, layer.w2, layer.b2]
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, [x2] + params[1:], grad)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


def test_padded_matmul_equals_grouped_matmul():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 1])
    rows = torch.randn(int(counts.sum()), 8)
    weight = torch.randn(4, 8, 12)
    experts = torch.repeat_interleave(torch.arange(4), counts)
    offsets = counts.cumsum(0).to(torch.int32)
    want = torch.cat([rows[experts == e] @ weight[e] for e in range(4)])
    assert torch.allclose(padded_expert_matmul(rows, weight, offsets, experts), want, atol=1e-6)
    if train_gpt.GROUPED_MM is not None:
        assert torch.allclose(train_gpt.GROUPED_MM(rows, weight, offs=offsets), want, atol=1e-6)


def test_gates_are_the_renormalised_softmax_of_the_chosen_experts():
    layer = moe()
    x = torch.randn(5, 32)
    logits = x @ layer.router.weight.T
    top = logits.topk(2, dim=-1)
    gates = torch.softmax(logits, -1).gather(-1, top.indices)
    assert torch.allclose(torch.softmax(top.values, -1), gates / gates.sum(-1, keepdim=True), atol=1e-6)


def config(**env):
    base = {"VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
            "TRAIN_BATCH_TOKENS": "1024", "MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2", "MOE_D_FFN": "32"}
    return load_config({**base, **{k: str(v) for k, v in env.items()}})[0]


def test_granularity_keeps_total_and_active_parameters():
    """G times the experts, 1/G as wide, G times the top-k: the expert matrices, total and active,
    are unchanged; only the router (one row per expert) and the output biases grow with G."""
    def measure(g):
        model = GPT(config(MOE_GRANULARITY=g).model)
        layers = moe_modules(model)
        matrices = sum(m.w1.numel() + m.w2.numel() for m in layers)
        active = sum(m.top_k * (m.w1[0].numel() + m.w2[0].numel()) for m in layers)
        growth = sum(m.router.weight.numel() + m.b2.numel() for m in layers)
        return matrices, active, parameter_counts(model)["params_total"] - growth, layers[0]

    results = [measure(g) for g in (1, 2, 4)]
    assert len({r[:3] for r in results}) == 1
    layer = results[-1][3]
    assert (layer.num_experts, layer.top_k, layer.w1.shape[-1]) == (16, 8, 8)


def test_frozen_experts_get_no_gradient_are_not_stored_and_round_trip_bit_exactly():
    cfg = config(MOE_FROZEN=1, MOE_INIT="sparse")
    model = GPT(cfg.model)
    layer = moe_modules(model)[0]
    before = layer.w1.clone()
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    assert all(not t.requires_grad and t.grad is None for t in (layer.w1, layer.b1, layer.w2, layer.b2))
    assert layer.router.weight.grad is not None
    assert not any(k.endswith((".w1", ".b1", ".w2", ".b2")) for k in model.state_dict())
    header, state = parse_artifact(build_artifact(model)[0], "mem")
    rebuilt = model_from_artifact(header, state, "mem", torch.device("cpu"))
    for a, b in zip(moe_modules(model), moe_modules(rebuilt)):
        for name in ("w1", "b1", "w2", "b2"):
            assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(before, layer.w1)
    stored = parameter_counts(model)
    assert stored["params_stored"] < stored["params_total"] and stored["params_trainable_pct"] < 100


def test_learned_experts_are_stored_and_trained():
    cfg = config()
    model = GPT(cfg.model)
    assert any(k.endswith(".w1") for k in model.state_dict())
    x = torch.randint(0, 64, (2, 16))
    model(x, x).backward()
    assert moe_modules(model)[0].w1.grad is not None


@pytest.mark.parametrize("init", ["sparse", "normal", "orthogonal"])
def test_an_expert_outputs_about_unit_variance_at_init(init):
    layer = moe(frozen=True, init=init, dim=64, experts=2, top_k=1, d_ffn=256)
    if init == "sparse":
        assert math.isclose((layer.w1 == 0).float().mean().item(), 0.9, abs_tol=0.01)
    x = torch.randn(4000, 64)
    h = layer.activation(x @ layer.w1[0] + layer.b1[0])
    y = h @ layer.w2[0]
    assert 0.5 < y.var().item() < 2.0


def test_experts_regenerate_identically_on_any_build():
    a, b = moe(frozen=True, init="sparse", seed=1), moe(frozen=True, init="sparse", seed=2)  # torch seed differs
    assert torch.equal(a.w1, b.w1) and torch.equal(a.b2, b.b2)
    other = moe(frozen=True, init="sparse", seed=1, layer=1)
    assert not torch.equal(a.w1, other.w1)


def test_load_statistics():
    n = 16
    uniform = load_statistics(torch.full((n,), 5.0))
    assert abs(uniform["gini"]) < 1e-12 and math.isclose(uniform["entropy"], math.log2(n))
    assert math.isclose(uniform["effective_experts"], n) and uniform["dead"] == 0
    one = load_statistics(torch.nn.functional.one_hot(torch.tensor(3), n).double() * 7)
    assert math.isclose(one["gini"], (n - 1) / n) and one["entropy"] == 0 and one["dead"] == n - 1
    half = load_statistics(torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert math.isclose(half["gini"], 0.5) and math.isclose(half["entropy"], 1.0)


def test_switch_loss_is_one_when_balanced_and_bias_update_moves_against_the_load():
    layer = moe(experts=4, top_k=1)
    logits = torch.zeros(8, 4)
    switch, z = layer.balancing_loss(logits, torch.tensor([2, 2, 2, 2]))
    assert math.isclose(switch.item(), 1.0) and math.isclose(z.item(), math.log(4) ** 2, rel_tol=1e-6)
    layer.nudge_route_bias(0.01, torch.tensor([10.0, 0.0, 5.0, 5.0], dtype=torch.float64))
    assert layer.route_bias.tolist() == pytest.approx([-0.01, 0.01, 0.0, 0.0])


def test_balancing_losses_enter_the_training_loss_only_with_their_coefficients():
    model = GPT(config().model)
    weighted = GPT(config(MOE_AUX_COEF="0.5").model)
    weighted.load_state_dict(model.state_dict())
    x = torch.randint(0, 64, (2, 16))
    assert weighted(x, x) > model(x, x) + 0.4  # 0.5 x (a Switch loss of at least 1), summed over 2 layers
    assert torch.equal(weighted(x, x, reduction="none"), model(x, x, reduction="none"))  # evaluation never sees them
    assert GPT(config(MOE_NUM_EXPERTS="0").model).hidden(x)[1] is None  # a dense model has none


@pytest.mark.parametrize("preset,frozen,total", [("some_study_a1", 302_530_560, 313.27e6), ("some_study_b1", 1_209_925_632, 1222.15e6),
                                                 ("some_study_c2", 2_418_278_400, 2454.52e6)])
def test_some_presets_match_the_study_counts_on_the_meta_device(preset, frozen, total):
    cfg, _ = load_config({"PRESET": preset})
    with torch.device("meta"):
        model = GPT(cfg.model)
    counts = parameter_counts(model)
    assert counts["params_total"] - counts["params_trainable"] == frozen
    assert abs(counts["params_total"] - total) / total < 0.01


@pytest.mark.parametrize("env,name", [({"MOE_TOP_K": "5"}, "MOE_TOP_K"), ({"MOE_GRANULARITY": "3"}, "MOE_GRANULARITY"),
                                      ({"MOE_LAYERS": "0,7"}, "MOE_LAYERS"), ({"MOE_LAYERS": "odd"}, "MOE_LAYERS"),
                                      ({"EPOCHS": "2"}, "EPOCHS"), ({"DOC_MODE": "1", "EVAL_STRIDE": "8"}, "EVAL_STRIDE"),
                                      ({"DOC_MODE": "1", "EPOCHS": "2", "ITERATIONS": "5"}, "ITERATIONS")])
def test_bad_moe_and_doc_settings_are_refused(env, name):
    with pytest.raises(ConfigError, match=name):
        config(**env)


def test_moe_layers_every2_and_lists():
    assert train_gpt.parse_moe_layers("every2", 6) == (1, 3, 5)
    assert train_gpt.parse_moe_layers("0,2", 6) == (0, 2)
    model = GPT(config(MOE_LAYERS="1").model)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["MLP", "MoE"]


def doc_tokens() -> np.ndarray:
    """BOS=1 documents of 3, 9 and 5 targets (each predicts the next BOS)."""
    docs = [[1, 5, 6], [1] + list(range(10, 18)) + [7], [1, 20, 21, 22, 23]]
    return np.array(sum(docs, []) + [1], dtype=np.uint16)


def test_doc_mode_batches_pad_with_unscored_targets(tmp_path):
    from data.prepare import write_shard

    write_shard(tmp_path / "d_train_000000.bin", doc_tokens())
    cfg = config(DOC_MODE=1, TRAIN_SEQ_LEN=6, TRAIN_BATCH_TOKENS=18, GRAD_ACCUM_STEPS=1, VOCAB_SIZE=64)
    stream = DocStream([tmp_path / "d_train_000000.bin"], cfg, bos_id=1)
    assert stream.docs == [(0, 3), (3, 13), (13, 18)] and stream.steps_per_epoch == 1
    x, y = stream.micro_batch(cfg, CPU, 0, 0)
    lengths = sorted(int((row != -100).sum()) for row in y)
    assert lengths == [3, 5, 6]  # the 9-target document is truncated to 6
    for row_x, row_y in zip(x, y):
        n = int((row_y != -100).sum())
        assert row_x[0] == 1 and (row_y[n - 1] == 1 or n == 6)  # starts at BOS, ends predicting the next
    model = GPT(cfg.model)
    per_token = model(x, y, reduction="none")
    assert (per_token[y == -100] == 0).all()
    assert torch.isclose(model(x, y), per_token[y != -100].mean())


def test_doc_mode_evaluation_scores_each_document_once_without_padding():
    cfg = config(DOC_MODE=1, TRAIN_SEQ_LEN=6, VOCAB_SIZE=64)
    tables = train_gpt.ByteTables(torch.ones(64, dtype=torch.int32), torch.zeros(64, dtype=torch.bool),
                                  torch.zeros(64, dtype=torch.bool))
    ev = Evaluator(cfg, CPU, torch.from_numpy(doc_tokens().astype(np.int64)), tables, bos_id=1)
    assert ev.standard_windows() == [(0, 0, 3), (3, 0, 6), (13, 0, 5)]
    scores = train_gpt.score_first(ev, ev.distributions(GPT(cfg.model), ev.standard_windows(), 6))
    assert scores.pos.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 13, 14, 15, 16, 17]
    assert ev.val_bytes() == 14
    assert ev.scored_fraction() == 14 / 18  # positions 9-12, past the second document's first 6 targets, are not

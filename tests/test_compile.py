"""torch.compile of the training model: one graph per depth phase and no graph breaks.

Traced with the aot_eager backend (forward and backward through AOTAutograd, no C++ compiler), so
the graph counts are those the inductor backend sees, in seconds instead of minutes."""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from train_gpt import GPT, load_config

TINY = dict(VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1", TRAIN_SEQ_LEN="16")
MOE = dict(MOE_NUM_EXPERTS="4", MOE_TOP_K="2")


def compiled_steps(env: dict, depths: list[int], bf16: bool) -> tuple[int, int, list[torch.Tensor]]:
    """Two forward + backward passes at each depth in turn: (graphs compiled, graph breaks, losses)."""
    torch._dynamo.reset()
    counters.clear()
    cfg, _ = load_config({**TINY, **env})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    compiled = torch.compile(model, backend="aot_eager")
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    losses = []
    for depth in depths:
        model.set_repeats(depth)
        for _ in range(2):
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                loss = compiled(idx, targets)
            loss.backward()
            losses.append(loss.detach())
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values()), losses


@pytest.mark.parametrize("env,bf16", [({}, False), ({}, True), (dict(XSA_LAST_N="1", NUM_VALUE_EMBEDS="1"), False),
                                      (MOE, True), ({**MOE, "MOE_FROZEN": "1", "MOE_INIT": "sparse"}, True)],
                         ids=["dense", "dense-bf16", "xsa-value-embeds", "moe-bf16", "frozen-moe-bf16"])
def test_the_model_compiles_to_one_graph_without_breaks(env, bf16):
    graphs, breaks, _ = compiled_steps(env, [1], bf16)
    assert (graphs, breaks) == (1, 0)


def test_each_depth_phase_costs_exactly_one_recompile():
    graphs, breaks, _ = compiled_steps(dict(NUM_REPEATS="3"), [1, 2, 3], bf16=True)
    assert (graphs, breaks) == (3, 0)


def test_float32_moe_compiles_and_matches_eager():
    """Compiled, torch's grouped matmul refuses float32, so the padded matmul runs (with a graph
    break for its data-dependent capacity); the loss must still equal the eager one."""
    _, _, compiled_losses = compiled_steps(MOE, [1], bf16=False)
    cfg, _ = load_config({**TINY, **MOE})
    torch.manual_seed(0)
    model = GPT(cfg.model)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    targets = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    torch.testing.assert_close(compiled_losses[0], model(idx, targets).detach())


def test_the_evaluations_distributions_go_through_the_compiled_forward():
    """Every evaluation scores the log-distributions the model gives without targets, of each row's last
    positions: one compiled graph (no breaks) with the head inside, equal to the eager model's."""
    torch._dynamo.reset()
    counters.clear()
    cfg, _ = load_config(TINY)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    compiled = torch.compile(model, backend="aot_eager")
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.train_seq_len))
    with torch.no_grad():
        logp = compiled(idx, last=5)
    assert (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())) == (1, 0)
    torch.testing.assert_close(logp, torch.log_softmax(model.head(model.hidden(idx)[0])[:, -5:], -1))


def test_a_recurrent_run_with_every_evaluation_compiles_the_graphs_it_plans(tiny_env, monkeypatch):
    """The recurrent preset at CPU scale through training (3 depth phases), SWA, export, the round
    trip and sliding + Hedge + TTT with their audits: every graph is counted in the log and the
    summary, none falls back to eager, none breaks. GPT.forward's 10 graphs: training at depths 2, 3
    and 4 (16 rows) and TTT's training mode (8 rows); the log-distributions evaluation scores (no
    evaluation passes targets) of all 64 positions of 64 rows (standard scoring of the trained,
    averaged and reloaded models, the first batch of sliding and Hedge, the audit's window copies),
    of 16 rows (the audit's standard prefix) and of 32 (the first batch of the sliding and Hedge
    audits); of a stride's 32 positions of 64 rows (sliding and Hedge), 16 (TTT chunks, the audits'
    later batches) and 8 (TTT's last, shorter chunk). Newton-Schulz: one graph
    per matrix shape (5, resid_mix's 2 x 32 included)."""
    import train_gpt
    from pathlib import Path

    torch._dynamo.reset()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", **kw))
    env = {**tiny_env, "PRESET": "recurrent", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "MATRIX_LR": "0.02", "EVAL_STRIDE": "32", "HEDGE_ENABLED": "1", "TTT_STEPS": "1",
           "TTT_CHUNK_TOKENS": "512", "EVAL_AUDIT": "1", "EVAL_AUDIT_TOKENS": "600", "GRAD_ACCUM_STEPS": "1"}
    cfg, notes = train_gpt.load_config(env)
    rt = train_gpt.Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), compile=True)
    log = train_gpt.Logger(Path(cfg.log_dir) / "t.txt")
    summary = train_gpt.run(cfg, rt, log, notes)
    assert [p["repeats"] for p in summary["depth_phases"]] == [2, 3, 4]
    assert summary["audit"]["passed"]
    report = summary["compile"]
    assert report["per_function"] == {"GPT.forward": 10, "newton_schulz": 5}, report
    assert (report["graphs"], report["recompiles"], report["graph_breaks"], report["eager_fallback"]) == (15, 13, 0, [])
    assert "compile: 15 graphs, 13 recompiles, 0 graph breaks" in (Path(cfg.log_dir) / "t.txt").read_text()

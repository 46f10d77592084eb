"""Optimizers and schedules: Newton-Schulz, Muon's update, LR and momentum schedules."""

import pytest
import torch

from train_gpt import (GPT, Muon, Runtime, build_optimizers, init_runtime, load_config, lr_scale, muon_momentum_at,
                       newton_schulz)


@pytest.mark.parametrize("shape", [(32, 32), (16, 48), (48, 16)])
def test_newton_schulz_pushes_singular_values_toward_one(shape):
    torch.manual_seed(0)
    rank = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], rank))
    v, _ = torch.linalg.qr(torch.randn(shape[1], rank))
    g = 30 * u @ torch.diag(torch.logspace(-1.3, 0, rank)) @ v.T  # singular values spread over 20x
    out = newton_schulz(g, steps=5)
    s = torch.linalg.svdvals(out)
    assert out.shape == g.shape and s.min() > 0.5 and s.max() < 1.3
    assert torch.allclose(out @ v, u * (out @ v).norm(dim=0), atol=1e-4)  # same singular vectors


def test_newton_schulz_in_bf16_stays_near_float32():
    torch.manual_seed(0)
    g = torch.randn(48, 16)
    out = newton_schulz(g, steps=5, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert (out.float() - newton_schulz(g, steps=5)).abs().max() < 0.05


def test_autocast_setting_runs_the_cpu_model_and_muon_in_bf16():
    cfg = config(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, train_batch_tokens=1024,
                 device="cpu", autocast=1)
    rt = init_runtime(cfg)
    assert rt.bf16 and not init_runtime(config(device="cpu")).bf16
    model = GPT(cfg.model)
    seen = []
    model.blocks[0].ffn.fc.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    with rt.autocast():
        model.hidden(torch.zeros(1, 8, dtype=torch.long))
    assert seen == [torch.bfloat16]
    assert build_optimizers(model, cfg, rt)[-1].ns_dtype == torch.bfloat16


def test_muon_applies_orthogonal_update_with_decay():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 8))
    before = p.detach().clone()
    p.grad = torch.randn(8, 8)
    opt = Muon([p], lr=0.1, momentum=0.0, backend_steps=5, weight_decay=0.5)
    expected = before * (1 - 0.1 * 0.5) - 0.1 * newton_schulz(p.grad, 5)
    opt.step()
    assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_muon_nesterov_momentum_accumulates():
    p = torch.nn.Parameter(torch.zeros(4, 4))
    opt = Muon([p], lr=1.0, momentum=0.9, backend_steps=5, weight_decay=0.0)
    g = torch.eye(4)
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    assert torch.allclose(opt.state[p]["momentum_buffer"], 1.9 * g)


def test_muon_batches_same_shape_matrices_and_matches_one_at_a_time():
    torch.manual_seed(0)
    shapes = [(8, 8), (4, 8), (8, 8), (8, 4), (4, 8), (3, 8, 4), (8, 8)]
    batched = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in batched]
    opt = Muon(batched, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.1)
    singles = [Muon([p], lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.1) for p in alone]
    for _ in range(3):
        grads = [torch.randn(shape) for shape in shapes]
        for p, q, g in zip(batched, alone, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        for single in singles:
            single.step()
    for p, q in zip(batched, alone):
        assert torch.allclose(p.detach(), q.detach(), atol=1e-6)
    assert [len(b) for b in opt.shape_batches(batched)] == [3, 2, 1, 1]


def test_muon_runs_large_matrices_one_at_a_time_on_a_cpu():
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in [(192, 768)] * 3 + [(256, 512)] * 2]
    opt = Muon(params, lr=0.1, momentum=0.9, backend_steps=5, weight_decay=0.0)
    assert opt.shape_batches(params) == [[0, 1, 2], [3], [4]]


def test_muon_shares_every_matrix_to_exactly_one_rank():
    params = [torch.zeros(shape) for shape in [(8, 8)] * 5 + [(4, 8)] * 2 + [(8, 4)]]
    owned = []
    for rank in range(3):
        opt = Muon([torch.nn.Parameter(p) for p in params], lr=0.1, momentum=0.9, backend_steps=5,
                   weight_decay=0.0, rank=rank, world_size=3)
        owned += [i for batch in opt.shape_batches(params) for i in batch]
        assert all(len({params[i].shape for i in batch}) == 1 for batch in opt.shape_batches(params))
    assert sorted(owned) == list(range(len(params)))


def test_parameter_groups_cover_every_parameter_once():
    cfg, _ = load_config({"VOCAB_SIZE": "64", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4",
                          "NUM_KV_HEADS": "2", "TIE_EMBEDDINGS": "0", "TRAIN_BATCH_TOKENS": "1024"})
    model = GPT(cfg.model)
    opts = build_optimizers(model, cfg, Runtime(0, 1, 0, torch.device("cpu"), False))
    seen = [id(p) for opt in opts for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    muon_params = [p for g in opts[-1].param_groups for p in g["params"]]
    assert all(p.ndim == 2 for p in muon_params)
    assert id(model.tok_emb.weight) not in {id(p) for p in muon_params}


def config(**env):
    cfg, _ = load_config({k.upper(): str(v) for k, v in env.items()})
    return cfg


def test_lr_warmup_then_step_warmdown():
    cfg = config(iterations=100, warmdown_iters=20, lr_warmup_steps=10, max_wallclock_seconds=0)
    assert lr_scale(cfg, 0, 0) == pytest.approx(0.1)
    assert lr_scale(cfg, 9, 0) == 1.0 and lr_scale(cfg, 50, 0) == 1.0
    assert lr_scale(cfg, 90, 0) == pytest.approx(0.5) and lr_scale(cfg, 100, 0) == 0.0


def test_warmdown_follows_the_wall_clock_when_capped():
    cfg = config(iterations=100000, warmdown_iters=100, max_wallclock_seconds=10)
    # 10 ms a step: the last 100 steps are the last 1000 ms of the 10 s budget
    assert lr_scale(cfg, 500, 5000) == 1.0
    assert lr_scale(cfg, 950, 9500) == pytest.approx(0.5)
    assert lr_scale(cfg, 1000, 10000) == 0.0


def test_muon_momentum_warmup():
    cfg = config(muon_momentum=0.95, muon_momentum_warmup_start=0.85, muon_momentum_warmup_steps=100)
    assert muon_momentum_at(cfg, 0) == pytest.approx(0.85)
    assert muon_momentum_at(cfg, 50) == pytest.approx(0.90)
    assert muon_momentum_at(cfg, 500) == pytest.approx(0.95)
    assert muon_momentum_at(config(muon_momentum=0.95, muon_momentum_warmup_steps=0), 0) == 0.95

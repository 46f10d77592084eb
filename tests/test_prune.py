"""Selective pruning: a build a little over the limit zeroes its cheapest +-1 codes until it fits."""

import json
import re

import pytest
import torch

import train_gpt
from conftest import run_trainer
from test_gptq import CPU, RandomStream, calibration
from train_gpt import Rounding, dequantize_rows, input_hessians, load_config


def codes_of(entries) -> dict[str, torch.Tensor]:
    return {name: parts[0][0] for name, _, _, encoding, parts in entries if encoding["encoding"] == "int_rows"}


def build(model, scheme="int8", rounding=Rounding()):
    entries = train_gpt.tensor_parts(model, scheme, rounding)
    return entries, train_gpt.encode_artifact(model.spec, scheme, None, entries)[0]


@pytest.fixture
def small():
    cfg, model = calibration({})
    return cfg, model


def test_the_order_holds_every_pm1_code_once_cheapest_first(small, monkeypatch):
    monkeypatch.setattr(train_gpt, "QUANT_MIN_NUMEL", 256)
    cfg, model = small
    hessians = input_hessians(cfg, CPU, model, RandomStream(64), first_step=0)
    rounding = Rounding(hessians)
    entries, _ = build(model, "int4", rounding)
    state = model.state_dict()
    owners, positions = train_gpt.prune_order(state, entries, rounding)
    codes = [parts[0][0] for *_, parts in entries]
    ones = sum(int((q.abs() == 1).sum()) for name, q in codes_of(entries).items())
    assert len(owners) == ones and ones > 0
    costs = []
    for i, p in zip(owners.tolist(), positions.tolist()):
        name, _, _, encoding, ((q, _), (scale, _), *_) = entries[i]
        assert abs(int(codes[i].flatten()[p])) == 1
        w = state[name].flatten()[p]  # the 2-D matrices: rows are the weight's own
        rebuilt = dequantize_rows(q, scale).flatten()[p]
        h = hessians[name].diagonal()
        column = p % q.size(1)
        costs.append(float((w ** 2 - (w - rebuilt) ** 2) * h[column] / h.mean()))
    assert costs == sorted(costs)
    assert len(set(zip(owners.tolist(), positions.tolist()))) == ones


def test_codes_on_silent_inputs_go_first():
    """Two matrices alike but for where their inputs are busy: the quiet one's codes cost nothing to zero."""
    w = torch.full((4, 8), 0.1)
    q, scale = train_gpt.quantize_rows(w, 4)
    entries = [(name, "mlp", [4, 8], {"encoding": "int_rows", "bits": 4}, [(q, 4), (scale, None)])
               for name in ("busy", "quiet")]
    busy_h, quiet_h = torch.diag(torch.full((8,), 1.0)), torch.diag(torch.tensor([1.0] * 4 + [1e-6] * 4))
    q[:] = 1  # every code +-1, so the costs differ only by input energy
    order = train_gpt.prune_order({"busy": w, "quiet": w}, entries, Rounding({"busy": busy_h, "quiet": quiet_h}))
    assert order[0][:16].tolist() == [1] * 16 and sorted(order[1][:16].remainder(8).unique().tolist()) == [4, 5, 6, 7]


def test_a_build_slightly_over_the_limit_is_pruned_to_just_under_it(small, monkeypatch):
    monkeypatch.setattr(train_gpt, "QUANT_MIN_NUMEL", 256)
    _, model = small
    entries, blob = build(model, "int4")  # random weights: int4 has +-1 codes enough to drop 2%
    limit = len(blob) - len(blob) // 50
    cfg, _ = load_config({"QUANT_PRUNE_MAX": "0.05"})
    pruned, _, count = train_gpt.build_within_limit(cfg, model.spec, "int4", entries, model.state_dict(), Rounding(),
                                                    limit)
    assert 0 < count and limit - len(blob) // 100 <= len(pruned) <= limit
    header, tensors = train_gpt.parse_artifact(pruned, "pruned")
    zeroed = 0
    for name, _, _, encoding, ((q, _), (scale, _)) in (e for e in entries if e[3]["encoding"] == "int_rows"):
        now = torch.round(tensors[name].view(q.shape) / scale.float()[:, None]).to(torch.int8)
        changed = now != q
        assert torch.all(now[changed] == 0) and torch.all(q[changed].abs() == 1)
        zeroed += int(changed.sum())
    assert zeroed == count
    cfg, _ = load_config({"QUANT_PRUNE_MAX": "0.02"})
    unchanged = train_gpt.build_within_limit(cfg, model.spec, "int4", entries, model.state_dict(), Rounding(),
                                             len(blob) - len(blob) * 3 // 100)
    assert unchanged[0] == blob and unchanged[2] == 0  # 3% over, more than QUANT_PRUNE_MAX: left as it is


def test_a_run_over_the_limit_prunes_and_fits(tiny_env, tmp_path):
    env = {**tiny_env, "MODEL_DIM": "128", "QUANT": "int6", "ITERATIONS": "2"}
    first = run_trainer(env, tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "logs" / "t.json").read_text())
    limit = summary["bytes_total"] - summary["bytes_model"] // 100
    out = run_trainer({**env, "RUN_ID": "p", "ARTIFACT_LIMIT_BYTES": str(limit), "QUANT_PRUNE_MAX": "0.03"}, tmp_path)
    assert out.returncode == 0, out.stderr
    pruned = json.loads((tmp_path / "logs" / "p.json").read_text())
    assert pruned["over_limit"] is False and limit - 2000 <= pruned["bytes_total"] <= limit
    count = pruned["quant"]["tried"][0]["pruned_codes"]
    assert count > 0 and re.search(rf"quant:int6\+\w+ bytes_total:{pruned['bytes_total']} fits:true "
                                   rf"pruned_codes:{count}", out.stdout)

"""Evaluation core: standard evaluation equals a hand computation of loss and bits per byte."""

import math

import torch

from test_model import randomize, tiny_model
from train_gpt import ByteTables, Evaluator, Runtime, load_config


def test_standard_eval_matches_a_direct_computation():
    cfg, _ = load_config({"VOCAB_SIZE": "64", "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "1024",
                          "VAL_BATCH_SIZE": "48"})  # 3 windows a forward: batches end mid-way
    model = randomize(tiny_model())
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (16 * 7 + 1,))
    tables = ByteTables(torch.randint(0, 4, (64,), dtype=torch.int32), torch.rand(64) < 0.5, torch.rand(64) < 0.1)
    evaluator = Evaluator(cfg, Runtime(0, 1, 0, torch.device("cpu"), False), tokens, tables)
    val_loss, val_bpb = evaluator.standard(model)

    x, y = tokens[:-1].view(7, 16), tokens[1:].view(7, 16)
    nll = model(x, y, reduction="none").double()
    nbytes = tables.count(x, y).double().sum()
    assert math.isclose(val_loss, nll.mean().item(), rel_tol=1e-6)
    assert math.isclose(val_bpb, nll.sum().item() / math.log(2) / nbytes.item(), rel_tol=1e-6)
    assert evaluator.val_bytes() == int(nbytes)


def test_rank_shares_partition_the_windows():
    cfg, _ = load_config({"TRAIN_BATCH_TOKENS": "1024"})
    windows = [(i, 0) for i in range(10)]
    shares = [Evaluator(cfg, Runtime(r, 3, 0, torch.device("cpu"), False), torch.zeros(2, dtype=torch.long),
                        ByteTables(torch.zeros(1), torch.zeros(1, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))
                        ).rank_share(windows) for r in range(3)]
    assert sum(shares, []) == windows

"""Two processes under torchrun (gloo) see the same global batch as one process accumulating twice."""

import json
import re
import sys

import numpy as np

from conftest import ROOT, run_trainer


def train_losses(stdout: str) -> list[float]:
    return [float(v) for v in re.findall(r"^step:\d+/\d+ train_loss:(\S+)", stdout, re.M)]


def test_two_ranks_match_one_rank_with_accumulation(tiny_env):
    env = {**tiny_env, "ITERATIONS": "8", "WARMUP_STEPS": "0", "GRAD_CLIP_NORM": "1.0"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run_trainer({**env, "GRAD_ACCUM_STEPS": "1", "RUN_ID": "two"}, ROOT, launcher=launcher)
    one = run_trainer({**env, "GRAD_ACCUM_STEPS": "2", "RUN_ID": "one"}, ROOT)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    a, b = train_losses(two.stdout), train_losses(one.stdout)
    assert len(a) == len(b) == 8
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3
    assert "world_size:2 grad_accum_steps:1" in two.stdout
    final = re.compile(r"final_int8_zstd_roundtrip_exact val_loss:(\S+)")
    assert abs(float(final.search(two.stdout).group(1)) - float(final.search(one.stdout).group(1))) < 2e-3


def test_evaluation_methods_split_over_two_ranks_agree_with_one(tiny_env):
    """Sliding and TTT are the same computation split differently. Hedge weights are learnt per rank
    from its own stretch, so with HEDGE_ETA=0 (weights fixed) Hedge must agree too: that checks that
    each rank's count tables start from exactly the tokens before its stretch. Every audit passes."""
    env = {**tiny_env, "ITERATIONS": "4", "WARMUP_STEPS": "0", "EVAL_STRIDE": "16", "HEDGE_ENABLED": "1",
           "HEDGE_CHUNK_TOKENS": "64", "HEDGE_ETA": "0", "TTT_STEPS": "1", "TTT_CHUNK_TOKENS": "512", "EVAL_AUDIT": "1",
           "EVAL_AUDIT_TOKENS": "700", "PER_TOKEN_LOSS_EVERY": "4"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run_trainer({**env, "GRAD_ACCUM_STEPS": "1", "RUN_ID": "two"}, ROOT, launcher=launcher)
    one = run_trainer({**env, "GRAD_ACCUM_STEPS": "2", "RUN_ID": "one"}, ROOT)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    logs = ROOT / env["LOG_DIR"]
    a, b = (json.loads((logs / f"{r}.json").read_text()) for r in ("two", "one"))
    assert abs(a["sliding_val_bpb"] - b["sliding_val_bpb"]) < 2e-3
    assert abs(a["ttt_val_bpb"] - b["ttt_val_bpb"]) < 2e-3
    assert abs(a["hedge_val_bpb"] - b["hedge_val_bpb"]) < 2e-3
    assert a["audit"]["passed"] and a["audit"]["causal"] and b["audit"]["passed"]
    with np.load(logs / "two_per_token" / "final.npz") as x, np.load(logs / "one_per_token" / "final.npz") as y:
        assert len(x["loss"]) == len(y["loss"]) == a["val_tokens"]
        assert np.abs(x["loss"].astype(np.float32) - y["loss"].astype(np.float32)).max() < 1e-2

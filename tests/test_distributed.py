"""Two processes under torchrun (gloo) see the same global batch as one process accumulating twice."""

import json
import re
import socket
import subprocess
import sys

import numpy as np

from conftest import ROOT, clean_env, run_trainer


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
    each rank's count tables start from exactly the tokens before its stretch. Every audit passes.
    The learning rates are 0, so both runs evaluate the very same weights (trained ones would differ
    by the order in which two ranks sum gradients): the figures then agree to float rounding, and
    TTT's, whose gradients are summed over the ranks, within 1e-4."""
    env = {**tiny_env, "ITERATIONS": "2", "WARMUP_STEPS": "0", "EVAL_STRIDE": "16", "HEDGE_ENABLED": "1",
           "HEDGE_CHUNK_TOKENS": "64", "HEDGE_ETA": "0", "TTT_STEPS": "1", "TTT_CHUNK_TOKENS": "512", "EVAL_AUDIT": "1",
           "EVAL_AUDIT_TOKENS": "700", "PER_TOKEN_LOSS_EVERY": "2", "MATRIX_LR": "0", "SCALAR_LR": "0",
           "TIED_EMBED_LR": "0"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run_trainer({**env, "GRAD_ACCUM_STEPS": "1", "RUN_ID": "two"}, ROOT, launcher=launcher)
    one = run_trainer({**env, "GRAD_ACCUM_STEPS": "2", "RUN_ID": "one"}, ROOT)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    logs = ROOT / env["LOG_DIR"]
    a, b = (json.loads((logs / f"{r}.json").read_text()) for r in ("two", "one"))
    assert abs(a["sliding_val_bpb"] - b["sliding_val_bpb"]) < 1e-6
    assert abs(a["hedge_val_bpb"] - b["hedge_val_bpb"]) < 1e-6
    assert abs(a["ttt_val_bpb"] - b["ttt_val_bpb"]) < 1e-4
    assert a["audit"]["passed"] and a["audit"]["causal"] and b["audit"]["passed"]
    with np.load(logs / "two_per_token" / "final.npz") as x, np.load(logs / "one_per_token" / "final.npz") as y:
        assert len(x["loss"]) == len(y["loss"]) == a["val_tokens"]
        assert np.abs(x["loss"].astype(np.float32) - y["loss"].astype(np.float32)).max() < 5e-3  # a float16 step


def test_gptq_and_auto_over_two_ranks_agree_with_one(tiny_env):
    """Each rank's Hessians summed over ranks are one process's over the same tokens (two micro-batches of the step
    each), and so are QUANT=auto's losses: the same weights (learning rates 0) give the same choice and figures."""
    env = {**tiny_env, "MODEL_DIM": "128", "ITERATIONS": "2", "WARMUP_STEPS": "0", "QUANT_GPTQ": "1", "QUANT": "auto",
           "MOE_NUM_EXPERTS": "2", "MOE_TOP_K": "1", "MOE_LAYERS": "1", "MATRIX_LR": "0", "SCALAR_LR": "0",
           "TIED_EMBED_LR": "0"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = run_trainer({**env, "GRAD_ACCUM_STEPS": "1", "QUANT_CALIB_BATCHES": "2", "RUN_ID": "two"}, ROOT,
                      launcher=launcher)
    one = run_trainer({**env, "GRAD_ACCUM_STEPS": "2", "QUANT_CALIB_BATCHES": "4", "RUN_ID": "one"}, ROOT)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-2000:] + one.stderr[-2000:]
    logs = ROOT / env["LOG_DIR"]
    a, b = (json.loads((logs / f"{r}.json").read_text()) for r in ("two", "one"))
    assert a["calibration"]["tokens"] == b["calibration"]["tokens"] == 2 * 2048  # the Hessians', auto's losses
    assert a["quant"]["scheme"] == b["quant"]["scheme"]
    for x, y in zip(a["quant"]["tried"], b["quant"]["tried"]):
        assert abs(x["calibration_loss"] - y["calibration_loss"]) < 1e-4
    assert abs(a["roundtrip_val_bpb"] - b["roundtrip_val_bpb"]) < 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_under_c10d_rendezvous_match_one_process_and_only_global_rank_0_writes(tiny_env, tmp_path):
    """Two launchers as two one-GPU nodes (`torchrun --nnodes=2 --nproc_per_node=1 --rdzv_backend=c10d`),
    each with a LOG_DIR of its own as separate machines would have: the loss curve equals one process
    accumulating twice, and only the node that got global rank 0 writes anything (both have LOCAL_RANK 0)."""
    env = {**tiny_env, "ITERATIONS": "6", "WARMUP_STEPS": "0", "GRAD_CLIP_NORM": "1.0", "GRAD_ACCUM_STEPS": "1"}
    port = free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two_nodes",
                str(ROOT / "train_gpt.py")]
    nodes = [subprocess.Popen(launcher, cwd=ROOT, env={**clean_env(), **env, "RUN_ID": "mn", "LOG_DIR": str(tmp_path / d)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in ("a", "b")]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    one = run_trainer({**env, "GRAD_ACCUM_STEPS": "2", "RUN_ID": "one"}, ROOT)
    assert one.returncode == 0, one.stderr[-2000:]
    written = [sorted(p.name for p in (tmp_path / d).glob("*")) if (tmp_path / d).exists() else [] for d in ("a", "b")]
    assert sorted(map(len, written))[0] == 0, written
    assert {"mn.txt", "mn.json", "mn.ptz"} <= set(written[0] + written[1])
    stdout = next(out for out, _ in outputs if "world_size:2" in out)
    a, b = train_losses(stdout), train_losses(one.stdout)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3


def test_the_local_rank_picks_the_gpu_and_a_rendezvous_without_an_id_gets_a_fresh_run_id(monkeypatch):
    """On node 2 of 2 with 8 GPUs each, global rank 9 is local rank 1: it must take cuda:1, not cuda:9."""
    import torch
    import train_gpt

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(train_gpt.dist, "init_process_group", lambda *a, **k: None)
    for name, value in dict(RANK="9", LOCAL_RANK="1", WORLD_SIZE="16", TORCHELASTIC_RUN_ID="none").items():
        monkeypatch.setenv(name, value)
    cfg, _ = train_gpt.load_config({"DEVICE": "cuda"}, world_size=16)
    rt = train_gpt.init_runtime(cfg)
    assert (rt.rank, rt.local_rank, rt.world_size, rt.device) == (9, 1, 16, torch.device("cuda", 1))
    assert chosen == [torch.device("cuda", 1)]
    assert cfg.run_id != "none"

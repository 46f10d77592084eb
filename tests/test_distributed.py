"""Two processes under torchrun (gloo) see the same global batch as one process accumulating twice."""

import re
import sys

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

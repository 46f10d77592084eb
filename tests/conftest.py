"""Shared fixtures: a tiny tokenizer and data set made here, never read from outside the repo."""

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import imitated_device  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The README's command runs two workers (pytest-xdist), one a core of CI's two: a worker's torch, and the runs it
    # starts, take one thread each, or two workers of two threads would fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Before any backward pass: autograd's engine sizes its per-device queues once, at its first use.
imitated_device.register()

WORDS = ("the a cat dog bird sat ran flew over under near big small red blue green house tree river "
         "stone happy sad quick slow and but because when then morning evening light dark friend "
         "café naïve über").split()
BOS = 1


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(rng.randint(2, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 10))]
            sentences.append(" ".join(words).capitalize() + rng.choice(".!?"))
        docs.append(" ".join(sentences))
    return docs


def train_tokenizer(docs: list[str], prefix: Path, vocab_size: int) -> Path:
    import sentencepiece as spm

    text = prefix.with_suffix(".txt")
    text.write_text("\n".join(docs), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> Path:
    return train_tokenizer(make_docs(400, seed=0), tmp_path_factory.mktemp("tok") / "tiny", vocab_size=320)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_path))


def encode_docs(sp, docs: list[str]) -> np.ndarray:
    out = []
    for ids in sp.encode(docs):
        out += [BOS] + ids
    return np.array(out, dtype=np.uint16)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, tokenizer, tokenizer_path) -> Path:
    from data.prepare import write_shard

    d = tmp_path_factory.mktemp("data")
    write_shard(d / "tiny_val_000000.bin", encode_docs(tokenizer, make_docs(60, seed=1)))
    write_shard(d / "tiny_train_000000.bin", encode_docs(tokenizer, make_docs(400, seed=2)))
    write_shard(d / "tiny_train_000001.bin", encode_docs(tokenizer, make_docs(400, seed=3)))
    return d


TINY_ENV = {
    "VOCAB_SIZE": "320", "NUM_LAYERS": "2", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
    "TRAIN_SEQ_LEN": "64", "TRAIN_BATCH_TOKENS": "1024", "ITERATIONS": "6", "VAL_LOSS_EVERY": "0",
    "TRAIN_LOG_EVERY": "1", "WARMUP_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "0", "WARMDOWN_ITERS": "2",
    "VAL_BATCH_SIZE": "4096",
}


def clean_env() -> dict:
    """The parent's environment without any of our settings, so a developer's shell cannot leak in."""
    import train_gpt

    ours = set(train_gpt.CONFIG_FIELDS)
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_trainer(env: dict, cwd: Path, launcher: list[str] | None = None, timeout: int = 300):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_gpt.py")]
    return subprocess.run(cmd, env={**clean_env(), **env}, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def tiny_env(data_dir, tokenizer_path, tmp_path) -> dict:
    return {**TINY_ENV, "DATA_PATH": str(data_dir), "TOKENIZER_PATH": str(tokenizer_path),
            "LOG_DIR": str(tmp_path / "logs"), "RUN_ID": "t"}

"""data/fineweb.py against a local fake of the hub's layout; never the network."""

import importlib.util
import json
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from conftest import ROOT
from data import fineweb
from data.prepare import write_shard

FINEWEB = [sys.executable, str(ROOT / "data" / "fineweb.py")]


@pytest.fixture
def hub(tmp_path, tokenizer_path):
    root = tmp_path / "hub"
    shards = root / "datasets" / "datasets" / "fineweb10B_sp1024"
    shards.mkdir(parents=True)
    (root / "datasets" / "manifest.json").write_text(json.dumps(
        {"datasets": [{"name": "fineweb10B_sp1024", "files_train": 3, "files_val": 1}]}))
    for split, n in (("val", 1), ("train", 3)):
        for i in range(n):
            write_shard(shards / f"fineweb_{split}_{i:06d}.bin", np.arange(1, 50 + i, dtype=np.uint16))
    (root / "datasets" / "tokenizers").mkdir()
    for suffix in (".model", ".vocab"):
        shutil.copy(tokenizer_path, root / "datasets" / "tokenizers" / f"fineweb_1024_bpe{suffix}")
    return root


def run(hub, out, *extra):
    return subprocess.run(FINEWEB + ["--variant", "sp1024", "--hub-dir", str(hub), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)


def test_download_lays_out_shards_tokenizers_and_manifest(hub, tmp_path):
    out = run(hub, tmp_path / "data", "--train-shards", "2")
    assert out.returncode == 0, out.stderr
    local = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    assert sorted(p.name for p in local.iterdir()) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                                       "fineweb_val_000000.bin"]
    assert (tmp_path / "data" / "tokenizers" / "fineweb_1024_bpe.model").is_file()
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert "3 downloaded, 0 already present" in out.stdout


def test_train_shards_are_capped_by_the_manifest(hub, tmp_path):
    out = run(hub, tmp_path / "data", "--train-shards", "10")
    assert out.returncode == 0, out.stderr
    assert "1 val + 3 train shards" in out.stdout


def test_present_shards_are_kept_and_corrupt_ones_fetched_again(hub, tmp_path):
    assert run(hub, tmp_path / "data", "--train-shards", "2").returncode == 0
    local = tmp_path / "data" / "datasets" / "fineweb10B_sp1024"
    (local / "fineweb_train_000001.bin").write_bytes(b"garbage")
    out = run(hub, tmp_path / "data", "--train-shards", "2")
    assert out.returncode == 0 and "1 downloaded, 2 already present" in out.stdout
    assert (local / "fineweb_train_000001.bin").read_bytes() == (
        hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").read_bytes()


def test_a_corrupt_shard_on_the_hub_is_refused(hub, tmp_path):
    bad = hub / "datasets" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-4])
    out = run(hub, tmp_path / "data", "--train-shards", "2")
    assert out.returncode == 2 and "fineweb_train_000001.bin" in out.stderr and "declares" in out.stderr
    assert not (tmp_path / "data" / "datasets" / "fineweb10B_sp1024" / "fineweb_train_000001.bin").exists()


def test_a_missing_file_on_the_hub_is_one_line(hub, tmp_path):
    (hub / "datasets" / "tokenizers" / "fineweb_1024_bpe.vocab").unlink()
    out = run(hub, tmp_path / "data", "--train-shards", "1")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "not in the hub folder" in out.stderr


def test_hub_fetcher_goes_through_hf_hub_download(hub, tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, repo_type, local_dir):
        calls.append((repo_id, filename, repo_type))
        target = tmp_path / "cache" / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(hub / filename, target)
        return str(target)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=fake_download))
    fetch = fineweb.hub_fetcher("willdepueoai/parameter-golf")
    result = fineweb.download("sp1024", 1, tmp_path / "data", fetch, "datasets", skip_manifest=False)
    assert result["train_shards"] == 1 and result["downloaded"] == 2
    assert calls[0] == ("willdepueoai/parameter-golf", "datasets/manifest.json", "dataset")
    assert ("willdepueoai/parameter-golf", "datasets/datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
            "dataset") in calls


@pytest.mark.skipif(importlib.util.find_spec("huggingface_hub") is not None, reason="huggingface_hub is installed")
def test_without_huggingface_hub_says_how_to_install_it(tmp_path):
    out = subprocess.run(FINEWEB + ["--out", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "pip install huggingface_hub" in out.stderr

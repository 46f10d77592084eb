"""data/fineweb.py against a fake hub on local disk: layout, manifest-driven counts, reuse of
valid files, refusal of corrupt shards. Never the network."""

import json
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import fineweb  # noqa: E402
from data.prepare import write_shard  # noqa: E402

FINEWEB = ROOT / "data" / "fineweb.py"
DATASET = "fineweb10B_sp1024"


def manifest(train: int, val: int = 1, dataset: str = DATASET, model: str = "tokenizers/fineweb_1024_bpe.model"):
    """A manifest in the challenge's format (only the fields the downloader reads, and a few more)."""
    return {"version": "10B", "num_docs": 123,
            "tokenizers": [{"name": "sp_bpe_1024", "kind": "sentencepiece_bpe", "vocab_size": 1024,
                            "model_path": model, "vocab_path": "tokenizers/fineweb_1024_bpe.vocab"}],
            "datasets": [{"name": dataset, "tokenizer_name": "sp_bpe_1024", "vocab_size": 1024,
                          "stats": {"files_train": train, "files_val": val, "docs_val": 50000}}]}


@pytest.fixture
def hub(tmp_path) -> Path:
    """A folder laid out like the remote repo: datasets/manifest.json, 2 val + 3 train shards,
    the tokenizer's two files."""
    root = tmp_path / "hub"
    shards = root / "datasets" / "datasets" / DATASET
    shards.mkdir(parents=True)
    (root / "datasets" / "manifest.json").write_text(json.dumps(manifest(train=3, val=2)))
    for split, count in (("val", 2), ("train", 3)):
        for i in range(count):
            write_shard(shards / f"fineweb_{split}_{i:06d}.bin", np.arange(1, 40 + 10 * i, dtype=np.uint16))
    (root / "datasets" / "tokenizers").mkdir()
    (root / "datasets" / "tokenizers" / "fineweb_1024_bpe.model").write_bytes(b"model bytes")
    (root / "datasets" / "tokenizers" / "fineweb_1024_bpe.vocab").write_bytes(b"vocab bytes")
    return root


def run_fineweb(hub: Path, out: Path, *extra):
    return subprocess.run([sys.executable, str(FINEWEB), "--variant", "sp1024", "--hub-dir", str(hub),
                           "--out", str(out), *extra], capture_output=True, text=True, timeout=60)


class Recorder:
    """A fetcher over the fake hub that remembers what it was asked for."""

    def __init__(self, hub: Path):
        self.calls: list[str] = []
        self.inner = fineweb.folder_fetcher(hub)

    def __call__(self, remote: str, target: Path):
        self.calls.append(remote)
        self.inner(remote, target)


def local_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "datasets" / DATASET).iterdir())


def test_download_lays_files_out_like_the_challenge(hub, tmp_path):
    out = run_fineweb(hub, tmp_path / "data", "--train-shards", "2")
    assert out.returncode == 0, out.stderr
    data = tmp_path / "data"
    assert local_names(data) == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                 "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    remote = hub / "datasets" / "datasets" / DATASET
    for name in local_names(data):
        assert (data / "datasets" / DATASET / name).read_bytes() == (remote / name).read_bytes()
    assert (data / "tokenizers" / "fineweb_1024_bpe.model").read_bytes() == b"model bytes"
    assert (data / "tokenizers" / "fineweb_1024_bpe.vocab").read_bytes() == b"vocab bytes"
    assert json.loads((data / "manifest.json").read_text()) == manifest(train=3, val=2)
    assert "2 val + 2 train shards" in out.stdout and "4 fetched, 0 already present" in out.stdout
    assert not [p for p in data.rglob(".*")], "no temporary files left behind"


def test_train_shards_capped_by_the_manifest(hub, tmp_path):
    out = run_fineweb(hub, tmp_path / "data", "--train-shards", "10")
    assert out.returncode == 0, out.stderr
    assert "lists 3 training shards" in out.stdout and "2 val + 3 train shards" in out.stdout
    assert len(local_names(tmp_path / "data")) == 5


def test_present_valid_files_are_not_fetched_again(hub, tmp_path):
    first = Recorder(hub)
    fineweb.download("sp1024", 2, tmp_path / "data", first, "datasets", log=lambda _: None)
    assert len(first.calls) == 1 + 4 + 2  # manifest, shards, tokenizer files
    again = Recorder(hub)
    result = fineweb.download("sp1024", 3, tmp_path / "data", again, "datasets", log=lambda _: None)
    assert again.calls == ["datasets/manifest.json", f"datasets/datasets/{DATASET}/fineweb_train_000002.bin"]
    assert (result["fetched"], result["kept"]) == (1, 4)


def test_a_corrupt_local_shard_is_fetched_again(hub, tmp_path):
    assert run_fineweb(hub, tmp_path / "data", "--train-shards", "2").returncode == 0
    local = tmp_path / "data" / "datasets" / DATASET / "fineweb_train_000001.bin"
    local.write_bytes(local.read_bytes()[:-2])
    recorder = Recorder(hub)
    fineweb.download("sp1024", 2, tmp_path / "data", recorder, "datasets", log=lambda _: None)
    assert recorder.calls[1:] == [f"datasets/datasets/{DATASET}/fineweb_train_000001.bin"]
    assert local.read_bytes() == (hub / "datasets" / "datasets" / DATASET / local.name).read_bytes()


@pytest.mark.parametrize("corrupt,problem", [
    (lambda blob: blob[:-2], "header declares 59 tokens"),
    (lambda blob: b"\x00" * 4 + blob[4:], "magic 0"),
    (lambda blob: blob[:4] + b"\x02\x00\x00\x00" + blob[8:], "version 2"),
    (lambda blob: blob[:100], "shorter than the 1024-byte header"),
])
def test_a_corrupt_shard_on_the_hub_is_refused(hub, tmp_path, corrupt, problem):
    bad = hub / "datasets" / "datasets" / DATASET / "fineweb_train_000002.bin"
    bad.write_bytes(corrupt(bad.read_bytes()))
    out = run_fineweb(hub, tmp_path / "data", "--train-shards", "3")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "fineweb_train_000002.bin: not a valid shard" in out.stderr and problem in out.stderr
    assert "fineweb_train_000002.bin" not in local_names(tmp_path / "data")
    assert not [p for p in (tmp_path / "data").rglob(".*")]


def test_a_stale_manifest_from_another_repo_is_not_used(hub, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest(train=99, val=7)))
    out = run_fineweb(hub, tmp_path / "data", "--train-shards", "50")
    assert out.returncode == 0, out.stderr
    assert "2 val + 3 train shards" in out.stdout
    assert json.loads((tmp_path / "data" / "manifest.json").read_text()) == manifest(train=3, val=2)


@pytest.mark.parametrize("bad_manifest,message", [
    (manifest(train=3, dataset="fineweb10B_sp4096"), "no datasets entry named 'fineweb10B_sp1024'"),
    ({**manifest(train=3), "tokenizers": []}, "no tokenizers entry named 'sp_bpe_1024'"),
    (manifest(train=3, model="../../evil.model"), "is not under tokenizers/"),
    ({"datasets": [{"name": DATASET, "tokenizer_name": "x", "stats": {}}]}, "has no shard counts"),
])
def test_a_manifest_without_what_is_needed_is_refused(hub, tmp_path, bad_manifest, message):
    (hub / "datasets" / "manifest.json").write_text(json.dumps(bad_manifest))
    out = run_fineweb(hub, tmp_path / "data")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


def test_a_file_missing_from_the_hub_is_one_line(hub, tmp_path):
    (hub / "datasets" / "tokenizers" / "fineweb_1024_bpe.vocab").unlink()
    out = run_fineweb(hub, tmp_path / "data", "--train-shards", "1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not in the hub folder" in out.stderr


def test_without_huggingface_hub_it_says_how_to_install_it(tmp_path):
    # None in sys.modules makes the import fail even where huggingface_hub is installed
    code = ("import runpy, sys; sys.modules['huggingface_hub'] = None; "
            f"sys.argv = ['fineweb.py', '--out', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(FINEWEB)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "pip install huggingface_hub" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_hub_fetcher_asks_hf_hub_download_for_the_dataset_repo(hub, tmp_path, monkeypatch):
    calls = []

    def hf_hub_download(repo_id, filename, repo_type, local_dir):
        calls.append((repo_id, filename, repo_type))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub / filename, target)
        return str(target)

    reached = []
    monkeypatch.setattr(fineweb, "reach_hub", lambda endpoint, variant, out: reached.append(endpoint))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(
        hf_hub_download=hf_hub_download, constants=types.SimpleNamespace(ENDPOINT="https://hub.example")))
    fetch = fineweb.hub_fetcher("someone/some-repo", tmp_path / "data" / fineweb.HUB_STAGING, "sp1024",
                                tmp_path / "data")
    assert reached == ["https://hub.example"]  # the network is tried once, before any file
    result = fineweb.download("sp1024", 1, tmp_path / "data", fetch, "datasets", log=lambda _: None)
    assert result["fetched"] == 3
    assert calls[0] == ("someone/some-repo", "datasets/manifest.json", "dataset")
    assert ("someone/some-repo", f"datasets/datasets/{DATASET}/fineweb_train_000000.bin", "dataset") in calls
    assert (tmp_path / "data" / "datasets" / DATASET / "fineweb_train_000000.bin").is_file()


def test_where_each_variant_comes_from(monkeypatch):
    monkeypatch.delenv(fineweb.REPO_ENV, raising=False)
    monkeypatch.delenv(fineweb.PREFIX_ENV, raising=False)
    assert fineweb.source_for("sp1024", None, None) == ("willdepueoai/parameter-golf", "datasets")
    assert fineweb.source_for("sp8192", None, None) == ("kevclark/parameter-golf", "datasets")
    monkeypatch.setenv(fineweb.REPO_ENV, "env/repo")
    monkeypatch.setenv(fineweb.PREFIX_ENV, "export_root")
    assert fineweb.source_for("sp8192", None, None) == ("env/repo", "export_root")
    assert fineweb.source_for("sp8192", "flag/repo", "other/") == ("flag/repo", "other")


def fake_gpu_box(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of run.sh and data/ where `nvidia-smi` lists one GPU and `torchrun` only says how it was called."""
    box, bin_dir = tmp_path / "box", tmp_path / "bin"
    shutil.copytree(ROOT / "data", box / "data", ignore=shutil.ignore_patterns("datasets", "synthetic", "__pycache__"))
    shutil.copy(ROOT / "run.sh", box / "run.sh")
    bin_dir.mkdir()
    for name, body in (("nvidia-smi", 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"'),
                       ("torchrun", 'echo "torchrun called: $*"')):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin:{Path(sys.executable).parent}", "HOME": str(tmp_path)}
    return box, env


def test_run_sh_on_a_gpu_box_fetches_the_missing_shards_with_a_line_each_then_launches(tmp_path, hub):
    box, env = fake_gpu_box(tmp_path)
    done = subprocess.run(["bash", str(box / "run.sh")], env={**env, "FINEWEB_HUB_DIR": str(hub),
                          "FINEWEB_TRAIN_SHARDS": "2"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("shard ")] == ["shard 1/4", "shard 2/4",
                                                                                  "shard 3/4", "shard 4/4"]
    assert lines[-1] == "torchrun called: --standalone --nproc_per_node=1 train_gpt.py"
    assert local_names(box / "data") == ["fineweb_train_000000.bin", "fineweb_train_000001.bin",
                                         "fineweb_val_000000.bin", "fineweb_val_000001.bin"]
    again = subprocess.run(["bash", str(box / "run.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout == "torchrun called: --standalone --nproc_per_node=1 train_gpt.py\n"  # present: no fetch


def test_run_sh_on_a_gpu_box_without_network_stops_at_once_naming_what_to_do(tmp_path):
    box, env = fake_gpu_box(tmp_path)
    with socket.socket() as closed:  # a port nobody listens on: refused at once, as a box without network
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
    done = subprocess.run(["bash", str(box / "run.sh")], env={**env, "HF_ENDPOINT": endpoint},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "torchrun called" not in done.stdout
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"error: cannot reach {endpoint}")
    assert "`python data/fineweb.py --variant sp1024 --out DIR`" in done.stderr
    assert f"copy DIR/datasets and DIR/tokenizers into {(box / 'data').resolve()}/" in done.stderr

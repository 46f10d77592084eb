"""Download the challenge's published FineWeb shards and tokenizers.

    python data/fineweb.py --variant sp1024|sp8192 [--train-shards N] [--out data]
                           [--repo-id ID] [--remote-prefix P] [--hub-dir DIR]

Remote layout (a Hugging Face dataset repo): <prefix>/manifest.json,
<prefix>/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin, <prefix>/tokenizers/<files>.
Local layout: <out>/datasets/fineweb10B_<variant>/, <out>/tokenizers/, <out>/manifest.json.

sp1024 is the challenge's own (willdepueoai/parameter-golf, prefix "datasets"). sp8192 was
published by the community at kevclark/parameter-golf; its prefix is assumed to be the same and
could not be checked from here: override with --repo-id / --remote-prefix (or the env vars
MATCHED_FINEWEB_REPO_ID / MATCHED_FINEWEB_REMOTE_ROOT_PREFIX) if it differs.

Downloads use huggingface_hub (not a dependency of the harness: `pip install huggingface_hub`).
--hub-dir reads the same layout from a local folder instead (a mirror, or a test's fake hub).
The manifest is fetched fresh on every run, so one cached from another repo can never be used.
Shards already present with a valid header are kept; every new one is checked after download.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_gpt import InputError, read_shard  # noqa: E402

VARIANTS = {
    "sp1024": {"repo_id": "willdepueoai/parameter-golf", "prefix": "datasets",
               "tokenizer_files": ["fineweb_1024_bpe.model", "fineweb_1024_bpe.vocab"]},
    "sp8192": {"repo_id": "kevclark/parameter-golf", "prefix": "datasets",
               "tokenizer_files": ["fineweb_8192_bpe.model", "fineweb_8192_bpe.vocab"]},
}
DEFAULT_TRAIN_SHARDS = 80


class FetchError(Exception):
    """A download or a downloaded file went wrong: one line, exit code 2."""


def hub_fetcher(repo_id: str):
    """fetch(remote_path, destination) through huggingface_hub."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise FetchError("huggingface_hub is not installed: pip install huggingface_hub") from None

    def fetch(remote: str, destination: Path):
        with tempfile.TemporaryDirectory(dir=destination.parent) as tmp:
            try:
                got = hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset", local_dir=tmp)
            except Exception as e:  # the hub raises many kinds; all mean "not fetched"
                raise FetchError(f"{repo_id}/{remote}: download failed ({e.__class__.__name__})") from None
            os.replace(got, destination)

    return fetch


def folder_fetcher(hub_dir: Path):
    """fetch(remote_path, destination) from a local folder laid out like the hub."""

    def fetch(remote: str, destination: Path):
        source = hub_dir / remote
        if not source.is_file():
            raise FetchError(f"{source}: not in the hub folder")
        fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
        os.close(fd)
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, destination)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    return fetch


def split_counts(manifest: dict, dataset_dir: str) -> dict[str, int]:
    """Shard counts the manifest declares for this dataset ({} when it declares none we can read)."""
    entries = manifest.get("datasets", [])
    entries = entries.values() if isinstance(entries, dict) else entries
    for entry in entries:
        if isinstance(entry, dict) and dataset_dir in (entry.get("name"), entry.get("dataset_dir"), entry.get("path")):
            counts = {}
            for split in ("train", "val"):
                value = entry.get(f"files_{split}")
                if isinstance(value, list):
                    value = len(value)
                if isinstance(value, int):
                    counts[split] = value
            return counts
    return {}


def valid_shard(path: Path) -> bool:
    try:
        read_shard(path)
        return True
    except InputError:
        return False


def fetch_shard(fetch, remote: str, destination: Path) -> bool:
    """Downloads one shard unless a valid copy is already there; returns whether it downloaded."""
    if destination.is_file() and valid_shard(destination):
        return False
    fetch(remote, destination)
    try:
        read_shard(destination)
    except InputError as e:
        destination.unlink(missing_ok=True)
        raise FetchError(f"downloaded {e}") from None
    return True


def download(variant: str, train_shards: int, out: Path, fetch, prefix: str, skip_manifest: bool) -> dict:
    spec = VARIANTS[variant]
    dataset_dir = f"fineweb10B_{variant}"
    local = out / "datasets" / dataset_dir
    local.mkdir(parents=True, exist_ok=True)
    (out / "tokenizers").mkdir(parents=True, exist_ok=True)
    counts = {}
    if not skip_manifest:
        fetch(f"{prefix}/manifest.json", out / "manifest.json")
        try:
            manifest = json.loads((out / "manifest.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise FetchError(f"{out / 'manifest.json'}: not valid JSON") from None
        counts = split_counts(manifest if isinstance(manifest, dict) else {}, dataset_dir)
    wanted_train = min(train_shards, counts.get("train", train_shards))
    done = {"downloaded": 0, "kept": 0}
    plan = [("val", i) for i in range(counts.get("val", 1))] + [("train", i) for i in range(wanted_train)]
    for split, i in plan:
        name = f"fineweb_{split}_{i:06d}.bin"
        fresh = fetch_shard(fetch, f"{prefix}/datasets/{dataset_dir}/{name}", local / name)
        done["downloaded" if fresh else "kept"] += 1
    for name in spec["tokenizer_files"]:
        if not (out / "tokenizers" / name).is_file():
            fetch(f"{prefix}/tokenizers/{name}", out / "tokenizers" / name)
    return {**done, "train_shards": wanted_train, "val_shards": counts.get("val", 1), "path": str(local)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Download the challenge's FineWeb shards and tokenizers.")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS,
                        help="training shards of 100M tokens (capped by the manifest)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--repo-id", default=None, help="Hugging Face dataset repo (default: per variant)")
    parser.add_argument("--remote-prefix", default=None, help="folder of the layout inside the repo")
    parser.add_argument("--hub-dir", type=Path, help="read the remote layout from this local folder instead")
    parser.add_argument("--skip-manifest", action="store_true", help="do not fetch manifest.json")
    args = parser.parse_args(argv)
    spec = VARIANTS[args.variant]
    repo_id = args.repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID") or spec["repo_id"]
    prefix = args.remote_prefix or os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX") or spec["prefix"]
    try:
        if args.train_shards < 0:
            raise FetchError(f"--train-shards={args.train_shards}: must be >= 0")
        fetch = folder_fetcher(args.hub_dir) if args.hub_dir else hub_fetcher(repo_id)
        result = download(args.variant, args.train_shards, args.out, fetch, prefix, args.skip_manifest)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 2
    print(f"fineweb {args.variant}: {result['val_shards']} val + {result['train_shards']} train shards in "
          f"{result['path']} ({result['downloaded']} downloaded, {result['kept']} already present)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

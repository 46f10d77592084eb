"""Download the challenge's published FineWeb shards and tokenizers.

    python data/fineweb.py --variant sp1024|sp8192 [--train-shards N] [--out DIR]
                           [--repo-id ID] [--remote-prefix PREFIX] [--hub-dir DIR]

Remote layout, in a Hugging Face *dataset* repo, under PREFIX:
    PREFIX/manifest.json
    PREFIX/datasets/fineweb10B_<variant>/fineweb_{val,train}_NNNNNN.bin
    PREFIX/tokenizers/<the files the manifest names for the variant's tokenizer>
Local layout, under --out (default: this script's folder, i.e. ./data from the repo root):
    manifest.json, datasets/fineweb10B_<variant>/, tokenizers/

Where each variant lives (repo id, prefix; flags win over env vars, which win over these):
    sp1024  willdepueoai/parameter-golf, "datasets"  (the challenge's own)
    sp8192  kevclark/parameter-golf, "datasets"      (published by the community)
    env: MATCHED_FINEWEB_REPO_ID, MATCHED_FINEWEB_REMOTE_ROOT_PREFIX (as the challenge's script)
The sp8192 entry is what public run instructions use (the challenge's downloader with only
MATCHED_FINEWEB_REPO_ID=kevclark/parameter-golf, giving datasets/fineweb10B_sp8192/ and
tokenizers/fineweb_8192_bpe.model); its manifest was not read from here, hence the overrides.

The manifest decides what is fetched: every validation shard, the first --train-shards training
shards (default 80, capped at the number it lists) and the tokenizer files it names. It is
fetched afresh on every run and never read from an earlier download, so a manifest cached from
another repo (the challenge's known pitfall) cannot choose the files.

Every file arrives under a temporary name and is renamed into place only when complete; a shard
must also pass the header check (magic, version, size = 1024 + 2 x declared tokens), else it is
deleted and the run fails naming it. Shards already present with a valid header are kept, as are
tokenizer files already present.

Downloads go through huggingface_hub (in requirements.txt), after one connection to the hub
(HF_ENDPOINT) that fails within seconds on a machine without network, naming the command to run
elsewhere and the folders to copy here. Each shard fetched prints a progress line. --hub-dir reads
the same remote layout from a local folder instead: a mirror, or a test's fake hub. Errors are one
line on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import sys
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

VARIANTS = {
    "sp1024": {"repo_id": "willdepueoai/parameter-golf", "prefix": "datasets"},
    "sp8192": {"repo_id": "kevclark/parameter-golf", "prefix": "datasets"},
}
REPO_ENV = "MATCHED_FINEWEB_REPO_ID"
PREFIX_ENV = "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"
DEFAULT_TRAIN_SHARDS = 80
HUB_STAGING = ".hub-download"  # huggingface_hub's working folder under --out, gone after success
PROBE_SECONDS = 5.0  # without network, say so at once instead of after the hub client's retries

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_BYTES = 256 * 4


class FetchError(Exception):
    """A download that cannot go on: one line on stderr, exit code 2."""


# ----------------------------------------------------------------------------------------------
# Fetchers: fetch(remote_path, target) puts the remote file's bytes at `target`
# ----------------------------------------------------------------------------------------------

def hub_fetcher(repo_id: str, staging: Path, variant: str, out: Path):
    """Fetches from a Hugging Face dataset repo. Files are downloaded into `staging` (beside the
    data, so the final rename does not copy) rather than the global HF cache, which would hold a
    second copy of every shard."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise FetchError("huggingface_hub is not installed: pip install huggingface_hub") from None
    reach_hub(constants.ENDPOINT, variant, out)

    def fetch(remote: str, target: Path) -> None:
        try:
            got = hf_hub_download(repo_id=repo_id, filename=remote, repo_type="dataset", local_dir=staging)
        except Exception as e:  # the hub raises HTTP, auth, not-found and network errors of many classes
            message = str(e).strip().splitlines()
            raise FetchError(f"{repo_id}: {remote}: {e.__class__.__name__}"
                             + (f": {message[0]}" if message else "")) from None
        os.replace(got, target)

    return fetch


def reach_hub(endpoint: str, variant: str, out: Path) -> None:
    """Opens and closes one connection to the hub, so that a machine without network (a GPU box
    often has none) learns it in seconds, with what to do instead."""
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=PROBE_SECONDS).close()
    except OSError as e:
        raise FetchError(f"cannot reach {endpoint} ({e.strerror or e}): on a machine with network run "
                         f"`python data/fineweb.py --variant {variant} --out DIR`, then copy DIR/datasets and "
                         f"DIR/tokenizers into {out.resolve()}/") from None


def folder_fetcher(hub_dir: Path):
    """Fetches from a local folder laid out as the remote repo."""

    def fetch(remote: str, target: Path) -> None:
        source = hub_dir / remote
        if not source.is_file():
            raise FetchError(f"{source}: not in the hub folder")
        shutil.copyfile(source, target)

    return fetch


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------

def shard_problem(path: Path) -> str | None:
    """Why the file at `path` is not a valid shard, or None if its header and size agree."""
    size = path.stat().st_size
    if size < SHARD_HEADER_BYTES:
        return f"{size} bytes, shorter than the {SHARD_HEADER_BYTES}-byte header"
    with open(path, "rb") as f:
        magic, version, count = struct.unpack("<3i", f.read(12))
    if magic != SHARD_MAGIC:
        return f"magic {magic}, expected {SHARD_MAGIC}"
    if version != SHARD_VERSION:
        return f"version {version}, expected {SHARD_VERSION}"
    if count < 0 or size != SHARD_HEADER_BYTES + 2 * count:
        return f"header declares {count} tokens ({SHARD_HEADER_BYTES + 2 * count} bytes) but the file has {size}"
    return None


def tokenizer_artifact(path) -> PurePosixPath:
    """A tokenizer file the manifest names, refused unless it stays inside tokenizers/, since the
    same relative path is used on this machine."""
    relative = PurePosixPath(str(path))
    if relative.is_absolute() or relative.parts[:1] != ("tokenizers",) or ".." in relative.parts:
        raise FetchError(f"manifest: tokenizer file {path!r} is not under tokenizers/")
    return relative


# ----------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------

def load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FetchError(f"{path}: not valid JSON") from None
    if not isinstance(manifest, dict):
        raise FetchError(f"{path}: not a JSON object")
    return manifest


def named_entry(manifest: dict, section: str, name: str) -> dict:
    for entry in manifest.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            return entry
    raise FetchError(f"manifest: no {section} entry named {name!r}")


def dataset_plan(manifest: dict, dataset: str) -> tuple[int, int, list[PurePosixPath]]:
    """(validation shards, training shards available, tokenizer files) that the manifest lists
    for `dataset`, in the challenge's manifest format."""
    entry = named_entry(manifest, "datasets", dataset)
    stats = entry.get("stats") or {}
    counts = [stats.get("files_val"), stats.get("files_train")]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise FetchError(f"manifest: {dataset} has no shard counts (stats.files_val / stats.files_train)")
    tokenizer = named_entry(manifest, "tokenizers", entry.get("tokenizer_name"))
    files = [tokenizer_artifact(tokenizer[key]) for key in ("model_path", "vocab_path", "path") if tokenizer.get(key)]
    if not files:
        raise FetchError(f"manifest: tokenizer {tokenizer['name']!r} names no files")
    return counts[0], counts[1], files


# ----------------------------------------------------------------------------------------------
# Downloading
# ----------------------------------------------------------------------------------------------

def fetch_file(fetch, remote: str, destination: Path, check=None) -> None:
    """Fetches under a temporary name, checks, then renames into place: a failed or refused
    download never leaves a file under the final name."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(f".{destination.name}.part")
    try:
        fetch(remote, part)
        problem = check(part) if check else None
        if problem:
            raise FetchError(f"{remote}: not a valid shard: {problem}")
        os.replace(part, destination)
    finally:
        part.unlink(missing_ok=True)


def valid_shard_present(path: Path) -> bool:
    return path.is_file() and shard_problem(path) is None


def download(variant: str, train_shards: int, out: Path, fetch, prefix: str, log=print) -> dict:
    """Fetches the manifest, then the shards and tokenizer files it lists that are not already
    here and valid. Returns what was done."""
    def remote(relative) -> str:
        return f"{prefix}/{relative}" if prefix else str(relative)

    dataset = f"fineweb10B_{variant}"
    fetch_file(fetch, remote("manifest.json"), out / "manifest.json")
    val_shards, available, tokenizer_files = dataset_plan(load_manifest(out / "manifest.json"), dataset)
    if train_shards > available:
        log(f"{dataset}: the manifest lists {available} training shards, fetching all of them "
            f"(asked for {train_shards})")
        train_shards = available
    shards = [f"fineweb_val_{i:06d}.bin" for i in range(val_shards)]
    shards += [f"fineweb_train_{i:06d}.bin" for i in range(train_shards)]
    fetched, kept = 0, 0
    for number, name in enumerate(shards, 1):
        local = out / "datasets" / dataset / name
        if valid_shard_present(local):
            kept += 1
            continue
        start = time.perf_counter()
        fetch_file(fetch, remote(f"datasets/{dataset}/{name}"), local, check=shard_problem)
        fetched += 1
        megabytes = local.stat().st_size / 1e6
        log(f"shard {number}/{len(shards)}: fetched {local} ({megabytes:.0f} MB, "
            f"{megabytes / max(time.perf_counter() - start, 1e-6):.0f} MB/s)")
    for relative in tokenizer_files:
        if not (out / relative).is_file():
            fetch_file(fetch, remote(relative), out / relative)
            log(f"fetched {out / relative}")
    return {"dataset": str(out / "datasets" / dataset), "val_shards": val_shards, "train_shards": train_shards,
            "fetched": fetched, "kept": kept, "tokenizer": str(out / tokenizer_files[0])}


def source_for(variant: str, repo_id: str | None, prefix: str | None) -> tuple[str, str]:
    """Where a variant is fetched from: the flag, else the challenge's env var, else the default."""
    defaults = VARIANTS[variant]
    repo = repo_id or os.environ.get(REPO_ENV) or defaults["repo_id"]
    if prefix is None:
        prefix = os.environ.get(PREFIX_ENV, defaults["prefix"])
    return repo, prefix.strip("/")


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Download the challenge's FineWeb shards and tokenizers.")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sp1024", help="tokenizer family (sp1024)")
    parser.add_argument("--train-shards", type=int, default=DEFAULT_TRAIN_SHARDS, metavar="N",
                        help="training shards of 100M tokens to fetch, capped by the manifest "
                             f"({DEFAULT_TRAIN_SHARDS})")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, metavar="DIR",
                        help="local root: DIR/datasets/, DIR/tokenizers/, DIR/manifest.json (this script's folder)")
    parser.add_argument("--repo-id", metavar="ID",
                        help=f"Hugging Face dataset repo (default per variant, or ${REPO_ENV})")
    parser.add_argument("--remote-prefix", metavar="PREFIX",
                        help=f"folder of the layout inside the repo (default per variant, or ${PREFIX_ENV})")
    parser.add_argument("--hub-dir", type=Path, metavar="DIR", help="read the remote layout from this local folder")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    repo_id, prefix = source_for(args.variant, args.repo_id, args.remote_prefix)
    staging = args.out / HUB_STAGING
    try:
        if args.train_shards < 0:
            raise FetchError(f"--train-shards={args.train_shards}: must be at least 0")
        fetch = folder_fetcher(args.hub_dir) if args.hub_dir else hub_fetcher(repo_id, staging, args.variant, args.out)
        result = download(args.variant, args.train_shards, args.out, fetch, prefix)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the local side: permissions, a full disk
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    shutil.rmtree(staging, ignore_errors=True)
    source = args.hub_dir or f"{repo_id}/{prefix}"
    print(f"{args.variant} from {source}: {result['val_shards']} val + {result['train_shards']} train shards in "
          f"{result['dataset']} ({result['fetched']} fetched, {result['kept']} already present); "
          f"tokenizer {result['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

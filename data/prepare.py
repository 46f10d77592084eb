"""Text into the challenge's shards: documents -> sentencepiece tokens -> *_val_*.bin / *_train_*.bin.

    python data/prepare.py --input FILE... --out DIR [--tokenizer MODEL | --vocab-size N]
                           [--val-docs N] [--doc-sep SEP] [--shard-tokens N]

Inputs are .txt (documents separated by blank lines, or by --doc-sep), .jsonl (one document a
line, in its "text" field) or .gz of either. As the challenge does: NUL becomes a space, each
document is stripped, empty documents are skipped. The first --val-docs documents are the
validation split; the tokenizer, when trained here, sees only the training documents. Every
document is prefixed with BOS (id 1). Writes DIR/meta.json (and DIR/tokenizer.model when trained).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

MAGIC, VERSION, HEADER_INTS = 20240520, 1, 256
BOS_ID = 1
SPACE_PIECE = "\u2581"
ENCODE_BATCH = 1024  # documents handed to sentencepiece at once: bounded memory, few calls
TOKENIZER_MAX_LINES = 2_000_000  # lines of training text the tokenizer is trained on


class PrepareError(Exception):
    """Bad input: reported as one line, exit code 2."""


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """One shard in the challenge's format, written to a temp file and renamed into place."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) >= 2**31:
        raise ValueError(f"a shard holds a 1-D array of fewer than 2**31 tokens, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > 65535):
        raise ValueError("token ids must fit in uint16 (vocab <= 65,536)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, len(tokens))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes files private; shards are not
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------

def open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def input_kind(path: Path) -> str:
    name = path.name[:-3] if path.suffix == ".gz" else path.name
    for kind in ("jsonl", "txt"):
        if name.endswith("." + kind):
            return kind
    raise PrepareError(f"{path}: unknown input type (expected .txt, .jsonl or .gz of either)")


def jsonl_documents(path: Path):
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise PrepareError(f"{path}:{number}: not valid JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise PrepareError(f"{path}:{number}: no string \"text\" field")
            yield record["text"], record.get("entropy_bits")


def txt_documents(path: Path, separator: str | None):
    with open_text(path) as f:
        text = f.read()
    if separator is None:
        pieces, current = [], []
        for line in text.split("\n"):
            if line.strip():
                current.append(line)
            elif current:
                pieces.append("\n".join(current))
                current = []
        pieces.append("\n".join(current))
    else:
        pieces = text.split(separator)
    for piece in pieces:
        yield piece, None


def documents(paths: list[Path], separator: str | None):
    """(text, entropy_bits or None) for every non-empty document, in input order."""
    for path in paths:
        if not path.is_file():
            raise PrepareError(f"{path}: no such input file")
        kind = input_kind(path)
        try:
            source = jsonl_documents(path) if kind == "jsonl" else txt_documents(path, separator)
            for text, bits in source:
                text = text.replace("\x00", " ").strip()
                if text:
                    yield text, bits
        except (UnicodeDecodeError, OSError, EOFError, gzip.BadGzipFile) as e:
            raise PrepareError(f"{path}: cannot read ({e.__class__.__name__})") from None


def decode_separator(raw: str | None) -> str | None:
    if raw is None:
        return None
    sep = raw.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    if not sep:
        raise PrepareError("--doc-sep: must not be empty")
    return sep


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def training_lines(docs, val_docs: int):
    """Lines of the training documents only: the validation split never shapes the tokenizer."""
    count = 0
    for index, (text, _) in enumerate(docs):
        if index < val_docs:
            continue
        for line in text.split("\n"):
            if line.strip():
                yield line
                count += 1
                if count >= TOKENIZER_MAX_LINES:
                    return


def train_tokenizer(lines, out_dir: Path, vocab_size: int) -> Path:
    """A BPE tokenizer with the challenge's settings, written as out_dir/tokenizer.model."""
    import sentencepiece as spm

    prefix = out_dir / "tokenizer"
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.999, byte_fallback=True, split_digits=True, normalization_rule_name="nmt_nfkc",
        add_dummy_prefix=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
        shuffle_input_sentence=False, max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
    return prefix.with_suffix(".model")


def load_tokenizer(path: Path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        raise PrepareError(f"{path}: not a sentencepiece model") from None
    if sp.vocab_size() > 65536:
        raise PrepareError(f"{path}: vocabulary of {sp.vocab_size()} does not fit uint16 shards (max 65,536)")
    if sp.bos_id() != BOS_ID:
        raise PrepareError(f"{path}: BOS must be id {BOS_ID} (the challenge's), this tokenizer has {sp.bos_id()}")
    if sp.PieceToId(SPACE_PIECE) == sp.unk_id():
        raise PrepareError(f"{path}: no standalone '{SPACE_PIECE}' piece, so bits per byte could not be counted")
    return sp


# ----------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------

class ShardWriter:
    """Buffers one split's tokens and writes numbered shards of at most `shard_tokens`."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0
        self.index = 0

    def add(self, tokens: np.ndarray):
        self.buffer.append(tokens)
        self.buffered += len(tokens)
        while self.buffered >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def flush(self, count: int | None = None):
        if not self.buffered:
            return
        joined = np.concatenate(self.buffer)
        count = len(joined) if count is None else count
        write_shard(self.out_dir / f"fineweb_{self.split}_{self.index:06d}.bin", joined[:count])
        self.index += 1
        self.written += count
        self.buffer = [joined[count:]] if count < len(joined) else []
        self.buffered = len(joined) - count


def batched(iterable, size: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_into(stage: Path, sp, docs, val_docs: int, shard_tokens: int) -> dict:
    """Encodes every document into the two splits' shards; returns the counts for meta.json."""
    writers = {"val": ShardWriter(stage, "val", shard_tokens), "train": ShardWriter(stage, "train", shard_tokens)}
    stats = {"val_docs": 0, "train_docs": 0, "val_utf8_bytes": 0}
    val_bits = []
    index = 0
    for batch in batched(docs, ENCODE_BATCH):
        for (text, bits), ids in zip(batch, sp.encode([text for text, _ in batch])):
            split = "val" if index < val_docs else "train"
            writers[split].add(np.array([BOS_ID] + ids, dtype=np.uint16))
            stats[f"{split}_docs"] += 1
            if split == "val":
                stats["val_utf8_bytes"] += len(text.encode("utf-8"))
                val_bits.append(bits)
            index += 1
    for writer in writers.values():
        writer.flush()
    if stats["train_docs"] == 0:
        raise PrepareError(f"only {index} documents: need more than --val-docs={val_docs} so training gets some")
    stats["val_tokens"], stats["train_tokens"] = writers["val"].written, writers["train"].written
    if all(isinstance(bits, (int, float)) for bits in val_bits):
        stats["val_entropy_bits"] = float(sum(val_bits))
    return stats


def prepare(inputs: list[Path], out_dir: Path, tokenizer: Path | None, vocab_size: int | None, val_docs: int,
            separator: str | None, shard_tokens: int) -> dict:
    """Builds everything in a staging folder beside `out_dir`, then moves the files in: a failure
    leaves no half-written shard or meta.json under a final name."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out_dir, prefix=".prepare-"))
    try:
        if tokenizer is None:
            model_path = train_tokenizer(training_lines(documents(inputs, separator), val_docs), stage, vocab_size)
        else:
            model_path = tokenizer
        sp = load_tokenizer(model_path)
        stats = tokenize_into(stage, sp, documents(inputs, separator), val_docs, shard_tokens)
        final_model = out_dir / "tokenizer.model" if tokenizer is None else tokenizer.resolve()
        meta = {**stats, "vocab_size": sp.vocab_size(), "tokenizer": str(final_model.resolve()),
                "inputs": [str(p) for p in inputs]}
        (stage / "meta.json").write_text(json.dumps(meta, indent=2))
        for stale in list(out_dir.glob("*_train_*.bin")) + list(out_dir.glob("*_val_*.bin")):
            stale.unlink()
        for name in sorted(p.name for p in stage.iterdir() if p.name != "meta.json"):
            os.replace(stage / name, out_dir / name)
        os.replace(stage / "meta.json", out_dir / "meta.json")
        return meta
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Turn text into the challenge's token shards.")
    parser.add_argument("--input", nargs="+", required=True, type=Path, help=".txt / .jsonl / .gz files")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, help="an existing sentencepiece .model")
    source.add_argument("--vocab-size", type=int, help="train a BPE tokenizer of this size on the training docs")
    parser.add_argument("--val-docs", type=int, default=1000, help="first N documents are validation (1000)")
    parser.add_argument("--doc-sep", help="document separator in .txt input (backslash escapes understood)")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens a shard (100,000,000)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.vocab_size is not None and not 260 <= args.vocab_size <= 65536:
            raise PrepareError(f"--vocab-size={args.vocab_size}: must be between 260 and 65,536")
        if args.val_docs < 1:
            raise PrepareError(f"--val-docs={args.val_docs}: must be at least 1")
        if args.shard_tokens < 1:
            raise PrepareError(f"--shard-tokens={args.shard_tokens}: must be at least 1")
        if args.tokenizer is not None and not args.tokenizer.is_file():
            raise PrepareError(f"{args.tokenizer}: tokenizer not found")
        meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_docs,
                       decode_separator(args.doc_sep), args.shard_tokens)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else e.__class__.__name__}", file=sys.stderr)
        return 2
    print(f"prepared {args.out}: {meta['train_docs']} train docs / {meta['train_tokens']} tokens, "
          f"{meta['val_docs']} val docs / {meta['val_tokens']} tokens, vocab {meta['vocab_size']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

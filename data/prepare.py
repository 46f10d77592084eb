"""Turn text into the challenge's token shards, and own the one shard writer of the project.

    python data/prepare.py --input FILE... --out DIR [--tokenizer MODEL | --vocab-size N]
                           [--val-docs N] [--doc-sep SEP] [--shard-tokens N]

Inputs, read as a stream one document at a time:
  .txt    documents separated by blank lines, or by --doc-sep (backslash escapes such as \\n are
          understood, e.g. --doc-sep '\\n---\\n' or --doc-sep '<|endoftext|>'); the text is kept
          byte for byte, line endings included
  .jsonl  one JSON object a line; its "text" is the document, a numeric "entropy_bits" is summed
          over the validation documents when every one of them carries it
  .gz     either of the above, compressed
As the challenge does, NUL becomes a space, each document is stripped and empty ones are skipped.

Split: the first --val-docs documents (default 1000) are validation, the rest training. The
challenge fixes its validation set the same way (its first 50,000 documents); 1000 is enough
text for a steady bits-per-byte figure on small corpora while leaving most of them to train on.

Tokenizer: --tokenizer uses a given sentencepiece model; --vocab-size N trains a BPE one with the
challenge's settings on the training documents only (at most TOKENIZER_TRAIN_CHARS characters of
them, in order, so training is deterministic and bounded) and writes DIR/tokenizer.model/.vocab.
"\u2581" is forced into a trained vocabulary (sentencepiece's required_chars) and a given model
without it is refused: bits per byte give every standalone space one byte through that piece.

Output: DIR/fineweb_val_NNNNNN.bin, DIR/fineweb_train_NNNNNN.bin (--shard-tokens tokens each,
default 100,000,000 as the challenge's), every document prefixed with BOS (id 1), no EOS; and
DIR/meta.json (token, document and byte counts, vocab size, absolute tokenizer path). Everything
is built in a hidden folder inside DIR and renamed into place once complete, meta.json last, so
an error leaves no half-written file under a final name; shards of an earlier run in DIR that
this run does not replace are removed, so DIR never mixes two preparations.

Bad input (missing or unreadable file, unknown extension, bad JSON line, a tokenizer that does
not load or lacks "\u2581", too few documents, ...) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import codecs
import gzip
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import zlib
from functools import partial
from itertools import chain
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
MAX_SHARD_TOKENS = 2**31 - 1  # the header's token count is an int32
MAX_VOCAB = 65536  # tokens are stored as uint16
BOS_ID = 1
SPACE_PIECE = "\u2581"
BYTE_FALLBACK_PIECES = 256
SPECIAL_PIECES = 4  # pad, bos, eos, unk

DEFAULT_VAL_DOCS = 1000
DEFAULT_SHARD_TOKENS = 100_000_000
TOKENIZER_TRAIN_CHARS = 50_000_000  # sentencepiece holds all its training text in memory
TOKENIZER_THREADS = 4
ENCODE_BATCH_DOCS = 512  # documents handed to sentencepiece at once: few calls, bounded memory
READ_CHUNK_CHARS = 1 << 20
ESCAPE = re.compile(r"\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[\\abfnrtv0'\"])")


class PrepareError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else error.__class__.__name__


# ----------------------------------------------------------------------------------------------
# Shard writing
# ----------------------------------------------------------------------------------------------

def atomic_write(path: Path, chunks) -> None:
    """Writes the byte chunks under a temporary name beside `path`, then renames it into place, so
    a reader sees the previous file or the complete new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_shard(path: str | Path, tokens) -> None:
    """Writes one shard in the challenge's format: 256 little-endian int32 (magic, version, token
    count, zeros) then the tokens as little-endian uint16."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"a shard holds a 1-D array of token ids, got shape {tokens.shape}")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, got {len(tokens)}")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= MAX_VOCAB):
        raise ValueError(f"token ids must lie in [0, {MAX_VOCAB}) to fit uint16, got "
                         f"{int(tokens.min())}..{int(tokens.max())}")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    body = np.ascontiguousarray(tokens.astype("<u2", copy=False))
    atomic_write(Path(path), [header.tobytes(), body])


class ShardWriter:
    """Cuts one split's token stream into numbered shards of exactly `shard_tokens` (the last one
    shorter); documents straddle shard boundaries as in the challenge's shards."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.pending_tokens += len(tokens)
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self.write(stream[:self.shard_tokens])
            self.pending = [stream[self.shard_tokens:]]
            self.pending_tokens = len(stream) - self.shard_tokens

    def close(self) -> None:
        if self.pending_tokens:
            self.write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def write(self, tokens: np.ndarray) -> None:
        write_shard(self.folder / f"fineweb_{self.split}_{self.shards:06d}.bin", tokens)
        self.shards += 1
        self.tokens += len(tokens)


# ----------------------------------------------------------------------------------------------
# Reading documents
# ----------------------------------------------------------------------------------------------

def input_kind(path: Path) -> str:
    name = path.name[:-len(".gz")] if path.name.endswith(".gz") else path.name
    for kind in ("txt", "jsonl"):
        if name.endswith("." + kind):
            return kind
    raise PrepareError(f"{path}: unknown input type (expected .txt, .jsonl, .txt.gz or .jsonl.gz)")


def check_inputs(paths: list[Path]) -> None:
    """Refuses a missing file or an unknown type before any work is done."""
    for path in paths:
        if not path.is_file():
            raise PrepareError(f"{path}: no such input file")
        input_kind(path)


def open_text(path: Path, newline: str | None):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)
    return open(path, encoding="utf-8", newline=newline)


def split_on_blank_lines(lines):
    document: list[str] = []
    for line in lines:
        if line.strip():
            document.append(line)
        elif document:
            yield "".join(document)
            document = []
    if document:
        yield "".join(document)


def split_on_separator(chunks, separator: str):
    """Splits a stream of text chunks on `separator` without ever holding more than the current
    document plus one chunk, and without rescanning a long document for every chunk."""
    parts: list[str] = []
    carry = ""  # the end of the text read so far, where a separator may begin
    for chunk in chunks:
        pieces = (carry + chunk).split(separator)
        if len(pieces) == 1:
            keep = max(0, len(pieces[0]) - len(separator) + 1)
            parts.append(pieces[0][:keep])
            carry = pieces[0][keep:]
            continue
        parts.append(pieces[0])
        yield "".join(parts)
        yield from pieces[1:-1]
        parts, carry = [], pieces[-1]
    yield "".join(parts) + carry


def txt_documents(path: Path, separator: str | None):
    # newline="" keeps line endings as written, so validation bytes are the file's own
    with open_text(path, newline="") as f:
        if separator is None:
            yield from split_on_blank_lines(f)
        else:
            yield from split_on_separator(iter(partial(f.read, READ_CHUNK_CHARS), ""), separator)


def entropy_of(record: dict) -> float | None:
    bits = record.get("entropy_bits")
    if isinstance(bits, bool) or not isinstance(bits, (int, float)):
        return None
    return float(bits)


def jsonl_documents(path: Path):
    """(text, entropy_bits or None) for each line; a blank line (e.g. a trailing one) is no document."""
    with open_text(path, newline=None) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise PrepareError(f"{path}:{number}: no \"text\" string")
            yield text, entropy_of(record)


def file_documents(path: Path, separator: str | None):
    """One input file's raw (text, entropy_bits or None), its read and decode failures turned into
    one-line errors."""
    if input_kind(path) == "jsonl":
        source = jsonl_documents(path)
    else:
        source = ((text, None) for text in txt_documents(path, separator))
    try:
        yield from source
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError, zlib.error) as e:
        raise PrepareError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None


def documents(paths: list[Path], separator: str | None):
    """(text, entropy_bits or None) of every document of every input, in order, cleaned as the
    challenge cleans them."""
    for path in paths:
        for text, bits in file_documents(path, separator):
            text = text.replace("\x00", " ").strip()
            if text:
                yield text, bits


def decode_separator(raw: str) -> str:
    """--doc-sep with its backslash escapes resolved; other characters, non-ASCII ones included,
    are taken as they are."""
    try:
        separator = ESCAPE.sub(lambda m: codecs.decode(m.group(0), "unicode_escape"), raw)
    except UnicodeDecodeError:
        raise PrepareError(f"--doc-sep {raw!r}: invalid escape") from None
    if not separator:
        raise PrepareError("--doc-sep: must not be empty")
    return separator


def too_few_documents(count: int, val_docs: int) -> PrepareError:
    return PrepareError(f"only {count} documents in the input: need more than --val-docs={val_docs} "
                        f"(the first {val_docs} are validation, training needs at least one)")


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def tokenizer_training_text(docs, val_docs: int, budget: int) -> list[str]:
    """The training documents, in order, up to `budget` characters: validation text never shapes
    the tokenizer, and the cap bounds the trainer's time and memory."""
    texts, used, seen = [], 0, 0
    for text, _ in docs:
        seen += 1
        if seen <= val_docs:
            continue
        texts.append(text[:budget - used])
        used += len(texts[-1])
        if used >= budget:
            break
    if not texts:
        raise too_few_documents(seen, val_docs)
    return texts


def train_tokenizer(texts: list[str], prefix: Path, vocab_size: int) -> Path:
    """A BPE model with the challenge's trainer settings, one document a sentence as it trains
    them, with "\u2581" forced into the vocabulary. Writes prefix.model and prefix.vocab."""
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=str(prefix), vocab_size=vocab_size,
            model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
            normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
            pad_id=0, bos_id=BOS_ID, eos_id=2, unk_id=3, hard_vocab_limit=False,
            required_chars=SPACE_PIECE, max_sentence_length=4 * TOKENIZER_TRAIN_CHARS,
            num_threads=TOKENIZER_THREADS, minloglevel=2)
    except RuntimeError as e:
        raise PrepareError(f"tokenizer training failed: {first_line(e)}") from None
    return prefix.with_suffix(".model")


def trained_tokenizer(docs, val_docs: int, vocab_size: int, prefix: Path):
    """Trains on the training split and loads the result; the training text is released on return,
    before the encoding pass."""
    texts = tokenizer_training_text(docs, val_docs, TOKENIZER_TRAIN_CHARS)
    return load_shard_tokenizer(train_tokenizer(texts, prefix, vocab_size))


def load_shard_tokenizer(path: Path):
    """The sentencepiece model at `path`, refused unless its ids fit the shards, its BOS is the
    challenge's and it has the standalone "\u2581" piece bits per byte need."""
    import sentencepiece as spm

    if not path.is_file():
        raise PrepareError(f"{path}: tokenizer not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError):
        raise PrepareError(f"{path}: not a sentencepiece model") from None
    if sp.vocab_size() > MAX_VOCAB:
        raise PrepareError(f"{path}: vocabulary of {sp.vocab_size()} does not fit uint16 shards "
                           f"(at most {MAX_VOCAB:,})")
    if sp.bos_id() != BOS_ID:
        raise PrepareError(f"{path}: BOS is id {sp.bos_id()}, the shards need id {BOS_ID}")
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        raise PrepareError(f"{path}: no standalone \"{SPACE_PIECE}\" piece, so spaces would be "
                           f"byte-fallback tokens and bits per byte would be wrong")
    return sp


# ----------------------------------------------------------------------------------------------
# Tokenizing into shards
# ----------------------------------------------------------------------------------------------

def split_batches(docs, val_docs: int, size: int):
    """("val" | "train", documents) batches in input order, never mixing the two splits."""
    batch, split = [], "val"
    for index, doc in enumerate(docs):
        doc_split = "val" if index < val_docs else "train"
        if batch and (doc_split != split or len(batch) == size):
            yield split, batch
            batch = []
        split = doc_split
        batch.append(doc)
    if batch:
        yield split, batch


def with_bos(id_lists: list[list[int]]) -> np.ndarray:
    return np.fromiter(chain.from_iterable(chain((BOS_ID,), ids) for ids in id_lists), dtype=np.uint16)


def tokenize_to_shards(sp, docs, val_docs: int, folder: Path, shard_tokens: int) -> dict:
    """Encodes every document into the two splits' shards in `folder`; returns meta.json's counts."""
    writers = {split: ShardWriter(folder, split, shard_tokens) for split in ("val", "train")}
    counts = {"val": 0, "train": 0}
    val_bytes, val_bits = 0, []
    for split, batch in split_batches(docs, val_docs, ENCODE_BATCH_DOCS):
        texts = [text for text, _ in batch]
        writers[split].add(with_bos(sp.encode(texts)))
        counts[split] += len(batch)
        if split == "val":
            val_bytes += sum(len(text.encode("utf-8")) for text in texts)
            val_bits += [bits for _, bits in batch]
    if counts["train"] == 0:
        raise too_few_documents(counts["val"], val_docs)
    for writer in writers.values():
        writer.close()
    stats = {"train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens,
             "train_docs": counts["train"], "val_docs": counts["val"], "val_utf8_bytes": val_bytes,
             "train_shards": writers["train"].shards, "val_shards": writers["val"].shards}
    if all(bits is not None for bits in val_bits):
        stats["val_entropy_bits"] = sum(val_bits)
    return stats


# ----------------------------------------------------------------------------------------------
# The whole preparation
# ----------------------------------------------------------------------------------------------

def publish(stage: Path, out_dir: Path) -> None:
    """Moves the staged files to their final names, meta.json last so that its presence means a
    complete set; shards of an earlier run that this one does not replace are removed."""
    (out_dir / "meta.json").unlink(missing_ok=True)
    staged = {p.name for p in stage.iterdir()}
    for old in chain(out_dir.glob("*_train_*.bin"), out_dir.glob("*_val_*.bin")):
        if old.name not in staged:
            old.unlink()
    for name in sorted(staged - {"meta.json"}):
        os.replace(stage / name, out_dir / name)
    os.replace(stage / "meta.json", out_dir / "meta.json")


def prepare(inputs: list[Path], out_dir: Path, tokenizer: Path | None, vocab_size: int | None,
            val_docs: int, separator: str | None, shard_tokens: int) -> dict:
    """Builds tokenizer, shards and meta.json in a staging folder inside `out_dir`, then publishes
    them; the staging folder goes away whatever happens. Returns meta.json's content."""
    check_inputs(inputs)
    sp = load_shard_tokenizer(tokenizer) if tokenizer is not None else None
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    try:
        model = tokenizer.resolve() if tokenizer is not None else out_dir.resolve() / "tokenizer.model"
        if sp is None:
            sp = trained_tokenizer(documents(inputs, separator), val_docs, vocab_size, stage / "tokenizer")
        stats = tokenize_to_shards(sp, documents(inputs, separator), val_docs, stage, shard_tokens)
        model_bytes = (tokenizer if tokenizer is not None else stage / "tokenizer.model").read_bytes()
        # The trainer refuses another tokenizer with these shards: its byte counts would be another text's.
        meta = {**stats, "vocab_size": sp.vocab_size(), "tokenizer": str(model), "bos_id": BOS_ID,
                "tokenizer_sha256": hashlib.sha256(model_bytes).hexdigest(), "inputs": [str(p.resolve()) for p in inputs]}
        atomic_write(stage / "meta.json", [json.dumps(meta, indent=2).encode() + b"\n"])
        publish(stage, out_dir)
        return meta
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is the same single stderr line as every other error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv):
    parser = OneLineParser(description="Turn text into the challenge's token shards.")
    parser.add_argument("--input", nargs="+", action="extend", required=True, type=Path, metavar="FILE",
                        help=".txt, .jsonl, .txt.gz or .jsonl.gz; documents are taken in the order given")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", type=Path, metavar="MODEL", help="an existing sentencepiece .model")
    source.add_argument("--vocab-size", type=int, metavar="N",
                        help="train a BPE tokenizer of N pieces on the training documents")
    parser.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS, metavar="N",
                        help=f"the first N documents are validation (default {DEFAULT_VAL_DOCS})")
    parser.add_argument("--doc-sep", metavar="SEP",
                        help="document separator in .txt input instead of blank lines (\\n etc. understood)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help=f"tokens a shard (default {DEFAULT_SHARD_TOKENS:,})")
    return parser.parse_args(argv)


def check_numbers(args) -> None:
    smallest_vocab = SPECIAL_PIECES + BYTE_FALLBACK_PIECES + 1
    if args.vocab_size is not None and not smallest_vocab <= args.vocab_size <= MAX_VOCAB:
        raise PrepareError(f"--vocab-size={args.vocab_size}: must be between {smallest_vocab} "
                           f"(specials, byte fallback, \"{SPACE_PIECE}\") and {MAX_VOCAB:,} (uint16 shards)")
    if args.val_docs < 1:
        raise PrepareError(f"--val-docs={args.val_docs}: must be at least 1")
    if not 1 <= args.shard_tokens <= MAX_SHARD_TOKENS:
        raise PrepareError(f"--shard-tokens={args.shard_tokens}: must be between 1 and {MAX_SHARD_TOKENS:,}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_numbers(args)
        separator = decode_separator(args.doc_sep) if args.doc_sep is not None else None
        meta = prepare(args.input, args.out, args.tokenizer, args.vocab_size, args.val_docs, separator,
                       args.shard_tokens)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder: permissions, a full disk
        print(f"error: {e.filename or args.out}: {e.strerror or first_line(e)}", file=sys.stderr)
        return 2
    print(f"prepared {args.out}: val {meta['val_docs']} docs / {meta['val_tokens']:,} tokens, "
          f"train {meta['train_docs']} docs / {meta['train_tokens']:,} tokens in {meta['train_shards']} "
          f"shard(s), vocab {meta['vocab_size']}, tokenizer {meta['tokenizer']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

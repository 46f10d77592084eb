"""Writes train_gpt.py in the form a submission counts: packed, a few lines that run the same program.

    python tools/pack_code.py [SOURCE] [--out PATH]

The program is the source without comments, docstrings and blank lines (removed by Python's own
tokenizer), lzma-compressed into a latin-1 string literal behind a short wrapper: see docs/outputs.md,
"Packed code". Every run of train_gpt.py reports both sizes and counts the packed one; records/make_record.py
packs the code of a record folder the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_gpt  # noqa: E402


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=ROOT / "train_gpt.py")
    parser.add_argument("--out", type=Path, default=Path("packed") / "train_gpt.py",
                        help="default: packed/train_gpt.py")
    args = parser.parse_args(argv)
    try:
        source = args.source.read_bytes()
        program = train_gpt.program_of(source)
    except (OSError, SyntaxError, UnicodeDecodeError, train_gpt.InputError) as e:
        print(f"error: {args.source}: not a readable Python source ({e})", file=sys.stderr)
        return 2
    packed = train_gpt.pack_program(program)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    train_gpt.write_atomic(args.out, packed)
    print(f"{args.out}: {len(packed)} bytes (source {len(source)} bytes, program {len(program.encode())} bytes, "
          f"program sha256 {hashlib.sha256(program.encode()).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

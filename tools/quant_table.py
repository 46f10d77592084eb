"""Bytes and round-trip bits per byte of every quantization scheme and compressor, on one trained model.

    python tools/quant_table.py CHECKPOINT [--data DIR] [--tokenizer MODEL] [--json OUT]

CHECKPOINT is a train_gpt.py checkpoint (CHECKPOINT_EVERY_STEPS / _SECONDS): it holds the full-precision
weights, which an artifact no longer does. The model is evaluated at full depth on the validation shards
of DATA_PATH (the checkpoint's, or --data), unquantized and then through the artifact round trip of each
scheme (int8, int6, mixed) and compressor (zlib, zstd), timing each export.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


def measure(path: Path, data: str | None, tokenizer: str | None) -> list[dict]:
    """The checkpoint's model assembled as its run did, on the validation shards of its DATA_PATH
    (or --data), unquantized and then through each scheme's round trip."""
    ckpt = train_gpt.load_checkpoint(path)
    saved = {f.name: ckpt["config"][f.name] for f in train_gpt.CONFIG_FIELDS.values() if f.name in ckpt["config"]}
    overrides = {"compile": "0", **({"data_path": data} if data else {}), **({"tokenizer_path": tokenizer} if tokenizer else {})}
    try:
        cfg = train_gpt.Config(**{**saved, **overrides})
    except TypeError as e:
        raise train_gpt.InputError(f"checkpoint {path}: its config does not load ({e})") from None
    rt = train_gpt.init_runtime(cfg)
    cfg, _, evaluator, _ = train_gpt.load_data(cfg, rt, train_gpt.Logger(None))
    model = train_gpt.assemble(cfg, rt).model
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise train_gpt.InputError(f"checkpoint {path}: its model does not load ({str(e).splitlines()[0]})") from None
    code = train_gpt.code_identity()["bytes_code"]  # packed, as a submission counts it
    loss, bpb = evaluator.standard(model)
    rows = [{"scheme": "none", "compressor": "-", "bytes_model": None, "bytes_total": None, "export_s": None,
             "val_loss": loss, "val_bpb": bpb, "delta_bpb": 0.0}]
    for scheme in train_gpt.QUANT_SCHEMES:
        for compressor in ("zlib", "zstd"):
            t0 = time.perf_counter()
            blob, _ = train_gpt.build_artifact(model, scheme, compressor)
            seconds = time.perf_counter() - t0
            header, tensors = train_gpt.parse_artifact(blob, f"{scheme}+{compressor}")
            rebuilt = train_gpt.model_from_artifact(header, tensors, "memory", rt.device)
            q_loss, q_bpb = evaluator.standard(rebuilt)
            rows.append({"scheme": scheme, "compressor": compressor, "bytes_model": len(blob),
                         "bytes_total": len(blob) + code, "export_s": seconds, "val_loss": q_loss, "val_bpb": q_bpb,
                         "delta_bpb": q_bpb - bpb})
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'scheme':<7} {'compressor':<10} {'bytes_model':>12} {'bytes_total':>12} {'export s':>9} "
             f"{'val_bpb':>8} {'vs fp32':>8}"]
    for r in rows:
        size = lambda v: f"{v:>12,}" if v is not None else f"{'-':>12}"  # noqa: E731
        seconds = f"{r['export_s']:>9.2f}" if r["export_s"] is not None else f"{'-':>9}"
        lines.append(f"{r['scheme']:<7} {r['compressor']:<10} {size(r['bytes_model'])} {size(r['bytes_total'])} "
                     f"{seconds} {r['val_bpb']:>8.4f} {r['delta_bpb']:>+8.4f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", help="DATA_PATH holding the validation shards (default: the checkpoint's)")
    parser.add_argument("--tokenizer", help="sentencepiece model for the byte counts (default: the checkpoint's)")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = measure(args.checkpoint, args.data, args.tokenizer)
    except train_gpt.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        train_gpt.write_atomic(args.json, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

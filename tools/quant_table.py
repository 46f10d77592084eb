"""Bytes and round-trip bits per byte of every quantization scheme and rounding, on one trained model.

    python tools/quant_table.py CHECKPOINT [--data DIR] [--tokenizer MODEL] [--lqer-rank R] [--json OUT]

CHECKPOINT is a train_gpt.py checkpoint (CHECKPOINT_EVERY_STEPS / _SECONDS): it holds the full-precision
weights, which an artifact no longer does. The model is evaluated at full depth on the validation shards
of DATA_PATH (the checkpoint's, or --data), unquantized and then through the artifact round trip of each
scheme (int8, int6, mixed, int5, int4) and rounding: the clip search, full GPTQ (Hessians from the
checkpoint's training stream after its step, QUANT_CALIB_BATCHES micro-batches), and GPTQ with a rank-R
LQER correction of 3 matrices, timing each export (the Hessians once, apart).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402


ROUNDINGS = ("clip search", "gptq", "gptq+lqer")


def measure(path: Path, data: str | None, tokenizer: str | None, lqer_rank: int = 4) -> list[dict]:
    """The checkpoint's model assembled as its run did, on the validation shards of its DATA_PATH
    (or --data), unquantized and then through each scheme's and rounding's round trip."""
    ckpt = train_gpt.load_checkpoint(path)
    saved = {f.name: ckpt["config"][f.name] for f in train_gpt.CONFIG_FIELDS.values() if f.name in ckpt["config"]}
    overrides = {"compile": "0", **({"data_path": data} if data else {}),
                 **({"tokenizer_path": tokenizer} if tokenizer else {})}
    try:
        cfg = train_gpt.Config(**{**saved, **overrides})
    except TypeError as e:
        raise train_gpt.InputError(f"checkpoint {path}: its config does not load ({e})") from None
    rt = train_gpt.init_runtime(cfg)
    cfg, stream, evaluator, _ = train_gpt.load_data(cfg, rt, train_gpt.Logger(None))
    model = train_gpt.assemble(cfg, rt).model
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise train_gpt.InputError(f"checkpoint {path}: its model does not load ({str(e).splitlines()[0]})") from None
    code = train_gpt.code_identity()["bytes_code"]  # packed, as a submission counts it
    loss, bpb = evaluator.standard(model)
    rows = [{"scheme": "none", "rounding": "-", "bytes_model": None, "bytes_total": None, "export_s": None,
             "val_loss": loss, "val_bpb": bpb, "delta_bpb": 0.0}]
    t0 = time.perf_counter()
    hessians = train_gpt.input_hessians(cfg, rt, model, stream, int(ckpt["step"]))
    hessian_s = time.perf_counter() - t0
    roundings = {"clip search": train_gpt.Rounding(), "gptq": train_gpt.Rounding(hessians),
                 "gptq+lqer": train_gpt.Rounding(hessians, lqer_rank=lqer_rank, lqer_tensors=3)}
    for scheme in train_gpt.QUANT_SCHEMES:
        for name, rounding in roundings.items():
            t0 = time.perf_counter()
            blob, _ = train_gpt.build_artifact(model, scheme, rounding=rounding)
            seconds = time.perf_counter() - t0
            header, tensors = train_gpt.parse_artifact(blob, f"{scheme}+{name}")
            rebuilt = train_gpt.model_from_artifact(header, tensors, "memory", rt.device)
            q_loss, q_bpb = evaluator.standard(rebuilt)
            rows.append({"scheme": scheme, "rounding": name, "compressor": header["compressor"],
                         "bytes_model": len(blob), "bytes_total": len(blob) + code, "export_s": seconds,
                         "hessian_s": hessian_s if rounding.hessians else None, "val_loss": q_loss, "val_bpb": q_bpb,
                         "delta_bpb": q_bpb - bpb})
    return rows


def table(rows: list[dict]) -> str:
    """One line a scheme; per rounding its model bytes and round-trip bpb over the unquantized model."""
    base = rows[0]
    lines = [f"unquantized val_bpb {base['val_bpb']:.4f}",
             f"{'scheme':<7}" + "".join(f" {name + ' bytes':>19} {'Δbpb':>8}" for name in ROUNDINGS)]
    by = {(r["scheme"], r["rounding"]): r for r in rows[1:]}
    for scheme in dict.fromkeys(r["scheme"] for r in rows[1:]):
        cells = [by[scheme, name] for name in ROUNDINGS]
        lines.append(f"{scheme:<7}" + "".join(f" {c['bytes_model']:>19,} {c['delta_bpb']:>+8.4f}" for c in cells))
    export_s = max(r["export_s"] for r in rows[1:])
    lines.append(f"export: at most {export_s:.1f}s a build; GPTQ's Hessians {rows[-1]['hessian_s']:.1f}s once")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", help="DATA_PATH holding the validation shards (default: the checkpoint's)")
    parser.add_argument("--tokenizer", help="sentencepiece model for the byte counts (default: the checkpoint's)")
    parser.add_argument("--lqer-rank", type=int, default=4, help="rank of the gptq+lqer column's corrections")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = measure(args.checkpoint, args.data, args.tokenizer, args.lqer_rank)
    except train_gpt.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    if args.json:
        train_gpt.write_atomic(args.json, json.dumps(rows, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

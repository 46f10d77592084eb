"""Training throughput of train_gpt.py's own step on random tokens, for a named shape.

    python tools/bench.py [--shape small|baseline|recurrent|flat12] [--steps N] [--warmup N] [--json FILE]
    python tools/bench.py --checkpoint [--shape baseline] [--steps N]   # time checkpoint writes instead
    python tools/bench.py --eval [--shape small] [--eval-tokens N] [--repeats R]  # evaluation methods instead
    python tools/bench.py --export [--shape baseline]   # time quantize + compress of each QUANT scheme instead
    python tools/bench.py --suite [--steps N] [--json FILE]   # every shape and evaluation method, one table
    python tools/bench.py --profile [--shape small] [--steps N]   # torch.profiler's operator table of a few steps
    python tools/bench.py --optimizer [--shape small] [--steps N]   # Muon's step: same-shape batches vs one at a time

Prints tokens/s, ms/step, peak memory, and on CUDA the MFU (model FLOPs a token = 6 x matmul
parameters + 12 x layers x dim x seq, over the dense bf16 datasheet peak of the device found, or BENCH_PEAK_TFLOPS).
Env vars override the shape (e.g. MODEL_DIM=384 python tools/bench.py)."""

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt  # noqa: E402
from data.prepare import write_shard  # noqa: E402

# Each shape is a preset of train_gpt.py (dense_ffn: the baseline, the dense control of moe_frozen).
SHAPES = {"small": "bench_cpu", "baseline": "baseline", "recurrent": "recurrent", "flat12": "recurrent_flat",
          "moe_frozen": "moe_frozen", "dense_ffn": "baseline"}
SUITE = ("baseline", "recurrent", "dense_ffn", "moe_frozen")


def shape_env(shape: str, cpu_scale: bool = False, **overrides) -> dict:
    """The shape's preset (at the CPU scale: then bench_cpu's), the overrides, then this process's env
    vars (which win)."""
    env = {"PRESET": SHAPES[shape] + (",bench_cpu" if cpu_scale else "")}
    if cpu_scale and shape == "recurrent":
        # The recurrent preset's 3 shared blocks, at the CPU width, would cost what the flat stack does.
        env["NUM_LAYERS"] = "2"
    return {**env, **overrides, **{k: v for k, v in os.environ.items() if k in train_gpt.CONFIG_FIELDS}}


def random_stream(cfg, folder: Path) -> train_gpt.TokenStream:
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=4 * cfg.train_batch_tokens + 1)
    write_shard(folder / "bench_train_000000.bin", tokens.astype(np.uint16))
    return train_gpt.TokenStream([folder / "bench_train_000000.bin"], cfg.vocab_size)


def build(shape: str, cpu_scale: bool = False, **overrides):
    """The shape's config, runtime, model (and its compiled twin when compiling), optimizers, params."""
    cfg, _ = train_gpt.load_config(shape_env(shape, cpu_scale, **overrides))
    rt = train_gpt.init_runtime(cfg)
    if rt.compile:
        # Each shape compiles afresh: all shapes share GPT.forward's code, and dynamo stops recompiling
        # one function after a few shapes, falling back to eager.
        torch._dynamo.reset()
    pieces = train_gpt.assemble(cfg, rt)
    return cfg, rt, pieces, list(pieces.model.parameters())


def profile(shape: str, steps: int, warmup: int) -> str:
    """torch.profiler's table (operators by total CPU time) over `steps` training steps after `warmup`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler
    import torch._inductor.config

    # Names each compiled CPU kernel in the table instead of one opaque "CompiledFxGraph" row.
    torch._inductor.config.cpp.enable_kernel_profile = True
    cfg, rt, pieces, params = build(shape)
    train_model, optimizers = pieces.compiled, pieces.optimizers
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.is_cuda else [])
    with tempfile.TemporaryDirectory() as tmp:
        stream = random_stream(cfg, Path(tmp))
        for step in range(warmup):
            train_gpt.train_step(cfg, rt, train_model, params, optimizers, stream, step, 1.0)
        rt.sync()
        with profiler(activities=activities) as prof:
            for step in range(warmup, warmup + steps):
                train_gpt.train_step(cfg, rt, train_model, params, optimizers, stream, step, 1.0)
            rt.sync()
    return prof.key_averages().table(sort_by="cuda_time_total" if rt.is_cuda else "cpu_time_total", row_limit=20)


def measure(shape: str, steps: int, warmup: int, cpu_scale: bool = False) -> list[dict]:
    """One row per depth: the shape's full depth, or every depth of its DEPTH_SCHEDULE."""
    cfg, rt, pieces, params = build(shape, cpu_scale)
    model, train_model, optimizers = pieces.model, pieces.compiled, pieces.optimizers
    depths = [r for r, _ in cfg.depth_phases]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stream = random_stream(cfg, Path(tmp))
        for repeats in depths:
            model.set_repeats(repeats)
            graphs_before = compiled_graphs()
            for step in range(warmup):
                train_gpt.train_step(cfg, rt, train_model, params, optimizers, stream, step, 1.0)
            rt.sync()
            if rt.is_cuda:
                torch.cuda.reset_peak_memory_stats(rt.device)
            t0 = time.perf_counter()
            for step in range(warmup, warmup + steps):
                train_gpt.train_step(cfg, rt, train_model, params, optimizers, stream, step, 1.0)
            rt.sync()
            seconds = time.perf_counter() - t0
            tokens_per_s = steps * cfg.train_batch_tokens / seconds
            rows.append({"shape": shape if len(depths) == 1 else f"{shape}@{repeats}", "device": str(rt.device),
                         "compile": rt.compile, "steps": steps, "effective_layers": cfg.num_layers * repeats,
                         "ms_per_step": 1000 * seconds / steps, "tokens_per_s": tokens_per_s,
                         "mfu": mfu(cfg, model, tokens_per_s, peak_tflops()[0]) if rt.is_cuda else None,
                         "mfu_peak": "{:g} TFLOP/s, {}".format(*peak_tflops()) if rt.is_cuda else None,
                         "peak_mem_mib": train_gpt.peak_memory_mib(rt), "params": sum(p.numel() for p in params),
                         "graphs": compiled_graphs() - graphs_before if rt.compile else None,
                         "torch_threads": torch.get_num_threads()})
    return rows


# Dense bf16 tensor-core peaks from the datasheets, by a piece of the CUDA device's name.
DATASHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                    ("A100", 312.0))


def peak_tflops() -> tuple[float, str]:
    """The peak MFU divides by, and where it comes from."""
    if "BENCH_PEAK_TFLOPS" in os.environ:
        return float(os.environ["BENCH_PEAK_TFLOPS"]), "BENCH_PEAK_TFLOPS"
    return device_peak_tflops(torch.cuda.get_device_name())


@functools.lru_cache(maxsize=None)
def device_peak_tflops(name: str) -> tuple[float, str]:
    for piece, tflops in DATASHEET_TFLOPS:
        if piece in name:
            return tflops, f"{name} datasheet dense bf16"
    return measured_matmul_tflops(), f"{name} measured 8192^3 bf16 matmul"


def measured_matmul_tflops(n: int = 8192, repeats: int = 20) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def count_matmul_params(model) -> int:
    """Matmul weights a token passes through: block matrices once per pass (of an MoE layer, the router and
    top_k experts' two matrices), and the head."""
    per_pass = sum(p.numel() for p in model.blocks.parameters() if p.ndim == 2)
    per_pass += sum(m.top_k * (m.w1[0].numel() + m.w2[0].numel()) for m in train_gpt.moe_modules(model))
    head = model.tok_emb.weight.numel() if model.lm_head is None else model.lm_head.weight.numel()
    return model.repeats * per_pass + head


def mfu(cfg, model, tokens_per_s: float, peak: float) -> float:
    """Model FLOPs utilisation at the model's current depth: 6 x matmul parameters + 12 x layers x
    dim x seq FLOPs a token, over `peak` TFLOP/s."""
    layers = cfg.num_layers * model.repeats
    flops_per_token = 6 * count_matmul_params(model) + 12 * layers * cfg.model_dim * cfg.train_seq_len
    return tokens_per_s * flops_per_token / (peak * 1e12)


def compiled_graphs() -> int:
    """Graphs of the model's forward built so far: one more per depth phase means one recompile."""
    return train_gpt.compile_report(train_gpt.Logger(None))["per_function"]["GPT.forward"]


def measure_optimizer(shape: str, repeats: int) -> dict:
    """Muon's step on the shape's matrices (random gradients) as the harness runs it, against the
    same matrices stepped one Muon per matrix (no same-shape batches), in turns; medians of `repeats`."""
    cfg, rt, pieces, _ = build(shape)
    muon = next(opt for opt in pieces.optimizers if isinstance(opt, train_gpt.Muon))
    matrices = [p for group in muon.param_groups for p in group["params"]]
    singles = [train_gpt.Muon([p], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                              weight_decay=cfg.muon_wd, ns_dtype=muon.ns_dtype, compile=rt.compile) for p in matrices]
    for p in matrices:
        p.grad = torch.randn_like(p)
    times = {"batched": [], "one_at_a_time": []}
    for i in range(repeats + 1):  # the first round warms up and is not counted
        for name, steps in (("batched", [muon]), ("one_at_a_time", singles)):
            rt.sync()
            t0 = time.perf_counter()
            for opt in steps:
                opt.step()
            rt.sync()
            if i:
                times[name].append(time.perf_counter() - t0)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    return {"shape": shape, "device": str(rt.device), "matrices": len(matrices),
            "batches": len(muon.shape_batches(matrices)), "batched_ms": 1000 * median["batched"],
            "one_at_a_time_ms": 1000 * median["one_at_a_time"],
            "speedup": median["one_at_a_time"] / median["batched"]}


def measure_checkpoint(shape: str, repeats: int) -> dict:
    """Time of one checkpoint write (and of a restore) for the shape, optimizer and SWA state filled."""
    one_sequence = str(train_gpt.load_config(shape_env(shape))[0].train_seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        cfg, rt, pieces, params = build(shape, TRAIN_BATCH_TOKENS=one_sequence, GRAD_ACCUM_STEPS="1",
                                        SWA_ENABLED="1", LOG_DIR=tmp, RUN_ID="bench")
        stream = random_stream(cfg, Path(tmp))
        train_gpt.train_step(cfg, rt, pieces.model, params, pieces.optimizers, stream, 0, 1.0)
        log = train_gpt.Logger(None)
        depth = train_gpt.DepthSchedule(cfg, pieces.model, log)
        average = train_gpt.WeightAverage("swa")
        average.add(pieces.model, 1)
        checkpointer = train_gpt.Checkpointer(train_gpt.dataclasses.replace(cfg, resume_from="auto"), rt, log)
        saves, loads = [], []
        for i in range(repeats):
            t0 = time.perf_counter()
            checkpointer.save(pieces, i + 1, 0.0, depth, average)
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            checkpointer.resume(pieces, depth, average)
            loads.append(time.perf_counter() - t0)
        size = checkpointer.last.stat().st_size
    return {"shape": shape, "checkpoint_bytes": size, "save_s_median": sorted(saves)[len(saves) // 2],
            "save_s_min": min(saves), "restore_s_median": sorted(loads)[len(loads) // 2], "repeats": repeats}


def measure_eval(shape: str, n_tokens: int, repeats: int, cpu_scale: bool = False, **overrides) -> list[dict]:
    """Scored tokens/s of standard, sliding and Hedge evaluation (EVAL_STRIDE, default 64) on random
    tokens, timed in turns so that each method sees the same machine; the median of `repeats`."""
    cfg, rt, pieces, _ = build(shape, cpu_scale, **{"EVAL_STRIDE": "64", "HEDGE_ENABLED": "1", **overrides})
    model = pieces.compiled
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, cfg.vocab_size, size=n_tokens + 1))
    ones = torch.ones(cfg.vocab_size, dtype=torch.int32)
    no = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    ev = train_gpt.Evaluator(cfg, rt, tokens, train_gpt.ByteTables(ones, no, no))
    methods = ["standard", "sliding", "hedge"]

    def score(name: str, evaluator) -> int:
        return train_gpt.score_first(evaluator, train_gpt.EVAL_METHODS[name](cfg, evaluator, model)).nll.numel()

    for name in methods:  # compilation and allocator warm-up, outside the timing
        score(name, ev.with_tokens(tokens[:2 * cfg.train_seq_len + 1]))
    times, scored = {name: [] for name in methods}, {}
    for _ in range(repeats):
        for name in methods:
            rt.sync()
            t0 = time.perf_counter()
            scored[name] = score(name, ev)
            rt.sync()
            times[name].append(time.perf_counter() - t0)
    rows = []
    for name in methods:
        seconds = sorted(times[name])[len(times[name]) // 2]
        rows.append({"method": name, "device": str(rt.device), "tokens": n_tokens, "scored": scored[name],
                     "seconds": seconds,
                     "tokens_per_s": n_tokens / seconds, "stride": cfg.eval_stride if name != "standard" else None,
                     "seq_len": cfg.eval_window if name != "standard" else cfg.train_seq_len})
    sliding = next(r for r in rows if r["method"] == "sliding")["seconds"]
    for row in rows:
        row["time_vs_sliding"] = row["seconds"] / sliding
    return rows


class RandomTokens:
    """Calibration micro-batches of random tokens: GPTQ's Hessians for timing, not for accuracy."""

    def __init__(self, cfg):
        self.cfg = cfg

    def micro_batch(self, cfg, rt, step, micro):
        gen = torch.Generator().manual_seed(step * 1000 + micro)
        x = torch.randint(0, cfg.vocab_size, (4, cfg.train_seq_len), generator=gen)
        return x, x


def measure_export(shape: str) -> list[dict]:
    """Seconds to quantize, pack and compress the shape's weights, per scheme and rounding (the clip search; full GPTQ
    on Hessians of two random micro-batches, whose collection is timed apart; GPTQ with rank-4 LQER on 3 matrices).
    The weights are random with a trained model's spread; sizes are not representative, times are."""
    cfg, _ = train_gpt.load_config({**shape_env(shape), "QUANT_GPTQ": "1", "QUANT_CALIB_BATCHES": "2",
                                      "GRAD_ACCUM_STEPS": "1"})
    torch.manual_seed(cfg.seed)
    model = train_gpt.build_model(cfg.model, torch.device("cpu"))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(std=0.02)
    cpu = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False)
    t0 = time.perf_counter()
    hessians = train_gpt.input_hessians(cfg, cpu, model, RandomTokens(cfg), 0)
    hessian_s = time.perf_counter() - t0
    roundings = {"clip search": (train_gpt.Rounding(), None), "gptq": (train_gpt.Rounding(hessians), hessian_s),
                 "gptq+lqer4x3": (train_gpt.Rounding(hessians, lqer_rank=4, lqer_tensors=3), hessian_s)}
    rows = []
    for scheme in train_gpt.QUANT_SCHEMES:
        for rounding_name, (rounding, calibration_s) in roundings.items():
            t0 = time.perf_counter()
            blob, groups = train_gpt.build_artifact(model, scheme, rounding=rounding)
            seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
            train_gpt.parse_artifact(blob, "memory")
            rows.append({"shape": shape, "scheme": scheme, "rounding": rounding_name,
                         "params": sum(p.numel() for p in model.parameters()), "bytes_model": len(blob),
                         "hessian_s": calibration_s, "export_s": seconds, "load_s": time.perf_counter() - t0,
                         "streams": {g: {k: row[k] for k in ("codes", "floats") if k in row} for g, row in groups.items()},
                         "torch_threads": torch.get_num_threads()})
    return rows


def run_suite(steps: int, warmup: int, eval_tokens: int, repeats: int, done=lambda row: None) -> list[dict]:
    """Every named shape and the evaluation methods on this device, as one list of rows, each handed
    to `done` as soon as it is measured and judged. On a CPU the shapes are scaled down (bench_cpu)
    and say so in their names."""
    cpu_scale = not torch.cuda.is_available()
    suffix = " (cpu scale)" if cpu_scale else ""
    rows = []

    def finish(row: dict):
        if row["name"].startswith("train moe_frozen"):
            dense = next(r for r in rows if r["name"].startswith("train dense_ffn"))
            row["vs_dense_step_time"] = row["ms_per_step"] / dense["ms_per_step"]
        row["goal"], row["met"] = judge(row)
        rows.append(row)
        done(row)

    for shape in SUITE:
        for row in measure(shape, steps, warmup, cpu_scale):
            finish({"name": f"train {row['shape']}{suffix}", "device": row["device"],
                    "tokens_per_s": row["tokens_per_s"], "ms_per_step": row["ms_per_step"], "mfu": row["mfu"],
                    "peak_mem_mib": row["peak_mem_mib"], "params": row["params"], "graphs": row["graphs"],
                    "mfu_peak": row["mfu_peak"]})
    for row in measure_eval("baseline", eval_tokens, repeats, cpu_scale):
        finish({"name": f"eval {row['method']}{suffix}", "device": row["device"], "tokens_per_s": row["tokens_per_s"],
                "ms_per_step": None, "mfu": None, "peak_mem_mib": None, "params": None})
    return rows


def judge(row: dict) -> tuple[str, bool | None]:
    """The performance goal a suite row is held to, and whether it is met (None: not judged here,
    e.g. an MFU or per-GPU rate measured on a CPU). The side-by-side with the challenge's script
    (>= 1.3x its tokens/s) is tools/gpu_check.sh's."""
    name, on_gpu = row["name"], row["device"].startswith("cuda")
    if name.startswith("train baseline"):
        return "MFU >= 45%", row["mfu"] >= 0.45 if on_gpu else None
    if name.startswith("train recurrent"):
        one_graph = None if row["graphs"] is None else row["graphs"] == 1
        if not on_gpu:
            return "1 graph a phase (MFU >= 40% on GPU)", one_graph
        return "MFU >= 40%, 1 graph a phase", row["mfu"] >= 0.40 and one_graph is not False
    if name.startswith("train moe_frozen"):
        return "<= 1.2x dense step time", row["vs_dense_step_time"] <= 1.2
    if name.startswith(("eval sliding", "eval hedge")):
        return ">= 130k tokens/s a GPU", row["tokens_per_s"] >= 130_000 if on_gpu else None
    return "-", None


SUITE_HEADER = (f"{'name':<34} {'device':<7} {'tokens/s':>10} {'ms/step':>9} {'MFU':>7} {'peak MiB':>9} {'graphs':>6}  "
                f"{'goal':<38} met")


def print_suite_row(r: dict):
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    ms = f"{r['ms_per_step']:.1f}" if r["ms_per_step"] is not None else "-"
    peak = f"{r['peak_mem_mib']:.0f}" if r["peak_mem_mib"] is not None else "-"
    graphs = str(r["graphs"]) if r.get("graphs") is not None else "-"
    goal = r["goal"] + (f" ({r['vs_dense_step_time']:.2f}x)" if "vs_dense_step_time" in r else "")
    met = {True: "yes", False: "NO", None: "n/a"}[r["met"]]
    print(f"{r['name']:<34} {r['device']:<7} {r['tokens_per_s']:>10.0f} {ms:>9} {mfu:>7} {peak:>9} {graphs:>6}  "
          f"{goal:<38} {met}", flush=True)


def print_mfu_peak(rows: list[dict]):
    peaks = {r["mfu_peak"] for r in rows if r.get("mfu_peak")}
    for peak in sorted(peaks):
        print(f"MFU is against {peak}")


def write_json(path: Path | None, rows):
    if path:
        path.write_text(json.dumps(rows, indent=2))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--checkpoint", action="store_true", help="time a checkpoint write and restore instead")
    parser.add_argument("--profile", action="store_true", help="torch.profiler's operator table over --steps steps")
    parser.add_argument("--suite", action="store_true", help="every shape and evaluation method: one table")
    parser.add_argument("--eval", action="store_true", help="time the evaluation methods instead")
    parser.add_argument("--optimizer", action="store_true",
                        help="time Muon's step, same-shape batches against one matrix at a time, instead")
    parser.add_argument("--export", action="store_true", help="time quantize + compress of each scheme instead")
    parser.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens --eval scores")
    parser.add_argument("--repeats", type=int, default=3, help="--eval times each method this often (median)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1 or args.eval_tokens < 2:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0, --eval-tokens >= 2")
    if args.profile:
        print(profile(args.shape, args.steps, args.warmup))
        return
    if args.suite:
        print(SUITE_HEADER, flush=True)
        rows = run_suite(args.steps, args.warmup, args.eval_tokens, args.repeats, print_suite_row)
        print_mfu_peak(rows)
        write_json(args.json, rows)
        return
    if args.export:
        rows = measure_export(args.shape)
        print(f"{'shape':<10} {'scheme':<6} {'rounding':<13} {'params':>11} {'bytes_model':>12} {'hessians s':>10} "
              f"{'export s':>9} {'load s':>7}")
        for r in rows:
            hessian_s = "-" if r["hessian_s"] is None else f"{r['hessian_s']:.2f}"
            print(f"{r['shape']:<10} {r['scheme']:<6} {r['rounding']:<13} {r['params']:>11,} {r['bytes_model']:>12,} "
                  f"{hessian_s:>10} {r['export_s']:>9.2f} {r['load_s']:>7.2f}")
        write_json(args.json, rows)
        return
    if args.eval:
        rows = measure_eval(args.shape, args.eval_tokens, args.repeats)
        print(f"{'method':<9} {'device':<8} {'seq':>5} {'stride':>6} {'tokens':>8} {'seconds':>8} {'tokens/s':>10} "
              f"{'x sliding':>9}")
        for r in rows:
            print(f"{r['method']:<9} {r['device']:<8} {r['seq_len']:>5} {str(r['stride'] or '-'):>6} {r['tokens']:>8} "
                  f"{r['seconds']:>8.2f} {r['tokens_per_s']:>10.0f} {r['time_vs_sliding']:>9.2f}")
        write_json(args.json, rows)
        return
    if args.optimizer:
        row = measure_optimizer(args.shape, max(args.steps, 1))
        print(f"{'shape':<10} {'device':<8} {'matrices':>8} {'batches':>7} {'batched ms':>10} {'one at a time ms':>16} "
              f"{'speedup':>7}")
        print(f"{row['shape']:<10} {row['device']:<8} {row['matrices']:>8} {row['batches']:>7} {row['batched_ms']:>10.1f} "
              f"{row['one_at_a_time_ms']:>16.1f} {row['speedup']:>7.2f}")
        write_json(args.json, row)
        return
    if args.checkpoint:
        row = measure_checkpoint(args.shape, max(args.steps, 1))
        print(f"{'shape':<10} {'bytes':>12} {'save s (median)':>16} {'save s (min)':>13} {'restore s':>10}")
        print(f"{row['shape']:<10} {row['checkpoint_bytes']:>12} {row['save_s_median']:>16.3f} "
              f"{row['save_s_min']:>13.3f} {row['restore_s_median']:>10.3f}")
        write_json(args.json, row)
        return
    try:
        rows = measure(args.shape, args.steps, args.warmup)
    except train_gpt.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{'shape':<14} {'device':<8} {'layers':>6} {'params':>10} {'ms/step':>9} {'tokens/s':>10} {'MFU':>10} "
          f"{'peak MiB':>9}")
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a (CPU)"
        print(f"{row['shape']:<14} {row['device']:<8} {row['effective_layers']:>6} {row['params']:>10} "
              f"{row['ms_per_step']:>9.1f} {row['tokens_per_s']:>10.0f} {mfu:>10} {row['peak_mem_mib']:>9.0f}")
    print_mfu_peak(rows)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()

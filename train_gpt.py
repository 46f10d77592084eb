"""Parameter-golf trainer: one file, read top to bottom in the order a run happens.

config -> distributed/device -> data -> model -> optimizers -> training -> checkpoints -> export -> evaluation -> main.
Launch with `torchrun --standalone --nproc_per_node=N train_gpt.py` (or `python train_gpt.py`);
every hyperparameter is an env var, `python train_gpt.py --help` lists them."""

from __future__ import annotations

import ast, copy, dataclasses, datetime, difflib, functools, glob, hashlib, io, itertools, json, lzma, math, os
import resource, signal, struct, sys, time, tokenize, uuid, zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, distributed as dist, nn
from torch.nn.parallel import DistributedDataParallel

try:
    import zstandard
except ImportError:  # the export falls back to zlib and names it in the log
    zstandard = None

class InputError(Exception):
    """Bad input from the user (env var, file, shard, artifact): one line, exit code 2."""

class ConfigError(InputError):
    pass

# ----------------------------------------------------------------------------------------------
# Config: one typed, validated object built from env vars
# ----------------------------------------------------------------------------------------------

def var(default, help: str, lo=None, hi=None, choices=None):
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "choices": choices})

@dataclass(frozen=True)
class Config:
    preset: str = var("", "named configurations (listed below) applied in order, e.g. recurrent,cpu; env vars override")
    # data
    data_path: str = var("./data/datasets/fineweb10B_sp1024", "folder holding *_train_*.bin and *_val_*.bin shards")
    tokenizer_path: str = var("", "sentencepiece .model for the bits-per-byte tables (default: DATA_PATH/meta.json's "
                                  "tokenizer, else ./data/tokenizers/fineweb_1024_bpe.model)")
    vocab_size: int = var(1024, "model vocabulary; every token id must be below it", lo=2, hi=65536)
    run_id: str = var("", "names logs/<RUN_ID>.txt, .json and the artifact (default: a fresh id)")
    seed: int = var(1337, "seed of the model init", lo=0, hi=2**63 - 1)
    device: str = var("auto", "auto picks cuda when available", choices=("auto", "cpu", "cuda"))
    compile: str = var("auto", "torch.compile the model (auto: on CUDA only; on CPU it needs a C++ compiler and ~40 s)",
                       choices=("auto", "0", "1"))
    autocast: str = var("auto", "bf16 autocast and bf16 Newton-Schulz (auto: on CUDA only; pays on a CPU with AMX or "
                                "AVX-512 BF16, see docs/perf_notes.md)", choices=("auto", "0", "1"))
    log_dir: str = var("logs", "folder for the log, the summary JSON and the artifact")
    # budget and batch
    iterations: int = var(20000, "training steps at most", lo=1)
    max_wallclock_seconds: float = var(600.0, "training seconds cap, without validation and warm-up (0 = none)", lo=0.0)
    train_batch_tokens: int = var(524288, "tokens in one optimizer step over all ranks", lo=1)
    train_seq_len: int = var(1024, "training sequence length", lo=1)
    grad_accum_steps: int = var(0, "micro-batches a step per rank (0 = 8 // world size, batch rounded to fit)", lo=0)
    val_loss_every: int = var(1000, "validate every N steps (0 = only at the end)", lo=0)
    train_log_every: int = var(200, "log the train loss every N steps (and steps 1-10)", lo=1)
    val_batch_size: int = var(524288, "tokens a validation forward covers over all ranks", lo=1)
    doc_mode: bool = var(False, "each train/val sequence is one document from its BOS, cut or padded; padding unscored")
    epochs: int = var(0, "DOC_MODE: train this many passes over the documents (sets ITERATIONS; 0 = off)", lo=0)
    train_subset_docs: int = var(0, "DOC_MODE: train on the first N documents only (0 = all)", lo=0)
    warmup_steps: int = var(20, "untimed priming steps (compile, allocator); weights, optimizer state restored", lo=0)
    warmdown_iters: int = var(1200, "linear LR decay to 0 over the budget's last N steps (timed when capped)", lo=0)
    lr_warmup_steps: int = var(0, "linear LR warm-up over the first N steps", lo=0)
    # model
    num_layers: int = var(9, "transformer blocks", lo=1)
    model_dim: int = var(512, "residual width", lo=2)
    num_heads: int = var(8, "attention heads", lo=1)
    num_kv_heads: int = var(4, "key/value heads (grouped-query attention)", lo=1)
    mlp_mult: float = var(2.0, "MLP hidden width as a multiple of MODEL_DIM", lo=0.0625)
    tie_embeddings: bool = var(True, "share the input embedding and the output head")
    logit_softcap: float = var(30.0, "logits -> c * tanh(logits / c)", lo=1e-3)
    rope_base: float = var(10000.0, "RoPE base frequency", lo=1.0)
    qk_gain_init: float = var(1.5, "initial per-head gain on the normalised queries", lo=0.0)
    tied_embed_init_std: float = var(0.005, "std of the tied embedding at init", lo=0.0)
    activation: str = var("relu2", "MLP activation: relu(x)^2, leaky_relu(x, 0.5)^2", choices=("relu2", "leaky_relu2"))
    # recurrence
    num_repeats: int = var(1, "passes over the blocks at full depth (default: DEPTH_SCHEDULE's last)", lo=1, hi=64)
    depth_schedule: str = var("", "passes by budget fraction, e.g. 2@0,3@0.4,4@0.65 (empty: NUM_REPEATS throughout)")
    xsa_last_n: int = var(0, "exclusive self-attention on the last N effective layers", lo=0)
    num_value_embeds: int = var(0, "token tables added to every layer's attention values, learned scales", lo=0, hi=16)
    # mixture of experts
    moe_num_experts: int = var(0, "experts per MoE layer (0 = a dense FFN everywhere)", lo=0)
    moe_top_k: int = var(2, "experts each token is routed to", lo=1)
    moe_d_ffn: int = var(0, "hidden width of one expert (0 = dense FFN width / MOE_TOP_K: same active width)", lo=0)
    moe_granularity: int = var(1, "G: each expert -> G of 1/G width, top-k x G (same total, active params)", lo=1)
    moe_layers: str = var("all", "blocks with an MoE FFN: all, every2 (blocks 1, 3, 5, ...) or a list like 0,2,5")
    moe_init: str = var("normal", "expert init: normal, orthogonal or sparse, each scaled to unit output variance",
                        choices=("sparse", "normal", "orthogonal"))
    moe_sparsity: float = var(0.9, "MOE_INIT=sparse: fraction of zeros in each expert matrix column", lo=0.0, hi=0.999)
    moe_frozen: bool = var(False, "experts frozen at init, rebuilt from (SEED, layer, expert): not trained, not stored")
    moe_aux_coef: float = var(0.0, "Switch load-balancing loss coefficient (0.01 is usual)", lo=0.0)
    moe_zloss_coef: float = var(0.0, "router z-loss coefficient (0.001 is usual)", lo=0.0)
    moe_bias_update: float = var(0.0, "auxiliary-loss-free balancing: per-expert routing biases move this much a step "
                                      "against the observed load (0.001 is usual; 0 = off)", lo=0.0)
    # optimizers
    matrix_optimizer: str = var("muon", "block matrix optimizer: muon, or adam at MATRIX_LR", choices=("muon", "adam"))
    matrix_lr: float = var(0.04, "Muon learning rate for the matrices inside blocks", lo=0.0)
    scalar_lr: float = var(0.04, "Adam learning rate for vectors and scalars", lo=0.0)
    tied_embed_lr: float = var(0.05, "Adam learning rate for the tied embedding", lo=0.0)
    embed_lr: float = var(0.6, "Adam learning rate for the untied input embedding", lo=0.0)
    head_lr: float = var(0.008, "Adam learning rate for the untied output head", lo=0.0)
    muon_momentum: float = var(0.95, "Muon momentum after warm-up", lo=0.0, hi=0.9999)
    muon_momentum_warmup_start: float = var(0.85, "Muon momentum at step 0", lo=0.0, hi=0.9999)
    muon_momentum_warmup_steps: int = var(500, "steps to go from the start momentum to MUON_MOMENTUM", lo=0)
    muon_backend_steps: int = var(5, "Newton-Schulz iterations", lo=1, hi=20)
    muon_wd: float = var(0.0, "decoupled weight decay of Muon matrices (p -= lr * wd * p)", lo=0.0)
    beta1: float = var(0.9, "Adam beta1", lo=0.0, hi=0.9999)
    beta2: float = var(0.95, "Adam beta2", lo=0.0, hi=0.99999)
    adam_eps: float = var(1e-8, "Adam epsilon", lo=0.0)
    grad_clip_norm: float = var(0.0, "clip the global gradient norm (0 = off)", lo=0.0)
    # weight averaging
    swa_enabled: bool = var(False, "export and evaluate a float32 average of weight snapshots from the end of training")
    swa_start_frac: float = var(0.4, "collect snapshots once this fraction of the budget is used", lo=0.0, hi=1.0)
    swa_every: int = var(50, "a snapshot every N steps (the final weights are always one)", lo=1)
    ema_decay: float = var(0.0, "instead of SWA: a float32 exponential average of the weights, updated every step at "
                                "full depth (0 = off)", lo=0.0, hi=0.99999)
    # evaluation (the final methods run on the model rebuilt from the artifact)
    eval_seq_len: int = var(0, "window length of the sliding, Hedge and TTT evaluations (0 = TRAIN_SEQ_LEN)", lo=0)
    eval_stride: int = var(0, "sliding evaluation: windows advance by N tokens and score only those (0 = off); Hedge "
                              "and TTT use these windows too", lo=0)
    hedge_enabled: bool = var(False, "Hedge evaluation: online mix of the model, a tempered one, scored-token n-grams")
    hedge_eta: float = var(0.1, "Hedge learning rate: log weight -= eta * an expert's mean loss in nats", lo=0.0)
    hedge_prior: float = var(8.0, "weight of the neural distribution in each n-gram expert, in counts", lo=1e-6)
    hedge_chunk_tokens: int = var(512, "Hedge weights and counts take in the scored tokens every N targets", lo=1)
    hedge_table_entries: int = var(1 << 24, "cells (rows x vocab) per n-gram expert; more contexts are hashed", lo=1)
    ttt_steps: int = var(0, "score-first test-time training: SGD steps on each chunk once it is scored (0 = off)", lo=0)
    ttt_lr: float = var(0.005, "TTT learning rate, cosine-decayed over the chunks", lo=0.0)
    ttt_momentum: float = var(0.9, "TTT SGD momentum", lo=0.0, hi=0.9999)
    ttt_chunk_tokens: int = var(32768, "TTT scores, then trains on, this many targets at a time", lo=1)
    score_method: str = var("roundtrip", "the claimed score (the summary's metric), its final line printed last: the "
                                         "artifact's round trip or an enabled method",
                            choices=("roundtrip", "sliding", "hedge", "ttt"))
    eval_audit: bool = var(False, "audit every evaluation: distributions sum to 1, no score sees a later token; a "
                                  "method that fails is not scored")
    eval_audit_tokens: int = var(16384, "the audit checks the methods on this prefix of the validation stream", lo=2)
    eval_audit_positions: int = var(2048, "... and checks every one of its first N positions on its own", lo=1)
    eval_audit_seed: int = var(0, "seed of the audit's cut points and replaced tokens (0 = a fresh one each run)", lo=0)
    per_token_loss_every: int = var(0, "save every validation target's loss (float16) every N steps and at the end to "
                                       "LOG_DIR/<RUN_ID>_per_token/ (0 = off)", lo=0)
    # export
    artifact_limit_bytes: int = var(16_000_000, "code + compressed model must fit in this", lo=1)
    quant: str = var("int8", "artifact precision per tensor group: int8, int6, mixed, int5, int4 (docs/outputs.md), or "
                             "auto: of those that fit ARTIFACT_LIMIT_BYTES, the best on training tokens",
                     choices=("int8", "int6", "mixed", "int5", "int4", "auto"))
    quant_gptq: bool = var(False, "full GPTQ: round each matrix column by column against the Hessian of its inputs on "
                                  "training tokens (0: each weight to its nearest level)")
    quant_calib_batches: int = var(16, "QUANT_GPTQ or QUANT=auto: training micro-batches (each rank's) for the "
                                       "Hessians, and as many again for auto's losses", lo=1)
    quant_gptq_damp: float = var(0.01, "QUANT_GPTQ: damping added to the Hessian's diagonal, a fraction of its mean",
                                 lo=1e-6, hi=1.0)
    gptq_reserve_seconds: float = var(20.0, "QUANT_GPTQ or QUANT=auto with MAX_WALLCLOCK_SECONDS: training stops this "
                                            "much earlier, as calibration counts as training time", lo=0.0)
    quant_sdclip_k: float = var(0.0, "per-row scales clip at k x the row's std (SDClip) instead of the clip search "
                                     "(0 = search)", lo=0.0)
    quant_lqer_rank: int = var(0, "LQER: a rank-r correction with int4 factors of the matrices rounded worst (0 = off)",
                               lo=0, hi=64)
    quant_lqer_tensors: int = var(3, "QUANT_LQER_RANK: how many matrices get one", lo=1)
    quant_prune_max: float = var(0.0, "a build over ARTIFACT_LIMIT_BYTES by at most this fraction of its bytes zeroes "
                                      "the +-1 codes that cost least until it fits (0 = off)", lo=0.0, hi=0.5)
    # faults
    checkpoint_every_seconds: float = var(0.0, "checkpoint every N seconds of training time (0 = off)", lo=0.0)
    checkpoint_every_steps: int = var(0, "checkpoint every N steps (0 = off)", lo=0)
    resume_from: str = var("", "checkpoint file to continue from, or 'auto' for the newest of this RUN_ID")
    fault_at_step: int = var(0, "test hook: the process kills itself (SIGKILL) on reaching this step (0 = off)", lo=0)
    fault_rank: int = var(-1, "with FAULT_AT_STEP, only this rank dies (-1 = every rank)", lo=-1)
    dist_timeout_seconds: float = var(600.0, "a collective waiting longer than this means another rank died", lo=1.0)
    dry_run: bool = var(False, "print the config and the parameter accounting (the model on the meta device: nothing "
                               "allocated, no data read) and exit")

    # Resolved once from the settings above (not env vars): what the run's features read.
    depth_phases: tuple = field(init=False)  # (repeats, starting fraction of the budget) of each phase
    eval_window: int = field(init=False)  # the window of the sliding, Hedge and TTT evaluations
    eval_methods: tuple = field(init=False)  # the final evaluations after the round trip, SCORE_METHOD's last
    weight_average: str = field(init=False)  # none, swa or ema
    train_budget_ms: float = field(init=False)  # the loop's wall clock: the cap less the GPTQ reserve (0: none)
    model: "ModelSpec" = field(init=False)

    def __post_init__(self):
        if self.model_dim % self.num_heads:
            raise ConfigError(f"NUM_HEADS={self.num_heads}: must divide MODEL_DIM={self.model_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"NUM_KV_HEADS={self.num_kv_heads}: must divide NUM_HEADS={self.num_heads}")
        if (self.model_dim // self.num_heads) % 2:
            raise ConfigError(f"MODEL_DIM={self.model_dim}: head dim MODEL_DIM/NUM_HEADS must be even for RoPE")
        phases = parse_depth_schedule(self.depth_schedule) if self.depth_schedule else ((self.num_repeats, 0.0),)
        if max(r for r, _ in phases) > phases[-1][0]:
            raise ConfigError(f"DEPTH_SCHEDULE={self.depth_schedule!r}: the last phase must be the deepest")
        window = self.eval_seq_len or self.train_seq_len
        if self.eval_stride > window:
            raise ConfigError(f"EVAL_STRIDE={self.eval_stride}: must not exceed the eval window "
                              f"(EVAL_SEQ_LEN or TRAIN_SEQ_LEN = {window})")
        if self.swa_enabled and self.ema_decay > 0:
            raise ConfigError(f"EMA_DECAY={self.ema_decay}: choose SWA_ENABLED=1 or EMA_DECAY, not both")
        methods = {"sliding": self.eval_stride, "hedge": self.hedge_enabled, "ttt": self.ttt_steps}
        for (method, value), name in zip(methods.items(), ("eval_stride", "hedge_enabled", "ttt_steps")):
            if self.doc_mode and value:
                raise ConfigError(f"{name.upper()}={value}: the stream evaluations do not apply in DOC_MODE, where "
                                  f"every sequence is one document; unset it")
            if self.score_method == method and not value:
                raise ConfigError(f"SCORE_METHOD={method}: that evaluation is off (set {name.upper()})")
        for name in ("epochs", "train_subset_docs"):
            if getattr(self, name) and not self.doc_mode:
                raise ConfigError(f"{name.upper()}={getattr(self, name)}: needs DOC_MODE=1")
        needs = {"quant_gptq_damp": (self.quant_gptq, "QUANT_GPTQ=1"),
                 "quant_calib_batches": (self.calibrates, "QUANT_GPTQ=1 or QUANT=auto"),
                 "gptq_reserve_seconds": (self.calibrates, "QUANT_GPTQ=1 or QUANT=auto"),
                 "quant_lqer_tensors": (self.quant_lqer_rank, "QUANT_LQER_RANK")}
        for f in dataclasses.fields(self):
            if f.name in needs and not needs[f.name][0] and getattr(self, f.name) != f.default:
                raise ConfigError(f"{f.name.upper()}={getattr(self, f.name)}: does nothing without {needs[f.name][1]}")
        reserve = self.gptq_reserve_seconds if self.calibrates and self.max_wallclock_seconds else 0.0
        if reserve and reserve >= self.max_wallclock_seconds:
            raise ConfigError(f"GPTQ_RESERVE_SECONDS={reserve:g}: must be less than MAX_WALLCLOCK_SECONDS="
                              f"{self.max_wallclock_seconds:g}, which it comes out of")
        claimed_last = tuple(sorted((method for method, on in methods.items() if on), key=self.score_method.__eq__))
        vars(self).update(depth_phases=phases, num_repeats=phases[-1][0], eval_window=window, eval_methods=claimed_last,
                          weight_average="swa" if self.swa_enabled else "ema" if self.ema_decay else "none",
                          train_budget_ms=1000 * (self.max_wallclock_seconds - reserve))
        vars(self)["model"] = model_spec(self)

    @property
    def calibrates(self) -> bool:
        """Whether the export reads training tokens after the loop (GPTQ's Hessians, QUANT=auto's losses)."""
        return self.quant_gptq or self.quant == "auto"

CONFIG_FIELDS = {f.name.upper(): f for f in dataclasses.fields(Config) if f.init}

# Everything that builds a model, resolved (MoE figures after granularity): the artifact header stores it, in order.
ModelSpec = dataclasses.make_dataclass("ModelSpec", frozen=True, fields=(
    "vocab_size num_layers model_dim num_heads num_kv_heads mlp_hidden tie_embeddings logit_softcap rope_base "
    "qk_gain_init tied_embed_init_std num_repeats xsa_last_n activation num_value_embeds moe_experts moe_top_k "
    "moe_expert_width moe_blocks moe_init moe_sparsity moe_frozen moe_aux_coef moe_zloss_coef seed").split())

def model_spec(cfg: Config) -> ModelSpec:
    hidden, experts = max(1, round(cfg.mlp_mult * cfg.model_dim)), cfg.moe_num_experts
    if experts and cfg.moe_top_k > experts:
        raise ConfigError(f"MOE_TOP_K={cfg.moe_top_k}: must not exceed MOE_NUM_EXPERTS={experts}")
    width = cfg.moe_d_ffn or max(1, round(hidden / cfg.moe_top_k))  # the dense FFN's active width
    if experts and width % cfg.moe_granularity:
        raise ConfigError(f"MOE_GRANULARITY={cfg.moe_granularity}: must divide the expert width {width}")
    g = cfg.moe_granularity if experts else 0  # G times the experts, each 1/G as wide, G times as many chosen
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelSpec) if hasattr(cfg, f.name)}
    return ModelSpec(**{**shared, "mlp_hidden": hidden, "moe_experts": experts * g, "moe_top_k": cfg.moe_top_k * g,
                        "moe_expert_width": width // g if g else 0,
                        "moe_blocks": parse_moe_layers(cfg.moe_layers, cfg.num_layers) if experts else ()})

def some_study(dim: int, heads: int, layers: int, experts: int, d_ffn: int, seq: int, batch_seqs: int) -> dict:
    """A SoME study run: frozen sparse experts, the rest trained AdamW-like at 8e-4, 4 epochs of 20,000 documents."""
    lr = "0.0008"
    return {"MODEL_DIM": str(dim), "NUM_HEADS": str(heads), "NUM_KV_HEADS": str(heads), "NUM_LAYERS": str(layers),
            "MOE_NUM_EXPERTS": str(experts), "MOE_D_FFN": str(d_ffn), "MOE_TOP_K": "4", "MOE_INIT": "sparse",
            "MOE_FROZEN": "1", "VOCAB_SIZE": "8192", "TIE_EMBEDDINGS": "0", "TRAIN_SEQ_LEN": str(seq),
            "TRAIN_BATCH_TOKENS": str(seq * batch_seqs), "DOC_MODE": "1", "EPOCHS": "4", "TRAIN_SUBSET_DOCS": "20000",
            "MAX_WALLCLOCK_SECONDS": "0", "MATRIX_OPTIMIZER": "adam", "MATRIX_LR": lr, "SCALAR_LR": lr,
            "EMBED_LR": lr, "HEAD_LR": lr, "WARMDOWN_ITERS": "0", "VAL_LOSS_EVERY": "0"}

# Progressive-depth recurrence: 3 shared blocks applied up to 4 times (12 effective layers).
RECURRENT = {"NUM_LAYERS": "3", "MODEL_DIM": "832", "NUM_HEADS": "8", "NUM_KV_HEADS": "4", "MLP_MULT": "2",
             "NUM_VALUE_EMBEDS": "2", "XSA_LAST_N": "4", "ACTIVATION": "leaky_relu2",
             "DEPTH_SCHEDULE": "2@0,3@0.4,4@0.65", "SWA_ENABLED": "1", "SWA_START_FRAC": "0.4", "SWA_EVERY": "50",
             "MUON_WD": "0.04", "GRAD_CLIP_NORM": "0.3", "MATRIX_LR": "0.015", "SCALAR_LR": "0.015",
             "TIED_EMBED_LR": "0.018"}
# run.sh's job without GPUs: 220 s of training keep it near 4.5 minutes on two CPU cores (docs/perf_notes.md 17).
CPU = {"NUM_LAYERS": "4", "MODEL_DIM": "192", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "256",
       "TRAIN_BATCH_TOKENS": "8192", "GRAD_ACCUM_STEPS": "1", "MAX_WALLCLOCK_SECONDS": "220", "WARMUP_STEPS": "0",
       "WARMDOWN_ITERS": "300", "VAL_LOSS_EVERY": "200", "TRAIN_LOG_EVERY": "50", "VAL_BATCH_SIZE": "65536"}
PRESETS = {
    "baseline": {},  # the challenge's naive baseline: the defaults themselves
    "recurrent": RECURRENT,
    # The recurrent preset's full depth as a flat stack of 12 blocks: the control of a recurrence study.
    "recurrent_flat": {**RECURRENT, "NUM_LAYERS": "12", "DEPTH_SCHEDULE": "1@0", "NUM_VALUE_EMBEDS": "0"},
    # The baseline with a frozen-expert MoE FFN: 16 experts, top-2, each half the dense width.
    "moe_frozen": {"MOE_NUM_EXPERTS": "16", "MOE_TOP_K": "2", "MOE_INIT": "sparse", "MOE_FROZEN": "1"},
    "cpu": CPU,
    # run.sh's job on its synthetic corpus, tuned there (docs/perf_notes.md 10-11, 16); overfits small real text (19).
    "cpu_embedded": {**CPU, "NUM_VALUE_EMBEDS": "1", "MATRIX_LR": "0.02", "MUON_MOMENTUM_WARMUP_STEPS": "1000"},
    # The benchmark's shapes scaled to seconds a step on a CPU (tools/bench.py).
    "bench_cpu": {"NUM_LAYERS": "4", "MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2", "TRAIN_SEQ_LEN": "256",
                  "TRAIN_BATCH_TOKENS": "8192", "GRAD_ACCUM_STEPS": "1"},
    # tools/gpu_check.sh's correctness run: a recurrent model quick to compile, two depth phases, audited, GPTQ + auto.
    "gpu_check": {**RECURRENT, "NUM_LAYERS": "2", "MODEL_DIM": "256", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
                  "DEPTH_SCHEDULE": "1@0,2@0.5", "XSA_LAST_N": "2", "TRAIN_SEQ_LEN": "512",
                  "TRAIN_BATCH_TOKENS": "65536", "MAX_WALLCLOCK_SECONDS": "20", "WARMUP_STEPS": "2",
                  "VAL_LOSS_EVERY": "0", "TRAIN_LOG_EVERY": "50", "VAL_BATCH_SIZE": "131072", "EVAL_STRIDE": "64",
                  "HEDGE_ENABLED": "1", "TTT_STEPS": "1", "TTT_CHUNK_TOKENS": "8192", "EVAL_AUDIT": "1",
                  "QUANT": "auto", "QUANT_GPTQ": "1", "GPTQ_RESERVE_SECONDS": "5"},
    **{f"some_study_{name}": some_study(*shape) for name, shape in (
        ("a1", (384, 6, 6, 64, 1024, 512, 128)), ("a2", (384, 6, 6, 64, 1024, 768, 42)),
        ("a3", (384, 6, 6, 64, 1024, 1024, 31)), ("b1", (384, 8, 8, 128, 1536, 512, 128)),
        ("b2", (384, 8, 10, 128, 1536, 512, 128)), ("c1", (512, 8, 8, 128, 1536, 512, 128)),
        ("c2", (768, 8, 8, 128, 1536, 512, 128)))},
}

def parse_value(name: str, raw: str, f: dataclasses.Field):
    kind, meta, text = {"int": int, "float": float, "bool": bool, "str": str}[f.type], f.metadata, raw.strip()
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    try:
        value = words[text.lower()] if kind is bool else int(text, 10) if kind is int else kind(text)
    except (KeyError, ValueError):
        expected = {bool: "0 or 1", int: "an integer"}.get(kind, "a number")
        raise ConfigError(f"{name}={raw!r}: expected {expected}") from None
    lo, hi, choices = meta["lo"], meta["hi"], meta["choices"] or ()
    for failed, problem in ((kind is float and not math.isfinite(value), "expected a finite number"),
                            (choices and value not in choices, f"expected one of {', '.join(choices)}"),
                            (lo is not None and value < lo, f"must be >= {lo}"),
                            (hi is not None and value > hi, f"must be <= {hi}")):
        if failed:
            raise ConfigError(f"{name}={raw!r}: {problem}")
    return value

def resolve_batch(values: dict, world_size: int) -> list[str]:
    """Fills in GRAD_ACCUM_STEPS, rounding the batch if need be (docs/operations.md, "Settings"); returns log notes."""
    batch, seq, accum = values["train_batch_tokens"], values["train_seq_len"], values["grad_accum_steps"]
    if batch < seq:
        raise ConfigError(f"TRAIN_BATCH_TOKENS={batch}: must be at least TRAIN_SEQ_LEN={seq}")
    if accum == 0:
        accum = max(1, min(8 // world_size, batch // (world_size * seq)))
        if batch % (world_size * seq) == 0:  # the batch splits over the ranks: the most micro-batches dividing it
            accum = max(a for a in range(1, accum + 1) if batch // (world_size * seq) % a == 0)
    elif batch % (world_size * accum * seq):
        raise ConfigError(f"TRAIN_BATCH_TOKENS={batch}: must be divisible by world_size*GRAD_ACCUM_STEPS*"
                          f"TRAIN_SEQ_LEN = {world_size}*{accum}*{seq} = {world_size * accum * seq}")
    unit = world_size * accum * seq
    values.update(grad_accum_steps=accum, train_batch_tokens=max(1, round(batch / unit)) * unit)
    if batch % unit == 0:
        return []
    return [f"train_batch_tokens rounded from {batch} to {values['train_batch_tokens']} so that it splits "
            f"evenly over world_size:{world_size} x grad_accum_steps:{accum} x train_seq_len:{seq}"]

def parse_depth_schedule(text: str) -> tuple[tuple[int, float], ...]:
    """'2@0,3@0.4' -> ((2, 0.0), (3, 0.4)): passes from each fraction of the budget on."""
    try:
        phases = tuple((int(repeats), float(frac)) for repeats, _, frac in (i.partition("@") for i in text.split(",")))
    except ValueError:
        raise ConfigError(f"DEPTH_SCHEDULE={text!r}: expected REPEATS@FRACTION items, e.g. 2@0,3@0.4") from None
    if any(repeats < 1 or not 0 <= frac < 1 for repeats, frac in phases):
        raise ConfigError(f"DEPTH_SCHEDULE={text!r}: each item is REPEATS@FRACTION, repeats >= 1, 0 <= fraction < 1")
    if phases[0][1] != 0 or any(b <= a for (_, a), (_, b) in zip(phases, phases[1:])):
        raise ConfigError(f"DEPTH_SCHEDULE={text!r}: fractions must start at 0 and increase")
    return phases

def load_config(environ, world_size: int = 1) -> tuple[Config, list[str]]:
    """Config from env vars; returns it with notes (typo warnings, rounding) for the log."""
    unknown = sorted(set(environ) - CONFIG_FIELDS.keys())
    close = {name: difflib.get_close_matches(name, list(CONFIG_FIELDS), n=1, cutoff=0.85) for name in unknown}
    notes = [f"warning: env var {name} is not a setting of train_gpt.py; did you mean {close[name][0]}?"
             for name in unknown if close[name] and name.replace("_", "").isupper()]
    layers = {}
    for name in filter(None, environ.get("PRESET", "").split(",")):
        if name not in PRESETS:
            raise ConfigError(f"PRESET={environ['PRESET']!r}: {name!r} is not one of {', '.join(PRESETS)}")
        layers.update(PRESETS[name])
    environ = {**layers, **environ}
    values = {f.name: parse_value(name, environ[name], f) if name in environ else f.default
              for name, f in CONFIG_FIELDS.items()}
    if values["epochs"] and "ITERATIONS" in environ:
        raise ConfigError(f"ITERATIONS={environ['ITERATIONS']}: set EPOCHS or ITERATIONS, not both")
    notes += resolve_batch(values, world_size)
    if not values["run_id"]:
        # The same on every rank: torchrun's rendezvous id, unless "none" (see docs/operations.md, "Launching").
        elastic = os.environ.get("TORCHELASTIC_RUN_ID") or "none"
        values["run_id"] = elastic if elastic != "none" else time.strftime("%Y%m%d_%H%M%S_") + uuid.uuid4().hex[:6]
    if any(c in values["run_id"] for c in "/\\") or values["run_id"] in (".", ".."):
        raise ConfigError(f"RUN_ID={values['run_id']!r}: must be a plain file name")
    cfg = Config(**values)
    if "NUM_REPEATS" in environ and values["num_repeats"] != cfg.num_repeats:
        raise ConfigError(f"NUM_REPEATS={values['num_repeats']}: must equal the last phase of "
                          f"DEPTH_SCHEDULE={cfg.depth_schedule!r} ({cfg.num_repeats})")
    return cfg, notes

def config_help() -> str:
    settings = [f"  {name:<28} {f.type:<5} default {f.default!r:<38} {f.metadata['help']}"
                for name, f in CONFIG_FIELDS.items()]
    presets = [f"PRESET={name}: " + (" ".join(f"{k}={v}" for k, v in values.items()) or "the defaults")
               for name, values in PRESETS.items()]
    return "\n".join(["train_gpt.py settings (env vars):", *settings, *presets])

# ----------------------------------------------------------------------------------------------
# Distributed + device
# ----------------------------------------------------------------------------------------------

@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    compile: bool
    bf16: bool = False
    distributed = property(lambda self: self.world_size > 1)
    is_cuda = property(lambda self: self.device.type == "cuda")

    def autocast(self):
        # Off by default on CPU: without native bf16 (AMX, AVX-512 BF16) it is slower, and tests want float32 figures.
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def sync(self):
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def all_reduce(self, tensor: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=op)
        return tensor

def compile_fn(fn):
    """Static shapes, a graph per shape, under a raised recompile limit: see docs/operations.md, "Compilation"."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    return torch.compile(fn, dynamic=False)

def compile_report(log: "Logger") -> dict:
    """Graphs per compiled function, recompiles, graph breaks, logged; `eager_fallback`: functions at the limit."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters
    graphs = {f.__qualname__: len(_debug_get_cache_entry_list(f.__code__)) for f in (GPT.forward, newton_schulz)}
    report = {"graphs": sum(graphs.values()), "recompiles": sum(max(0, n - 1) for n in graphs.values()),
              "graph_breaks": sum(counters["graph_break"].values()), "per_function": graphs,
              "eager_fallback": [name for name, n in graphs.items() if n >= torch._dynamo.config.cache_size_limit]}
    log(f"compile: {report['graphs']} graphs, {report['recompiles']} recompiles, {report['graph_breaks']} graph breaks "
        f"(" + " ".join(f"{name}:{n}" for name, n in graphs.items()) + ")")
    for name in report["eager_fallback"]:
        log(f"WARNING compile_limit: {name} reached {torch._dynamo.config.cache_size_limit} graphs; later calls run "
            f"eagerly (slow): see which shapes recompile with TORCH_LOGS=recompiles")
    return report

def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))

def init_runtime(cfg: Config) -> Runtime:
    world, local_rank = world_size_from_env(), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu") == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError("DEVICE='cuda': no CUDA device is available")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout_seconds))
    auto = {"1": True, "0": False, "auto": cuda}
    return Runtime(int(os.environ.get("RANK", "0")), world, local_rank, device, auto[cfg.compile], auto[cfg.autocast])

class Logger:
    """Writes the log file, its metrics stream (the same path, .jsonl) and the console on rank 0 only (the other ranks
    pass no path). The stream holds each event's numbers as one JSON object a line: docs/outputs.md, "Metrics"."""

    def __init__(self, path: Path | None):
        self.file = self.metrics = None
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(path, "a", encoding="utf-8")
                self.metrics = open(path.with_suffix(".jsonl"), "a", encoding="utf-8")
            except OSError as e:
                raise InputError(f"cannot write the log {path}: {e.strerror}") from None

    def __call__(self, msg: str, console: bool = True):
        if self.file is not None:
            if console:
                print(msg, flush=True)
            print(msg, file=self.file, flush=True)

    def event(self, kind: str, msg: str, **numbers):
        """A log line, and the numbers it shows (unrounded) as an event of the metrics stream."""
        self(msg)
        if self.metrics is not None:
            print(json.dumps({"event": kind, "time": round(time.time(), 3), **numbers}), file=self.metrics, flush=True)

# ----------------------------------------------------------------------------------------------
# Data: shards, the training token stream, validation tokens, bits-per-byte tables
# ----------------------------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4  # the header is 256 little-endian int32

def read_shard(path: Path) -> np.ndarray:
    """Memory-maps one shard after checking its header against the file size."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(SHARD_HEADER_BYTES), os.fstat(f.fileno()).st_size
    except OSError as e:
        raise InputError(f"shard {path}: cannot read ({e.strerror})") from None
    if len(head) < SHARD_HEADER_BYTES:
        raise InputError(f"shard {path}: truncated header ({size} bytes, need {SHARD_HEADER_BYTES})")
    magic, version, count = (int(x) for x in np.frombuffer(head, dtype="<i4")[:3])
    for what, value, expected in (("wrong magic", magic, SHARD_MAGIC), ("unsupported version", version, SHARD_VERSION)):
        if value != expected:
            raise InputError(f"shard {path}: {what} {value} (expected {expected})")
    if count < 0 or size != SHARD_HEADER_BYTES + 2 * count:
        raise InputError(f"shard {path}: header declares {count} tokens ({SHARD_HEADER_BYTES + 2 * count} bytes) "
                         f"but the file has {size} bytes")
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_BYTES, shape=(count,))

def check_token_ids(tokens: np.ndarray, vocab_size: int, path: Path, offset: int) -> np.ndarray:
    if tokens.size and int(tokens.max()) >= vocab_size:
        i = int(np.argmax(tokens >= vocab_size))
        raise InputError(f"shard {path}: token id {int(tokens[i])} at position {offset + i} >= VOCAB_SIZE={vocab_size}")
    return tokens

def read_tokens(files: list[Path], vocab_size: int) -> np.ndarray:
    """Every token of the shards, in memory, each id checked against the vocabulary."""
    return np.concatenate([np.asarray(check_token_ids(read_shard(f), vocab_size, f, 0)) for f in files])

def find_shards(data_path: str, split: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(data_path), f"*_{split}_*.bin")))
    if not files:
        raise InputError(f"no *_{split}_*.bin shards in DATA_PATH={data_path}: make some with "
                         f"`python data/prepare.py` or `python data/synthetic.py`, or download the challenge's "
                         f"with `python data/fineweb.py --variant sp1024`")
    return files

class TokenStream:
    """The training shards as one endless token stream, read by step: see docs/data.md, "The training stream"."""

    def __init__(self, files: list[Path], vocab_size: int):
        self.files, self.vocab_size = files, vocab_size
        self.shards = [read_shard(f) for f in files]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.total = int(self.starts[-1])
        if self.total < 2:
            raise InputError(f"training shards hold {self.total} tokens; need at least 2")

    def read(self, start: int, length: int) -> np.ndarray:
        pieces, pos = [], start % self.total
        while length > 0:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            offset = pos - int(self.starts[i])
            piece = check_token_ids(self.shards[i][offset:offset + length], self.vocab_size, self.files[i], offset)
            pieces.append(piece)
            length, pos = length - len(piece), (pos + len(piece)) % self.total
        return np.concatenate(pieces, dtype=np.int64)

    def micro_batch(self, cfg: Config, rt: Runtime, step: int, micro: int) -> tuple[Tensor, Tensor]:
        seqs = cfg.train_batch_tokens // (cfg.train_seq_len * rt.world_size * cfg.grad_accum_steps)
        start = step * cfg.train_batch_tokens + (micro * rt.world_size + rt.rank) * seqs * cfg.train_seq_len
        buf = torch.from_numpy(self.read(start, seqs * cfg.train_seq_len + 1))
        if rt.is_cuda:
            buf = buf.pin_memory().to(rt.device, non_blocking=True)
        return buf[:-1].view(seqs, cfg.train_seq_len), buf[1:].view(seqs, cfg.train_seq_len)

def document_bounds(tokens: np.ndarray, bos_id: int) -> list[tuple[int, int]]:
    """(start, end) of each document: from its BOS to the next, which it predicts; text before the first is none."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id)
    return [(int(a), int(b)) for a, b in zip(starts, np.append(starts[1:], len(tokens) - 1)) if b > a]

class DocStream:
    """DOC_MODE's training data, a document a sequence: see docs/moe.md, "Document mode"."""

    def __init__(self, files: list[Path], cfg: Config, bos_id: int):
        self.tokens = read_tokens(files, cfg.vocab_size)
        self.docs = document_bounds(self.tokens, bos_id)[:cfg.train_subset_docs or None]
        self.seed, self.total = cfg.seed, len(self.tokens)
        if not self.docs:
            raise InputError(f"DOC_MODE: no documents (BOS id {bos_id}) in the training shards")
        self.docs_per_step = cfg.train_batch_tokens // cfg.train_seq_len
        self.steps_per_epoch = math.ceil(len(self.docs) / self.docs_per_step)

    def step_docs(self, step: int) -> list[int]:
        """The documents of a step; an epoch's last batch is filled up from the start of its order."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.docs), generator=torch.Generator().manual_seed(self.seed * 1009 + epoch))
        picks = order[index * self.docs_per_step:(index + 1) * self.docs_per_step].tolist()
        return picks + order[:self.docs_per_step - len(picks)].tolist()

    def micro_batch(self, cfg: Config, rt: Runtime, step: int, micro: int) -> tuple[Tensor, Tensor]:
        per = self.docs_per_step // (rt.world_size * cfg.grad_accum_steps)
        first = (micro * rt.world_size + rt.rank) * per
        x = torch.zeros(per, cfg.train_seq_len, dtype=torch.long)
        y = torch.full((per, cfg.train_seq_len), -100, dtype=torch.long)
        for row, doc in enumerate(self.step_docs(step)[first:first + per]):
            start, end = self.docs[doc]
            n = min(end - start, cfg.train_seq_len)
            piece = torch.from_numpy(self.tokens[start:start + n + 1].astype(np.int64))
            x[row, :n], y[row, :n] = piece[:-1], piece[1:]
        return x.to(rt.device), y.to(rt.device)

def load_validation_tokens(files: list[Path], seq_len: int, vocab_size: int) -> Tensor:
    """All validation tokens, trimmed as the challenge does to whole sequences plus one target."""
    tokens = read_tokens(files, vocab_size)
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise InputError(f"validation shards hold {len(tokens)} tokens; need more than TRAIN_SEQ_LEN={seq_len}")
    return torch.from_numpy(tokens[:usable + 1].astype(np.int64))

def read_meta(data_path: str) -> dict:
    """DATA_PATH/meta.json, which data/prepare.py writes beside its shards ({} when there is none)."""
    path = Path(data_path) / "meta.json"
    try:
        meta = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: not valid JSON") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path}: not a JSON object")
    return meta

def resolve_tokenizer(cfg: Config, meta: dict):
    """(path, tokenizer, its SHA-256), chosen and checked as docs/data.md, "Tokenizers" says."""
    import sentencepiece as spm
    path = Path(cfg.tokenizer_path or meta.get("tokenizer") or "./data/tokenizers/fineweb_1024_bpe.model")
    if not path.is_file():
        raise InputError(f"tokenizer {path} not found: set TOKENIZER_PATH to the sentencepiece .model of the data")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError):
        raise InputError(f"tokenizer {path}: not a sentencepiece model") from None
    if sp.vocab_size() > cfg.vocab_size:
        raise InputError(f"tokenizer {path} has {sp.vocab_size()} pieces but VOCAB_SIZE={cfg.vocab_size}; "
                         f"set VOCAB_SIZE to at least {sp.vocab_size()}")
    if sp.PieceToId("\u2581") == sp.unk_id():
        raise InputError(f"tokenizer {path} has no standalone '\u2581' piece: spaces would be counted as "
                         f"byte-fallback bytes and bits per byte would be wrong")
    sha, expected = hashlib.sha256(path.read_bytes()).hexdigest(), meta.get("tokenizer_sha256")
    if expected and sha != expected:
        raise InputError(f"tokenizer {path} is not the one the shards in DATA_PATH={cfg.data_path} were made with "
                         f"(meta.json's tokenizer_sha256 {expected[:12]}...): set TOKENIZER_PATH to that one")
    return path, sp, sha

@dataclass
class ByteTables:
    """Per token id of VOCAB_SIZE: bytes of its text, leading word space, boundary (control/unknown/unused)."""

    base_bytes: Tensor
    has_leading_space: Tensor
    is_boundary: Tensor

    def count(self, prev: Tensor, target: Tensor) -> Tensor:
        """Bytes credited to each target: a leading space counts unless the previous token is a boundary."""
        space = self.has_leading_space[target] & ~self.is_boundary[prev]
        return self.base_bytes[target] + space.to(self.base_bytes.dtype)

    def to(self, device) -> ByteTables:
        return ByteTables(*(t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary)))

def decoded_bytes(sp):
    """The audit's count of the bytes targets stand for, by the tokenizer's own decoder (docs/evaluation.md, "The
    audit"). Returns (bytes, slack): a run ending inside a character of byte pieces decodes it as U+FFFD (<= 3 off)."""
    boundary = {i for i in range(sp.vocab_size()) if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)}
    spaced = {i for i in range(sp.vocab_size()) if sp.IdToPiece(i).startswith("\u2581")}
    anchor = next(i for i in range(sp.vocab_size()) if i not in boundary | spaced and not sp.IsByte(i))

    def text(ids: list[int]) -> int:
        """Bytes of ids after a boundary: boundaries have none, nor has a space opening a stretch between them."""
        total = 0
        for at_boundary, stretch in itertools.groupby(ids, boundary.__contains__):
            if not at_boundary:  # decoded after a fixed piece, as the decoder drops a leading space
                stretch = list(stretch)
                total += len(sp.decode([anchor] + stretch).encode()) - len(sp.decode([anchor]).encode())
                total -= stretch[0] in spaced
        return total

    def count(tokens: Tensor, positions: Tensor) -> tuple[int, int]:
        total, slack, ids = 0, 0, tokens.tolist()
        starts = np.flatnonzero(np.diff(positions.numpy(), prepend=-2) != 1)
        for a, b in zip(starts, [*starts[1:], len(positions)]):  # a run of consecutive positions
            first, last = int(positions[a]), int(positions[b - 1])
            total += text(ids[first:last + 2]) - text(ids[first:first + 1])  # its targets, after their context
            slack += 3 * sp.IsByte(ids[last + 1])
        return total, slack
    return count

def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    base, space, boundary = [0] * vocab_size, [False] * vocab_size, [True] * vocab_size
    for i in range(sp.vocab_size()):
        if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)):
            piece = sp.IdToPiece(i)
            boundary[i], space[i] = False, piece.startswith("\u2581") and not sp.IsByte(i)
            base[i] = 1 if sp.IsByte(i) else len(piece.removeprefix("\u2581").encode("utf-8"))
    return ByteTables(torch.tensor(base, dtype=torch.int32), torch.tensor(space), torch.tensor(boundary))

# ----------------------------------------------------------------------------------------------
# Model: GPT with an application plan over physical blocks
# ----------------------------------------------------------------------------------------------

# Devices whose residual stream is bf16 under autocast (half the bytes): on a CPU that is slower (perf_notes 23).
BF16_RESIDUAL_DEVICES = ("cuda",)

def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype

def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))

def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x[..., :x.size(-1) // 2], x[..., x.size(-1) // 2:]  # slices, not chunk: inductor fuses them differently
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)

class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, rope_base: float, qk_gain_init: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        kv_dim = num_kv_heads * self.head_dim
        self.c_q, self.c_k, self.c_v, self.proj = (nn.Linear(dim, n, bias=False) for n in (dim, kv_dim, kv_dim, dim))
        nn.init.zeros_(self.proj.weight)  # each block starts as the identity on the residual stream
        self.q_gain = nn.Parameter(torch.full((num_heads,), qk_gain_init))
        inv_freq = 1.0 / rope_base ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor, value_embed: Tensor | None = None, exclusive: bool = False) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        v = v if value_embed is None else v + value_embed
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in (q, k, v))
        freqs = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), self.inv_freq.to(x.device))
        cos, sin = freqs.cos()[None, None], freqs.sin()[None, None]
        q = apply_rotary(rms_norm(q), cos, sin) * self.q_gain.to(q.dtype)[None, :, None, None]
        k = apply_rotary(rms_norm(k), cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads)
        if exclusive:
            y = exclude_own_value(y, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))

def exclude_own_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: removes from each head's output its component along the position's own value (broadcast per KV group)."""
    b, h, t, d = y.shape
    unit = F.normalize(v, dim=-1).unsqueeze(2)
    y = y.view(b, v.size(1), h // v.size(1), t, d)
    return (y - (y * unit).sum(-1, keepdim=True) * unit).view(b, h, t, d)

def squared(x: Tensor) -> Tensor:
    return x * x  # not x.square(), a pow: CUDA's autocast runs it in float32 (twice the bytes; grouped_mm refuses it)

ACTIVATIONS = {"relu2": lambda x: squared(F.relu(x)), "leaky_relu2": lambda x: squared(F.leaky_relu(x, 0.5))}

class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc, self.proj = nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, dim, bias=False)
        self.activation = ACTIVATIONS[activation]
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        return self.proj(self.activation(self.fc(x))), None  # no balancing losses, unlike an MoE FFN

# Mixture-of-experts FFN: token-choice top-k over two-matrix experts with biases, optionally frozen: docs/moe.md ---

def random_matrix(rows: int, cols: int, init: str, sparsity: float, gain: float, gen: torch.Generator) -> Tensor:
    """W for x @ W: outputs of variance gain² for inputs of unit variance; the schemes: docs/moe.md, "Init"."""
    if init == "orthogonal":
        return nn.init.orthogonal_(torch.empty(rows, cols), generator=gen) * gain * math.sqrt(cols / min(rows, cols))
    if init == "normal":
        return torch.randn(rows, cols, generator=gen) * gain / math.sqrt(rows)
    zeros = min(rows - 1, math.ceil(sparsity * rows))
    w = torch.randn(rows, cols, generator=gen) * gain / math.sqrt(rows - zeros)
    return w.scatter_(0, torch.rand(rows, cols, generator=gen).topk(zeros, dim=0).indices, 0.0)

GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

def expert_matmul(rows: Tensor, weight: Tensor, offsets: Tensor, experts_of_rows: Tensor) -> Tensor:
    """rows (expert e's are rows offsets[e-1]:offsets[e]) @ weight[e]; when to pad: docs/moe.md, "Padded fallback"."""
    weight = weight.to(rows.dtype)
    aligned = all((d * rows.element_size()) % 16 == 0 for d in weight.shape[1:])
    eager_cpu_f32 = rows.dtype == torch.float32 and rows.device.type == "cpu" and not torch.compiler.is_compiling()
    if GROUPED_MM is not None and aligned and (rows.dtype == torch.bfloat16 or eager_cpu_f32):
        return GROUPED_MM(rows, weight, offs=offsets)
    return padded_expert_matmul(rows, weight, offsets, experts_of_rows)

def padded_expert_matmul(rows: Tensor, weight: Tensor, offsets: Tensor, experts_of_rows: Tensor) -> Tensor:
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    capacity = int(counts.max()) if len(rows) else 0
    slot = torch.arange(len(rows), device=rows.device) - (offsets - counts).long()[experts_of_rows]
    padded = rows.new_zeros(weight.size(0), capacity, weight.size(1))
    padded[experts_of_rows, slot] = rows
    return torch.bmm(padded, weight)[experts_of_rows, slot]

class SlotGather(torch.autograd.Function):
    """rows[order // k], k slots a row; the backward a gather by `inverse`, no scatter-add (docs/moe.md, "Dispatch")."""

    @staticmethod
    def forward(ctx, rows: Tensor, order: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return rows[order // k] if k > 1 else rows[order]

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad[ctx.saved_tensors[0]]
        return grad.view(-1, ctx.k, grad.size(-1)).sum(1) if ctx.k > 1 else grad, None, None, None

class MoE(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        dim, num_experts, d_ffn, activation = spec.model_dim, spec.moe_experts, spec.moe_expert_width, spec.activation
        self.num_experts, self.top_k, self.frozen, self.layer = num_experts, spec.moe_top_k, spec.moe_frozen, layer
        self.activation = ACTIVATIONS[activation]
        self.router = nn.Linear(dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=math.sqrt(0.1 / dim))  # Switch's scale-0.1 router init
        for name, shape in (("w1", (num_experts, dim, d_ffn)), ("b1", (num_experts, d_ffn)),
                            ("w2", (num_experts, d_ffn, dim)), ("b2", (num_experts, dim))):
            if self.frozen:
                self.register_buffer(name, torch.empty(shape), persistent=False)
            else:
                setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.register_buffer("route_bias", torch.zeros(num_experts))
        # Slots routed to each expert since last read: [training, evaluation]; and in this step.
        self.register_buffer("load", torch.zeros(2, num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("step_load", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        if self.w1.is_meta:
            return  # a dry run counts parameters and allocates nothing
        out_gain = 1 / math.sqrt({"relu2": 1.5, "leaky_relu2": 1.5 + 3 / 32}[activation])  # E[act(z)²], z ~ N(0, 1)
        with torch.no_grad():
            for e in range(num_experts):  # a generator per expert: any one can be regenerated alone, anywhere
                digest = hashlib.sha256(f"moe-expert:{spec.seed}:{layer}:{e}".encode()).digest()
                gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
                self.w1[e] = random_matrix(dim, d_ffn, spec.moe_init, spec.moe_sparsity, 1.0, gen)
                self.w2[e] = random_matrix(d_ffn, dim, spec.moe_init, spec.moe_sparsity, out_gain, gen)
                self.b1[e] = (torch.rand(d_ffn, generator=gen) * 2 - 1) / math.sqrt(dim)  # as nn.Linear's biases
                self.b2[e] = (torch.rand(dim, generator=gen) * 2 - 1) / math.sqrt(d_ffn)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tokens = x.reshape(-1, x.size(-1))
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(tokens.float(), self.router.weight.float())
        choice = (logits + self.route_bias).topk(self.top_k, dim=-1).indices  # (T, k)
        gates = torch.softmax(logits.gather(-1, choice), dim=-1)
        experts = choice.flatten()  # slot t*k + j is token t's j-th choice
        order = torch.argsort(experts, stable=True)
        # Not bincount: its output's length depends on the data, which breaks the compiled graph.
        counts = experts.new_zeros(self.num_experts).index_add_(0, experts, torch.ones_like(experts))
        offsets = counts.cumsum(0).to(torch.int32)
        sorted_experts = experts[order]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=x.device))
        rows = SlotGather.apply(tokens.to(compute_dtype(x)), order, inverse, self.top_k)
        h = expert_matmul(rows, self.w1, offsets, sorted_experts) + self.b1[sorted_experts].to(rows.dtype)
        y = expert_matmul(self.activation(h), self.w2, offsets, sorted_experts) + self.b2[sorted_experts].to(h.dtype)
        y = SlotGather.apply(y, inverse, order, 1).view(-1, self.top_k, y.size(-1))  # back in slot order
        out = (y * gates.unsqueeze(-1).to(y.dtype)).sum(1)  # in the compute dtype, as a dense FFN's output
        with torch.no_grad():
            self.load[0 if self.training else 1] += counts
            if self.training:
                self.step_load += counts
        return out.view_as(x), self.balancing_loss(logits, counts)

    def balancing_loss(self, logits: Tensor, counts: Tensor) -> Tensor:
        """Switch's load-balancing loss E * sum_i f_i P_i (1 when balanced) and the router z-loss, unweighted."""
        fraction = counts.float() / counts.sum().clamp_min(1)
        switch = self.num_experts * (fraction * torch.softmax(logits, dim=-1).mean(0)).sum()
        return torch.stack((switch, logits.logsumexp(-1).square().mean()))

    @torch.no_grad()
    def nudge_route_bias(self, rate: float, load: Tensor):
        """Auxiliary-loss-free balancing: experts above the mean load become less likely to be chosen."""
        self.route_bias += rate * torch.sign(load.mean() - load).to(self.route_bias.dtype)

class Block(nn.Module):
    """Attention then the FFN slot (an MoE in spec.moe_blocks), each scaled per channel; resid_mix blends in x0."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        dim = spec.model_dim
        self.attn = Attention(dim, spec.num_heads, spec.num_kv_heads, spec.rope_base, spec.qk_gain_init)
        self.ffn = MoE(spec, layer) if layer in spec.moe_blocks else MLP(dim, spec.mlp_hidden, spec.activation)
        self.attn_scale, self.ffn_scale = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))

    def forward(self, x: Tensor, x0: Tensor, value_embed: Tensor | None = None, exclusive: bool = False):
        """The new residual stream, and an MoE FFN's (load-balancing, z) losses (None for a dense FFN)."""
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x), value_embed, exclusive)
        out, balance = self.ffn(rms_norm(x))
        return x + self.ffn_scale.to(x.dtype) * out, balance

class GPT(nn.Module):
    """Token embedding -> blocks walked along `plan`, (block, pass) per effective layer -> head: docs/recurrence.md."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec, self.max_repeats = spec, spec.num_repeats
        dim, vocab, depth = spec.model_dim, spec.vocab_size, spec.num_layers * spec.num_repeats
        self.tok_emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(spec, layer) for layer in range(spec.num_layers))
        recurrent, n_value = spec.num_repeats > 1, spec.num_value_embeds
        self.skip_weights = None if recurrent else nn.Parameter(torch.ones(depth // 2, dim))
        self.loop_embeds = nn.Parameter(torch.zeros(depth, dim)) if recurrent else None
        self.repeat_skips = nn.Parameter(torch.zeros(spec.num_repeats - 1, spec.num_layers, dim)) if recurrent else None
        kv_dim = spec.num_kv_heads * (dim // spec.num_heads)
        self.value_embeds = nn.Parameter(torch.randn(n_value, vocab, kv_dim) * 0.5) if n_value else None
        self.value_scales = nn.Parameter(torch.full((depth, n_value), 0.1)) if n_value else None
        self.lm_head = None if spec.tie_embeddings else nn.Linear(dim, vocab, bias=False)
        if self.lm_head is None:
            nn.init.normal_(self.tok_emb.weight, std=spec.tied_embed_init_std)
        else:
            nn.init.zeros_(self.lm_head.weight)
        self.set_repeats(spec.num_repeats)

    def set_repeats(self, repeats: int):
        """The depth to run: the first `repeats` passes. A change triggers one recompile under torch.compile."""
        if not 1 <= repeats <= self.max_repeats:
            raise ValueError(f"repeats must be in 1..{self.max_repeats}, got {repeats}")
        self.repeats = repeats
        self.plan = [(block, p) for p in range(repeats) for block in range(self.spec.num_layers)]

    def hidden(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """The final hidden states, and the MoE layers' (load-balancing, z) losses summed (None if dense)."""
        x = self.tok_emb(idx)
        # Cast after the norm (CUDA's autocast may run rms_norm in float32).
        x = rms_norm(x).to(compute_dtype(x) if x.device.type in BF16_RESIDUAL_DEVICES else x.dtype)
        x0, skips, previous, balance = x, [], {}, None
        tables = None if self.value_embeds is None else self.value_embeds[:, idx].to(x.dtype)  # (E, B, T, kv)
        n_encoder = len(self.plan) // 2 if self.skip_weights is not None else 0
        for layer, (block, p) in enumerate(self.plan):
            if layer >= n_encoder and skips:
                x = x + self.skip_weights[layer - n_encoder].to(x.dtype) * skips.pop()
            if self.loop_embeds is not None:
                x = x + self.loop_embeds[layer].to(x.dtype)
            if p > 0:
                x = x + self.repeat_skips[p - 1, block].to(x.dtype) * previous[block]
            ve = None if tables is None else torch.einsum("e,ebtk->btk", self.value_scales[layer].to(x.dtype), tables)
            x, layer_balance = self.blocks[block](x, x0, ve, layer >= len(self.plan) - self.spec.xsa_last_n)
            if layer_balance is not None:
                balance = layer_balance if balance is None else balance + layer_balance
            previous[block] = x
            if layer < n_encoder:
                skips.append(x)
        return rms_norm(x), balance

    def head(self, h: Tensor) -> Tensor:
        raw = (F.linear(h, self.tok_emb.weight) if self.lm_head is None else self.lm_head(h)).float()
        return self.spec.logit_softcap * torch.tanh(raw / self.spec.logit_softcap)

    def forward(self, idx: Tensor, targets: Tensor | None = None, reduction: str = "mean", last: int = 0) -> Tensor:
        """Cross-entropy in nats (targets of -100 unscored): the mean, plus weighted MoE balancing losses, or per token.
        Without targets, what evaluation scores: the log next-token distributions of each row's `last` positions."""
        h, balance = self.hidden(idx)
        if targets is None:
            return F.log_softmax(self.head(h[:, -last:] if last else h), dim=-1)
        loss = F.cross_entropy(self.head(h).flatten(0, 1), targets.reshape(-1), reduction=reduction)
        if reduction != "mean":
            return loss.view_as(targets)
        aux, z = self.spec.moe_aux_coef, self.spec.moe_zloss_coef
        if balance is not None and (aux or z):
            loss = loss + aux * balance[0] + z * balance[1]
        return loss

def moe_modules(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]

def parse_moe_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    named = {"all": range(num_layers), "every2": range(1, num_layers, 2)}
    try:
        layers = set(named[spec]) if spec in named else {int(item) for item in spec.split(",")}
    except ValueError:
        raise ConfigError(f"MOE_LAYERS={spec!r}: expected all, every2 or a list of block indices like 0,2,5") from None
    if not layers <= set(range(num_layers)):
        raise ConfigError(f"MOE_LAYERS={spec!r}: block indices must be in 0..{num_layers - 1}")
    return tuple(sorted(layers))

def parameter_counts(model: GPT) -> dict:
    """Frozen experts count in params_total, not in params_stored (the artifact's); active: top_k experts a layer."""
    experts = [(m, t) for m in moe_modules(model) for t in (m.w1, m.b1, m.w2, m.b2)]
    total = sum(p.numel() for p in model.parameters()) + sum(t.numel() for m, t in experts if m.frozen)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    active = total - sum(t.numel() for _, t in experts) + sum(m.top_k * t[0].numel() for m, t in experts)
    return {"params_total": total, "params_trainable": trainable, "params_trainable_pct": 100 * trainable / total,
            "params_active_per_token": active, "params_stored": sum(t.numel() for t in model.state_dict().values())}

# ----------------------------------------------------------------------------------------------
# Optimizers and schedules
# ----------------------------------------------------------------------------------------------

def newton_schulz(grad: Tensor, steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Approximately orthogonalises grad (pushes its singular values toward 1) with a quintic iteration."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # a stack of matrices (MoE experts) is one each
    transposed = x.size(-2) > x.size(-1)
    x = x.mT if transposed else x
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x

class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then orthogonalised updates batched by shape, shared out over ranks: docs/operations.md."""

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float,
                 rank: int = 0, world_size: int = 1, ns_dtype: torch.dtype = torch.float32, compile: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay))
        self.rank, self.world_size, self.ns_dtype = rank, world_size, ns_dtype
        # Compiled, the iteration's ~15 small kernels a shape batch fuse into a few: one graph per batch shape.
        self.orthogonalise = compile_fn(newton_schulz) if compile else newton_schulz

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            # Every rank keeps all buffers (alike, as the gradients are): rank 0 alone saves them; a resume may reshard.
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)
            grads, buffers = [p.grad for p in params], [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            directions = torch._foreach_add(grads, buffers, alpha=group["momentum"])  # Nesterov
            # In Newton-Schulz's dtype: bf16 updates lose nothing in a bf16 buffer, and its all-reduce halves.
            flat = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            slots = flat.split([p.numel() for p in params])
            for mine in self.shape_batches(params):
                # A lone matrix is not stacked: as a batch of one it would take the batched-matmul kernel.
                batch = torch.stack([directions[i] for i in mine]) if len(mine) > 1 else directions[mine[0]]
                updates = self.orthogonalise(batch, group["backend_steps"], self.ns_dtype).reshape(len(mine), -1)
                updates *= max(1.0, batch.size(-2) / batch.size(-1)) ** 0.5
                torch._foreach_copy_([slots[i] for i in mine], updates.unbind())
            if self.world_size > 1:
                dist.all_reduce(flat)
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, [s.view_as(p).to(p.dtype) for s, p in zip(slots, params)], alpha=-group["lr"])

    def shape_batches(self, params: list[Tensor]) -> list[list[int]]:
        """Rank r's matrices of a shape (r, r+W, ...) as a batch; on a CPU past 192 a side, one each (perf_notes 14)."""
        batches = []
        for shape in dict.fromkeys(p.shape for p in params):  # in order of first appearance
            mine = [i for i, p in enumerate(params) if p.shape == shape][self.rank::self.world_size]
            if params[0].device.type == "cpu" and min(shape[-2:]) > 192:
                batches += [[i] for i in mine]
            elif mine:
                batches.append(mine)
        return batches

def build_optimizers(model: GPT, cfg: Config, rt: Runtime) -> list[torch.optim.Optimizer]:
    """Muon (Adam if MATRIX_OPTIMIZER=adam) for the matrices in blocks, MoE expert stacks too; Adam for the rest."""
    groups = {"matrices": [], "embedding": [], "head": [], "scalars": []}
    kinds = {"tok_emb.weight": "embedding", "value_embeds": "embedding", "lm_head.weight": "head"}
    for name, p in model.named_parameters():
        groups["matrices" if name.startswith("blocks.") and p.ndim >= 2 else kinds.get(name, "scalars")].append(p)
    lrs = {"embedding": cfg.tied_embed_lr if cfg.tie_embeddings else cfg.embed_lr, "scalars": cfg.scalar_lr,
           "head": cfg.head_lr, "matrices": cfg.matrix_lr}  # Adam's groups come in this order
    on_adam = [name for name in lrs if groups[name] and (name != "matrices" or cfg.matrix_optimizer == "adam")]
    adam_groups = [dict(params=groups[name], lr=lrs[name], base_lr=lrs[name], name=name) for name in on_adam]
    adam = torch.optim.Adam(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=rt.is_cuda)
    if cfg.matrix_optimizer == "adam":
        return [adam]
    muon = Muon(groups["matrices"], lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                weight_decay=cfg.muon_wd, rank=rt.rank, world_size=rt.world_size,
                ns_dtype=torch.bfloat16 if rt.bf16 else torch.float32, compile=rt.compile)
    muon.param_groups[0].update(base_lr=cfg.matrix_lr, name="matrices")
    return [adam, muon]

def lr_scale(cfg: Config, step: int, elapsed_ms: float) -> float:
    """LR multiplier: linear warm-up, 1, then linear warm-down to 0, timed when capped (docs/operations.md)."""
    warm = min(1.0, (step + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps else 1.0
    return warm * warmdown_factor(cfg, step, elapsed_ms)

def warmdown_factor(cfg: Config, step: int, elapsed_ms: float) -> float:
    if cfg.warmdown_iters == 0:
        return 1.0
    down = min(1.0, max(0.0, (cfg.iterations - step) / cfg.warmdown_iters))
    if cfg.train_budget_ms and step > 0:
        remaining_ms = cfg.train_budget_ms - elapsed_ms
        down = min(down, max(0.0, remaining_ms / max(cfg.warmdown_iters * elapsed_ms / step, 1e-9)))
    return down

def budget_progress(cfg: Config, step: int, elapsed_ms: float) -> float:
    """The fraction of the budget used: of the wall clock when capped, of the steps, whichever is further."""
    steps = step / cfg.iterations
    return max(steps, elapsed_ms / cfg.train_budget_ms) if cfg.train_budget_ms else steps

WARMDOWN_EARLY = 0.5  # a warm-down starting before this fraction of the budget is logged as a warning

def check_warmdown(cfg: Config, step_ms: float, log: Logger):
    """After step 1, a warning if the warm-down starts early: WARMDOWN_ITERS counts steps, and a short capped run
    that takes fewer would train at a fraction of its learning rate from the start."""
    steps = min(cfg.iterations, cfg.train_budget_ms / step_ms) if cfg.train_budget_ms else cfg.iterations
    start = max(0.0, 1 - cfg.warmdown_iters / steps)
    if cfg.warmdown_iters and start < WARMDOWN_EARLY:
        fitting, scale = int((1 - WARMDOWN_EARLY) * steps), lr_scale(cfg, 1, step_ms)
        log.event("warning", f"warning: warmdown_early: WARMDOWN_ITERS={cfg.warmdown_iters} starts the warm-down at "
                             f"{start:.0%} of the budget ({step_ms:.0f}ms a step, about {steps:.0f} steps): the LR "
                             f"multiplier at step 1 is {scale:.3f}; WARMDOWN_ITERS={fitting} would start it at "
                             f"{WARMDOWN_EARLY:.0%}", warmdown_start=start, lr_scale_step1=scale, steps=steps,
                  fitting_warmdown_iters=fitting)

def muon_momentum_at(cfg: Config, step: int) -> float:
    frac = min(1.0, step / cfg.muon_momentum_warmup_steps) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum

# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------

def train_step(cfg: Config, rt: Runtime, train_model: nn.Module, params: list[Tensor],
               optimizers: list[torch.optim.Optimizer], stream: TokenStream, step: int, scale: float,
               clock_ms=lambda: 0.0, noticed=lambda: False) -> tuple[Tensor, float, bool]:
    """One optimizer step over the global batch: this rank's mean loss (a tensor), the clock the ranks agree on, and
    whether any rank has `noticed` a preemption signal."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * scale
            if isinstance(opt, Muon):
                group["momentum"] = muon_momentum_at(cfg, step)
        opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=rt.device)
    for micro in range(cfg.grad_accum_steps):
        x, y = stream.micro_batch(cfg, rt, step, micro)
        sync = train_model.no_sync() if rt.distributed and micro < cfg.grad_accum_steps - 1 else nullcontext()
        with sync, rt.autocast():
            loss = train_model(x, y)
        (loss / cfg.grad_accum_steps).backward()
        total += loss.detach()
    norm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip_norm) if cfg.grad_clip_norm > 0 else
            torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
    # The step's one host sync: the ranks agree on the clock (so LR schedules and the stop agree) and on a
    # preemption notice (so all checkpoint at the same step), and learn whether the gradient is finite, before any
    # weight moves.
    verdict = torch.tensor([clock_ms(), 0.0, noticed()], dtype=torch.float64, device=rt.device)
    verdict[1] = (~torch.isfinite(norm)).double()
    elapsed_ms, non_finite, preempted = rt.all_reduce(verdict, dist.ReduceOp.MAX).tolist()
    if non_finite:
        raise Diverged(step + 1, "loss" if not bool(torch.isfinite(total)) else "gradient", optimizers)
    for opt in optimizers:
        opt.step()
    for moe in moe_modules(train_model):
        if cfg.moe_bias_update:
            # Every rank nudges by the global load, so the biases stay identical across ranks.
            moe.nudge_route_bias(cfg.moe_bias_update, rt.all_reduce(moe.step_load.clone()))
        moe.step_load.zero_()
    return total / cfg.grad_accum_steps, elapsed_ms, bool(preempted)

class Diverged(Exception):
    """A non-finite loss or gradient, before the weights move, naming the first parameter at fault."""

    def __init__(self, step: int, what: str, optimizers: list[torch.optim.Optimizer]):
        culprits = (f"{group['name']}, tensor {i} of shape {tuple(p.shape)}" for opt in optimizers
                    for group in opt.param_groups for i, p in enumerate(group["params"])
                    if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
        group = next(culprits, "none: the gradient norm overflowed")
        super().__init__(f"non-finite {what} at step {step} (parameter group: {group})")

EXIT_PREEMPTED = 5
PREEMPTION_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGUSR1: "SIGUSR1"}  # SLURM's --signal sends SIGUSR1

class Preempted(Exception):
    """A scheduler's notice: every rank checkpointed at the same step boundary, and the run stops to be resumed."""

    @classmethod
    def at(cls, cfg: Config, step: int, notices: list, checkpoint: Path) -> "Preempted":
        notice = PREEMPTION_SIGNALS[notices[0]] if notices else "a signal to another rank"
        return cls(f"preempted: {notice} at step {step}: checkpoint {checkpoint}; to continue: the same command with "
                   f"RESUME_FROM=auto RUN_ID={cfg.run_id}")

@contextmanager
def preemption_notices():
    """While it lasts, SIGTERM and SIGUSR1 are only noted (the list yielded), for the loop to act on at the next
    step boundary; before and after (setup, evaluations) they end the process as they always did."""
    notices = []
    previous = {sig: signal.signal(sig, lambda signum, frame: notices.append(signum)) for sig in PREEMPTION_SIGNALS}
    try:
        yield notices
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

def untimed_warmup(cfg: Config, rt: Runtime, pieces: "Pieces", stream: TokenStream, log: Logger):
    """WARMUP_STEPS untimed steps at every depth of the schedule (compilation, allocator); then all goes back."""
    if cfg.warmup_steps == 0:
        return
    model, optimizers = pieces.model, pieces.optimizers
    weights, states, repeats = copy.deepcopy((model.state_dict(), [o.state_dict() for o in optimizers], model.repeats))
    for depth, _ in cfg.depth_phases:
        model.set_repeats(depth)
        for step in range(cfg.warmup_steps):
            train_step(cfg, rt, pieces.train_model, list(model.parameters()), optimizers, stream, step, 1.0)
            if step + 1 in (1, cfg.warmup_steps) or (step + 1) % 10 == 0:
                log(f"warmup_step:{step + 1}/{cfg.warmup_steps}" + (f" repeats:{depth}" if cfg.depth_schedule else ""))
    model.load_state_dict(weights)
    for opt, state in zip(optimizers, states):
        opt.load_state_dict(state)
    model.set_repeats(repeats)
    for moe in moe_modules(model):
        moe.load.zero_()  # the warm-up's routing is not the run's

# The loop's parts: each owns its state and says when it acts -------------------------------------

class Clock:
    """Training time in ms. Validation and checkpoints pause it; at a pause the ranks agree on it."""

    def __init__(self, rt: Runtime, start_ms: float):
        self.rt, self.banked_ms = rt, start_ms
        rt.sync()
        self.t0 = time.perf_counter()

    def ms(self) -> float:
        return self.banked_ms + 1000 * (time.perf_counter() - self.t0)

    @contextmanager
    def paused(self):
        self.rt.sync()
        self.banked_ms = over_ranks(self.rt, [self.ms()], dist.ReduceOp.MAX)[0]
        yield self.banked_ms
        self.rt.sync()
        self.t0 = time.perf_counter()

class DepthSchedule:
    """The passes the model runs from each fraction of the budget on; see docs/recurrence.md, "The depth schedule"."""

    def __init__(self, cfg: Config, model: GPT, log: Logger):
        self.phases = cfg.depth_phases if cfg.depth_schedule else ()
        self.model, self.log = model, log
        self.changes: list[dict] = []  # {repeats, step, frac} of each change, for the summary

    def update(self, step: int, progress: float) -> bool:
        """The depth of this point of the budget; True when that is a change."""
        return bool(self.phases) and self.set([r for r, start in self.phases if start <= progress][-1], step, progress)

    def finish(self, step: int) -> bool:
        """Full depth, at which the model is evaluated and exported."""
        return self.model.repeats != self.model.max_repeats and self.set(self.model.max_repeats, step, 1.0)

    def set(self, repeats: int, step: int, progress: float) -> bool:
        if repeats == self.model.repeats and self.changes:
            return False
        self.model.set_repeats(repeats)
        self.changes.append({"repeats": repeats, "step": step, "frac": progress})
        self.log.event("depth_phase", f"depth_phase repeats:{repeats} step:{step} frac:{progress:.4f}",
                       repeats=repeats, step=step, frac=progress)
        return True

    def state_dict(self) -> dict:
        return {"repeats": self.model.repeats, "phases": self.changes}

    def load_state_dict(self, state: dict):
        self.model.set_repeats(int(state["repeats"]))
        self.changes = [dict(phase) for phase in state["phases"]]

class WeightAverage:
    """SWA or EMA of the weights at full depth; see docs/recurrence.md, "Weight averaging: SWA and EMA"."""

    def __init__(self, kind: str, decay: float = 0.0, start_frac: float = 0.0, every: int = 1):
        self.kind, self.decay, self.start_frac, self.every = kind, decay, start_frac, every
        self.reset()

    def reset(self):
        self.sums, self.count, self.last_step = {}, 0, -1

    def due(self, model: GPT, step: int, progress: float) -> bool:
        return self.kind != "none" and model.repeats == model.max_repeats and (
            self.kind == "ema" or (step % self.every == 0 and progress >= self.start_frac))

    def add(self, model: nn.Module, step: int):
        for name, t in model.state_dict().items():
            t = t.detach().float()
            if name not in self.sums:
                self.sums[name] = t.clone()
            elif self.kind == "ema":
                self.sums[name].lerp_(t, 1 - self.decay)
            else:
                self.sums[name] += t
        self.count, self.last_step = self.count + 1, step

    def average(self, like: dict[str, Tensor]) -> dict[str, Tensor]:
        divisor = 1 if self.kind == "ema" else self.count
        return {name: (total / divisor).to(like[name].dtype) for name, total in self.sums.items()}

    def state_dict(self) -> dict:
        return {"sums": self.sums, "count": self.count, "last_step": self.last_step}

    def load_state_dict(self, state: dict, device):
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.count, self.last_step = int(state["count"]), int(state["last_step"])

class Validator:
    """Validation every VAL_LOSS_EVERY steps, at each epoch's end and the last step; per-token losses."""

    def __init__(self, cfg: Config, rt: Runtime, evaluator: "Evaluator", stream, log: Logger):
        self.cfg, self.rt, self.evaluator, self.log = cfg, rt, evaluator, log
        self.steps_per_epoch = getattr(stream, "steps_per_epoch", 0)
        self.val_loss = self.val_bpb = float("nan")
        self.moe = None  # the expert load of the last validation
        self.epoch_loss, self.epoch_steps = torch.zeros((), device=rt.device), 0

    def due(self, step: int, last: bool) -> tuple[bool, bool, bool]:
        """Whether this step validates, ends an epoch, saves every target's loss."""
        cfg = self.cfg
        epoch_end = bool(cfg.epochs) and step > 0 and step % self.steps_per_epoch == 0
        validate = last or epoch_end or bool(cfg.val_loss_every and step % cfg.val_loss_every == 0)
        return validate, epoch_end, bool(cfg.per_token_loss_every and step % cfg.per_token_loss_every == 0)

    def add_train_loss(self, loss: Tensor):
        self.epoch_loss += loss.detach()
        self.epoch_steps += 1

    def run(self, pieces: "Pieces", step: int, train_ms: float, validate: bool, epoch_end: bool, per_token: bool):
        cfg, log = self.cfg, self.log
        if validate:
            self.val_loss, self.val_bpb = self.evaluator.standard(pieces.compiled, "val")
            log.event("val", f"step:{step}/{cfg.iterations} val_loss:{self.val_loss:.4f} val_bpb:{self.val_bpb:.4f} "
                             f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(step, 1):.2f}ms",
                      step=step, val_loss=self.val_loss, val_bpb=self.val_bpb, train_time_ms=train_ms)
            self.moe = moe_statistics(pieces.model, self.rt, "val", log, step)
        if epoch_end:
            # A resumed run's first epoch line averages only the steps since the resume.
            loss = float(self.rt.all_reduce(self.epoch_loss.clone())) / self.rt.world_size / max(self.epoch_steps, 1)
            epoch = step // self.steps_per_epoch
            log.event("epoch", f"epoch:{epoch}/{cfg.epochs} train_loss:{loss:.4f} val_loss:{self.val_loss:.4f} "
                               f"val_ppl:{math.exp(min(self.val_loss, 700)):.2f} val_bpb:{self.val_bpb:.4f}",
                      step=step, epoch=epoch, train_loss=loss, val_loss=self.val_loss, val_bpb=self.val_bpb)
            self.epoch_loss.zero_()
            self.epoch_steps = 0
        if per_token:
            save_per_token(cfg, self.evaluator, pieces.compiled, f"step_{step:06d}", step, log)

def train(cfg: Config, rt: Runtime, pieces: "Pieces", stream: TokenStream, evaluator: "Evaluator", log: Logger,
          notices: list) -> tuple[dict, WeightAverage]:
    """Trains until ITERATIONS or the wall-clock cap, or checkpoints and stops at the step boundary after preemption
    `notices`; returns the summary's training figures and the weight average."""
    model = pieces.model
    depth = DepthSchedule(cfg, model, log)
    average = WeightAverage(cfg.weight_average, cfg.ema_decay, cfg.swa_start_frac, cfg.swa_every)
    checkpointer = Checkpointer(cfg, rt, log)
    validator = Validator(cfg, rt, evaluator, stream, log)
    step, train_ms = checkpointer.resume(pieces, depth, average)
    params, moe_train, warming_down = list(model.parameters()), None, False
    stop = bool(cfg.train_budget_ms) and train_ms >= cfg.train_budget_ms  # resumed where the cap stopped it
    try:
        untimed_warmup(cfg, rt, pieces, stream, log)
        clock, elapsed = Clock(rt, train_ms), train_ms
        while True:
            if depth.update(step, budget_progress(cfg, step, elapsed)):
                average.reset()  # an average mixes weights of one depth only
            last = stop or step == cfg.iterations
            if any(due := validator.due(step, last)):
                with clock.paused() as train_ms:
                    validator.run(pieces, step, train_ms, *due)
            if last:
                break
            if cfg.fault_at_step and step == cfg.fault_at_step and cfg.fault_rank in (-1, rt.rank):
                os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no message
            if not warming_down and warmdown_factor(cfg, step, elapsed) < 1:
                warming_down = True
                log.event("warmdown", f"warmdown_start step:{step} train_time:{elapsed:.0f}ms", step=step,
                          train_time_ms=elapsed)
            # `elapsed` is the clock the ranks agreed on in the previous step, so their LRs are identical.
            loss, elapsed, preempted = train_step(cfg, rt, pieces.train_model, params, pieces.optimizers, stream, step,
                                                  lr_scale(cfg, step, elapsed), clock.ms, lambda: bool(notices))
            step += 1
            if step == 1:
                check_warmdown(cfg, elapsed, log)
            validator.add_train_loss(loss)
            if step <= 10 or step % cfg.train_log_every == 0 or step == cfg.iterations:
                train_log_line(cfg, step, float(rt.all_reduce(loss.clone())) / rt.world_size, elapsed, log)
                moe_train = moe_statistics(model, rt, "train", log, step) or moe_train
            if average.due(model, step, budget_progress(cfg, step, elapsed)):
                average.add(model, step)
            if checkpointer.due(step, elapsed) or preempted:
                with clock.paused() as train_ms:
                    checkpointer.save(pieces, step, train_ms, depth, average)
            if preempted:
                raise Preempted.at(cfg, step, notices, checkpointer.last)
            if cfg.train_budget_ms and elapsed >= cfg.train_budget_ms and step < cfg.iterations:
                stop = True
                log.event("stop", f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms "
                                  f"step:{step}/{cfg.iterations}", step=step, train_time_ms=elapsed)
        if over_ranks(rt, [len(notices)], dist.ReduceOp.MAX)[0]:  # in the last validation: all but the evaluations
            checkpointer.save(pieces, step, train_ms, depth, average)
            raise Preempted.at(cfg, step, notices, checkpointer.last)
    except Diverged as e:
        log(f"error: {e}; last good checkpoint: {checkpointer.last or 'none'}")
        log(f"to continue with a lower learning rate: RESUME_FROM={checkpointer.last or '<a checkpoint>'} RUN_ID="
            f"{cfg.run_id} MATRIX_LR={cfg.matrix_lr / 2:g} SCALAR_LR={cfg.scalar_lr / 2:g} "
            f"TIED_EMBED_LR={cfg.tied_embed_lr / 2:g} (and CHECKPOINT_EVERY_STEPS to checkpoint more often)")
        raise
    if depth.finish(step):
        average.reset()
    if average.kind != "none" and average.last_step != step:
        average.add(model, step)
    moe = moe_statistics(model, rt, "train") or moe_train  # the steps since the last log line, else that line's
    if moe and validator.moe:
        moe = {**moe, "val": validator.moe}
    return {"steps": step, "train_time_ms": train_ms, "val_loss": validator.val_loss, "val_bpb": validator.val_bpb,
            **({"depth_phases": depth.changes} if cfg.depth_schedule else {}), **({"moe": moe} if moe else {})}, average

def train_log_line(cfg: Config, step: int, loss: float, elapsed_ms: float, log: Logger):
    """The step's figures and the training time left: of the wall-clock cap, or at this pace of the steps left."""
    left_s = (cfg.iterations - step) * elapsed_ms / step / 1000
    if cfg.train_budget_ms:
        left_s = min(left_s, max(0.0, cfg.train_budget_ms - elapsed_ms) / 1000)
    tok_s = step * cfg.train_batch_tokens / max(elapsed_ms / 1000, 1e-9)
    log.event("train", f"step:{step}/{cfg.iterations} train_loss:{loss:.4f} train_time:{elapsed_ms:.0f}ms step_avg:"
                       f"{elapsed_ms / step:.2f}ms tok_s:{tok_s:.0f} time_left:{left_s:.0f}s",
              step=step, train_loss=loss, train_time_ms=elapsed_ms, step_avg_ms=elapsed_ms / step, tok_s=tok_s,
              time_left_s=left_s)

def load_statistics(counts: Tensor) -> dict:
    """How evenly slots spread over experts; see docs/moe.md, "Balancing and statistics"."""
    counts = counts.double().cpu()
    n, total = counts.numel(), counts.sum()
    share = counts / total
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    gini = float(2 * (ranks * counts.sort().values).sum() / (n * total) - (n + 1) / n)
    used = share[share > 0]
    entropy = float(-(used * used.log2()).sum())
    return {"gini": gini, "entropy": entropy, "effective_experts": 2 ** entropy, "dead": int((counts == 0).sum()),
            "share": share.tolist()}

def moe_statistics(model: nn.Module, rt: Runtime, mode: str, log: Logger | None = None, step: int = 0) -> dict | None:
    """Per MoE layer, the `mode` (train or val) load since the last call, over all ranks (a collective); resets it.
    With `log`, logged as the event of `step`."""
    moes = moe_modules(model)
    if not moes:
        return None
    row = ("train", "val").index(mode)  # the rows MoE.load counts training and evaluation in
    counts = rt.all_reduce(torch.stack([m.load[row] for m in moes]))
    for m in moes:
        m.load[row].zero_()
    if not bool(counts.sum() > 0):
        return None
    per_layer = [load_statistics(c) for c in counts]
    stats = {"layers": [m.layer for m in moes], **{key: [st[key] for st in per_layer] for key in per_layer[0]}}
    if log is not None:  # the log names the entropy's unit
        formats = {"gini": "{:.3f}", "entropy_bits": "{:.3f}", "effective_experts": "{:.1f}", "dead": "{}"}
        log.event("moe", f"moe_{mode} layers:{','.join(map(str, stats['layers']))} " + " ".join(
            f"{name}:{','.join(fmt.format(v) for v in stats[name.removesuffix('_bits')])}"
            for name, fmt in formats.items()), mode=mode, step=step, **stats)
    return stats

def save_per_token(cfg: Config, evaluator: "Evaluator", model: nn.Module, name: str, step: int, log: Logger):
    """Every validation target's loss, in stream order, for comparing runs token by token."""
    losses = evaluator.per_token(model)
    if losses is None:
        return
    path = Path(cfg.log_dir) / f"{cfg.run_id}_per_token" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, loss=losses, step=np.int64(step))
    write_atomic(path, buffer.getvalue())
    log(f"per_token_loss: {path} tokens:{len(losses)} mean:{float(losses.astype(np.float64).mean()):.4f}")

def peak_memory_mib(rt: Runtime) -> float:
    if rt.is_cuda:
        return torch.cuda.max_memory_allocated(rt.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

# ----------------------------------------------------------------------------------------------
# Checkpoints: all a run needs to continue exactly, in a checksummed file loaded without pickle code
# ----------------------------------------------------------------------------------------------

CHECKPOINT_MAGIC = b"PGOLFCK1"
CHECKPOINTS_KEPT = 2
# What a resume must keep, and what it may change without a warning: see docs/operations.md, "Long runs".
RESUME_MUST_MATCH = ("train_seq_len", "train_batch_tokens")
RESUME_FREE = {"run_id", "log_dir", "data_path", "tokenizer_path", "device", "compile", "grad_accum_steps",
               "val_batch_size", "train_log_every", "resume_from", "fault_at_step", "fault_rank",
               "checkpoint_every_seconds", "checkpoint_every_steps", "dist_timeout_seconds"}

class Checkpointer:
    """Writes checkpoints and continues a run from one; see docs/operations.md, "Long runs"."""

    def __init__(self, cfg: Config, rt: Runtime, log: Logger):
        self.cfg, self.rt, self.log = cfg, rt, log
        self.last, self.last_ms = None, 0.0  # the last good checkpoint (a diverged run names it) and its training time

    def files(self) -> list[Path]:
        """This run's checkpoints, oldest first (the step is zero-padded into the name)."""
        return sorted(Path(self.cfg.log_dir).glob(f"{glob.escape(self.cfg.run_id)}_step*.ckpt"))

    def due(self, step: int, elapsed_ms: float) -> bool:
        every_steps, every_seconds = self.cfg.checkpoint_every_steps, self.cfg.checkpoint_every_seconds
        return bool(every_steps and step % every_steps == 0
                    or every_seconds and elapsed_ms - self.last_ms >= 1000 * every_seconds)

    def save(self, pieces: "Pieces", step: int, train_ms: float, depth: DepthSchedule, average: WeightAverage):
        """Rank 0 writes (the paused clock's all-reduce was the barrier); all learn if it worked: none runs on alone."""
        cfg, rt = self.cfg, self.rt
        path = Path(cfg.log_dir) / f"{cfg.run_id}_step{step:07d}.ckpt"
        error = ""
        if rt.rank == 0:
            t0 = time.perf_counter()
            buf = io.BytesIO()
            rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if rt.is_cuda else []}
            torch.save(dict(format=1, config=dataclasses.asdict(cfg), step=step, train_ms=train_ms, rng=rng,
                            model=pieces.model.state_dict(), depth=depth.state_dict(), average=average.state_dict(),
                            optimizers=[opt.state_dict() for opt in pieces.optimizers]), buf)
            data = buf.getbuffer()
            try:
                write_atomic(path, CHECKPOINT_MAGIC + hashlib.sha256(data).digest(), data)
                for old in self.files()[:-CHECKPOINTS_KEPT]:
                    old.unlink(missing_ok=True)
                ms = 1000 * (time.perf_counter() - t0)
                self.log.event("checkpoint", f"checkpoint: {path} step:{step} bytes:{len(data)} time:{ms:.0f}ms",
                               step=step, path=str(path), bytes=len(data), time_ms=ms)
            except InputError as e:
                error = str(e)
        if over_ranks(rt, [float(bool(error))], dist.ReduceOp.MAX)[0]:
            raise InputError(error or "rank 0 could not write the checkpoint")
        self.last, self.last_ms = path, train_ms

    def resume(self, pieces: "Pieces", depth: DepthSchedule, average: WeightAverage) -> tuple[int, float]:
        """RESUME_FROM's step and training time, with all it saved restored; (0, 0) for a fresh run."""
        cfg = self.cfg
        if not cfg.resume_from:
            return 0, 0.0
        path = Path(cfg.resume_from) if cfg.resume_from != "auto" else (self.files() or [None])[-1]
        if path is None:
            raise InputError(f"RESUME_FROM=auto: no checkpoint of RUN_ID={cfg.run_id} in {cfg.log_dir}")
        ckpt = load_checkpoint(path)
        saved = ckpt["config"]
        must = {**dataclasses.asdict(cfg.model), **{n: getattr(cfg, n) for n in RESUME_MUST_MATCH}}
        there = {**saved, **saved.get("model", {})}
        wrong = [f"{n.upper()}={there.get(n)!r} there, {v!r} here" for n, v in must.items() if there.get(n) != v]
        if wrong:
            raise InputError(f"checkpoint {path} is from another config: {'; '.join(wrong)}")
        changed = [n for n, f in CONFIG_FIELDS.items() if f.name in saved and f.name not in RESUME_FREE
                   and f.name not in must and saved[f.name] != getattr(cfg, f.name)]
        if changed:
            self.log(f"warning: resumed with changed settings {', '.join(changed)}: not the uninterrupted run any more")
        try:
            pieces.model.load_state_dict(ckpt["model"])
            for opt, saved_opt in zip(pieces.optimizers, ckpt["optimizers"], strict=True):
                settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
                opt.load_state_dict(saved_opt)
                for group, fresh in zip(opt.param_groups, settings):
                    group.update(fresh)  # this run's settings, the checkpoint's moments
            average.load_state_dict(ckpt["average"], self.rt.device)
            depth.load_state_dict(ckpt["depth"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.rt.is_cuda and len(ckpt["rng"]["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise InputError(f"checkpoint {path}: does not fit this model ({str(e).splitlines()[0][:120]})") from None
        step, train_ms = int(ckpt["step"]), float(ckpt["train_ms"])
        self.last, self.last_ms = path, train_ms
        self.log.event("resumed", f"resumed: from {path} step:{step} train_time:{train_ms:.0f}ms", step=step,
                       train_time_ms=train_ms, checkpoint=str(path))
        return step, train_ms

def load_checkpoint(path: Path) -> dict:
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"checkpoint {path}: cannot read ({e.strerror})") from None
    head = len(CHECKPOINT_MAGIC) + 32
    if len(blob) < head or not blob.startswith(CHECKPOINT_MAGIC):
        raise InputError(f"checkpoint {path}: not a checkpoint of this harness (bad magic)")
    data = blob[head:]
    if hashlib.sha256(data).digest() != blob[len(CHECKPOINT_MAGIC):head]:
        raise InputError(f"checkpoint {path}: checksum mismatch (truncated or corrupt)")
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # the unpickler raises many kinds on bad bytes; the checksum makes this unlikely
        raise InputError(f"checkpoint {path}: contents do not load") from None
    needed = {"format", "config", "step", "train_ms", "model", "optimizers", "average", "depth", "rng"}
    if not isinstance(ckpt, dict) or ckpt.get("format") != 1 or not needed <= set(ckpt):
        raise InputError(f"checkpoint {path}: not a format-1 checkpoint")
    return ckpt

# ----------------------------------------------------------------------------------------------
# Export: per-group quantization, compression, a self-describing artifact, and loading it back
# ----------------------------------------------------------------------------------------------

ARTIFACT_MAGIC = b"PGOLFAR1"
QUANT_MIN_NUMEL = 16_384  # smaller matrices (and every vector) are stored as fp16: their bytes are few
SCALE_FLOOR = 1e-12  # a larger floor breaks the round trip of near-zero rows in young models
# GPTQ-lite: each row keeps whichever clip (a quantile of its |w|, interpolated) reconstructs it best.
CLIP_QUANTILES = (0.98, 0.99, 0.995, 0.999, 0.9999, 1.0)
# Bits per tensor group (None: fp16). Embeddings keep 8 bits in every scheme: the most sensitive, and few bytes.
QUANT_SCHEMES = {"int8": {"embedding": 8, "attention": 8, "mlp": 8, "router": 8, "scalars": None},
                 "int6": {"embedding": 8, "attention": 6, "mlp": 6, "router": 8, "scalars": None},
                 "mixed": {"embedding": 8, "attention": 6, "mlp": 5, "router": 8, "scalars": None},
                 "int5": {"embedding": 8, "attention": 5, "mlp": 5, "router": 8, "scalars": None},
                 "int4": {"embedding": 8, "attention": 4, "mlp": 4, "router": 8, "scalars": None}}
AUTO_ORDER = tuple(QUANT_SCHEMES)  # QUANT=auto's candidates, most precise first

def tensor_group(name: str, t: Tensor) -> str:
    if not t.is_floating_point() or t.ndim < 2:
        return "scalars"
    if name.startswith(("tok_emb.", "lm_head.", "value_embeds")):
        return "embedding"
    if ".attn." in name:
        return "attention"
    if ".ffn." in name:  # a router, or a dense FFN's matrices or a stack of trained expert matrices
        return "router" if ".ffn.router." in name else "mlp"
    return "scalars"  # per-layer vectors stacked in a table: skip weights, loop embeddings, scales

@contextmanager
def uncounted_routing(model: nn.Module):
    """Forwards that are neither training nor evaluation (calibration) leave the experts' load counts as they were."""
    loads = [m.load.clone() for m in moe_modules(model)]
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        for m, load in zip(moe_modules(model), loads):
            m.load.copy_(load)
        model.train(was_training)

@torch.no_grad()
def training_loss(cfg: Config, rt: Runtime, model: GPT, stream, first_step: int) -> float:
    """Mean loss per target on QUANT_CALIB_BATCHES training micro-batches from `first_step` on, over all ranks."""
    total = torch.zeros(2, dtype=torch.float64, device=rt.device)
    with uncounted_routing(model):
        for x, y in calibration_batches(cfg, rt, stream, first_step):
            with rt.autocast():
                losses = model(x, y, reduction="none").double()
            total += torch.stack([losses.sum(), (y != -100).sum()])
    loss_sum, count = rt.all_reduce(total).tolist()
    return loss_sum / max(count, 1)

def calibration_batches(cfg: Config, rt: Runtime, stream, first_step: int):
    """QUANT_CALIB_BATCHES of this rank's training micro-batches, from step `first_step` on: the tokens after the loop's
    own, which no step trained on (and never validation tokens)."""
    for k in range(cfg.quant_calib_batches):
        yield stream.micro_batch(cfg, rt, first_step + k // cfg.grad_accum_steps, k % cfg.grad_accum_steps)

def calibration_steps(cfg: Config) -> int:
    return math.ceil(cfg.quant_calib_batches / cfg.grad_accum_steps)

@torch.no_grad()
def input_hessians(cfg: Config, rt: Runtime, model: GPT, stream, first_step: int) -> dict[str, Tensor]:
    """H = X^T X of each matrix's inputs at the scored positions of calibration_batches, in float32, summed over ranks;
    keyed by the weight's name, an expert's as "name:expert"."""
    sums, scored = {}, [None]  # scored: the positions of this batch with a target (DOC_MODE pads without one)

    def add(name: str, x: Tensor):
        sums[name] = sums.get(name, 0) + x.T @ x

    def record_inputs(name: str, module: nn.Module | None, x: Tensor):
        """The scored rows of x, the input of `name`'s weight; of an MoE, its router's, and each expert's its own."""
        with torch.autocast(x.device.type, enabled=False):  # float32 sums (and routing, as the MoE routes)
            tokens = x.reshape(-1, x.size(-1)).float()[scored[0]]
            if not isinstance(module, MoE):
                add(f"{name}.weight", tokens)
                return
            add(f"{name}.router.weight", tokens)
            logits = F.linear(tokens, module.router.weight.float()) + module.route_bias
            choice = logits.topk(module.top_k, dim=-1).indices
            for e in range(0 if module.frozen else module.num_experts):
                routed = tokens[(choice == e).any(-1)]
                add(f"{name}.w1:{e}", routed)
                add(f"{name}.w2:{e}", module.activation(routed @ module.w1[e].float() + module.b1[e].float()))

    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: record_inputs(name, m, *args))
             for name, module in model.named_modules()  # c_q's input is c_k's and c_v's; the router's, its MoE's
             if isinstance(module, MoE)
             or isinstance(module, nn.Linear) and not name.endswith((".c_k", ".c_v", ".router"))]
    try:
        with uncounted_routing(model):
            for x, y in calibration_batches(cfg, rt, stream, first_step):
                scored[0] = (y != -100).flatten()
                with rt.autocast():
                    h, _ = model.hidden(x)
                record_inputs("tok_emb" if model.lm_head is None else "lm_head", model.lm_head, h)  # tied: reads h
    finally:
        for handle in hooks:
            handle.remove()
    for name in sorted(sums):  # every rank holds the same names: each expert gets one, if only of no rows
        rt.all_reduce(sums[name])
    sums.update({n.replace(".c_q.", f".{kv}."): sums[n] for n in list(sums) if ".c_q." in n for kv in ("c_k", "c_v")})
    return sums

def row_clips(w: Tensor, sdclip_k: float) -> list[Tensor]:
    """Each row's candidate clips: k times its std (SDClip), or quantiles of its |w| (the search)."""
    if sdclip_k:
        return [sdclip_k * w.std(1, correction=0)]
    ordered, clips = w.abs().sort(dim=1).values, []
    for quantile in CLIP_QUANTILES:
        position = quantile * (w.size(1) - 1)
        below = int(position)
        above = min(below + 1, w.size(1) - 1)
        clips.append(torch.lerp(ordered[:, below], ordered[:, above], position - below))
    return clips

def quantize_rows(w: Tensor, bits: int, sdclip_k: float = 0.0, gptq: tuple | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-row b-bit integers and fp16 scales: see docs/outputs.md, "Quantization". With gptq_factor's
    factors of the rows' inputs' Hessian, the integers are then chosen by GPTQ at the same scales."""
    w = w.float()
    qmax = 2 ** (bits - 1) - 1
    best_err = best_q = best_scale = None
    for clip in row_clips(w, sdclip_k):
        exact = (clip / qmax).clamp_min(SCALE_FLOOR)
        scale = exact.half()
        # Round the fp16 scale up, never down: a smaller scale would clip more than chosen.
        scale = torch.where(scale.float() < exact, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
        divisor = scale.float().clamp_min(SCALE_FLOOR)[:, None]
        q = torch.round(w.clamp(-clip[:, None], clip[:, None]) / divisor).clamp(-qmax, qmax)
        err = (q * divisor - w).square().sum(1)
        if best_err is not None:  # a row keeps its earlier clip unless this one does strictly better
            better = err < best_err
            err, q = torch.where(better, err, best_err), torch.where(better[:, None], q, best_q)
            scale = torch.where(better, scale, best_scale)
        best_err, best_q, best_scale = err, q, scale
    if gptq is not None:
        best_q = gptq_round(w, best_scale.float(), qmax, *gptq)
    return best_q.to(torch.int8), best_scale

GPTQ_BLOCK = 128  # columns whose errors are pushed on one by one before the rest get them in one matmul

def gptq_factor(hessian: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """GPTQ's column order (most used input first: largest diag(H)) and the upper Cholesky factor of the damped H^-1
    in that order, in float64 (a Hessian of a few hundred thousand tokens is ill-conditioned); a factorisation that
    fails is damped ten times more."""
    order = torch.argsort(hessian.diagonal(), descending=True)
    h = hessian.double()[order][:, order]
    eye = torch.eye(len(h), dtype=h.dtype, device=h.device) * (float(h.diagonal().mean()) or 1.0)  # unseen: rounding
    for _ in range(5):
        factor, failed = torch.linalg.cholesky_ex(h + damp * eye)
        if not failed:
            break
        damp *= 10
    return order, torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()

def gptq_round(w: Tensor, scale: Tensor, qmax: int, order: Tensor, u: Tensor) -> Tensor:
    """GPTQ (Frantar et al., 2022): the columns are rounded one by one in `order`, and each rounding error is pushed
    onto the columns not yet rounded through `u` (gptq_factor's), which minimises the change of the outputs on the
    calibration inputs, sum over rows of (dw) H (dw)^T."""
    w, q = w[:, order].clone(), torch.empty_like(w)
    for start in range(0, w.size(1), GPTQ_BLOCK):
        stop = min(start + GPTQ_BLOCK, w.size(1))
        errors = torch.empty(w.size(0), stop - start, device=w.device)
        for j in range(start, stop):
            q[:, j] = torch.round(w[:, j] / scale).clamp(-qmax, qmax)
            errors[:, j - start] = (w[:, j] - q[:, j] * scale) / u[j, j]
            w[:, j + 1:stop] -= errors[:, j - start, None] * u[j, j + 1:stop]
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return q[:, torch.argsort(order)]

def dequantize_rows(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale.float()[:, None]

def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Signed b-bit integers, offset to unsigned, as one little-endian bit stream: 8 values in b bytes."""
    values = (q.flatten().numpy().astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    values = np.pad(values, (0, -len(values) % 8))
    low_bits = np.unpackbits(values[:, None], axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(low_bits, bitorder="little"))

def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    low_bits = np.unpackbits(packed.numpy(), bitorder="little").reshape(-1, bits)[:count]
    values = np.packbits(low_bits, axis=1, bitorder="little")[:, 0]  # each row zero-padded to 8 bits
    return torch.from_numpy(values.astype(np.int16) - 2 ** (bits - 1)).to(torch.int8)

# Per stream (a tensor group's integer codes, or its floats) the smallest of: codes bit-packed or one a byte (the
# compressors model whole bytes better), floats plain or byte-shuffled, times the codecs of the run's family.
# (compress, decompress at most n bytes): a crafted header must not make the loader inflate more than it says.
CODECS = {"zstd": (lambda data: zstandard.ZstdCompressor(level=22).compress(data),
                   lambda data, n: zstandard.ZstdDecompressor().stream_reader(data).read(n)),
          "lzma": (lambda data: lzma.compress(data, preset=9),
                   lambda data, n: lzma.LZMADecompressor(memlimit=1 << 27).decompress(data, n)),
          "zlib": (lambda data: zlib.compress(data, 9), lambda data, n: zlib.decompressobj().decompress(data, n))}
ARTIFACT_MAX_RAW_BYTES = 1 << 30  # what an artifact may decompress to, all streams together
CODEC_FAMILIES = {"zstd": ("zstd", "lzma"), "zlib": ("zlib", "lzma")}  # zlib: a run without zstandard
CODEC_ERRORS = (zlib.error, lzma.LZMAError, *((zstandard.ZstdError,) if zstandard else ()))

def byte_shuffle(data: bytes, stride: int, inverse: bool = False) -> bytes:
    """Byte k of every `stride`-byte value together: fp16 exponents repeat, and compress better side by side."""
    cut = len(data) - len(data) % stride
    table = np.frombuffer(data[:cut], np.uint8).reshape((stride, -1) if inverse else (-1, stride))
    return table.T.tobytes() + data[cut:]

def part_bytes(part: Tensor, bits: int | None, packed: bool) -> bytes:
    return (pack_bits(part, bits) if bits and packed else part.contiguous()).numpy().tobytes()

PROBE_VALUES = 1 << 20  # a stream's layout and codec are chosen on its first parts of about this many values

def smallest_stream(parts: list[tuple[Tensor, int | None]], family: str) -> dict:
    """The stream of `parts` ((tensor, bits if integer codes)) compressed once, in the layout and codec that made its
    first parts smallest (zstd-22 takes seconds a megabyte of codes: trying each on all of it would take minutes)."""
    codes = parts[0][1] is not None
    # At 8 bits packing changes nothing; shuffling a stream of codes, one byte each, neither.
    layouts = ((False,) if all(bits == 8 for _, bits in parts) else (True, False)) if codes else (0, 2)
    probe = list(itertools.accumulate(part.numel() for part, _ in parts))
    probe = parts[:next((i + 1 for i, n in enumerate(probe) if n >= PROBE_VALUES), len(parts))]

    def stored(some: list, layout) -> tuple[bytes, list[bytes]]:
        chunks = [part_bytes(part, bits, codes and layout) for part, bits in some]
        raw = b"".join(chunks)
        return (byte_shuffle(raw, layout) if not codes and layout else raw), chunks

    trials = {(layout, codec): CODECS[codec][0](stored(probe, layout)[0])
              for layout in layouts for codec in CODEC_FAMILIES[family]}
    layout, codec = min(trials, key=lambda trial: len(trials[trial]))
    data, chunks = stored(parts, layout)
    compressed = trials[layout, codec] if len(probe) == len(parts) else CODECS[codec][0](data)  # a small stream: done
    return {"layout": {"packed": layout} if codes else {"shuffle": layout}, "codec": codec,
            "data": compressed, "raw_bytes": len(data), "sizes": [len(chunk) for chunk in chunks]}

def write_atomic(path: Path, *chunks: bytes):
    """Temp file, fsync, rename: a crash or a full disk never leaves a half-written file under `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.writelines(chunks)  # one by one: joining 200 MB of checkpoint would copy it
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {e.strerror}") from None

@dataclass(frozen=True)
class Rounding:
    """How the matrices are rounded beyond their scheme's widths: see docs/outputs.md, "Quantization"."""
    hessians: dict = field(default_factory=dict)  # input_hessians': GPTQ for the matrices that have one
    sdclip_k: float = 0.0
    damp: float = 0.01
    lqer_rank: int = 0
    lqer_tensors: int = 0
    factors: dict = field(default_factory=dict)  # gptq_factor's, once per Hessian (q, k and v share one) and scheme

    def gptq(self, name: str) -> tuple | None:
        hessian = self.hessians.get(name)
        if hessian is not None and id(hessian) not in self.factors:
            self.factors[id(hessian)] = gptq_factor(hessian, self.damp)
        return None if hessian is None else self.factors[id(hessian)]

def quantize_tensor(name: str, t: Tensor, bits: int, rounding: Rounding) -> tuple:
    """(encoding, integers, scales) of a matrix, or of a stack of expert matrices. GPTQ needs a matrix's rows to be
    its outputs: a linear layer's weight is, an expert's (x @ w) is the transpose, stored so ("transposed")."""
    encoding, k = {"encoding": "int_rows", "bits": bits}, rounding.sdclip_k
    if t.ndim == 2 or rounding.gptq(f"{name}:0") is None:  # a stack without Hessians: all its rows at once
        return encoding, *quantize_rows(t.reshape(-1, t.size(-1)), bits, k, rounding.gptq(name))
    rows = [quantize_rows(m.T, bits, k, rounding.gptq(f"{name}:{e}")) for e, m in enumerate(t)]
    return {**encoding, "transposed": True}, *map(torch.cat, zip(*rows))

def input_energy(name: str, q: Tensor, experts: int, rounding: Rounding) -> Tensor:
    """Per quantized weight, the energy of the input it multiplies relative to its matrix's mean (diag H), so that
    errors of matrices with and without a Hessian (then 1) read alike. `experts`: a transposed stack's count."""
    keys = [f"{name}:{e}" for e in range(experts)] if experts else [name]
    if keys[0] not in rounding.hessians:
        return torch.ones((), device=q.device)
    diagonals = torch.stack([rounding.hessians[key].diagonal() for key in keys]).to(q.device)
    return (diagonals / diagonals.mean(1, keepdim=True).clamp_min(1e-30)).repeat_interleave(len(q) // len(keys), 0)

LQER_BITS = 4

def low_rank_corrections(state: dict, quantized: dict, rounding: Rounding) -> dict[str, list[Tensor]]:
    """LQER: for the QUANT_LQER_TENSORS matrices whose rounding moved them most, the rank-r SVD of what it moved,
    as int4 factors A^T and B (W = dequantized + A B). A matrix with a Hessian weighs its columns by their inputs'
    energy relative to the mean, so that its error reads in the same units as one's without."""
    if not rounding.lqer_rank:
        return {}
    errors = {}
    for name, (encoding, q, scale) in quantized.items():
        if state[name].ndim == 2:  # a matrix (a stack of experts' is not corrected)
            delta = state[name].float() - dequantize_rows(q, scale)
            errors[name] = (delta, float((delta.square() * input_energy(name, q, 0, rounding)).sum()))
    corrections = {}
    for name in sorted(errors, key=lambda n: errors[n][1], reverse=True)[:rounding.lqer_tensors]:
        u, sigma, vh = torch.linalg.svd(errors[name][0], full_matrices=False)
        root = sigma[:rounding.lqer_rank].sqrt()
        a_t, b = (u[:, :len(root)] * root).T, root[:, None] * vh[:len(root)]
        corrections[name] = [*quantize_rows(a_t, LQER_BITS), *quantize_rows(b, LQER_BITS)]
    return corrections

def build_artifact(model: GPT, scheme: str = "int8", compressor: str | None = None,
                   rounding: Rounding = Rounding()) -> tuple[bytes, dict]:
    """The artifact (docs/outputs.md) and per tensor group its parameters and bytes: fp32, stored, compressed."""
    return encode_artifact(model.spec, scheme, compressor, tensor_parts(model, scheme, rounding))

def tensor_parts(model: GPT, scheme: str, rounding: Rounding) -> list[tuple]:
    """Each tensor's (name, group, shape, encoding, [(part on the host, bits if integer codes)]), rounded where the
    weights are (GPTQ's loop is fast on a GPU)."""
    state = model.state_dict()
    bits_of = {name: QUANT_SCHEMES[scheme][tensor_group(name, t)] if t.numel() >= QUANT_MIN_NUMEL else None
               for name, t in state.items()}
    quantized = {name: quantize_tensor(name, t, bits_of[name], rounding) for name, t in state.items() if bits_of[name]}
    corrections = low_rank_corrections(state, quantized, rounding)
    entries = []
    for name, t in state.items():
        encoding, parts = {"encoding": "raw"}, [(t, None)]
        if name in quantized:
            encoding, q, scale = quantized[name]
            parts = [(q, bits_of[name]), (scale, None)]
            if name in corrections:
                a_t, a_scale, b, b_scale = corrections[name]
                encoding = {**encoding, "lqer_rank": len(a_t)}
                parts += [(a_t, LQER_BITS), (a_scale, None), (b, LQER_BITS), (b_scale, None)]
        elif t.is_floating_point():
            encoding, parts = {"encoding": "fp16"}, [(t.half(), None)]
        entries.append((name, tensor_group(name, t), list(t.shape), encoding,
                        [(part.cpu(), bits) for part, bits in parts]))
    return entries

def encode_artifact(spec: ModelSpec, scheme: str, compressor: str | None, entries: list[tuple]) -> tuple[bytes, dict]:
    """The artifact's bytes from tensor_parts' entries, each stream in its smallest layout and codec (packed and
    compressed on the host, as numpy bytes), and per tensor group its parameters and bytes."""
    streams = {}  # (group, kind) -> [(part, bits if integer codes)]
    for _, group, _, _, parts in entries:
        for part, bits in parts:
            streams.setdefault((group, "codes" if bits else "floats"), []).append((part, bits))
    family = compressor or ("zstd" if zstandard is not None else "zlib")
    chosen = {key: smallest_stream(parts, family) for key, parts in streams.items()}
    index, sizes = {key: i for i, key in enumerate(chosen)}, {key: iter(c.pop("sizes")) for key, c in chosen.items()}
    offsets, layout, groups = dict.fromkeys(chosen, 0), [], {}
    for name, group, shape, encoding, parts in entries:
        part_layout = []  # where in its stream's bytes each part lies, and as what
        for part, bits in parts:
            key = (group, "codes" if bits else "floats")
            nbytes = next(sizes[key])
            part_layout.append({"dtype": str(part.dtype).removeprefix("torch."), "shape": list(part.shape),
                                "stream": index[key], "offset": offsets[key], "nbytes": nbytes,
                                **({"bits": bits} if bits else {})})
            offsets[key] += nbytes
        layout.append({"name": name, "group": group, "shape": shape, **encoding, "parts": part_layout})
        row = groups.setdefault(group, {"params": 0, "fp32_bytes": 0, "stored_bytes": 0, "compressed_bytes": 0})
        row.update(params=row["params"] + math.prod(shape), fp32_bytes=row["fp32_bytes"] + 4 * math.prod(shape))
    header_streams = []
    for (group, kind), stream in chosen.items():
        groups[group]["stored_bytes"] += stream["raw_bytes"]
        groups[group]["compressed_bytes"] += len(stream["data"])
        groups[group][kind] = "+".join([*(f"{k}:{int(v)}" for k, v in stream["layout"].items()), stream["codec"]])
        header_streams.append({"group": group, "kind": kind, **stream["layout"], "codec": stream["codec"],
                               "raw_bytes": stream["raw_bytes"], "payload_bytes": len(stream["data"])})
    for row in groups.values():
        row["ratio"] = row["fp32_bytes"] / max(row["compressed_bytes"], 1)
    payload = b"".join(stream["data"] for stream in chosen.values())
    header = json.dumps({"format": 4, "model": dataclasses.asdict(spec), "quant": scheme, "compressor": family,
                         "streams": header_streams, "tensors": layout, "payload_bytes": len(payload),
                         "payload_sha256": hashlib.sha256(payload).hexdigest()}, separators=(",", ":")).encode()
    return ARTIFACT_MAGIC + struct.pack("<I", len(header)) + header + payload, groups

# Selective pruning: a build a little over the limit zeroes the +-1 codes whose loss costs least until it fits. What
# a zeroed code saves is measured, not modelled: each build's bytes narrow the counts between one that did not fit
# and one that did.
PRUNE_BUILDS = 5
PRUNE_FIRST_GUESS_BYTES = 0.5  # more than a code saves: the first build undershoots, then measures
PRUNE_SLACK = 1e-3  # a fitting build this close under the limit is close enough

def prune_order(state: dict, entries: list[tuple], rounding: Rounding) -> tuple[Tensor, Tensor]:
    """Every +-1 code of the quantized matrices as (entry index, flat position), cheapest first: zeroing weight w of
    scale s and code q adds w^2 - (w - s q)^2 to its squared error, weighed by its input's energy."""
    empty = torch.zeros(0, dtype=torch.long)
    costs, owners, positions = [empty.float()], [empty], [empty]
    for i, (name, _, _, encoding, parts) in enumerate(entries):
        if encoding["encoding"] == "int_rows":
            (q, _), (scale, _) = parts[:2]
            t = state[name].detach().float().cpu()
            w = (t.transpose(-1, -2) if encoding.get("transposed") else t).reshape(q.shape)
            energy = input_energy(name, q, len(t) if encoding.get("transposed") else 0, rounding)
            cost = (w.square() - (w - dequantize_rows(q, scale)).square()) * energy.cpu()
            where = (q.abs() == 1).flatten().nonzero()[:, 0]
            costs.append(cost.flatten()[where])
            owners.append(torch.full_like(where, i))
            positions.append(where)
    order = torch.argsort(torch.cat(costs), stable=True)
    return torch.cat(owners)[order], torch.cat(positions)[order]

def pruned(entries: list[tuple], order: tuple[Tensor, Tensor], count: int) -> list[tuple]:
    """The entries with the first `count` codes of prune_order zeroed."""
    owners, positions = order[0][:count], order[1][:count]
    entries = list(entries)
    for i in owners.unique().tolist():
        name, group, shape, encoding, ((q, bits), *rest) = entries[i]
        flat = q.flatten().clone()
        flat[positions[owners == i]] = 0
        entries[i] = (name, group, shape, encoding, [(flat.view(q.shape), bits), *rest])
    return entries

def build_within_limit(cfg: Config, spec: ModelSpec, scheme: str, entries: list[tuple], state: dict,
                       rounding: Rounding, limit: int) -> tuple[bytes, dict, int]:
    """The artifact of `entries`, its groups, and how many codes were zeroed: one over `limit` bytes by at most
    QUANT_PRUNE_MAX of its size is pruned, with as few codes as PRUNE_BUILDS builds find that make it fit."""
    blob, groups = encode_artifact(spec, scheme, None, entries)
    if not 0 < len(blob) - limit <= cfg.quant_prune_max * len(blob):
        return blob, groups, 0
    order = prune_order(state, entries, rounding)
    over, under, fitting = (0, len(blob)), None, (blob, groups, 0)  # (count, bytes) known over and under the limit
    for _ in range(PRUNE_BUILDS):
        if under:  # halfway between the bracket's secant and its middle: bytes fall faster as more codes go
            secant = over[0] + (under[0] - over[0]) * (over[1] - limit) / max(over[1] - under[1], 1)
            count = (secant + (over[0] + under[0]) / 2) / 2
        else:
            saving = (len(blob) - over[1]) / over[0] if over[0] else PRUNE_FIRST_GUESS_BYTES
            count = over[0] + (over[1] - limit) / max(saving, 1e-3)
        count = min(max(math.ceil(count), over[0] + 1), under[0] - 1 if under else len(order[0]))
        if count <= over[0]:
            break
        smaller, smaller_groups = encode_artifact(spec, scheme, None, pruned(entries, order, count))
        if len(smaller) > limit:
            over = (count, len(smaller))
            continue
        under, fitting = (count, len(smaller)), (smaller, smaller_groups, count)
        if len(smaller) >= limit * (1 - PRUNE_SLACK):
            break
    return fitting

def parse_artifact(blob: bytes, name) -> tuple[dict, dict[str, Tensor]]:
    """Header and tensors of an artifact, every byte checked before use."""
    prefix = len(ARTIFACT_MAGIC) + 4
    if len(blob) < prefix or not blob.startswith(ARTIFACT_MAGIC):
        raise InputError(f"artifact {name}: not an artifact of this harness (bad magic)")
    (header_len,) = struct.unpack("<I", blob[len(ARTIFACT_MAGIC):prefix])
    try:
        header = json.loads(blob[prefix:prefix + header_len])
        payload = blob[prefix + header_len:]
        expected_payload, checksum = int(header["payload_bytes"]), header["payload_sha256"]
        if header["format"] != 4:
            raise InputError(f"artifact {name}: format {header['format']} is another version's: rebuild it from "
                             f"a checkpoint with this train_gpt.py")
        layout, streams = header["tensors"], header["streams"]
        if not isinstance(header["model"], dict):
            raise TypeError("model config is not an object")
        claimed = [0] * len(streams)  # each stream's raw bytes must be exactly what its parts take
        for part in (part for entry in layout for part in entry["parts"]):
            if part["nbytes"] < 0 or part["stream"] < 0:
                raise ValueError("a negative size or stream")
            claimed[part["stream"]] += int(part["nbytes"])
        if [int(stream["raw_bytes"]) for stream in streams] != claimed or sum(claimed) > ARTIFACT_MAX_RAW_BYTES:
            raise ValueError("streams and parts disagree")
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        raise InputError(f"artifact {name}: corrupt or truncated header") from None
    if len(payload) != expected_payload:
        raise InputError(f"artifact {name}: truncated (payload {len(payload)} bytes, header says {expected_payload})")
    if hashlib.sha256(payload).hexdigest() != checksum:
        raise InputError(f"artifact {name}: checksum mismatch (corrupt file)")
    try:
        decoded = [(decode_stream(payload, streams, k, name), bool(s.get("packed"))) for k, s in enumerate(streams)]
        return header, decode_tensors(decoded, layout, name)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError):
        raise InputError(f"artifact {name}: corrupt tensor layout") from None

def decode_stream(payload: bytes, streams: list[dict], k: int, name) -> bytes:
    """Stream k's bytes as they were before compression (and shuffling)."""
    stream, start = streams[k], sum(int(s["payload_bytes"]) for s in streams[:k])
    codec, raw_bytes = stream["codec"], int(stream["raw_bytes"])
    if codec not in CODECS or codec == "zstd" and zstandard is None:
        raise InputError(f"artifact {name}: codec {codec!r} unknown here (zstd needs the zstandard package)")
    try:
        raw = CODECS[codec][1](payload[start:start + int(stream["payload_bytes"])], raw_bytes + 1)
    except (*CODEC_ERRORS, MemoryError):
        raise InputError(f"artifact {name}: stream {k} does not decompress") from None
    if len(raw) != raw_bytes:
        raise InputError(f"artifact {name}: stream {k} decompressed to {len(raw)} bytes, header says {raw_bytes}")
    return byte_shuffle(raw, stream["shuffle"], inverse=True) if stream.get("shuffle") else raw

def decode_tensors(streams: list[tuple[bytes, bool]], layout: list[dict], name) -> dict[str, Tensor]:
    """The tensors of `layout` from their streams' bytes ((bytes, whether its integer codes are bit-packed))."""
    def get(part: dict) -> Tensor:
        (raw, packed), start = streams[part["stream"]], part["offset"]
        if start < 0 or start + part["nbytes"] > len(raw):
            raise InputError(f"artifact {name}: a stream is shorter than its layout says")
        data = raw[start:start + part["nbytes"]]
        if packed:
            codes = torch.from_numpy(np.frombuffer(data, np.uint8).copy())
            return unpack_bits(codes, int(part["bits"]), math.prod(part["shape"])).reshape(part["shape"])
        # numpy, as torch.frombuffer refuses an empty buffer: a 0-element tensor (one block's skips) is legal
        return torch.from_numpy(np.frombuffer(data, dtype=part["dtype"]).copy()).reshape(part["shape"])

    state = {}
    for entry in layout:
        parts = [get(p) for p in entry["parts"]]
        if entry["encoding"] == "int_rows":
            q, scale, *factors = parts
            shape = entry["shape"]
            if entry.get("transposed"):  # a stack of matrices stored as their transposes
                shape = [*shape[:-2], shape[-1], shape[-2]]
            w = dequantize_rows(q.view(len(scale), -1), scale).reshape(shape)
            if factors:  # LQER's correction A B, A^T and B stored as int4 rows
                a_t, a_scale, b, b_scale = factors
                w = w + dequantize_rows(a_t, a_scale).T @ dequantize_rows(b, b_scale)
            state[entry["name"]] = w.transpose(-1, -2) if entry.get("transposed") else w
        else:
            state[entry["name"]] = parts[0].float() if entry["encoding"] == "fp16" else parts[0]
    return state

def model_from_artifact(header: dict, state: dict[str, Tensor], name, device) -> GPT:
    try:
        model = build_model(ModelSpec(**header["model"]), torch.device("cpu"))
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"artifact {name}: its model config does not build a model") from None
    own = model.state_dict()
    for key, t in state.items():
        if key not in own or own[key].shape != t.shape:
            raise InputError(f"artifact {name}: tensor {key} does not fit this model (another config?)")
    missing = sorted(set(own) - set(state))
    if missing:
        raise InputError(f"artifact {name}: tensors missing: {', '.join(missing[:3])}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model.to(device)

def share_from_rank0(rt: Runtime, obj):
    """Rank 0's object on every rank: other nodes of a multi-node run cannot read rank 0's disk."""
    shared = [obj]
    if rt.distributed:
        dist.broadcast_object_list(shared, src=0, device=rt.device)
    return shared[0]

# A submission counts the bytes of its train_gpt.py, so it ships the program packed: docs/outputs.md, "Packed code".
PACK_HEAD, PACK_TAIL = b'#coding:latin-1\nimport lzma\n_="""', b'"""\nexec(lzma.decompress(_.encode("latin-1")))\n'

def without_docstrings(source: str) -> tuple[str, list[tuple[ast.Expr, bool]]]:
    """The source's syntax tree less its docstrings, dumped (what stripping must keep exactly), and its docstrings,
    each with whether it is alone in its body (then `pass` takes its place)."""
    tree, docstrings = ast.parse(source), []
    for node in ast.walk(tree):
        match getattr(node, "body", None):
            case [ast.Expr(value=ast.Constant(value=str())) as docstring, *rest]:
                docstrings.append((docstring, not rest))
                node.body = rest or [ast.Pass()]
    return ast.dump(tree), docstrings

def strip_program(source: str) -> str:
    """The source without comments, docstrings and blank lines, checked to be the same syntax tree."""
    lines, verbatim = source.splitlines(keepends=True), set()  # verbatim: rows inside a string literal

    def column(row: int, offset: int) -> int:  # the syntax tree counts UTF-8 bytes, the tokenizer characters
        return len(lines[row - 1].encode()[:offset].decode())

    kept, docstrings = without_docstrings(source)
    cuts = [(doc.lineno, column(doc.lineno, doc.col_offset), doc.end_lineno, column(doc.end_lineno, doc.end_col_offset),
             "pass" if alone else "") for doc, alone in docstrings]
    docstring_rows = {row for doc, _ in docstrings for row in range(doc.lineno, doc.end_lineno + 1)}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            cuts.append((*token.start, *token.end, ""))
        elif token.end[0] > token.start[0] and token.start[0] not in docstring_rows:  # a string over several rows
            verbatim.update(range(token.start[0], token.end[0] + 1))
    for row, col, end_row, end_col, replacement in sorted(cuts, reverse=True):  # from the end: columns stay valid
        rest = lines[end_row - 1][end_col:]
        if not replacement and rest.lstrip().startswith(";"):  # `"doc"; x = 1`
            rest = rest.lstrip()[1:].lstrip()
        lines[row - 1:end_row] = [lines[row - 1][:col] + replacement + rest] + [""] * (end_row - row)
    program = "".join(line if row in verbatim else line.rstrip() + "\n" for row, line in enumerate(lines, 1)
                      if row in verbatim or line.strip())
    try:
        if without_docstrings(program)[0] == kept:
            return program
    except SyntaxError:  # the stripping broke the syntax itself
        pass
    raise InputError("train_gpt.py: stripping its comments and docstrings would change its program (a construct "
                     "strip_program does not handle): it cannot be packed")

def pack_program(program: str) -> bytes:
    """The program lzma-compressed into a latin-1 string literal (4 bytes escaped) behind a wrapper that runs it."""
    data = lzma.compress(program.encode(), preset=9 | lzma.PRESET_EXTREME).decode("latin-1")
    escaped = data.translate(str.maketrans({"\\": "\\\\", '"': '\\"', "\r": "\\r", "\0": "\\x00"}))
    return PACK_HEAD + escaped.encode("latin-1") + PACK_TAIL

def program_of(code: bytes) -> str:
    """The program a train_gpt.py runs: a packed file's, unpacked; a source's, stripped."""
    if not (code.startswith(PACK_HEAD) and code.endswith(PACK_TAIL)):
        return strip_program(code.decode())
    literal = code[len(PACK_HEAD) - 3:len(code) - len(PACK_TAIL) + 3].decode("latin-1")
    return lzma.decompress(ast.literal_eval(literal).encode("latin-1")).decode()

def code_identity() -> dict:
    """What records/check.py ties a log to: this file's and its program's SHA-256; and the bytes a submission
    counts, the packed program's (this file's own when it is the packed one)."""
    code = Path(__file__).read_bytes()
    program = program_of(code)
    return {"bytes_code": len(code) if code.startswith(PACK_HEAD) else len(pack_program(program)),
            "bytes_code_file": len(code), "code_sha256": hashlib.sha256(code).hexdigest(),
            "program_sha256": hashlib.sha256(program.encode()).hexdigest()}

# ----------------------------------------------------------------------------------------------
# Evaluation: one core that scores windows of the validation stream; methods built on it; the audit
# ----------------------------------------------------------------------------------------------
# Windows (start, first, stop) and targets: see docs/evaluation.md, "One core, several methods".

FULL_VAL_TOKENS = 62_021_632  # the challenge's sp1024 validation split
EVAL_LIMIT_SECONDS = 600.0
EVAL_GPUS = 8

def sliding_windows(lo: int, hi: int, n_targets: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows scoring targets [lo, hi) once each, at most `stride` new ones a window (docs/evaluation.md, sliding)."""
    seq_len = min(seq_len, n_targets)
    windows, p = [], lo
    while p < hi:
        end = min(hi, seq_len if p == 0 else p + stride)
        start = max(0, end - seq_len)
        windows.append((start, p - start, end - start))
        p = end
    return windows

def over_ranks(rt: Runtime, values: list[float], op=dist.ReduceOp.SUM) -> list[float]:
    return rt.all_reduce(torch.tensor(values, dtype=torch.float64, device=rt.device), op).tolist()

class Evaluator:
    """Scores windows of the validation tokens, split across ranks, and reduces to loss and bpb."""

    def __init__(self, cfg: Config, rt: Runtime, tokens: Tensor, tables: ByteTables, bos_id: int = -1, text_bytes=None,
                 log: Logger | None = None):
        self.cfg, self.rt, self.tokens, self.bos_id = cfg, rt, tokens, bos_id
        self.tables, self.n_targets = tables.to(rt.device), len(tokens) - 1
        self.text_bytes = text_bytes  # (tokens, positions) -> the bytes the targets there decode to (the audit's count)
        self.log = log  # where a named evaluation reports its progress (the audit's evaluations are not named)

    def with_tokens(self, tokens: Tensor) -> "Evaluator":
        return Evaluator(self.cfg, self.rt, tokens, self.tables, self.bos_id, self.text_bytes)

    def rank_share(self, windows: list) -> list:
        """A contiguous run of windows per rank, so each rank scores one stretch of the stream in order."""
        per = math.ceil(len(windows) / self.rt.world_size)
        return windows[self.rt.rank * per:(self.rt.rank + 1) * per]

    @functools.cached_property
    def device_tokens(self) -> Tensor:
        return self.tokens.to(self.rt.device)

    def targets(self, pos: Tensor) -> Tensor:
        return self.device_tokens[pos + 1]

    @torch.no_grad()
    def distributions(self, model: nn.Module, windows: list[tuple[int, int, int]], seq_len: int):
        """Yields (positions, log next-token distributions) a forward at a time, from the windows' tokens alone."""
        seq_len = min(seq_len, self.n_targets)
        batch = self.rows_per_forward(len(windows), seq_len)
        was_training = model.training
        model.eval()
        try:
            for i in range(0, len(windows), batch):
                chunk = windows[i:i + batch]
                # A window may read past the stream's end (DOC_MODE): what follows its last scored target moves nothing.
                # Compiled, a short last batch is padded with copies of its last window, never scored.
                reads = chunk + chunk[-1:] * (batch - len(chunk)) if self.rt.compile else chunk
                x = torch.stack([F.pad(self.tokens[s:s + seq_len], (0, max(0, s + seq_len - len(self.tokens))))
                                 for s, _, _ in reads]).to(self.rt.device)
                pos = torch.cat([torch.arange(s + first, s + stop) for s, first, stop in chunk]).to(self.rt.device)
                # Each row's last positions, a power of two of them: see docs/operations.md, "Compilation".
                last = min(seq_len, 1 << (seq_len - min(first for _, first, _ in chunk) - 1).bit_length())
                skip = seq_len - last
                with self.rt.autocast():
                    logp = model(x, last=last).float()
                if all(first == 0 and stop == seq_len for _, first, stop in chunk):
                    yield pos, logp[:len(chunk)].flatten(0, 1)
                else:
                    yield pos, torch.cat([logp[r, a - skip:b - skip] for r, (_, a, b) in enumerate(chunk)])
        finally:
            model.train(was_training)

    def rows_per_forward(self, n_rows: int, seq_len: int) -> int:
        """VAL_BATCH_SIZE tokens over all ranks; compiled, a power of two, so few static batch sizes are compiled."""
        most = max(1, self.cfg.val_batch_size // (seq_len * self.rt.world_size))
        return min(most, 1 << (max(n_rows, 1) - 1).bit_length()) if self.rt.compile else most

    def reduce(self, scores: "MethodRun") -> tuple[float, float]:
        loss_sum, count, byte_sum = over_ranks(self.rt, [float(scores.nll.double().sum()), scores.nll.numel(),
                                                         float(scores.nbytes.double().sum())])
        return loss_sum / count, loss_sum / math.log(2) / byte_sum

    def val_bytes(self) -> int:
        """Bytes of the targets standard evaluation scores: the bpb denominator."""
        pos = torch.cat([torch.arange(s + first, s + stop) for s, first, stop in self.standard_windows()])
        return int(self.tables.count(self.device_tokens[pos], self.device_tokens[pos + 1]).sum())

    def standard_windows(self) -> list:
        """Disjoint windows of TRAIN_SEQ_LEN; in DOC_MODE one a document, from its BOS, scoring its first targets."""
        seq = self.cfg.train_seq_len
        if self.cfg.doc_mode:
            return [(a, 0, min(b - a, seq)) for a, b in document_bounds(self.tokens.numpy(), self.bos_id)]
        return sliding_windows(0, self.n_targets, self.n_targets, seq, seq)

    @functools.cached_property
    def scored_targets(self) -> int:
        """How many targets every evaluation scores: all but, in DOC_MODE, those past a document's first window."""
        return sum(stop - first for _, first, stop in self.standard_windows())

    def scored_fraction(self) -> float:
        return self.scored_targets / self.n_targets

    def standard(self, model: nn.Module, name: str = "") -> tuple[float, float]:
        return self.reduce(score_first(self, standard_method(self.cfg, self, model), name=name))

    def per_token(self, model: nn.Module) -> np.ndarray | None:
        """Every target's loss in stream order, gathered on rank 0 (None elsewhere)."""
        nll = score_first(self, standard_method(self.cfg, self, model), name="per_token").nll
        if self.rt.distributed:
            shares = [None] * self.rt.world_size
            dist.all_gather_object(shares, nll.cpu())
            nll = torch.cat(shares)
        return nll.cpu().numpy().astype(np.float16) if self.rt.rank == 0 else None

@dataclass
class MethodRun:
    pos: Tensor  # target index of each scored token of this rank's share of the stream
    nll: Tensor  # nats
    nbytes: Tensor  # bytes each scored token stands for
    captured: dict[int, Tensor]  # target index -> the whole next-token distribution it was scored with
    max_sum_error: float  # the largest |sum p - 1| over every distribution scored, where measured
    info: dict  # what the method returned

PROGRESS_AFTER_SECONDS = 5.0  # a named evaluation running longer prints its progress, at most every tenth

def score_first(ev: Evaluator, method, capture: set[int] | None = None, name: str = "") -> MethodRun:
    """The one scorer: see docs/evaluation.md, "Scoring". A method's return value is the run's info; with `capture`
    (the audit) every distribution's sum is measured and the distributions at the captured positions are kept. A
    `name`d one reports its progress."""
    empty = torch.zeros(0, dtype=torch.long, device=ev.rt.device)
    parts, captured = [(empty, empty.float(), ev.tables.count(empty, empty))], {}  # what a rank without windows scores
    max_error = torch.zeros((), dtype=torch.float64, device=ev.rt.device)  # on the device: no wait in the loop
    progress = Progress(name, ev.scored_targets, ev.log) if name and ev.log else None
    try:
        pos, logp = next(method)
        while True:
            if progress:  # each rank scores about its share of every stretch: rank 0's count stands for all
                progress.advance(len(pos) * ev.rt.world_size)
            target = ev.targets(pos)
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            parts.append((pos, nll, ev.tables.count(ev.device_tokens[pos], target)))
            if capture is not None and len(pos):
                probs = logp.exp()
                max_error = torch.maximum(max_error, (probs.sum(-1, dtype=torch.float64) - 1).abs().max())
                captured.update({p: probs[row].float().cpu() for row, p in enumerate(pos.tolist()) if p in capture})
            pos, logp = method.send(target)
    except StopIteration as finished:
        return MethodRun(*map(torch.cat, zip(*parts)), captured, float(max_error), finished.value or {})

class Progress:
    """An evaluation's fraction done, scored tokens/s and time left, once it has run PROGRESS_AFTER_SECONDS."""

    def __init__(self, name: str, total: int, log: Logger):
        self.name, self.total, self.log = name, max(total, 1), log
        self.done, self.tenths, self.t0 = 0, 0, time.perf_counter()

    def advance(self, scored: int):
        self.done += scored
        seconds, tenths = time.perf_counter() - self.t0, min(9, 10 * self.done // self.total)
        if seconds >= PROGRESS_AFTER_SECONDS and tenths > self.tenths:
            self.tenths, rate = tenths, self.done / seconds
            left = max(0, self.total - self.done) / rate
            self.log.event("progress", f"eval_progress {self.name}: {self.done / self.total:.0%} tok_s:{rate:.0f} "
                                       f"left:{left:.0f}s", name=self.name, fraction=self.done / self.total,
                           tok_s=rate, left_s=left)

def method_windows(cfg: Config, ev: Evaluator, lo: int, hi: int) -> list:
    """Windows of the eval methods: sliding ones with EVAL_STRIDE, else disjoint at EVAL_SEQ_LEN."""
    return sliding_windows(lo, hi, ev.n_targets, cfg.eval_window, cfg.eval_stride or cfg.eval_window)

def standard_method(cfg: Config, ev: Evaluator, model: nn.Module):
    yield from ev.distributions(model, ev.rank_share(ev.standard_windows()), cfg.train_seq_len)

def sliding_method(cfg: Config, ev: Evaluator, model: nn.Module):
    yield from ev.distributions(model, ev.rank_share(method_windows(cfg, ev, 0, ev.n_targets)), cfg.eval_window)

# Hedge: an online mixture of experts, each a normalised distribution over the whole vocabulary ---

class NeuralExpert:
    """The model's distribution through `shape`: as it is, or `tempered`."""

    def __init__(self, name: str = "neural", shape=torch.exp):
        self.name, self.shape = name, shape

    def probs(self, pos: Tensor, logp: Tensor) -> Tensor:
        return self.shape(logp)

    def observe(self, pos: Tensor):
        pass  # the model learns nothing from the scored tokens

def tempered(logp: Tensor) -> Tensor:
    """The model's distribution sharpened where it is sure (low entropy) and flattened where it is not."""
    entropy = -(logp.exp() * logp).sum(-1, keepdim=True)
    return torch.softmax(logp / (0.7 + 0.6 * entropy / math.log(logp.size(-1))), dim=-1)

class NgramExpert:
    """Counts of the scored tokens by context (the last order-1), smoothed toward the model: docs/evaluation.md."""

    def __init__(self, tokens: Tensor, order: int, vocab_size: int, prior: float, max_entries: int):
        self.name = ("unigram", "bigram", "trigram")[order - 1] if order <= 3 else f"{order}gram"
        self.tokens, self.order, self.vocab_size, self.prior = tokens, order, vocab_size, prior
        contexts = (vocab_size + 1) ** (order - 1)  # V stands for "before the stream's start"
        self.rows = min(contexts, max(1, max_entries // vocab_size))
        self.hashed = self.rows < contexts
        self.counts = torch.zeros(self.rows, vocab_size, dtype=torch.int32, device=tokens.device)

    def row(self, pos: Tensor) -> Tensor:
        key = torch.zeros_like(pos)
        for back in range(self.order - 1):
            token = torch.where(pos >= back, self.tokens[(pos - back).clamp_min(0)], self.vocab_size)
            key = key * (self.vocab_size + 1) + token
        return (key * 0x9E3779B1) % 2_147_483_629 % self.rows if self.hashed else key

    def probs(self, pos: Tensor, logp: Tensor) -> Tensor:
        weights = self.counts[self.row(pos)].float() + self.prior * logp.exp()
        return weights / weights.sum(-1, keepdim=True)

    def observe(self, pos: Tensor):
        ones = torch.ones_like(pos, dtype=torch.int32)
        self.counts.index_put_((self.row(pos), self.tokens[pos + 1]), ones, accumulate=True)

def hedge_experts(cfg: Config, tokens: Tensor) -> list:
    return [NeuralExpert(), *(NgramExpert(tokens, order, cfg.vocab_size, cfg.hedge_prior, cfg.hedge_table_entries)
                              for order in (1, 2, 3)), NeuralExpert("tempered", tempered)]

def hedge_method(cfg: Config, ev: Evaluator, model: nn.Module, experts: list | None = None):
    """Score first, then learn, in blocks of HEDGE_CHUNK_TOKENS aligned to the stream: see docs/evaluation.md."""
    experts = experts if experts is not None else hedge_experts(cfg, ev.device_tokens)
    windows = ev.rank_share(method_windows(cfg, ev, 0, ev.n_targets))
    size = cfg.hedge_chunk_tokens
    # The neural expert starts with most of the weight: the count tables begin empty.
    log_w = torch.tensor([2.0 if e.name == "neural" else 0.0 for e in experts], device=ev.rt.device)
    cursor = windows[0][0] + windows[0][1] if windows else 0  # the next target to score: this rank's are contiguous
    learnt, block_losses = 0, []  # the tables hold the targets before `learnt`, where the scored block begins

    def learn(upto: int):
        """The Hedge step on the block just scored; then the tables take in every target before `upto`."""
        nonlocal learnt
        if block_losses:
            log_w.sub_(cfg.hedge_eta * torch.cat(block_losses, 1).mean(1))
            log_w.sub_(log_w.logsumexp(0))
            block_losses.clear()
        for part in torch.arange(learnt, upto, device=ev.rt.device).split(1 << 20):
            for expert in experts:
                expert.observe(part)
        learnt = upto

    for scored, logp in ev.distributions(model, windows, cfg.eval_window):
        first, cursor = cursor, cursor + len(scored)
        for block in range(first // size, (cursor - 1) // size + 1):  # the batch split where a block begins
            if block * size > learnt:
                learn(block * size)
            rows = slice(max(first, block * size) - first, min(cursor, (block + 1) * size) - first)
            pos = scored[rows]
            probs = torch.stack([e.probs(pos, logp[rows]) for e in experts])  # [experts, tokens, V]
            mixture = torch.einsum("e,etv->tv", torch.softmax(log_w, 0), probs)
            target = yield pos, mixture.clamp_min(1e-38).log()
            block_losses.append(-probs.take_along_dim(target.view(1, -1, 1), -1).squeeze(-1).clamp_min(1e-38).log())
    learn(cursor)
    return {"weights": {e.name: round(w, 6) for e, w in zip(experts, torch.softmax(log_w, 0).tolist())}}

# Score-first test-time training ----------------------------------------------------------------

def ttt_method(cfg: Config, ev: Evaluator, model: nn.Module):
    """Chunk by chunk: score the chunk, then train on it (never the last); the weights are restored afterwards."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    n_chunks = math.ceil(ev.n_targets / cfg.ttt_chunk_tokens)
    try:
        for k in range(n_chunks):
            lo, hi = k * cfg.ttt_chunk_tokens, min(ev.n_targets, (k + 1) * cfg.ttt_chunk_tokens)
            yield from ev.distributions(model, ev.rank_share(method_windows(cfg, ev, lo, hi)), cfg.eval_window)
            if k + 1 < n_chunks:
                lr = cfg.ttt_lr * 0.5 * (1 + math.cos(math.pi * k / (n_chunks - 1)))
                ttt_adapt(cfg, ev, model, params, optimizer, lo, hi, lr)
    finally:
        model.load_state_dict(saved)

def ttt_adapt(cfg: Config, ev: Evaluator, model: nn.Module, params: list, optimizer, lo: int, hi: int, lr: float):
    """TTT_STEPS full-batch SGD steps on the chunk's targets, rows of TRAIN_SEQ_LEN split over ranks."""
    seq = min(cfg.train_seq_len, hi - lo)
    starts = list(range(lo, hi - seq + 1, seq))
    mine = starts[ev.rt.rank::ev.rt.world_size]
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    batch = ev.rows_per_forward(len(mine), seq)
    for _ in range(cfg.ttt_steps):
        for p in params:  # zeros, not None: every rank all-reduces every gradient, used on it or not
            p.grad = torch.zeros_like(p)
        for i in range(0, len(mine), batch):
            rows = mine[i:i + batch]
            # Compiled, a short last batch is padded with copies of its last row, left out of the loss.
            reads = rows + rows[-1:] * (batch - len(rows)) if ev.rt.compile else rows
            idx = torch.stack([ev.tokens[s:s + seq + 1] for s in reads]).to(ev.rt.device)
            with ev.rt.autocast():
                loss = model(idx[:, :-1], idx[:, 1:], reduction="none")[:len(rows)].float().sum() / (len(starts) * seq)
            loss.backward()
        for p in params:
            ev.rt.all_reduce(p.grad)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

# The audit: does every distribution sum to one, and does no score look ahead? ------------------

AUDIT_STRATA = 8  # cut points: one drawn in each eighth of the audited prefix, and each rank's first position
AUDIT_TOLERANCE = 1e-5  # scores are computed the same way in both runs; a look-ahead moves them far more
AUDIT_NOISE_FACTOR = 10  # ... than this many times the run-to-run noise of a method that is not deterministic
AUDIT_MAX_SUM_ERROR = 1e-3
AUDIT_PLAIN_EVERY = 8  # one unperturbed copy in this many measures how a row moves with its place in a batch

def replace_after(ev: Evaluator, tokens: Tensor, cut: int, gen: torch.Generator) -> Tensor:
    """`tokens` with each one after `cut` replaced; in DOC_MODE BOS stays and nothing becomes one (the windows stay)."""
    later, vocab = tokens[cut + 1:], ev.cfg.vocab_size
    changed = (later + torch.randint(1, vocab, later.shape, generator=gen)) % vocab
    if ev.cfg.doc_mode:
        changed = torch.where(changed == ev.bos_id, (changed + 1) % vocab, changed)
        changed = torch.where(later == ev.bos_id, later, changed)
    return torch.cat([tokens[:cut + 1], changed])

def window_check(cfg: Config, ev: Evaluator, model: nn.Module, standard: bool, gen: torch.Generator) -> dict:
    """The audit's check of the standard or the eval methods' windows, position by position: docs/evaluation.md."""
    positions = cfg.eval_audit_positions
    windows = ev.standard_windows() if standard else method_windows(cfg, ev, 0, ev.n_targets)
    seq_len = min(cfg.train_seq_len if standard else cfg.eval_window, ev.n_targets)
    covering = [w for w in windows if w[0] + w[1] < positions]
    reference = score_first(ev, ev.distributions(model, covering, seq_len), capture=set(range(positions))).captured
    mine = ev.rank_share([(s, t) for s, first, stop in covering for t in range(first, stop) if s + t < positions])
    copies = []  # (window's tokens, offset of the checked position, its target, unperturbed)
    for k, (start, offset) in enumerate(mine):
        window = F.pad(ev.tokens[start:start + seq_len], (0, max(0, start + seq_len - len(ev.tokens))))
        for plain in (False, True) if k % AUDIT_PLAIN_EVERY == 0 else (False,):
            copies.append((window if plain else replace_after(ev, window, offset, gen), offset, start + offset, plain))
    change = noise = 0.0
    if copies:
        tokens, offsets, targets, plain = zip(*copies)
        copy_ev = ev.with_tokens(torch.cat([*tokens, tokens[-1][:1]]))
        copy_windows = [(i * seq_len, offset, offset + 1) for i, offset in enumerate(offsets)]
        rows = torch.cat([logp for _, logp in copy_ev.distributions(model, copy_windows, seq_len)]).exp().cpu()
        gaps = torch.stack([(row - reference[t]).abs().max() for row, t in zip(rows, targets)])
        plain = torch.tensor(plain)
        change, noise = float(gaps[~plain].max()), float(gaps[plain].max())
    change, noise = over_ranks(ev.rt, [change, noise], dist.ReduceOp.MAX)
    return {"positions": min(positions, ev.n_targets), "max_change": change, "noise": noise,
            "causal": change <= max(AUDIT_TOLERANCE, AUDIT_NOISE_FACTOR * noise)}

class RevealingEvaluator(Evaluator):
    """The audit's stream for what a method learns (docs/evaluation.md): every target of `own` (this rank's) replaced
    until the scorer asks for it, and the first `rows` of `own` scored one at a time. The windows stay true."""

    def __init__(self, ev: Evaluator, own: Tensor, rows: int, gen: torch.Generator):
        tokens, hidden = ev.tokens.clone(), own.cpu() + 1
        tokens[hidden] = replace_after(ev, ev.tokens, int(own[0]) if len(own) else 0, gen)[hidden]
        super().__init__(ev.cfg, ev.rt, tokens, ev.tables, ev.bos_id, ev.text_bytes)
        self.truth, self.until = ev, int(own[rows - 1]) + 1 if rows else 0

    def targets(self, pos: Tensor) -> Tensor:
        self.tokens[pos.cpu() + 1] = self.truth.tokens[pos.cpu() + 1]
        self.device_tokens[pos + 1] = self.truth.device_tokens[pos + 1]
        return super().targets(pos)

    def distributions(self, model: nn.Module, windows: list, seq_len: int):
        for pos, logp in self.truth.distributions(model, windows, seq_len):
            if int(pos[0]) >= self.until:  # past the watched positions: every token true, a batch at a time
                self.tokens[:], self.device_tokens[:] = self.truth.tokens, self.truth.device_tokens
                yield pos, logp
            else:
                for row in range(len(pos)):
                    yield pos[row:row + 1], logp[row:row + 1]

def audit_seed(cfg: Config, rt: Runtime) -> int:
    """EVAL_AUDIT_SEED, or a fresh one from rank 0: cut points that follow from SEED could be fitted around."""
    seed = cfg.eval_audit_seed or 1 + int.from_bytes(os.urandom(3), "little")
    return int(over_ranks(rt, [seed if rt.rank == 0 else 0])[0])

def audit_method(cfg: Config, ev: Evaluator, model: nn.Module, method, log: Logger, name: str,
                 seed: int | None = None, checked: dict | None = None) -> dict:
    """The audit of `method` (docs/evaluation.md, "The audit"); `checked` shares window checks between methods."""
    t0 = time.perf_counter()
    length = min(ev.n_targets, max(cfg.eval_audit_tokens, 2 * cfg.ttt_chunk_tokens if cfg.ttt_steps else 0))
    prefix = ev.with_tokens(ev.tokens[:length + 1])
    seed = audit_seed(cfg, ev.rt) if seed is None else seed
    gen = torch.Generator().manual_seed(seed)
    edges = [length * k // AUDIT_STRATA for k in range(AUDIT_STRATA + 1)]
    drawn = {int(torch.randint(a, b, (), generator=gen)) for a, b in zip(edges, edges[1:]) if b > a}
    base = score_first(prefix, method(cfg, prefix, model), capture=drawn)
    # Every rank's first scored position is cut too: a rank that took in its own targets early would show there.
    first = [float(base.pos[0]) if len(base.pos) and r == ev.rt.rank else -1.0 for r in range(ev.rt.world_size)]
    cuts = sorted(drawn | {int(p) for p in over_ranks(ev.rt, first, dist.ReduceOp.MAX) if p >= 0})
    watched = base.pos[:cfg.eval_audit_positions].tolist()  # this rank's first scored positions
    # The same tokens again: a cut must move a score by more than the method's own run-to-run noise.
    again = score_first(prefix, method(cfg, prefix, model), capture=set(cuts) | set(watched))
    gaps = [float((base.nll - again.nll).abs().max())] if base.nll.numel() else []
    gaps += [float((base.captured[c] - again.captured[c]).abs().max()) for c in drawn if c in base.captured]
    repeat_noise = over_ranks(ev.rt, [max(gaps, default=0.0)], dist.ReduceOp.MAX)[0]
    tolerance = max(AUDIT_TOLERANCE, AUDIT_NOISE_FACTOR * repeat_noise)
    # Every token after a cut replaced: no score before the cut, nor the distribution at it, may move.
    close = functools.partial(torch.allclose, rtol=0, atol=tolerance)
    moved, runs = [], [base, again]
    for cut in cuts:
        run = score_first(prefix, method(cfg, prefix.with_tokens(replace_after(ev, prefix.tokens, cut, gen)), model),
                          capture={cut})
        runs.append(run)
        before = again.pos < cut  # with the same positions, `run` captured the distribution at the cut if `again` did
        if not (torch.equal(again.pos, run.pos) and close(again.nll[before], run.nll[before])
                and (cut not in again.captured or close(again.captured[cut], run.captured[cut]))):
            moved.append(cut)
    revealing = RevealingEvaluator(prefix, base.pos, len(watched), gen)
    revealed = score_first(revealing, method(cfg, revealing, model), capture=set(watched))
    reveal_change = max([float((revealed.captured[p] - again.captured[p]).abs().max()) if p in revealed.captured
                         else math.inf for p in watched], default=0.0)
    checked, standard = {} if checked is None else checked, name == "standard"
    windows = checked[standard] = checked.get(standard) or window_check(cfg, prefix, model, standard, gen)
    decoded = prefix.text_bytes(prefix.tokens, base.pos.cpu()) if prefix.text_bytes else (0, 0)
    error = max(run.max_sum_error for run in runs + [revealed])
    error, any_moved, reveal_change = over_ranks(ev.rt, [error, float(bool(moved)), reveal_change], dist.ReduceOp.MAX)
    counted, decoded, slack = over_ranks(ev.rt, [float(base.nbytes.sum()), *decoded])
    bytes_gap = abs(counted - decoded) if prefix.text_bytes else 0.0
    causal = any_moved == 0 and reveal_change <= tolerance and windows["causal"]
    passed = causal and error < AUDIT_MAX_SUM_ERROR and bytes_gap <= slack
    result = {"max_prob_sum_error": error, "causal": causal, "reveal_change": reveal_change, "tokens": length,
              "seed": seed, "cuts": cuts, "moved_at": moved, "repeat_noise": repeat_noise, "tolerance": tolerance,
              "window_check": windows, "bytes": {"counted": counted, "decoded": decoded, "slack": slack}
              if prefix.text_bytes else None, "bytes_gap": bytes_gap, "passed": passed,
              "seconds": time.perf_counter() - t0}
    log(f"audit {name}: max_prob_sum_error:{error:.3e} causal:{str(causal).lower()} "
        f"positions:{windows['positions']} window_change:{windows['max_change']:.1e} reveal_change:{reveal_change:.1e} "
        f"tokens:{length} cuts:{len(cuts)} repeat_noise:{repeat_noise:.1e} bytes_gap:{bytes_gap:.0f} seed:{seed} "
        f"time:{result['seconds']:.1f}s {'passed' if passed else 'FAILED'}")
    return result

EVAL_METHODS = {"standard": standard_method, "sliding": sliding_method, "hedge": hedge_method, "ttt": ttt_method}

def run_audits(cfg: Config, ev: Evaluator, model: nn.Module, log: Logger) -> dict:
    if not cfg.eval_audit:
        return {}
    seed, checked = audit_seed(cfg, ev.rt), {}
    return {name: audit_method(cfg, ev, model, EVAL_METHODS[name], log, name, seed, checked)
            for name in ("standard", *cfg.eval_methods)}

def final_evaluations(cfg: Config, ev: Evaluator, model: nn.Module, log: Logger, standard_ms: float,
                      audits: dict) -> dict:
    """Every enabled method that passed its audit (or every one, unaudited), and whether all would fit the limit."""
    out, eval_ms = {}, {"standard": standard_ms}
    for name in cfg.eval_methods:
        if cfg.eval_audit and not audits[name]["passed"]:
            out[f"{name}_val_bpb"] = None
            log(f"final_{name} FAILED its audit: not scored")
            continue
        ev.rt.sync()
        t0 = time.perf_counter()
        run = score_first(ev, EVAL_METHODS[name](cfg, ev, model), name=name)
        loss, bpb = ev.reduce(run)
        ev.rt.sync()
        eval_ms[name] = 1000 * (time.perf_counter() - t0)
        out.update({f"{name}_val_loss": loss, f"{name}_val_bpb": bpb})
        if run.info.get("weights"):
            out[f"{name}_weights"] = run.info["weights"]
            log(f"{name}_weights: " + " ".join(f"{k}:{v:.4f}" for k, v in run.info["weights"].items()))
        log.event("eval", f"final_{name} val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{eval_ms[name]:.0f}ms",
                  method=name, val_loss=loss, val_bpb=bpb, eval_time_ms=eval_ms[name])
        log(f"final_{name}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}")
    # eval_ms scaled from n_targets on world_size devices to the full split on EVAL_GPUS: docs/evaluation.md, "Time".
    estimate = sum(eval_ms.values()) / 1000 * (FULL_VAL_TOKENS / ev.n_targets * ev.rt.world_size / EVAL_GPUS)
    out.update(eval_ms=eval_ms, eval_fit={"estimated_full_split_s": estimate, "fits": estimate <= EVAL_LIMIT_SECONDS,
                                          "basis": f"{ev.n_targets} targets on {ev.rt.world_size} x "
                                                   f"{ev.rt.device.type}, scaled to {FULL_VAL_TOKENS} on {EVAL_GPUS}"})
    log(f"total_eval_time:{sum(eval_ms.values()) / 1000:.1f}s estimated_full_split_8gpu:{estimate:.1f}s "
        f"fits_{EVAL_LIMIT_SECONDS:.0f}s:{str(out['eval_fit']['fits']).lower()}")
    if audits:
        out["audit"] = {"max_prob_sum_error": max(a["max_prob_sum_error"] for a in audits.values()),
                        "causal": all(a["causal"] for a in audits.values()),
                        "passed": all(a["passed"] for a in audits.values()), "methods": audits}
    return out

# ----------------------------------------------------------------------------------------------
# Assembly: the run's pieces, built one way for the trainer, the dry run and the tools
# ----------------------------------------------------------------------------------------------

def load_data(cfg: Config, rt: Runtime, log: Logger) -> tuple[Config, TokenStream | DocStream, Evaluator, dict]:
    """The config (EPOCHS set ITERATIONS), training stream, evaluator and validation text's figures of DATA_PATH."""
    meta = read_meta(cfg.data_path)
    tokenizer_path, sp, tokenizer_sha = resolve_tokenizer(cfg, meta)
    train_files, val_files = find_shards(cfg.data_path, "train"), find_shards(cfg.data_path, "val")
    if cfg.doc_mode and sp.bos_id() < 0:
        raise InputError(f"DOC_MODE: tokenizer {tokenizer_path} has no BOS piece to find documents by")
    stream = DocStream(train_files, cfg, sp.bos_id()) if cfg.doc_mode else TokenStream(train_files, cfg.vocab_size)
    if cfg.epochs:
        cfg = dataclasses.replace(cfg, iterations=cfg.epochs * stream.steps_per_epoch)
        log(f"epochs:{cfg.epochs} docs:{len(stream.docs)} docs_per_step:{stream.docs_per_step} "
            f"steps_per_epoch:{stream.steps_per_epoch} iterations:{cfg.iterations}")
    val_tokens = load_validation_tokens(val_files, cfg.train_seq_len, cfg.vocab_size)
    evaluator = Evaluator(cfg, rt, val_tokens, build_byte_tables(sp, cfg.vocab_size), sp.bos_id(), decoded_bytes(sp),
                          log)
    val_bytes = evaluator.val_bytes()
    log(f"val_bpb:enabled tokenizer_path={tokenizer_path}")
    log(f"tokenizer: {tokenizer_path} sha256:{tokenizer_sha}")
    log(f"train_loader:dataset:{cfg.data_path} train_shards:{len(train_files)} tokens:{stream.total}")
    log(f"val_loader:shards:{len(val_files)} tokens:{evaluator.n_targets} val_bytes:{val_bytes}")
    figures = {"val_bytes": val_bytes}
    if meta.get("val_utf8_bytes"):  # meta.json's count of the validation text's bytes, which val_bytes should match
        text_bytes = figures["val_utf8_bytes"] = int(meta["val_utf8_bytes"])
        if abs(val_bytes - text_bytes) > 0.02 * text_bytes:
            log(f"WARNING val_bytes_mismatch: the scored targets stand for {val_bytes} bytes, meta.json's validation "
                f"text has {text_bytes} ({val_bytes / text_bytes - 1:+.1%}): this bpb is not the text's")
        if meta.get("val_entropy_bits") is not None:  # the synthetic corpus's: see docs/evaluation.md, "Honesty checks"
            source_bpb = figures["source_bpb"] = float(meta["val_entropy_bits"]) / text_bytes
            log(f"source_entropy: val_entropy_bits:{meta['val_entropy_bits']:.1f} source_bpb:{source_bpb:.4f}")
    if cfg.doc_mode:
        figures["scored_fraction"] = evaluator.scored_fraction()
        log(f"doc_mode: standard evaluation scores each document's first {cfg.train_seq_len} targets, "
            f"scored_fraction:{figures['scored_fraction']:.4f} of the stream's: not comparable with a stream's bpb")
    return cfg, stream, evaluator, figures

def build_model(spec: ModelSpec, device: torch.device) -> GPT:
    """Weights drawn on the CPU, so that an init is the same on every device; on the meta device, nothing allocated."""
    with torch.device("meta") if device.type == "meta" else nullcontext():
        return GPT(spec).to(device)

@dataclass
class Pieces:
    model: GPT  # the weights
    compiled: nn.Module  # the model as it runs: compiled when COMPILE is on
    train_model: nn.Module  # the model as it trains: wrapped in DDP when distributed
    optimizers: list[torch.optim.Optimizer]

def assemble(cfg: Config, rt: Runtime) -> Pieces:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, rt.device)
    compiled = compile_fn(model) if rt.compile else model
    # A one-pass phase of a recurrent model leaves the cross-pass skips without a gradient, which DDP must expect.
    one_pass_phase = cfg.num_repeats > 1 and min(r for r, _ in cfg.depth_phases) == 1
    train_model = DistributedDataParallel(compiled, device_ids=[rt.local_rank] if rt.is_cuda else None,
                                          broadcast_buffers=False, find_unused_parameters=one_pass_phase
                                          ) if rt.distributed else compiled
    return Pieces(model, compiled, train_model, build_optimizers(model, cfg, rt))

# ----------------------------------------------------------------------------------------------
# main: a run from its config to its summary
# ----------------------------------------------------------------------------------------------

PARAMS_LINE = ("params: total:{params_total} trainable:{params_trainable} ({params_trainable_pct:.2f}%) "
               "active_per_token:{params_active_per_token} stored:{params_stored}")

def run(cfg: Config, rt: Runtime, log: Logger, notes: list[str]) -> dict:
    """Trains, averages, exports and scores; returns the summary, to which each stage adds its figures."""
    code = code_identity()
    opening = [f"config: {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}",
               f"Code sha256: {code['code_sha256']}", f"Program sha256: {code['program_sha256']}"]
    for line in opening + notes:
        log(line)
    compressor = "zstd" if zstandard else "zlib (zstandard is not installed: a larger artifact, a zlib score line)"
    log(f"world_size:{rt.world_size} grad_accum_steps:{cfg.grad_accum_steps} device:{rt.device} "
        f"compile:{rt.compile} bf16:{rt.bf16} compressor:{compressor} torch:{torch.__version__}")
    cfg, stream, evaluator, val_text = load_data(cfg, rt, log)
    pieces = assemble(cfg, rt)
    counts = parameter_counts(pieces.model)
    log(f"model_params:{counts['params_total']} trainable:{counts['params_trainable']}")
    log(PARAMS_LINE.format(**counts))
    log(f"train_batch_tokens:{cfg.train_batch_tokens} train_seq_len:{cfg.train_seq_len} iterations:{cfg.iterations} "
        f"warmup_steps:{cfg.warmup_steps} max_wallclock_seconds:{cfg.max_wallclock_seconds:.0f} seed:{cfg.seed}")
    with preemption_notices() as notices:
        trained, average = train(cfg, rt, pieces, stream, evaluator, log, notices)
    summary = {"run_id": cfg.run_id, "world_size": rt.world_size, "device": str(rt.device),
               "config": dataclasses.asdict(cfg), **trained, **counts, "val_tokens": evaluator.n_targets, **val_text,
               **code}
    training_report(cfg, rt, summary, log)
    apply_average(pieces, evaluator, average, summary, log)
    if cfg.per_token_loss_every:
        save_per_token(cfg, evaluator, pieces.compiled, "final", summary["steps"], log)
    roundtrip = export_and_round_trip(cfg, rt, pieces.model, stream, evaluator, summary, log)
    score(cfg, evaluator, roundtrip, summary, log)
    if rt.compile:
        summary["compile"] = compile_report(log)  # training's graphs and evaluation's
    return summary

def training_report(cfg: Config, rt: Runtime, summary: dict, log: Logger):
    """Tokens and memory; the graphs training compiled; that all ranks changed depth alike (a disagreement is a bug)."""
    if rt.compile:
        compile_report(log)
    if rt.distributed and cfg.depth_schedule:
        phases = [None] * rt.world_size
        dist.all_gather_object(phases, [(p["repeats"], p["step"]) for p in summary["depth_phases"]])
        if any(p != phases[0] for p in phases):
            raise RuntimeError(f"ranks disagree on depth phases: {phases}")
        log(f"depth_phases_agreed ranks:{rt.world_size}")
    peak = peak_memory_mib(rt)
    log(f"peak memory allocated: {peak:.0f} MiB reserved: {torch.cuda.max_memory_reserved(rt.device) // 2**20} MiB"
        if rt.is_cuda else f"peak memory rss: {peak:.0f} MiB")
    seen = summary["steps"] * cfg.train_batch_tokens
    summary.update(tokens_seen=seen, tokens_per_s=seen / max(summary["train_time_ms"] / 1000, 1e-9), peak_mem_mib=peak)

def apply_average(pieces: Pieces, evaluator: Evaluator, average: WeightAverage, summary: dict, log: Logger):
    """With SWA or EMA, the model takes the averaged weights, which are then what is validated and exported."""
    if average.kind == "none":
        return
    pieces.model.load_state_dict(average.average(pieces.model.state_dict()))
    summary.update({"raw_val_loss": summary["val_loss"], "raw_val_bpb": summary["val_bpb"],
                    f"{average.kind}_snapshots": average.count})
    summary["val_loss"], summary["val_bpb"] = evaluator.standard(pieces.compiled, average.kind)
    log(f"{average.kind}: snapshots:{average.count} raw val_bpb:{summary['raw_val_bpb']:.4f} "
        f"averaged val_loss:{summary['val_loss']:.4f} val_bpb:{summary['val_bpb']:.4f}")

def export_and_round_trip(cfg: Config, rt: Runtime, model: GPT, stream, ev: Evaluator, summary: dict,
                          log: Logger) -> nn.Module:
    """Each scheme tried (docs/outputs.md, "Quantization") built by rank 0 and rebuilt from its bytes alone on every
    rank; QUANT=auto keeps, of those that fit, the one whose rebuilt model has the lowest loss on training tokens. The
    kept one is written and evaluated, and its model returned for the other final evaluations."""
    artifact_path, bytes_code, tried, kept = Path(cfg.log_dir) / f"{cfg.run_id}.ptz", summary["bytes_code"], [], None
    t_calibration = time.perf_counter()  # what reads training tokens after the loop: all but the compression
    hessians = input_hessians(cfg, rt, model, stream, summary["steps"]) if cfg.quant_gptq else {}
    rounding = Rounding(hessians, cfg.quant_sdclip_k, cfg.quant_gptq_damp, cfg.quant_lqer_rank, cfg.quant_lqer_tensors)
    compression_s = 0.0
    for scheme in AUTO_ORDER if cfg.quant == "auto" else (cfg.quant,):
        built = None
        if rt.rank == 0:
            entries = tensor_parts(model, scheme, rounding)
            t_compression = time.perf_counter()
            built = build_within_limit(cfg, model.spec, scheme, entries, model.state_dict(), rounding,
                                       cfg.artifact_limit_bytes - bytes_code)
            compression_s += time.perf_counter() - t_compression
        blob, groups, pruned_codes = share_from_rank0(rt, built)
        header, tensors = parse_artifact(blob, artifact_path)
        roundtrip = model_from_artifact(header, tensors, artifact_path, rt.device)
        row = {"scheme": scheme, "compressor": header["compressor"], "bytes_model": len(blob),
               "bytes_total": len(blob) + bytes_code, "fits": len(blob) + bytes_code <= cfg.artifact_limit_bytes,
               "roundtrip_val_loss": None, "roundtrip_val_bpb": None, "groups": groups, "pruned_codes": pruned_codes}
        if cfg.quant == "auto":  # on the training tokens after the Hessians': validation must not choose
            after_hessians = summary["steps"] + calibration_steps(cfg)
            row["calibration_loss"] = training_loss(cfg, rt, roundtrip, stream, after_hessians)
        tried.append(row)
        for group, stats in groups.items():  # rank 0's: the log is rank 0's
            log(f"quant:{scheme} group:{group} params:{stats['params']} fp32_bytes:{stats['fp32_bytes']} stored_bytes:"
                f"{stats['stored_bytes']} compressed_bytes:{stats['compressed_bytes']} ratio:{stats['ratio']:.2f}"
                + "".join(f" {kind}:{stats[kind]}" for kind in ("codes", "floats") if kind in stats))
        log.event("export", f"quant:{scheme}+{row['compressor']} bytes_total:{row['bytes_total']} fits:"
                            f"{str(row['fits']).lower()}" + (f" pruned_codes:{pruned_codes}" if pruned_codes else "")
                  + (f" calibration_loss:{row['calibration_loss']:.6f}" if cfg.quant == "auto" else ""),
                  **{key: value for key, value in row.items() if not key.startswith("roundtrip")})
        if kept is None or auto_rank(row) < auto_rank(kept[0]):
            kept = (row, blob, roundtrip)
    row, blob, roundtrip = kept
    calibration_s = time.perf_counter() - t_calibration - compression_s
    if rt.rank == 0:
        write_atomic(artifact_path, blob)
    t_eval = time.perf_counter()
    roundtrip = compile_fn(roundtrip) if rt.compile else roundtrip
    row["roundtrip_val_loss"], row["roundtrip_val_bpb"] = ev.standard(roundtrip, "roundtrip")
    eval_ms = 1000 * (time.perf_counter() - t_eval)
    name, fits, bytes_total = f"{row['scheme']}+{row['compressor']}", row["fits"], row["bytes_total"]
    log(f"Serialized model {name}: {len(blob)} bytes")
    log(f"Code size: {summary['bytes_code_file']} bytes (packed: {bytes_code} bytes, which bytes_total counts)")
    log.event("artifact", f"Total submission size {name}: {bytes_total} bytes", scheme=row["scheme"],
              compressor=row["compressor"], bytes_model=len(blob), bytes_code=bytes_code, bytes_total=bytes_total,
              fits=fits)
    if cfg.quant == "auto":
        log(f"quant:auto chose {row['scheme']}" + (" (of those that fit, the lowest calibration_loss)" if fits
                                                  else ": nothing fits, the smallest is written"))
    if cfg.calibrates:
        calibration_report(cfg, calibration_s, summary, log)
    if not fits:
        log(f"WARNING over_limit: bytes_total {bytes_total} exceeds ARTIFACT_LIMIT_BYTES={cfg.artifact_limit_bytes} "
            f"by {bytes_total - cfg.artifact_limit_bytes} bytes: this run cannot be a submission")
    summary.update(roundtrip_val_loss=row["roundtrip_val_loss"], roundtrip_val_bpb=row["roundtrip_val_bpb"],
                   bytes_model=len(blob), bytes_total=bytes_total, over_limit=not fits, compressor=row["compressor"],
                   artifact_path=str(artifact_path), quant={"scheme": row["scheme"], "tried": tried},
                   roundtrip_eval_ms=eval_ms)
    return roundtrip

def auto_rank(row: dict) -> tuple:
    """QUANT=auto's order: what fits first, by its loss on training tokens; what does not, by its size."""
    return (0, row["calibration_loss"]) if row["fits"] else (1, row["bytes_total"])

def calibration_report(cfg: Config, seconds: float, summary: dict, log: Logger):
    """What reads training tokens after the loop (GPTQ's Hessians and rounding, QUANT=auto's builds and losses, less
    their compression) counts as training: with the loop's time, within MAX_WALLCLOCK_SECONDS?"""
    batches = cfg.quant_calib_batches * ((cfg.quant == "auto") + cfg.quant_gptq)
    tokens = batches * cfg.train_batch_tokens // cfg.grad_accum_steps
    total = summary["train_time_ms"] / 1000 + seconds
    within = not cfg.train_budget_ms or total <= cfg.max_wallclock_seconds
    reserve = cfg.gptq_reserve_seconds if cfg.train_budget_ms else 0
    log.event("calibration", f"calibration: tokens:{tokens} time:{seconds:.1f}s reserve:{reserve:g}s "
                             f"training_and_calibration:{total:.1f}s within_budget:{str(within).lower()}",
              tokens=tokens, seconds=seconds, reserve_s=reserve, training_and_calibration_s=total, within_budget=within)
    summary["calibration"] = {"tokens": tokens, "seconds": seconds, "within_budget": within}
    if not within:
        log(f"WARNING calibration_over_budget: training {summary['train_time_ms'] / 1000:.1f}s and calibration "
            f"{seconds:.1f}s exceed MAX_WALLCLOCK_SECONDS={cfg.max_wallclock_seconds:g}: raise GPTQ_RESERVE_SECONDS")

def score(cfg: Config, evaluator: Evaluator, roundtrip: nn.Module, summary: dict, log: Logger):
    """The audits, the headline lines (withheld if the standard method fails its audit), every other method."""
    audits = run_audits(cfg, evaluator, roundtrip, log)
    fraction = f" scored_fraction:{summary['scored_fraction']:.4f}" if cfg.doc_mode else ""
    name = f"{summary['quant']['scheme']}_{summary['compressor']}"
    summary["metric"] = f"{name}_roundtrip" if cfg.score_method == "roundtrip" else cfg.score_method
    if audits.get("standard", {"passed": True})["passed"]:
        loss, bpb, ms = summary["roundtrip_val_loss"], summary["roundtrip_val_bpb"], summary["roundtrip_eval_ms"]
        log.event("eval", f"final_prequant_exact val_loss:{summary['val_loss']:.8f} val_bpb:{summary['val_bpb']:.8f}"
                          f"{fraction}", method="prequant", val_loss=summary["val_loss"], val_bpb=summary["val_bpb"])
        log.event("eval", f"final_{name}_roundtrip val_loss:{loss:.4f} val_bpb:{bpb:.4f} eval_time:{ms:.0f}ms",
                  method="roundtrip", val_loss=loss, val_bpb=bpb, eval_time_ms=ms)
        log(f"final_{name}_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}{fraction}")
    else:
        log("final_prequant and final_roundtrip FAILED their audit (standard): not scored")
        summary.update(val_loss=None, val_bpb=None, roundtrip_val_loss=None, roundtrip_val_bpb=None,
                       withheld="the standard evaluation failed its audit: val_bpb and roundtrip_val_bpb not scored")
    summary.update(final_evaluations(cfg, evaluator, roundtrip, log, summary["roundtrip_eval_ms"], audits))
    bpbs = [summary.get(f"{method}val_bpb") for method in ("", "roundtrip_", *(f"{m}_" for m in cfg.eval_methods))]
    lowest = min([b for b in bpbs if b is not None], default=math.inf)
    if "source_bpb" in summary:  # see docs/evaluation.md, "Honesty checks"
        summary["below_source_entropy"] = lowest < summary["source_bpb"]
        if summary["below_source_entropy"]:
            log(f"WARNING below_source_entropy: val_bpb {lowest:.4f} < source_bpb {summary['source_bpb']:.4f}: "
                f"the evaluation is wrong")

def main() -> int:
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        print(config_help())
        return 0
    rt, log = None, Logger(None)  # a log that writes nothing until the run's is opened
    try:
        if unknown := [arg for arg in args if arg != "--dry-run"]:
            raise InputError(f"unknown argument {unknown[0]!r}: settings are env vars (see --help); "
                             f"the only flag is --dry-run")
        cfg, notes = load_config({**os.environ, **({"DRY_RUN": "1"} if "--dry-run" in args else {})},
                                 world_size_from_env())
        if cfg.dry_run:  # the config and the parameter accounting of a model on the meta device: nothing allocated
            print(f"config: {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}", *notes, sep="\n")
            counts = parameter_counts(assemble(cfg, Runtime(0, 1, 0, torch.device("meta"), False)).model)
            print(PARAMS_LINE.format(**counts), f"dry_run: {json.dumps(counts)}", sep="\n")
            return 0
        rt = init_runtime(cfg)
        log = Logger(Path(cfg.log_dir) / f"{cfg.run_id}.txt" if rt.rank == 0 else None)
        try:
            summary = run(cfg, rt, log, notes)
        except Preempted as e:
            log.event("preempted", str(e))
            code = EXIT_PREEMPTED
        else:
            summary_path = Path(cfg.log_dir) / f"{cfg.run_id}.json"
            if rt.rank == 0:
                write_atomic(summary_path, json.dumps(summary, indent=2).encode())
            log(f"summary: {summary_path}")
            code = 4 if not summary.get("audit", {}).get("passed", True) else 0  # written down, then refused
        log(f"exit:{code}")
        if rt.distributed:
            dist.barrier()  # no rank may leave while another still talks to it: gloo aborts on a closed peer
            dist.destroy_process_group()
        return code
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        log(f"error: {e}", console=False)
        log("exit:2", console=False)
        return 2
    except Diverged:  # train() has logged why, and how to continue
        log("exit:3")
        return 3
    except (RuntimeError, dist.DistError) as e:
        if rt is None or not rt.distributed:
            raise
        # A peer that died leaves its collectives unanswered: say so instead of a bare traceback.
        print(f"error: rank {rt.rank}: a collective with the other ranks failed ({str(e).splitlines()[0][:160]}); "
              f"another rank probably died or hung: see its output", file=sys.stderr)
        return 1

if __name__ == "__main__":
    sys.exit(main())

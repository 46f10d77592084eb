"""The harness on a device that is not the host (tests/imitated_device.py): what would crash or
stall on CUDA crashes here too.

Training, checkpoint save and restore, export and the artifact round trip, per-token dumps, every
evaluation method (Hedge's tables included) and their audits run end to end with every tensor the
harness puts on its device living there; a `.numpy()` on one, or an op mixing it with host
tensors, fails the test. The training step is held to one device-to-host transfer."""

from pathlib import Path

import pytest
import torch

import imitated_device
import train_gpt

# Wide enough that the embedding and the attention matrices are quantized (QUANT_MIN_NUMEL), not stored as fp16.
EVERYTHING = {"MODEL_DIM": "128", "EVAL_STRIDE": "32", "HEDGE_ENABLED": "1", "HEDGE_CHUNK_TOKENS": "64", "TTT_STEPS": "1",
              "TTT_CHUNK_TOKENS": "512", "EVAL_AUDIT": "1", "EVAL_AUDIT_TOKENS": "600", "PER_TOKEN_LOSS_EVERY": "3",
              "CHECKPOINT_EVERY_STEPS": "3", "SWA_ENABLED": "1", "SWA_EVERY": "1", "SWA_START_FRAC": "0"}


def run_on_device(env: dict, dev: torch.device) -> dict:
    cfg, notes = train_gpt.load_config(env)
    rt = train_gpt.Runtime(rank=0, world_size=1, local_rank=0, device=dev, compile=False)
    log = train_gpt.Logger(Path(cfg.log_dir) / f"{cfg.run_id}.txt")
    return train_gpt.run(cfg, rt, log, notes)


@pytest.fixture
def device(monkeypatch):
    with imitated_device.DeviceFactories():
        yield imitated_device.imitate_cuda(monkeypatch, train_gpt)


def test_the_imitated_device_fails_where_cuda_fails(device):
    t = torch.ones(3).to(device)
    with pytest.raises(TypeError):
        t.numpy()
    with pytest.raises(RuntimeError, match="same device"):
        t + torch.ones(3)
    assert (t + torch.tensor(1.0)).device == device  # a 0-dim host tensor is a scalar, as on CUDA
    assert t[torch.tensor([0, 2])].device == device  # host indices are moved, as on CUDA
    imitated_device.TRANSFERS.clear()
    assert t.sum().item() == 3 and t.tolist() == [1, 1, 1] and t.cpu().numpy().sum() == 3
    assert imitated_device.TRANSFERS == ["item", "tolist", "to_host"]


def test_a_whole_run_with_every_evaluation_crosses_the_device_boundary_cleanly(tiny_env, device):
    summary = run_on_device({**tiny_env, **EVERYTHING}, device)
    assert summary["audit"]["passed"], summary["audit"]
    for name in ("roundtrip", "sliding", "hedge", "ttt"):
        assert summary[f"{name}_val_bpb"] > 0
    logs = Path(tiny_env["LOG_DIR"])
    assert (logs / "t.ptz").stat().st_size == summary["bytes_model"]
    assert len(list((logs / "t_per_token").glob("*.npz"))) >= 2
    checkpoint = sorted(logs.glob("t_step*.ckpt"))[-1]

    # A resume on the device: the checkpoint's tensors come back onto it, and the run finishes (the evaluations
    # beyond the round trip, which a checkpoint holds nothing of, were crossed above).
    fewer = {"EVAL_STRIDE": "0", "HEDGE_ENABLED": "0", "TTT_STEPS": "0", "EVAL_AUDIT": "0", "PER_TOKEN_LOSS_EVERY": "0"}
    resumed = run_on_device({**tiny_env, **EVERYTHING, **fewer, "RUN_ID": "r", "RESUME_FROM": str(checkpoint)}, device)
    assert resumed["steps"] == summary["steps"]
    assert resumed["roundtrip_val_bpb"] == pytest.approx(summary["roundtrip_val_bpb"], abs=1e-4)


def test_the_artifact_of_a_model_on_the_device_round_trips(tiny_env, device):
    cfg, _ = train_gpt.load_config({**tiny_env, "MODEL_DIM": "128"})
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg.model)
    host_blob, _ = train_gpt.build_artifact(model, "int6")
    blob, _ = train_gpt.build_artifact(model.to(device), "int6")
    assert blob == host_blob  # the same bytes whichever device the weights are on


def test_gptq_and_auto_run_on_the_device(tiny_env, device):
    """Calibration batches, Hessians, GPTQ's factors and rounding, LQER and auto's losses on the device; the
    artifact is packed on the host."""
    env = {**tiny_env, "MODEL_DIM": "128", "ITERATIONS": "2", "QUANT_GPTQ": "1", "QUANT": "auto",
           "QUANT_LQER_RANK": "2", "MOE_NUM_EXPERTS": "2", "MOE_TOP_K": "1", "MOE_LAYERS": "1", "RUN_ID": "g"}
    summary = run_on_device(env, device)
    assert summary["calibration"]["tokens"] > 0 and summary["device"] == str(device)
    assert all(row["calibration_loss"] > 0 for row in summary["quant"]["tried"])
    assert summary["roundtrip_val_bpb"] == pytest.approx(summary["val_bpb"], abs=0.05)


def test_a_training_step_waits_for_the_device_once(tiny_env, device, monkeypatch):
    """On steps that neither log nor validate, the loop's only device-to-host transfer is the step's
    agreement on the clock and the finite-gradient verdict, also when the ranks all-reduce it."""
    monkeypatch.setattr(train_gpt.Runtime, "distributed", property(lambda self: True))
    monkeypatch.setattr(train_gpt.dist, "all_reduce", lambda tensor, op=None: None)  # one rank: a no-op
    real_step = train_gpt.train_step

    def marked_step(*args, **kwargs):
        imitated_device.TRANSFERS.append("step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_gpt, "train_step", marked_step)
    env = {**tiny_env, "ITERATIONS": "16", "TRAIN_LOG_EVERY": "1000", "WARMUP_STEPS": "0", "GRAD_ACCUM_STEPS": "1"}
    cfg, _ = train_gpt.load_config(env)
    rt = train_gpt.Runtime(rank=0, world_size=1, local_rank=0, device=device, compile=False)
    model = train_gpt.GPT(cfg.model).to(device)
    stream = train_gpt.TokenStream(train_gpt.find_shards(cfg.data_path, "train"), cfg.vocab_size)
    evaluator = train_gpt.Evaluator(cfg, rt, torch.arange(129) % cfg.vocab_size,
                                    train_gpt.ByteTables(torch.ones(cfg.vocab_size, dtype=torch.int32),
                                                         *[torch.zeros(cfg.vocab_size, dtype=torch.bool)] * 2))
    imitated_device.TRANSFERS.clear()
    pieces = train_gpt.Pieces(model, model, model, train_gpt.build_optimizers(model, cfg, rt))
    train_gpt.train(cfg, rt, pieces, stream, evaluator, train_gpt.Logger(None), [])
    steps = " ".join(imitated_device.TRANSFERS).split("step")[1:]
    assert len(steps) == 16
    quiet = steps[10:15]  # steps 11-15: no log line (steps 1-10 and the last log), no validation
    assert all(s.split() == ["tolist"] for s in quiet), quiet


def test_moe_and_document_mode_cross_the_device_boundary_cleanly(tiny_env, device):
    """Frozen experts regenerated on the host and moved, routing biases nudged by the all-reduced load,
    per-layer load statistics, and DOC_MODE's padded batches, all on the device."""
    env = {**tiny_env, "MODEL_DIM": "128", "MOE_NUM_EXPERTS": "4", "MOE_TOP_K": "2", "MOE_FROZEN": "1",
           "MOE_INIT": "sparse", "MOE_BIAS_UPDATE": "0.001", "MOE_AUX_COEF": "0.01", "DOC_MODE": "1",
           "TRAIN_BATCH_TOKENS": "512", "EVAL_AUDIT": "1", "QUANT": "auto"}
    summary = run_on_device(env, device)
    assert summary["audit"]["passed"]
    assert len(summary["moe"]["gini"]) == 2 and summary["roundtrip_val_bpb"] > 0

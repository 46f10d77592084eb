"""Model: shapes, the baseline's parameter count, per-token losses and full distributions."""

import pytest
import torch
import torch.nn.functional as F

from train_gpt import GPT, Attention, apply_rotary, load_config


def tiny_model(**overrides) -> GPT:
    env = {"VOCAB_SIZE": "64", "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "TRAIN_BATCH_TOKENS": "1024", **{k.upper(): str(v) for k, v in overrides.items()}}
    cfg, _ = load_config(env)
    torch.manual_seed(0)
    return GPT(cfg.model)


def logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return model.head(model.hidden(idx)[0])


def randomize(model: GPT) -> GPT:
    """Zero-initialised projections make every block the identity; tests need them to matter."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(std=0.2)
    return model


def test_baseline_shape_has_the_challenge_parameter_count():
    cfg, _ = load_config({})
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


def test_per_token_loss_matches_mean_loss_and_logits():
    model = randomize(tiny_model())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    per_token = model(x, y, reduction="none")
    assert per_token.shape == (2, 16)
    assert torch.allclose(per_token.mean(), model(x, y), atol=1e-6)
    logp = F.log_softmax(logits(model, x), dim=-1)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 16), atol=1e-5)
    assert torch.allclose(-logp.gather(-1, y[..., None])[..., 0], per_token, atol=1e-5)


def test_logits_are_softcapped():
    model = randomize(tiny_model(logit_softcap=2.0))
    with torch.no_grad():
        model.tok_emb.weight.mul_(100)
    assert logits(model, torch.randint(0, 64, (1, 8))).abs().max() <= 2.0


def test_model_is_causal():
    model = randomize(tiny_model())
    x = torch.randint(0, 64, (1, 12))
    changed = x.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 64
    assert torch.allclose(logits(model, x)[0, :7], logits(model, changed)[0, :7], atol=1e-5)
    assert not torch.allclose(logits(model, x)[0, 7:], logits(model, changed)[0, 7:], atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, num_kv_heads=2, rope_base=10000.0, qk_gain_init=1.5)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x = torch.randn(2, 10, 32)
    b, t, _ = x.shape
    q = attn.c_q(x).view(b, t, 4, 8).transpose(1, 2)
    k = attn.c_k(x).view(b, t, 2, 8).transpose(1, 2)
    v = attn.c_v(x).view(b, t, 2, 8).transpose(1, 2)
    angles = torch.arange(t, dtype=torch.float32)[:, None] / 10000.0 ** (torch.arange(0, 8, 2) / 8)
    cos, sin = angles.cos(), angles.sin()
    norm = lambda z: F.rms_norm(z, (8,))  # noqa: E731
    q = apply_rotary(norm(q), cos, sin) * 1.5
    k = apply_rotary(norm(k), cos, sin).repeat_interleave(2, dim=1)
    v = v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, 32))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_fresh_model_predicts_uniformly_enough():
    model = tiny_model()
    loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    assert abs(loss.item() - torch.log(torch.tensor(64.0)).item()) < 0.05


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads(tie):
    model = tiny_model(tie_embeddings=int(tie))
    assert (model.lm_head is None) == tie
    names = {n for n, _ in model.named_parameters()}
    assert ("lm_head.weight" in names) != tie


def test_plan_walks_every_block_once_with_unet_skips():
    model = tiny_model(num_layers=5)
    assert model.plan == [(b, 0) for b in range(5)] and model.skip_weights.shape == (2, 32)
    assert model.loop_embeds is None and model.repeat_skips is None and model.value_embeds is None


def test_recurrence_shares_block_weights():
    flat, deep = tiny_model(num_layers=3), tiny_model(num_layers=3, num_repeats=4)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(flat.blocks) == count(deep.blocks)
    per_pass = deep.loop_embeds.numel() + deep.repeat_skips.numel()
    assert count(deep) - count(flat) == per_pass - flat.skip_weights.numel()
    assert per_pass == (12 + 3 * 3) * 32  # a vector per effective layer and per (pass > 0, block)
    assert deep.plan == [(b, p) for p in range(4) for b in range(3)]


def test_one_pass_of_a_recurrent_model_is_the_plain_block_stack():
    model = randomize(tiny_model(num_layers=3, num_repeats=3))
    with torch.no_grad():
        model.loop_embeds.zero_()  # as initialised: randomize() filled every 2-D tensor
    model.set_repeats(1)
    x = torch.randint(0, 64, (2, 12))
    h = F.rms_norm(model.tok_emb(x), (32,))
    x0 = h
    for block in model.blocks:
        h, _ = block(h, x0)
    reference = F.linear(F.rms_norm(h, (32,)), model.tok_emb.weight)
    assert torch.allclose(logits(model, x), 30 * torch.tanh(reference / 30), atol=1e-5)


def test_depth_changes_the_computation_and_is_bounded():
    model = randomize(tiny_model(num_layers=2, num_repeats=3))
    with torch.no_grad():
        model.repeat_skips.normal_(std=0.5)
    x = torch.randint(0, 64, (1, 8))
    outputs = []
    for r in (1, 2, 3):
        model.set_repeats(r)
        outputs.append(logits(model, x))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])
    with pytest.raises(ValueError):
        model.set_repeats(4)


def test_exclusive_attention_is_orthogonal_to_the_own_value():
    from train_gpt import exclude_own_value

    torch.manual_seed(0)
    y, v = torch.randn(2, 8, 10, 16), torch.randn(2, 2, 10, 16)  # 4 query heads per KV head
    out = exclude_own_value(y, v)
    own = v.repeat_interleave(4, dim=1)
    assert (out * own).sum(-1).abs().max() < 1e-5
    # the rest of the output is untouched: adding back the removed part gives y
    unit = F.normalize(own, dim=-1)
    assert torch.allclose(out + (y * unit).sum(-1, keepdim=True) * unit, y, atol=1e-5)


def test_xsa_applies_to_the_last_layers_only():
    model = randomize(tiny_model(num_layers=2, num_repeats=2, xsa_last_n=1))
    calls = []
    for block in model.blocks:
        original = block.attn.forward
        block.attn.forward = lambda x, ve=None, ex=False, f=original: calls.append(ex) or f(x, ve, ex)
    logits(model, torch.randint(0, 64, (1, 6)))
    assert calls == [False, False, False, True]


def test_leaky_relu_squared_activation():
    model = tiny_model(activation="leaky_relu2")
    x = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(model.blocks[0].ffn.activation(x), torch.tensor([1.0, 0.0, 9.0]))


def test_value_embeddings_reach_the_values_and_learn():
    model = randomize(tiny_model(num_layers=2, num_repeats=2, num_value_embeds=2))
    assert model.value_embeds.shape == (2, 64, 16) and model.value_scales.shape == (4, 2)
    x = torch.randint(0, 64, (2, 8))
    model(x, x).backward()
    assert model.value_embeds.grad.abs().sum() > 0 and model.value_scales.grad.abs().sum() > 0


@pytest.mark.parametrize("bf16_residual", [True, False])
def test_under_bf16_autocast_the_residual_stream_is_bf16_on_a_gpu_and_the_weights_stay_float32(monkeypatch,
                                                                                                bf16_residual):
    """As the challenge's bf16 model on a GPU: activations move half the bytes; the optimizers keep
    float32 weights. On a CPU (slower in bf16) the residual stays float32."""
    import train_gpt

    if bf16_residual:
        monkeypatch.setattr(train_gpt, "BF16_RESIDUAL_DEVICES", ("cpu",))  # this machine standing in for a GPU
    cfg, _ = load_config(dict(VOCAB_SIZE="64", NUM_LAYERS="2", MODEL_DIM="32", NUM_HEADS="2", NUM_KV_HEADS="1",
                              NUM_VALUE_EMBEDS="1", XSA_LAST_N="1"))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    idx = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", torch.bfloat16):
        hidden = model.hidden(idx)[0]
        loss = model(idx, idx)
    assert hidden.dtype == (torch.bfloat16 if bf16_residual else torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert abs(loss.item() - model(idx, idx).item()) < 0.02


def aten_ops(fn, *args) -> set[str]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(func.name())
            return func(*args, **(kwargs or {}))

    with Record():
        fn(*args)
    return seen


@pytest.mark.parametrize("name", ["relu2", "leaky_relu2"])
def test_the_activations_stay_bf16_under_cudas_autocast(name):
    """CUDA's autocast runs some ops in float32 (pow, softmax, rms_norm, ...) where the CPU's does not,
    so a CPU test under autocast cannot see them. An activation made of such an op (x.square() is pow)
    turns the bf16 hidden layer float32 on CUDA; the MoE's grouped matmul then refuses it."""
    from train_gpt import ACTIVATIONS

    ops = aten_ops(ACTIVATIONS[name], torch.randn(4, 8, dtype=torch.bfloat16))
    upcast = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "AutocastCUDA")]
    assert not upcast, upcast

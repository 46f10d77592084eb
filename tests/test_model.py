"""Model: shapes, the baseline's parameter count, per-token losses and full distributions."""

import pytest
import torch
import torch.nn.functional as F

from train_gpt import GPT, Attention, apply_rotary, load_config, model_kwargs


def tiny_model(**overrides) -> GPT:
    env = {"VOCAB_SIZE": "64", "NUM_LAYERS": "3", "MODEL_DIM": "32", "NUM_HEADS": "4", "NUM_KV_HEADS": "2",
           "TRAIN_BATCH_TOKENS": "1024", **{k.upper(): str(v) for k, v in overrides.items()}}
    cfg, _ = load_config(env)
    torch.manual_seed(0)
    return GPT(**model_kwargs(cfg))


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
        model = GPT(**model_kwargs(cfg))
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


def test_per_token_loss_matches_mean_loss_and_logits():
    model = randomize(tiny_model())
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    per_token = model(x, y, reduction="none")
    assert per_token.shape == (2, 16)
    assert torch.allclose(per_token.mean(), model(x, y), atol=1e-6)
    logp = F.log_softmax(model.logits(x), dim=-1)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 16), atol=1e-5)
    assert torch.allclose(-logp.gather(-1, y[..., None])[..., 0], per_token, atol=1e-5)


def test_logits_are_softcapped():
    model = randomize(tiny_model(logit_softcap=2.0))
    with torch.no_grad():
        model.tok_emb.weight.mul_(100)
    assert model.logits(torch.randint(0, 64, (1, 8))).abs().max() <= 2.0


def test_model_is_causal():
    model = randomize(tiny_model())
    x = torch.randint(0, 64, (1, 12))
    changed = x.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 64
    assert torch.allclose(model.logits(x)[0, :7], model.logits(changed)[0, :7], atol=1e-5)
    assert not torch.allclose(model.logits(x)[0, 7:], model.logits(changed)[0, 7:], atol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, num_kv_heads=2, rope_base=10000.0, qk_gain_init=1.5)
    torch.nn.init.normal_(attn.proj.weight, std=0.2)
    x = torch.randn(2, 10, 32)
    b, t, _ = x.shape
    q = attn.c_q(x).view(b, t, 4, 8).transpose(1, 2)
    k = attn.c_k(x).view(b, t, 2, 8).transpose(1, 2)
    v = attn.c_v(x).view(b, t, 2, 8).transpose(1, 2)
    cos, sin = attn.rotary(t, x.device)
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
    assert model.plan == [0, 1, 2, 3, 4] and model.skip_weights.shape == (2, 32)

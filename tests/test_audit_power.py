"""The audit's power: each planted leak, audited under 20 audit seeds, and how often it is caught.
docs/evaluation.md's mutation table quotes these fractions; each test asserts its fraction, so a weaker audit
fails here. Honest methods pass under the same seeds."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import encode_docs, make_docs
from test_eval import V, config, evaluator
from test_model import randomize, tiny_model
from train_gpt import (EVAL_METHODS, ByteTables, Evaluator, Logger, NgramExpert, Runtime, audit_method,
                       build_byte_tables, decoded_bytes, hedge_experts, hedge_method, method_windows,
                       ttt_adapt)

SEEDS = range(1, 21)
SETTINGS = dict(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_CHUNK_TOKENS=8, TTT_STEPS=1, TTT_CHUNK_TOKENS=48, TTT_LR=0.05,
                EVAL_AUDIT=1, EVAL_AUDIT_TOKENS=150)


def caught(method, model=None, name="m", rt=None, ev=None, **env) -> float:
    """The fraction of audit seeds under which the audit fails `method`."""
    model = model or randomize(tiny_model())
    failed = 0
    for seed in SEEDS:
        cfg = config(**{**SETTINGS, **env, "EVAL_AUDIT_SEED": seed})
        run_ev = ev or evaluator(cfg, rt=rt) if rt else ev or evaluator(cfg)
        run_ev = Evaluator(cfg, run_ev.rt, run_ev.tokens, run_ev.tables, run_ev.bos_id, run_ev.text_bytes)
        failed += not audit_method(cfg, run_ev, model, method, Logger(None), name)["passed"]
    return failed / len(SEEDS)


@pytest.mark.parametrize("name", ["standard", "sliding", "hedge", "ttt"])
def test_honest_methods_pass_under_every_seed(name):
    assert caught(EVAL_METHODS[name], name=name) == 0


class Peeking(torch.nn.Module):
    """A causal mask with one hole: the position at offset 11 of every window also sees the token
    after it, its own target (one position in 16 here, as one in 64 was in the review)."""

    def __init__(self, inner, offset=11, strength=1.0):
        super().__init__()
        self.inner, self.head, self.offset, self.strength = inner, inner.head, offset, strength

    def leaked(self, idx):
        hidden = self.inner.hidden(idx)[0]
        ahead = self.inner.tok_emb(idx[:, self.offset + 1])
        return torch.cat([hidden[:, :self.offset], hidden[:, self.offset:self.offset + 1] + self.strength * ahead[:, None],
                          hidden[:, self.offset + 1:]], 1)

    def forward(self, idx, targets=None, reduction="mean", last=0):
        hidden = self.leaked(idx)
        return torch.log_softmax(self.inner.head(hidden[:, -last:] if last else hidden), -1)


class LookingAhead(Peeking):
    """Every position sees its own target: a causal mask left out."""

    def leaked(self, idx):
        return self.inner.hidden(idx)[0] + self.inner.tok_emb(F.pad(idx[:, 1:], (0, 1)))


@pytest.mark.parametrize("name", ["standard", "sliding", "hedge", "ttt"])
def test_one_position_in_a_window_that_sees_its_target_is_caught_under_every_seed(name):
    assert caught(EVAL_METHODS[name], Peeking(randomize(tiny_model())), name) == 1


@pytest.mark.parametrize("strength", [1.0, 1e-3])
def test_a_faint_peek_is_caught_too(strength):
    assert caught(EVAL_METHODS["standard"], Peeking(randomize(tiny_model()), strength=strength), "standard") == 1


def test_a_model_without_its_causal_mask_is_caught_under_every_seed():
    assert caught(EVAL_METHODS["sliding"], LookingAhead(randomize(tiny_model())), "sliding") == 1


class SparseLeak:
    """A Hedge expert that, at one position in 64, puts its mass on the token being scored."""

    name = "sparse_leak"

    def __init__(self, tokens):
        self.tokens = tokens

    def probs(self, pos, logp):
        leak = F.one_hot(self.tokens[pos + 1], V).float()
        return torch.where((pos % 64 == 63)[:, None], 0.5 * leak + 0.5 / V, torch.full_like(leak, 1 / V))

    def observe(self, pos):
        pass


def test_a_hedge_expert_that_leaks_at_one_position_in_64_is_caught_under_every_seed():
    def leaky(cfg, ev, model):
        return hedge_method(cfg, ev, model, experts=hedge_experts(cfg, ev.device_tokens) + [SparseLeak(ev.device_tokens)])
    assert caught(leaky) == 1


class EagerCounts(NgramExpert):
    """Tables that take in the first 64 targets of their rank's stretch before scoring them."""

    def probs(self, pos, logp):
        if not getattr(self, "primed", False):
            self.primed = True
            self.observe(torch.arange(int(pos[0]), min(int(pos[0]) + 64, len(self.tokens) - 1)))
        return super().probs(pos, logp)


class LoneRank(Runtime):
    """Rank 1 of 2 audited on its own: its share of the stream, no process group."""

    def all_reduce(self, tensor, op=None):
        return tensor


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_tables_take_in_its_first_targets_early_is_caught_under_every_seed(rank):
    def eager(cfg, ev, model):
        experts = hedge_experts(cfg, ev.device_tokens)
        return hedge_method(cfg, ev, model, experts=experts[:1] + [EagerCounts(
            ev.device_tokens, 2, V, cfg.hedge_prior, cfg.hedge_table_entries)] + experts[1:])
    assert caught(eager, rt=LoneRank(rank, 2, 0, torch.device("cpu"), False)) == 1


def test_tables_that_take_in_each_block_before_scoring_it_are_caught_under_every_seed():
    class BlockAhead(NgramExpert):
        def probs(self, pos, logp):
            self.observe(pos)
            return super().probs(pos, logp)

    def ahead(cfg, ev, model):
        return hedge_method(cfg, ev, model, experts=hedge_experts(cfg, ev.device_tokens)[:1] + [BlockAhead(
            ev.device_tokens, 2, V, cfg.hedge_prior, cfg.hedge_table_entries)])
    assert caught(ahead) == 1


def test_ttt_that_trains_on_a_chunk_before_scoring_it_is_caught_under_every_seed():
    def train_first(cfg, ev, model):
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        params = list(model.parameters())
        optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr)
        try:
            for lo in range(0, ev.n_targets, cfg.ttt_chunk_tokens):
                hi = min(ev.n_targets, lo + cfg.ttt_chunk_tokens)
                ttt_adapt(cfg, ev, model, params, optimizer, lo, hi, cfg.ttt_lr)
                yield from ev.distributions(model, ev.rank_share(method_windows(cfg, ev, lo, hi)), cfg.eval_window)
        finally:
            model.load_state_dict(saved)
    assert caught(train_first) == 1


def test_a_mixture_that_sums_to_more_than_one_is_caught_under_every_seed():
    class Inflated:
        name = "inflated"

        def probs(self, pos, logp):
            return torch.full((len(pos), V), 2.0 / V)

        def observe(self, pos):
            pass

    def inflated(cfg, ev, model):
        return hedge_method(cfg, ev, model, experts=hedge_experts(cfg, ev.device_tokens) + [Inflated()])
    assert caught(inflated) == 1


def text_evaluator(tokenizer, table_edit=None) -> Evaluator:
    """The tiny tokenizer's own text and byte tables, optionally miscounted."""
    cfg = config(**SETTINGS, VOCAB_SIZE=320)
    byte_tables = build_byte_tables(tokenizer, 320)
    if table_edit:
        byte_tables = table_edit(byte_tables)
    tokens = torch.from_numpy(encode_docs(tokenizer, make_docs(12, seed=5)).astype(np.int64))
    return Evaluator(cfg, Runtime(0, 1, 0, torch.device("cpu"), False), tokens, byte_tables, 1, decoded_bytes(tokenizer))


def test_the_byte_tables_match_the_decoded_text(tokenizer):
    ev = text_evaluator(tokenizer)
    result = audit_method(ev.cfg, ev, randomize(tiny_model(vocab_size=320)), EVAL_METHODS["standard"], Logger(None),
                          "standard", seed=1)
    assert result["passed"] and result["bytes_gap"] == 0 and result["bytes"]["counted"] > 100


@pytest.mark.parametrize("edit", ["space_twice", "bos_counted"])
def test_miscounted_bytes_are_caught_under_every_seed(tokenizer, edit):
    def miscount(t: ByteTables) -> ByteTables:
        if edit == "space_twice":
            return dataclasses.replace(t, base_bytes=t.base_bytes + t.has_leading_space.int())
        return dataclasses.replace(t, base_bytes=torch.where(t.is_boundary, 1, t.base_bytes).int())
    ev = text_evaluator(tokenizer, miscount)
    assert (ev.tokens[1:601] == 1).sum() >= 3  # documents start inside the audited prefix
    assert caught(EVAL_METHODS["standard"], randomize(tiny_model(vocab_size=320)), "standard", ev=ev,
                  VOCAB_SIZE=320, EVAL_AUDIT_TOKENS=600) == 1

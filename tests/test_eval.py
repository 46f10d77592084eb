"""Evaluation: the window core, sliding windows, the Hedge mixer and its experts, score-first TTT,
the audit (normalisation and causality) and per-token losses."""

import math

import pytest
import torch
import torch.nn.functional as F

from test_model import randomize, tiny_model
from train_gpt import (EVAL_METHODS, ByteTables, Evaluator, Logger, NeuralExpert, NgramExpert, Runtime,
                       audit_method, final_evaluations, hedge_experts, hedge_method, load_config, run_audits, score_first,
                       sliding_method, sliding_windows, standard_method, ttt_method)

CPU = Runtime(0, 1, 0, torch.device("cpu"), False)
V = 64


def config(**env):
    base = {"VOCAB_SIZE": str(V), "TRAIN_SEQ_LEN": "16", "TRAIN_BATCH_TOKENS": "1024", "VAL_BATCH_SIZE": "48"}
    return load_config({**base, **{k: str(v) for k, v in env.items()}})[0]


def tables() -> ByteTables:
    gen = torch.Generator().manual_seed(3)
    return ByteTables(torch.randint(1, 4, (V,), dtype=torch.int32, generator=gen),
                      torch.rand(V, generator=gen) < 0.5, torch.rand(V, generator=gen) < 0.1)


def stream(n: int, seed: int = 1) -> torch.Tensor:
    """Tokens with structure an n-gram can learn: a repeating phrase with noise."""
    gen = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, V, (23,), generator=gen)
    tokens = phrase.repeat(n // 23 + 2)[:n]
    noise = torch.rand(n, generator=gen) < 0.2
    return torch.where(noise, torch.randint(0, V, (n,), generator=gen), tokens)


def evaluator(cfg, n: int = 16 * 12 + 1, rt=CPU) -> Evaluator:
    return Evaluator(cfg, rt, stream(n), tables())


def test_standard_eval_matches_a_direct_computation():
    cfg = config()  # 3 windows a forward: batches end mid-way
    model = randomize(tiny_model())
    ev = evaluator(cfg, 16 * 7 + 1)
    val_loss, val_bpb = ev.standard(model)

    x, y = ev.tokens[:-1].view(7, 16), ev.tokens[1:].view(7, 16)
    nll = model(x, y, reduction="none").double()
    nbytes = ev.tables.count(x, y).double().sum()
    assert math.isclose(val_loss, nll.mean().item(), rel_tol=1e-6)
    assert math.isclose(val_bpb, nll.sum().item() / math.log(2) / nbytes.item(), rel_tol=1e-6)
    assert ev.val_bytes() == int(nbytes)


def test_rank_shares_partition_the_windows():
    cfg = config()
    windows = [(i, 0, 1) for i in range(10)]
    shares = [Evaluator(cfg, Runtime(r, 3, 0, torch.device("cpu"), False), torch.zeros(2, dtype=torch.long), tables()
                        ).rank_share(windows) for r in range(3)]
    assert sum(shares, []) == windows


@pytest.mark.parametrize("n,seq,stride,lo,hi", [(100, 16, 4, 0, 100), (100, 16, 16, 0, 100), (100, 16, 5, 37, 81),
                                                (10, 16, 4, 0, 10), (64, 16, 16, 0, 64), (64, 16, 1, 0, 64)])
def test_sliding_windows_score_every_target_once(n, seq, stride, lo, hi):
    windows = sliding_windows(lo, hi, n, seq, stride)
    scored = [s + j for s, first, stop in windows for j in range(first, stop)]
    assert scored == list(range(lo, hi))
    length = min(seq, n)
    for start, first, stop in windows:
        assert 0 <= start and start + length <= n and 0 <= first < stop <= length
        if start + first > 0:
            assert stop - first <= stride  # only the stream's first window scores more than a stride
    if n >= seq:
        assert all(first >= min(seq - stride, start + first) for start, first, _ in windows)  # full context


def test_sliding_windows_with_stride_equal_to_seq_len_are_the_disjoint_windows():
    assert sliding_windows(0, 64, 64, 16, 16) == [(0, 0, 16), (16, 0, 16), (32, 0, 16), (48, 0, 16)]


def test_sliding_eval_at_stride_seq_len_equals_standard_eval():
    cfg = config(EVAL_STRIDE=16)
    model = randomize(tiny_model())
    ev = evaluator(cfg)
    assert ev.reduce(score_first(ev, sliding_method(cfg, ev, model))) == ev.standard(model)


def test_sliding_eval_scores_each_target_with_more_context():
    cfg = config(EVAL_STRIDE=4)
    model = randomize(tiny_model())
    ev = evaluator(cfg)
    run = score_first(ev, sliding_method(cfg, ev, model))
    assert run.pos.tolist() == list(range(ev.n_targets))
    # Target 20 (token 21) is scored by the window reading tokens 8..23: 13 tokens of context, not 5.
    window = ev.tokens[8:25]
    direct = model(window[None, :-1], window[None, 1:], reduction="none")[0, 12]
    assert torch.isclose(run.nll[20], direct, atol=1e-6)


@pytest.mark.parametrize("order,entries", [(1, 1 << 20), (2, 1 << 20), (3, 1 << 20), (3, 8 * V)])
def test_ngram_experts_are_distributions_for_every_context(order, entries):
    tokens = stream(500)
    expert = NgramExpert(tokens, order, V, prior=8.0, max_entries=entries)
    assert expert.hashed == (order == 3 and entries == 8 * V)
    neural = torch.log_softmax(torch.randn(499, V, generator=torch.Generator().manual_seed(2)), -1)
    expert.observe(torch.arange(250))
    probs = expert.probs(torch.arange(499), neural)
    assert probs.min() > 0
    assert (probs.double().sum(-1) - 1).abs().max() < 1e-6
    # Counted contexts move toward what followed them; the repeated phrase makes that the truth.
    seen = torch.arange(260, 499)
    truth = probs[seen].gather(-1, tokens[seen + 1, None]).mean()
    prior = neural.exp()[seen].gather(-1, tokens[seen + 1, None]).mean()
    if order > 1:  # 8 hashed rows for 3-gram contexts collide heavily: about 5x (4.6-5.4 over 20 draws), not more
        assert truth > (3 if expert.hashed else 5) * prior


def test_ngram_contexts_at_the_stream_start_are_their_own():
    expert = NgramExpert(stream(50), 3, V, prior=1.0, max_entries=1 << 20)
    assert len(set(expert.row(torch.tensor([0, 1, 2])).tolist())) == 3


class FixedExpert:
    """A distribution that ignores the context."""

    def __init__(self, name: str, probs: torch.Tensor):
        self.name, self.p = name, probs

    def probs(self, pos, logp):
        return self.p.expand(len(pos), -1)

    def observe(self, pos):
        pass


class LeakyExpert(FixedExpert):
    """Puts most of its mass on the token being scored: what a broken cache does."""

    def __init__(self, tokens):
        super().__init__("leaky", None)
        self.tokens = tokens

    def probs(self, pos, logp):
        return 0.5 * torch.nn.functional.one_hot(self.tokens[pos + 1], V).float() + 0.5 / V


class UnnormalisedExpert(FixedExpert):
    def probs(self, pos, logp):
        return torch.full((len(pos), V), 2.0 / V)


def test_hedge_weights_move_toward_the_expert_with_lower_loss():
    cfg = config(EVAL_STRIDE=16, HEDGE_CHUNK_TOKENS=8)
    ev = evaluator(cfg)
    counts = torch.bincount(ev.tokens, minlength=V).float() + 0.5
    good, bad = FixedExpert("good", counts / counts.sum()), FixedExpert("bad", counts ** -2 / (counts ** -2).sum())
    run = score_first(ev, hedge_method(cfg, ev, randomize(tiny_model()), experts=[NeuralExpert(), good, bad]))
    weights = run.info["weights"]
    prior = torch.softmax(torch.tensor([2.0, 0.0, 0.0]), 0).tolist()  # the neural expert starts ahead
    assert weights["good"] > 0.5 > prior[1] and weights["bad"] < prior[2] and weights["neural"] < prior[0]
    assert weights["good"] > weights["bad"]


def test_hedge_mixture_is_normalised_and_scores_only_after_its_counts_are_causal():
    cfg = config(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_CHUNK_TOKENS=8)
    ev = evaluator(cfg)
    model = randomize(tiny_model())
    run = score_first(ev, hedge_method(cfg, ev, model), set(range(ev.n_targets)))
    assert run.max_sum_error < 1e-5
    assert run.pos.tolist() == list(range(ev.n_targets))
    nll = -torch.stack([run.captured[p][ev.tokens[p + 1]] for p in range(ev.n_targets)]).log()
    assert torch.allclose(nll, run.nll, atol=1e-5)
    # The repeated phrase is learnt by the counts: Hedge beats the model alone on this stream.
    assert ev.reduce(run)[0] < ev.reduce(score_first(ev, sliding_method(cfg, ev, model)))[0]


def test_hedge_scores_each_block_with_counts_of_the_earlier_blocks_only():
    """Each target's Hedge loss equals a direct computation with fixed weights (HEDGE_ETA=0): experts
    whose counts took in every target before the target's block, and none of its block or after."""
    cfg = config(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_ETA=0, HEDGE_CHUNK_TOKENS=8)
    ev = evaluator(cfg)
    model = randomize(tiny_model())
    run = score_first(ev, hedge_method(cfg, ev, model))
    windows = sliding_windows(0, ev.n_targets, ev.n_targets, 16, 4)
    logp = torch.cat([lp for _, lp in ev.distributions(model, windows, 16)])
    prior = torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0, 0.0]), 0)
    expected = []
    for start in range(0, ev.n_targets, 8):
        experts = hedge_experts(cfg, ev.tokens)
        for expert in experts:
            expert.observe(torch.arange(start))
        pos = torch.arange(start, min(start + 8, ev.n_targets))
        mixture = torch.einsum("e,etv->tv", prior, torch.stack([e.probs(pos, logp[pos]) for e in experts]))
        expected.append(-mixture.gather(-1, ev.tokens[pos + 1].unsqueeze(-1)).squeeze(-1).log())
    torch.testing.assert_close(run.nll, torch.cat(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [7, 40])
def test_hedge_scores_do_not_move_with_the_batch_size_or_the_world_size(chunk):
    """With the weights fixed (HEDGE_ETA=0) a target's Hedge loss depends only on the stream: its
    blocks are the stream's, so 1 or 3 ranks and 2 or 5 windows a forward give the same losses."""
    model = randomize(tiny_model())
    runs = {}
    for world in (1, 3):
        for rows in (2, 5):
            cfg = config(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_ETA=0, HEDGE_CHUNK_TOKENS=chunk,
                         VAL_BATCH_SIZE=rows * 16 * world)
            ranks = [score_first(ev, hedge_method(cfg, ev, model)) for ev in (
                evaluator(cfg, 16 * 20 + 1, Runtime(r, world, 0, torch.device("cpu"), False)) for r in range(world))]
            runs[world, rows] = torch.cat([r.pos for r in ranks]), torch.cat([r.nll for r in ranks])
    one_pos, one_nll = runs[1, 5]
    assert one_pos.tolist() == list(range(16 * 20))
    for pos, nll in runs.values():
        assert torch.equal(pos, one_pos)
        torch.testing.assert_close(nll, one_nll, atol=1e-5, rtol=0)


def audit(cfg, ev, model, method, name="m"):
    return audit_method(cfg, ev, model, method, Logger(None), name)


@pytest.mark.parametrize("name", ["standard", "sliding", "hedge", "ttt"])
def test_the_real_methods_pass_the_audit(name):
    cfg = config(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_CHUNK_TOKENS=8, TTT_STEPS=2, TTT_CHUNK_TOKENS=48,
                 TTT_LR=0.05, EVAL_AUDIT=1, EVAL_AUDIT_TOKENS=150)
    ev = evaluator(cfg)
    result = audit(cfg, ev, randomize(tiny_model()), EVAL_METHODS[name])
    assert result["causal"] and result["passed"]
    assert result["max_prob_sum_error"] < 1e-5


def test_the_audit_catches_a_leaky_expert():
    cfg = config(EVAL_STRIDE=4, HEDGE_CHUNK_TOKENS=8, EVAL_AUDIT_TOKENS=150)
    ev = evaluator(cfg)

    def leaky_hedge(cfg, ev, model):
        return hedge_method(cfg, ev, model, experts=hedge_experts(cfg, ev.tokens) + [LeakyExpert(ev.tokens)])

    result = audit(cfg, ev, randomize(tiny_model()), leaky_hedge)
    assert result["max_prob_sum_error"] < 1e-5  # it is a distribution: only the look-ahead is wrong
    assert not result["causal"] and not result["passed"]


def jittery(method, size: float, leak: bool = False):
    """`method` whose distributions differ from run to run by up to `size` (in log-probability), as
    TTT's do on a GPU (atomic additions in any order); with `leak`, every distribution also reads the
    token after its target."""
    def run(cfg, ev, model):
        inner = method(cfg, ev, model)
        try:
            pos, logp = next(inner)
            while True:
                logp = logp + size * torch.rand(logp.shape)
                if leak:
                    ahead = ev.tokens[(pos + 2).clamp(max=len(ev.tokens) - 1)]  # the target after this one
                    logp = torch.log_softmax(logp + 0.1 * F.one_hot(ahead % 7, logp.size(-1)), -1)
                pos, logp = inner.send((yield pos, logp))
        except StopIteration as finished:
            return finished.value
    return run


def test_the_audit_tolerates_a_methods_own_run_to_run_noise_but_still_catches_a_leak():
    cfg = config(EVAL_STRIDE=4, EVAL_AUDIT_TOKENS=150)
    ev, model = evaluator(cfg), randomize(tiny_model())
    honest = audit(cfg, ev, model, jittery(sliding_method, 1e-4))
    assert honest["passed"] and 1e-6 < honest["repeat_noise"] <= 1e-4 and honest["tolerance"] == pytest.approx(
        10 * honest["repeat_noise"])
    assert audit(cfg, ev, model, sliding_method)["repeat_noise"] == 0.0  # deterministic: the 1e-5 tolerance stays
    assert not audit(cfg, ev, model, jittery(sliding_method, 1e-4, leak=True))["causal"]


class TargetBiased(torch.nn.Module):
    """A model whose loss with targets adds 5 to the target's logit; its hidden states and head, which
    the distributions come from, are honest."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.head = inner, inner.head

    def forward(self, idx, targets=None, reduction="mean", last=0):
        if targets is None:
            return self.inner(idx, last=last)
        logits = self.inner.head(self.inner.hidden(idx)[0]) + 5 * F.one_hot(targets, V)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction).view_as(targets)


def test_no_evaluation_gives_the_model_a_target_so_a_loss_that_reads_it_changes_no_score():
    """Item 1 of issue 16: a loss with targets that adds 5 to the target's logit took the headline
    from 3.18 to 0.48 bpb while the audit passed. Every method now scores the distribution the model
    gives from its input alone: that loss is never called, and no score moves."""
    cfg = config(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_CHUNK_TOKENS=8, TTT_STEPS=1, TTT_CHUNK_TOKENS=48)
    ev, model = evaluator(cfg), randomize(tiny_model())
    biased = TargetBiased(model)
    x, y = ev.tokens[None, :16], ev.tokens[None, 1:17]
    assert biased(x, y, "none").mean() < model(x, y, "none").mean() - 1  # the bias would be a false gain
    for name in ("standard", "sliding", "hedge"):
        honest = score_first(ev, EVAL_METHODS[name](cfg, ev, model)).nll
        assert torch.equal(score_first(ev, EVAL_METHODS[name](cfg, ev, biased)).nll, honest)


def test_the_audit_catches_a_mixture_that_does_not_sum_to_one():
    cfg = config(EVAL_STRIDE=4, HEDGE_CHUNK_TOKENS=8, EVAL_AUDIT_TOKENS=150)

    def inflated_hedge(cfg, ev, model):
        return hedge_method(cfg, ev, model, experts=[NeuralExpert(), UnnormalisedExpert("x", None)])

    result = audit(cfg, evaluator(cfg), randomize(tiny_model()), inflated_hedge)
    assert result["causal"] and result["max_prob_sum_error"] > 0.1 and not result["passed"]


def test_a_method_that_fails_its_audit_is_not_scored(monkeypatch):
    cfg = config(EVAL_STRIDE=4, HEDGE_ENABLED=1, HEDGE_CHUNK_TOKENS=8, EVAL_AUDIT=1, EVAL_AUDIT_TOKENS=150)

    def leaky_hedge(cfg, ev, model):
        return hedge_method(cfg, ev, model, experts=[NeuralExpert(), LeakyExpert(ev.tokens)])

    monkeypatch.setitem(EVAL_METHODS, "hedge", leaky_hedge)
    ev, model = evaluator(cfg), randomize(tiny_model())
    out = final_evaluations(cfg, ev, model, Logger(None), 1.0, run_audits(cfg, ev, model, Logger(None)))
    assert out["hedge_val_bpb"] is None and "hedge_val_loss" not in out
    assert out["sliding_val_bpb"] > 0
    assert out["audit"]["passed"] is False and out["audit"]["causal"] is False
    assert out["audit"]["methods"]["sliding"]["passed"]


def test_ttt_scores_each_chunk_before_training_on_it_and_restores_the_model():
    cfg = config(TTT_STEPS=3, TTT_CHUNK_TOKENS=64, TTT_LR=0.1)
    ev = evaluator(cfg)
    model = randomize(tiny_model())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = score_first(ev, standard_method(cfg, ev, model))
    adapted = score_first(ev, ttt_method(cfg, ev, model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert adapted.pos.tolist() == plain.pos.tolist()
    first = adapted.pos < 64
    assert torch.equal(adapted.nll[first], plain.nll[first])  # nothing learnt before the first chunk is scored
    assert not torch.allclose(adapted.nll[~first], plain.nll[~first])
    # Training on the repeated phrase helps on the chunks after it.
    assert adapted.nll[~first].mean() < plain.nll[~first].mean()


def test_per_token_losses_are_the_standard_losses_in_stream_order():
    cfg = config()
    ev = evaluator(cfg)
    model = randomize(tiny_model())
    losses = ev.per_token(model)
    assert losses.dtype.name == "float16" and len(losses) == ev.n_targets
    chunks = ev.tokens[:-1].view(-1, 16), ev.tokens[1:].view(-1, 16)
    direct = model(*chunks, reduction="none").flatten()
    assert torch.allclose(torch.from_numpy(losses).float(), direct, atol=5e-3)

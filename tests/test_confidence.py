"""Weights from the policy itself (pf_engine.confidence): the per-token values against their
definitions, the step log-odds, the config's checks, and every scoring search without a PRM.
(tests/test_pf_reference.py holds particle filtering with them to a from-scratch reference
over transformers' logits.)"""

import math

import numpy as np
import pytest
import torch
from conftest import varying_reward

from pf_engine import Engine, SearchConfig
from pf_engine.confidence import SIGNALS, step_log_odds, token_values
from pf_engine.state import path_texts, path_to

ROWS, VOCABS = [1, 7], [5, 1023]
SMALL = dict(num_particles=4, beam_width=2, max_steps=3, max_step_tokens=6, max_new_tokens=16, stop_at_boxed=False)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_values_are_their_definitions(rows, vocab, dtype):
    torch.manual_seed(rows * vocab)
    logits = (3 * torch.randn(rows, vocab)).to(dtype)
    tokens = torch.randint(vocab, (rows,))
    p = torch.softmax(logits.double(), dim=-1)
    expected = {
        "mean_logprob": p[torch.arange(rows), tokens].log(),
        "self_certainty": (-(torch.log(vocab * p)).mean(dim=-1)),  # KL(uniform || p)
        "tail_entropy": -(p * p.log()).sum(dim=-1),
    }
    for signal in SIGNALS:
        got = token_values(logits, tokens, signal)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected[signal], rtol=1e-5, atol=1e-5)


def test_step_log_odds_take_the_steps_tokens_and_the_tail():
    values = np.array([[-0.5, -1.5, -4.0, 9.0], [-2.0, 7.0, 7.0, 7.0], [3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    lengths = np.array([3, 1, 0])

    def log_odds(c):
        return c - math.log(-math.expm1(c))

    got = step_log_odds(values, lengths, "mean_logprob", 2, 100)
    np.testing.assert_allclose(got, [log_odds(-2.0), log_odds(-2.0), 0.0])  # the tokens past each step are not read
    got = step_log_odds(np.abs(values), lengths, "tail_entropy", 2, 100)
    np.testing.assert_allclose(got, [log_odds(-2.75), log_odds(-2.0), 0.0])  # the last 2 tokens of the step
    got = step_log_odds(np.abs(values), lengths, "self_certainty", 2, 100)
    np.testing.assert_allclose(got, [2.0 - math.log(100), 2.0 - math.log(100), 0.0])
    sure = step_log_odds(np.zeros((1, 2), dtype=np.float32), np.array([2]), "mean_logprob", 2, 100)
    assert sure.tolist() == [30.0]  # certain of every token: held at the bound, not infinite


@pytest.mark.parametrize("fields,message", [
    ({"weights": "confidence"}, "unknown weights 'confidence'; choose one of prm, self_certainty"),
    ({"weights": "mean_logprob", "signal_exponent": 0.0}, "signal_exponent must be a positive finite number"),
    ({"weights": "tail_entropy", "tail_tokens": 0}, "tail_tokens must be an int >= 1"),
    ({"weights": "mean_logprob", "algorithm": "self_consistency"}, "self_consistency weighs no particle"),
    ({"weights": "prm*mean_logprob", "algorithm": "particle_gibbs", "ancestor_sampling": True},
     "ancestor_sampling weighs spliced steps by the PRM alone"),
])
def test_bad_weights_are_named(fields, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        SearchConfig(**fields)


@pytest.mark.parametrize("algorithm", ["particle_filter", "best_of_n", "beam_search", "dvts", "particle_gibbs"])
@pytest.mark.parametrize("weights", SIGNALS)
def test_searches_weigh_by_the_policy_without_a_prm(policy, algorithm, weights):
    engine = Engine(policy=policy, kv_cache_memory=8 << 20)
    config = SearchConfig(algorithm=algorithm, weights=weights, signal_exponent=3.0, iterations=2, **SMALL)
    results = engine.solve(["What is 2+2?", "Name a color."], config)
    for r in results:
        scored = [n for n in r.tree if n.reward is not None]
        assert scored and all(0 < n.confidence < 1 for n in scored)
        for n in scored:  # the step reward is the confidence's, its log-odds times the exponent
            lam = math.log(n.confidence) - math.log1p(-n.confidence)
            assert n.reward == pytest.approx(1 / (1 + math.exp(-3.0 * lam)), rel=1e-5)
        assert len(set(r.weights)) > 1, "the confidences weighed every particle the same"
        if algorithm == "best_of_n":  # ranked by the newest step's reward, the answer is the likeliest
            assert r.chosen == int(np.argmax(r.weights))
    with pytest.raises(ValueError, match=f"{algorithm} needs a PRM"):
        engine.solve(["x"], SearchConfig(algorithm=algorithm, weights="prm*" + weights, **SMALL))


def test_a_prm_times_the_confidence(policy):
    """prm*NAME: with aggregation "last", each particle's weight is its PRM weight times its confidence's."""
    engine = Engine(policy=policy, prm=varying_reward, kv_cache_memory=8 << 20)
    config = SearchConfig(weights="prm*mean_logprob", signal_exponent=0.5, **SMALL)
    for r in engine.solve(["What is 2+2?", "Name a color."], config):
        for n in (n for n in r.tree if n.reward is not None):
            prm = varying_reward(r.question, path_texts(r.tree, path_to(r.tree, n.node)))
            lam = math.log(n.confidence) - math.log1p(-n.confidence)
            expected = 1 / (1 + math.exp(-(math.log(prm) - math.log1p(-prm) + 0.5 * lam)))
            assert n.reward == pytest.approx(expected, rel=1e-5)

"""On a toy whose answer distribution is known exactly, particle filtering converges to it.

The policy is a tiny random LM over 7 tokens; a step is one token, a run has 3
steps, and a rule PRM scores each step by its character. Resampling by
weights w = odds(reward)^(1/T) after every step makes the final weighted
particles target pi(x) ~ p_LM(x) * prod_rounds w(x at that round) (a finished
particle keeps its last reward). pi is computed by enumerating every path.
"""

import functools
import math
from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pf_engine import Engine, SearchConfig
from tiny import save_tiny_policy

CHARS = ["a", "b", "c", "?", "\n"]
REWARD = {"a": 0.9, "b": 0.5, "c": 0.15, "?": 0.3, "\n": 0.6, "": 0.4}
ROUNDS = 3
WEIGHT_TEMPERATURE = 1.5
QUESTION = "?"
# 3 / sqrt(N * RUNS) must stay below the posterior's gap from the LM's own first step (about 0.185), or a
# filter that ignores the PRM would pass: N = 16 (0.375) cannot tell, and more runs of 16 do not help,
# since a filter of 16 particles is itself about 0.14 off (its bias shrinks with N, not with runs)
PARTICLES = [128, 1024]
RUNS = 4
CHAIN_LENGTH = 400  # particle Gibbs sweeps per chain
CHAIN_TOLERANCE = 0.06  # 32 chains of 399 correlated states; 16-chain runs were 0.078, 0.002, 0.003 off


def reward(question, steps):
    return REWARD.get(steps[-1], 0.4)


def log_odds(r):
    return (math.log(r) - math.log1p(-r)) / WEIGHT_TEMPERATURE


def exact_first_step(folder):
    """pi's marginal of the first step, by enumerating every path of ROUNDS steps."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.encode(QUESTION + "\n", add_special_tokens=True)

    @functools.cache
    def next_probs(prefix):
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([prompt + list(prefix)])).logits[0, -1], dim=0).tolist()

    marginal = defaultdict(float)
    prior = defaultdict(float)
    for token, p in enumerate(next_probs(())):
        prior[tokenizer.decode([token], skip_special_tokens=True)] += p

    def walk(prefix, first, prob, log_w, round_, finished, last_reward):
        if round_ == ROUNDS:
            marginal[first] += prob * math.exp(log_w)
            return
        if finished:  # not extended; its last reward weighs in again
            walk(prefix, first, prob, log_w + log_odds(last_reward), round_ + 1, True, last_reward)
            return
        for token, p in enumerate(next_probs(prefix)):
            text = tokenizer.decode([token], skip_special_tokens=True)
            r = reward(None, [text])
            eos = token == tokenizer.eos_token_id
            walk(prefix if eos else prefix + (token,), text if round_ == 0 else first, prob * p,
                 log_w + log_odds(r), round_ + 1, eos or round_ + 1 == ROUNDS, r)

    walk((), None, 1.0, 0.0, 0, False, None)
    total = sum(marginal.values())
    return {k: v / total for k, v in marginal.items()}, dict(prior)


def save_toy(folder, eos=True):
    save_tiny_policy(folder, seed=7, chars=CHARS, eos=eos, hidden_size=16, intermediate_size=16,
                     num_attention_heads=2, num_key_value_heads=1, initializer_range=0.6)
    return folder, exact_first_step(folder)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return save_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def endless_toy(tmp_path_factory):
    """The toy without EOS: every path has ROUNDS steps, so a sweep never ends early and
    pi is exactly the target particle Gibbs leaves invariant."""
    return save_toy(tmp_path_factory.mktemp("endless"), eos=False)


@pytest.mark.parametrize("num_particles", PARTICLES)
def test_weighted_particles_converge_to_the_exact_posterior(toy, num_particles):
    """RUNS independent filters (the question asked RUNS times: each problem draws its own stream)
    estimate the first step's marginal within 3 / sqrt(particles of all runs) of pi's."""
    folder, (exact, prior) = toy
    bound = 3 / math.sqrt(num_particles * RUNS)
    # the check has teeth: the posterior is far from a point mass, and a filter that ignored the
    # PRM (its particles would follow the LM's own first step) would miss by more than the bound
    gap = max(abs(exact.get(k, 0.0) - prior.get(k, 0.0)) for k in set(exact) | set(prior))
    assert max(exact.values()) < 0.9
    assert bound < gap, (bound, gap)
    engine = Engine(policy=folder, prm=reward, kv_cache_memory=64 << 20)
    config = SearchConfig(num_particles=num_particles, max_steps=ROUNDS, max_step_tokens=1, max_new_tokens=ROUNDS,
                          temperature=1.0, weight_temperature=WEIGHT_TEMPERATURE, stop_at_boxed=False)
    estimate = defaultdict(float)
    for result in engine.solve([QUESTION] * RUNS, config):
        nodes = {node.node: node for node in result.tree}
        for leaf, weight in zip(result.leaves, result.weights, strict=True):
            while nodes[leaf].parent >= 0:
                leaf = nodes[leaf].parent
            estimate[nodes[leaf].text] += weight / RUNS
    error = max(abs(estimate[k] - exact.get(k, 0.0)) for k in set(exact) | set(estimate))
    assert error <= bound, (error, bound, dict(estimate), exact)


def first_steps_of_references(result):
    """The first step of the reference replayed in each sweep after the first: the Markov chain's states."""
    return [n.text for n in result.tree if n.reference and n.depth == 0]


def test_particle_gibbs_with_ancestor_sampling_targets_the_exact_posterior(endless_toy):
    """Two particles: one particle filter of 2 is far off (checked below); the chain of references
    of particle Gibbs is not. (Without ancestor sampling the chain is valid too, see
    test_pf_reference, but its first step mixes slowly: 16 x 1000 sweeps were 0.056 off.)"""
    folder, (exact, _) = endless_toy
    engine = Engine(policy=folder, prm=reward, kv_cache_memory=64 << 20)
    common = dict(num_particles=2, max_steps=ROUNDS, max_step_tokens=1, max_new_tokens=ROUNDS, temperature=1.0,
                  weight_temperature=WEIGHT_TEMPERATURE, stop_at_boxed=False)
    chains = 32
    results = engine.solve([QUESTION] * chains, SearchConfig(algorithm="particle_gibbs", iterations=CHAIN_LENGTH,
                                                             ancestor_sampling=True, **common))
    states = [s for r in results for s in first_steps_of_references(r)]
    assert len(states) == chains * (CHAIN_LENGTH - 1)
    error = max(abs(states.count(k) / len(states) - exact.get(k, 0.0)) for k in set(exact) | set(states))
    print(f"particle Gibbs chain error {error:.3f}")
    assert error <= CHAIN_TOLERANCE, (error, exact)
    # independent 2-particle filters miss by far more: the test can tell
    filters = engine.solve([QUESTION] * 2048, SearchConfig(final_answer="sampled", **common))
    firsts = [r.steps[0] for r in filters]
    pf_error = max(abs(firsts.count(k) / len(firsts) - exact.get(k, 0.0)) for k in set(exact) | set(firsts))
    print(f"2-particle filter error {pf_error:.3f}")
    assert pf_error > 2 * CHAIN_TOLERANCE, (pf_error, exact)

"""Given the same random draws, the engine's searches equal plain-Python ones.

The reference below shares nothing with the engine but the documented random
streams: Philox(seed, problem << 43 | round << 23 | slot << 12 | token) for
each token (inverse CDF); with seed ^ 0x5DEECE66D and token field 4095 the
resampling draws (slot 0's for systematic, every slot's for particle Gibbs'
multinomial), 4094 the reference's ancestor and 4093 the next reference. A
sweep s numbers its rounds from s * max_steps. It re-runs the whole model on
every prefix (no KV cache), keeps particles as token lists, and resamples with
numpy.
"""

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pf_engine import Engine, SearchConfig
from pf_engine.philox import philox_uniform_reference
from tiny import save_tiny_policy

CONFIG = SearchConfig(num_particles=5, max_steps=4, max_step_tokens=5, max_new_tokens=14, temperature=0.9,
                      stop_at_boxed=False, step_delimiter="e", weight_temperature=0.7, seed=11)
QUESTIONS = ["What is 1+1?", "Name a color."]
# budget forcing: ends before 8 tokens or the first wait phrase do not stand; 30 tokens end the thought
BUDGET = {"min_continuations": 1, "min_tokens": 8, "max_tokens": 30, "wait_phrase": " Bu wait,",
          "end_phrase": " Final."}


def reward(question, steps):
    # depends on the whole path, so a reference's steps weigh differently after different prefixes
    return 0.05 + 0.9 * (sum(ch in "aeiou" for ch in "".join(steps)) % 4) / 3


def draw(seed, problem, round_, slot, token):
    key = (problem << 43) | (round_ << 23) | (slot << 12) | token
    return float(philox_uniform_reference(seed, torch.tensor([key]))[0])


def sampling_logprobs(model, ids, temperature):
    """log p(next token) under the sampling distribution after each prefix ids[:k+1]: [len(ids), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


def log_weights(aggs, cfg):
    aggs = np.clip(aggs, 1e-6, 1 - 1e-6)
    return (np.log(aggs) - np.log1p(-aggs)) / cfg.weight_temperature


def normalized(logw):
    w = np.exp(logw - logw.max())
    return w / w.sum()


def inverse_cdf(weights, u):
    cdf = np.cumsum(weights)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)


def reference_search(model, tokenizer, question, problem, cfg):
    """Particle filtering (systematic) or particle Gibbs (multinomial, reference in slot 0, optional
    ancestor sampling) as the SearchConfig documents them. Returns the last sweep's texts and weights."""
    prompt = tokenizer.encode(question + "\n", add_special_tokens=True)
    gibbs = cfg.algorithm == "particle_gibbs"
    mix = cfg.seed ^ 0x5DEECE66D
    ref = None
    for sweep in range(cfg.iterations if gibbs else 1):
        particles = [{"tokens": [], "steps": [], "ids": [], "finished": False, "agg": 0.0, "generated": 0,
                      "waits": 0, "answering": False, "pending": None} for _ in range(cfg.num_particles)]
        for step_no in range(cfg.max_steps):
            round_ = sweep * cfg.max_steps + step_no
            for slot, p in enumerate(particles):
                if p["finished"]:
                    continue
                forced = ref["ids"][step_no] if ref and slot == 0 and step_no < len(ref["ids"]) else None
                phrase = budget_phrase(tokenizer, p, cfg.budget_forcing)
                step = []
                while True:
                    if len(step) < len(phrase):
                        token = phrase[len(step)]
                    elif forced is None:
                        logp = sampling_logprobs(model, prompt + p["tokens"] + step, cfg.temperature)[-1]
                        token = inverse_cdf(torch.exp(logp).numpy(), draw(cfg.seed, problem, round_, slot, len(step)))
                    else:
                        token = forced[len(step)]
                    step.append(token)
                    p["generated"] += 1
                    if len(step) <= len(phrase):
                        continue  # nothing ends inside a forced phrase
                    bf = cfg.budget_forcing
                    thinking = bf is not None and not p["answering"]
                    if token == tokenizer.eos_token_id:
                        if thinking and (p["generated"] < bf.min_tokens or p["waits"] < bf.min_continuations) \
                                and (bf.max_tokens is None or p["generated"] < bf.max_tokens):
                            step.pop()  # the end does not stand: dropped, and a wait phrase comes next
                            p["generated"] -= 1
                            p["pending"] = "wait"
                            break
                        p["finished"] = True
                        break
                    if forced is not None:
                        if len(step) == len(forced):
                            p["finished"] = ref["finished"] and step_no == len(ref["ids"]) - 1
                            break
                        continue
                    if p["generated"] >= cfg.max_new_tokens:
                        p["finished"] = True
                        break
                    if thinking and bf.max_tokens is not None and p["generated"] >= bf.max_tokens:
                        p["pending"] = "end"  # the thinking budget is spent: the next step ends the thought
                        break
                    text = tokenizer.decode(step, skip_special_tokens=True)
                    if cfg.step_delimiter in text or len(step) >= cfg.max_step_tokens:
                        break
                p["tokens"] += step[:-1] if p["finished"] else step  # a finishing token is never fed
                p["steps"].append(tokenizer.decode(step, skip_special_tokens=True))
                p["ids"].append(step)
                p["agg"] = reward(question, p["steps"])  # aggregation "last"
            weights = normalized(log_weights(np.array([p["agg"] for p in particles]), cfg))
            if step_no == cfg.max_steps - 1 or all(p["finished"] for p in particles):
                break
            n = len(particles)
            if gibbs:
                ancestors = [inverse_cdf(weights, draw(mix, problem, round_, i, 4095)) for i in range(n)]
            else:
                u0 = draw(mix, problem, round_, 0, 4095)
                points = (np.arange(n) + u0) * (np.cumsum(weights)[-1] / n)
                ancestors = np.minimum(np.searchsorted(np.cumsum(weights), points, side="right"), n - 1).tolist()
            if ref:
                ancestors[0] = 0
                if cfg.ancestor_sampling and step_no + 1 < len(ref["ids"]):
                    ancestors[0] = ancestor_for(model, particles, weights, ref, step_no, question, cfg,
                                                draw(mix, problem, round_, 0, 4094), prompt)
            particles = [copy.deepcopy(particles[a]) for a in ancestors]
        if gibbs:
            chosen = particles[inverse_cdf(weights, draw(mix, problem, (sweep + 1) * cfg.max_steps - 1, 0, 4093))]
            ref = {"ids": chosen["ids"], "steps": chosen["steps"], "finished": chosen["finished"]}
    return ["".join(p["steps"]) for p in particles], weights, [p["generated"] for p in particles]


def budget_phrase(tokenizer, particle, budget) -> list[int]:
    """The forced phrase a particle's next step starts with (budget forcing), if one is pending."""
    pending, particle["pending"] = particle["pending"], None
    if pending is None or particle["finished"]:
        return []
    if pending == "wait":
        particle["waits"] += 1
    else:
        particle["answering"] = True
    return tokenizer.encode(budget.wait_phrase if pending == "wait" else budget.end_phrase, add_special_tokens=False)


def ancestor_for(model, particles, weights, ref, step_no, question, cfg, u, prompt):
    """The reference's ancestor: live particles weighed by weight x likelihood of the reference's
    remaining steps after their prefix x the weights those spliced steps get among them. A prefix
    that the future would carry past max_new_tokens cannot hold it (probability 0)."""
    future = ref["ids"][step_no + 1:]
    room = cfg.max_new_tokens - sum(map(len, future))
    candidates = [i for i, p in enumerate(particles)
                  if not p["finished"] and weights[i] > 0 and p["generated"] <= room]
    logw = np.log(weights[candidates])
    tokens = [t for step in future for t in step]
    for j, i in enumerate(candidates):
        ids = prompt + particles[i]["tokens"] + tokens
        logp = sampling_logprobs(model, ids[:-1], cfg.temperature)[-len(tokens):]
        logw[j] += float(logp.gather(1, torch.tensor(tokens)[:, None]).sum())
    for k in range(len(future)):
        spliced = [reward(question, particles[i]["steps"] + ref["steps"][step_no + 1:step_no + 2 + k])
                   for i in candidates]
        logw += np.log(normalized(log_weights(np.array(spliced), cfg)))
    return candidates[inverse_cdf(normalized(logw), u)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder, seed=4)
    return folder


@pytest.mark.parametrize("config", [
    CONFIG,
    replace(CONFIG, algorithm="particle_gibbs", num_particles=3, max_steps=3, iterations=3),
    replace(CONFIG, algorithm="particle_gibbs", num_particles=4, max_steps=4, iterations=6, ancestor_sampling=True),
    replace(CONFIG, max_steps=8, max_step_tokens=12, max_new_tokens=40, budget_forcing=BUDGET),
], ids=["particle_filter", "particle_gibbs", "ancestor_sampling", "budget_forcing"])
def test_engine_equals_reference(policy, config):
    results = Engine(policy=policy, prm=reward, kv_cache_memory=8 << 20).solve(QUESTIONS, config)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    resampled = False
    for problem, (question, result) in enumerate(zip(QUESTIONS, results, strict=True)):
        texts, weights, num_tokens = reference_search(model, tokenizer, question, problem, config)
        assert result.particles == texts and result.num_tokens == num_tokens
        np.testing.assert_allclose(result.weights, weights, rtol=1e-5, atol=1e-7)
        resampled |= any(n.num_children != 1 for n in result.tree if n.depth == 0)
        assert math.isclose(sum(result.weights), 1.0, rel_tol=1e-6)
    assert resampled, "no resampling changed the population: the comparison would be weak"
    tree = [n for r in results for n in r.tree]
    by_id = [{n.node: n for n in r.tree} for r in results]
    replayed = [n for n in tree if n.reference]
    assert bool(replayed) == (config.algorithm == "particle_gibbs")
    assert all(n.iteration > 0 for n in replayed)
    spliced = [n for r, ids in zip(results, by_id, strict=True) for n in r.tree if n.reference and n.parent >= 0
               and not ids[n.parent].reference]
    assert bool(spliced) == config.ancestor_sampling, "ancestor sampling never moved the reference"
    forced = {n.forced for n in tree}
    assert forced == ({None, "wait", "end"} if config.budget_forcing else {None}), forced

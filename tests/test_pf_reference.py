"""Given the same random draws, the engine's searches equal plain-Python ones.

The reference below shares nothing with the engine but the documented random
streams: Philox(seed, problem << 43 | round << 23 | slot << 12 | token) for
each token (inverse CDF); with seed ^ 0x5DEECE66D and token field 4095 the
resampling draws (slot 0's for systematic, every slot's for the other schemes
and particle Gibbs' multinomial), 4094 the reference's ancestor and 4093 the
next reference. A sweep s numbers its rounds from s * max_steps. It re-runs the
whole policy on every prefix and a model PRM on every path (no KV cache), keeps
particles as token lists, and resamples with numpy.
"""

import copy
import math
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_resampled
from transformers import AutoModelForCausalLM, AutoTokenizer

from pf_engine import Engine, SearchConfig
from pf_engine.philox import philox_uniform_reference
from pf_engine.prm_format import PRMFormat
from tiny import save_tiny_policy

CONFIG = SearchConfig(num_particles=5, max_steps=4, max_step_tokens=5, max_new_tokens=14, temperature=0.9,
                      stop_at_boxed=False, step_delimiter="e", weight_temperature=0.7, seed=11)
QUESTIONS = ["What is 1+1?", "Name a color."]
# budget forcing: ends before 8 tokens or the first wait phrase do not stand; 30 tokens end the thought
BUDGET = {"min_continuations": 1, "min_tokens": 8, "max_tokens": 30, "wait_phrase": " Bu wait,",
          "end_phrase": " Final."}
# a language model read as a token-pair PRM, its steps shown as plain text
PRM_FORMAT = PRMFormat(chat_template=False, question_suffix=" Q:", first_step_prefix=" ", step_prefix="\n",
                       marker="=", good="+", bad="-")
# a vocabulary where a random policy writes \boxed{...} answers (no EOS: boxes and caps end particles)
BOXED_CHARS = [*"ae1 {}\\", "\\boxed{"]
# case: (config, policy, PRM, what the reference must see happen in it for the case to test its feature)
CASES = {
    "particle_filter": (CONFIG, "policy", "rule", ()),
    "particle_gibbs": (replace(CONFIG, algorithm="particle_gibbs", num_particles=3, max_steps=3, iterations=3),
                       "policy", "rule", ()),
    "ancestor_sampling": (replace(CONFIG, algorithm="particle_gibbs", num_particles=4, max_steps=4, iterations=6,
                                  ancestor_sampling=True), "policy", "rule", ()),
    "budget_forcing": (replace(CONFIG, max_steps=8, max_step_tokens=12, max_new_tokens=40, budget_forcing=BUDGET),
                       "policy", "rule", ()),
    "ess_threshold": (replace(CONFIG, ess_threshold=0.6, weight_temperature=1.5), "policy", "rule", ("kept",)),
    "min": (replace(CONFIG, aggregation="min"), "policy", "rule", ("aggregated",)),
    "product": (replace(CONFIG, aggregation="product"), "policy", "rule", ("aggregated",)),
    "mean": (replace(CONFIG, aggregation="mean"), "policy", "rule", ("aggregated",)),
    "stratified": (replace(CONFIG, scheme="stratified"), "policy", "rule", ("not systematic",)),
    "residual": (replace(CONFIG, scheme="residual"), "policy", "rule", ("not systematic",)),
    "top_p": (replace(CONFIG, top_p=0.6), "policy", "rule", ("cut",)),
    "top_k": (replace(CONFIG, top_k=4), "policy", "rule", ("cut",)),
    "stop_at_boxed": (replace(CONFIG, stop_at_boxed=True), "boxed_policy", "rule", ("boxed",)),
    "model_prm": (CONFIG, "policy", "model", ()),
    # weight_temperature 0.3 collapses the ESS early, so that rounds anneal
    **{f"entropic_{schedule}": (replace(CONFIG, algorithm="entropic_particle_filter", annealing=schedule,
                                        weight_temperature=0.3, max_steps=6, annealing_phase=0.7),
                                "policy", "rule", ("annealed",))
       for schedule in ("ess", "entropy", "base")},
    # weights from the policy itself, of a policy sure enough of its tokens for them to differ: alone (no PRM
    # loaded), and times a PRM's (rule and model), with exponents
    "self_certainty": (replace(CONFIG, weights="self_certainty"), "sharp_policy", None, ()),
    "mean_logprob": (replace(CONFIG, weights="prm*mean_logprob", signal_exponent=0.5), "sharp_policy", "rule", ()),
    "tail_entropy": (replace(CONFIG, weights="tail_entropy", tail_tokens=2, aggregation="mean", signal_exponent=2.0),
                     "sharp_policy", None, ("tail cut",)),
    "model_prm_self_certainty": (replace(CONFIG, weights="prm*self_certainty"), "sharp_policy", "model", ()),
}


def reward(question, steps):
    # depends on the whole path, so a reference's steps weigh differently after different prefixes
    return 0.05 + 0.9 * (sum(ch in "aeiou" for ch in "".join(steps)) % 4) / 3


def model_reward(model, tokenizer, fmt):
    """A token-pair PRM as a reward of (question, steps): sigmoid(logit good - logit bad) at the marker
    after the newest step, the whole path shown as ``fmt`` says, in one forward."""
    marker, good, bad = (tokenizer.convert_tokens_to_ids(t) for t in (fmt.marker, fmt.good, fmt.bad))

    def score(question, steps):
        ids = tokenizer.encode(question + fmt.question_suffix, add_special_tokens=True)
        for k, step in enumerate(steps):
            prefix = fmt.first_step_prefix if k == 0 else fmt.step_prefix
            ids += tokenizer.encode(prefix + step + fmt.step_suffix, add_special_tokens=False) + [marker]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        return float(torch.sigmoid(logits[good] - logits[bad]))

    return score


def draw(seed, problem, round_, slot, token):
    key = (problem << 43) | (round_ << 23) | (slot << 12) | token
    return float(philox_uniform_reference(seed, torch.tensor([key]))[0])


def sampling_logprobs(model, ids, temperature):
    """log p(next token) under the sampling distribution after each prefix ids[:k+1]: [len(ids), vocab]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits / temperature, dim=-1)


def next_token_probs(model, ids, cfg):
    """The distribution the next token is drawn from (temperature; then the top_k likeliest tokens,
    ties kept; then the fewest likeliest tokens that hold top_p of what is left), and the one
    without top_k and top_p."""
    logits = sampling_logprobs(model, ids, cfg.temperature)[-1]
    full = torch.exp(logits)
    if cfg.top_k:
        logits = logits.masked_fill(logits < logits.sort(descending=True).values[cfg.top_k - 1], -math.inf)
    if cfg.top_p < 1:
        order = logits.argsort(descending=True)
        probs = torch.softmax(logits[order], dim=-1)
        before = torch.cumsum(probs, dim=0) - probs  # the mass of the tokens ranked above each
        logits[order[before >= cfg.top_p]] = -math.inf
    return torch.softmax(logits, dim=-1).numpy(), full.numpy()


def holds_boxed_answer(text):
    """Whether some \\boxed{ in ``text`` has its braces closed again."""
    start = text.find("\\boxed{")
    while start >= 0:
        depth = 1
        for ch in text[start + len("\\boxed{"):]:
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return True
        start = text.find("\\boxed{", start + 1)
    return False


def aggregate(rewards, how):
    return {"last": rewards[-1], "min": min(rewards), "product": math.prod(rewards),
            "mean": sum(rewards) / len(rewards)}[how]


def log_weights(aggs, cfg):
    aggs = np.clip(aggs, 1e-6, 1 - 1e-6)
    return (np.log(aggs) - np.log1p(-aggs)) / cfg.weight_temperature


def normalized(logw):
    w = np.exp(logw - logw.max())
    return w / w.sum()


def annealed(logw, weights, progress, cfg):
    """Entropic particle filtering's weights: the temperature by cfg.annealing while the ESS is below
    cfg.annealing_threshold * N early in the search (progress < cfg.annealing_phase), and the weights
    at it."""
    n, ess = len(weights), 1 / np.sum(weights ** 2)
    if not (ess < cfg.annealing_threshold * n and progress < cfg.annealing_phase):
        return 1.0, weights
    if cfg.annealing == "ess":
        value = n / ess * (1 - progress)
    elif cfg.annealing == "entropy":
        h = -sum(w * math.log(w) for w in weights if w > 0) / (math.log(n) if n > 2 else 1)
        value = 1 / (h + (1 - h) * progress)
    else:
        value = cfg.annealing_max_temperature - progress
    temperature = max(1.0, value)
    return temperature, normalized(logw / temperature)


def confidence_log_odds(model, before, step, cfg, seen):
    """The policy's confidence in ``step`` (token ids) written after ``before``, as log-odds, from
    scratch: each token's distribution is the softmax of the policy's logits at temperature 1.
    mean_logprob: logit(exp(mean log p(token))); tail_entropy: logit(exp(-mean entropy)) over the last
    cfg.tail_tokens tokens; self_certainty: mean KL(uniform || p) - log V."""
    with torch.no_grad():
        logits = model(torch.tensor([before + step[:-1]])).logits[0, len(before) - 1:].double()
    logp, vocab = torch.log_softmax(logits, dim=-1), logits.shape[-1]
    signal = cfg.weights.removeprefix("prm*")
    if signal == "self_certainty":
        return float((-math.log(vocab) - logp.mean(dim=-1)).mean()) - math.log(vocab)
    if signal == "mean_logprob":
        c = float(logp.gather(1, torch.tensor(step)[:, None]).mean())
    else:
        entropy = -(logp.exp() * logp).sum(dim=-1)
        seen["tail cut"] += len(step) > cfg.tail_tokens
        c = -float(entropy[-cfg.tail_tokens:].mean())
    return c - math.log(-math.expm1(c))


def step_reward(score, question, steps, log_odds, cfg):
    """The fused step's reward of a step: the PRM's, or sigmoid(logit(PRM's) + exponent * log-odds of the
    policy's confidence), or sigmoid(exponent * log-odds) without a PRM."""
    if cfg.weights == "prm":
        return score(question, steps)
    x = cfg.signal_exponent * log_odds
    if cfg.weights.startswith("prm*"):
        r = score(question, steps)
        x += math.log(r) - math.log1p(-r)
    return 0.5 * (1 + math.tanh(x / 2))  # sigmoid(x), without overflow


def inverse_cdf(weights, u):
    cdf = np.cumsum(weights)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)


def draw_ancestors(scheme, weights, uniforms):
    """Each slot's ancestor. systematic: points (i + u_0) / n; stratified: (i + u_i) / n; multinomial:
    u_i; residual: floor(n w_k) copies of each particle k in order, then the remaining slots i draw by
    u_i from the remainders n w_k - floor(n w_k)."""
    n, cdf = len(weights), np.cumsum(weights)
    if scheme in ("systematic", "stratified"):
        offsets = np.full(n, uniforms[0]) if scheme == "systematic" else np.array(uniforms)
        points = (np.arange(n) + offsets) * (cdf[-1] / n)
        return np.minimum(np.searchsorted(cdf, points, side="right"), n - 1).tolist()
    if scheme == "multinomial":
        return [inverse_cdf(weights, u) for u in uniforms]
    copies = np.floor(n * weights).astype(int)
    fixed = [k for k in range(n) for _ in range(copies[k])]
    return fixed + [inverse_cdf(n * weights - copies, u) for u in uniforms[len(fixed):]]


def reference_search(model, tokenizer, question, problem, cfg, score):
    """Particle filtering (``cfg.scheme``) or particle Gibbs (multinomial, reference in slot 0, optional
    ancestor sampling) as the SearchConfig documents them, with the PRM ``score(question, steps)``.
    Returns the last sweep's texts, weights and token counts, and a count of what happened that
    some feature decided: a round resampled or "kept" (ess_threshold), an aggregate other than the
    newest reward, ancestors "not systematic", a draw top_k / top_p "cut" to another token, a
    particle finished at a "boxed" answer."""
    assert not (cfg.stop_at_boxed and (cfg.budget_forcing or cfg.algorithm == "particle_gibbs"))  # not restated
    prompt = tokenizer.encode(question + "\n", add_special_tokens=True)
    gibbs = cfg.algorithm == "particle_gibbs"
    mix = cfg.seed ^ 0x5DEECE66D
    ref, seen, temperatures = None, Counter(), []
    for sweep in range(cfg.iterations if gibbs else 1):
        particles = [{"tokens": [], "steps": [], "ids": [], "rewards": [], "finished": False, "generated": 0,
                      "waits": 0, "answering": False, "pending": None, "confidences": []}
                     for _ in range(cfg.num_particles)]
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
                        probs, unfiltered = next_token_probs(model, prompt + p["tokens"] + step, cfg)
                        u = draw(cfg.seed, problem, round_, slot, len(step))
                        token = inverse_cdf(probs, u)
                        seen["cut"] += token != inverse_cdf(unfiltered, u)
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
                    text = tokenizer.decode(step, skip_special_tokens=True)
                    if cfg.stop_at_boxed and holds_boxed_answer("".join(p["steps"]) + text):
                        p["finished"] = True
                        seen["boxed"] += 1
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
                    if cfg.step_delimiter in text or len(step) >= cfg.max_step_tokens:
                        break
                log_odds = None if cfg.weights == "prm" else confidence_log_odds(
                    model, prompt + p["tokens"], step, cfg, seen)
                p["tokens"] += step[:-1] if p["finished"] else step  # a finishing token is never fed
                p["steps"].append(tokenizer.decode(step, skip_special_tokens=True))
                p["ids"].append(step)
                p["rewards"].append(step_reward(score, question, p["steps"], log_odds, cfg))
                p["confidences"].append(None if log_odds is None else 0.5 * (1 + math.tanh(log_odds / 2)))
                seen["aggregated"] += aggregate(p["rewards"], cfg.aggregation) != p["rewards"][-1]
            aggs = np.array([aggregate(p["rewards"], cfg.aggregation) for p in particles])
            logw = log_weights(aggs, cfg)
            weights = normalized(logw)
            if cfg.algorithm == "entropic_particle_filter":
                temperature, weights = annealed(logw, weights, (step_no + 1) / cfg.max_steps, cfg)
                seen["annealed"] += temperature > 1
                temperatures.append(temperature)
            if step_no == cfg.max_steps - 1 or all(p["finished"] for p in particles):
                break
            n = len(particles)
            uniforms = [draw(mix, problem, round_, i, 4095) for i in range(n)]
            ancestors = draw_ancestors("multinomial" if gibbs else cfg.scheme, weights, uniforms)
            if cfg.ess_threshold is not None and 1 / np.sum(weights ** 2) >= cfg.ess_threshold * n:
                seen["kept"] += ancestors != list(range(n))  # (resampling to the same particles is no sign)
                continue  # the particles go on as they are, weighed by their aggregates alone
            seen["resampled"] += 1
            seen["not systematic"] += ancestors != draw_ancestors("systematic", weights, uniforms)
            if ref:
                ancestors[0] = 0
                if cfg.ancestor_sampling and step_no + 1 < len(ref["ids"]):
                    ancestors[0] = ancestor_for(model, particles, weights, ref, step_no, question, cfg,
                                                draw(mix, problem, round_, 0, 4094), prompt, score)
            particles = [copy.deepcopy(particles[a]) for a in ancestors]
        if gibbs:
            chosen = particles[inverse_cdf(weights, draw(mix, problem, (sweep + 1) * cfg.max_steps - 1, 0, 4093))]
            ref = {"ids": chosen["ids"], "steps": chosen["steps"], "finished": chosen["finished"]}
    seen["temperatures"], seen["confidences"] = temperatures, [p["confidences"] for p in particles]
    return ["".join(p["steps"]) for p in particles], weights, [p["generated"] for p in particles], seen


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


def ancestor_for(model, particles, weights, ref, step_no, question, cfg, u, prompt, score):
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
        spliced = [score(question, particles[i]["steps"] + ref["steps"][step_no + 1:step_no + 2 + k])
                   for i in candidates]
        logw += np.log(normalized(log_weights(np.array(spliced), cfg)))
    return candidates[inverse_cdf(normalized(logw), u)]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder, seed=4)
    return folder


@pytest.fixture(scope="module")
def sharp_policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharp")
    save_tiny_policy(folder, seed=4, initializer_range=0.3)
    return folder


@pytest.fixture(scope="module")
def boxed_policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("boxed")
    save_tiny_policy(folder, seed=4, chars=BOXED_CHARS, eos=False)
    return folder


@pytest.fixture(scope="module")
def prm_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prm")
    # weights large enough to spread the rewards over (0, 1), small enough that fp32 rewards near 1 keep
    # their weights' digits
    save_tiny_policy(folder, seed=3, initializer_range=0.2)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_engine_equals_reference(request, case):
    config, policy_fixture, prm_kind, must_see = CASES[case]
    policy = request.getfixturevalue(policy_fixture)
    if prm_kind == "model":
        prm = request.getfixturevalue("prm_checkpoint")
        engine = Engine(policy=policy, prm=prm, prm_format=PRM_FORMAT, kv_cache_memory=8 << 20)
        score = model_reward(AutoModelForCausalLM.from_pretrained(prm, dtype=torch.float32).eval(),
                             AutoTokenizer.from_pretrained(prm), PRM_FORMAT)
    else:
        score = reward if prm_kind == "rule" else None
        engine = Engine(policy=policy, prm=score, kv_cache_memory=8 << 20)
    results = engine.solve(QUESTIONS, config)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    seen = Counter()
    for problem, (question, result) in enumerate(zip(QUESTIONS, results, strict=True)):
        texts, weights, num_tokens, happened = reference_search(model, tokenizer, question, problem, config, score)
        assert result.particles == texts and result.num_tokens == num_tokens
        np.testing.assert_allclose(result.weights, weights, rtol=1e-5, atol=1e-7)
        assert math.isclose(sum(result.weights), 1.0, rel_tol=1e-6)
        # the temperature of every round, on each of its nodes (None outside entropic particle filtering)
        temperatures = happened.pop("temperatures")
        for node in result.tree:
            expected = temperatures[node.depth] if temperatures else None
            assert node.temperature == (expected if expected is None else pytest.approx(expected, rel=1e-5))
        # the policy's confidence in each step of each final particle (None with PRM weights alone)
        for slot, confidences in enumerate(happened.pop("confidences")):
            found = [result.tree[node].confidence for node in result.path_of(slot)]
            assert found == (confidences if config.weights == "prm" else pytest.approx(confidences, rel=1e-5))
        seen += happened
    assert_resampled(results)
    for what in must_see:
        assert seen[what] > 0, f"nothing in the run was decided by {case} ({what}): the comparison would be weak"
    if config.ess_threshold is not None:
        assert seen["resampled"] > 0
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

"""Given the same random draws, the engine's particle filter equals a plain-Python one.

The reference below shares nothing with the engine but the documented random
streams: Philox(seed, problem << 43 | round << 23 | slot << 12 | token) for
each token (inverse CDF), and, for systematic resampling, the draw of slot 0
with token field 4095 and seed ^ 0x5DEECE66D. It re-runs the whole model on
every prefix (no KV cache), keeps particles as token lists, and resamples with
numpy.
"""

import copy
import math

import numpy as np
import pytest
import torch
from tiny import save_tiny_policy
from transformers import AutoModelForCausalLM, AutoTokenizer

from pf_engine import Engine, SearchConfig
from pf_engine.kernels.resample import philox_uniform

CONFIG = SearchConfig(num_particles=5, max_steps=4, max_step_tokens=5, max_new_tokens=14, temperature=0.9,
                      stop_at_boxed=False, step_delimiter="e", weight_temperature=0.7, seed=11)
QUESTIONS = ["What is 1+1?", "Name a color."]


def reward(question, steps):
    return 0.05 + 0.9 * (sum(ch in "aeiou" for ch in steps[-1]) % 4) / 3


def draw(seed, problem, round_, slot, token):
    key = (problem << 43) | (round_ << 23) | (slot << 12) | token
    return float(philox_uniform(seed, torch.tensor([key]))[0])


def reference_pf(model, tokenizer, question, problem, cfg):
    prompt = tokenizer.encode(question + "\n", add_special_tokens=True)
    particles = [{"tokens": [], "steps": [], "finished": False, "agg": 0.0, "generated": 0}
                 for _ in range(cfg.num_particles)]
    weights = None
    for round_ in range(cfg.max_steps):
        for slot, p in enumerate(particles):
            if p["finished"]:
                continue
            step = []
            while True:
                with torch.no_grad():
                    logits = model(torch.tensor([prompt + p["tokens"]])).logits[0, -1].double()
                probs = torch.softmax(logits / cfg.temperature, dim=0).numpy()
                cdf = np.cumsum(probs)
                u = draw(cfg.seed, problem, round_, slot, len(step))
                token = min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(cdf) - 1)
                step.append(token)
                p["generated"] += 1
                if token == tokenizer.eos_token_id or p["generated"] >= cfg.max_new_tokens:
                    p["finished"] = True
                    break
                p["tokens"].append(token)
                text = tokenizer.decode(step, skip_special_tokens=True)
                if cfg.step_delimiter in text or len(step) >= cfg.max_step_tokens:
                    break
            p["steps"].append(tokenizer.decode(step, skip_special_tokens=True))
            p["agg"] = reward(question, p["steps"])  # aggregation "last"
        aggs = np.clip([p["agg"] for p in particles], 1e-6, 1 - 1e-6)
        logw = (np.log(aggs) - np.log1p(-aggs)) / cfg.weight_temperature
        weights = np.exp(logw - logw.max())
        weights /= weights.sum()
        if round_ == cfg.max_steps - 1 or all(p["finished"] for p in particles):
            break
        cdf = np.cumsum(weights)
        u0 = draw(cfg.seed ^ 0x5DEECE66D, problem, round_, 0, 4095)
        points = (np.arange(len(particles)) + u0) * (cdf[-1] / len(particles))
        ancestors = np.minimum(np.searchsorted(cdf, points, side="right"), len(particles) - 1)
        particles = [copy.deepcopy(particles[a]) for a in ancestors]
    return ["".join(p["steps"]) for p in particles], weights


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder, seed=4)
    return folder


def test_engine_particle_filter_equals_reference(policy):
    results = Engine(policy=policy, prm=reward, kv_cache_memory=8 << 20).solve(QUESTIONS, CONFIG)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(policy)
    resampled = False
    for problem, (question, result) in enumerate(zip(QUESTIONS, results)):
        texts, weights = reference_pf(model, tokenizer, question, problem, CONFIG)
        assert result.particles == texts
        np.testing.assert_allclose(result.weights, weights, rtol=1e-5, atol=1e-7)
        resampled |= any(n.num_children != 1 for n in result.tree if n.depth == 0)
        assert math.isclose(sum(result.weights), 1.0, rel_tol=1e-6)
    assert resampled, "no resampling changed the population: the comparison would be weak"

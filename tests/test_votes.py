"""Votes and early stopping (pf_engine.votes): the rules against their definitions, and early-stopped
searches against the fixed-N run under the same draws: where the rule first held, what each particle
had drawn by then, the blocks given back, and the answer."""

import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import varying_reward

from pf_engine import Engine, OutOfBlocksError, SearchConfig
from pf_engine.answers import extract_answer
from pf_engine.core import Core
from pf_engine.scheduler import Scheduler
from pf_engine.votes import beta_confidence, settled, vote
from tiny import save_tiny_policy

# a policy whose particles often finish with one of two answers, each a single token
VOTE_CHARS = ["\\boxed{7}", "\\boxed{3}", "a", "b", " ", "\n"]
QUESTIONS = ["q1", "q2", "q3", "q4", "q5", "q6"]
SMALL = dict(num_particles=8, max_steps=4, max_step_tokens=5, max_new_tokens=20)
RULES = [("beta", None), ("beta", 0.8), ("adaptive", None), ("adaptive", 0.6)]


@pytest.fixture(scope="module")
def vote_policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vote")
    save_tiny_policy(folder, seed=1, chars=VOTE_CHARS, initializer_range=0.1)
    return folder


@pytest.mark.parametrize("v1,v2", [(0, 0), (1, 0), (3, 0), (4, 0), (4, 1), (5, 5), (9, 2), (2, 7)])
def test_beta_confidence_is_the_beta_posteriors_mass_above_one_half(v1, v2):
    x = np.linspace(0.5, 1, 200001)
    density = x**v1 * (1 - x) ** v2 * math.factorial(v1 + v2 + 1) / (math.factorial(v1) * math.factorial(v2))
    assert beta_confidence(v1, v2) == pytest.approx(np.trapezoid(density, x), abs=1e-8)


def test_the_stopping_rules_decide_as_their_definitions_say():
    a, b = "7", "3"
    # beta: the top two counts among finished particles with answers; at least two answers
    assert settled("beta", 0.95, [a, a, a, a, None, None], [True] * 4 + [False] * 2)  # 4-0: 0.969
    assert not settled("beta", 0.95, [a, a, a, None, None, None], [True] * 3 + [False] * 3)  # 3-0: 0.9375
    assert not settled("beta", 0.95, [a, a, a, a, b, None], [True] * 5 + [False])  # 4-1: 0.891
    assert settled("beta", 0.85, [a, a, a, a, b, None], [True] * 5 + [False])
    assert not settled("beta", 0.7, [a, None, None], [True, True, False])  # one answer only
    assert not settled("beta", 0.6, [a, a, a], [True] * 3)  # all finished: the search is over anyway
    # adaptive: the first 2, 4, 8, ... slots all finished, and a supermajority of them
    assert settled("adaptive", 0.75, [a, a, None, None], [True, True, False, False])
    assert not settled("adaptive", 0.75, [a, b, a, None], [True, True, True, False])  # 4 not all finished
    assert not settled("adaptive", 0.75, [a, a, b, a, b, None, None, None], [False] + [True] * 4 + [False] * 3)
    assert settled("adaptive", 0.75, [a, b, a, a, b, None, None, None], [True] * 4 + [False] * 4)  # 3 of 4
    assert not settled("adaptive", 0.75, [a, b, a, None, None, None, None, None], [True] * 4 + [False] * 4)
    assert not settled("adaptive", 0.75, [a, b, b, a, a, a, a, b], [True] * 7 + [False])  # 4 of 7 not tried


def test_votes_pick_the_class_and_the_particle():
    answers = ["3", "7", "7.0", None, "3"]
    weights = [0.5, 0.2, 0.25, 0.9, 0.3]
    assert vote("majority", answers, [1.0] * 5) == ("3", 0)  # a 2-2 tie: the first class
    assert vote("weighted", answers, weights) == ("3", 0)  # 0.8 against 0.45
    assert vote("weighted", answers, [0.1, 0.2, 0.25, 0.9, 0.3]) == ("7", 2)  # its heaviest member
    assert vote("confidence_selection", answers, weights) == ("3", 0)  # the heaviest with an answer
    assert vote("majority", [None, None], [0.2, 0.7]) == (None, 1)


def finish_times(result):
    """Each particle's finishing time in the problem's own iterations, from a fixed-N run: a round lasts
    as long as its longest step (particles of a problem end their rounds together)."""
    depth_len: dict[int, int] = {}
    for node in result.tree:
        depth_len[node.depth] = max(depth_len.get(node.depth, 0), node.num_tokens)
    starts = np.concatenate([[0], np.cumsum([depth_len[d] for d in sorted(depth_len)])])
    times = []
    for slot in range(len(result.particles)):
        last = result.tree[result.leaves[slot]]
        times.append(int(starts[last.depth] + last.num_tokens) if last.finished else None)
    return starts, times


def expected_stop(result, rule, threshold):
    """The iteration at which the rule first holds over the particles finished by then (None: never)."""
    starts, times = finish_times(result)
    answers = [extract_answer(t) for t in result.particles]
    for t in sorted({t for t in times if t is not None}):
        done = [s is not None and s <= t for s in times]
        if settled(rule, threshold, [a if d else None for a, d in zip(answers, done, strict=True)], done):
            return t, starts
    return None, starts


def drawn_by(result, slot, t, starts):
    """The tokens a particle of the fixed-N run had drawn by iteration t, step by step."""
    counts = []
    for node in result.path_of(slot):
        n = result.tree[node]
        if starts[n.depth] >= t:
            break
        counts.append(min(n.num_tokens, t - starts[n.depth]))
    return counts


@pytest.mark.parametrize("rule,threshold", RULES)
@pytest.mark.parametrize("algorithm", ["self_consistency", "best_of_n"])
def test_early_stopping_cancels_the_particles_where_the_fixed_run_had_them(vote_policy, algorithm, rule,
                                                                           threshold):
    engine = Engine(policy=vote_policy, prm=varying_reward, kv_cache_memory=8 << 20)
    fixed_config = SearchConfig(algorithm=algorithm, **SMALL)
    config = SearchConfig(algorithm=algorithm, early_stop=rule, early_stop_threshold=threshold, **SMALL)
    fixed, early = engine.solve(QUESTIONS, fixed_config), engine.solve(QUESTIONS, config)
    stopped = 0
    for f, e in zip(fixed, early, strict=True):
        t, starts = expected_stop(f, rule, config.stop_threshold)
        if t is None:  # never settled: the fixed run itself
            assert (e.particles, e.weights, e.answer, e.chosen) == (f.particles, f.weights, f.answer, f.chosen)
            assert e.stats["cancelled_particles"] == 0
            continue
        stopped += 1
        _, times = finish_times(f)
        for slot in range(len(f.particles)):
            steps = [e.tree[n].num_tokens for n in e.path_of(slot)]
            assert steps == drawn_by(f, slot, t, starts), (slot, t)
            assert f.particles[slot].startswith(e.particles[slot])
            done = times[slot] is not None and times[slot] <= t
            assert e.tree[e.leaves[slot]].cancelled == (not done and bool(steps))
        assert e.stats["cancelled_particles"] == sum(times[s] is None or times[s] > t for s in range(len(times)))
        assert e.stats["tokens_generated"] == sum(map(sum, (drawn_by(f, s, t, starts) for s in range(8))))
        assert e.stats["tokens_generated"] < f.stats["tokens_generated"]
        answering = [times[s] is not None and times[s] <= t for s in range(8)]
        if algorithm == "self_consistency":  # the vote over the particles finished by then
            answers = [extract_answer(p) if ok else None for p, ok in zip(f.particles, answering, strict=True)]
            assert (e.answer, e.chosen) == vote("majority", answers, [1.0] * 8)
        else:  # the best-weighted of them
            assert answering[e.chosen] and e.weights[e.chosen] == max(w for w, ok in
                                                                       zip(e.weights, answering, strict=True) if ok)
    assert stopped >= 2, "too few problems settled to test the rule"
    assert stopped < len(QUESTIONS) or rule == "adaptive", "every problem settled: the fixed run is not compared"


def test_a_problem_that_stops_gives_its_blocks_back_at_once(vote_policy):
    """One problem settles while another runs on: its blocks are free before the other's search ends."""
    engine = Engine(policy=vote_policy, kv_cache_memory=8 << 20)
    manager = engine.core.policy.manager
    early = SearchConfig(algorithm="self_consistency", early_stop="beta", early_stop_threshold=0.8, **SMALL)
    fixed = SearchConfig(algorithm="self_consistency", **SMALL | {"max_new_tokens": 40})
    runs = engine.solve(QUESTIONS, replace(early, early_stop="none"))
    key = next(i for i, r in enumerate(runs) if expected_stop(r, "beta", 0.8)[0] is not None)
    problems = [engine.problem(QUESTIONS[key], 0, key, engine.algorithm(early)),
                engine.problem(QUESTIONS[key - 1], 1, (key + 1) % len(QUESTIONS), engine.algorithm(fixed))]
    scheduler = Scheduler(engine.core, engine.bytes_per_block, problems)
    in_use = []
    while scheduler.running or scheduler.waiting:
        finished = scheduler.iterate()
        in_use.append((manager.num_blocks - manager.num_free_blocks, [p.index for p in finished]))
    stop = next(i for i, (_, done) in enumerate(in_use) if 0 in done)
    assert problems[0].stopped_early and 1 in in_use[-1][1] and stop < len(in_use) - 1
    assert in_use[stop][0] < in_use[stop - 1][0]
    assert all(p.num_tokens.sum() for p in problems)


@pytest.mark.parametrize("vote_kind,weights,exponent", [("weighted", "tail_entropy", 2.0),
                                                         ("weighted", "mean_logprob", 1.0),
                                                         ("confidence_selection", "self_certainty", 1.0)])
def test_confidence_votes_weigh_each_answer_from_scratch(vote_policy, vote_kind, weights, exponent):
    """Each particle's vote weighs sigmoid(log-odds) ** exponent of its whole answer, from transformers'
    logits of the tokens it drew."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(vote_policy).eval()
    engine = Engine(policy=vote_policy, kv_cache_memory=8 << 20)
    config = SearchConfig(algorithm="self_consistency", vote=vote_kind, weights=weights, signal_exponent=exponent,
                          tail_tokens=3, **SMALL)
    algorithm = engine.algorithm(config)
    problems = [engine.problem(q, i, i, algorithm) for i, q in enumerate(QUESTIONS[:3])]
    for p in Scheduler(engine.core, engine.bytes_per_block, problems).run():
        r, prompt = engine.result(p), p.prompt_ids
        expected = []
        for slot in range(p.num_particles):
            ids = [t for step in p.step_ids(slot) for t in step]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + ids[:-1]])).logits[0, len(prompt) - 1:].double()
            logp = torch.log_softmax(logits, dim=-1)
            if weights == "self_certainty":
                lam = float((-math.log(logp.shape[-1]) - logp.mean(dim=-1)).mean()) - math.log(logp.shape[-1])
            else:
                c = float(logp.gather(1, torch.tensor(ids)[:, None]).mean()) if weights == "mean_logprob" else \
                    float((logp.exp() * logp).sum(dim=-1)[-3:].mean())
                lam = c - math.log(-math.expm1(c))
            expected.append((1 / (1 + math.exp(-lam))) ** exponent)
        np.testing.assert_allclose(r.weights, expected, rtol=1e-5)
        answers = [extract_answer(t) for t in r.particles]
        assert (r.answer, r.chosen) == vote(vote_kind, answers, r.weights)
        assert len(set(r.weights)) > 1


@pytest.mark.parametrize("algorithm", ["self_consistency", "best_of_n"])
def test_early_stopping_whatever_the_preemptions(vote_policy, algorithm, monkeypatch):
    """Forwards that run out of blocks (injected: every 5th with several problems in it) preempt the
    newest problem, which is rebuilt from its tree later and stops at the same token: the results
    equal an undisturbed run's."""
    config = SearchConfig(algorithm=algorithm, early_stop="beta", early_stop_threshold=0.8, **SMALL)
    engine = Engine(policy=vote_policy, prm=varying_reward, kv_cache_memory=8 << 20)
    calm = engine.solve(QUESTIONS, config)
    feed, calls = Core.feed, []

    def short_of_blocks(self, rows, tokens):
        calls.append(len(rows))
        if len(calls) % 5 == 0 and len(np.unique(self.table.problem[rows])) > 1:
            raise OutOfBlocksError("injected")
        return feed(self, rows, tokens)

    monkeypatch.setattr(Core, "feed", short_of_blocks)
    stormy = engine.solve(QUESTIONS, config)
    assert sum(r.stats["preemptions"] for r in stormy) > 0
    assert sum(r.stats["cancelled_particles"] > 0 for r in calm) >= 2
    for a, b in zip(stormy, calm, strict=True):
        assert (a.particles, a.weights, a.answer, a.chosen, a.stats["cancelled_particles"]) == \
            (b.particles, b.weights, b.answer, b.chosen, b.stats["cancelled_particles"])
        assert [(n.text, n.cancelled) for n in a.tree] == [(n.text, n.cancelled) for n in b.tree]


@pytest.mark.parametrize("stop", [(), ("a",), ("b\\boxed{7}", "ab", "ba")])
def test_the_text_so_far_is_the_text_the_rounds_end_commits(vote_policy, stop):
    """What a vote reads of a particle inside a step (StepWriter.text_so_far) is its whole text as the
    round's end then cuts and commits it, stop strings spanning steps included."""
    from pf_engine import book

    engine = Engine(policy=vote_policy, kv_cache_memory=8 << 20)
    core = engine.core
    config = SearchConfig(algorithm="self_consistency", stop=stop, **SMALL)
    core.begin()
    compared = cut = 0
    for key, question in enumerate(QUESTIONS):
        problem = engine.problem(question, 0, key, engine.algorithm(config))
        core.place(problem)
        for _ in range(config.max_steps):
            core.begin_round(problem)
            while core.table.writing.any():
                rows = np.flatnonzero(core.table.writing)
                tokens, feed, _ = core.sample(rows)
                core.feed(rows[feed], tokens[feed])
            live = np.flatnonzero(~problem.finished).tolist()
            so_far = {slot: core.writer.text_so_far(problem, slot) for slot in live}
            batch = core.end_round([problem])
            book.commit(problem, core.table, batch.steps[0])
            for slot in live:
                assert so_far[slot] == "".join(problem.steps(slot)), (question, slot)
                compared += 1
                cut += bool(problem.tree[problem.leaf[slot]].trim)
            if problem.finished.all():
                break
        core.evict(problem)
    assert compared
    if len(stop) > 1:
        assert cut, "no stop string spanned two steps"

"""Continuous batching: the same answers whatever the pool, admission order or preemptions;
results streamed as problems finish; and every pool as it was after any failure."""

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import assert_resampled, varying_reward

from pf_engine import Engine, OutOfBlocksError, SearchConfig, book
from pf_engine.core import Core
from pf_engine.prm_format import PRMFormat
from pf_engine.scheduler import Scheduler
from pf_engine.search.config import ALGORITHMS
from pf_engine.search.particle_gibbs import ParticleGibbs
from tiny import save_tiny_policy

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?", "Name a color, please.", "x"]
SMALL = dict(num_particles=4, beam_width=2, max_steps=4, max_step_tokens=6, max_new_tokens=20, stop_at_boxed=False)
CONFIGS = {name: SearchConfig(algorithm=name, **SMALL) for name in ALGORITHMS} | {
    "particle_gibbs+ancestors": SearchConfig(algorithm="particle_gibbs", ancestor_sampling=True, iterations=3,
                                             **SMALL),
    # sharp weights and annealing in every round, so that the annealing temperatures differ by problem
    "entropic_particle_filter": SearchConfig(algorithm="entropic_particle_filter", weight_temperature=0.2,
                                             annealing_phase=1.0, **SMALL),
    # weights from the policy's own logits, kept per token in the row table across preemptions
    "beam_search+mean_logprob": SearchConfig(algorithm="beam_search", weights="mean_logprob", **SMALL),
    "particle_filter+prm*tail_entropy": SearchConfig(weights="prm*tail_entropy", tail_tokens=3, **SMALL)}
BLOCK_BYTES = 2 * 2 * 2 * 8 * 4 * 16  # tiny policy: layers * K/V * kv heads * head_dim * fp32 * block_size
# Pools in blocks: roomy; tight, where admission lets in more than the pool holds later and preemption
# follows; just enough for one problem at a time (ancestor sampling needs more room for its splices).
POOLS = {"roomy": 2048, "tight": 16, "just enough": 12}
ANCESTOR_POOLS = {"roomy": 2048, "tight": 24}
# A model PRM that reads far more tokens a step than the policy writes, so its pool (as many blocks as
# the policy's) runs short first; blocks of the tight pool per search.
LONG_PRM_FORMAT = PRMFormat(chat_template=False, question_suffix=" Steps:", first_step_prefix=" ", step_prefix="\n",
                            step_suffix=" Is this right?", marker="=", good="+", bad="-")
PRM_POOLS = {"particle_filter": 24, "particle_gibbs+ancestors": 40, "particle_filter+prm*tail_entropy": 24}


# the searches that resample: their comparisons hold only if resampling changed some ancestors
RESAMPLING = ("particle_filter", "entropic_particle_filter", "particle_gibbs", "beam_search", "dvts",
              "particle_gibbs+ancestors", "beam_search+mean_logprob", "particle_filter+prm*tail_entropy")


def engine_with(policy, blocks, prm=varying_reward):
    return Engine(policy=policy, prm=prm, kv_cache_memory=blocks * BLOCK_BYTES)


def outcome(result):
    """What must not depend on batching: texts, weights and the tree (bar its problem index)."""
    tree = [(n.node, n.parent, n.depth, n.text, n.reward, n.weight, n.num_children, n.finished, n.iteration,
             n.reference, n.temperature, n.confidence) for n in result.tree]
    return result.particles, result.weights, result.leaves, result.answer, tree


def assert_same(got, expected, config):
    """Outcomes equal; where the weights come from the policy's logits, whose last bits depend on how
    many rows share a forward (oneDNN's GEMM), the floats to fp32 rounding (the texts still exactly)."""
    if config.weighting.signal is None:
        assert got == expected
        return
    floats = (4, 5, 10, 11)  # a tree node's reward, weight, temperature, confidence
    for a, b in zip(got, expected, strict=True):
        assert (a[0], a[2], a[3]) == (b[0], b[2], b[3])
        np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-7)
        assert [[x for i, x in enumerate(n) if i not in floats] for n in a[4]] == \
            [[x for i, x in enumerate(n) if i not in floats] for n in b[4]]
        np.testing.assert_allclose([[n[i] or 0.0 for i in floats] for n in a[4]],
                                   [[n[i] or 0.0 for i in floats] for n in b[4]], rtol=1e-5, atol=1e-7)


def shape(node):
    """A tree node bar its problem index and its floats."""
    return node.node, node.parent, node.depth, node.text, node.num_children, node.finished, node.iteration, \
        node.reference


def assert_pools_free(engine):
    for manager in engine.core.managers:
        assert manager.num_free_blocks == manager.num_blocks and manager.num_seqs == 0, manager


@pytest.fixture(scope="module")
def alone(policy):
    """Each problem run by itself, under its key, in a roomy pool."""
    engine = engine_with(policy, POOLS["roomy"])
    return {name: [outcome(engine.solve([{"problem": q, "key": i}], config)[0]) for i, q in enumerate(QUESTIONS)]
            for name, config in CONFIGS.items()}


@pytest.mark.parametrize("name,pool", [(name, pool) for name in CONFIGS
                                       for pool in (ANCESTOR_POOLS if "ancestors" in name else POOLS)])
def test_same_answers_whatever_the_pool_and_the_preemptions(policy, alone, name, pool):
    pools = ANCESTOR_POOLS if "ancestors" in name else POOLS
    engine = engine_with(policy, pools[pool])
    results = engine.solve(QUESTIONS, CONFIGS[name])
    assert_same([outcome(r) for r in results], alone[name], CONFIGS[name])
    if name in RESAMPLING:
        assert_resampled(results)
    if name == "entropic_particle_filter":
        assert len({n.temperature for r in results for n in r.tree}) > 2, "too few rounds annealed"
    elif name == "best_of_n":  # the rewards rank the particles
        assert any(len(set(r.weights)) > 1 for r in results)
    preemptions = sum(r.stats["preemptions"] for r in results)
    if pool == "tight":
        assert preemptions > 0, "the pool was meant to force preemptions"
    elif pool == "roomy":
        assert preemptions == 0
    if name in ("best_of_n", "self_consistency"):  # no step dies: every kept token is in the tree
        for r in results:
            chars = sum(len(n.text) for n in r.tree)
            kept = r.stats["tokens_generated"] - r.stats["discarded_tokens"]
            assert chars <= kept <= chars + sum(n.finished for n in r.tree), (chars, kept)
    assert_pools_free(engine)


@pytest.mark.parametrize("name", ["particle_filter", "particle_gibbs+ancestors"])
def test_same_answers_whatever_the_admission_order(policy, alone, name):
    engine = engine_with(policy, (ANCESTOR_POOLS if "ancestors" in name else POOLS)["tight"])
    order = [3, 0, 4, 2, 1]
    results = engine.solve([{"problem": QUESTIONS[i], "key": i} for i in order], CONFIGS[name])
    assert [outcome(r) for r in results] == [alone[name][i] for i in order]
    assert sum(r.stats["preemptions"] for r in results) > 0
    assert_resampled(results)


@pytest.fixture(scope="module")
def prm_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prm")
    save_tiny_policy(folder, seed=3, initializer_range=0.2)  # weights large enough to spread the rewards
    return folder


@pytest.mark.parametrize("name", list(PRM_POOLS))
def test_same_answers_when_the_prm_pool_runs_short(policy, prm_checkpoint, monkeypatch, name):
    """Scoring that does not fit in the PRM's pool preempts the newest problem, which is later rebuilt
    from its tree on both pools: the texts, trees and weights are those of a roomy pool (to fp32 rounding:
    a model PRM's floats depend on which sequences share its forward)."""
    def engine(blocks):
        return Engine(policy=policy, prm=prm_checkpoint, prm_format=LONG_PRM_FORMAT,
                      kv_cache_memory=blocks * 2 * BLOCK_BYTES)  # a block of each pool

    roomy = engine(POOLS["roomy"]).solve(QUESTIONS, CONFIGS[name])
    short, score = [], Core.score

    def counted(self, batch, *args):
        try:
            return score(self, batch, *args)
        except OutOfBlocksError:
            short.append(len(batch.problems))
            raise

    monkeypatch.setattr(Core, "score", counted)
    tight_engine = engine(PRM_POOLS[name])
    tight = tight_engine.solve(QUESTIONS, CONFIGS[name])
    assert short, "the PRM's pool never ran short"
    assert sum(r.stats["preemptions"] for r in tight) >= len(short)
    for a, b in zip(tight, roomy, strict=True):
        assert (a.particles, a.leaves, a.answer) == (b.particles, b.leaves, b.answer)
        assert [shape(n) for n in a.tree] == [shape(n) for n in b.tree]
        np.testing.assert_allclose(a.weights, b.weights, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([(n.reward, n.weight, n.confidence or 0.0) for n in a.tree],
                                   [(n.reward, n.weight, n.confidence or 0.0) for n in b.tree], rtol=1e-5, atol=1e-7)
    assert_resampled(roomy)
    assert_pools_free(tight_engine)


def test_results_stream_as_problems_finish(policy):
    engine = engine_with(policy, POOLS["roomy"])
    config = SearchConfig(**SMALL | {"max_steps": 2})
    long_config_problem = "What is 2+2? " * 30  # a longer prompt, same work: order must come from finishing
    problems = [long_config_problem] + QUESTIONS[1:]
    streamed = list(engine.stream(problems, config))
    assert sorted(i for i, _ in streamed) == list(range(len(problems)))
    solved = engine.solve(problems, config, progress=(seen := []).append)
    assert seen == list(range(1, len(problems) + 1))
    assert [outcome(r) for r in solved] == [outcome(r) for _, r in sorted(streamed, key=lambda x: x[0])]
    assert [r.question for r in solved] == problems
    assert_resampled(solved)


def test_a_problem_that_cannot_fit_alone_says_how_much_it_needs(policy):
    engine = engine_with(policy, 6)
    with pytest.raises(OutOfBlocksError, match=r"problem 0 needs at least (\d+) KV blocks \(([\d.]+) KiB\)") as error:
        engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))
    found = re.search(r"needs at least (\d+) KV blocks \(([\d.]+) KiB\)", str(error.value))
    need = int(found[1])
    assert need > 6 and float(found[2]) == round(need * BLOCK_BYTES / 1024, 1)
    assert_pools_free(engine)


def test_keys_are_checked(policy):
    engine = engine_with(policy, POOLS["roomy"])
    with pytest.raises(ValueError, match="share a key"):
        engine.solve([{"problem": "a", "key": 1}, "b"], SearchConfig(**SMALL))
    with pytest.raises(ValueError, match=r"problem 0: key must be an int in \[0, 1048576\)"):
        engine.solve([{"problem": "a", "key": -1}], SearchConfig(**SMALL))
    with pytest.raises(ValueError, match=r"problem 1: seed must be an int in \[0, 2\*\*62\)"):
        engine.solve(["a", {"problem": "b", "seed": -3}], SearchConfig(**SMALL))


def test_a_problem_may_bring_its_own_seed(policy):
    """A dict's "seed" replaces the config's for that problem (a server's request: key 0, its own seed);
    one key under two seeds is two different problems."""
    from dataclasses import replace

    engine = engine_with(policy, POOLS["roomy"])
    config = CONFIGS["particle_filter"]
    together = engine.solve([{"problem": QUESTIONS[0], "key": 0, "seed": 5}, {"problem": QUESTIONS[1], "key": 0}],
                            config)
    assert outcome(together[0]) == outcome(engine.solve([QUESTIONS[0]], replace(config, seed=5))[0])
    assert outcome(together[1]) == outcome(engine.solve([QUESTIONS[1]], config)[0])
    assert_resampled(together)


# -- exception safety ------------------------------------------------------------------------

class Boom(Exception):
    pass


# (where, how many calls succeed first): every phase of the loop, preemption and the splice
PHASES = [
    (Core, "place", 2), (Core, "sample", 5), (Core, "feed", 7),
    (Core, "score", 2), (Core, "weigh", 2), (Core, "follow", 3),
    (ParticleGibbs, "splice", 1), (book, "commit", 3), (Scheduler, "_preempt", 1),
]


def token_pair_engine(policy):
    return Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-",
                  kv_cache_memory=ANCESTOR_POOLS["tight"] * 2 * BLOCK_BYTES)


@pytest.mark.parametrize("owner,phase,after,error", [p + (Boom,) for p in PHASES] + [
    (Core, "sample", 9, KeyboardInterrupt), (ParticleGibbs, "splice", 2, KeyboardInterrupt)],
    ids=[p[1] for p in PHASES] + ["sample-interrupted", "splice-interrupted"])
def test_a_failure_in_any_phase_leaves_every_pool_as_it_was(policy, monkeypatch, owner, phase, after, error):
    config = CONFIGS["particle_gibbs+ancestors"]
    engine = token_pair_engine(policy)  # a model PRM: two pools to keep clean
    original, calls = getattr(owner, phase), []

    def failing(*args, **kwargs):
        calls.append(phase)
        if len(calls) > after:
            raise error("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, phase, failing)
    with pytest.raises(error, match="injected"):
        engine.solve(QUESTIONS[:4], config)
    assert len(calls) > after, f"{phase} was never reached {after + 1} times"
    assert_pools_free(engine)
    monkeypatch.setattr(owner, phase, original)
    again = engine.solve(QUESTIONS[:2], config)
    assert [outcome(r) for r in again] == [outcome(r) for r in token_pair_engine(policy).solve(QUESTIONS[:2], config)]
    assert_resampled(again)


def test_a_raising_prm_callable_leaks_nothing(policy):
    def broken(question, steps):
        if len(steps) == 2:
            raise RuntimeError("verifier crashed")
        return 0.5

    engine = engine_with(policy, POOLS["roomy"], prm=broken)
    with pytest.raises(RuntimeError, match="verifier crashed"):
        engine.solve(QUESTIONS, SearchConfig(**SMALL))
    assert_pools_free(engine)


def test_closing_the_stream_early_frees_everything(policy):
    engine = engine_with(policy, POOLS["roomy"])
    # steps end at a frequent letter, so problems finish at different iterations
    config = SearchConfig(num_particles=2, max_steps=3, max_step_tokens=30, step_delimiter="e", stop_at_boxed=False)
    stream = engine.stream(QUESTIONS, config)
    next(stream)
    assert engine.policy.manager.num_seqs > 0  # the others are still running
    stream.close()
    assert_pools_free(engine)


def test_stats_count_each_problems_own_work(policy):
    engine = engine_with(policy, POOLS["roomy"])
    results = engine.solve(QUESTIONS, SearchConfig(**SMALL))
    for r in results:
        # every token drawn is a character of some step of the tree, or an EOS that ended one
        # (nothing was preempted and drawn twice here)
        chars = sum(len(n.text) for n in r.tree)
        assert chars <= r.stats["tokens_generated"] <= chars + sum(n.finished for n in r.tree)
        assert r.stats["preemptions"] == 0 and r.stats["recomputed_tokens"] == 0
    assert torch.tensor([r.stats["tokens_generated"] for r in results]).unique().numel() > 1


@pytest.mark.parametrize("prm", ["rule", "model"])
def test_the_admission_estimate_holds_what_placing_a_problem_takes(policy, prm_checkpoint, monkeypatch, prm):
    """``blocks_to_place`` is what admission waits for, on every pool: the blocks that placing (prefill,
    or rebuilding a preempted problem from its tree) really takes, and one block per particle for its
    next tokens. It overshoots by at most two blocks per shared node (a partly filled one, and one the
    rebuild held for a node's own sequence and gave back once the particles had forked it) and one for
    the prompt. A model PRM's pool is estimated with what its format adds to every step."""
    if prm == "rule":
        engine = engine_with(policy, POOLS["tight"])
    else:  # the PRM reads several blocks a step more than the policy writes: the format's share counts
        fmt = replace(LONG_PRM_FORMAT, step_suffix=" Is this step right? Answer with a plus or a minus:")
        engine = Engine(policy=policy, prm=prm_checkpoint, prm_format=fmt, kv_cache_memory=96 * 2 * BLOCK_BYTES)
    seen, place = [], Core.place

    def measured(self, problem):
        before, estimates = [m.num_free_blocks for m in self.managers], self.blocks_to_place(problem)
        place(self, problem)
        nodes = {n for slot in range(problem.num_particles) if not problem.finished[slot]
                 for n in problem.path(slot)}
        for manager, free, estimate in zip(self.managers, before, estimates, strict=True):
            seen.append((estimate, free - manager.num_free_blocks, len(nodes), bool(problem.tree)))

    monkeypatch.setattr(Core, "place", measured)
    engine.solve(QUESTIONS, CONFIGS["particle_filter"])
    assert any(rebuilt for *_, rebuilt in seen), "no problem was rebuilt after a preemption"
    assert len(seen) % len(engine.core.pools) == 0
    n = CONFIGS["particle_filter"].num_particles
    for estimate, used, nodes, _ in seen:
        assert used <= estimate - n <= used + 2 * nodes + 1, (estimate, used, nodes)


MIXED = {"particle_filter": CONFIGS["particle_filter"],
         "best_of_n seed 5": SearchConfig(algorithm="best_of_n", seed=5, **SMALL),
         "beam_search": CONFIGS["beam_search"],
         "particle_gibbs": CONFIGS["particle_gibbs"],
         "wide steps": SearchConfig(**(SMALL | dict(max_step_tokens=11, num_particles=3, temperature=1.3, top_k=5))),
         "self_consistency": CONFIGS["self_consistency"]}


@pytest.mark.parametrize("pool", ["roomy", "tight"])
def test_problems_of_different_searches_share_one_scheduler(policy, alone, pool):
    """A server's requests each bring their own search: run together in one scheduler, added while
    others run (those of one search sharing its policy object, so their rounds end in one fused call),
    each problem ends as it would alone."""
    engine = engine_with(policy, POOLS[pool])
    expected = {}
    for name, config in MIXED.items():
        expected[name] = [outcome(engine.solve([{"problem": q, "key": i}], config)[0]) for i, q in enumerate(QUESTIONS)]
    scheduler = Scheduler(engine.core, engine.bytes_per_block)
    policies = {name: engine.algorithm(config) for name, config in MIXED.items()}  # one per search
    jobs = [(name, i, engine.problem(q, i, i, policies[name])) for name in MIXED for i, q in enumerate(QUESTIONS)]
    late = jobs[len(jobs) // 2:]
    for _, _, problem in jobs[:len(jobs) // 2]:
        scheduler.add(problem)
    got, iterations = {}, 0
    while scheduler.waiting or scheduler.running or late:
        if iterations == 3:  # the rest join mid-flight
            for _, _, problem in late:
                scheduler.add(problem)
            late = []
        for problem in scheduler.iterate():
            got[id(problem)] = engine.result(problem)
        iterations += 1
    for name, i, problem in jobs:
        assert outcome(got[id(problem)]) == expected[name][i], (name, i)
    for name, config in MIXED.items():
        if config.algorithm in RESAMPLING:
            assert_resampled([got[id(problem)] for job, _, problem in jobs if job == name])
    assert len(engine.core.writer.rules) > 1
    if pool == "tight":
        assert scheduler.num_preemptions > 0
    assert_pools_free(engine)


def test_cancelling_gives_every_block_back_and_the_others_go_on(policy, alone):
    engine = engine_with(policy, POOLS["tight"])
    scheduler = Scheduler(engine.core, engine.bytes_per_block)
    policy_ = engine.algorithm(CONFIGS["particle_filter"])
    problems = [engine.problem({"problem": q, "key": i}, i, i, policy_) for i, q in enumerate(QUESTIONS)]
    for problem in problems:
        scheduler.add(problem)
    for _ in range(4):
        scheduler.iterate()
    running, waiting = scheduler.running[0], scheduler.waiting[-1]
    used = engine.policy.manager.num_blocks - engine.policy.manager.num_free_blocks
    scheduler.cancel(running)
    scheduler.cancel(waiting)
    assert engine.policy.manager.num_blocks - engine.policy.manager.num_free_blocks < used
    assert running.rows is None and running.lane == -1 and running not in scheduler.running
    finished = [p for p in scheduler.run()]
    assert {id(p) for p in finished} == {id(p) for p in problems} - {id(running), id(waiting)}
    results = [engine.result(p) for p in finished]
    for p, result in zip(finished, results, strict=True):
        assert outcome(result) == alone["particle_filter"][p.index]
    assert_resampled(results)
    assert_pools_free(engine)


def test_stop_strings_end_a_particle_before_the_string(policy):
    engine = engine_with(policy, POOLS["roomy"])
    plain = engine.solve(QUESTIONS[:3], CONFIGS["best_of_n"])
    stop = max(("a", "e", "o", " "), key=lambda s: sum(s in t for r in plain for t in r.particles))
    cut = engine.solve(QUESTIONS[:3], SearchConfig(algorithm="best_of_n", stop=[stop], **SMALL))
    for before, after in zip(plain, cut, strict=True):
        for text, short, reason in zip(before.particles, after.particles, after.finish_reasons, strict=True):
            assert stop not in short
            if stop in text:
                assert short == text[:text.index(stop)] and reason == "stop"
            else:
                assert short == text
    assert any(stop in t for r in plain for t in r.particles)


def test_a_stop_string_across_two_steps_is_cut_from_both(policy):
    engine = engine_with(policy, POOLS["roomy"])
    plain = engine.solve(QUESTIONS[:3], CONFIGS["best_of_n"])
    # a two-character stop whose first occurrence in some particle begins at the end of a step
    spans = {}
    for r in plain:
        for particle, text in enumerate(r.particles):
            ends = np.cumsum([len(t) for t in r.steps_of(particle)])[:-1]
            for end in ends.tolist():
                pair = text[end - 1:end + 1]
                if text.index(pair) == end - 1:
                    spans[pair] = spans.get(pair, 0) + 1
    assert spans, "no step boundary to put a stop string across"
    stop = max(spans, key=spans.get)
    cut = engine.solve(QUESTIONS[:3], SearchConfig(algorithm="best_of_n", stop=[stop], **SMALL))
    for before, after in zip(plain, cut, strict=True):
        for particle, (text, short) in enumerate(zip(before.particles, after.particles, strict=True)):
            assert short == (text[:text.index(stop)] if stop in text else text)
            assert "".join(after.steps_of(particle)) == short
            if stop in text:
                assert after.finish_reasons[particle] == "stop"
    trimmed = [node for r in cut for node in r.tree if node.trim]
    assert trimmed and all(node.trim == 1 and node.text == "" and node.finished for node in trimmed)


def test_prompts_as_raw_text_or_a_conversation(policy):
    engine = engine_with(policy, POOLS["roomy"])
    config = CONFIGS["particle_filter"]
    tokenizer = engine.core.tokenizer
    chat = engine.problem({"messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": QUESTIONS[0]}]}, 0, 0,
                          engine.algorithm(config))
    assert chat.question == QUESTIONS[0]
    assert chat.prompt_ids == engine.core.prompt_ids(QUESTIONS[0], "Be brief.")
    with_default = SearchConfig(**SMALL, system_prompt="Be brief.")  # a conversation without a system turn gets it
    chat = engine.problem({"messages": [{"role": "user", "content": QUESTIONS[0]}]}, 0, 0,
                          engine.algorithm(with_default))
    assert chat.prompt_ids == engine.core.prompt_ids(QUESTIONS[0], "Be brief.")
    raw = engine.problem({"prompt": "2+2="}, 0, 0, engine.algorithm(config))
    assert raw.prompt_ids == tokenizer.encode("2+2=", add_special_tokens=True) and raw.question == "2+2="
    [offline] = engine.solve([{"messages": [{"role": "user", "content": QUESTIONS[1]}]}], config)
    assert outcome(offline) == outcome(engine.solve([QUESTIONS[1]], config)[0])
    assert_resampled([offline])
    for messages, message in (([], "non-empty list"), ([{"role": "user"}], "string content"),
                              ([{"role": "assistant", "content": "hi"}], "no user turn")):
        with pytest.raises(ValueError, match=message):
            engine.solve([{"messages": messages}], config)


@pytest.mark.parametrize("name", ["particle_filter", "particle_gibbs+ancestors", "beam_search"])
def test_one_policy_object_serves_problems_of_differing_seeds(policy, name):
    """A server shares one policy object among requests that differ only in their seeds: their
    rounds end in one fused call, and each problem still ends as it does under its own config."""
    from dataclasses import replace

    engine = engine_with(policy, ANCESTOR_POOLS["roomy"])
    shared = engine.algorithm(CONFIGS[name])
    scheduler = Scheduler(engine.core, engine.bytes_per_block)
    problems = [engine.problem(q, i, i, shared, seed=10 + i) for i, q in enumerate(QUESTIONS)]
    for problem in problems:
        scheduler.add(problem)
    weighed = []
    real_weigh = engine.core.weigh
    engine.core.weigh = lambda batch, *args: weighed.append(len(batch.problems)) or real_weigh(batch, *args)
    finished = {id(p): engine.result(p) for p in scheduler.run()}
    engine.core.weigh = real_weigh
    assert max(weighed) > 1  # problems of different seeds weighed together
    for i, (q, problem) in enumerate(zip(QUESTIONS, problems, strict=True)):
        alone = engine.solve([{"problem": q, "key": i}], replace(CONFIGS[name], seed=10 + i))[0]
        assert outcome(finished[id(problem)]) == outcome(alone), i
    assert_resampled(finished.values())

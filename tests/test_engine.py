"""The engine end to end on tiny random models: every algorithm, the tree, memory pressure, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scripted import save_table_policy
from transformers import Qwen2Config, Qwen2Model

from pf_engine import Engine, OutOfBlocksError, SearchConfig
from pf_engine.answers import extract_answer, is_correct, weighted_vote
from pf_engine.prm_format import PRMFormat
from pf_engine.search.config import ALGORITHMS
from tiny import char_tokenizer, save_tiny_policy

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?"]
SMALL = dict(num_particles=4, beam_width=2, max_steps=4, max_step_tokens=6, max_new_tokens=20, stop_at_boxed=False)


def vowel_reward(question, steps):
    """Strongly prefers steps with vowels (weights 1 : 19 : 361 for none, one, two or more)."""
    return min(0.95, 0.05 + 0.45 * sum(ch in "aeiou" for ch in steps[-1]))



@pytest.fixture(scope="module")
def engine(policy):
    return Engine(policy=policy, prm=vowel_reward, kv_cache_memory=8 << 20)


def check_tree(result, num_particles):
    ids = [n.node for n in result.tree]
    assert ids == sorted(ids)
    by_id = {n.node: n for n in result.tree}
    for n in result.tree:
        assert n.parent == -1 or (n.parent in by_id and by_id[n.parent].depth == n.depth - 1)
    # every final particle's text is the concatenation of its ancestors' steps
    leaves = [n for n in result.tree if not any(c.parent == n.node for c in result.tree)]
    leaf_texts = {path_text_by_id(by_id, n.node) for n in leaves}
    for text in result.particles:
        assert text in leaf_texts
    assert len(result.particles) == len(result.weights) == len(result.leaves) == num_particles
    assert sum(result.weights) == pytest.approx(1.0, abs=1e-5)
    # leaves[i] is particle i's newest step: the path that ends there spells particle i's text
    childless = {n.node for n in leaves}
    for i, (leaf, text) in enumerate(zip(result.leaves, result.particles, strict=True)):
        assert leaf in childless and path_text_by_id(by_id, leaf) == text, (i, leaf, text)


def check_answer(result, vote: bool):
    """Result.answer is the chosen text's answer, or for a vote the weighted vote over every particle."""
    answers = [extract_answer(t) for t in result.particles]
    if vote:
        assert result.answer == weighted_vote(answers, result.weights)
    assert result.answer == extract_answer(result.text)  # a vote's winner is a particle's own answer


def check_generations(results, algorithm, num_particles, beam_width):
    """num_children counts how often a step was drawn as an ancestor: each resampling round draws one
    ancestor per particle, by the algorithm's rule.

    A batch's problems share the loop, so every problem resamples after each round but the last
    (rounds = deepest step + 1 in each sweep). A finished particle writes no more steps, so its last
    step is drawn again each round; the per-round checks hold in the rounds before any particle of
    the problem finished, where a round's ancestors are exactly that round's steps."""
    counts = []
    for iteration in sorted({n.iteration for r in results for n in r.tree}):
        trees = [[n for n in r.tree if n.iteration == iteration] for r in results]
        rounds = 1 + max(n.depth for tree in trees for n in tree)
        for tree in trees:
            assert sum(n.num_children for n in tree) == num_particles * (rounds - 1)
            for depth in range(rounds - 1):
                if any(n.finished and n.depth <= depth for n in tree):
                    break
                nodes = [n for n in tree if n.depth == depth]
                c = [n.num_children for n in nodes]
                counts += c
                assert len(nodes) == sum(c) == num_particles, (depth, c)
                if algorithm == "particle_filter":  # systematic: floor(N w) or ceil(N w) copies
                    for n in nodes:
                        expected = num_particles * n.weight
                        assert math.floor(expected - 1e-4) <= n.num_children <= math.ceil(expected + 1e-4), (
                            depth, [(m.num_children, m.weight) for m in nodes])
                elif algorithm in ("beam_search", "dvts"):  # the kept steps, beam_width copies each
                    assert set(c) <= {0, beam_width} and c.count(beam_width) == num_particles // beam_width
                    kept = [n.reward for n in nodes if n.num_children]
                    dropped = [n.reward for n in nodes if not n.num_children]
                    if algorithm == "beam_search":
                        assert min(kept) >= max(dropped), (kept, dropped)
                    else:  # each kept step beat the beam_width - 1 others of its subtree: such a pairing exists
                        pairs = zip(sorted(kept * (beam_width - 1)), sorted(dropped), strict=True)
                        assert all(k >= d for k, d in pairs), (kept, dropped)
    # a new generation was chosen: some steps died, some were copied
    assert counts and min(counts) == 0 and max(counts) > 1, counts


def path_text_by_id(by_id, node):
    parts = []
    while node >= 0:
        parts.append(by_id[node].text)
        node = by_id[node].parent
    return "".join(reversed(parts))


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_completes_with_a_consistent_tree(engine, algorithm):
    results = engine.solve(QUESTIONS, SearchConfig(algorithm=algorithm, **SMALL))
    assert [r.question for r in results] == QUESTIONS
    for r in results:
        check_tree(r, 4)
        check_answer(r, vote=algorithm == "self_consistency")
        assert r.text in r.particles and r.text == "".join(r.steps)
        assert r.stats["tokens_generated"] > 0
    if algorithm in ("particle_filter", "entropic_particle_filter", "particle_gibbs", "beam_search", "dvts"):
        check_generations(results, algorithm, 4, SMALL["beam_width"])
        assert all(n.reward is not None for r in results for n in r.tree)
    else:
        assert all(n.num_children == 0 for r in results for n in r.tree)  # nothing was resampled


def test_a_problem_too_big_for_the_cache_says_how_much_it_needs(policy):
    engine = Engine(policy=policy, prm=vowel_reward, kv_cache_memory=16 << 10)
    with pytest.raises(OutOfBlocksError, match=r"problem 0 needs at least \d+ KV blocks \([\d.]+ [KM]iB\)"):
        engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))


def test_final_answers(policy):
    # a rule PRM that loves steps with a digit; the vote groups equivalent boxed answers
    engine = Engine(policy=policy, prm=lambda q, s: 0.95 if any(c.isdigit() for c in s[-1]) else 0.05,
                    kv_cache_memory=8 << 20)
    for final in ("best", "sampled", "vote"):
        (result,) = engine.solve(QUESTIONS[:1], SearchConfig(final_answer=final, **SMALL))
        assert result.text in result.particles
        check_answer(result, vote=final == "vote")
    (best,) = engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))
    assert best.weights[best.particles.index(best.text)] == max(best.weights)


HALF = ["\\boxed{1/2}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}"]  # three spellings of one answer
THREE = "\\boxed{3}"


@pytest.fixture(scope="module")
def boxed_policy(tmp_path_factory):
    """Answers at once with one of four boxed tokens, each as likely: 3 or a spelling of 1/2."""
    folder = tmp_path_factory.mktemp("boxed")
    save_table_policy(folder, ["?", "\n", THREE, *HALF], {"\n": {t: 0.0 for t in [THREE, *HALF]}})
    return folder


VOTE = dict(num_particles=11, max_steps=1, max_step_tokens=1, max_new_tokens=1)  # 11: no tied vote


@pytest.mark.parametrize("algorithm", ["self_consistency", "best_of_n"])
def test_the_vote_groups_equivalent_answers(boxed_policy, algorithm):
    """Each particle answers 3 or 1/2 (spelled three ways). Self-consistency weighs particles the
    same, so 1/2 wins where its spellings together outnumber the 3s, even where 3 is the most
    frequent single string; best-of-n with a PRM that gives 3 odds 9 (and 1/2 odds 1) weighs each 3
    nine times, so 3 wins where 9 * (number of 3s) > (number of 1/2s)."""
    odds = 9 if algorithm == "best_of_n" else 1
    engine = Engine(policy=boxed_policy, prm=lambda q, steps: 0.9 if "{3}" in steps[-1] else 0.5,
                    kv_cache_memory=8 << 20)
    results = engine.solve(["?"] * 12, SearchConfig(algorithm=algorithm, final_answer="vote", **VOTE))
    decided_by = set()
    for r in results:
        answers = [extract_answer(t) for t in r.particles]
        threes = answers.count("3")
        assert threes + sum(map(answers.count, ("1/2", "0.5", "\\frac{1}{2}"))) == VOTE["num_particles"], answers
        halves = VOTE["num_particles"] - threes
        winner = "3" if odds * threes > halves else "1/2"
        assert is_correct(r.answer, winner), (r.answer, answers, r.weights)
        check_answer(r, vote=True)
        plurality = max(set(answers), key=answers.count)  # the most frequent single string
        if not is_correct(plurality, winner):
            decided_by.add("grouping")
        if (threes > halves) != (winner == "3"):
            decided_by.add("weights")
    # the check has teeth: some problem's winner is not the plurality string (or the unweighted winner)
    assert decided_by >= ({"grouping", "weights"} if odds > 1 else {"grouping"}), decided_by


SAMPLED_PROBLEMS = 600
SAMPLED_REWARDS = {THREE: 0.9, HALF[0]: 0.7}  # odds 9 and 7/3; the other two spellings 1
FALSE_FAILURE = 1e-6  # the chance that a correct sampler fails the test, at most


def bernstein_bound(p: np.ndarray, delta: float) -> float:
    """t such that a sum X of independent Bernoulli(p_i) has P(|X - sum p| >= t) <= delta (Bernstein)."""
    log_term, variance = math.log(2 / delta), float(np.sum(p * (1 - p)))
    return log_term / 3 + math.sqrt(log_term ** 2 / 9 + 2 * variance * log_term)


def test_a_sampled_final_answer_is_drawn_by_weight(boxed_policy):
    """final_answer="sampled" picks particle i with probability w_i: over many problems, each under
    a seed of its own, the number of picks of each answer, and of a highest-weight particle, is
    within a Bernstein bound of the sum of their weights, so it is neither the argmax nor uniform."""
    engine = Engine(policy=boxed_policy, prm=lambda q, steps: SAMPLED_REWARDS.get(steps[-1], 0.5),
                    kv_cache_memory=8 << 20)
    problems = [{"problem": "?", "key": i, "seed": i} for i in range(SAMPLED_PROBLEMS)]
    results = engine.solve(problems, SearchConfig(final_answer="sampled", **VOTE))
    kinds = [THREE, *HALF, "the highest weight"]
    probability, picked = np.zeros((len(kinds), len(results))), np.zeros((len(kinds), len(results)))
    for j, r in enumerate(results):
        weights = np.array(r.weights)
        top = weights == weights.max()
        for k, kind in enumerate(kinds):
            members = top if k == len(kinds) - 1 else np.array([text == kind for text in r.particles])
            probability[k, j], picked[k, j] = weights[members].sum(), members[r.chosen]
    assert len({r.chosen for r in results}) > 1 and probability[-1].max() < 1
    for kind, p, x in zip(kinds, probability, picked, strict=True):
        bound = bernstein_bound(p, FALSE_FAILURE / len(kinds))
        assert abs(x.sum() - p.sum()) < bound, f"{kind}: picked {x.sum():.0f} times, weighs {p.sum():.1f} ± {bound:.1f}"
    # the bound is tight enough to tell the draw from the argmax and from a uniform pick
    assert len(results) - probability[-1].sum() > bernstein_bound(probability[-1], FALSE_FAILURE)
    uniform = sum(r.particles.count(THREE) / len(r.particles) for r in results)
    assert probability[0].sum() - uniform > bernstein_bound(probability[0], FALSE_FAILURE)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_particles": 0}, "num_particles"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"scheme": "bootstrap"}, "unknown scheme"),
        ({"algorithm": "mcts"}, "unknown algorithm"),
        ({"final_answer": "longest"}, "unknown final_answer"),
        ({"max_step_tokens": 0}, "max_step_tokens"),
        ({"step_delimiter": ""}, "step_delimiter"),
        # JSON bodies bring any type: each field names its own
        ({"max_steps": "8"}, "max_steps must be an int, got '8'"),
        ({"num_particles": True}, "num_particles must be an int, got True"),
        ({"ess_threshold": "x"}, "ess_threshold must be a number or null"),
        ({"stop_at_boxed": 1}, "stop_at_boxed must be true or false"),
        ({"stop": "\n"}, "stop must be a list of strings"),
        ({"stop": [""]}, "stop must be a list of non-empty strings"),
        ({"seed": 2.5}, "seed must be an int"),
    ],
)
def test_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_bad_problems_and_paths(engine, tmp_path):
    for problems, error, message in (
        ([""], ValueError, "problem 0 is empty"),
        ([{"answer": "4"}], ValueError, "none of the fields 'problem', 'question'"),
        ([42], TypeError, "must be a string or a dict"),
    ):
        with pytest.raises(error, match=message):
            engine.solve(problems, SearchConfig(**SMALL))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Engine(policy=tmp_path / "missing", prm=vowel_reward)
    with pytest.raises(TypeError, match="prm must be None, a callable or a checkpoint path"):
        Engine(policy=tmp_path / "missing", prm=3)


def test_searches_that_need_a_prm_refuse_to_run_without_one(policy):
    engine = Engine(policy=policy, kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="particle_filter needs a PRM"):
        engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))
    (result,) = engine.solve(QUESTIONS[:1], SearchConfig(algorithm="self_consistency", **SMALL))
    assert result.weights == [0.25] * 4


def save_tiny_class_prm(folder, value_head: bool = False):
    """A random Qwen2 trunk with Qwen2.5-Math-PRM's 2-class head, or Skywork-o1-Open-PRM's value head."""
    tokenizer = char_tokenizer()
    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    trunk = Qwen2Model(config)
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    name, arch = ("score", "Qwen2ForProcessRewardModel")
    if value_head:
        head, name, arch = torch.nn.Linear(32, 1), "v_head.summary", "Qwen2ForPrmModel"
    weights = {f"model.{k}": v for k, v in trunk.state_dict().items()}
    weights |= {f"{name}.{k}": v for k, v in head.state_dict().items()}
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config_dict = config.to_dict() | {"architectures": [arch]}
    (folder / "config.json").write_text(json.dumps(config_dict))
    tokenizer.save_pretrained(folder)


def test_model_prms_score_incrementally(policy, tmp_path, monkeypatch):
    save_tiny_class_prm(tmp_path / "class_prm")
    class_engine = Engine(policy=policy, prm=tmp_path / "class_prm", prm_separator="?", kv_cache_memory=8 << 20)
    token_engine = Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-",
                          kv_cache_memory=8 << 20)
    save_tiny_class_prm(tmp_path / "value_prm", value_head=True)
    value_engine = Engine(policy=policy, prm=tmp_path / "value_prm", prm_format=PRMFormat(chat_template=False,
                          marker="?"), kv_cache_memory=8 << 20)
    assert value_engine.core.prm.reward_kind == "reward"
    for engine in (class_engine, token_engine, value_engine):
        core = engine.core
        fed = []  # tokens of every forward the PRM ran

        def counted(seq_ids, new_tokens, forward=core.prm.runner.forward, fed=fed):
            fed.append(sum(map(len, new_tokens)))
            return forward(seq_ids, new_tokens)

        monkeypatch.setattr(core.prm.runner, "forward", counted)
        results = engine.solve(QUESTIONS[:2], SearchConfig(**SMALL))
        # each step's tokens reached the PRM once: the prompt, then every step of the tree and its marker
        for q, r in zip(QUESTIONS[:2], results, strict=True):
            check_tree(r, 4)
            rewards = [n.reward for n in r.tree]
            assert all(0 < x < 1 for x in rewards) and len(set(rewards)) > 1
            prompt = len(core.prm_prompt_ids(q))
            steps = sum(len(core.prm.tokenizer.encode(n.text, add_special_tokens=False)) + 1 for n in r.tree)
            assert r.stats["prm_tokens"] == prompt + steps, (r.stats["prm_tokens"], prompt, steps)
        assert sum(r.stats["prm_tokens"] for r in results) == sum(fed)
        prm_manager = core.prm.runner.manager
        assert prm_manager.num_free_blocks == prm_manager.num_blocks


# how the PRM sees the steps: the chat prompt and a tag after each step (the defaults), or plain text
# with different text before the first and later steps (as Math-Shepherd's format has)
PRM_FORMATS = [None, PRMFormat(chat_template=False, question_suffix=" Q:", first_step_prefix=" ", step_prefix="\n",
                               marker="=", good="+", bad="-")]


@pytest.mark.parametrize("fmt", PRM_FORMATS, ids=["tag", "plain-text-format"])
def test_prm_sequences_follow_the_policys_resampling(policy, tmp_path, fmt):
    """Every step's reward is the PRM's reading of that step's own path: a fresh forward over the
    prompt, each step of the path and its tag. A PRM sequence that kept another particle's path
    after resampling, or held a step twice, would read other tokens. (The PRM has large random
    weights, so its reading depends on the whole path, not only on the newest step.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prm = tmp_path / "prm"
    save_tiny_policy(prm, seed=3, initializer_range=0.5)
    tag_args = {"prm_step_tag": "=", "prm_good": "+", "prm_bad": "-"} if fmt is None else {"prm_format": fmt}
    engine = Engine(policy=policy, prm=prm, **tag_args, kv_cache_memory=8 << 20)
    results = engine.solve(QUESTIONS[:2], SearchConfig(**SMALL | {"num_particles": 6}))
    fmt = engine.core.prm.fmt
    hf = AutoModelForCausalLM.from_pretrained(prm, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(prm)
    tag, good, bad = (tokenizer.encode(t, add_special_tokens=False)[0] for t in "=+-")
    for question, r in zip(QUESTIONS[:2], results, strict=True):
        by_id = {n.node: n for n in r.tree}
        prompt = engine.core.prm_prompt_ids(question)
        for n in r.tree:
            path, node = [], n.node
            while node >= 0:
                path.append(by_id[node].text)
                node = by_id[node].parent
            steps = [fmt.step_ids(tokenizer, k, text) + [tag] for k, text in enumerate(reversed(path))]
            ids = prompt + [t for step in steps for t in step]
            with torch.no_grad():
                logits = hf(torch.tensor([ids])).logits[0, -1]
            expected = torch.sigmoid(logits[good] - logits[bad]).item()
            assert n.reward == pytest.approx(expected, abs=1e-4), (n.node, n.depth, path)
    # the check has teeth: unfinished steps were copied to other slots before their particles wrote on (a
    # finished particle's last step is carried into every later round, so its count of children is no sign)
    assert any(n.num_children > 1 and not n.finished for r in results for n in r.tree)


def test_prm_marker_must_be_one_token(policy, tmp_path):
    save_tiny_class_prm(tmp_path / "class_prm")
    with pytest.raises(ValueError, match=r"prm_separator '<extra_0>' is \d+ tokens for the PRM's tokenizer"):
        Engine(policy=policy, prm=tmp_path / "class_prm", kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="needs prm_format= \\(a preset\\) or prm_step_tag, prm_good and prm_bad"):
        Engine(policy=policy, prm=policy, kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="the PRM format's marker 'ки' is \\d+ tokens"):
        Engine(policy=policy, prm=policy, prm_format="math-shepherd", kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="unknown PRM format 'shepherd'; presets: qwen2.5-math-prm, math-shepherd"):
        Engine(policy=policy, prm=policy, prm_format="shepherd", kv_cache_memory=8 << 20)


def test_beam_search_and_dvts_keep_the_best():
    from pf_engine.search import top_ancestors

    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8, 0.6])  # two problems of four particles
    # beam search: the best two of each problem, each twice
    assert top_ancestors(scores, group=4, beam_width=2) == [1, 1, 3, 3, 6, 6, 7, 7]
    # dvts: subtrees of two particles, the best of each subtree twice
    assert top_ancestors(scores, group=2, beam_width=2) == [1, 1, 3, 3, 5, 5, 6, 6]
    with pytest.raises(ValueError, match="multiple of beam_width"):
        SearchConfig(algorithm="beam_search", num_particles=6, beam_width=4)


def test_splice_equals_scoring_the_spliced_paths_from_scratch(policy):
    """Ancestor sampling's inputs: the LM likelihood of a reference's future after each candidate
    prefix, and a model PRM's output at each spliced step, against fresh full computations."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from pf_engine import book
    from pf_engine.sampling import filtered_logits
    from pf_engine.search.particle_gibbs import ParticleGibbs
    from pf_engine.state import Problem

    engine = Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-", kv_cache_memory=8 << 20)
    core, config = engine.core, SearchConfig(**SMALL, temperature=0.7)
    # one round of three particles by hand: place, decode a step ending at "e", score it
    core.begin()
    problem = Problem(index=0, key=0, question=QUESTIONS[0], num_particles=3,
                      prompt_ids=core.prompt_ids(QUESTIONS[0]), prm_prompt_ids=core.prm_prompt_ids(QUESTIONS[0]),
                      rules=replace(config.step_rules(), max_step_tokens=4, delimiter="e"))
    core.place(problem)
    core.begin_round(problem)
    while core.table.writing.any():
        rows = np.flatnonzero(core.table.writing)
        tokens, feed, _ = core.sample(rows)
        core.feed(rows[feed], tokens[feed])
    batch = core.end_round([problem])
    core.score(batch, config.weighting)  # the PRM's sequences hold the first steps
    book.commit(problem, core.table, batch.steps[0])
    assert not problem.finished.any()
    tok = core.tokenizer
    future_texts = ["ab e", "c1"]
    future = [tok.encode(t, add_special_tokens=False) for t in future_texts]
    free = [manager.num_free_blocks for manager in core.managers]
    gibbs = ParticleGibbs(config)
    loglik, prm_outputs = gibbs.splice(core, [problem] * 3, [0, 1, 2], [future] * 3, [future_texts] * 3)
    assert [manager.num_free_blocks for manager in core.managers] == free

    hf = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    prompt, tag = core.prompt_ids(QUESTIONS[0]), core.prm.marker_id
    flat = [t for step in future for t in step]
    for i in range(3):
        ids = prompt + problem.step_ids(i)[0] + flat
        with torch.no_grad():
            logits = hf(torch.tensor([ids[:-1]])).logits[0, -len(flat):]
        logp = torch.log_softmax(filtered_logits(logits, config.sampling), dim=-1)
        assert loglik[i].item() == pytest.approx(logp.gather(1, torch.tensor(flat)[:, None]).sum().item(), abs=1e-3)
        # the PRM read: prompt, each step and its tag; spliced steps after the particle's own
        prm_steps = [core.prm.tokenizer.encode(s, add_special_tokens=False)
                     for s in [problem.steps(i)[0]] + future_texts]
        for k in range(len(future)):
            tokens = [t for s in prm_steps[:k + 2] for t in s + [tag]][:-1]
            seq = core.prm.runner.manager.allocate(0)
            core.prm.runner.forward([seq], [core.prm_prompt_ids(QUESTIONS[0])])
            expected = core.prm.score_ids([seq], [tokens])[0]
            core.prm.runner.manager.free(seq)
            torch.testing.assert_close(prm_outputs[k][i], expected, atol=1e-4, rtol=1e-4)
    assert len(set(loglik.tolist())) > 1, "the candidates' prefixes do not differ: the check would be weak"
    core.evict(problem)
    assert engine.policy.manager.num_seqs == core.prm.runner.manager.num_seqs == 0


def test_an_outcome_model_ranks_best_of_n_and_picks_the_final_answer(policy, tmp_path):
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    tokenizer = char_tokenizer()
    torch.manual_seed(4)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "orm")
    tokenizer.save_pretrained(tmp_path / "orm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "orm").eval()
    engine = Engine(policy=policy, orm=tmp_path / "orm", kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="particle_filter needs a PRM"):
        engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))
    results = engine.solve(QUESTIONS[:2], SearchConfig(**SMALL | {"algorithm": "best_of_n"}))
    for question, r in zip(QUESTIONS[:2], results, strict=True):
        expected = []
        for text in r.particles:  # no chat template: the question, a newline, the answer
            ids = tokenizer.encode(question + "\n", add_special_tokens=True) + tokenizer.encode(
                text, add_special_tokens=False)
            with torch.no_grad():
                expected.append(hf(torch.tensor([ids])).logits[0, 0].item())
        assert r.outcome_scores == pytest.approx(expected, abs=2e-5)
        assert r.chosen == int(np.argmax(expected)) and len(set(r.outcome_scores)) > 1
    for runner in (engine.policy, engine.orm.runner):
        assert runner.manager.num_free_blocks == runner.manager.num_blocks
    with pytest.raises(ValueError, match="final_answer 'outcome' needs an outcome reward model"):
        Engine(policy=policy, prm=lambda q, steps: 0.5, kv_cache_memory=8 << 20).solve(
            QUESTIONS[:1], SearchConfig(**SMALL | {"final_answer": "outcome"}))


def test_entropic_particle_filtering_at_a_constant_temperature_of_one_is_particle_filtering(policy):
    """The base schedule with annealing_max_temperature 1 anneals every round at T = 1: the texts,
    weights, answers and trees are particle filtering's, and the tree records T = 1 for every round."""
    from conftest import assert_resampled, varying_reward

    engine = Engine(policy=policy, prm=varying_reward, kv_cache_memory=8 << 20)
    pf = engine.solve(QUESTIONS, SearchConfig(**SMALL))
    epf = engine.solve(QUESTIONS, SearchConfig(algorithm="entropic_particle_filter", annealing="base",
                                               annealing_max_temperature=1.0, annealing_threshold=1.0,
                                               annealing_phase=1.0, **SMALL))
    assert_resampled(pf)
    for a, b in zip(epf, pf, strict=True):
        assert (a.particles, a.weights, a.answer, a.chosen) == (b.particles, b.weights, b.answer, b.chosen)
        assert [(n.text, n.parent, n.reward, n.weight, n.num_children) for n in a.tree] == \
            [(n.text, n.parent, n.reward, n.weight, n.num_children) for n in b.tree]
        assert {n.temperature for n in a.tree} == {1.0} and {n.temperature for n in b.tree} == {None}

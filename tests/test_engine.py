"""The engine end to end on tiny random models: every algorithm, the tree, memory pressure, bad input."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import char_tokenizer, save_tiny_policy
from transformers import Qwen2Config, Qwen2Model

from pf_engine import Engine, OutOfBlocksError, SearchConfig
from pf_engine.search.config import ALGORITHMS

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?"]
SMALL = dict(num_particles=4, beam_width=2, max_steps=4, max_step_tokens=6, max_new_tokens=20, stop_at_boxed=False)


def vowel_reward(question, steps):
    return min(1.0, 0.1 + 0.2 * sum(ch in "aeiou" for ch in steps[-1]))


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("policy")
    save_tiny_policy(folder)
    return folder


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
    assert len(result.particles) == len(result.weights) == num_particles
    assert sum(result.weights) == pytest.approx(1.0, abs=1e-5)


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
        assert r.text in r.particles and r.text == "".join(r.steps)
        assert r.stats["tokens_generated"] > 0
    inner = [n for r in results for n in r.tree if any(c.parent == n.node for c in r.tree)]
    if algorithm in ("particle_filter", "particle_gibbs", "beam_search", "dvts"):
        # a new generation was chosen: some steps died, some were copied
        assert {n.num_children for r in results for n in r.tree} - {1}
        assert all(n.reward is not None for r in results for n in r.tree)
    else:
        assert all(n.num_children == 0 for n in inner)  # nothing was resampled


def test_results_do_not_depend_on_batching(policy):
    config = SearchConfig(**SMALL, seed=3)
    roomy = Engine(policy=policy, prm=vowel_reward, kv_cache_memory=8 << 20).solve(QUESTIONS, config)
    tight_engine = Engine(policy=policy, prm=vowel_reward, kv_cache_memory=96 << 10)
    tight = tight_engine.solve(QUESTIONS, config)
    assert [r.stats["problems_in_batch"] for r in tight] == [1, 1, 1]
    assert [r.stats["problems_in_batch"] for r in roomy] == [3, 3, 3]
    for a, b in zip(roomy, tight):
        assert a.particles == b.particles and a.weights == pytest.approx(b.weights)
    assert tight_engine.policy.manager.num_free_blocks == tight_engine.policy.manager.num_blocks


def test_a_problem_too_big_for_the_cache_says_how_much_it_needs(policy):
    engine = Engine(policy=policy, prm=vowel_reward, kv_cache_memory=16 << 10)
    with pytest.raises(OutOfBlocksError, match=r"problem 0 needs \d+ KV blocks \([\d.]+ MiB\)"):
        engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))


def test_final_answers(policy):
    # a rule PRM that loves steps with a digit; the vote groups equivalent boxed answers
    engine = Engine(policy=policy, prm=lambda q, s: 0.95 if any(c.isdigit() for c in s[-1]) else 0.05,
                    kv_cache_memory=8 << 20)
    for final in ("best", "sampled", "vote"):
        (result,) = engine.solve(QUESTIONS[:1], SearchConfig(final_answer=final, **SMALL))
        assert result.text in result.particles
    (best,) = engine.solve(QUESTIONS[:1], SearchConfig(**SMALL))
    assert best.weights[best.particles.index(best.text)] == max(best.weights)


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
    ],
)
def test_config_validates_itself(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_bad_problems_and_paths(engine, tmp_path):
    for problems, error, message in (
        ([""], ValueError, "problem 0 is empty"),
        ([{"answer": "4"}], ValueError, "neither a 'problem' nor a 'question'"),
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


def save_tiny_class_prm(folder):
    tokenizer = char_tokenizer()
    torch.manual_seed(5)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    trunk = Qwen2Model(config)
    head = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    weights = {f"model.{k}": v for k, v in trunk.state_dict().items()} | {f"score.{k}": v for k, v in head.state_dict().items()}
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config.to_dict() | {"architectures": ["Qwen2ForProcessRewardModel"]}))
    tokenizer.save_pretrained(folder)


def test_model_prms_score_incrementally(policy, tmp_path):
    save_tiny_class_prm(tmp_path / "class_prm")
    class_engine = Engine(policy=policy, prm=tmp_path / "class_prm", prm_separator="?", kv_cache_memory=8 << 20)
    token_engine = Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-",
                          kv_cache_memory=8 << 20)
    for engine in (class_engine, token_engine):
        results = engine.solve(QUESTIONS[:2], SearchConfig(**SMALL))
        for r in results:
            check_tree(r, 4)
            rewards = [n.reward for n in r.tree]
            assert all(0 < x < 1 for x in rewards) and len(set(rewards)) > 1
            # each step's tokens reached the PRM once: prompt + steps + one marker per step
            assert r.stats["prm_tokens"] > 0
        prm_manager = engine.core.prm.runner.manager
        assert prm_manager.num_free_blocks == prm_manager.num_blocks


def test_prm_marker_must_be_one_token(policy, tmp_path):
    save_tiny_class_prm(tmp_path / "class_prm")
    with pytest.raises(ValueError, match=r"prm_separator '<extra_0>' is \d+ tokens for the PRM's tokenizer"):
        Engine(policy=policy, prm=tmp_path / "class_prm", kv_cache_memory=8 << 20)
    with pytest.raises(ValueError, match="needs prm_step_tag, prm_good and prm_bad"):
        Engine(policy=policy, prm=policy, kv_cache_memory=8 << 20)


def test_backtracking_examples_come_from_dead_branches(engine):
    from pf_engine.backtrack import PHRASE, backtracking_examples

    (result,) = engine.solve(QUESTIONS[:1], SearchConfig(**SMALL | {"num_particles": 6}))
    nodes = {n.node: n for n in result.tree}
    examples = backtracking_examples(result)
    assert examples, "a particle filter over 6 particles left no dead branch"
    for example in examples:
        dead = nodes[example["dead_step"]]
        assert dead.num_children == 0 and dead.node not in result.leaves
        assert not any(n.parent == dead.node for n in result.tree)
        before, after = example["completion"].split(PHRASE)
        assert before.endswith(dead.text) and result.text.endswith(after) and after
        assert example["prompt"] == result.question
    assert backtracking_examples(result, gold="no such answer") == []
    (independent,) = engine.solve(QUESTIONS[:1], SearchConfig(algorithm="best_of_n", **SMALL))
    assert backtracking_examples(independent) == []  # nothing died: every particle reached the end


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
    from transformers import AutoModelForCausalLM

    from pf_engine.sampling import filtered_logits

    engine = Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-", kv_cache_memory=8 << 20)
    core, config = engine.core, SearchConfig(**SMALL, temperature=0.7)
    particles = core.start(QUESTIONS[:1], 3)
    core.expand(particles, [0], 0, config.sampling, 0, "e", 4, 20, False)
    core.score(QUESTIONS[:1], particles, particles)  # the PRM's sequences hold the first steps
    tok = core.tokenizer
    future_texts = ["ab e", "c1"]
    future = [tok.encode(t, add_special_tokens=False) for t in future_texts]
    free = (engine.policy.manager.num_free_blocks, core.prm_runner.manager.num_free_blocks)
    loglik, prm_outputs = core.splice(QUESTIONS[:1], particles, [future] * 3, [future_texts] * 3, config.sampling)
    assert (engine.policy.manager.num_free_blocks, core.prm_runner.manager.num_free_blocks) == free

    hf = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    prompt, tag = core.prompt_ids(QUESTIONS[0]), core.prm.marker_id
    flat = [t for step in future for t in step]
    for i, p in enumerate(particles):
        ids = prompt + p.step_ids[0] + flat
        with torch.no_grad():
            logits = hf(torch.tensor([ids[:-1]])).logits[0, -len(flat):]
        logp = torch.log_softmax(filtered_logits(logits, config.sampling), dim=-1)
        assert loglik[i].item() == pytest.approx(logp.gather(1, torch.tensor(flat)[:, None]).sum().item(), abs=1e-3)
        # the PRM read: prompt, each step and its tag; spliced steps after the particle's own
        prm_steps = [core.prm_tokenizer.encode(s, add_special_tokens=False) for s in [p.steps[0]] + future_texts]
        for k in range(len(future)):
            tokens = [t for s in prm_steps[:k + 2] for t in s + [tag]][:-1]
            seq = core.prm_runner.manager.allocate(0)
            core.prm_runner.forward([seq], [core.prm_prompt_ids(QUESTIONS[0])])
            expected = core.prm.score([seq], [tokens])[0]
            core.prm_runner.manager.free(seq)
            torch.testing.assert_close(prm_outputs[k][i], expected, atol=1e-4, rtol=1e-4)
    assert len(set(loglik.tolist())) > 1, "the candidates' prefixes do not differ: the check would be weak"
    core.release(particles)

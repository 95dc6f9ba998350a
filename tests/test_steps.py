"""How particles write steps, on scripted policies (tests/scripted.py) whose tokens are known in
advance: a \\boxed{} answer split across steps, a delimiter inside a token, and max_new_tokens for
every algorithm, dead branches and replayed references included."""

import pytest
from scripted import save_chain_policy, save_table_policy

from pf_engine import Engine, SearchConfig
from pf_engine.search.config import ALGORITHMS

BOXED = ["a", "\\boxed{", "4", "2", "}", "b", "c"]


@pytest.fixture(scope="module")
def boxed_policy(tmp_path_factory):
    """Writes a\\boxed{42}bcbcbc... and never stops by itself."""
    folder = tmp_path_factory.mktemp("boxed")
    save_chain_policy(folder, BOXED, then="b")
    return folder


def solve_alone(folder, **config):
    """Two particles on the question "?" with no PRM: both write the same scripted text."""
    engine = Engine(policy=folder, kv_cache_memory=4 << 20)
    (result,) = engine.solve(["?"], SearchConfig(algorithm="self_consistency", num_particles=2, **config))
    assert result.particles[0] == result.particles[1]
    return result


@pytest.mark.parametrize(
    "cap,steps",
    [
        (8, ["a\\boxed{42}"]),
        (3, ["a\\boxed{4", "2}"]),  # opened in one step, closed in the next
        (2, ["a\\boxed{", "42", "}"]),  # the closing brace alone
        (1, ["a", "\\boxed{", "4", "2", "}"]),
    ],
)
def test_a_boxed_answer_finishes_the_particle_when_it_completes(boxed_policy, cap, steps):
    result = solve_alone(boxed_policy, max_steps=10, max_step_tokens=cap, max_new_tokens=40)
    assert result.steps == steps, f"max_step_tokens={cap}: {result.steps}"
    assert result.answer == "42"
    # the step that closes the box finishes the particle, no step before it does
    assert len(result.tree) == 2 * len(steps)
    assert all(n.finished == (n.depth == len(steps) - 1) for n in result.tree), [
        (n.depth, n.text, n.finished) for n in result.tree]


def test_without_stop_at_boxed_the_particle_writes_on(boxed_policy):
    result = solve_alone(boxed_policy, max_steps=10, max_step_tokens=8, max_new_tokens=12, stop_at_boxed=False)
    assert result.steps == ["a\\boxed{42}bcb", "cbcb"]  # 12 tokens


@pytest.mark.parametrize(
    "chain,steps",
    [
        (["x", "y", "\n\nThe", "z", "w"], ["xy\n\nThe", "zw"]),  # the delimiter and more text in one token
        (["x", "p\n", "\nq", "z"], ["xp\n\nq", "z"]),  # the delimiter split across two tokens
        (["x", "\n\n", "z"], ["x\n\n", "z"]),
        (["\n\nA\n\nB", "z"], ["\n\nA\n\nB", "z"]),  # twice in one token: one step
    ],
)
def test_a_step_ends_with_the_token_that_completes_the_delimiter(tmp_path, chain, steps):
    save_chain_policy(tmp_path, chain)  # then EOS
    result = solve_alone(tmp_path, max_steps=10, max_step_tokens=10, max_new_tokens=40)
    assert result.steps == steps
    assert all(n.finished == (n.depth == len(steps) - 1) for n in result.tree)


@pytest.mark.parametrize("max_new_tokens,steps", [(7, ["abc", "bcb", "c"]), (6, ["abc", "bcb"]), (1, ["a"])])
def test_max_new_tokens_is_exact(tmp_path, max_new_tokens, steps):
    save_chain_policy(tmp_path, ["a", "b", "c"], then="b")  # abcbcbc... forever
    result = solve_alone(tmp_path, max_steps=10, max_step_tokens=3, max_new_tokens=max_new_tokens)
    assert result.steps == steps


ALPHABET = ["a", "e", "b", " ", "c"]
QUESTION = "abc eba cab?"  # 13 prompt tokens with the newline: 4 blocks of 4, the last one partly filled


@pytest.fixture(scope="module")
def babbler(tmp_path_factory):
    """Draws every token uniformly from ALPHABET (one character each) and never writes EOS, so a
    text's length is its number of tokens."""
    folder = tmp_path_factory.mktemp("babbler")
    save_table_policy(folder, ["?", "\n", *ALPHABET], {x: {y: 0.0 for y in ALPHABET} for x in ["\n", *ALPHABET]})
    return folder


def a_reward(question, steps):
    return min(0.95, 0.05 + 0.3 * steps[-1].count("a"))


SEARCHES = [dict(algorithm=a) for a in ALGORITHMS] + [dict(algorithm="particle_gibbs", ancestor_sampling=True)]
SEARCH_IDS = list(ALGORITHMS) + ["particle_gibbs-ancestor_sampling"]


def path_text(result, node):
    by_id = {n.node: n for n in result.tree}
    parts = []
    while node >= 0:
        parts.append(by_id[node].text)
        node = by_id[node].parent
    return "".join(reversed(parts))


@pytest.mark.parametrize("search", SEARCHES, ids=SEARCH_IDS)
def test_no_particle_holds_more_than_max_new_tokens(babbler, search):
    """Every step of every particle, dead or alive (replayed and spliced references included), ends
    a path of at most max_new_tokens tokens; with no EOS and steps enough, the final particles have
    exactly max_new_tokens."""
    engine = Engine(policy=babbler, prm=a_reward, kv_cache_memory=8 << 20)
    config = SearchConfig(num_particles=4, beam_width=2, iterations=3, max_steps=13, max_step_tokens=4,
                          max_new_tokens=13, step_delimiter="e", stop_at_boxed=False, **search)
    for r in engine.solve([QUESTION] * 4, config):
        assert [len(t) for t in r.particles] == [13] * 4, r.particles
        too_long = [(n.node, path_text(r, n.node)) for n in r.tree if len(path_text(r, n.node)) > 13]
        assert not too_long, too_long

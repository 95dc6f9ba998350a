"""A search algorithm defined here, outside pf_engine, runs end to end once registered: the
"adding an algorithm" recipe of the README, with nothing else touched."""

import numpy as np
import pytest
from conftest import varying_reward

from pf_engine import Engine, SearchConfig
from pf_engine.search import ALGORITHMS, Algorithm, register

N = 6


class KeepTopHalf(Algorithm):
    """After every step, the better half of a problem's particles by weight, each taken twice."""

    @classmethod
    def check(cls, config):
        if config.num_particles % 2:
            raise ValueError("keep_top_half needs an even num_particles")

    def select(self, engine, batch, out):
        n = self.config.num_particles
        weights = out.weights.cpu().numpy()
        chosen = []
        for b, done in enumerate(batch.done):
            if done:
                chosen.append(None)
                continue
            best = np.argsort(-weights[b * n:(b + 1) * n], kind="stable")[:n // 2]
            chosen.append(np.repeat(np.sort(best), 2))
        return chosen


@pytest.fixture
def registered():
    register("keep_top_half", KeepTopHalf)
    yield
    del ALGORITHMS["keep_top_half"]


def test_a_registered_algorithm_runs_end_to_end(policy, registered):
    engine = Engine(policy=policy, prm=varying_reward, kv_cache_memory=8 << 20)
    config = SearchConfig(algorithm="keep_top_half", num_particles=N, max_steps=4, max_step_tokens=6,
                          max_new_tokens=24, stop_at_boxed=False)
    results = engine.solve(["What is 2+2?", "Add 3 and 4."], config)
    chose = 0
    for result in results:
        rounds = {}
        for node in result.tree:
            rounds.setdefault(node.depth, []).append(node)
        for depth, nodes in rounds.items():
            if depth == max(rounds):  # the last round keeps its particles
                continue
            by_weight = sorted(nodes, key=lambda node: -node.weight)
            kept = {node.node for node in nodes if node.num_children and not node.finished}
            # every step that was carried on is among the better half of its round (finished particles,
            # whose newest step is older, may hold some of the better half's places)
            assert kept <= {node.node for node in by_weight[:N // 2]}, (depth, kept)
            assert all(node.num_children in (0, 2) for node in nodes if not node.finished)
            chose += len(kept)
    assert chose > 0
    assert len({w for r in results for n in r.tree for w in [n.weight]}) > 2, "the weights were uniform"


def test_a_registered_algorithm_is_checked_by_search_config(registered):
    with pytest.raises(ValueError, match="keep_top_half needs an even num_particles"):
        SearchConfig(algorithm="keep_top_half", num_particles=3)
    assert SearchConfig(algorithm="keep_top_half", num_particles=4).algorithm == "keep_top_half"


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match="unknown algorithm 'keep_top_half'; choose one of particle_filter"):
        SearchConfig(algorithm="keep_top_half")
    with pytest.raises(ValueError, match="already registered"):
        register("particle_filter", KeepTopHalf)

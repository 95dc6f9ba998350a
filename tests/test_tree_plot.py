"""Search-tree pictures: the layout's categories against the tree, and a drawn PNG for a particle
Gibbs tree with dead branches and replayed reference steps."""

import json

import pytest

from pf_engine import Engine, SearchConfig
from pf_engine.cli import main
from pf_engine.tree_plot import tree_layout

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def gibbs_result(policy):
    engine = Engine(policy=policy, prm=lambda q, steps: (len(steps[-1]) % 7 + 1) / 8, kv_cache_memory=8 << 20)
    config = SearchConfig(algorithm="particle_gibbs", num_particles=6, iterations=2, max_steps=4, max_step_tokens=5,
                          max_new_tokens=20, stop_at_boxed=False)
    return engine.solve(["What is 2+2?"], config)[0]


def test_the_layout_follows_the_tree(gibbs_result):
    r = gibbs_result
    records = r.tree_records()
    by_id = {n["node"]: n for n in records}
    layout = tree_layout(records)
    assert layout.sweeps == [0, 1]
    last = [n for n in records if n["iteration"] == 1]
    # the last sweep: alive exactly when some final particle descends from it
    descendants = {n["node"]: set() for n in records}
    for n in records:
        node = n["node"]
        while by_id[node]["parent"] >= 0:
            node = by_id[node]["parent"]
            descendants[node].add(n["node"])
    for n in last:
        assert (n["node"] in layout.alive) == (n["node"] in r.leaves or bool(descendants[n["node"]] & set(r.leaves)))
    assert any(n["node"] not in layout.alive for n in last), "the check needs a dead branch"
    # the chosen path runs from a first step to the chosen leaf, one node per step
    chosen = sorted(layout.chosen, key=lambda n: by_id[n]["depth"])
    assert [by_id[n]["depth"] for n in chosen] == list(range(len(chosen))) and chosen[-1] == r.leaves[r.chosen]
    # a column holds each node once, at distinct ranks, and a node sits in its step's column
    for n in records:
        assert layout.x[n["node"]] == n["depth"]
    for sweep in (0, 1):
        for depth in {n["depth"] for n in records}:
            ranks = [layout.y[n["node"]] for n in records if n["iteration"] == sweep and n["depth"] == depth]
            assert sorted(ranks) == list(range(len(ranks)))
    assert any(n["reference"] for n in last), "particle Gibbs' second sweep replays a reference"


def test_plot_tree_and_the_tree_command_write_pictures(gibbs_result, tmp_path, capsys):
    picture = tmp_path / "tree.png"
    gibbs_result.plot_tree(picture)
    assert picture.read_bytes()[:8] == PNG and picture.stat().st_size > 10_000
    tree_file = tmp_path / "tree.jsonl"
    tree_file.write_text("".join(json.dumps({"problem_index": 0} | n) + "\n" for n in gibbs_result.tree_records()))
    out = tmp_path / "from_file.png"
    assert main(["tree", str(tree_file), "--problem", "0", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG and f"wrote {out}" in capsys.readouterr().out
    assert main(["tree", str(tree_file), "--problem", "3", "--out", str(tmp_path / "none.png")]) == 2
    assert "holds no nodes of problem 3" in capsys.readouterr().err
    assert not (tmp_path / "none.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["from_file.png", "tree.jsonl", "tree.png"]  # no leftovers


def test_write_tree_is_whole_or_nothing(gibbs_result, tmp_path, monkeypatch):
    """A tree file is written whole or not at all: a write that fails part-way (here the disk fills after the
    first record) leaves the file as it was and nothing beside it."""
    path = tmp_path / "tree.jsonl"
    gibbs_result.write_tree(path)
    before = path.read_bytes()
    assert before.decode().splitlines() == [json.dumps(r) for r in gibbs_result.tree_records()]

    first = gibbs_result.tree_records()[0]

    def records_then_a_full_disk():
        yield first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(gibbs_result), "tree_records", lambda self: records_then_a_full_disk())
    with pytest.raises(OSError, match="No space left"):
        gibbs_result.write_tree(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["tree.jsonl"]

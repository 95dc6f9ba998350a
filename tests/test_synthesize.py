"""pf_engine.synthesize: reasoning datasets from search trees, rebuilt from the nodes they name,
verified where they must be, the same for the same seed, readable by `datasets`, and refusing bad
input before anything is written."""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from pf_engine import Engine, SearchConfig
from pf_engine.answers import extract_answer, is_correct
from pf_engine.cli import main
from pf_engine.scheduler import Scheduler
from pf_engine.synthesize import SynthesisConfig, but_wait_search, rebuild, synthesize

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?", "Name a color."]
# the tiny policy's vocabulary has no ":"; steps end at "e", which the wait phrase must not hold
SEARCH = SearchConfig(num_particles=8, max_steps=4, max_step_tokens=12, max_new_tokens=30, stop_at_boxed=False,
                      step_delimiter="e")
CONFIG = SynthesisConfig(search=SEARCH, num_wrong=2, max_per_problem=3, wait_phrase=" Bu wait,")
SAMPLES = replace(SEARCH, algorithm="self_consistency")
RUNS = {"verified": SAMPLES, "stitch": SAMPLES, "backtrack": replace(SEARCH, algorithm="particle_filter"),
        "but-wait": but_wait_search(CONFIG)}


def vowel_reward(question, steps):
    return min(1.0, 0.1 + 0.2 * sum(ch in "aeiou" for ch in steps[-1]))


@pytest.fixture(scope="module")
def engine(policy):
    return Engine(policy=policy, prm=vowel_reward)


@pytest.fixture(scope="module")
def problems(engine):
    """Gold answers the tiny policy reaches in some samples and misses in others: each problem's
    most frequent answer among the particle filter's final particles."""
    results = engine.solve(QUESTIONS, RUNS["backtrack"])
    golds = [Counter(a for a in map(extract_answer, r.particles) if a).most_common(1)[0][0] for r in results]
    return [{"problem": q, "answer": g} for q, g in zip(QUESTIONS, golds, strict=True)]


@pytest.fixture(scope="module")
def made(engine, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    return out, synthesize(engine, problems, out, CONFIG)


def test_every_dataset_has_records_that_rebuild_from_their_tree_nodes(engine, problems, made):
    _, records = made
    runs = {name: engine.solve(problems, config) for name, config in RUNS.items()}
    for name, rows in records.items():
        assert rows, f"{name}: no records; the checks below would be empty"
        for row in rows:
            meta = row["meta"]
            result = runs[name][meta["problem"]]
            assert row["messages"][0] == {"role": "user", "content": problems[meta["problem"]]["problem"]}
            assert rebuild(meta, result, CONFIG) == row["messages"][1]["content"]
            assert meta["nodes"] == [p for p in meta["pieces"] if isinstance(p, int)]
            assert meta["algorithm"] == RUNS[name].algorithm and meta["seed"] == SEARCH.seed


def test_no_verified_stitched_or_backtracked_record_ends_in_a_rejected_answer(problems, made):
    _, records = made
    for name in ("verified", "stitch", "backtrack"):
        for row in records[name]:
            text, gold = row["messages"][1]["content"], problems[row["meta"]["problem"]]["answer"]
            solution = text.split(CONFIG.markers[1])[-1]
            assert is_correct(extract_answer(solution), gold) and is_correct(extract_answer(text), gold), (name, text)
            assert row["meta"]["verified"] is True


def test_stitched_wrong_attempts_are_wrong(engine, problems, made):
    _, records = made
    runs = engine.solve(problems, RUNS["stitch"])
    assert any(row["meta"]["num_wrong"] == 2 for row in records["stitch"])
    for row in records["stitch"]:
        meta, pieces = row["meta"], row["meta"]["pieces"]
        cuts = [i for i, p in enumerate(pieces) if p == "transition"]
        assert len(cuts) == meta["num_wrong"]
        for start, end in zip([0] + [c + 1 for c in cuts[:-1]], cuts, strict=True):
            answer = extract_answer("".join(runs[meta["problem"]].tree[n].text for n in pieces[start:end]))
            assert answer is not None and not is_correct(answer, problems[meta["problem"]]["answer"])


def test_backtracks_are_dead_siblings_of_the_surviving_path(engine, problems, made):
    _, records = made
    runs = engine.solve(problems, RUNS["backtrack"])
    for row in records["backtrack"]:
        tree = runs[row["meta"]["problem"]].tree
        finals = {n for leaf in runs[row["meta"]["problem"]].leaves for n in path_of(tree, leaf)}
        pieces = row["meta"]["pieces"]
        for i in [i for i, p in enumerate(pieces) if p == "transition"]:
            branch = []
            j = i - 1
            while j >= 0 and isinstance(pieces[j], int) and pieces[j] not in finals:
                branch.insert(0, pieces[j])
                j -= 1
            kept = next(p for p in pieces[i:] if isinstance(p, int))  # the path goes on from the branch's parent
            assert branch and tree[branch[0]].parent == tree[kept].parent and kept in finals
            assert all(tree[b].parent == a for a, b in zip(branch, branch[1:], strict=False))  # its own continuation
            assert not any(n.parent == branch[-1] for n in tree)  # to where it died


def path_of(tree, leaf):
    path = []
    while leaf >= 0:
        path.append(leaf)
        leaf = tree[leaf].parent
    return path


def test_budget_forced_texts_hold_the_wait_phrase_and_no_suppressed_end(engine, problems, made):
    _, records = made
    for row in records["but-wait"]:
        assert row["messages"][1]["content"].count(CONFIG.wait_phrase) == CONFIG.num_waits == row["meta"]["num_waits"]
    # in the engine's own token ids: an EOS stands only at the very end of a finished particle's path
    scheduler = Scheduler(engine.core, engine.bytes_per_block)
    policy = engine.selection_policy(RUNS["but-wait"])
    for i, p in enumerate(problems):
        scheduler.add(engine.problem(p, i, i, policy))
    eos = engine.core.eos_ids
    waits = 0
    for problem in scheduler.run():
        for node in problem.tree:
            has_child = any(n.parent == node.node for n in problem.tree)
            assert not (has_child and eos & set(problem.node_tokens[node.node])), node
            waits += node.forced == "wait"
            if node.forced == "wait":
                assert node.text.startswith(CONFIG.wait_phrase) and not eos & set(problem.node_tokens[node.parent])
    assert waits > 0


def test_the_same_seed_gives_the_same_datasets(engine, problems, made, tmp_path):
    out, _ = made
    synthesize(engine, problems, tmp_path, CONFIG)
    for name in CONFIG.datasets:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes()


def test_the_output_loads_with_datasets(made):
    import datasets

    out, records = made
    for name, rows in records.items():
        loaded = datasets.load_dataset("json", data_files=str(out / f"{name}.jsonl"), split="train")
        assert len(loaded) == len(rows)
        assert loaded[0]["messages"] == rows[0]["messages"]
        assert [m["role"] for m in loaded[0]["messages"]] == ["user", "assistant"]


def write(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize("case,message", [
    ("no gold", 'problem 1 has no gold "answer"'),
    ("empty", "holds no problems"),
    ("unknown dataset", "unknown dataset 'wait-but'"),
    ("unwritable", "cannot write in the output folder"),
    ("missing folder", "the output folder does not exist"),
])
def test_bad_input_is_refused_before_anything_is_written(policy, tmp_path, capsys, case, message):
    second = {"problem": "2+2"} if case == "no gold" else {"problem": "2+2", "answer": "4"}
    problems = write(tmp_path / "p.jsonl", [{"problem": "1+1", "answer": "2"}, second])
    if case == "empty":
        (tmp_path / "p.jsonl").write_text("\n")
    out = tmp_path / "out"
    out.mkdir()
    out_dir = {"unwritable": "/proc", "missing folder": str(tmp_path / "nowhere")}.get(case, str(out))
    datasets = ["verified", "wait-but"] if case == "unknown dataset" else ["verified"]
    code = main(["synthesize", "--problems", problems, "--out-dir", out_dir, "--policy", str(policy),
                 "--verifier", "arithmetic", "--datasets", *datasets])
    assert code == 2 and message in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_the_command_writes_every_dataset_and_a_summary(policy, problems, tmp_path, capsys):
    code = main(["synthesize", "--problems", write(tmp_path / "p.jsonl", problems), "--out-dir", str(tmp_path),
                 "--policy", str(policy), "--verifier", "arithmetic", "--particles", "4", "--max-steps", "3",
                 "--max-step-tokens", "12", "--max-new-tokens", "24", "--datasets", "verified", "stitch",
                 "backtrack", "but-wait", "--wait-phrase", " Bu wait,", "--markers", "thought"])
    shown = capsys.readouterr().out
    assert code == 0
    for name in ("verified", "stitch", "backtrack", "but-wait"):
        assert f"{name}.jsonl" in shown
        lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
        assert all(json.loads(line)["messages"][1]["content"].startswith("<|thought|>\n") for line in lines)
    np.testing.assert_equal(sorted(p.name for p in tmp_path.glob("*.jsonl")),
                            sorted(["p.jsonl", "verified.jsonl", "stitch.jsonl", "backtrack.jsonl", "but-wait.jsonl"]))


def test_the_datasets_are_written_all_or_none(tmp_path):
    from pf_engine.files import write_all_atomically

    def failing():
        yield "one line"
        raise OSError("disk full")

    (tmp_path / "verified.jsonl").write_text("old\n")
    with pytest.raises(OSError, match="disk full"):
        write_all_atomically({tmp_path / "verified.jsonl": ["new"], tmp_path / "stitch.jsonl": failing()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["verified.jsonl"]  # no part files, nothing new
    assert (tmp_path / "verified.jsonl").read_text() == "old\n"
    write_all_atomically({tmp_path / "verified.jsonl": ["new"], tmp_path / "stitch.jsonl": ["s"]})
    assert (tmp_path / "verified.jsonl").read_text() == "new\n" and (tmp_path / "stitch.jsonl").read_text() == "s\n"

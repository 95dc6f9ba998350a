"""pf_engine.synthesize: reasoning datasets from search trees. Each record is checked against the tree of
the search it came from, read from ``Result.tree_records()`` (the searches run again through
``Engine.solve`` with synthesize's configs and seeds), not through synthesize's own helpers; then the
records per problem, deduplication, verification, the same output for the same seed, the files
`datasets` reads, and bad input refused before anything is written."""

import json
from collections import Counter
from dataclasses import replace

import pytest
from conftest import VARYING_VERIFIER, varying_reward

from pf_engine import Engine, SearchConfig
from pf_engine.answers import extract_answer, is_correct
from pf_engine.cli import main
from pf_engine.scheduler import Scheduler
from pf_engine.synthesize import DATASETS, MARKERS, SynthesisConfig, but_wait_search, synthesize

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?", "Name a color."]
# the tiny policy's vocabulary has no ":"; steps end at "e", which the wait phrase must not hold
SEARCH = SearchConfig(num_particles=12, max_steps=5, max_step_tokens=10, max_new_tokens=36, stop_at_boxed=False,
                      step_delimiter="e")
CONFIG = SynthesisConfig(search=SEARCH, num_wrong=4, max_per_problem=2, wait_phrase=" Bu wait,")
# the same searches without dedup or a cap that binds (every eligible particle's record), one wrong attempt or
# dead branch a record, the other markers
REPEATS = replace(CONFIG, dedup=False, max_per_problem=SEARCH.num_particles, num_wrong=1, markers=MARKERS["thought"])
SAMPLES = replace(SEARCH, algorithm="self_consistency")
RUNS = {"verified": SAMPLES, "stitch": SAMPLES, "backtrack": replace(SEARCH, algorithm="particle_filter"),
        "but-wait": but_wait_search(CONFIG)}


@pytest.fixture(scope="module")
def engine(policy):
    return Engine(policy=policy, prm=varying_reward)


@pytest.fixture(scope="module")
def problems(engine):
    """Gold answers the tiny policy reaches in some samples and misses in others: each problem's
    most frequent answer among the independent samples' and the particle filter's final particles."""
    results = [engine.solve(QUESTIONS, RUNS[name]) for name in ("verified", "backtrack")]
    golds = [Counter(a for r in rs for a in map(extract_answer, r.particles) if a).most_common(1)[0][0]
             for rs in zip(*results, strict=True)]
    return [{"problem": q, "answer": g} for q, g in zip(QUESTIONS, golds, strict=True)]


@pytest.fixture(scope="module")
def runs(engine, problems):
    return solve(engine, problems, CONFIG)


def write_datasets(engine, problems, out, config):
    synthesize(engine, problems, out, config)
    return {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
            for name in config.datasets}


@pytest.fixture(scope="module")
def made(engine, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("datasets")
    return out, write_datasets(engine, problems, out, CONFIG)


@pytest.fixture(scope="module")
def made_without_dedup(engine, problems, tmp_path_factory):
    out = tmp_path_factory.mktemp("repeats")
    return out, write_datasets(engine, problems, out, REPEATS)


# -- the oracle: a search tree as Result.tree_records() gives it ---------------------------------
class Tree:
    def __init__(self, result):
        self.nodes = {r["node"]: r for r in result.tree_records()}
        self.children: dict[int, list[int]] = {}
        for r in self.nodes.values():
            self.children.setdefault(r["parent"], []).append(r["node"])
        assert {n for n, r in self.nodes.items() if r["final"]} == set(result.leaves)
        self.finals = [self.path(leaf) for leaf in result.leaves]  # each final particle's, in particle order
        self.alive = {n for path in self.finals for n in path}

    def path(self, node: int) -> list[int]:
        path = []
        while node >= 0:
            path.insert(0, node)
            node = self.nodes[node]["parent"]
        return path

    def texts(self, path: list[int]) -> list[str]:
        """The steps' texts, less the start of a stop string that ends in the last one (its ``trim``)."""
        texts, trim = [self.nodes[n]["text"] for n in path], self.nodes[path[-1]]["trim"]
        for i in range(len(texts) - 2, -1, -1):
            cut = min(trim, len(texts[i]))
            texts[i], trim = texts[i][:len(texts[i]) - cut], trim - cut
        return texts

    def answer(self, path: list[int]) -> str | None:
        return extract_answer("".join(self.texts(path)))

    def verified(self, path: list[int], gold) -> bool:
        """The gold answer, standing in the last step (the solution) too."""
        return is_correct(self.answer(path), gold) and is_correct(extract_answer(self.texts(path)[-1]), gold)

    def dead_sibling_depths(self, path: list[int]) -> list[int]:
        """The depths where a step off the same parent as the path's has no final particle descending from it."""
        parents = [-1] + path[:-1]
        return [d for d, parent in enumerate(parents) if any(c not in self.alive for c in self.children[parent])]


def think(steps: list[str], config: SynthesisConfig) -> str:
    """The thought closed before the last step, which holds the answer."""
    return config.markers[0] + "".join(steps[:-1]) + config.markers[1] + steps[-1]


def eligible(name: str, tree: Tree, gold, config: SynthesisConfig) -> list[list[int]]:
    """The final particles' paths a record of dataset ``name`` may end in, in the order records keep them."""
    verified = [p for p in tree.finals if tree.verified(p, gold)]
    if name == "verified":
        return verified
    if name == "stitch":
        return verified if any(tree.answer(p) is not None and not is_correct(tree.answer(p), gold)
                               for p in tree.finals) else []
    if name == "backtrack":
        return [p for p in verified if tree.dead_sibling_depths(p)]
    waited = [p for p in tree.finals if tree.nodes[p[-1]]["finished"]
              and sum(tree.nodes[n]["forced"] == "wait" for n in p) == config.num_waits]
    return sorted(waited, key=lambda p: not is_correct(tree.answer(p), gold))  # those with the gold answer first


def check_verified(meta: dict, tree: Tree, gold, config: SynthesisConfig) -> tuple[list[int], str]:
    """A verified final particle's steps: returns its path and the text the record must hold."""
    path = tree.path(meta["nodes"][-1])
    assert meta["nodes"] == path and tree.nodes[path[-1]]["final"] and tree.verified(path, gold)
    return path, think(tree.texts(path), config)


def check_stitch(meta: dict, tree: Tree, gold, config: SynthesisConfig) -> tuple[list[int], str]:
    """Wrong final particles' texts, each followed by the transition, then a verified one."""
    cuts = [i for i, n in enumerate(meta["nodes"]) if tree.nodes[n]["parent"] == -1] + [len(meta["nodes"])]
    attempts = [meta["nodes"][a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    *wrong, path = attempts
    num_wrong = sum(tree.answer(p) is not None and not is_correct(tree.answer(p), gold) for p in tree.finals)
    assert len(wrong) == meta["num_wrong"] == min(config.num_wrong, num_wrong)
    assert len({tuple(w) for w in wrong}) == len(wrong), "the same wrong attempt twice"
    for w in wrong:
        assert w == tree.path(w[-1]) and tree.nodes[w[-1]]["final"]
        assert tree.answer(w) is not None and not is_correct(tree.answer(w), gold)
    _, solution = check_verified({"nodes": path}, tree, gold, config)
    shown = "".join("".join(tree.texts(w)) + config.transition for w in wrong)
    return path, config.markers[0] + shown + solution.removeprefix(config.markers[0])


def check_backtrack(meta: dict, tree: Tree, gold, config: SynthesisConfig) -> tuple[list[int], str]:
    """A verified final particle's steps with dead branches inserted where its path has dead siblings, the
    earliest depths first and at most ``num_wrong``: each branch a step off the same parent as the path's
    next one, followed through its own continuation to where it died, then the transition."""
    path = tree.path(meta["nodes"][-1])
    assert [n for n in meta["nodes"] if n in tree.alive] == path and tree.verified(path, gold)
    steps, pieces, branch, depths = tree.texts(path), [], [], []
    for n in meta["nodes"]:
        if n not in tree.alive:
            branch.append(n)
            continue
        if branch:
            head, end = tree.nodes[branch[0]], branch[-1]
            assert head["parent"] == tree.nodes[n]["parent"] and tree.path(end)[head["depth"]:] == branch
            assert not tree.children.get(end), "the branch stops before it died"
            pieces.append("".join(tree.texts(tree.path(end))[head["depth"]:]) + config.transition)
            depths.append(head["depth"])
            branch = []
        pieces.append(steps[tree.nodes[n]["depth"]])
    assert depths == tree.dead_sibling_depths(path)[:config.num_wrong] and meta["num_backtracks"] == len(depths)
    return path, config.markers[0] + "".join(pieces[:-1]) + config.markers[1] + pieces[-1]


def check_but_wait(meta: dict, tree: Tree, gold, config: SynthesisConfig) -> tuple[list[int], str]:
    """A finished final particle whose first ``num_waits`` ends became the wait phrase."""
    path = tree.path(meta["nodes"][-1])
    assert meta["nodes"] == path and tree.nodes[path[-1]]["final"] and tree.nodes[path[-1]]["finished"]
    waits = [n for n in path if tree.nodes[n]["forced"] == "wait"]
    assert len(waits) == meta["num_waits"] == config.num_waits
    assert all(tree.nodes[n]["text"].startswith(config.wait_phrase) for n in waits)
    assert meta["verified"] == is_correct(tree.answer(path), gold)
    return path, think(tree.texts(path), config)


CHECKS = {"verified": check_verified, "stitch": check_stitch, "backtrack": check_backtrack,
          "but-wait": check_but_wait}


def solve(engine, problems, config: SynthesisConfig) -> dict:
    """Each dataset's search, run through Engine.solve as synthesize runs it: the trees its records name."""
    samples = engine.solve(problems, replace(config.search, algorithm="self_consistency"))
    return {"verified": samples, "stitch": samples,
            "backtrack": engine.solve(problems, replace(config.search, algorithm="particle_filter")),
            "but-wait": engine.solve(problems, but_wait_search(config))}


def check_against_trees(records: dict, runs: dict, problems: list[dict], config: SynthesisConfig) -> tuple:
    """Asserts each record's text is its recipe read from its search's tree, and which final particles have
    records; returns the datasets' counts of problems where max_per_problem bound and where texts repeat."""
    cap, capped, repeated = config.max_per_problem, Counter(), Counter()
    for name in config.datasets:
        assert records[name], f"{name}: no records; the checks below would be empty"
        for index, (problem, result) in enumerate(zip(problems, runs[name], strict=True)):
            tree, gold = Tree(result), problem["answer"]
            rows = [row for row in records[name] if row["meta"]["problem"] == index]
            ends, texts = [], []
            for row in rows:
                meta = row["meta"]
                assert row["messages"][0] == {"role": "user", "content": problem["problem"]}
                assert meta["algorithm"] == RUNS[name].algorithm and meta["seed"] == config.search.seed
                path, text = CHECKS[name](meta, tree, gold, config)
                assert row["messages"][1] == {"role": "assistant", "content": text}, (name, index, meta)
                ends.append(path)
                texts.append(text)
            paths = eligible(name, tree, gold, config)
            distinct = len({think(tree.texts(p), config) for p in paths})
            assert len(rows) <= min(cap, len(paths)) and all(p in paths for p in ends), (name, index)
            capped[name] += len(rows) == cap < len(paths)
            repeated[name] += len(set(texts)) < len(texts)
            if not config.dedup:  # every eligible particle's, in order, up to the cap
                assert ends == paths[:cap], (name, index)
            elif name in ("verified", "but-wait"):  # one per distinct text
                assert len(rows) == min(cap, distinct), (name, index)
            else:  # stitched texts differ where their verified samples' do; a backtrack where one can be
                assert len(rows) >= (min(cap, distinct) if name == "stitch" else min(1, len(paths))), (name, index)
    return capped, repeated


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no dedup"])
def test_each_record_is_its_recipe_read_from_the_search_tree(problems, runs, made, made_without_dedup, dedup):
    (_, records), config = (made, CONFIG) if dedup else (made_without_dedup, REPEATS)
    capped, repeated = check_against_trees(records, runs, problems, config)
    if dedup:
        assert all(capped[name] for name in DATASETS), f"max_per_problem bound in no problem of some dataset: {capped}"
        assert not sum(repeated.values()), f"records of one problem share a text: {repeated}"
    else:
        assert sum(repeated.values()), "no text repeats without dedup: a run that skipped it would pass"


def test_a_record_leaves_out_the_start_of_a_stop_string_as_the_particles_text_does(engine, problems, tmp_path):
    """A stop string may begin in the step before the one it ends in: that step's node keeps its whole text,
    and ``trim`` says how much of it Result.text leaves out; so does a record."""
    search = replace(SEARCH, stop=tuple("e" + c for c in "abcdefghijklmnop"))  # from a step's end "e" on
    config = replace(REPEATS, search=search)
    records, runs = write_datasets(engine, problems, tmp_path, config), solve(engine, problems, config)
    trimmed = [name for name, rows in records.items() for row in rows
               if any(runs[name][row["meta"]["problem"]].tree[n].trim for n in row["meta"]["nodes"])]
    assert trimmed, "no record holds a step a stop string ends in"
    check_against_trees(records, runs, problems, config)


def test_no_verified_stitched_or_backtracked_record_ends_in_a_rejected_answer(problems, made):
    _, records = made
    for name in ("verified", "stitch", "backtrack"):
        for row in records[name]:
            text, gold = row["messages"][1]["content"], problems[row["meta"]["problem"]]["answer"]
            solution = text.split(CONFIG.markers[1])[-1]
            assert is_correct(extract_answer(solution), gold) and is_correct(extract_answer(text), gold), (name, text)
            assert row["meta"]["verified"] is True


def test_budget_forced_texts_hold_the_wait_phrase_and_no_suppressed_end(engine, problems, made):
    _, records = made
    for row in records["but-wait"]:
        assert row["messages"][1]["content"].count(CONFIG.wait_phrase) == CONFIG.num_waits == row["meta"]["num_waits"]
    # in the engine's own token ids: an EOS stands only at the very end of a finished particle's path
    scheduler = Scheduler(engine.core, engine.bytes_per_block)
    policy = engine.algorithm(RUNS["but-wait"])
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


def test_the_command_writes_what_synthesize_writes_and_a_summary(policy, problems, made_without_dedup, tmp_path,
                                                                 capsys):
    """The search flags, --per-problem, --no-dedup, --wrong-attempts, --wait-phrase and --markers reach synthesize:
    the files are the API's for REPEATS, byte for byte."""
    expected, records = made_without_dedup
    out = tmp_path / "out"
    out.mkdir()
    code = main(["synthesize", "--problems", write(tmp_path / "p.jsonl", problems), "--out-dir", str(out),
                 "--policy", str(policy), "--verifier", VARYING_VERIFIER, "--particles", str(SEARCH.num_particles),
                 "--max-steps", str(SEARCH.max_steps), "--max-step-tokens", str(SEARCH.max_step_tokens),
                 "--max-new-tokens", str(SEARCH.max_new_tokens), "--no-stop-at-boxed", "--step-delimiter", "e",
                 "--per-problem", str(REPEATS.max_per_problem), "--no-dedup", "--wrong-attempts", "1",
                 "--wait-phrase", REPEATS.wait_phrase, "--markers", "thought"])
    shown = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.jsonl" for name in DATASETS)
    for name in DATASETS:
        assert f"{name}.jsonl" in shown and records[name]
        assert (out / f"{name}.jsonl").read_bytes() == (expected / f"{name}.jsonl").read_bytes(), name


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

"""Reasoning data from search, the method's authors' recipe: D-verified, D-stitch, D-backtrack and
D-but-wait.

Each dataset is a JSONL of chat records that TRL's SFTTrainer and
``datasets.load_dataset("json", ...)`` read as they are::

    {"messages": [{"role": "user", "content": QUESTION},
                  {"role": "assistant", "content": "<think>\\n" THOUGHT "\\n</think>\\n\\n" SOLUTION}],
     "meta": {"problem": 3, "algorithm": "particle_filter", "seed": 0, "pieces": [4, 9, "transition", 7, "end"],
              "nodes": [4, 9, 7], "verified": true, "num_wrong": 0, "num_backtracks": 1}}

``pieces`` rebuilds the assistant text exactly: the opening marker, then each tree node's
text or phrase in order ("transition"; "end" closes the thought), the solution being the
nodes after "end". The datasets, all from searches run here:

- verified: N independent samples per problem; each whose answer matches the gold one,
  its steps as the thought and its last step as the solution.
- stitch: wrong samples' texts (an answer that is not the gold one), each followed by the
  transition phrase, then a verified sample.
- backtrack: from particle-filtering trees, each verified final particle's path with dead
  sibling branches (steps off the same parent that no final particle descends from, with
  their own continuations up to where they died) inserted at the depths where it has
  some, each followed by the transition phrase, before the path goes on.
- but-wait: particle filtering under budget forcing (s1; the authors' "Gibbs with But wait"):
  a particle's first ``num_waits`` ends do not stand, the wait phrase follows and it
  reasons on. Each final particle that ended after exactly ``num_waits`` wait phrases;
  ``meta.verified`` says whether its answer is the gold one (not required here).
"""

import json
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from pf_engine.answers import extract_answer, is_correct
from pf_engine.api import Engine, Result
from pf_engine.files import write_all_atomically
from pf_engine.search import SearchConfig
from pf_engine.state import BudgetForcing, path_texts, path_to

DATASETS = ("verified", "stitch", "backtrack", "but-wait")
MARKERS = {"think": ("<think>\n", "\n</think>\n\n"), "thought": ("<|thought|>\n", "\n<|/thought|>\n\n")}
TRANSITION = "\n\nHold on! I made a mistake. Let me try again.\n\n"


@dataclass(frozen=True)
class SynthesisConfig:
    """What to build and how. ``search`` is the particle filter's config (its ``num_particles``
    is also the number of independent samples for verified and stitch)."""

    datasets: tuple[str, ...] = DATASETS
    search: SearchConfig = SearchConfig()
    markers: tuple[str, str] = MARKERS["think"]
    transition: str = TRANSITION
    num_wrong: int = 1  # stitch: wrong attempts per record; backtrack: backtracks per record (at most)
    max_per_problem: int = 4  # records per problem and dataset
    dedup: bool = True  # one record per distinct assistant text of a problem
    wait_phrase: str = " But wait,"
    num_waits: int = 1  # but-wait: wait phrases per record

    def __post_init__(self):
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown or not self.datasets:
            raise ValueError(f"unknown dataset {unknown[0]!r}; choose from {', '.join(DATASETS)}" if unknown
                             else "datasets: name at least one")
        if len(self.markers) != 2 or not all(isinstance(m, str) for m in self.markers):
            raise ValueError(f"markers must be an (opening, closing) pair of strings, got {self.markers!r}")
        for name in ("num_wrong", "max_per_problem", "num_waits"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")


def synthesize(engine: Engine, problems: list[dict], out_dir, config: SynthesisConfig,
               progress=None) -> dict[str, list[dict]]:
    """Run the searches the datasets need over ``problems`` (dicts with "problem" or "question" and
    "answer"), write ``OUT/<dataset>.jsonl`` for each (all of them whole, or none) and return the records."""
    out_dir = Path(out_dir)
    check_inputs(problems, out_dir)
    search = config.search
    samples = replace(search, algorithm="self_consistency")
    runs = {}
    if {"verified", "stitch"} & set(config.datasets):
        runs["samples"] = engine.solve(problems, samples, progress=progress)
    if "backtrack" in config.datasets:
        runs["backtrack"] = engine.solve(problems, replace(search, algorithm="particle_filter"), progress=progress)
    if "but-wait" in config.datasets:
        runs["but-wait"] = engine.solve(problems, but_wait_search(config), progress=progress)
    records = {}
    for name in config.datasets:
        build = {"verified": verified_records, "stitch": stitch_records, "backtrack": backtrack_records,
                 "but-wait": but_wait_records}[name]
        run = runs.get(name, runs.get("samples"))
        algorithm = "self_consistency" if name in ("verified", "stitch") else "particle_filter"
        records[name] = []
        for index, (problem, result) in enumerate(zip(problems, run, strict=True)):
            found = build(result, problem["answer"], config)
            records[name] += [_record(result, index, algorithm, search.seed, pieces, counts, config)
                              for pieces, counts in _keep(found, result, config)]
    write_all_atomically({out_dir / f"{name}.jsonl": (json.dumps(r) for r in rows) for name, rows in records.items()})
    return records


def summary(records: dict[str, list[dict]]) -> list[dict]:
    """Records, problems covered and mean assistant characters of each dataset."""
    rows = []
    for name, items in records.items():
        lengths = [len(r["messages"][1]["content"]) for r in items]
        rows.append({"dataset": name, "records": len(items), "problems": len({r["meta"]["problem"] for r in items}),
                     "mean_chars": sum(lengths) / len(lengths) if lengths else 0.0})
    return rows


def rebuild(meta: dict, result: Result, config: SynthesisConfig) -> str:
    """The assistant text ``meta["pieces"]`` names, from ``result``'s tree. A node's text is its step's
    as the particle whose text it shows had it: the last node in ``pieces`` descending from it ends
    that particle's steps, so the start of a stop string that the particle's last step ends is cut
    (``TreeNode.trim``, as in ``Result.text``); a dead branch's cut stops at the branch."""
    nodes = [p for p in meta["pieces"] if not isinstance(p, str)]
    ends = {}
    for end in nodes:
        ends |= dict.fromkeys(path_to(result.tree, end), end)
    text = config.markers[0]
    for piece in meta["pieces"]:
        if isinstance(piece, str):
            text += {"transition": config.transition, "end": config.markers[1]}[piece]
        else:
            path = path_to(result.tree, ends[piece])
            text += path_texts(result.tree, path)[path.index(piece)]
    return text


# -- the datasets ------------------------------------------------------------------
def verified_records(result: Result, gold, config: SynthesisConfig) -> list[tuple[list, dict]]:
    return [(_as_answer(path), {"num_wrong": 0, "num_backtracks": 0}) for path in _verified_paths(result, gold)]


def stitch_records(result: Result, gold, config: SynthesisConfig) -> list[tuple[list, dict]]:
    wrong = [path for path in _final_paths(result) if _answer(result, path) is not None
             and not is_correct(_answer(result, path), gold)]
    if not wrong:
        return []
    found = []
    for k, path in enumerate(_verified_paths(result, gold)):
        attempts = [wrong[(k + j) % len(wrong)] for j in range(min(config.num_wrong, len(wrong)))]
        pieces = [p for attempt in attempts for p in attempt + ["transition"]] + _as_answer(path)
        found.append((pieces, {"num_wrong": len(attempts), "num_backtracks": 0}))
    return found


def but_wait_search(config: SynthesisConfig) -> SearchConfig:
    """Particle filtering whose particles' first ``num_waits`` ends are answered with the wait phrase."""
    forcing = BudgetForcing(min_continuations=config.num_waits, wait_phrase=config.wait_phrase)
    return replace(config.search, algorithm="particle_filter", budget_forcing=forcing)


def but_wait_records(result: Result, gold, config: SynthesisConfig) -> list[tuple[list, dict]]:
    found = []
    for path in _final_paths(result):
        waits = sum(result.tree[n].forced == "wait" for n in path)
        if path and waits == config.num_waits and result.tree[path[-1]].finished:
            verified = is_correct(_answer(result, path), gold)
            found.append((_as_answer(path), {"verified": verified, "num_wrong": 0, "num_backtracks": 0,
                                             "num_waits": waits}))
    return sorted(found, key=lambda item: not item[1]["verified"])  # verified ones first


def backtrack_records(result: Result, gold, config: SynthesisConfig) -> list[tuple[list, dict]]:
    """Each verified final path, with up to ``num_wrong`` dead sibling branches inserted, earliest depths first."""
    alive = {n for path in _final_paths(result) for n in path}
    children: dict[int, list[int]] = {}
    for node in result.tree:
        children.setdefault(node.parent, []).append(node.node)
    found = []
    for path in _verified_paths(result, gold):
        pieces, inserted = [], 0
        for depth, node in enumerate(path):
            parent = path[depth - 1] if depth else -1
            dead = [c for c in children.get(parent, []) if c not in alive and result.tree[c].iteration
                    == result.tree[node].iteration] if inserted < config.num_wrong else []
            if dead:
                branch = [dead[0]]
                while children.get(branch[-1]):  # its own continuation, to where it died
                    branch.append(children[branch[-1]][0])
                pieces += branch + ["transition"]
                inserted += 1
            pieces.append(node)
        if inserted:
            found.append((_as_answer(pieces), {"num_wrong": 0, "num_backtracks": inserted}))
    return found


# -- helpers ---------------------------------------------------------------------------
def _final_paths(result: Result) -> list[list[int]]:
    return [result.path_of(particle) for particle in range(len(result.leaves))]


def _answer(result: Result, path: list[int]) -> str | None:
    return extract_answer("".join(path_texts(result.tree, path)))


def _verified_paths(result: Result, gold) -> list[list[int]]:
    """Final paths whose answer is the gold one and stands in their last step (the solution)."""
    return [path for path in _final_paths(result) if path and is_correct(_answer(result, path), gold)
            and is_correct(extract_answer(path_texts(result.tree, path)[-1]), gold)]


def _as_answer(pieces: list) -> list:
    """The thought closed before the last step, which holds the answer."""
    return pieces[:-1] + ["end", pieces[-1]]


def _keep(found: list, result: Result, config: SynthesisConfig) -> list:
    kept, texts = [], set()
    for pieces, counts in found:
        text = rebuild({"pieces": pieces}, result, config)
        if config.dedup and text in texts:
            continue
        texts.add(text)
        kept.append((pieces, counts))
        if len(kept) == config.max_per_problem:
            break
    return kept


def _record(result: Result, index: int, algorithm: str, seed: int, pieces: list, counts: dict,
            config: SynthesisConfig) -> dict:
    meta = {"problem": index, "algorithm": algorithm, "seed": seed, "pieces": pieces,
            "nodes": [p for p in pieces if not isinstance(p, str)], "verified": True} | counts
    return {"messages": [{"role": "user", "content": result.question},
                         {"role": "assistant", "content": rebuild(meta, result, config)}], "meta": meta}


def check_inputs(problems: list[dict], out_dir: Path) -> None:
    """ValueError, before any work, for what would make the datasets fail or go unwritten."""
    if not problems:
        raise ValueError("no problems to synthesize from")
    missing = [i for i, p in enumerate(problems) if not isinstance(p, dict) or p.get("answer") is None]
    if missing:
        raise ValueError(f"problem {missing[0]} has no gold \"answer\" ({len(missing)} of {len(problems)} lack one): "
                         f"every dataset keeps only answers verified against it")
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: the output folder does not exist")
    try:  # a probe file: permissions alone do not tell (a read-only file system, root)
        fd, probe = tempfile.mkstemp(prefix=".pf-engine-probe.", dir=out_dir)
    except OSError as exc:
        raise ValueError(f"{out_dir}: cannot write in the output folder ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)

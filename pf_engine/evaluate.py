"""Scaling curves: accuracy against the number of particles, one line per algorithm.

Every (algorithm, N, problem) result is cached in the output folder as soon as it is known,
each file written whole or not at all, so an interrupted run resumes where it stopped. Problems
are named in the random streams by their index in the dataset, so a resumed run draws exactly
what an uninterrupted one would::

    OUT/cache/particle_filter/N8/17.json     {"answer", "correct", "tokens_generated", "text"}
    OUT/results.json                         one row per (algorithm, N)
    OUT/results.png                          accuracy vs N (log x) and tokens per problem vs N
"""

import json
from dataclasses import replace
from pathlib import Path

from pf_engine.answers import is_correct
from pf_engine.files import replace_atomically, write_atomically
from pf_engine.search import SearchConfig


def cache_path(out_dir: Path, algorithm: str, n: int, index: int) -> Path:
    return Path(out_dir) / "cache" / algorithm / f"N{n}" / f"{index}.json"


def evaluate(engine, problems: list[dict], algorithms: list[str], budgets: list[int], out_dir, base: SearchConfig,
             progress=None) -> list[dict]:
    """Run every (algorithm, N) on ``problems`` (dicts with "problem" or "question", and "answer");
    returns the table's rows and writes results.json and results.png under ``out_dir``.

    ``progress(label, done, total)`` is called as each problem of a pair finishes (and once per pair
    before it starts, with what the cache already holds).
    """
    missing = [i for i, p in enumerate(problems) if "answer" not in p]
    if missing:
        raise ValueError(f"problem {missing[0]} has no gold \"answer\": eval grades every problem")
    out_dir = Path(out_dir)
    configs = [(algorithm, n, replace(base, algorithm=algorithm, num_particles=n,
                                      beam_width=min(base.beam_width, n)))
               for algorithm in algorithms for n in budgets]  # built first: a bad pair fails before any work
    for _, _, config in configs:
        engine.stream([], config)  # checks what the engine needs for it (a PRM), and runs nothing
    rows = []
    for algorithm, n, config in configs:
        label = f"{algorithm}, N={n}"
        done = {i: json.loads(cache_path(out_dir, algorithm, n, i).read_text()) for i in range(len(problems))
                if cache_path(out_dir, algorithm, n, i).is_file()}
        todo = [i for i in range(len(problems)) if i not in done]
        if progress:
            progress(label, len(done), len(problems))
        if todo:
            cache_path(out_dir, algorithm, n, 0).parent.mkdir(parents=True, exist_ok=True)
            batch = [dict(problems[i], key=i) for i in todo]
            for position, result in engine.stream(batch, config):
                index = todo[position]
                record = {"answer": result.answer, "correct": is_correct(result.answer, problems[index]["answer"]),
                          "tokens_generated": result.stats["tokens_generated"], "text": result.text}
                write_atomically(cache_path(out_dir, algorithm, n, index), [json.dumps(record)])
                done[index] = record
                if progress:
                    progress(label, len(done), len(problems))
        correct = sum(done[i]["correct"] for i in range(len(problems)))
        rows.append({"algorithm": algorithm, "particles": n, "problems": len(problems), "correct": correct,
                     "accuracy": correct / len(problems),
                     "tokens_per_problem": sum(done[i]["tokens_generated"] for i in done) / len(problems)})
    write_atomically(out_dir / "results.json", [json.dumps(rows, indent=1)])
    plot_curves(rows, out_dir / "results.png")
    return rows


def plot_curves(rows: list[dict], path) -> None:
    """Accuracy against N (log x), and tokens per problem against N, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        mine = sorted((r for r in rows if r["algorithm"] == algorithm), key=lambda r: r["particles"])
        budgets = [r["particles"] for r in mine]
        left.plot(budgets, [r["accuracy"] for r in mine], marker="o", label=algorithm)
        right.plot(budgets, [r["tokens_per_problem"] for r in mine], marker="o", label=algorithm)
    budgets = sorted({r["particles"] for r in rows})
    for ax, label in ((left, "accuracy"), (right, "tokens generated per problem")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(n) for n in budgets])
        ax.minorticks_off()
        ax.set_xlabel("particles (N)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_ylim(-0.02, 1.02)
    left.legend()
    fig.tight_layout()
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)

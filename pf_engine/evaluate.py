"""Scaling curves: accuracy against the number of particles, one line per algorithm.

Every (algorithm, N, problem) result is cached in the output folder as soon as it is known,
each file written whole or not at all, so an interrupted run resumes where it stopped. Problems
are named in the random streams by their index in the dataset, so a resumed run draws exactly
what an uninterrupted one would. A cached result stands only for the exact work that made it:
the folder's settings (the engine's models, PRM format, dtype and device, the search config but
its algorithm and N, pf_engine's version) are in ``settings.json`` and in every entry's path,
and each entry's name holds the problem's index and a hash of its record (text, gold answer)::

    OUT/settings.json                         what every result in OUT was made with
    OUT/cache/SETTINGS/particle_filter/N8/17-PROBLEM.json
                                              {"answer", "correct", "tokens_generated", "text"}
    OUT/cache/SETTINGS/self_consistency-FIELDS/N8/...   a pair given its own fields (pair_config)
    OUT/results.json                          {"settings", "rows": one per (algorithm, N)}
    OUT/results.png                           accuracy vs N (log x) and tokens per problem vs N

A run whose settings differ from the folder's is refused before any work (``fresh=True`` starts
the folder over); a problem whose record changed is computed afresh under its new name.
"""

import json
import shutil
from dataclasses import asdict, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path

import pf_engine
from pf_engine.answers import is_correct
from pf_engine.files import digest, replace_atomically, write_atomically
from pf_engine.search import SearchConfig
from pf_engine.search.config import field_types

PER_PAIR = ("algorithm", "num_particles", "beam_width")  # fields eval sets for each (algorithm, N)


def eval_settings(engine, base: SearchConfig) -> dict:
    """Everything a result depends on, but the problem and the (algorithm, N) pair."""
    search = {k: v for k, v in asdict(base).items() if k not in PER_PAIR} | {"beam_width": base.beam_width}
    settings = {"pf_engine": pf_engine.__version__, "engine": engine.identity, "search": search}
    return json.loads(json.dumps(settings))  # as settings.json reads back (tuples as lists)


def pair_config(base: SearchConfig, algorithm: str, n: int) -> SearchConfig:
    """The config of one (algorithm, N) pair. ``algorithm`` is a name, or ``NAME:FIELD=VALUE,...`` with
    SearchConfig fields set for it alone (``self_consistency:early_stop=beta,early_stop_threshold=0.9``),
    each value read as the field's flag reads it (``none`` for None, ``true``/``false``)."""
    name, _, given = algorithm.partition(":")
    fields_ = {f.name: f for f in dataclass_fields(SearchConfig)}
    overrides = {}
    for item in filter(None, given.split(",")):
        key, eq, text = item.partition("=")
        if not eq or key not in fields_ or key in PER_PAIR:
            raise ValueError(f"the entry {algorithm!r}: {item!r} is not FIELD=VALUE of a SearchConfig field eval "
                             f"does not set itself ({', '.join(PER_PAIR)} are set per pair)")
        overrides[key] = field_value(fields_[key], text, f"the entry {algorithm!r}: {key}")
    return replace(base, algorithm=name, num_particles=n, beam_width=min(base.beam_width, n), **overrides)


def field_value(f, text: str, where: str):
    """``text`` as a value of SearchConfig field ``f`` (a str, int, float or bool, or None)."""
    kinds = field_types(f.type)
    if text.lower() == "none" and type(None) in kinds:
        return None
    kind = next(k for k in kinds if k is not type(None))
    if kind is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        if kind in (int, float, str):
            return kind(text)
    except ValueError:
        pass
    raise ValueError(f"{where}: {text!r} is not a valid {getattr(kind, '__name__', kind)}")


def cache_path(out_dir: Path, settings: dict, algorithm: str, n: int, index: int, problem: dict) -> Path:
    name, _, given = algorithm.partition(":")  # a pair with its own fields: their digest names its folder
    folder = f"{name}-{digest(given)}" if given else name
    return (Path(out_dir) / "cache" / digest(settings) / folder / f"N{n}"
            / f"{index}-{digest(problem)}.json")


def differences(old, new, prefix="") -> list[str]:
    """``key: old -> new`` for each leaf where two settings dicts differ (a search field by its own name)."""
    if not prefix and isinstance(old, dict) and isinstance(new, dict):
        old, new = flat_search(old), flat_search(new)
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new), key=str)
                for line in differences(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def flat_search(settings: dict) -> dict:
    search = settings.get("search")
    return {k: v for k, v in settings.items() if k != "search"} | (search if isinstance(search, dict) else {})


def open_out_dir(out_dir: Path, settings: dict, fresh: bool) -> None:
    """Ready ``out_dir`` for results made with ``settings``: ValueError, before any work, if it holds
    results made otherwise (unless ``fresh``, which discards them)."""
    saved = out_dir / "settings.json"
    if fresh:
        for name in ("settings.json", "results.json", "results.png"):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "cache", ignore_errors=True)
    elif saved.is_file():
        changed = differences(json.loads(saved.read_text()), settings)
        if changed:
            raise ValueError(f"{out_dir} holds results made with other settings ({'; '.join(changed)}): "
                             "pass fresh to start it over, or write to another folder")
    elif (out_dir / "cache").exists():
        raise ValueError(f"{out_dir} holds cached results whose settings are not recorded: pass fresh to "
                         "start it over, or write to another folder")
    if not saved.is_file():
        write_atomically(saved, [json.dumps(settings, indent=1)])


def evaluate(engine, problems: list[dict], algorithms: list[str], budgets: list[int], out_dir, base: SearchConfig,
             progress=None, fresh: bool = False) -> list[dict]:
    """Run every (algorithm, N) on ``problems`` (dicts with "problem" or "question", and "answer");
    returns the table's rows and writes results.json and results.png under ``out_dir``.

    ``progress(label, done, total)`` is called as each problem of a pair finishes (and once per pair
    before it starts, with what the cache already holds). ``fresh`` discards what ``out_dir``
    holds; without it, results made with other settings there are refused (ValueError).
    """
    missing = [i for i, p in enumerate(problems) if "answer" not in p]
    if missing:
        raise ValueError(f"problem {missing[0]} has no gold \"answer\": eval grades every problem")
    out_dir = Path(out_dir)
    configs = [(algorithm, n, pair_config(base, algorithm, n))
               for algorithm in algorithms for n in budgets]  # built first: a bad pair fails before any work
    for _, _, config in configs:
        engine.stream([], config)  # checks what the engine needs for it (a PRM), and runs nothing
    settings = eval_settings(engine, base)
    out_dir.mkdir(exist_ok=True)
    open_out_dir(out_dir, settings, fresh)
    rows = []
    for algorithm, n, config in configs:
        label = f"{algorithm}, N={n}"
        paths = [cache_path(out_dir, settings, algorithm, n, i, p) for i, p in enumerate(problems)]
        done = {i: json.loads(path.read_text()) for i, path in enumerate(paths) if path.is_file()}
        todo = [i for i in range(len(problems)) if i not in done]
        if progress:
            progress(label, len(done), len(problems))
        if todo:
            paths[0].parent.mkdir(parents=True, exist_ok=True)
            batch = [dict(problems[i], key=i) for i in todo]
            for position, result in engine.stream(batch, config):
                index = todo[position]
                record = {"answer": result.answer, "correct": is_correct(result.answer, problems[index]["answer"]),
                          "tokens_generated": result.stats["tokens_generated"], "text": result.text}
                write_atomically(paths[index], [json.dumps(record)])
                done[index] = record
                if progress:
                    progress(label, len(done), len(problems))
        correct = sum(done[i]["correct"] for i in range(len(problems)))
        rows.append({"algorithm": algorithm, "particles": n, "problems": len(problems), "correct": correct,
                     "accuracy": correct / len(problems),
                     "tokens_per_problem": sum(done[i]["tokens_generated"] for i in done) / len(problems)})
    write_atomically(out_dir / "results.json", [json.dumps({"settings": settings, "rows": rows}, indent=1)])
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

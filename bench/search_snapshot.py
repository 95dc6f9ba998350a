"""Every search algorithm's full output on tiny random models, as JSON, so two commits of the engine
can be compared side by side: texts, weights, rewards, trees, leaves and the chosen answer must be
identical; token counts and block peaks are shown where they differ.

The cases cover each algorithm over a rule verifier whose reward follows the text, a class-head,
a value-head and a token-pair PRM; particle Gibbs with ancestor sampling; budget forcing; stop
strings; adaptive resampling; per-problem seeds; and a KV pool small enough to preempt.

    python bench/search_snapshot.py --out new.json
    git stash; python bench/search_snapshot.py --out old.json; git stash pop
    python bench/search_snapshot.py --compare old.json new.json
"""

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

from conftest import varying_reward  # noqa: E402
from test_engine import save_tiny_class_prm  # noqa: E402

from pf_engine import BudgetForcing, Engine, SearchConfig  # noqa: E402
from pf_engine.prm_format import PRMFormat  # noqa: E402
from tiny import save_tiny_policy  # noqa: E402

QUESTIONS = ["What is 2+2?", "Add 3 and 4.", "Is 9 odd?", {"problem": "Halve 10.", "seed": 7},
             "Name a prime.", "What is 6*7?"]
BASE = dict(num_particles=4, beam_width=2, max_steps=4, max_step_tokens=6, max_new_tokens=20, stop_at_boxed=False)
ALGORITHMS = ["particle_filter", "particle_gibbs", "best_of_n", "beam_search", "dvts"]
SMALL_POOL = 1 << 16  # bytes: few enough blocks that problems preempt each other
# fields that depend on how the pool was shared, not on what the search wrote
STATS_ONLY = {"stats"}


def engines(folder: Path) -> dict:
    save_tiny_policy(folder / "policy")
    save_tiny_class_prm(folder / "class_prm")
    save_tiny_class_prm(folder / "value_prm", value_head=True)
    policy = folder / "policy"
    return {
        "rule": Engine(policy=policy, prm=varying_reward, kv_cache_memory=8 << 20),
        "rule_small_pool": Engine(policy=policy, prm=varying_reward, kv_cache_memory=SMALL_POOL),
        "class_head": Engine(policy=policy, prm=folder / "class_prm", prm_separator="?", kv_cache_memory=8 << 20),
        "class_head_small_pool": Engine(policy=policy, prm=folder / "class_prm", prm_separator="?",
                                        kv_cache_memory=3 * SMALL_POOL),  # blocks of both pools
        "value_head": Engine(policy=policy, prm=folder / "value_prm",
                             prm_format=PRMFormat(chat_template=False, marker="?"), kv_cache_memory=8 << 20),
        "token_pair": Engine(policy=policy, prm=policy, prm_step_tag="=", prm_good="+", prm_bad="-",
                             kv_cache_memory=8 << 20),
        "none": Engine(policy=policy, kv_cache_memory=8 << 20),
    }


def cases() -> list[tuple[str, str, dict]]:
    out = []
    for prm in ("rule", "rule_small_pool", "class_head", "class_head_small_pool", "value_head", "token_pair"):
        for algorithm in ALGORITHMS:
            out.append((f"{algorithm}/{prm}", prm, dict(algorithm=algorithm)))
    out += [
        ("self_consistency/none", "none", dict(algorithm="self_consistency")),
        ("particle_gibbs_ancestors/rule", "rule", dict(algorithm="particle_gibbs", ancestor_sampling=True,
                                                       iterations=3)),
        ("particle_gibbs_ancestors/class_head_small_pool", "class_head_small_pool",
         dict(algorithm="particle_gibbs", ancestor_sampling=True, iterations=3)),
        ("budget_forcing/rule", "rule", dict(max_new_tokens=30, max_steps=6, max_step_tokens=12,
                                             budget_forcing=BudgetForcing(min_tokens=12, max_tokens=16,
                                                                          wait_phrase=" Hm,", end_phrase=" So:"))),
        ("stop/rule", "rule", dict(stop=("e", "a "))),
        ("ess/rule", "rule", dict(ess_threshold=0.5, final_answer="sampled")),
        ("vote/class_head", "class_head", dict(final_answer="vote", num_particles=8)),
        # sharp weights, so that rounds anneal (and the tree's temperatures are compared)
        ("entropic_particle_filter/rule", "rule", dict(algorithm="entropic_particle_filter", weight_temperature=0.2,
                                                       annealing_phase=1.0)),
    ]
    return out


def snapshot(only: str = "") -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = engines(Path(tmp))
        for name, prm, options in cases():
            if only not in name:
                continue
            config = SearchConfig(**(BASE | options))
            results = built[prm].solve(QUESTIONS, config)
            out[name] = [{"answer": r.answer, "text": r.text, "steps": r.steps, "particles": r.particles,
                          "weights": r.weights, "chosen": r.chosen, "leaves": r.leaves, "num_tokens": r.num_tokens,
                          "finish_reasons": r.finish_reasons,
                          "tree": [asdict(node) for node in r.tree],
                          "stats": {k: v for k, v in r.stats.items() if not k.startswith("seconds")}}
                         for r in results]
            print(f"{name}: {sum(len(r.tree) for r in results)} nodes, "
                  f"{sum(r.stats['preemptions'] for r in results)} preemptions", flush=True)
    return out


def as_old(old, new, added: set, path: str = ""):
    """``new`` without the dict keys ``old`` lacks (a field or statistic the newer engine added), which go
    into ``added``; what both have is kept for comparing."""
    if isinstance(old, dict) and isinstance(new, dict):
        added.update(f"{path}{k}" for k in new.keys() - old.keys())
        return {k: as_old(old[k], v, added, f"{path}{k}.") for k, v in new.items() if k in old}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [as_old(a, b, added, path) for a, b in zip(old, new, strict=True)]
    return new


def compare(old: dict, new: dict) -> int:
    differ, added = 0, set()
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            print(f"{name}: only in {'new' if name in new else 'old'}")
            differ += 1
            continue
        for i, (a, b) in enumerate(zip(old[name], as_old(old[name], new[name], added), strict=True)):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    kind = "stats differ" if key in STATS_ONLY else "DIFFER"
                    differ += key not in STATS_ONLY
                    shown = {k: (a[key].get(k), b[key].get(k)) for k in a[key] if a[key].get(k) != b[key].get(k)} \
                        if key in STATS_ONLY else ""
                    print(f"{name} problem {i}: {key} {kind} {shown}")
    if added:
        print(f"only the new snapshot has (not compared): {', '.join(sorted(added))}")
    print(f"{len(set(old) & set(new))} cases compared: " + ("identical" if not differ else f"{differ} differences"))
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the snapshot here")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two snapshots")
    parser.add_argument("--only", default="", help="run the cases whose name holds this")
    args = parser.parse_args()
    if args.compare:
        return compare(*(json.loads(p.read_text()) for p in args.compare))
    if not args.out:
        parser.error("give --out or --compare")
    args.out.write_text(json.dumps(snapshot(args.only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

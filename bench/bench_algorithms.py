"""What each search costs at equal N: tokens generated per problem and seconds, each beside its
baseline from the same run (particle filtering for the searches that weigh steps, self-consistency
for the votes), on the shipped arithmetic problems behind the demo's instruction with the embedded
SmolLM2-135M-Instruct and the arithmetic rule verifier. The point is cost: a 135M model answers few
of these (the accuracy column says so).

    python bench/bench_algorithms.py [--problems 8] [--particles 8] [--repeats 2]

Entries are ``pf-engine eval --algorithms`` entries (NAME or NAME:FIELD=VALUE,...). Repeats run the
entries in rotated order (A B C, then B C A, ...) and figures are medians; tokens do not vary
between repeats (the draws are keyed), seconds do.
"""

import argparse
import statistics
import sys
import time
from importlib.resources import files

from common import add_device_args, device_and_dtype, machine

BASELINES = {  # entry -> the entry its figures are divided by (unlisted: its algorithm without fields)
    "particle_filter": "particle_filter",
    "entropic_particle_filter": "particle_filter",
    "particle_filter:weights=self_certainty": "particle_filter",
    "particle_filter:weights=prm*tail_entropy": "particle_filter",
    "best_of_n": "particle_filter",
    "best_of_n:early_stop=beta": "best_of_n",
    "self_consistency": "self_consistency",
    "self_consistency:early_stop=adaptive": "self_consistency",
    "self_consistency:early_stop=beta": "self_consistency",
    "self_consistency:vote=weighted,weights=tail_entropy": "self_consistency",
    "self_consistency:vote=confidence_selection,weights=tail_entropy": "self_consistency",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--step-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--entries", nargs="+", default=list(BASELINES))
    add_device_args(parser)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)

    from pf_engine import Engine, SearchConfig
    from pf_engine.answers import is_correct
    from pf_engine.cli import DEMO_INSTRUCTION, load_problems
    from pf_engine.evaluate import pair_config
    from pf_engine.verifiers import arithmetic_verifier

    shipped = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")[:args.problems]
    questions = [DEMO_INSTRUCTION.format(problem=p["problem"]) for p in shipped]
    base = SearchConfig(max_steps=args.steps, max_step_tokens=args.step_tokens,
                        max_new_tokens=args.steps * args.step_tokens, step_delimiter="\n")
    configs = {e: pair_config(base, e, args.particles) for e in args.entries}  # bad entries fail first
    missing = {baseline_of(e) for e in args.entries} - set(args.entries)
    if missing:
        raise SystemExit(f"--entries needs the baselines too: {', '.join(sorted(missing))}")
    engine = Engine(prm=arithmetic_verifier, device=device, dtype=dtype)
    engine.solve(questions[:1], replace_n(configs[args.entries[0]], 2))  # warm-up
    runs = {e: [] for e in args.entries}
    for r in range(args.repeats):
        order = args.entries[r % len(args.entries):] + args.entries[:r % len(args.entries)]
        for entry in order:
            began = time.perf_counter()
            results = engine.solve(questions, configs[entry])
            runs[entry].append((time.perf_counter() - began,
                                sum(x.stats["tokens_generated"] for x in results) / len(results),
                                sum(is_correct(x.answer, p["answer"]) for x, p in zip(results, shipped, strict=True)),
                                sum(x.stats["cancelled_particles"] for x in results)))
    print(f"{len(questions)} shipped arithmetic problems, N = {args.particles}, at most {args.steps} steps x "
          f"{args.step_tokens} tokens, SmolLM2-135M-Instruct, {machine(device, dtype)}; medians of {args.repeats}")
    print(f"{'entry':<64} {'tokens/problem':>15} {'vs base':>8} {'seconds':>8} {'vs base':>8} {'correct':>8} "
          f"{'cancelled':>9}")
    for entry in args.entries:
        seconds, tokens = (statistics.median(x[i] for x in runs[entry]) for i in (0, 1))
        baseline = baseline_of(entry)
        base_seconds, base_tokens = (statistics.median(x[i] for x in runs[baseline]) for i in (0, 1))
        print(f"{entry:<64} {tokens:>15.1f} {tokens / base_tokens:>8.3f} {seconds:>8.2f} "
              f"{seconds / base_seconds:>8.3f} {runs[entry][0][2]:>5}/{len(questions):<2} {runs[entry][0][3]:>9}")
    print("vs base: the figure over its baseline's (" + ", ".join(sorted(set(BASELINES.values()))) + ")")
    return 0


def baseline_of(entry: str) -> str:
    return BASELINES.get(entry, entry.partition(":")[0])


def replace_n(config, n):
    from dataclasses import replace

    return replace(config, num_particles=n, beam_width=min(config.beam_width, n))


if __name__ == "__main__":
    sys.exit(main())

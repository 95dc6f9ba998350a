"""The ``pf-engine`` command: ``demo`` (the main job), ``solve`` and ``selfcheck``."""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SEARCH_OPTIONS = ("algorithm", "num_particles", "max_steps", "max_step_tokens", "max_new_tokens", "temperature",
                  "seed", "final_answer", "scheme", "aggregation", "iterations", "ancestor_sampling")
DEMO_INSTRUCTION = ("Solve the problem step by step. Put each step on its own line, leave a blank line between "
                    "steps, and write every calculation as an equation like 3 + 4 = 7. "
                    "End with: The answer is \\boxed{{N}}.\n\nProblem: {problem}")


def selfcheck() -> int:
    """Share, fork, resample and copy-on-write a small KV cache; check every token reads back."""
    import numpy as np
    import torch

    from pf_engine import _native
    from pf_engine.errors import OutOfBlocksError
    from pf_engine.kv_cache import KVCache

    for name, present in _native.summary().items():
        print(f"  {name:<22} {'yes' if present else 'no'}")
    cache = KVCache(num_layers=2, num_kv_heads=2, head_dim=8, num_blocks=64, block_size=4, dtype=torch.float32)
    bm = cache.manager
    tokens = {}  # seq_id -> values written, one per token

    def write(seq_ids, counts):
        slots, copies = bm.append(seq_ids, counts)
        cache.copy_blocks(copies)
        start = 0
        for seq_id, n in zip(seq_ids, counts):
            values = torch.rand(n)
            tokens[seq_id] = torch.cat([tokens[seq_id], values])
            kv = values[:, None, None].expand(n, 2, 8)
            for layer in range(2):
                cache.write(layer, slots[start : start + n], kv, -kv)
            start += n

    prompt = bm.allocate(0)
    tokens[prompt] = torch.empty(0)
    write([prompt], [6])
    particles = [prompt] + [bm.fork(prompt) for _ in range(7)]
    for seq_id in particles[1:]:
        tokens[seq_id] = tokens[prompt].clone()
    write(particles, [3] * 8)
    ancestors = np.array([0, 0, 0, 2, 2, 5, 7, 7])
    parents = [particles[a] for a in ancestors]
    particles = list(bm.resample(particles, ancestors))
    tokens = {child: tokens[parent] for child, parent in zip(particles, parents)}
    write(particles, [5] * 8)
    for seq_id in particles:
        for layer in range(2):
            k, v = cache.read(layer, seq_id)
            if not (torch.equal(k[:, 0, 0], tokens[seq_id]) and torch.equal(v, -k)):
                print(f"FAILED: sequence {seq_id} reads back other tokens than it wrote")
                return 1
    try:
        bm.allocate(10_000)
        print("FAILED: an oversized allocation did not raise OutOfBlocksError")
        return 1
    except OutOfBlocksError:
        pass
    for seq_id in particles:
        bm.free(seq_id)
    if bm.num_free_blocks != bm.num_blocks:
        print(f"FAILED: {bm.num_blocks - bm.num_free_blocks} blocks leaked")
        return 1
    print("self-check passed: 8 particles forked, resampled and extended with copy-on-write; every token read back")
    return 0


def load_problems(path) -> list[dict]:
    """Problems of a JSONL file: one object per line with "problem" or "question", and optionally "answer"."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such problems file")
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("problem", record.get("question")), str):
            raise ValueError(f"{path}:{number}: each line needs a \"problem\" or \"question\" string")
        problems.append(record)
    if not problems:
        raise ValueError(f"{path}: holds no problems")
    return problems


def write_atomically(path, lines) -> None:
    """Write all lines or nothing: a temp file beside ``path``, renamed over it when complete."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def run_with_progress(engine, problems, config, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=not sys.stdout.isatty()) as bar:
        task = bar.add_task(label, total=len(problems))
        return engine.solve(problems, config, progress=lambda done: bar.update(task, completed=done))


def solve(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from pf_engine.answers import is_correct
    from pf_engine.api import Engine
    from pf_engine.search.config import SearchConfig
    from pf_engine.verifiers import arithmetic_verifier

    problems = load_problems(args.problems)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"{out.parent}: the output folder does not exist")
    config = SearchConfig(**{k: getattr(args, k) for k in SEARCH_OPTIONS})
    prm = arithmetic_verifier if args.verifier == "arithmetic" else args.prm
    engine = Engine(policy=args.policy, prm=prm, device=args.device, kv_cache_memory=args.kv_cache_mib << 20)
    began = time.perf_counter()
    results = run_with_progress(engine, problems, config, config.algorithm)
    seconds = time.perf_counter() - began
    graded = [is_correct(r.answer, p["answer"]) if "answer" in p else None for r, p in zip(results, problems)]
    records = [json.dumps({"problem": r.question, "answer": r.answer, "gold": p.get("answer"), "correct": g,
                           "text": r.text, "steps": r.steps, "weights": r.weights, "stats": r.stats})
               for r, p, g in zip(results, problems, graded)]
    write_atomically(out, records)
    if args.tree:
        write_atomically(args.tree, (json.dumps({"problem_index": i} | node)
                                     for i, r in enumerate(results) for node in r.tree_records()))
    table = Table(title=f"pf-engine solve: {config.algorithm}, {config.num_particles} particles")
    for column in ("problems", "accuracy", "tokens generated", "PRM tokens", "seconds"):
        table.add_column(column, justify="right")
    marks = [g for g in graded if g is not None]
    accuracy = f"{sum(marks)}/{len(marks)} = {sum(marks) / len(marks):.0%}" if marks else "no answers given"
    table.add_row(str(len(results)), accuracy, str(_total(results, "tokens_generated")),
                  str(_total(results, "prm_tokens")), f"{seconds:.1f}")
    Console().print(table)
    print(f"wrote {out}" + (f" and {args.tree}" if args.tree else ""))
    return 0


def _total(results, key) -> int:
    """A stat summed over batches (every result of a batch carries the batch's total)."""
    return sum({r.stats["batch"]: r.stats[key] for r in results}.values())


def demo(args) -> int:
    from importlib.resources import files

    from rich.console import Console
    from rich.table import Table

    from pf_engine.answers import is_correct
    from pf_engine.api import Engine
    from pf_engine.search.config import SearchConfig
    from pf_engine.verifiers import arithmetic_verifier

    problems = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")[: args.problems]
    questions = [DEMO_INSTRUCTION.format(problem=p["problem"]) for p in problems]
    print(f"pf-engine demo: SmolLM2-135M-Instruct, {len(problems)} arithmetic word problems, a rule-based step "
          f"verifier that checks every 'a op b = c'; {args.particles} particles, at most {args.max_new_tokens} "
          f"new tokens per particle")
    engine = Engine(prm=arithmetic_verifier, device=args.device)
    common = dict(max_new_tokens=args.max_new_tokens, max_step_tokens=64, max_steps=12, temperature=0.7, seed=args.seed)
    methods = [
        ("single sample", SearchConfig(algorithm="self_consistency", num_particles=1, **common)),
        (f"best-of-{args.particles}", SearchConfig(algorithm="best_of_n", num_particles=args.particles, **common)),
        (f"particle filtering ({args.particles})",
         SearchConfig(algorithm="particle_filter", num_particles=args.particles, **common)),
    ]
    table = Table(title="Same problems, same per-particle token budget")
    for column in ("method", "accuracy", "tokens generated", "seconds"):
        table.add_column(column, justify="right")
    for name, config in methods:
        began = time.perf_counter()
        results = run_with_progress(engine, questions, config, name)
        seconds = time.perf_counter() - began
        correct = sum(is_correct(r.answer, p["answer"]) for r, p in zip(results, problems))
        table.add_row(name, f"{correct}/{len(problems)} = {correct / len(problems):.0%}",
                      str(_total(results, "tokens_generated")), f"{seconds:.1f}")
    Console().print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pf-engine", description="Particle-filtering inference-time scaling.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("selfcheck", help="check the native block manager and the KV cache on this machine")

    d = sub.add_parser("demo", help="single sample vs best-of-N vs particle filtering on the embedded model")
    d.add_argument("--particles", type=int, default=4)
    d.add_argument("--problems", type=int, default=12, help="how many of the shipped problems")
    d.add_argument("--max-new-tokens", type=int, default=160)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")

    s = sub.add_parser("solve", help="solve a JSONL file of problems")
    s.add_argument("--problems", required=True, help='JSONL, one {"problem" or "question", "answer"?} per line')
    s.add_argument("--out", required=True, help="JSONL of answers, written whole or not at all")
    s.add_argument("--policy", default=None, help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    group = s.add_mutually_exclusive_group()
    group.add_argument("--prm", default=None, help="PRM checkpoint folder (a class-head PRM)")
    group.add_argument("--verifier", choices=["arithmetic"], help="a rule-based step verifier instead of a PRM")
    s.add_argument("--tree", default=None, help="also write every step of every particle as JSONL")
    s.add_argument("--device", default="cpu")
    s.add_argument("--kv-cache-mib", type=int, default=1024)
    s.add_argument("--algorithm", default="particle_filter")
    s.add_argument("--particles", dest="num_particles", type=int, default=8)
    s.add_argument("--max-steps", type=int, default=32)
    s.add_argument("--max-step-tokens", type=int, default=256)
    s.add_argument("--max-new-tokens", type=int, default=1024)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--final-answer", default="best")
    s.add_argument("--scheme", default="systematic")
    s.add_argument("--aggregation", default="last")
    s.add_argument("--iterations", type=int, default=4, help="particle_gibbs: sweeps")
    s.add_argument("--ancestor-sampling", action="store_true", help="particle_gibbs: redraw the reference's ancestor")

    args = parser.parse_args(argv)
    try:
        return {"selfcheck": lambda: selfcheck(), "demo": lambda: demo(args), "solve": lambda: solve(args)}[args.command]()
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"pf-engine {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

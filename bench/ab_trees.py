"""Two pf_engine trees side by side: this checkout against another (a git worktree of an older
commit), each in a persistent worker process, run alternately (A B, then B A) on the same work,
medians reported. For refactors that must not cost speed.

    git worktree add /tmp/base COMMIT && cp pf_engine/_C*.so /tmp/base/pf_engine/  # if csrc/ is unchanged
    python bench/ab_trees.py /tmp/base host:64 host:16 scale:float32 [--repeats 4]

Work: ``host:K`` is bench_host_overhead.py's engine loop at 4,096 particles, K per problem (µs per
particle-token, lower is better); ``scale:DTYPE`` is bench_scale.py's pf_engine run on 8 problems
x 16 particles x 8 steps of 64 tokens, SmolLM2 in DTYPE (generated tokens per second).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def importable(tree: Path, into: Path) -> Path:
    """A folder holding ``tree``'s pf_engine with its kernels inside, as the installed package lays
    them out (the tree's root itself must stay off sys.path: its kernels/ would hide Hugging
    Face's kernels package)."""
    shutil.copytree(tree / "pf_engine", into / "pf_engine")
    shutil.copytree(tree / "kernels", into / "pf_engine" / "kernels")
    return into


def worker() -> None:
    """Run each command read from stdin with this process's pf_engine; print RESULT json."""
    sys.path.insert(0, str(HERE))
    import bench_host_overhead as host_bench
    import bench_scale
    import torch

    from pf_engine import Engine, SearchConfig
    from pf_engine.verifiers import arithmetic_verifier

    torch.set_num_threads(os.cpu_count() or 1)
    engines = {}

    def scale(dtype: str) -> dict:
        args = SimpleNamespace(problems=8, particles=16, steps=8, step_tokens=64, seed=0)
        job = bench_scale.make_job(args)
        if dtype not in engines:
            engines[dtype] = Engine(prm=arithmetic_verifier, device="cpu", dtype=getattr(torch, dtype))
            bench_scale.run_engine(engines[dtype], job | {"questions": job["questions"][:2], "configs": [(2, 1)]})
        r = bench_scale.run_engine(engines[dtype], job)
        return {"value": r["tokens_generated"] / r["seconds"]}

    def host(per: int) -> dict:
        total, steps, step_tokens = 4096, 4, 32
        config = SearchConfig(num_particles=per, max_steps=steps, max_step_tokens=step_tokens,
                              max_new_tokens=steps * step_tokens, stop_at_boxed=False, temperature=1.0)
        problems = [f"problem {i}" for i in range(total // per)]
        if per not in engines:
            tokenizer = host_bench.char_tokenizer()
            blocks = total * (steps * step_tokens // 16 + 2) + 64
            engines[per] = Engine(policy=host_bench.StandIn(tokenizer), tokenizer=tokenizer, prm=host_bench.reward,
                                  backend="torch", kv_cache_memory=blocks * 16 * 2 * host_bench.HIDDEN * 4)
            host_bench.engine_run(engines[per], config, problems[:1])
        seconds, drawn, _ = host_bench.engine_run(engines[per], config, problems)
        return {"value": seconds / drawn * 1e6}

    for line in sys.stdin:
        kind, arg = line.strip().split(":")
        print("RESULT " + json.dumps(scale(arg) if kind == "scale" else host(int(arg))), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", nargs="?", help="the other tree (a checkout of pf_engine)")
    parser.add_argument("work", nargs="*", default=["host:64", "host:16", "scale:float32"])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker()
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        paths = {"base": str(importable(Path(args.base).resolve(), Path(scratch))), "this": None}
        procs = {}
        for name, path in paths.items():
            env = os.environ | ({"PYTHONPATH": path} if path else {})
            procs[name] = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True, env=env, cwd=scratch)

        def ask(name: str, work: str) -> float:
            procs[name].stdin.write(work + "\n")
            procs[name].stdin.flush()
            for line in procs[name].stdout:
                if line.startswith("RESULT "):
                    return json.loads(line[7:])["value"]
            raise RuntimeError(f"the {name} worker ended early")

        for work in args.work:
            ask("base", work), ask("this", work)  # warm-up
            runs = {"base": [], "this": []}
            for i in range(args.repeats):  # A B, then B A
                for name in (("base", "this") if i % 2 == 0 else ("this", "base")):
                    runs[name].append(ask(name, work))
            base, this = (statistics.median(runs[k]) for k in ("base", "this"))
            unit = "tok/s" if work.startswith("scale") else "us/particle-token"
            print(f"{work}: base {base:.3f} this {this:.3f} {unit}, this/base {this / base:.3f} "
                  f"(medians of {args.repeats} alternating; base {runs['base']}, this {runs['this']})", flush=True)
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

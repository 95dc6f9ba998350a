"""Particle filtering at the scale users run it, end to end: pf_engine against a vLLM
resubmission loop on the same problems, the same model, KV memory and dtype.

Work: 32 arithmetic word problems of mixed prompt lengths (the shipped problems,
some behind a worked example or two), N = 16 particles, at most 12 steps of at most
64 tokens ending at a blank line, temperature 0.8, the arithmetic rule verifier as
the PRM, systematic resampling after every step; SmolLM2-135M-Instruct in float32
(--dtype, --device: both ways run in the same dtype).

  pf_engine   Engine.solve with its default KV pool (1 GiB on the CPU): continuous
              batching over all problems, prompts prefilled once and forked
  vllm loop   bench_pf_vs_vllm.py's loop: every step each live particle's prompt and
              steps so far go back to LLM.generate (prefix caching on), in vLLM's own
              venv (bash bench/setup_vllm.sh) with a KV pool of the same size

The two run alternately (A B A B ...) and medians are reported, so machine drift
cancels; vLLM's start-up is reported, not timed. Figures: problems per minute,
generated tokens per second, pf_engine's mean sequences per forward (occupancy)
and peak KV blocks, and the throughput ratio.

    python bench/bench_scale.py [--problems 32 --particles 16 --steps 12 --step-tokens 64 --repeats 2]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_pf_vs_vllm import DELIMITER, TEMPERATURE, VllmBackend, baseline_pf  # bench/ is the script's path
from common import add_device_args, device_and_dtype, machine

HERE = Path(__file__).resolve().parent

EXAMPLE = ("Example: Ann has 2 bags of 3 apples.\n\n2 x 3 = 6\n\nThe answer is \\boxed{6}.\n\n")


def make_job(args):
    from importlib.resources import files

    from pf_engine.cli import DEMO_INSTRUCTION, load_problems
    from pf_engine.models.smollm2 import smollm2_path

    shipped = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")
    questions = [EXAMPLE * (i % 3) + DEMO_INSTRUCTION.format(problem=shipped[i % len(shipped)]["problem"])
                 for i in range(args.problems)]
    return {"model": str(smollm2_path()), "questions": questions, "max_step_tokens": args.step_tokens,
            "seed": args.seed, "configs": [(args.particles, args.steps)], "rule_verifier": True}


def run_engine(engine, job) -> dict:
    from pf_engine import SearchConfig

    (n, steps), = job["configs"]
    config = SearchConfig(num_particles=n, max_steps=steps, max_step_tokens=job["max_step_tokens"],
                          max_new_tokens=steps * job["max_step_tokens"], step_delimiter=DELIMITER,
                          temperature=TEMPERATURE, seed=job["seed"])
    stats = engine.core.stats
    stats["decode_forwards"] = stats["decode_sequences"] = 0
    began = time.perf_counter()
    results = engine.solve(job["questions"], config)
    seconds = time.perf_counter() - began
    # tokens drawn in rounds a preemption made a problem redo are not counted: they were drawn again
    kept = sum(r.stats["tokens_generated"] - r.stats["discarded_tokens"] for r in results)
    return {"seconds": seconds, "tokens_generated": kept,
            "tokens_discarded": sum(r.stats["discarded_tokens"] for r in results),
            "occupancy": stats["decode_sequences"] / max(stats["decode_forwards"], 1),
            "peak_blocks": max(r.stats["peak_blocks"] for r in results),
            "preemptions": sum(r.stats["preemptions"] for r in results), "answers": [r.answer for r in results]}


def worker(job_path: str) -> None:
    """In the vLLM venv: start vLLM once, then run the loop each time a line says "run"."""
    job = json.loads(Path(job_path).read_text())
    backend = VllmBackend(job)
    print("READY " + json.dumps({"startup_seconds": backend.startup_seconds, "block_size": backend.block_size}),
          flush=True)
    (n, steps), = job["configs"]
    for line in sys.stdin:
        if line.strip() != "run":
            break
        backend.reset()
        began = time.perf_counter()
        stats = baseline_pf(backend, job, n, steps)
        print("RESULT " + json.dumps({"seconds": time.perf_counter() - began, **stats}), flush=True)


def read_tagged(proc, tag: str) -> dict:
    for line in proc.stdout:
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise RuntimeError(f"the vLLM worker ended without {tag} (see its log)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--step-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", default=str(HERE / ".vllm-venv" / "bin" / "python"))
    parser.add_argument("--out", default=str(HERE / "out" / "scale"))
    add_device_args(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0

    import torch

    from pf_engine import Engine
    from pf_engine.verifiers import arithmetic_verifier

    torch.set_num_threads(os.cpu_count() or 1)
    device, dtype = device_and_dtype(args)
    job = make_job(args) | {"device": str(device), "dtype": args.dtype}
    engine = Engine(prm=arithmetic_verifier, device=device, dtype=dtype)  # the default pool
    kv_gib = engine.kv_cache_memory / 2**30
    tokenizer = engine.core.tokenizer
    job |= {"prompts": [engine.core.prompt_ids(q) for q in job["questions"]], "eos_ids": sorted(engine.core.eos_ids),
            "kv_bytes_per_token": engine.policy.kv_cache.bytes_per_block // engine.block_size,
            "kv_cache_mib": engine.kv_cache_memory >> 20,
            "max_model_len": max(len(engine.core.prompt_ids(q)) for q in job["questions"])
            + args.steps * args.step_tokens + 64}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path = out_dir / "job.json"
    job_path.write_text(json.dumps(job))
    print(f"{args.problems} problems (prompts {min(map(len, job['prompts']))}-{max(map(len, job['prompts']))} "
          f"tokens), N={args.particles}, <= {args.steps} steps x {args.step_tokens} tokens, rule verifier, "
          f"KV pool {kv_gib:g} GiB each, tokenizer vocab {len(tokenizer)}, on {machine(device, dtype)}", flush=True)

    log = open(out_dir / "vllm_worker.log", "w")
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": f"{kv_gib:g}"}
    proc = subprocess.Popen([args.vllm_python, __file__, "--worker", str(job_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    ours, theirs = [], []
    try:
        ready = read_tagged(proc, "READY")
        print(f"vLLM up (start-up {ready['startup_seconds']:.0f} s, not timed; block size {ready['block_size']})",
              flush=True)
        run_engine(engine, job | {"questions": job["questions"][:2], "configs": [(2, 1)]})  # warm-up
        for repeat in range(args.repeats):  # A B A B
            ours.append(run_engine(engine, job))
            print(f"run {repeat + 1} pf_engine: {json.dumps(ours[-1])}", flush=True)
            proc.stdin.write("run\n")
            proc.stdin.flush()
            theirs.append(read_tagged(proc, "RESULT"))
            print(f"run {repeat + 1} vllm loop: {json.dumps(theirs[-1])}", flush=True)
    finally:
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()

    def median(rows, key):
        return statistics.median(r[key] for r in rows)

    tok_ours = statistics.median(r["tokens_generated"] / r["seconds"] for r in ours)
    tok_theirs = statistics.median(r["tokens_generated"] / r["seconds"] for r in theirs)
    ppm_ours = statistics.median(60 * args.problems / r["seconds"] for r in ours)
    ppm_theirs = statistics.median(60 * args.problems / r["seconds"] for r in theirs)
    lines = [
        "| way | problems/min | generated tok/s | seconds | tokens | occupancy | peak blocks |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| pf_engine | {ppm_ours:.2f} | {tok_ours:.1f} | {median(ours, 'seconds'):.0f} | "
        f"{median(ours, 'tokens_generated'):.0f} | {median(ours, 'occupancy'):.0f} | "
        f"{median(ours, 'peak_blocks'):.0f} |",
        f"| vLLM loop | {ppm_theirs:.2f} | {tok_theirs:.1f} | {median(theirs, 'seconds'):.0f} | "
        f"{median(theirs, 'tokens_generated'):.0f} | | |",
        "",
        f"pf_engine / vLLM loop: generated tokens per second {tok_ours / tok_theirs:.2f}x, problems per minute "
        f"{ppm_ours / ppm_theirs:.2f}x (target >= 2x tokens/s); medians of {args.repeats} alternating runs",
    ]
    print("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps({"pf_engine": ours, "vllm_loop": theirs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

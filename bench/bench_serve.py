"""What the HTTP layer costs: ``pf-engine serve`` under concurrent OpenAI clients against the same
problems through ``Engine.solve`` in one call, on the same model, KV memory and dtype.

Work: the shipped arithmetic problems behind the demo's instruction, particle filtering with
N = 4 particles, at most 6 steps of at most 32 tokens, the arithmetic rule verifier as the PRM,
SmolLM2-135M-Instruct in float32 (--dtype, --device: both ways alike), each request with its
own seed. At concurrency C, C clients (``openai.AsyncOpenAI``) send 2C requests (at least 8)
to a ``pf-engine serve`` process on 127.0.0.1; the baseline solves the same problems with the
same seeds in one ``Engine.solve`` call in this process. The two ways alternate (A B, then
B A, ...) and medians are reported; the server's start-up is reported, not timed.

Figures: requests per minute and p50 / p95 request latency through the server, requests per
minute offline, their ratio, and how many served answers equal the offline ones.

    python bench/bench_serve.py [--concurrency 1 8 32 --repeats 2 --port 8321]
"""

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time

import httpx2 as httpx
import openai
from common import add_device_args, device_and_dtype, machine  # bench/ is the script's path

PARTICLES, STEPS, STEP_TOKENS = 4, 6, 32
FLAGS = ["--verifier", "arithmetic", "--particles", str(PARTICLES), "--max-steps", str(STEPS), "--max-step-tokens",
         str(STEP_TOKENS), "--max-new-tokens", str(STEPS * STEP_TOKENS), "--kv-cache-mib", "1024"]


def questions(count: int) -> list[str]:
    from importlib.resources import files

    from pf_engine.cli import DEMO_INSTRUCTION, load_problems

    shipped = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")
    return [DEMO_INSTRUCTION.format(problem=shipped[i % len(shipped)]["problem"]) for i in range(count)]


async def served(url: str, prompts: list[str], concurrency: int) -> tuple[float, list[float], list[str]]:
    """Wall seconds, per-request latencies and answers of ``prompts`` (seed = index) from ``concurrency`` clients."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600) as client:

        async def one(i: int) -> str:
            async with gate:
                start = time.perf_counter()
                answer = await client.chat.completions.create(model=openai.NOT_GIVEN, seed=i,
                                                              messages=[{"role": "user", "content": prompts[i]}])
                latencies.append(time.perf_counter() - start)
                return answer.choices[0].message.content

        start = time.perf_counter()
        texts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return time.perf_counter() - start, latencies, texts


def offline(engine, prompts: list[str]) -> tuple[float, list[str]]:
    from pf_engine import SearchConfig

    config = SearchConfig(num_particles=PARTICLES, max_steps=STEPS, max_step_tokens=STEP_TOKENS,
                          max_new_tokens=STEPS * STEP_TOKENS)
    # the server's problems: each a conversation named key 0 under its request's seed; one call for all
    problems = [{"messages": [{"role": "user", "content": p}], "key": 0, "seed": i} for i, p in enumerate(prompts)]
    start = time.perf_counter()
    results = engine.solve(problems, config)
    return time.perf_counter() - start, [r.text for r in results]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--port", type=int, default=8321)
    add_device_args(parser)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)

    from pf_engine import Engine
    from pf_engine.verifiers import arithmetic_verifier

    url = f"http://127.0.0.1:{args.port}"
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "pf_engine.cli", "serve", "--port", str(args.port),
                               "--log-level", "warning", "--device", str(device), "--dtype", args.dtype, *FLAGS],
                              cwd=tempfile.gettempdir())  # not the source folder
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit("the server exited before it was ready")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f"server ready in {time.perf_counter() - start:.1f} s (not timed)")
        engine = Engine(prm=arithmetic_verifier, kv_cache_memory=1 << 30, device=device, dtype=dtype)
        rows = []
        for concurrency in args.concurrency:
            prompts = questions(max(8, 2 * concurrency))
            served_walls, offline_walls, latencies, equal = [], [], [], 0
            for repeat in range(args.repeats):
                for way in ("served", "offline") if repeat % 2 == 0 else ("offline", "served"):
                    if way == "served":
                        wall, lat, texts = asyncio.run(served(url, prompts, concurrency))
                        served_walls.append(wall)
                        latencies += lat
                        served_texts = texts
                    else:
                        wall, offline_texts = offline(engine, prompts)
                        offline_walls.append(wall)
                    print(f"  concurrency {concurrency} repeat {repeat} {way}: {wall:.1f} s", flush=True)
                equal = sum(a == b for a, b in zip(served_texts, offline_texts, strict=True))
            count = len(prompts)
            served_rpm = 60 * count / statistics.median(served_walls)
            offline_rpm = 60 * count / statistics.median(offline_walls)
            latencies.sort()
            p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
            rows.append((concurrency, count, served_rpm, statistics.median(latencies), p95, offline_rpm, equal))
        print(f"\nSmolLM2-135M-Instruct, particle filtering N={PARTICLES}, {STEPS} x {STEP_TOKENS} tokens, "
              f"1 GiB KV each way, medians of {args.repeats} alternating runs, on {machine(device, dtype)}")
        print(f"{'clients':>7} {'requests':>8} {'served req/min':>14} {'p50 s':>6} {'p95 s':>6} "
              f"{'Engine.solve req/min':>20} {'served/solve':>12} {'same answers':>12}")
        for concurrency, count, rpm, p50, p95, base, equal in rows:
            print(f"{concurrency:>7} {count:>8} {rpm:>14.1f} {p50:>6.2f} {p95:>6.2f} {base:>20.1f} "
                  f"{rpm / base:>11.2f}x {equal:>8}/{count}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())

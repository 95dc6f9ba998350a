"""The same particle-filtering work three ways, side by side, on one machine in one run.

Policy and PRM are the same checkpoint (default: the embedded SmolLM2-135M-Instruct),
read as a token-pair PRM: after each step a tag token ("\\n"), reward =
softmax over the logits of ("+", "-") there, taken at "+". Problems are the shipped
arithmetic word problems in the demo's instruction. Every way runs particle
filtering with N particles, at most S steps of at most T tokens ending at a blank
line, temperature 0.8, weights softmax(logit(reward)), systematic resampling after
every step, and all problems in one batch. The ways alternate over --repeats runs
(A B C, then C B A, ...) and each figure is the median over the runs, so machine drift
cancels:

  pf_engine     Engine.solve: prompts prefilled once and forked, one paged KV pool,
                forks on resampling, the PRM reads each new step once
  vllm          the loop libraries run today: every step, each live particle's prompt
                plus its steps so far is resubmitted to LLM.generate(stop=["\\n\\n"]) with
                prefix caching on; the PRM re-reads each whole partial answer
                (LLM.generate of one token over the two allowed tokens, their
                processed logprobs); weights and resampling in numpy
  transformers  the same loop on transformers: generate(stop_strings) per step and a
                full forward for the PRM, nothing kept between calls

Sampled texts differ between the three (different random streams), so the tables
give work done (tokens generated, PRM tokens read) beside time and tokens/s.
KV memory: pf_engine's peak blocks in use (policy + PRM caches); vLLM's is modeled
from the token sequences of each call (distinct block-aligned prefixes of its
block size, as its prefix cache shares them, plus each sequence's partial block),
beside the pool it preallocates; transformers' is the padded batch of each call.

vLLM runs in its own virtual environment (``bash bench/setup_vllm.sh``): this
script calls that venv's python on itself with ``--worker`` once per run; its
start-up is reported, not timed. Without it the vLLM column says why it did not run.

    python bench/bench_pf_vs_vllm.py [--problems 2 --particles 4 16 64 --steps 2 4 8 --repeats 2]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import DTYPES, add_device_args, device_and_dtype, machine  # bench/ is the script's path

HERE = Path(__file__).resolve().parent
STEP_TAG, GOOD, BAD, DELIMITER = "\n", "+", "-", "\n\n"
TEMPERATURE = 0.8


# -- the loop libraries run today (vLLM and transformers) ------------------------------------------
def baseline_pf(backend, job: dict, n: int, steps: int) -> dict:
    """Particle filtering by resubmission: every step regenerates from each particle's full token list."""
    max_step, budget = job["max_step_tokens"], job["max_step_tokens"] * steps
    rng = np.random.default_rng(job["seed"])
    particles = [{"ids": [], "steps": [], "done": False, "reward": 0.5, "problem": b}
                 for b in range(len(job["prompts"])) for _ in range(n)]
    for round_ in range(steps):
        live = [p for p in particles if not p["done"]]
        if not live:
            break
        seqs = [job["prompts"][p["problem"]] + p["ids"] for p in live]
        seeds = [job["seed"] * 1_000_003 + round_ * 4096 + i for i in range(len(live))]
        limits = [min(max_step, budget - len(p["ids"])) for p in live]
        for p, (new, eos) in zip(live, backend.generate(seqs, seeds, limits), strict=True):
            p["ids"] += new
            p["steps"].append(new)
            text = backend.decode(new)
            p["done"] = eos or "\\boxed{" in text or len(p["ids"]) >= budget
        if job.get("rule_verifier"):  # pf_engine's arithmetic verifier on each partial answer's steps
            verifier = rule_verifier()
            rewards = [verifier(job["questions"][p["problem"]], [backend.decode(s) for s in p["steps"]]) for p in live]
        else:
            prm_seqs = [job["prm_prompts"][p["problem"]] + [t for s in p["steps"] for t in s + [job["tag"]]]
                        for p in live]
            rewards = backend.prm(prm_seqs)
        for p, r in zip(live, rewards, strict=True):
            p["reward"] = r
        if round_ == steps - 1:
            break
        chosen = []
        for b in range(len(job["prompts"])):
            group = particles[b * n:(b + 1) * n]
            r = np.clip([p["reward"] for p in group], 1e-6, 1 - 1e-6)
            logw = np.log(r) - np.log1p(-r)
            w = np.exp(logw - logw.max())
            cdf = np.cumsum(w / w.sum())
            points = (np.arange(n) + rng.random()) / n
            chosen += [b * n + int(min(np.searchsorted(cdf, x, side="right"), n - 1)) for x in points]
        particles = [{**particles[a], "ids": list(particles[a]["ids"]), "steps": list(particles[a]["steps"])}
                     for a in chosen]
    return {"tokens_generated": backend.generated, "prm_tokens": backend.prm_read,
            "prm_tokens_computed": backend.prm_computed, "prompt_tokens_resent": backend.resent,
            "peak_kv_bytes": backend.peak_kv_bytes}


def rule_verifier():
    """pf_engine's arithmetic step verifier, loaded from its file: the vLLM venv has no pf_engine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("verifiers", HERE.parent / "pf_engine" / "verifiers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.arithmetic_verifier


class _Counters:
    def reset(self):
        self.generated = self.prm_read = self.prm_computed = self.resent = self.peak_kv_bytes = 0


class VllmBackend(_Counters):
    def __init__(self, job):
        from vllm import LLM, SamplingParams

        self.SamplingParams = SamplingParams
        began = time.perf_counter()
        # the same dtype and, on a GPU, the same KV bytes as pf_engine's pool (on the CPU: VLLM_CPU_KVCACHE_SPACE)
        pool = {"kv_cache_memory_bytes": job["kv_cache_mib"] << 20} if job["device"].startswith("cuda") else {}
        self.llm = LLM(model=job["model"], dtype=job["dtype"], enable_prefix_caching=True, seed=job["seed"],
                       logprobs_mode="processed_logprobs", max_model_len=job["max_model_len"], **pool)
        self.startup_seconds = time.perf_counter() - began
        self.tokenizer = self.llm.get_tokenizer()
        self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
        self.kv_bytes_per_token = job["kv_bytes_per_token"]
        self.stop_ids = set(job["eos_ids"])
        self.good, self.bad = job.get("good"), job.get("bad")  # the token-pair PRM's, if any
        self.reset()

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate(self, seqs, seeds, limits):
        # Draws come from the engine's seed: per-request seeds crash vllm-cpu 0.32.0 once a seeded
        # request's prefill is chunked ("CPU Generator does not use offset").
        params = [self.SamplingParams(temperature=TEMPERATURE, max_tokens=m, stop=[DELIMITER],
                                      include_stop_str_in_output=True) for m in limits]
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        results = []
        for seq, out in zip(seqs, outs, strict=True):
            new = list(out.outputs[0].token_ids)
            self.generated += len(new)
            self.resent += len(seq)
            eos = out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason is None
            results.append((new, eos))
        self._note_kv([s + list(o.outputs[0].token_ids) for s, o in zip(seqs, outs, strict=True)])
        return results

    def prm(self, seqs):
        params = self.SamplingParams(temperature=0, max_tokens=1, allowed_token_ids=[self.good, self.bad], logprobs=2)
        outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], params, use_tqdm=False)
        self.prm_read += sum(map(len, seqs))
        self.prm_computed += sum(len(s) - (o.num_cached_tokens or 0) for s, o in zip(seqs, outs, strict=True))
        self._note_kv(seqs)
        return [math.exp(o.outputs[0].logprobs[0][self.good].logprob) for o in outs]

    def _note_kv(self, seqs):
        """Blocks a prefix-caching pool needs for these sequences at once: shared full blocks count once."""
        bs = self.block_size
        full = {tuple(s[:k * bs]) for s in seqs for k in range(1, len(s) // bs + 1)}
        blocks = len(full) + sum(1 for s in seqs if len(s) % bs)
        self.peak_kv_bytes = max(self.peak_kv_bytes, blocks * bs * self.kv_bytes_per_token)


class HfBackend(_Counters):
    def __init__(self, job):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device(job["device"])
        self.model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=DTYPES[job["dtype"]]).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(job["model"])
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else job["eos_ids"][0]
        self.eos_ids = set(job["eos_ids"])
        self.kv_bytes_per_token = job["kv_bytes_per_token"]
        self.good, self.bad = job.get("good"), job.get("bad")  # the token-pair PRM's, if any
        self.reset()

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _batch(self, seqs):
        width = max(map(len, seqs))
        ids = self.torch.tensor([[self.pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = self.torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
        return ids, mask

    def generate(self, seqs, seeds, limits):
        ids, mask = self._batch(seqs)
        self.torch.manual_seed(seeds[0])
        with self.torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=TEMPERATURE,
                                      top_k=0, max_new_tokens=max(limits), stop_strings=[DELIMITER],
                                      tokenizer=self.tokenizer, pad_token_id=self.pad)
        self.peak_kv_bytes = max(self.peak_kv_bytes, out.numel() * self.kv_bytes_per_token)
        results = []
        for seq, row, limit in zip(seqs, out[:, ids.shape[1]:].tolist(), limits, strict=True):
            new, eos = [], False
            for t in row[:limit]:
                new.append(t)
                if t in self.eos_ids:
                    eos = True
                    break
                if DELIMITER in self.decode(new):
                    break
            self.generated += len(new)
            self.resent += len(seq)
            results.append((new, eos))
        return results

    def prm(self, seqs):
        ids, mask = self._batch(seqs)
        with self.torch.inference_mode():
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -1, [self.good, self.bad]]
        self.prm_read += sum(map(len, seqs))
        self.prm_computed += sum(map(len, seqs))
        self.peak_kv_bytes = max(self.peak_kv_bytes, ids.numel() * self.kv_bytes_per_token)
        return self.torch.softmax(logits.float(), dim=-1)[:, 0].tolist()


def run_baseline(backend, job) -> list[dict]:
    rows = []
    baseline_pf(backend, job, 2, 1)  # warm-up, not reported
    for n, steps in job["configs"]:
        backend.reset()
        began = time.perf_counter()
        stats = baseline_pf(backend, job, n, steps)
        rows.append({"particles": n, "steps": steps, "seconds": time.perf_counter() - began, **stats})
    return rows


def worker(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    backend = VllmBackend(job)
    rows = run_baseline(backend, job)
    Path(out_path).write_text(json.dumps({"startup_seconds": backend.startup_seconds, "rows": rows,
                                          "block_size": backend.block_size}))


# -- pf_engine and the run --------------------------------------------------------------------------
def make_job(args) -> tuple[dict, object]:
    from importlib.resources import files

    from pf_engine.api import Engine
    from pf_engine.cli import DEMO_INSTRUCTION, load_problems
    from pf_engine.models.smollm2 import smollm2_path

    model = str(args.policy or smollm2_path())
    device, dtype = device_and_dtype(args)
    engine = Engine(policy=model, prm=model, prm_step_tag=STEP_TAG, prm_good=GOOD, prm_bad=BAD,
                    kv_cache_memory=args.kv_cache_mib << 20, device=device, dtype=dtype)
    problems = load_problems(files("pf_engine") / "data" / "arithmetic.jsonl")[: args.problems]
    questions = [DEMO_INSTRUCTION.format(problem=p["problem"]) for p in problems]
    core = engine.core
    prompts = [core.prompt_ids(q) for q in questions]
    job = {
        "model": model, "questions": questions, "prompts": prompts,
        "prm_prompts": [core.prm_prompt_ids(q) for q in questions],
        "tag": core.prm.marker_id, "good": int(core.prm.pair[0]), "bad": int(core.prm.pair[1]),
        "eos_ids": sorted(core.eos_ids), "max_step_tokens": args.max_step_tokens, "seed": args.seed,
        "kv_cache_mib": args.kv_cache_mib, "device": str(device), "dtype": args.dtype,
        "kv_bytes_per_token": engine.policy.kv_cache.bytes_per_block // engine.block_size,
        "max_model_len": max(map(len, prompts)) + 2 * args.max_step_tokens * max(args.steps) + 64,
        "configs": sorted({(n, args.fixed_steps) for n in args.particles}
                          | {(args.fixed_particles, s) for s in args.steps}),
    }
    return job, engine


def run_pf_engine(engine, job) -> list[dict]:
    from pf_engine.search.config import SearchConfig

    def config(n, steps):
        return SearchConfig(num_particles=n, max_steps=steps, max_step_tokens=job["max_step_tokens"],
                            max_new_tokens=job["max_step_tokens"] * steps, step_delimiter=DELIMITER,
                            temperature=TEMPERATURE, seed=job["seed"])

    engine.solve(job["questions"], config(2, 1))  # warm-up, not reported
    rows = []
    block_bytes = engine.policy.kv_cache.bytes_per_block
    prm_block_bytes = engine.core.prm.runner.kv_cache.bytes_per_block
    for n, steps in job["configs"]:
        began = time.perf_counter()
        results = engine.solve(job["questions"], config(n, steps))
        seconds = time.perf_counter() - began
        stats = [r.stats for r in results]  # each problem's own counts, and the call's peaks
        rows.append({"particles": n, "steps": steps, "seconds": seconds,
                     "tokens_generated": sum(s["tokens_generated"] for s in stats),
                     "prm_tokens": sum(s["prm_tokens"] for s in stats),
                     "prm_tokens_computed": sum(s["prm_tokens"] for s in stats),
                     "prompt_tokens_resent": 0,
                     "peak_kv_bytes": max(s["peak_blocks"] * block_bytes + s["peak_prm_blocks"] * prm_block_bytes
                                          for s in stats)})
    return rows


def vllm_pool_gib(job) -> str:
    """vLLM's CPU pool (VLLM_CPU_KVCACHE_SPACE, whole GiB): pf_engine's pool unless the environment says."""
    return os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(job["kv_cache_mib"] / 1024))))


def run_vllm(job, vllm_python: str | None, log: Path) -> tuple[dict | None, str]:
    if not vllm_python or not Path(vllm_python).exists():
        return None, f"not run: no vLLM environment at {vllm_python} (bash bench/setup_vllm.sh makes one)"
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": vllm_pool_gib(job)}
        with open(log, "w") as f:
            proc = subprocess.run([vllm_python, __file__, "--worker", str(job_path), str(out_path)], env=env,
                                  stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            errors = [line for line in log.read_text().splitlines() if "Error" in line] or ["no error line"]
            return None, f"failed (exit {proc.returncode}, see {log.name}): {errors[-1].strip()}"
        return json.loads(out_path.read_text()), "ok"


def medians(runs: list[list[dict]]) -> list[dict]:
    """Each config's figures, the median over the runs of a way."""
    return [{k: rows[0][k] if k in ("particles", "steps") else statistics.median(r[k] for r in rows) for k in rows[0]}
            for rows in zip(*runs, strict=True)]


def table(job, ours, others: dict) -> str:
    lines = ["| N | steps | way | s / problem | tokens gen. | gen. tok/s | PRM tokens read | PRM tokens computed "
             "| prompt tokens resent | peak KV MiB | pf_engine time ratio | pf_engine KV ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    num_problems = len(job["prompts"])
    for i, mine in enumerate(ours):
        for name, rows in [("pf_engine", ours)] + list(others.items()):
            if rows is None:
                continue
            r = rows[i]
            ratio = f"{r['seconds'] / mine['seconds']:.2f}x" if name != "pf_engine" else ""
            kv_ratio = f"{mine['peak_kv_bytes'] / r['peak_kv_bytes']:.3f}" if name != "pf_engine" else ""
            lines.append(f"| {r['particles']} | {r['steps']} | {name} | {r['seconds'] / num_problems:.2f} "
                         f"| {r['tokens_generated']:.0f} | {r['tokens_generated'] / r['seconds']:.0f} "
                         f"| {r['prm_tokens']:.0f} | {r['prm_tokens_computed']:.0f} | {r['prompt_tokens_resent']:.0f} "
                         f"| {r['peak_kv_bytes'] / 2**20:.1f} | {ratio} | {kv_ratio} |")
    return "\n".join(lines)


def plot(job, ours, others, path: Path, fixed_particles: int, fixed_steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in [("pf_engine", ours)] + list(others.items()):
        if rows is None:
            continue
        by_n = sorted((r["particles"], r["seconds"] / len(job["prompts"])) for r in rows if r["steps"] == fixed_steps)
        by_s = sorted((r["steps"], r["prm_tokens"]) for r in rows if r["particles"] == fixed_particles)
        left.plot(*zip(*by_n, strict=True), marker="o", label=name)
        right.plot(*zip(*by_s, strict=True), marker="o", label=name)
    left.set(xscale="log", xlabel="particles N", ylabel="seconds per problem", title=f"time vs N ({fixed_steps} steps)")
    sizes = sorted({r["particles"] for r in ours if r["steps"] == fixed_steps})
    left.set_xticks(sizes, [str(n) for n in sizes])
    left.minorticks_off()
    right.set(xlabel="steps", ylabel="PRM tokens read", title=f"PRM tokens vs steps (N = {fixed_particles})")
    for ax in (left, right):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--policy", default=None,
                        help="checkpoint folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--particles", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--fixed-steps", type=int, default=4, help="steps of the particle sweep")
    parser.add_argument("--fixed-particles", type=int, default=16, help="particles of the step sweep")
    parser.add_argument("--max-step-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-mib", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each way, alternating")
    parser.add_argument("--vllm-python", default=str(HERE / ".vllm-venv" / "bin" / "python"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["vllm", "transformers"])
    parser.add_argument("--out", default=str(HERE / "out" / "pf_vs_vllm"))
    add_device_args(parser)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    job, engine = make_job(args)
    print(f"{len(job['prompts'])} problems, configs (N, steps): {job['configs']}, "
          f"<= {args.max_step_tokens} tokens/step", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes = {way: f"not run: --skip {way}" for way in args.skip}
    hf = None if "transformers" in args.skip else HfBackend(job)

    def run(way) -> list[dict] | None:
        if way == "pf_engine":
            return run_pf_engine(engine, job)
        if way == "transformers":
            notes[way] = "ok"
            return run_baseline(hf, job)
        out, notes[way] = run_vllm(job, args.vllm_python, out_dir / "vllm_worker.log")
        if out:
            notes[way] = (f"ok; start-up {out['startup_seconds']:.0f} s a run (not timed); block size "
                          f"{out['block_size']}; pool VLLM_CPU_KVCACHE_SPACE={vllm_pool_gib(job)} GiB on CPU "
                          f"(pf_engine: {job['kv_cache_mib']} MiB)")
        return out and out["rows"]

    ways = ["pf_engine"] + [way for way in ("vllm", "transformers") if way not in args.skip]
    runs = {way: [] for way in ways}
    for repeat in range(args.repeats):  # A B C, then C B A, ...
        for way in ways if repeat % 2 == 0 else ways[::-1]:
            if not runs[way] or runs[way][-1] is not None:  # a way that could not run is not tried again
                runs[way].append(run(way))
    ours = medians(runs["pf_engine"])
    others = {way: medians(runs[way]) if runs.get(way) and runs[way][-1] is not None else None
              for way in ("vllm", "transformers")}

    report = "\n".join([
        f"# pf_engine vs vLLM vs transformers: particle filtering, {machine(*device_and_dtype(args))}",
        "",
        f"{len(job['prompts'])} problems, <= {args.max_step_tokens} tokens per step, temperature {TEMPERATURE}, "
        f"model {Path(job['model']).name} (policy and token-pair PRM); medians of {args.repeats} alternating runs. "
        "Ratios: baseline time / pf_engine time, pf_engine KV / baseline KV.",
        "",
        *[f"- {name}: {note}" for name, note in notes.items()],
        "",
        table(job, ours, others),
        "",
    ])
    (out_dir / "results.md").write_text(report)
    (out_dir / "results.json").write_text(json.dumps({"job": {k: v for k, v in job.items() if "prompt" not in k},
                                                      "pf_engine": ours, **others, "notes": notes, "runs": runs},
                                                     indent=1))
    plot(job, ours, others, out_dir / "results.png", args.fixed_particles, args.fixed_steps)
    print(report)
    print(f"written: {out_dir / 'results.md'}, {out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

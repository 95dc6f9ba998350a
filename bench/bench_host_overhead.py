"""Host cost of the engine's step loop per particle and token, with a model that costs nothing.

A stand-in policy returns hidden states without computing anything and the same
logits row for every particle (a character vocabulary, so that sampling is
cheap too), and a rule verifier scores steps. Everything else is the real
engine: the scheduler, the block manager's appends and forks, attention
metadata, the backend's plan, keyed Philox draws, sampling, step-end tests,
resampling. Reported: host microseconds per particle-token and the host share
of each decode step, beside the same loop written as engines outside pf_engine
write it (a per-particle Python loop that decodes the step text on every
token), in the same run, alternating the two (A B A B) and taking medians.

    python bench/bench_host_overhead.py [--particles 1024 4096] [--repeats 3]
"""

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pf_engine import Engine, SearchConfig
from pf_engine.philox import philox_key, philox_uniform
from pf_engine.sampling import sample

HIDDEN = 8


class StandIn(torch.nn.Module):
    """A policy that computes nothing: zero hidden states, one fixed logits row for everybody."""

    def __init__(self, tokenizer, seed=0):
        super().__init__()
        vocab = len(tokenizer)
        self.config = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, num_attention_heads=1,
                                      head_dim=HIDDEN, hidden_size=HIDDEN, vocab_size=vocab,
                                      eos_token_id=tokenizer.eos_token_id)
        gen = torch.Generator().manual_seed(seed)
        row = torch.randn(vocab, generator=gen)
        row[tokenizer.eos_token_id] = -30.0  # particles end their steps at the token cap, never early
        self.register_buffer("row", row)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the runner a dtype and a device

    def forward(self, input_ids, meta, backend, kv):
        backend.plan(meta, 1.0, 1, 1, HIDDEN, torch.float32)  # the attention plan is host work too
        return torch.zeros(input_ids.shape[0], HIDDEN)

    def compute_logits(self, hidden):
        return self.row.expand(hidden.shape[0], -1)


def char_tokenizer():
    """The tests' character tokenizer (tests/tiny.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny", Path(__file__).resolve().parents[1] / "tests" / "tiny.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    return tiny.char_tokenizer()


def reward(question, steps):
    return 0.2 + 0.6 * (len(steps[-1]) % 3) / 2


def engine_run(engine, config, problems) -> tuple[float, int, float]:
    """(seconds, tokens drawn, seconds of decode iterations) for one solve."""
    began = time.perf_counter()
    results = engine.solve(problems, config)
    seconds = time.perf_counter() - began
    return seconds, sum(r.stats["tokens_generated"] for r in results), engine.core.stats["seconds_decode"]


def python_loop(engine, config, problems) -> tuple[float, int]:
    """The same decoding as engines outside pf_engine write it: particles as Python objects,
    each token appended to a list, the step's text decoded on every token to look for the
    delimiter. Only the decode loop (no PRM, no resampling): a lower bound on its cost."""
    tokenizer, model = engine.core.tokenizer, engine.policy.model
    n = config.num_particles
    particles = [{"problem": b, "slot": s, "tokens": [], "done": False} for b in range(len(problems)) for s in range(n)]
    began, drawn = time.perf_counter(), 0
    for round_ in range(config.max_steps):
        for p in particles:
            p["tokens"], p["done"] = [], False
        writing = list(particles)
        while writing:
            keys = philox_key([p["problem"] for p in writing], round_, [p["slot"] for p in writing],
                              [len(p["tokens"]) for p in writing])
            logits = model.compute_logits(torch.zeros(len(writing), HIDDEN))
            tokens = sample(logits, config.sampling, uniforms=philox_uniform(config.seed, keys)).tolist()
            still = []
            for p, token in zip(writing, tokens, strict=True):
                p["tokens"].append(token)
                text = tokenizer.decode(p["tokens"], skip_special_tokens=True)
                if not (config.step_delimiter in text or len(p["tokens"]) >= config.max_step_tokens):
                    still.append(p)
            drawn += len(writing)
            writing = still
    return time.perf_counter() - began, drawn


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, nargs="+", default=[1024, 4096], help="particles in flight")
    parser.add_argument("--per-problem", type=int, default=64, help="particles per problem")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    tokenizer = char_tokenizer()
    model = StandIn(tokenizer)
    config = SearchConfig(num_particles=args.per_problem, max_steps=args.steps, max_step_tokens=args.step_tokens,
                          max_new_tokens=args.steps * args.step_tokens, stop_at_boxed=False, temperature=1.0)
    print(f"stand-in policy (vocab {len(tokenizer)}, no compute), rule verifier, {args.per_problem} particles a "
          f"problem, {args.steps} steps x {args.step_tokens} tokens, torch threads {torch.get_num_threads()}, "
          f"medians of {args.repeats} alternating runs")
    print(f"{'particles':>10} {'engine us/tok':>14} {'decode share':>13} {'loop us/tok':>12} {'loop/engine':>12}")
    for total in args.particles:
        problems = [f"problem {i}" for i in range(total // args.per_problem)]
        blocks_needed = total * (args.steps * args.step_tokens // 16 + 2) + 64
        engine = Engine(policy=model, tokenizer=tokenizer, prm=reward, backend="torch",
                        kv_cache_memory=blocks_needed * 16 * 2 * HIDDEN * 4)
        engine_run(engine, config, problems[:1])  # warm-up: step-end tables, allocations
        ours, theirs, shares = [], [], []
        for _ in range(args.repeats):  # A B A B
            engine.core.stats["seconds_decode"] = 0.0
            seconds, drawn, decode = engine_run(engine, config, problems)
            ours.append(seconds / drawn * 1e6)
            shares.append(decode / seconds)
            seconds, drawn = python_loop(engine, config, problems)
            theirs.append(seconds / drawn * 1e6)
        a, b = statistics.median(ours), statistics.median(theirs)
        print(f"{total:>10} {a:>14.2f} {statistics.median(shares):>12.0%} {b:>12.2f} {b / a:>11.1f}x")
    print("target: <= 1.5 us per particle-token at 4096 particles (the decode share is the token loop's part "
          "of the engine's time; the rest is rounds: scoring, resampling, tree)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()

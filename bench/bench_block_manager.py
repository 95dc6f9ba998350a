"""KV-block bookkeeping of a particle-filtering run: native BlockManager vs plain Python.

Scenario (defaults): 64 problems x 64 particles, 1,000-token trajectories in
steps of 50 tokens, block_size 16. Each problem's prompt is allocated once and
forked into its particles; every decoded token appends one slot to every
particle and exports the page table (as each forward needs); after every step
all particles of all problems are resampled in one call. Both managers get the
same calls and the same ancestors, and must end in the same state.

    python bench/bench_block_manager.py [--problems 64 --particles 64 --tokens 1000]
"""

import argparse
import statistics
import time

import numpy as np

from pf_engine import BlockManager
from pf_engine.block_manager_ref import PyBlockManager


def systematic_ancestors(rng, num_problems, num_particles):
    """Global ancestor indices: systematic resampling within each problem, random weights."""
    weights = rng.random((num_problems, num_particles))
    weights /= weights.sum(axis=1, keepdims=True)
    cdf = np.cumsum(weights, axis=1)
    cdf[:, -1] = 1.0
    points = (rng.random((num_problems, 1)) + np.arange(num_particles)) / num_particles
    local = np.stack([np.searchsorted(c, p, side="right") for c, p in zip(cdf, points, strict=True)])
    return (local + np.arange(num_problems)[:, None] * num_particles).ravel()


def run(manager_cls, args, ancestors_per_step):
    blocks_per_particle = -(-(args.prompt_tokens + args.tokens) // args.block_size) + 1
    bm = manager_cls(args.problems * args.particles * blocks_per_particle, args.block_size)
    start = time.perf_counter()
    particles = []
    for _ in range(args.problems):
        prompt = bm.allocate(args.prompt_tokens)
        particles += [prompt] + [bm.fork(prompt) for _ in range(args.particles - 1)]
    ones = np.ones(len(particles), dtype=np.int64)
    for ancestors in ancestors_per_step:
        for _ in range(args.step_tokens):
            bm.append(particles, ones)
            bm.page_table(particles)
        particles = bm.resample(particles, ancestors)
    elapsed = time.perf_counter() - start
    return elapsed, bm, particles


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1000, help="trajectory length per particle")
    parser.add_argument("--step-tokens", type=int, default=50)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    args = parser.parse_args()
    if args.tokens % args.step_tokens:
        parser.error("--tokens must be a multiple of --step-tokens")

    rng = np.random.default_rng(0)
    ancestors_per_step = [
        systematic_ancestors(rng, args.problems, args.particles) for _ in range(args.tokens // args.step_tokens)
    ]
    times = {}
    finals = {}
    for name, cls in (("native", BlockManager), ("python", PyBlockManager)):
        run(cls, args, ancestors_per_step[:1])  # warm-up
        samples = []
        for _ in range(args.repeats):
            elapsed, bm, particles = run(cls, args, ancestors_per_step)
            samples.append(elapsed)
        times[name] = statistics.median(samples)
        finals[name] = [a.tolist() for a in bm.page_table(particles)] + [bm.num_free_blocks]
    assert finals["native"] == finals["python"], "the two managers ended in different states"

    num_particles = args.problems * args.particles
    print(
        f"{args.problems} problems x {args.particles} particles, {args.tokens} tokens in steps of "
        f"{args.step_tokens}, block_size {args.block_size}: {num_particles * args.tokens:,} appends, "
        f"{args.tokens} page-table exports, {args.tokens // args.step_tokens} resamples"
    )
    print(f"{'manager':<10}{'median s':>12}{'us/token step':>16}")
    for name in ("native", "python"):
        print(f"{name:<10}{times[name]:>12.3f}{1e6 * times[name] / args.tokens:>16.1f}")
    print(f"native is {times['python'] / times['native']:.1f}x faster than python (target >= 20x)")


if __name__ == "__main__":
    main()

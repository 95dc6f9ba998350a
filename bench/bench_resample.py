"""Per-step host work of particle filtering: PRM logits -> rewards -> weights -> ESS ->
systematic resampling -> ancestors, for 64 problems x 64 particles.

Four ways, same semantics and the same uniforms (ancestors compared with the loop's):
  loop       per-problem Python/numpy, the way Python search loops do it today
             (numpy softmax per problem, systematic resampling in a while loop)
  reference  pf_engine's vectorized torch reference (the test oracle)
  native     pf_engine's CPU path: one pass of the native extension
  kernel     pf_engine's fused Triton kernel, one launch (only with --device cuda)

    python bench/bench_resample.py [--problems 64 --particles 64 --device cpu|cuda]
"""

import argparse
import math
import statistics
import time

import numpy as np
import torch

from pf_engine.resample import ResampleParams, resample
from pf_engine.resample_reference import fused_resample_reference


def python_loop(seg, logits, aggregates, uniforms, temperature, clip):
    """Per-problem bookkeeping as Python search loops write it."""
    ancestors, ess_all = [], []
    for b in range(len(seg) - 1):
        start, end = seg[b], seg[b + 1]
        n = end - start
        rewards = []
        for i in range(start, end):
            bad, good = logits[i]
            reward = math.exp(good) / (math.exp(good) + math.exp(bad))
            aggregates[i] = reward  # "last" aggregation
            rewards.append(min(max(reward, clip), 1 - clip))
        logw = np.log(rewards) - np.log1p(-np.array(rewards))
        logw = logw / temperature
        weights = np.exp(logw - logw.max())
        weights /= weights.sum()
        ess_all.append(1.0 / np.sum(weights**2))
        cumulative = np.cumsum(weights)
        positions = (np.arange(n) + uniforms[start]) / n * cumulative[-1]
        chosen, i, j = [0] * n, 0, 0
        while i < n:
            if positions[i] < cumulative[j] or j == n - 1:
                chosen[i] = start + j
                i += 1
            else:
                j += 1
        ancestors += chosen
    return np.array(ancestors), np.array(ess_all)


def timed(fn, repeats, sync=lambda: None):
    fn()  # warm-up (and compile)
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    num = args.problems * args.particles
    seg = np.arange(args.problems + 1) * args.particles
    logits = 2 * torch.randn(num, 2, generator=gen)
    uniforms = torch.rand(num, generator=gen)
    params = ResampleParams(reward="class_logits", aggregation="last", scheme="systematic")
    live = torch.ones(num, dtype=torch.bool)
    agg, steps = torch.zeros(num), torch.zeros(num, dtype=torch.int32)

    logits_list, uniforms_np = logits.tolist(), uniforms.numpy().astype(np.float64)
    agg_list = [0.0] * num
    t_loop = timed(lambda: python_loop(seg, logits_list, agg_list, uniforms_np, params.temperature, params.clip),
                   args.repeats)
    loop_ancestors, _ = python_loop(seg, logits_list, agg_list, uniforms_np, params.temperature, params.clip)

    inputs = (seg, logits, live, agg, steps, params)

    def ref():
        return fused_resample_reference(*inputs, uniforms=uniforms)

    def native():
        return resample(*inputs, uniforms=uniforms)  # the native pass on CPU tensors

    t_ref, t_native = timed(ref, args.repeats), timed(native, args.repeats)
    mismatched = {"reference": int((ref().ancestors.numpy() != loop_ancestors).sum()),
                  "native": int((native().ancestors.numpy() != loop_ancestors).sum())}

    print(f"{args.problems} problems x {args.particles} particles, one resampling step (systematic, last, T=1), "
          f"torch threads: {torch.get_num_threads()}")
    print(f"{'implementation':<28}{'median':>12}{'vs loop':>10}")
    print(f"{'python/numpy loop (cpu)':<28}{t_loop * 1e6:>10.0f}us{1.0:>9.1f}x")
    print(f"{'torch reference (cpu)':<28}{t_ref * 1e6:>10.0f}us{t_loop / t_ref:>9.1f}x")
    print(f"{'native (cpu)':<28}{t_native * 1e6:>10.0f}us{t_loop / t_native:>9.1f}x")
    if args.device == "cuda":
        inputs = (seg, logits.cuda(), live.cuda(), agg.cuda(), steps.cuda(), params)
        g_uniforms = uniforms.cuda()

        def kernel():
            return resample(*inputs, uniforms=g_uniforms)  # the Triton kernel on CUDA tensors

        t_kernel = timed(kernel, args.repeats, torch.cuda.synchronize)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            kernel()
        end.record()
        torch.cuda.synchronize()
        mismatched["kernel"] = int((kernel().ancestors.cpu().numpy() != loop_ancestors).sum())
        print(f"{'triton kernel (gpu, call)':<28}{t_kernel * 1e6:>10.0f}us{t_loop / t_kernel:>9.1f}x")
        per_call = start.elapsed_time(end) * 10  # ms for 100 calls -> us per call
        print(f"{'triton kernel (gpu, events)':<28}{per_call:>10.1f}us per call of 100 back to back")
    # The loop weighs in float64, pf_engine in float32: a point within rounding of a cdf step may differ.
    print(f"ancestors differing from the loop's of {len(loop_ancestors)} (same uniforms): "
          + ", ".join(f"{name} {count}" for name, count in mismatched.items()))
    print(f"target: >= 50x the loop on CPU -> native {t_loop / t_native:.1f}x (torch reference {t_loop / t_ref:.1f}x)")


if __name__ == "__main__":
    main()

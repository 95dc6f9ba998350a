"""The three CPU paths that carry a decode step, each beside the way torch does it by default.

  linear     SmolLM2-135M's layer shapes and its LM head (49,152 x 576), 64 rows: oneDNN over a
             weight packed once (pf_engine's Linear) against torch.nn.functional.linear (MKL)
  attention  one layer of decode for 64 particles of 400 tokens, SmolLM2's heads (9 query, 3 KV,
             head_dim 64): the native pass (NativePlan) against gathering every page and running
             torch's scaled_dot_product_attention (TorchPlan); particles with blocks of their own,
             then particles sharing all their blocks (a problem's prompt)
  draws      64 rows of a 49,152-token distribution, fresh from the LM head and a softmax as in a
             decode step (only the draw is timed): the native inverse CDF against the float64
             running sums and searchsorted in torch; tokens compared

Medians of --repeats calls each, the two ways alternating, float32, torch's thread count.

    python bench/bench_cpu_kernels.py [--repeats 30]
"""

import argparse
import statistics
import time

import numpy as np
import torch

from pf_engine import KVCache
from pf_engine.attention import build_metadata
from pf_engine.attention.torch_backend import NativePlan, TorchPlan
from pf_engine.models.linear import Linear
from pf_engine.sampling import inverse_cdf, inverse_cdf_reference

HIDDEN, INTERMEDIATE, VOCAB, ROWS = 576, 1536, 49152, 64
LINEAR_SHAPES = {"q/o proj": (HIDDEN, HIDDEN), "k/v proj": (192, HIDDEN), "gate/up proj": (INTERMEDIATE, HIDDEN),
                 "down proj": (HIDDEN, INTERMEDIATE), "lm head": (VOCAB, HIDDEN)}


def alternate(fast, slow, repeats: int, make_input=lambda: None) -> tuple[float, float]:
    """Median seconds of ``fast`` and ``slow``, called in turn after a warm-up, each on a fresh
    ``make_input()`` (not timed)."""
    fast(make_input()), slow(make_input())
    times = ([], [])
    for _ in range(repeats):
        for way, f in enumerate((fast, slow)):
            x = make_input()
            began = time.perf_counter()
            f(x)
            times[way].append(time.perf_counter() - began)
    return statistics.median(times[0]), statistics.median(times[1])


def linear_case(out_features: int, in_features: int, repeats: int) -> tuple[float, float]:
    layer = Linear(in_features, out_features, bias=False)
    layer.pack()
    x = torch.randn(ROWS, in_features)
    return alternate(layer, lambda x: torch.nn.functional.linear(x, layer.weight), repeats, lambda: x)


def attention_case(shared: bool, repeats: int) -> tuple[float, float]:
    num_q_heads, num_kv_heads, head_dim, length, block_size = 9, 3, 64, 400, 16
    cache = KVCache(num_layers=1, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=ROWS * 26 + 8,
                    block_size=block_size, dtype=torch.float32)
    cache.kv.normal_(generator=torch.Generator().manual_seed(0))
    bm = cache.manager
    if shared:
        root = bm.allocate(length - 1)
        seqs = [root] + [bm.fork(root) for _ in range(ROWS - 1)]
    else:
        seqs = [bm.allocate(length - 1) for _ in range(ROWS)]
    ones = np.ones(ROWS, dtype=np.int64)
    slots, copies = bm.append(seqs, ones)
    cache.copy_blocks(copies)
    meta = build_metadata(bm, seqs, ones, slots, "cpu")
    q = torch.randn(ROWS, num_q_heads, head_dim)
    k, v = torch.randn(ROWS, num_kv_heads, head_dim), torch.randn(ROWS, num_kv_heads, head_dim)
    native, gather = NativePlan(meta, head_dim**-0.5), TorchPlan(meta, head_dim**-0.5)
    torch.testing.assert_close(native.attend(q, k, v, cache.kv[0]), gather.attend(q, k, v, cache.kv[0]),
                               atol=1e-5, rtol=1e-5)
    return alternate(lambda _: native.attend(q, k, v, cache.kv[0]), lambda _: gather.attend(q, k, v, cache.kv[0]),
                     repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"float32, {torch.get_num_threads()} torch threads, medians of {args.repeats} alternating calls")
    print(f"{'path':<40} {'pf_engine':>12} {'torch default':>14} {'speed-up':>9}")

    def row(name, ours, theirs, unit="us", scale=1e6):
        print(f"{name:<40} {ours * scale:>10.1f}{unit} {theirs * scale:>12.1f}{unit} {theirs / ours:>8.2f}x")

    with torch.inference_mode():
        for name, (out_features, in_features) in LINEAR_SHAPES.items():
            ours, theirs = linear_case(out_features, in_features, args.repeats)
            gflops = 2 * ROWS * in_features * out_features / 1e9
            row(f"linear {name} (GFLOPS {gflops / ours:.0f} vs {gflops / theirs:.0f})", ours, theirs)
        for shared in (False, True):
            row(f"attention, {'shared' if shared else 'own'} blocks", *attention_case(shared, args.repeats))
        head = Linear(HIDDEN, VOCAB, bias=False)
        head.pack()
        hidden, uniforms = torch.randn(ROWS, HIDDEN), torch.rand(ROWS)

        def step_probs():
            return head(hidden).softmax(-1)

        probs = step_probs()
        differ = int((inverse_cdf(probs, uniforms) != inverse_cdf_reference(probs, uniforms)).sum())
        ours, theirs = alternate(lambda p: inverse_cdf(p, uniforms), lambda p: inverse_cdf_reference(p, uniforms),
                                 args.repeats, step_probs)
        row(f"draws ({differ} of {ROWS} tokens differ)", ours, theirs)


if __name__ == "__main__":
    main()

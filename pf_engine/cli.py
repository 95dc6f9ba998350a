"""The ``pf-engine`` command."""

import argparse
import sys

import numpy as np
import torch

from pf_engine import _native
from pf_engine.errors import OutOfBlocksError
from pf_engine.kv_cache import KVCache


def selfcheck() -> int:
    """Share, fork, resample and copy-on-write a small KV cache; check every token reads back."""
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pf-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("selfcheck", help="check the native block manager and the KV cache on this machine")
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        return selfcheck()
    return 2


if __name__ == "__main__":
    sys.exit(main())

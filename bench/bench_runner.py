"""Decode throughput and KV memory of N particles sharing one prompt, on SmolLM2-135M-Instruct.

  pf_engine     the prompt is prefilled once and forked into N particles that
                share its KV blocks; each decode step is one batched forward
  transformers  generate() on N copies of the prompt (no sharing), the same
                number of new tokens per sequence

Both sample the same number of tokens per particle; decode time excludes the
prompt's prefill (for transformers, generate(1 token) is timed and subtracted).

    python bench/bench_runner.py [--particles 64 --prompt-tokens 512 --new-tokens 32 --device cuda --dtype bfloat16]
"""

import argparse

import torch
from common import add_device_args, clock, device_and_dtype, machine

from pf_engine.models import load_model
from pf_engine.models.smollm2 import smollm2_path
from pf_engine.runner import ModelRunner
from pf_engine.sampling import SamplingParams, sample


def prompt_tokens(tokenizer, length):
    text = " ".join(f"Step {i}: add {i} apples to the basket and count them again." for i in range(length))
    return tokenizer(text)["input_ids"][:length]


def run_pf_engine(model, prompt, args):
    blocks_per_particle = -(-(len(prompt) + args.new_tokens) // args.block_size)
    runner = ModelRunner(model, num_blocks=args.particles * blocks_per_particle, block_size=args.block_size,
                         backend=args.backend)
    bm = runner.manager
    gen = torch.Generator(args.device).manual_seed(0)
    params = SamplingParams(temperature=1.0)
    start = clock(args.device)
    root = bm.allocate(0)
    logits = runner.logits(runner.forward([root], [prompt]))[-1:]
    particles = [root] + [bm.fork(root) for _ in range(args.particles - 1)]
    prefill = clock(args.device) - start
    logits = logits.expand(args.particles, -1)
    start = clock(args.device)
    for _ in range(args.new_tokens):
        tokens = sample(logits, params, gen)
        logits = runner.logits(runner.forward(particles, [[t] for t in tokens.tolist()]))
    decode = clock(args.device) - start
    kv_bytes = (bm.num_blocks - bm.num_free_blocks) * runner.kv_cache.bytes_per_block
    return prefill, decode, kv_bytes


def run_transformers(path, prompt, args):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=args.torch_dtype).to(args.device).eval()
    batch = torch.tensor([prompt] * args.particles, device=args.device)
    torch.manual_seed(0)

    def generate(new_tokens):
        start = clock(args.device)
        with torch.no_grad():
            out = hf.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, return_dict_in_generate=True, pad_token_id=0)
        return clock(args.device) - start, out

    prefill, _ = generate(1)
    total, out = generate(args.new_tokens)
    cache = out.past_key_values
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    return prefill, total - prefill, kv_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--backend", default="auto")
    add_device_args(parser)
    args = parser.parse_args()
    args.device, args.torch_dtype = device_and_dtype(args)

    from transformers import AutoTokenizer

    path = smollm2_path()
    prompt = prompt_tokens(AutoTokenizer.from_pretrained(path), args.prompt_tokens)
    model, _ = load_model(path, dtype=args.torch_dtype, device=args.device)
    run_pf_engine(model, prompt[:32], argparse.Namespace(**{**vars(args), "new_tokens": 2}))  # warm-up
    ours = run_pf_engine(model, prompt, args)
    theirs = run_transformers(path, prompt, args)

    generated = args.particles * args.new_tokens
    print(f"SmolLM2-135M-Instruct, {args.particles} particles, {len(prompt)}-token prompt, "
          f"{args.new_tokens} new tokens each, on {machine(args.device, args.torch_dtype)}")
    print(f"{'':<14}{'prefill s':>11}{'decode s':>10}{'decode tok/s':>14}{'KV MiB':>9}")
    for name, (prefill, decode, kv) in (("pf_engine", ours), ("transformers", theirs)):
        print(f"{name:<14}{prefill:>11.2f}{decode:>10.2f}{generated / decode:>14.1f}{kv / 2**20:>9.1f}")
    print(f"decode throughput: pf_engine / transformers = {theirs[1] / ours[1]:.2f}x (target >= 1)")
    print(f"KV memory: pf_engine / transformers = {ours[2] / theirs[2]:.3f} (target <= 0.125)")


if __name__ == "__main__":
    main()

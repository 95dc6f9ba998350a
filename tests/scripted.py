"""Tiny policies whose next token is a chosen function of the current token, for tests of step logic.

The model is a one-layer Llama whose attention and MLP write nothing (their output projections are
zero), with one-hot embeddings: the hidden state of a token is its one-hot vector, the final RMSNorm
scales it by sqrt(hidden_size), and the untied LM head maps it to the next token's logits::

    logits(next = y | current = x) = table[x][y]   (LOW for a y the table does not name)

so ``table = {x: {y: 0.0}}`` makes y follow x with probability 1 - O(vocab * e^LOW), and
``{x: {y1: 0.0, y2: 0.0}}`` draws y1 or y2 with equal odds. The vocabulary is the character
tokenizer of tests/tiny.py over ``tokens`` (multi-character tokens decode whole; the prompt is
encoded character by character, so its last token is "\\n").
"""

import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tiny import char_tokenizer

LOW = -60.0
EOS = "<eos>"


def save_table_policy(folder, tokens, table):
    """Save the policy; ``table`` maps a token (or EOS) to {next token (or EOS): logit}."""
    tokenizer = char_tokenizer(tokens)
    vocab = tokenizer.get_vocab()
    size = len(tokenizer)
    head_dim = 2 * math.ceil(size / 4)  # hidden_size >= vocab, two heads of even width (rotary)
    hidden = 2 * head_dim
    config = LlamaConfig(vocab_size=size, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False,
                         rms_norm_eps=1e-12)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(size, hidden))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        head = torch.full((size, hidden), LOW)
        for x, row in table.items():
            for y, logit in row.items():
                head[vocab[y], vocab[x]] = logit
        model.lm_head.weight.copy_(head / math.sqrt(hidden))  # the norm scales a one-hot by sqrt(hidden)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_chain_policy(folder, chain, then=EOS, extra=()):
    """A policy that writes ``chain`` (distinct tokens) after the prompt, then ``then``: EOS, or a token
    of the chain to loop back to (the policy never stops)."""
    assert len(set(chain)) == len(chain) and "\n" not in chain, "a chain token must say which token follows"
    tokens = ["?", "\n", *chain, *extra]
    table = {a: {b: 0.0} for a, b in zip(["\n", *chain], [*chain, then], strict=True)}
    return save_table_policy(folder, tokens, table)

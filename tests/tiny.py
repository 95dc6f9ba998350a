"""Tiny random checkpoints with a character-level tokenizer, for end-to-end tests."""

import string

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHARS = list(string.ascii_letters + string.digits + " .,+-*/=?()\\{}\n")
SPECIALS = ["<eos>", "<pad>"]


def char_tokenizer(chars=CHARS, eos=True) -> PreTrainedTokenizerFast:
    """eos=False: "<eos>" is an ordinary token (text "<eos>"), so nothing ends a sequence."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>" if eos else None, pad_token="<pad>")


def save_tiny_policy(folder, seed=0, chars=CHARS, eos=True, family="Llama", **config):
    """A random causal LM of ``family`` (transformers' class prefix: Llama, Qwen3, Granite, Phi3) over
    a character vocabulary, saved with its tokenizer."""
    tokenizer = char_tokenizer(chars, eos)
    torch.manual_seed(seed)
    settings = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                    eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    config_class = getattr(transformers, family + "Config")
    model = getattr(transformers, family + "ForCausalLM")(config_class(**(settings | config))).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer

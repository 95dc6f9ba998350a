"""The model runner against transformers' own forward of the same checkpoints."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from pf_engine import OutOfBlocksError, _native
from pf_engine.models import load_model
from pf_engine.runner import ModelRunner
from pf_engine.sampling import SamplingParams, inverse_cdf, inverse_cdf_reference, sample

VOCAB = 101
# (architecture, tied embeddings): GQA everywhere (4 query heads, 2 KV heads)
MODELS = [("llama", True), ("llama", False), ("qwen2", False), ("qwen2", True), ("granite", True),
          ("phi3", False), ("qwen3", True)]
# What each family adds to the common shape, at values far from Llama's so that a part left out shows:
# Granite's four scalars, Phi-3's partial rotary (fused weights come with the class), Qwen3's head_dim
# apart from hidden_size / heads (its q/k norms come with the class).
FAMILY_SETTINGS = {
    "llama": {}, "qwen2": {},
    "granite": dict(embedding_multiplier=2.5, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=4.0),
    "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                 pad_token_id=0),
    "qwen3": dict(head_dim=32),
}
HF_CLASSES = {"llama": "Llama", "qwen2": "Qwen2", "granite": "Granite", "phi3": "Phi3", "qwen3": "Qwen3"}
PROMPT_LENGTHS = [1, 7, 13]
ATOL = 2e-5


def tiny_config(arch, tied):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tied)
    return getattr(transformers, HF_CLASSES[arch] + "Config")(**common, **FAMILY_SETTINGS[arch])


def save_tiny(arch, tied, folder, seed=0, **save_kwargs):
    torch.manual_seed(seed)
    hf_cls = getattr(transformers, HF_CLASSES[arch] + "ForCausalLM")
    hf = hf_cls(tiny_config(arch, tied)).eval()
    hf.save_pretrained(folder, **save_kwargs)
    return hf


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: f"{m[0]}-{'tied' if m[1] else 'untied'}")
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    hf = save_tiny(*request.param, folder)
    return hf, folder


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0]


def runner_for(folder, num_blocks=128, block_size=4):
    model, _ = load_model(folder)
    return ModelRunner(model, num_blocks=num_blocks, block_size=block_size, backend="torch")


@pytest.mark.parametrize("prompt_len", PROMPT_LENGTHS)
def test_prefill_and_20_decode_steps_match_transformers(checkpoint, prompt_len):
    hf, folder = checkpoint
    runner = runner_for(folder)
    gen = torch.Generator().manual_seed(prompt_len)
    tokens = torch.randint(0, VOCAB, (prompt_len,), generator=gen).tolist()
    seq = runner.manager.allocate(0)
    logits = runner.logits(runner.forward([seq], [tokens]))
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=ATOL, rtol=1e-4)
    for _ in range(20):
        tokens.append(int(torch.randint(0, VOCAB, (1,), generator=gen)))
        logits = runner.logits(runner.forward([seq], [tokens[-1:]]))
        torch.testing.assert_close(logits[0], hf_logits(hf, tokens)[-1], atol=ATOL, rtol=1e-4)
    assert runner.manager.num_tokens(seq) == prompt_len + 20


def test_mixed_batch_of_prefills_and_decodes(checkpoint):
    hf, folder = checkpoint
    runner = runner_for(folder)
    gen = torch.Generator().manual_seed(1)
    histories = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (5, 9, 2)]
    seqs = [runner.manager.allocate(0) for _ in histories]
    runner.forward(seqs[:2], histories[:2])  # sequences 0 and 1 exist; 2 prefills below
    new = [[int(torch.randint(0, VOCAB, (1,), generator=gen))], [3, 4, 5], histories[2]]
    hidden = runner.forward(seqs, new)
    logits = runner.logits(hidden)
    assert logits.shape == (1 + 3 + 2, VOCAB)
    start = 0
    for history, tokens in zip(histories[:2] + [[]], new, strict=True):
        expected = hf_logits(hf, history + tokens)[-len(tokens):]
        torch.testing.assert_close(logits[start:start + len(tokens)], expected, atol=ATOL, rtol=1e-4)
        start += len(tokens)


def test_forked_particles_share_the_prompt_and_match_after_resampling(checkpoint):
    hf, folder = checkpoint
    runner = runner_for(folder, num_blocks=96, block_size=4)
    bm = runner.manager
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, VOCAB, (10,), generator=gen).tolist()  # 2.5 blocks: the last is shared, partly full
    root = bm.allocate(0)
    runner.forward([root], [prompt])
    blocks_after_prompt = bm.num_blocks - bm.num_free_blocks
    particles = [root] + [bm.fork(root) for _ in range(7)]
    assert bm.num_blocks - bm.num_free_blocks == blocks_after_prompt  # forks copy nothing
    tokens = {p: list(prompt) for p in particles}

    def decode(steps):
        for _ in range(steps):
            new = [[int(torch.randint(0, VOCAB, (1,), generator=gen))] for _ in particles]
            logits = runner.logits(runner.forward(particles, new))
            for p, t, row in zip(particles, new, logits, strict=True):
                tokens[p] += t
                torch.testing.assert_close(row, hf_logits(hf, tokens[p])[-1], atol=ATOL, rtol=1e-4)

    decode(3)
    ancestors = np.array([0, 0, 0, 3, 3, 5, 6, 6])
    parents = [particles[a] for a in ancestors]
    particles = bm.resample(particles, ancestors).tolist()
    tokens = {child: list(tokens[parent]) for child, parent in zip(particles, parents, strict=True)}
    decode(4)  # the first token after resampling copies the shared, partly filled last blocks
    # every block is referenced by the particles that share it, no more
    refs = np.zeros(bm.num_blocks, dtype=np.int64)
    for p in particles:
        np.add.at(refs, bm.block_table(p), 1)
    assert bm.ref_counts().tolist() == refs.tolist()


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_tiny("qwen2", False, tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    runner = runner_for(tmp_path)
    seq = runner.manager.allocate(0)
    torch.testing.assert_close(runner.logits(runner.forward([seq], [[1, 2, 3]])), hf_logits(hf, [1, 2, 3]),
                               atol=ATOL, rtol=1e-4)


def test_missing_weight_names_file_and_tensor(tmp_path):
    save_tiny("llama", False, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    missing = r"weight model\.layers\.1\.mlp\.up_proj\.weight not found in .*model\.safetensors"
    with pytest.raises(ValueError, match=missing):
        load_model(tmp_path)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    save_tiny("llama", True, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    wrong_shape = r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"
    with pytest.raises(ValueError, match=wrong_shape):
        load_model(tmp_path)


def test_unsupported_architecture_and_missing_files(tmp_path):
    save_tiny("llama", True, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json names architecture 'GPT2LMHeadModel'; supported"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "nowhere")
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no \*\.safetensors weights"):
        load_model(tmp_path)


def test_bad_tokens_and_full_cache_change_nothing(checkpoint):
    _, folder = checkpoint
    runner = runner_for(folder, num_blocks=3, block_size=4)
    seq = runner.manager.allocate(0)
    runner.forward([seq], [[1, 2, 3]])
    with pytest.raises(ValueError, match=rf"token id {VOCAB} is outside the vocabulary"):
        runner.forward([seq], [[5, VOCAB]])
    with pytest.raises(OutOfBlocksError):
        runner.forward([seq], [list(range(20))])
    assert runner.manager.num_tokens(seq) == 3 and runner.manager.num_free_blocks == 2


def test_a_failed_forward_gives_the_sequences_their_lengths_back(checkpoint, monkeypatch):
    hf, folder = checkpoint
    runner = runner_for(folder, num_blocks=16, block_size=4)
    bm = runner.manager
    prompt = list(range(1, 11))  # the third block is partly full and shared once forked
    root = bm.allocate(0)
    runner.forward([root], [prompt])
    pair = [root, bm.fork(root)]
    free_before = bm.num_free_blocks

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    model = runner.model
    monkeypatch.setattr(runner, "model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.forward(pair, [[3, 4, 5], [6, 7, 8]])
    assert [bm.num_tokens(s) for s in pair] == [10, 10]
    # The blocks the append took are back, but for the copy-on-write copy of the shared block.
    assert bm.num_free_blocks == free_before - 1
    refs = np.zeros(bm.num_blocks, dtype=np.int64)
    for seq in pair:
        np.add.at(refs, bm.block_table(seq), 1)
    assert bm.ref_counts().tolist() == refs.tolist()
    monkeypatch.setattr(runner, "model", model)
    logits = runner.logits(runner.forward(pair, [[3, 4, 5], [6, 7, 8]]))
    for row, new in zip(logits[runner.last_token_index([[3, 4, 5], [6, 7, 8]])], ([3, 4, 5], [6, 7, 8]), strict=True):
        torch.testing.assert_close(row, hf_logits(hf, prompt + new)[-1], atol=ATOL, rtol=1e-4)


def test_sampling():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    assert sample(logits, SamplingParams(temperature=0)).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, SamplingParams(top_k=1), gen).tolist() == logits.argmax(-1).tolist()
    assert sample(logits, SamplingParams(top_p=1e-6), gen).tolist() == logits.argmax(-1).tolist()
    a = sample(logits, SamplingParams(), torch.Generator().manual_seed(5))
    b = sample(logits, SamplingParams(), torch.Generator().manual_seed(5))
    assert a.tolist() == b.tolist()
    top3 = logits.topk(3, dim=-1).indices
    draws = torch.stack([sample(logits, SamplingParams(top_k=3, temperature=2.0), gen) for _ in range(200)], 1)
    assert all(set(d.tolist()) <= set(t.tolist()) for d, t in zip(draws, top3, strict=True))
    # top_p keeps the smallest prefix of the sorted distribution that holds p of the mass
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    draws = torch.stack([sample(probs.log(), SamplingParams(top_p=0.7), gen) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    for kwargs, message in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -2}, "top_k")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)


def test_triton_backend_agrees_with_torch(checkpoint):
    hf, folder = checkpoint
    model, _ = load_model(folder)
    runners = [ModelRunner(model, num_blocks=64, block_size=4, backend=name) for name in ("torch", "triton")]
    gen = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, VOCAB, (6,), generator=gen).tolist()
    particles = []
    for runner in runners:
        root = runner.manager.allocate(0)
        runner.forward([root], [prompt])
        particles.append([root] + [runner.manager.fork(root) for _ in range(3)])
    for _ in range(4):
        new = [[int(torch.randint(0, VOCAB, (1,), generator=gen))] for _ in range(4)]
        torch_logits, triton_logits = (r.logits(r.forward(p, new)) for r, p in zip(runners, particles, strict=True))
        torch.testing.assert_close(triton_logits, torch_logits, atol=ATOL, rtol=1e-4)


ROPE_VARIANTS = [
    {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "rope_theta": 10000.0},
]


@pytest.mark.parametrize("rope", ROPE_VARIANTS, ids=lambda r: r["rope_type"])
def test_rope_scaling_as_the_config_says(tmp_path, rope):
    torch.manual_seed(0)
    config = tiny_config("llama", False)
    config.rope_parameters = rope
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    runner = runner_for(tmp_path)
    tokens = torch.randint(0, VOCAB, (150,), generator=torch.Generator().manual_seed(1)).tolist()  # past 128
    seq = runner.manager.allocate(0)
    torch.testing.assert_close(runner.logits(runner.forward([seq], [tokens])), hf_logits(hf, tokens),
                               atol=ATOL, rtol=1e-4)


def test_length_dependent_rope_is_refused(tmp_path):
    config = tiny_config("llama", False)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope type 'dynamic' depends on the sequence length"):
        load_model(tmp_path)


def test_phi3_longrope_is_refused(tmp_path):
    factors = [1.0] * 4  # one per rotated frequency pair: head_dim 16 x partial factor 0.5 / 2
    config = tiny_config("phi3", False)
    config.rope_parameters = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                              "short_factor": factors, "long_factor": factors,
                              "original_max_position_embeddings": 256}
    transformers.Phi3ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="rope type 'longrope' depends on the sequence length"):
        load_model(tmp_path)


def test_mistral_without_sliding_window_runs_as_llama(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           sliding_window=None)
    hf = MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    runner = runner_for(tmp_path)
    seq = runner.manager.allocate(0)
    torch.testing.assert_close(runner.logits(runner.forward([seq], [[4, 8, 15, 16, 23, 42]])),
                               hf_logits(hf, [4, 8, 15, 16, 23, 42]), atol=ATOL, rtol=1e-4)
    config_json = json.loads((tmp_path / "config.json").read_text())
    config_json["sliding_window"] = 128
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(ValueError, match="sliding-window attention"):
        load_model(tmp_path)


def test_inverse_cdf_sampling_follows_its_uniforms():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.log()

    def pick(u):
        return sample(logits, SamplingParams(), uniforms=torch.tensor(u)).tolist()

    assert pick([0.05, 0.0]) == [0, 0]
    assert pick([0.1, 0.26]) == [2, 1]  # token 1 has no mass and is skipped
    assert pick([0.69, 0.99]) == [2, 3]
    assert pick([0.71, 0.5]) == [3, 2]
    # each row depends on its own uniform only
    assert sample(logits[1:], SamplingParams(), uniforms=torch.tensor([0.5])).tolist() == [2]
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    draws = sample(logits[:1].expand(20000, -1), SamplingParams(), uniforms=u)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)


# (rows, vocab): one entry, fewer rows than a native group of 8, a group and a bit, a real vocabulary
INVERSE_CDF_SHAPES = [(1, 1), (3, 5), (9, 7), (13, 1000), (16, 49152)]


@pytest.mark.parametrize("rows,vocab", INVERSE_CDF_SHAPES)
@pytest.mark.parametrize("spread", [0.1, 3.0, 30.0])
def test_native_inverse_cdf_equals_the_float64_running_sums(rows, vocab, spread, native_threads):
    gen = torch.Generator().manual_seed(rows * vocab)
    probs = (torch.randn(rows, vocab, generator=gen) * spread).softmax(-1)
    probs[rows // 2, ::3] = 0.0  # tokens without mass never drawn
    u = torch.rand(rows, generator=gen)
    u[0] = 0.0
    u[-1] = 1.0 - 2**-24  # the largest float32 below 1: the point may round up to the total
    expected = inverse_cdf_reference(probs, u)
    actual = inverse_cdf(probs, u)
    differ = (actual != expected).nonzero().flatten().tolist()
    assert not differ, f"{len(differ)} of {rows} rows differ, first {differ[:5]}"
    # every point that lands exactly on a running sum takes the next token (right=True)
    cdf = probs.double().cumsum(-1)
    on_step = (cdf[:, vocab // 2] / cdf[:, -1]).float()
    exact = (on_step.double() * cdf[:, -1] == cdf[:, vocab // 2])
    assert torch.equal(inverse_cdf(probs, on_step)[exact], inverse_cdf_reference(probs, on_step)[exact])


def cpu_has_onednn_bf16() -> bool:
    """What oneDNN's bf16 linear needs of the CPU, as /proc/cpuinfo lists it: AVX-NE-CONVERT, or
    AVX-512 BW, VL and DQ (without them the first pack fails)."""
    flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    return "avx_ne_convert" in flags or {"avx512bw", "avx512vl", "avx512dq"} <= flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_layers_run_packed_where_onednn_does(checkpoint, dtype):
    model, _ = load_model(checkpoint[1], dtype=dtype)
    runner = ModelRunner(model, num_blocks=8)
    assert runner.linear_impl == _native.linear_impl("cpu", dtype)
    onednn = runner.linear_impl == "onednn"
    assert onednn == (torch.backends.mkldnn.is_available() and (
        dtype == torch.float32 or dtype == torch.bfloat16 and cpu_has_onednn_bf16()))
    # q/k/v and gate/up run as one packed GEMM each; every other linear layer packed on its own
    groups = {"qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")}
    grouped = {}
    for module in model.modules():
        for name, parts in groups.items():
            if all(hasattr(module, part) for part in parts):  # (Phi-3's checkpoints fuse them already)
                group = getattr(module, name)
                assert (group is not None) == onednn, "q/k/v and gate/up grouped where oneDNN runs"
                if group is not None:
                    grouped[group] = [getattr(module, part) for part in parts]
    expected = sum(all(hasattr(m, part) for part in parts) for m in model.modules() for parts in groups.values())
    assert len(grouped) == (expected if onednn else 0)
    members = {id(m) for parts in grouped.values() for m in parts}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all((m.packed is not None) == (onednn and id(m) not in members) for m in linears)
    gen = torch.Generator().manual_seed(0)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 5e-2}
    for m in linears:
        x = torch.randn(7, m.in_features, generator=gen).to(dtype)
        torch.testing.assert_close(m(x), torch.nn.functional.linear(x, m.weight, m.bias), **tolerance)
    for group, parts in grouped.items():
        x = torch.randn(7, parts[0].in_features, generator=gen).to(dtype)
        for out, m in zip(group(x), parts, strict=True):
            torch.testing.assert_close(out, torch.nn.functional.linear(x, m.weight, m.bias), **tolerance)


def test_bfloat16_stays_within_twice_transformers_own_bfloat16_error(checkpoint):
    hf, folder = checkpoint
    model, _ = load_model(folder, dtype=torch.bfloat16)
    runner = ModelRunner(model, num_blocks=64, block_size=4, backend="torch")
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, VOCAB, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    seq = runner.manager.allocate(0)
    ours = [runner.logits(runner.forward([seq], [tokens[:6]]))[-1]]
    ours += [runner.logits(runner.forward([seq], [[t]]))[0] for t in tokens[6:]]  # prefill, then decode
    exact = hf_logits(hf, tokens)[5:]
    with torch.no_grad():
        theirs = hf_bf16(torch.tensor([tokens])).logits[0, 5:].float()
    our_error = (torch.stack(ours) - exact).abs().max().item()
    their_error = (theirs - exact).abs().max().item()
    assert our_error <= 2 * their_error + 1e-3, f"bf16 error {our_error:.4f}, transformers' own {their_error:.4f}"

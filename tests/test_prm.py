"""PRM rewards scored step by step on a forked, resampled KV cache equal one full-sequence forward."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2Model

from pf_engine import OutOfBlocksError
from pf_engine.models import load_model
from pf_engine.prm import ClassHeadPRM, TokenPairPRM, ValueHeadPRM
from pf_engine.resample import REWARD_KINDS
from pf_engine.runner import ModelRunner

VOCAB = 89
SEPARATOR, GOOD, BAD = 7, 11, 12
STEPS = 4


def tiny_prm_checkpoint(folder, value_head: bool = False):
    """A random Qwen2 trunk with a 2-class head, saved as Qwen2.5-Math-PRM checkpoints are, or with a
    value head, saved as Skywork-o1-Open-PRM's are (their unused lm_head included)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    trunk = Qwen2Model(config).eval()
    head = torch.nn.Sequential(torch.nn.Linear(48, 48), torch.nn.ReLU(), torch.nn.Linear(48, 2))
    name, arch = "score", "Qwen2ForProcessRewardModel"
    if value_head:
        head, name, arch = torch.nn.Linear(48, 1), "v_head.summary", "Qwen2ForPrmModel"
    weights = {f"model.{k}": v for k, v in trunk.state_dict().items()}
    weights |= {f"{name}.{k}": v for k, v in head.state_dict().items()}
    if value_head:
        weights["lm_head.weight"] = torch.randn(VOCAB, 48)
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    config_dict = config.to_dict() | {"architectures": [arch], "num_labels": 2}
    (folder / "config.json").write_text(json.dumps(config_dict))
    return trunk, head


def random_steps(gen, num_seqs):
    return [[torch.randint(13, VOCAB, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
             for _ in range(num_seqs)] for _ in range(STEPS)]


def run_incremental(prm, prompt, steps_per_round, ancestors):
    """Prompt once, fork 4 ways, score each round's steps, resample after round 1."""
    bm = prm.runner.manager
    root = bm.allocate(0)
    prm.runner.forward([root], [prompt])
    seqs = [root] + [bm.fork(root) for _ in range(3)]
    texts = {s: list(prompt) for s in seqs}
    scored = []
    for round_, steps in enumerate(steps_per_round):
        logits = prm.score_ids(seqs, steps)
        for s, step, row in zip(seqs, steps, logits, strict=True):
            texts[s] += step + [prm.marker_id]
            scored.append((list(texts[s]), row))
        if round_ == 1:
            parents = [seqs[a] for a in ancestors]
            seqs = bm.resample(seqs, ancestors).tolist()
            texts = {c: list(texts[p]) for c, p in zip(seqs, parents, strict=True)}
    return scored


def test_class_head_rewards_incremental_equal_full(tmp_path):
    trunk, head = tiny_prm_checkpoint(tmp_path)
    model, _ = load_model(tmp_path)
    prm = ClassHeadPRM(ModelRunner(model, num_blocks=64, block_size=4, backend="torch"), SEPARATOR)
    assert prm.reward_kind in REWARD_KINDS
    gen = torch.Generator().manual_seed(3)
    scored = run_incremental(prm, [1, 2, 3, 4, 5], random_steps(gen, 4), np.array([2, 2, 0, 3]))
    for tokens, logits in scored:
        with torch.no_grad():
            expected = head(trunk(torch.tensor([tokens])).last_hidden_state[0, -1])
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)
    assert len(scored) == 4 * STEPS


def test_value_head_rewards_incremental_equal_full(tmp_path):
    trunk, head = tiny_prm_checkpoint(tmp_path, value_head=True)
    model, _ = load_model(tmp_path)
    prm = ValueHeadPRM(ModelRunner(model, num_blocks=64, block_size=4, backend="torch"), SEPARATOR)
    assert prm.reward_kind in REWARD_KINDS
    gen = torch.Generator().manual_seed(5)
    scored = run_incremental(prm, [1, 2, 3], random_steps(gen, 4), np.array([3, 0, 0, 1]))
    for tokens, reward in scored:
        with torch.no_grad():
            expected = torch.sigmoid(head(trunk(torch.tensor([tokens])).last_hidden_state[0, -1]))[0]
        torch.testing.assert_close(reward, expected, atol=2e-6, rtol=1e-5)
    assert len(scored) == 4 * STEPS


def test_token_pair_rewards_incremental_equal_full(tmp_path):
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    prm = TokenPairPRM(ModelRunner(model, num_blocks=64, block_size=3, backend="torch"), SEPARATOR, GOOD, BAD)
    gen = torch.Generator().manual_seed(4)
    scored = run_incremental(prm, [1, 2, 3, 4], random_steps(gen, 4), np.array([1, 1, 1, 3]))
    for tokens, logits in scored:
        with torch.no_grad():
            expected = hf(torch.tensor([tokens])).logits[0, -1, [GOOD, BAD]]
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_class_head_prm_needs_a_class_head(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    with pytest.raises(ValueError, match="has no class head"):
        ClassHeadPRM(ModelRunner(model, num_blocks=8, backend="torch"), SEPARATOR)
    with pytest.raises(ValueError, match="has no value head"):
        ValueHeadPRM(ModelRunner(model, num_blocks=8, backend="torch"), SEPARATOR)


def test_outcome_scores_equal_transformers_on_the_chat(tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from pf_engine.models.smollm2 import smollm2_path
    from pf_engine.prm import OutcomeRM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())  # a real chat template
    torch.manual_seed(2)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id or 0)
    hf = LlamaForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    model, _ = load_model(tmp_path)
    orm = OutcomeRM(ModelRunner(model, num_blocks=20, block_size=4, backend="torch"), tokenizer)
    batches = []
    forward = orm.runner.forward
    orm.runner.forward = lambda seqs, tokens: batches.append(len(seqs)) or forward(seqs, tokens)
    question = "What is 3 + 4?"
    answers = ["3 + 4 = 7.\n\nThe answer is \\boxed{7}.", "It is 8.", "", "Seven, since 3 + 4 = 7 and 7 is odd."]
    scores = orm.score(question, answers)
    for answer, score in zip(answers, scores, strict=True):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question},
                                             {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            expected = hf(torch.tensor([tokenizer.encode(ids, add_special_tokens=False)])).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=2e-5)
    assert batches[1] == 4 and min(batches[2:]) < 4, batches  # the opening, then all four: too many, so halves
    assert orm.runner.manager.num_free_blocks == orm.runner.manager.num_blocks
    with pytest.raises(OutOfBlocksError, match="cannot hold the question and one answer"):
        orm.score(question, ["7 " * 40])
    assert orm.runner.manager.num_free_blocks == orm.runner.manager.num_blocks

"""PRM formats: the tokens a format builds step by step equal the tokens of its model card's
reference text, built by the tokenizer in one piece.

The models' own tokenizers cannot be downloaded here; SmolLM2's (byte-level BPE with a ChatML
template) stands in, with Qwen2.5-Math-PRM's "<extra_0>" added as a special token.
"""

import pytest
from transformers import AutoTokenizer

from pf_engine.models.smollm2 import smollm2_path
from pf_engine.prm_format import PRESETS, PRMFormat, prm_format

QUESTION = "Janet has 3 apples and buys 4 more. How many apples does she have?"
STEPS = ["Step 1: She starts with 3 apples.", "Step 2: 3 + 4 = 7.", "Step 3: The answer is \\boxed{7}."]


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    return tok


def incremental(fmt: PRMFormat, tokenizer, steps) -> tuple[list[int], list[int]]:
    """The tokens a PRM has read after ``steps``, step by step, and the positions of its markers."""
    ids, reads = fmt.prompt_ids(tokenizer, QUESTION), []
    marker = fmt.marker_id(tokenizer)
    for index, step in enumerate(steps):
        ids += fmt.step_ids(tokenizer, index, step) + [marker]
        reads.append(len(ids) - 1)
    return ids, reads


def test_qwen_math_prm_reads_the_model_cards_conversation(tokenizer):
    fmt = prm_format("qwen2.5-math-prm")
    messages = [{"role": "system", "content": fmt.system_prompt}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"}]
    reference = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    ids, reads = incremental(fmt, tokenizer, STEPS)
    assert reference[:len(ids)] == ids  # the card's text closes the assistant turn after the last step
    separator = tokenizer.convert_tokens_to_ids("<extra_0>")
    assert reads == [i for i, t in enumerate(reference) if t == separator]


def test_rlhflow_reads_each_step_where_the_assistants_reply_starts(tokenizer):
    fmt = prm_format("rlhflow")
    for num_steps in range(1, len(STEPS) + 1):
        conversation = []
        for k, step in enumerate(STEPS[:num_steps]):
            conversation.append({"role": "user", "content": f"{QUESTION} {step}" if k == 0 else step})
            conversation.append({"role": "assistant", "content": "+"})
        # the card's text with every reply "+"; the PRM reads at the last reply's first token
        text = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        reference = tokenizer.encode(text, add_special_tokens=False)
        ids, reads = incremental(fmt, tokenizer, STEPS[:num_steps])
        assert ids == reference
        full = tokenizer.encode(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)
        plus = tokenizer.convert_tokens_to_ids("+")
        assert [i + 1 for i in reads] == [i for i, t in enumerate(full) if t == plus]  # "+" follows each read


def test_skywork_reads_each_steps_newline(tokenizer):
    fmt = prm_format("skywork")
    # Skywork's own preparation: BOS, the problem and a newline, then each step tokenized alone and
    # followed by the newline token, read at that token
    newline = tokenizer.encode("\n", add_special_tokens=False)[-1]
    reference = tokenizer.encode(tokenizer.bos_token + QUESTION + "\n")
    reads = []
    for step in STEPS:
        reference += tokenizer.encode(step) + [newline]
        reads.append(len(reference) - 1)
    assert incremental(fmt, tokenizer, STEPS) == (reference, reads)


def test_math_shepherd_builds_the_model_cards_text():
    fmt = prm_format("math-shepherd")
    # the card: f"{question} {output}", output's steps each ending " ки", joined by newlines; the
    # tag's token carries its space in the card's (sentencepiece) tokenizer, so only the text is checked
    pieces = [QUESTION + fmt.question_suffix] + [
        (fmt.first_step_prefix if k == 0 else fmt.step_prefix) + step + fmt.step_suffix + " " + fmt.marker
        for k, step in enumerate(STEPS)]
    assert "".join(pieces) == f"{QUESTION} " + "\n".join(f"{step} ки" for step in STEPS)
    assert (fmt.good, fmt.bad) == ("+", "-")


def test_appending_a_step_only_appends_tokens(tokenizer):
    for name in ("qwen2.5-math-prm", "rlhflow", "skywork"):
        fmt = prm_format(name)
        before, _ = incremental(fmt, tokenizer, STEPS[:2])
        after, _ = incremental(fmt, tokenizer, STEPS)
        assert after[:len(before)] == before, name


def test_bad_formats_are_refused(tokenizer):
    with pytest.raises(ValueError, match="unknown PRM format 'qwen'; presets: " + ", ".join(PRESETS)):
        prm_format("qwen")
    with pytest.raises(ValueError, match="needs chat_template=True"):
        PRMFormat(chat_template=False, conversation=True, marker=None)
    with pytest.raises(ValueError, match="names a marker token"):
        PRMFormat(marker=None)
    with pytest.raises(ValueError, match="marker 'ки' is 2 tokens"):
        PRMFormat(marker="ки").marker_id(tokenizer)


def test_the_policy_prompt_takes_a_system_turn(tokenizer):
    from pf_engine.core import _chat_prompt
    from pf_engine.prompts import PROMPT_PRESETS

    system = PROMPT_PRESETS["qwen2.5-math"]
    assert system == "Please reason step by step, and put your final answer within \\boxed{}."
    turns = [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]
    expected = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert _chat_prompt(tokenizer, QUESTION, system) == tokenizer.encode(expected, add_special_tokens=False)
    assert system not in tokenizer.decode(_chat_prompt(tokenizer, QUESTION))

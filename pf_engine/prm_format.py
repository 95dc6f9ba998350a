"""How a process reward model is shown a question and its steps.

A PRM reads one token after each step (the marker) and scores the step there.
A format says what comes before the first step, what goes around each step,
and which token is the marker. The marker is a separator or step tag, or for a
conversation-style PRM, the end of the assistant's turn header::

    class head (Qwen2.5-Math-PRM)  <chat: system, user question, assistant>  step1 <extra_0>  step2 <extra_0>
    token pair (Math-Shepherd)     question  " " step1 " ки"  "\\n" step2 " ки"
    conversation (RLHFlow)         <user: question " " step1> <assistant:|  "+" <user: step2> <assistant:|
    value head (Skywork)           <bos> question "\\n"  step1 "\\n"  step2 "\\n"

Each step only appends tokens to what the PRM has read, so scoring step k reads
exactly what a PRM given the whole text in one piece reads at its k-th marker.
"""

import functools
from dataclasses import dataclass

from pf_engine.prompts import PROMPT_PRESETS

_SENTINELS = ("\x00step0\x00", "\x00step1\x00")


@dataclass(frozen=True, slots=True)
class PRMFormat:
    """How steps are shown to a PRM.

    system_prompt     a system turn before the question (chat formats)
    chat_template     the question as a user turn of the PRM tokenizer's chat template (plain text
                      and a newline where the tokenizer has none); else plain text, tokenized with
                      the tokenizer's special tokens
    bos_text          plain text: the tokenizer's BOS token written before the question
    question_suffix   text after the question, before the first step (plain text)
    first_step_prefix, step_prefix
                      text before the first step, before each later one
    step_suffix       text after each step, before the marker
    marker            the token read after each step; None for a conversation
    conversation      each step is a user turn, read where the assistant's reply would start; the
                      reply the history shows for earlier steps is ``reply``
    good, bad         the tokens whose logits a language-model PRM compares at the marker
    """

    system_prompt: str | None = None
    chat_template: bool = True
    bos_text: bool = False
    question_suffix: str = ""
    first_step_prefix: str = ""
    step_prefix: str = ""
    step_suffix: str = ""
    marker: str | None = "<extra_0>"
    conversation: bool = False
    reply: str = "+"
    good: str | None = None
    bad: str | None = None

    def __post_init__(self):
        if self.conversation and not self.chat_template:
            raise ValueError("a conversation-style PRM format needs chat_template=True")
        if (self.marker is None) != self.conversation:
            raise ValueError("a PRM format names a marker token, unless it is conversation-style (which reads at "
                             "the assistant's turn)")

    def prompt_ids(self, tokenizer, question: str) -> list[int]:
        """What the PRM reads before the first step."""
        if not self.chat_template:
            bos = tokenizer.bos_token if self.bos_text and tokenizer.bos_token else ""
            return tokenizer.encode(bos + question + self.question_suffix, add_special_tokens=True)
        if not getattr(tokenizer, "chat_template", None) and not self.conversation:
            return tokenizer.encode(question + "\n", add_special_tokens=True)  # as policies do
        if self.conversation:
            before, _ = self._render(tokenizer, question, 1).split(_SENTINELS[0])
            return _encode(tokenizer, before)
        return _encode(tokenizer, _chat(tokenizer, self._turns(question + self.question_suffix), True))

    def marker_id(self, tokenizer, name: str = "the PRM format's marker") -> int:
        """The token read after each step (``name``: what an error calls the marker)."""
        if self.conversation:
            return _encode(tokenizer, self._turn_end(tokenizer))[-1]
        return single_token(tokenizer, self.marker, name)

    def step_ids(self, tokenizer, index: int, text: str) -> list[int]:
        """Step ``index`` (0 first) of a particle, without the marker that follows it."""
        if not self.conversation:
            prefix = self.first_step_prefix if index == 0 else self.step_prefix
            return _encode(tokenizer, prefix + text + self.step_suffix)
        prefix = self.first_step_prefix if index == 0 else self._between(tokenizer) + self.step_prefix
        return _encode(tokenizer, prefix + text + self._turn_end(tokenizer))[:-1]

    # -- conversation-style: the template's text around a user turn, found with sentinels ----------
    def _turns(self, user: str, *later: str) -> list[dict]:
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns.append({"role": "user", "content": user})
        for content in later:
            turns += [{"role": "assistant", "content": self.reply}, {"role": "user", "content": content}]
        return turns

    def _render(self, tokenizer, question: str, num_steps: int) -> str:
        # step prefixes go with the steps' tokens: a space left at the end of a piece would not
        # tokenize as it does in one piece
        return _chat(tokenizer, self._turns(question + _SENTINELS[0], *_SENTINELS[1:num_steps]), True)

    def _turn_end(self, tokenizer) -> str:
        """From the end of a step to where the assistant's reply starts."""
        return self._around(tokenizer)[0]

    def _between(self, tokenizer) -> str:
        """From where the assistant's reply starts to the next step: the reply, the next user turn."""
        return self._around(tokenizer)[1]

    def _around(self, tokenizer) -> tuple[str, str]:
        return _conversation_pieces(self, tokenizer)


@functools.lru_cache(maxsize=16)  # rendered once per format and tokenizer; the cache holds the tokenizer itself
def _conversation_pieces(fmt: PRMFormat, tokenizer) -> tuple[str, str]:
    """(the end of a step's user turn up to the assistant's reply, the reply and the next user turn)."""
    turn_end = fmt._render(tokenizer, "", 1).split(_SENTINELS[0])[1]
    text = fmt._render(tokenizer, "", 2).split(_SENTINELS[0])[1].split(_SENTINELS[1])[0]
    if not text.startswith(turn_end):
        raise ValueError("the PRM tokenizer's chat template does not render a conversation's turns the same way "
                         "each time; a conversation-style format cannot be scored step by step with it")
    return turn_end, text[len(turn_end):]


# The presets: values from each model's card.
PRESETS = {
    # Qwen/Qwen2.5-Math-PRM-7B and -72B: the chat template, the policy's system prompt, steps each
    # followed by <extra_0>, where the 2-class head is read.
    "qwen2.5-math-prm": PRMFormat(system_prompt=PROMPT_PRESETS["qwen2.5-math"], marker="<extra_0>"),
    # peiyi9979/math-shepherd-mistral-7b-prm: f"{question} {output}", steps "Step k: ... ки" joined by
    # newlines; logits of "+" and "-" at each "ки".
    "math-shepherd": PRMFormat(chat_template=False, first_step_prefix=" ", step_prefix="\n", marker="ки",
                               good="+", bad="-"),
    # RLHFlow/Llama3.1-8B-PRM-Mistral-Data (and -Deepseek-Data): the question and first step as the first
    # user turn, each later step a user turn of its own, "+" as the assistant's reply to earlier steps;
    # logits of "+" and "-" where the reply starts.
    "rlhflow": PRMFormat(first_step_prefix=" ", marker=None, conversation=True, reply="+", good="+", bad="-"),
    # Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B and -7B: BOS, the problem and a newline, each step followed by
    # a newline, where the value head is read.
    "skywork": PRMFormat(chat_template=False, bos_text=True, question_suffix="\n", marker="\n"),
}


def prm_format(spec: "PRMFormat | str") -> PRMFormat:
    """A format, or a preset's name."""
    if isinstance(spec, PRMFormat):
        return spec
    if spec not in PRESETS:
        raise ValueError(f"unknown PRM format {spec!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[spec]


def _chat(tokenizer, turns: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this PRM format uses a chat template, and the PRM's tokenizer has none")
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def single_token(tokenizer, text: str, name: str) -> int:
    """The one token ``text`` is for ``tokenizer``; an error naming ``name`` if it is not one."""
    ids = _encode(tokenizer, text)
    if len(ids) != 1:
        raise ValueError(f"{name} {text!r} is {len(ids)} tokens for the PRM's tokenizer; it must be exactly one")
    return ids[0]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)

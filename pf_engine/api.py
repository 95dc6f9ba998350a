"""The public entry point: ``Engine(policy, prm).solve(problems, SearchConfig(...))``."""

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from pf_engine.answers import extract_answer
from pf_engine.confidence import trace_confidences
from pf_engine.core import PEAK_STATS, Core, chat_ids
from pf_engine.errors import OutOfBlocksError, size
from pf_engine.files import fingerprint, write_atomically
from pf_engine.models import load_model
from pf_engine.models.llama import head_dim
from pf_engine.philox import MAX_PROBLEMS
from pf_engine.prm import ClassHeadPRM, OutcomeRM, RulePRM, TokenPairPRM, ValueHeadPRM
from pf_engine.prm_format import PRESETS, PRMFormat, single_token
from pf_engine.prm_format import prm_format as as_prm_format
from pf_engine.runner import ModelRunner
from pf_engine.scheduler import Scheduler
from pf_engine.search import Algorithm, SearchConfig, algorithm_for
from pf_engine.state import Problem, TreeNode, path_texts, path_to
from pf_engine.votes import CONFIDENCE_VOTES, vote

DEFAULT_KV_MEMORY_CPU = 1 << 30


@dataclass
class Result:
    """One problem's outcome. ``tree`` holds every step of every particle, alive and dead.

    ``stats``: the problem's own counts (its prompt's and its PRM prompt's tokens, tokens
    generated, of which discarded when a preemption made it redo a round, PRM tokens
    prefilled, policy tokens prefilled for ancestor sampling and for rebuilding after
    preemptions, preemptions, and particles early stopping cancelled) and the peak KV blocks
    so far of the policy and of a model PRM, each beside the peak its particles would hold with no block shared
    (``peak_unshared_*``). The peaks are the pools', over every problem in them: from
    :meth:`Engine.solve` / :meth:`Engine.stream`, the call's so far; in ``pf-engine serve``,
    whose one scheduler serves every request, the server's since start-up (/metrics shows
    them; a response's usage holds only its request's own counts).
    """

    question: str
    answer: str | None  # the chosen text's answer (last \\boxed{...}, else last number), or the vote's winner
    text: str  # the chosen particle's full answer
    steps: list[str]  # its steps
    weights: list[float]  # final weights of all particles
    particles: list[str]  # final texts of all particles
    tree: list[TreeNode]
    leaves: list[int] = field(default_factory=list)  # tree node of each final particle's newest step
    chosen: int = 0  # index of the particle the answer came from
    stats: dict = field(default_factory=dict)
    outcome_scores: list[float] | None = None  # the outcome reward model's score of each final particle
    num_tokens: list[int] = field(default_factory=list)  # tokens of each final particle's text
    # why each final particle ended, as OpenAI says it: "stop" (EOS, a boxed answer, a stop string) or
    # "length" (max_new_tokens or max_steps, or cancelled by early stopping)
    finish_reasons: list[str] = field(default_factory=list)

    def path_of(self, particle: int) -> list[int]:
        """The tree nodes of final particle ``particle``'s steps, first to last."""
        return path_to(self.tree, self.leaves[particle])

    def steps_of(self, particle: int) -> list[str]:
        """The texts of final particle ``particle``'s steps, first to last."""
        return path_texts(self.tree, self.path_of(particle))

    def tree_records(self) -> list[dict]:
        """Every node's fields, and whether it is a final particle's newest step (``final``) and the
        chosen particle's (``chosen``)."""
        final = set(self.leaves)
        chosen = self.leaves[self.chosen] if self.leaves else None
        return [asdict(node) | {"final": node.node in final, "chosen": node.node == chosen} for node in self.tree]

    def plot_tree(self, path: str | Path) -> None:
        """A picture of the search tree (pf_engine.tree_plot): lineages by weight, dead branches grey,
        the chosen answer's path red, particle Gibbs' replayed reference steps ringed."""
        from pf_engine.tree_plot import plot_tree

        plot_tree(self.tree_records(), path,
                  title=self.question if len(self.question) <= 80 else self.question[:77] + "...")

    def write_tree(self, path: str | Path) -> None:
        """The search tree as JSONL, one step per line, written whole or not at all."""
        write_atomically(path, (json.dumps(record) for record in self.tree_records()))


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim(config) * dtype.itemsize


class Engine:
    """A policy model and an optional PRM, each with its own paged KV cache.

    Parameters
    ----------
    policy : path of a Hugging Face checkpoint folder; default: the embedded SmolLM2-135M-Instruct.
        A model already built (a module with ``config``, ``forward(input_ids, meta, backend, kv)``
        and ``compute_logits(hidden)``, as pf_engine.models builds them) is run as it is, with
        ``tokenizer``.
    prm : None, a callable ``f(question, steps) -> reward in [0, 1]``, or a checkpoint folder:
        a class-head PRM (Qwen2.5-Math-PRM; ``prm_separator`` marks step ends), a value-head
        PRM (Skywork-o1-Open-PRM; the "skywork" format unless ``prm_format`` says otherwise) or a
        language model read as a token-pair PRM (``prm_step_tag``, ``prm_good``, ``prm_bad``).
    prm_format : how a model PRM is shown the question and steps: a
        :class:`pf_engine.prm_format.PRMFormat` or a preset's name ("qwen2.5-math-prm",
        "math-shepherd", "rlhflow", "skywork"); it replaces ``prm_separator`` / ``prm_step_tag``
        (and gives ``prm_good`` / ``prm_bad`` where the preset has them). Without it, steps follow
        the PRM tokenizer's chat prompt of the question, each followed by the separator or tag.
    orm : None or an outcome reward model's checkpoint folder (a sequence-classification model with
        one label), scored once on each finished answer: ``Result.outcome_scores``, the final choice
        with ``final_answer="outcome"``, and best-of-N's ranking when there is no PRM.
    kv_cache_memory : bytes for the KV caches (policy, PRM and ORM together); default 1 GiB on the CPU,
        half the free GPU memory on CUDA.
    """

    def __init__(self, policy=None, prm=None, device="cpu", kv_cache_memory: int | None = None,
                 block_size: int = 16, backend: str = "auto", dtype: torch.dtype | None = None,
                 prm_separator: str = "<extra_0>", prm_step_tag: str | None = None,
                 prm_good: str | None = None, prm_bad: str | None = None, tokenizer=None,
                 prm_format: "PRMFormat | str | None" = None, orm=None):
        from transformers import AutoTokenizer

        if prm is not None and not callable(prm) and not isinstance(prm, (str, Path)):
            raise TypeError(f"prm must be None, a callable or a checkpoint path, got {type(prm).__name__}")
        if policy is None:
            from pf_engine.models.smollm2 import smollm2_path

            policy = smollm2_path()
        device = torch.device(device)
        if isinstance(policy, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("a policy given as a model needs its tokenizer: pass tokenizer=")
            policy_model, policy_config = policy, policy.config
        else:
            policy_model, policy_config = load_model(policy, dtype=dtype, device=device)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(policy)
        prm_model = prm_config = prm_tokenizer = None
        if isinstance(prm, (str, Path)):
            prm_model, prm_config = load_model(prm, dtype=dtype, device=device)
            prm_tokenizer = AutoTokenizer.from_pretrained(prm)
        orm_model = orm_config = None
        if orm is not None:
            if not isinstance(orm, (str, Path)):
                raise TypeError(f"orm must be a checkpoint path, got {type(orm).__name__}")
            orm_model, orm_config = load_model(orm, dtype=dtype, device=device)
        models = [(m, c) for m, c in ((policy_model, policy_config), (prm_model, prm_config), (orm_model, orm_config))
                  if m is not None]
        num_blocks = self._size_pools(models, kv_cache_memory, block_size, device)
        self.policy = ModelRunner(policy_model, num_blocks, block_size, backend)
        fmt = None if prm_format is None else as_prm_format(prm_format)
        if prm_model is not None:
            prm_engine = _model_prm(ModelRunner(prm_model, num_blocks, block_size, backend), prm_tokenizer, fmt,
                                    prm_separator, prm_step_tag, prm_good, prm_bad)
            fmt = prm_engine.fmt
        else:
            prm_engine = RulePRM(prm) if prm is not None else None
        self.core = Core(self.policy, tokenizer, prm_engine)
        # what the results depend on besides the search config (pf_engine.evaluate keys its cache by it)
        self.identity = {"policy": fingerprint(policy), "prm": fingerprint(prm), "orm": fingerprint(orm),
                         "prm_format": None if fmt is None else asdict(fmt),
                         "prm_tokens": [prm_good, prm_bad], "device": device.type,
                         "dtype": str(next(policy_model.parameters()).dtype), "backend": self.policy.backend.name}
        self.orm = None
        if orm_model is not None:
            self.orm = OutcomeRM(ModelRunner(orm_model, num_blocks, block_size, backend),
                                 AutoTokenizer.from_pretrained(orm))

    def _size_pools(self, models: list, kv_cache_memory: int | None, block_size: int, device) -> int:
        """Blocks per pool: the policy's, the PRM's and the ORM's caches get the same number of blocks,
        so one block of the budget is a block of each."""
        if kv_cache_memory is None:
            kv_cache_memory = (torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda"
                               else DEFAULT_KV_MEMORY_CPU)
        bytes_per_block = block_size * sum(_kv_bytes_per_token(config, next(model.parameters()).dtype)
                                           for model, config in models)
        num_blocks = int(kv_cache_memory // bytes_per_block)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory ({size(kv_cache_memory)}) holds no KV block: one block of "
                             f"{block_size} tokens takes {size(bytes_per_block)}")
        self.block_size, self.bytes_per_block, self.kv_cache_memory = block_size, bytes_per_block, kv_cache_memory
        return num_blocks

    def solve(self, problems, config: SearchConfig | None = None, progress=None) -> list["Result"]:
        """Solve every problem; ``problems`` are strings or dicts with "problem" or "question".

        Returns the results in input order (see :meth:`stream`); ``progress(num_done)``
        is called as each problem finishes.
        """
        results: list[Result | None] = [None] * len(problems)
        for done, (index, result) in enumerate(self.stream(problems, config), 1):
            results[index] = result
            if progress:
                progress(done)
        return results

    def stream(self, problems, config: SearchConfig | None = None) -> Iterator[tuple[int, "Result"]]:
        """Yield ``(index, Result)`` for each problem as soon as its search ends.

        A problem is named in the random streams by its index in ``problems``, or by
        the ``"key"`` its dict gives (an int below 2**20), and draws with the config's
        seed or the ``"seed"`` its dict gives: the same key, config and seed give the
        same result in any call, alone or with any other problems (a server's request
        is key 0 under the request's seed).

        Problems run together under continuous batching: they are admitted while the
        KV caches' free blocks allow, each advances its own rounds, and a problem that
        does not fit is preempted and later rebuilt from its search tree. Draws are
        keyed by problem, round, particle and token, so results do not depend on
        batching, admission order or preemption. If anything raises (a PRM callable,
        KeyboardInterrupt) or the generator is closed early, the caches are left as
        they were before the call.
        """
        config = config or SearchConfig()
        algorithm = self.algorithm(config)
        seeds = _seeds(problems, config.seed)
        states = [self.problem(p, i, key, algorithm, seed) for i, (p, key, seed)
                  in enumerate(zip(problems, _keys(problems, seeds), seeds, strict=True))]
        return self._stream(states)

    def algorithm(self, config: SearchConfig) -> Algorithm:
        """The search ``config`` asks for, checked against the models this engine has."""
        algorithm = algorithm_for(config)
        if algorithm.scores and config.weighting.prm and self.core.prm is None:
            if not algorithm.outcome_ranks or self.orm is None:
                raise ValueError(f"{config.algorithm} needs a PRM: pass prm= to the Engine"
                                 + (f" ({config.algorithm} may rank by an outcome model instead: orm=)"
                                    if algorithm.outcome_ranks else ""))
            algorithm.scores = False  # ranked by the outcome model alone
        if config.final_answer == "outcome" and self.orm is None:
            raise ValueError("final_answer 'outcome' needs an outcome reward model: pass orm= to the Engine")
        return algorithm

    def problem(self, item, index: int, key: int, algorithm: Algorithm, seed: int | None = None) -> Problem:
        """A fresh search of one problem (a string, or a dict as :meth:`stream` takes it) under ``algorithm``,
        drawing with ``seed`` (default: its config's): problems of one algorithm object, which end
        their rounds together, may differ in their seeds. OutOfBlocksError if it can never fit the KV caches.

        A conversation (``"messages"``) without a system turn gets the config's ``system_prompt``."""
        config, core = algorithm.config, self.core
        question = _question(item, index)
        if isinstance(item, dict) and "messages" in item:
            turns = [{"role": m["role"], "content": m["content"]} for m in _messages(item["messages"], index)]
            if config.system_prompt is not None and turns[0]["role"] != "system":
                turns.insert(0, {"role": "system", "content": config.system_prompt})
            prompt_ids = chat_ids(core.tokenizer, turns)
        elif isinstance(item, dict) and "prompt" in item:
            prompt_ids = core.tokenizer.encode(item["prompt"], add_special_tokens=True)
        else:
            prompt_ids = core.prompt_ids(question, config.system_prompt)
        problem = Problem(index=index, key=key, question=question, num_particles=config.num_particles,
                          prompt_ids=prompt_ids, prm_prompt_ids=core.prm_prompt_ids(question), algorithm=algorithm,
                          rules=config.step_rules(config.seed if seed is None else seed))
        self._check_fits(problem, config)
        return problem

    def _stream(self, states: list[Problem]) -> Iterator[tuple[int, "Result"]]:
        self.core.stats |= dict.fromkeys(PEAK_STATS, 0)  # a call's results carry the call's peaks
        scheduler = Scheduler(self.core, self.bytes_per_block, states)
        for problem in scheduler.run():
            yield problem.index, self.result(problem)

    def _check_fits(self, problem: Problem, config: SearchConfig) -> None:
        """OutOfBlocksError unless the problem fits alone at its minimum, on every pool: its prompt,
        and for every particle one block to share plus one step of its own."""
        step = np.full(config.num_particles, config.max_step_tokens)
        for pool, place in zip(self.core.pools, self.core.blocks_to_place(problem), strict=True):
            need, capacity = place + pool.blocks_to_write(step), pool.manager.num_blocks
            if need > capacity:
                raise OutOfBlocksError(
                    f"problem {problem.index} needs at least {need} KV blocks ({size(need * self.bytes_per_block)}) "
                    f"with {config.num_particles} particles of up to {config.max_step_tokens} tokens a step, but "
                    f"kv_cache_memory ({size(self.kv_cache_memory)}) holds {capacity}: raise kv_cache_memory or "
                    f"lower num_particles / max_step_tokens")

    def result(self, problem: Problem) -> Result:
        """The outcome of a problem whose search has ended."""
        algorithm, n = problem.algorithm, problem.num_particles
        config = algorithm.config
        steps = [problem.steps(slot) for slot in range(n)]
        texts = ["".join(s) for s in steps]
        weights = problem.weights.tolist()
        # early stopping: the particles it cancelled give no answer and are never chosen
        answering = problem.finished if problem.stopped_early else np.ones(n, dtype=bool)
        answers = [extract_answer(t) if ok else None for t, ok in zip(texts, answering.tolist(), strict=True)]
        outcome = self.orm.score(problem.question, texts) if self.orm is not None else None
        if config.final_answer == "vote" or algorithm.votes:
            if config.vote in CONFIDENCE_VOTES:  # each particle weighs its confidence over its whole answer
                weights = self._answer_confidences(problem)
            answer, chosen = vote(config.vote, answers, weights)
        elif config.final_answer == "sampled":
            rng = np.random.default_rng([problem.rules.seed, problem.key])
            chosen = int(rng.choice(n, p=np.asarray(weights) / np.sum(weights)))
            answer = answers[chosen]
        else:  # "best": the highest weight; "outcome", or best-of-N without a PRM: the best outcome score
            by_outcome = config.final_answer == "outcome" or (algorithm.outcome_ranks and not algorithm.scores)
            chosen = int(np.argmax(np.where(answering, outcome if by_outcome else weights, -np.inf)))
            answer = answers[chosen]
        stats = {"prompt_tokens": len(problem.prompt_ids),
                 "prm_prompt_tokens": len(problem.prm_prompt_ids or ()),
                 "tokens_generated": problem.tokens_generated, "prm_tokens": problem.prm_tokens,
                 "ancestor_tokens": problem.ancestor_tokens, "recomputed_tokens": problem.recomputed_tokens,
                 "discarded_tokens": problem.discarded_tokens,
                 "preemptions": problem.num_preemptions,
                 "cancelled_particles": sum(node.cancelled for node in problem.tree)} \
            | {key: self.core.stats[key] for key in PEAK_STATS}
        lengths = problem.num_tokens.tolist()
        reasons = ["stop" if done and not capped else "length"
                   for done, capped in zip(problem.finished.tolist(), problem.capped.tolist(), strict=True)]
        return Result(problem.question, answer, texts[chosen], steps[chosen], weights, texts, list(problem.tree),
                      problem.leaf.tolist(), chosen, stats, outcome, lengths, reasons)

    def _answer_confidences(self, problem: Problem) -> list[float]:
        """Each particle's confidence over all its tokens (pf_engine.confidence.trace_confidences)."""
        rules = problem.rules
        values = [np.concatenate([problem.node_values[node] for node in problem.path(slot)] or [np.zeros(0)])
                  for slot in range(problem.num_particles)]
        return trace_confidences(values, rules.signal, rules.tail_tokens, self.core.writer.vocab_size,
                                 problem.algorithm.config.signal_exponent).tolist()


def _model_prm(runner: ModelRunner, tokenizer, fmt: PRMFormat | None, separator: str, step_tag: str | None,
               good: str | None, bad: str | None):
    """The PRM a checkpoint's head makes (a value head, a class head, or a language model read at two
    tokens), in ``fmt`` or the format its kind defaults to."""
    model = runner.model
    if hasattr(model, "step_values"):
        fmt = fmt or PRESETS["skywork"]
        return ValueHeadPRM(runner, fmt.marker_id(tokenizer), fmt, tokenizer)
    marker_name = "the PRM format's marker"  # what an error calls it: the argument it came from, if one did
    if hasattr(model, "class_logits"):
        if fmt is None:
            fmt, marker_name = PRMFormat(marker=separator), "prm_separator"
        return ClassHeadPRM(runner, fmt.marker_id(tokenizer, marker_name), fmt, tokenizer)
    if fmt is None:
        if step_tag is None:
            raise ValueError("a language-model PRM needs prm_format= (a preset) or prm_step_tag, prm_good and prm_bad")
        fmt, marker_name = PRMFormat(marker=step_tag), "prm_step_tag"
    good, bad = good or fmt.good, bad or fmt.bad
    if None in (good, bad):
        raise ValueError("a language-model PRM needs prm_step_tag, prm_good and prm_bad (or a prm_format that names "
                         "its good and bad tokens)")
    return TokenPairPRM(runner, fmt.marker_id(tokenizer, marker_name), single_token(tokenizer, good, "prm_good"),
                        single_token(tokenizer, bad, "prm_bad"), fmt, tokenizer)


def _seeds(problems, seed: int) -> list[int]:
    """Each problem's seed: the "seed" its dict gives, else the config's."""
    seeds = [p.get("seed", seed) if isinstance(p, dict) else seed for p in problems]
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**62:
            raise ValueError(f"problem {i}: seed must be an int in [0, 2**62), got {s!r}")
    return seeds


def _keys(problems, seeds: list[int]) -> list[int]:
    """Each problem's name in the random streams: its "key" where a dict gives one, else its index."""
    keys = [p.get("key", i) if isinstance(p, dict) else i for i, p in enumerate(problems)]
    for i, key in enumerate(keys):
        if not isinstance(key, int) or not 0 <= key < MAX_PROBLEMS:
            raise ValueError(f"problem {i}: key must be an int in [0, {MAX_PROBLEMS}) (its name in the random "
                             f"streams), got {key!r}")
    if len(set(zip(keys, seeds, strict=True))) != len(keys):
        raise ValueError("two problems share a key and a seed: they would draw the same random numbers")
    return keys


def _question(problem, index: int) -> str:
    """What the PRM and the answer read as the question: the text, the "problem" or "question" field, the
    raw "prompt", or the last user turn of "messages"."""
    if isinstance(problem, str):
        text = problem
    elif isinstance(problem, dict):
        text = problem.get("problem", problem.get("question", problem.get("prompt")))
        if "messages" in problem:
            users = [m.get("content") for m in _messages(problem["messages"], index) if m.get("role") == "user"]
            if not users:
                raise ValueError(f"problem {index}: messages hold no user turn")
            text = users[-1]
        if text is None:
            raise ValueError(f"problem {index} has none of the fields 'problem', 'question', 'prompt' and "
                             f"'messages': {sorted(problem)}")
    else:
        raise TypeError(f"problem {index} must be a string or a dict, got {type(problem).__name__}")
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"problem {index} is empty")
    return text


def _messages(messages, index: int) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"problem {index}: messages must be a non-empty list of turns")
    for turn in messages:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") \
                or not isinstance(turn.get("content"), str):
            raise ValueError(f"problem {index}: each turn of messages needs a role (system, user or assistant) "
                             f"and a string content, got {turn!r}")
    return messages
